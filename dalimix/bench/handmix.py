"""MixUp / CutMix written with plain torch ops: what a DALI user adds after ``crop_mirror_normalize``.

The baseline "DALI + torch mixing" of ``dalimix bench``: DALI hands out a normalised float batch
``N x C x H x W``; this mixes it in place with its flipped self (timm's pairing, sample ``i``
with ``N-1-i``) and builds timm's smoothed soft targets. Per batch: MixUp (Zhang et al. 2018,
``lam ~ Beta(a, a)``) with probability ``1 - switch_prob``, else CutMix (Yun et al. 2019: a box
of side ratio ``sqrt(1 - lam)`` at a uniform centre, clipped, ``lam`` corrected to the pixel
fraction kept) — the same choice and defaults as timm's ``Mixup(mixup_alpha=0.8, cutmix_alpha=1.0)``.
"""

from __future__ import annotations

import numpy as np
import torch


def smoothed_one_hot(labels: torch.Tensor, num_classes: int, smoothing: float) -> torch.Tensor:
    """N x C float32 with ``1 - smoothing + smoothing / C`` at the label and ``smoothing / C`` elsewhere."""
    off = smoothing / num_classes
    out = torch.full((labels.shape[0], num_classes), off, device=labels.device, dtype=torch.float32)
    return out.scatter_(1, labels.view(-1, 1).long(), 1.0 - smoothing + off)


def cutmix_box(lam: float, height: int, width: int, rng: np.random.Generator) -> tuple[int, int, int, int]:
    """(y0, y1, x0, x1): side ratio ``sqrt(1 - lam)``, uniform centre, clipped at the edges."""
    ratio = np.sqrt(1.0 - lam)
    cut_h, cut_w = int(height * ratio), int(width * ratio)
    cy, cx = int(rng.integers(0, height)), int(rng.integers(0, width))
    y0, y1 = np.clip(cy - cut_h // 2, 0, height), np.clip(cy + cut_h // 2, 0, height)
    x0, x1 = np.clip(cx - cut_w // 2, 0, width), np.clip(cx + cut_w // 2, 0, width)
    return int(y0), int(y1), int(x0), int(x1)


def mixup_(images: torch.Tensor, lam: float) -> torch.Tensor:
    """In place: ``x_i = lam * x_i + (1 - lam) * x_{N-1-i}``."""
    partner = images.flip(0)  # a copy, taken before the in-place update
    return images.mul_(lam).add_(partner, alpha=1.0 - lam)


def cutmix_(images: torch.Tensor, box: tuple[int, int, int, int]) -> torch.Tensor:
    """In place: the box of ``x_i`` replaced by the same box of ``x_{N-1-i}``."""
    y0, y1, x0, x1 = box
    images[:, :, y0:y1, x0:x1] = images.flip(0)[:, :, y0:y1, x0:x1]
    return images


def mix_batch(
    images: torch.Tensor,
    labels: torch.Tensor,
    *,
    num_classes: int,
    rng: np.random.Generator,
    mixup_alpha: float = 0.8,
    cutmix_alpha: float = 1.0,
    switch_prob: float = 0.5,
    label_smoothing: float = 0.1,
    method: str | None = None,
    lam: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Mix ``images`` (N x C x H x W float, in place) and return ``(images, soft targets N x C)``.

    ``method`` ("mixup" or "cutmix") and ``lam`` replace the random draws (for tests).
    """
    if images.dim() != 4 or not images.is_floating_point():
        raise ValueError(f"images must be a float N x C x H x W tensor, got {images.dtype} {tuple(images.shape)}")
    if method is None:
        method = "cutmix" if rng.random() < switch_prob else "mixup"
    if method not in ("mixup", "cutmix"):
        raise ValueError(f"method={method!r}: 'mixup' or 'cutmix'")
    h, w = images.shape[-2:]
    if method == "mixup":
        lam = float(rng.beta(mixup_alpha, mixup_alpha)) if lam is None else float(lam)
        mixup_(images, lam)
    else:
        lam = float(rng.beta(cutmix_alpha, cutmix_alpha)) if lam is None else float(lam)
        box = cutmix_box(lam, h, w, rng)
        cutmix_(images, box)
        lam = 1.0 - (box[1] - box[0]) * (box[3] - box[2]) / float(h * w)
    own = smoothed_one_hot(labels, num_classes, label_smoothing)
    targets = own * lam + own.flip(0) * (1.0 - lam)
    return images, targets
