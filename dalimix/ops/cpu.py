"""CPU twin of the fused kernel: the same contract in vectorised torch.

Flip flags mirror the images before mixing (``FLAG_FLIP_SELF`` / ``FLAG_FLIP_PARTNER``). Computes
in float32 exactly like the kernel: ``v = b + w * (a - b)`` (``w`` = weight of the
sample's own image), ``out = (v - mean255) * inv_std255``, one cast into ``out``.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from .record import (
    FLAG_BILINEAR,
    FLAG_FLIP_PARTNER,
    FLAG_FLIP_SELF,
    FLAG_SIGMOID,
    METHOD_BLEND,
    METHOD_BOX,
    METHOD_GRID,
    METHOD_MASK,
    METHOD_NONE,
    METHOD_RESIZE,
    METHOD_SMOOTH,
)


def _upsample(t: torch.Tensor, size: tuple[int, int], bilinear: bool) -> torch.Tensor:
    """``t``: 1 x C x h x w float32 -> 1 x C x H x W with PyTorch's index rules (the kernel's)."""
    if bilinear:
        return F.interpolate(t, size=size, mode="bilinear", align_corners=False)
    return F.interpolate(t, size=size, mode="nearest")


def mix_normalize_cpu(
    images: torch.Tensor,
    records: np.ndarray,
    masks: torch.Tensor | None,
    *,
    mean255: torch.Tensor,
    inv_std255: torch.Tensor,
    out: torch.Tensor,
) -> torch.Tensor:
    """Mix, normalise, cast and lay out ``images`` (N_src x H x W x 3 uint8) into ``out`` (n x 3 x H x W)."""
    n = len(records)
    _, h, w, _ = images.shape
    v = images[:n].to(torch.float32)  # n x H x W x 3, a new tensor we may write into
    flip_self = torch.from_numpy(np.flatnonzero(records["flags"] & FLAG_FLIP_SELF))
    if len(flip_self):
        v[flip_self] = v[flip_self].flip(2)  # mirrored columns; boxes and masks stay in output coordinates
    method = records["method"]
    mixed = np.flatnonzero(method != METHOD_NONE)
    if len(mixed):
        sel = torch.from_numpy(mixed)
        rec = records[mixed]
        b = images[torch.from_numpy(rec["partner"].astype(np.int64))].to(torch.float32)  # k x H x W x 3
        flip_b = torch.from_numpy(np.flatnonzero(rec["flags"] & FLAG_FLIP_PARTNER))
        if len(flip_b):
            b[flip_b] = b[flip_b].flip(2)
        wself = torch.ones(len(mixed), h, w, 1)
        m = rec["method"]
        blend = np.flatnonzero(m == METHOD_BLEND)
        if len(blend):
            wself[torch.from_numpy(blend)] = torch.from_numpy(rec["lam"][blend].astype(np.float32)).view(-1, 1, 1, 1)
        boxed = np.flatnonzero((m == METHOD_BOX) | (m == METHOD_RESIZE))
        if len(boxed):
            r = rec[boxed]
            ys = torch.arange(h).view(1, h, 1)
            xs = torch.arange(w).view(1, 1, w)
            t = lambda k: torch.from_numpy(r[k].astype(np.int64)).view(-1, 1, 1)  # noqa: E731
            inside = (ys >= t("y0")) & (ys < t("y1")) & (xs >= t("x0")) & (xs < t("x1"))
            wself[torch.from_numpy(boxed)] = (~inside).unsqueeze(-1).to(torch.float32)
        for i in np.flatnonzero(m == METHOD_RESIZE):
            r = rec[i]
            bh, bw = int(r["y1"] - r["y0"]), int(r["x1"] - r["x0"])
            if bh == 0 or bw == 0:
                continue
            small = _upsample(b[i].permute(2, 0, 1).unsqueeze(0), (bh, bw), bool(r["flags"] & FLAG_BILINEAR))
            b[i, r["y0"] : r["y1"], r["x0"] : r["x1"]] = small[0].permute(1, 2, 0)
        for i in np.flatnonzero(m == METHOD_GRID):
            r = rec[i]
            ys = torch.arange(h).view(h, 1)
            xs = torch.arange(w).view(1, w)
            in_box = (ys >= int(r["y0"])) & (ys < int(r["y1"])) & (xs >= int(r["x0"])) & (xs < int(r["x1"]))
            hole = ((xs - int(r["x0"])) % int(r["p0"]) < int(r["p2"])) & (
                (ys - int(r["y0"])) % int(r["p1"]) < int(r["p3"])
            )
            wself[i, :, :, 0] = (~(in_box & hole)).to(torch.float32)
        for i in np.flatnonzero(m == METHOD_SMOOTH):
            r = rec[i]
            dy = ((torch.arange(h) + int(r["p0"])) % (2 * h)).to(torch.float32) - 0.5 * (2 * h - 1)
            dx = ((torch.arange(w) + int(r["p1"])) % (2 * w)).to(torch.float32) - 0.5 * (2 * w - 1)
            d2 = dy.view(h, 1) * dy.view(h, 1) + dx.view(1, w) * dx.view(1, w)
            wself[i, :, :, 0] = 1.0 - torch.exp(-d2 * torch.tensor(float(r["f0"]), dtype=torch.float32))
        masked = np.flatnonzero(m == METHOD_MASK)
        if len(masked):
            if masks is None:
                raise ValueError("records of mask methods need the mask pool (masks=None was given)")
            shapes = rec[masked][["mask_h", "mask_w", "flags"]]
            for mh, mw, flags in np.unique(shapes):  # one upsampling per mask shape and mode, not per sample
                rows = masked[shapes == np.array((mh, mw, flags), dtype=shapes.dtype)]
                taps = rec["mask_offset"][rows].astype(np.int64)[:, None] + np.arange(int(mh) * int(mw))
                low = masks[torch.from_numpy(taps)].view(len(rows), 1, int(mh), int(mw)).to(torch.float32)
                full = _upsample(low, (h, w), bool(flags & FLAG_BILINEAR))[:, 0]
                if flags & FLAG_SIGMOID:
                    full = torch.sigmoid(full)
                wself[torch.from_numpy(rows), :, :, 0] = full
        v[sel] = b + wself * (v[sel] - b)
    v.sub_(mean255).mul_(inv_std255)
    out.copy_(v.permute(0, 3, 1, 2))
    return out
