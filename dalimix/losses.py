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


DECOUPLE_MODES = ("both", "less", "more")


class DecoupledMixCrossEntropy(torch.nn.Module):
    """DecoupleMix's loss (Liu et al., "Harnessing Hard Mixed Samples with Decoupled Regularizer",
    NeurIPS 2023; OpenMixup's ``CrossEntropyLoss(use_soft=True, use_mix_decouple=True)``).

    For logits ``z`` (N x C) of samples mixed from classes ``a`` (weight ``lam``) and ``b``:

        loss = lam CE(z, a) + (1 - lam) CE(z, b)                      (mixup cross-entropy)
             + w_a (-log softmax(z without z_b)[a]) + w_b (-log softmax(z without z_a)[b])

    the decoupled terms classify each mixed class with the OTHER mixed class removed from the
    softmax, so a confident prediction of one class does not suppress the other. Weights (OpenMixup's
    ``ClsMixupHead(eta_weight=dict(eta, mode, thr))``): ``mode="both"``: ``w_a = w_b = eta``;
    ``"less"``: only the class whose weight is below ``thr`` (``w_a`` if ``lam < thr``, else ``w_b``);
    ``"more"``: only the other one; ``lam_power=p`` scales each by its class weight ``** p``
    (``lam_scale_mode="pow", lam_thr=1, lam_idx=p``; 0 = unscaled). Samples mixed within one class
    (``a == b``) get the mixup term only. Mean over the batch.

    Takes ``CompactTargets`` (the mixer's ``targets="compact"``); their label smoothing applies to
    the mixup term.
    """

    def __init__(self, *, eta: float = 0.1, mode: str = "both", thr: float = 0.5, lam_power: float = 0.0):
        super().__init__()
        from . import validate as v

        self.eta = v.number("eta", eta, lo=0, hint=" (the decoupled terms' weight)")
        self.mode = v.choice("mode", mode, DECOUPLE_MODES)
        self.thr = v.number("thr", thr, lo=0, hi=1)
        self.lam_power = v.number("lam_power", lam_power, lo=0, hi=100)

    def forward(self, logits: torch.Tensor, target) -> torch.Tensor:
        if not isinstance(target, CompactTargets):
            raise ValueError(
                "DecoupledMixCrossEntropy needs CompactTargets (y_a, y_b, lam): build the mixer with targets='compact'"
            )
        z = logits.float()
        y_a, y_b = target.y_a.long(), target.y_b.long()
        lam = target.lam.to(z.dtype).reshape(-1)
        eps = float(target.smoothing)
        mix = lam * F.cross_entropy(z, y_a, reduction="none", label_smoothing=eps) + (1 - lam) * F.cross_entropy(
            z, y_b, reduction="none", label_smoothing=eps
        )
        if self.eta == 0:
            return mix.mean()
        w_a = torch.full_like(lam, self.eta)
        w_b = torch.full_like(lam, self.eta)
        if self.mode != "both":
            below = lam < self.thr
            pick_a = below if self.mode == "less" else ~below
            w_a, w_b = torch.where(pick_a, w_a, 0.0), torch.where(pick_a, 0.0, w_b)
        if self.lam_power:
            w_a, w_b = w_a * lam**self.lam_power, w_b * (1 - lam) ** self.lam_power
        distinct = (y_a != y_b).to(z.dtype)
        loss = mix + distinct * (w_a * self._without(z, y_a, y_b) + w_b * self._without(z, y_b, y_a))
        return loss.mean()

    @staticmethod
    def _without(z: torch.Tensor, keep: torch.Tensor, drop: torch.Tensor) -> torch.Tensor:
        """``-log softmax(z without class drop)[keep]`` per sample (0 where keep == drop)."""
        masked = z.scatter(1, drop.view(-1, 1), float("-inf"))
        picked = z.gather(1, keep.view(-1, 1)).squeeze(1)
        out = torch.logsumexp(masked, dim=1) - picked
        return torch.where(keep == drop, torch.zeros_like(out), out)


class EtaBalancedMixLoss(torch.nn.Module):
    """SAMix's η-balanced mixup loss (Li et al., "Boosting Discriminative Visual Representation
    Learning with Scenario-Agnostic Mixup", arXiv 2111.15454), the Mix Block's objective: local
    smoothness between the two mixed classes, global discrimination from the others, balanced by
    ``eta``. In its positive-negative form, with sigmoid (binary) cross-entropy per class:

        loss = sum_{c in {a, b}} BCE(z_c, y_c)  +  eta * sum_{c not in {a, b}} BCE(z_c, y_c)

    for logits ``z`` (N x C) of a sample mixed from classes ``a`` (weight ``lam``) and ``b``,
    ``y = lam onehot(a) + (1 - lam) onehot(b)`` (smoothed as the targets say) and
    ``BCE(z, y) = -y log sigmoid(z) - (1 - y) log(1 - sigmoid(z))``; sum over classes, mean over
    the batch. The positive part is the two mixed classes (one when ``a == b``); the negative part
    only pushes the other classes' logits down.

    Limits: ``eta=1`` is the plain mixup BCE (OpenMixup's ``CrossEntropyLoss(use_sigmoid=True)`` on
    mixed labels); ``eta=0`` keeps the two mixed classes only. No ``eta`` gives the softmax mixup
    cross-entropy (``MixCrossEntropy``). This is OpenMixup's ``ClsMixupHead(multi_label=True,
    neg_weight=eta)`` with a sigmoid loss (class weights ``max(y > 0, eta)``; positives by class
    here, so a smoothed target keeps the split). OpenMixup's released SAMix configs put
    ``neg_weight`` (0.5 on CIFAR, 1 on ImageNet) on a softmax soft cross-entropy instead, where a
    weight on the zero targets changes nothing: they train the Mix Block with plain mixup
    cross-entropy, ``AutoMix(mix_block_loss="ce")``.

    Targets: ``CompactTargets``, soft ``N x C`` targets (positives: the classes with ``t > 0``), or
    int64 labels (one-hot, a single positive).
    """

    def __init__(self, *, eta: float = 0.5):
        super().__init__()
        from . import validate as v

        self.eta = v.number("eta", eta, lo=0, hi=1, hint=" (the weight of the classes not mixed)")

    def forward(self, logits: torch.Tensor, target) -> torch.Tensor:
        z = logits.float()
        n, c = z.shape
        if isinstance(target, CompactTargets):
            y = target.to_soft(c)
            weight = torch.full_like(z, self.eta)
            weight.scatter_(1, target.y_a.long().view(-1, 1), 1.0)
            weight.scatter_(1, target.y_b.long().view(-1, 1), 1.0)
        elif target.dtype in (torch.int64, torch.int32):
            y = F.one_hot(target.long(), c).to(z.dtype)
            weight = torch.where(y > 0, 1.0, self.eta)
        else:
            if target.shape != z.shape:
                raise ValueError(f"soft targets {tuple(target.shape)} do not match logits {tuple(z.shape)}")
            y = target.to(z.dtype)
            weight = torch.where(y > 0, 1.0, self.eta)
        bce = F.binary_cross_entropy_with_logits(z, y, reduction="none")
        return (weight * bce).sum(dim=1).mean()
