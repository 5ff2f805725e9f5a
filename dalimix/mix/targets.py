"""Targets of a mixed batch: timm's soft targets, or the compact (y_a, y_b, lam) form."""

from __future__ import annotations

from typing import NamedTuple

import torch


class CompactTargets(NamedTuple):
    """Targets without the N x C matrix: sample i is ``lam[i]`` of class ``y_a[i]`` and
    ``1 - lam[i]`` of class ``y_b[i]``, smoothed by ``smoothing``. ``dalimix.losses.MixCrossEntropy``
    takes it; ``to_soft(C)`` builds the dense form."""

    y_a: torch.Tensor
    y_b: torch.Tensor
    lam: torch.Tensor
    smoothing: float = 0.0

    def to_soft(self, num_classes: int) -> torch.Tensor:
        return soft_targets(self.y_a, None, self.lam, num_classes, self.smoothing, y_b=self.y_b)


def one_hot_smoothed(labels: torch.Tensor, num_classes: int, smoothing: float) -> torch.Tensor:
    """N x C float32: ``on = 1 - eps + eps / C`` at the label, ``off = eps / C`` elsewhere (timm)."""
    off = smoothing / num_classes
    on = 1.0 - smoothing + off
    out = torch.full((labels.shape[0], num_classes), off, dtype=torch.float32, device=labels.device)
    return out.scatter_(1, labels.long().view(-1, 1), on)


def soft_targets(labels, partner, lam, num_classes: int, smoothing: float = 0.0, *, y_b=None) -> torch.Tensor:
    """timm's ``mixup_target``: ``y1 * lam + y2 * (1 - lam)`` with smoothed one-hots (N x C float32).

    ``y2`` is the partner's one-hot (``partner`` indexes the batch) or ``y_b``'s.
    """
    y1 = one_hot_smoothed(labels, num_classes, smoothing)
    y2 = y1[partner] if y_b is None else one_hot_smoothed(y_b, num_classes, smoothing)
    lam = lam.to(torch.float32).view(-1, 1)
    return y1 * lam + y2 * (1.0 - lam)
