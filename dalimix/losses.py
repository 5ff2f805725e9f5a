"""Loss for mixed targets in either form dalimix produces."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .mix.targets import CompactTargets


class MixCrossEntropy(torch.nn.Module):
    """Cross-entropy against soft ``N x C`` targets or ``CompactTargets`` (mean over the batch).

    Soft: ``sum(-t * log_softmax(x))`` per sample, as timm's ``SoftTargetCrossEntropy``.
    Compact: ``lam * CE(x, y_a) + (1 - lam) * CE(x, y_b)`` with the targets' label smoothing —
    the same number without building the N x C matrix. Plain int64 labels work too.
    """

    def forward(self, logits: torch.Tensor, target) -> torch.Tensor:
        if isinstance(target, CompactTargets):
            eps = float(target.smoothing)
            a = F.cross_entropy(logits, target.y_a, reduction="none", label_smoothing=eps)
            b = F.cross_entropy(logits, target.y_b, reduction="none", label_smoothing=eps)
            lam = target.lam.to(a.dtype)
            return (lam * a + (1 - lam) * b).mean()
        if target.dtype in (torch.int64, torch.int32):
            return F.cross_entropy(logits, target.long())
        if target.shape != logits.shape:
            raise ValueError(f"soft targets {tuple(target.shape)} do not match logits {tuple(logits.shape)}")
        return torch.sum(-target * F.log_softmax(logits, dim=-1), dim=-1).mean()
