"""Random erasing (Zhong et al., "Random Erasing Data Augmentation", AAAI 2020) on a whole batch.

timm's ``RandomErasing`` semantics (``re_prob``, ``re_mode``, ``re_count``, ``re_split``), applied as
timm's prefetcher does: on the normalised (and, with a mixer, mixed) ``N x C x H x W`` output.
Planning and applying are apart (kornia's style): ``plan`` draws the boxes on the host, vectorised
over the batch, the boxes and timm's 10 attempts per box; ``table`` turns a plan (drawn or injected)
into the fused kernel's per-sample erase table, and ``dalimix.ops.mix_normalize(..., erase=table)``
erases in the kernel's own pass (the loader does this). Fills are normalised values: "const" 0,
"rand" one normal colour per box and channel (drawn with the plan), "pixel" normal noise from a
counter-based hash of (plan seed, sample, box, pixel, channel) computed in the kernel, so the same
seed gives the same erasing on the GPU, the CPU build of the kernel and the torch twin.
``apply`` erases a finished float tensor with the same table and the same noise (the standalone
reference the tests hold the kernel to).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from . import validate as v
from .ops.cpu import erase_torch
from .ops.record import ERASE_MAX_BOXES, erase_table

MODES = ("const", "rand", "pixel")
ATTEMPTS = 10  # timm's tries per box before giving the box up


@dataclass
class ErasePlan:
    """Boxes of one batch: ``boxes`` N x K x 4 int64 (top, left, h, w; h = w = 0: no box) in drawing
    order (a later box covers an earlier one; ``K <= 8``); ``colors`` N x K x C float32 for mode
    "rand"; ``seed`` of the per-pixel noise (mode "pixel", the kernel's hash RNG)."""

    boxes: np.ndarray
    colors: np.ndarray | None
    seed: int


class RandomErasing:
    """timm's ``RandomErasing`` for a batch; arguments by timm's names.

    Args (keyword-only):
        probability: chance that a sample is erased at all (timm's ``re_prob``).
        mode: "const" (zeros, i.e. the mean colour after normalisation), "rand" (one normal colour
            per box and channel), "pixel" (normal noise per pixel) — timm's ``re_mode``.
        min_count, max_count: boxes per erased sample, uniform in ``[min_count, max_count]`` (timm's
            ``re_count`` is ``max_count``, at most 8); each box's area is divided by the count.
        min_area, max_area: box area as a fraction of the image (per box: divided by the count).
        min_aspect, max_aspect: aspect ratio range, log-uniform (``max_aspect=None``: ``1 / min_aspect``).
        num_splits: > 1 leaves the first ``N // num_splits`` samples of each batch untouched (timm's
            ``re_split``: the clean split).
    """

    def __init__(
        self,
        *,
        probability: float = 0.5,
        mode: str = "const",
        min_count: int = 1,
        max_count: int | None = None,
        min_area: float = 0.02,
        max_area: float = 1 / 3,
        min_aspect: float = 0.3,
        max_aspect: float | None = None,
        num_splits: int = 0,
    ):
        self.probability = v.number("probability", probability, lo=0, hi=1, hint=" (timm's re_prob)")
        mode = (mode or "const").lower() if isinstance(mode, str) else mode
        self.mode = v.choice("mode", mode, MODES)
        self.min_count = v.integer("min_count", min_count, lo=1)
        self.max_count = (
            self.min_count
            if max_count is None
            else v.integer(
                "max_count",
                max_count,
                lo=self.min_count,
                hi=ERASE_MAX_BOXES,
                hint=f" (>= min_count={self.min_count}, at most {ERASE_MAX_BOXES} boxes; timm's re_count)",
            )
        )
        self.min_area = v.number("min_area", min_area, lo=0, hi=1, lo_open=True)
        self.max_area = v.number("max_area", max_area, lo=self.min_area, hi=1)
        self.min_aspect = v.number("min_aspect", min_aspect, lo=0, lo_open=True)
        max_aspect = 1 / self.min_aspect if max_aspect is None else max_aspect
        self.max_aspect = v.number("max_aspect", max_aspect, lo=self.min_aspect)
        self.num_splits = v.integer("num_splits", num_splits, lo=0)

    def __repr__(self) -> str:
        return (
            f"RandomErasing(probability={self.probability}, mode={self.mode!r}, count=({self.min_count}, "
            f"{self.max_count}), num_splits={self.num_splits})"
        )

    # --------------------------------------------------------------------------- planning
    def plan(self, n: int, channels: int, height: int, width: int, rng: np.random.Generator) -> ErasePlan:
        """Draw the boxes of a batch of ``n`` samples (timm's rule, vectorised)."""
        k_max = self.max_count
        start = n // self.num_splits if self.num_splits > 1 else 0
        erased = rng.random(n) <= self.probability
        erased[:start] = False
        if self.min_count == self.max_count:
            count = np.full(n, self.min_count)
        else:
            count = rng.integers(self.min_count, self.max_count + 1, size=n)
        shape = (n, k_max, ATTEMPTS)
        area = height * width
        target = rng.uniform(self.min_area, self.max_area, size=shape) * area / count[:, None, None]
        aspect = np.exp(rng.uniform(math.log(self.min_aspect), math.log(self.max_aspect), size=shape))
        h = np.rint(np.sqrt(target * aspect)).astype(np.int64)
        w = np.rint(np.sqrt(target / aspect)).astype(np.int64)
        fits = (w < width) & (h < height)
        first = fits.argmax(axis=2)  # the first attempt that fits
        found = fits.any(axis=2)
        pick = np.take_along_axis
        h = pick(h, first[..., None], axis=2)[..., 0]
        w = pick(w, first[..., None], axis=2)[..., 0]
        u = rng.random((n, k_max, 2))
        top = np.floor(u[..., 0] * (height - h + 1)).astype(np.int64)
        left = np.floor(u[..., 1] * (width - w + 1)).astype(np.int64)
        used = erased[:, None] & found & (np.arange(k_max)[None, :] < count[:, None])
        boxes = np.stack([top, left, h, w], axis=-1) * used[..., None]
        colors = rng.standard_normal((n, k_max, channels)).astype(np.float32) if self.mode == "rand" else None
        return ErasePlan(boxes=boxes.astype(np.int64), colors=colors, seed=int(rng.integers(0, 2**62)))

    def table(self, plan: ErasePlan) -> np.ndarray:
        """The fused kernel's erase table of ``plan`` (``N x 64`` int32, ``dalimix.ops.record.erase_table``)
        for ``dalimix.ops.mix_normalize(..., erase=...)``."""
        return erase_table(plan.boxes, mode=self.mode, seed=plan.seed, colors=plan.colors)

    # ---------------------------------------------------------------------------- applying
    def apply(self, images: torch.Tensor, plan: ErasePlan) -> torch.Tensor:
        """Erase ``plan``'s boxes in ``images`` (``N x 3 x H x W``, any float dtype and memory format),
        in place; returns ``images``. A standalone pass over a finished tensor, with the fills the fused
        kernel writes (the same hash noise): the reference of ``mix_normalize(..., erase=table(plan))``,
        which the loader uses instead (no pass of its own)."""
        if images.dim() != 4 or images.shape[1] != 3:
            raise ValueError(f"images must be N x 3 x H x W, got shape {tuple(images.shape)}")
        return erase_torch(images, self.table(plan))

    def __call__(self, images: torch.Tensor, rng: np.random.Generator) -> torch.Tensor:
        """Plan from ``rng`` and erase ``images`` (``N x C x H x W``) in place."""
        n, c, h, w = images.shape
        return self.apply(images, self.plan(n, c, h, w, rng))


def from_timm(
    re_prob: float, re_mode: str = "const", re_count: int = 1, re_split: bool = False, num_aug_splits: int = 0
) -> RandomErasing | None:
    """The eraser timm's ``create_loader`` builds from its arguments, or None when ``re_prob`` is 0."""
    if not re_prob:
        return None
    splits = (num_aug_splits or 2) if re_split else 0
    return RandomErasing(probability=re_prob, mode=re_mode, max_count=re_count, num_splits=splits)
