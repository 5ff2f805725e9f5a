"""CPU twin of the fused kernel: the same contract in vectorised torch.

Flip flags mirror the images before mixing (``FLAG_FLIP_SELF`` / ``FLAG_FLIP_PARTNER``). Computes
in float32 exactly like the kernel: ``v = b + w * (a - b)`` (``w`` = weight of the
sample's own image), ``out = (v - mean255) * inv_std255``, one cast into ``out``. Random erasing
(``erase_torch``) then writes the erase table's fills, the kernel's hash noise included, computed in
torch (the same values up to the rounding of ``log``).
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from .record import (
    ERASE_BOXES,
    ERASE_COLORS,
    ERASE_MODES,
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
    gather_rows,
    gather_self_rows,
)


def _upsample(t: torch.Tensor, size: tuple[int, int], bilinear: bool) -> torch.Tensor:
    """``t``: 1 x C x h x w float32 -> 1 x C x H x W with PyTorch's index rules (the kernel's)."""
    if bilinear:
        return F.interpolate(t, size=size, mode="bilinear", align_corners=False)
    return F.interpolate(t, size=size, mode="nearest")


def block_sources(pix: np.ndarray, n: int, g: int, block: np.ndarray, source: np.ndarray) -> np.ndarray:
    """Source coordinate of pixels ``pix`` (of ``n``) lying in blocks ``block`` when read from blocks
    ``source`` of a grid of ``g`` blocks (``FLAG_GATHER``'s rule: blocks start at floor(i n / g), the
    same in-block offset, clamped to the source block's last pixel)."""
    start: np.ndarray = (np.arange(g + 1, dtype=np.int64) * n) // g
    off = pix - start[block]
    return start[source] + np.minimum(off, start[source + 1] - start[source] - 1)


def gather_partner(b: torch.Tensor, perm: np.ndarray, gh: int, gw: int) -> torch.Tensor:
    """``b`` (H x W x C) with output block j (row-major on a gh x gw grid) read from block ``perm[j]``."""
    h, w = b.shape[:2]
    by = ((np.arange(h, dtype=np.int64) + 1) * gh - 1) // h  # block of every row / column
    bx = ((np.arange(w, dtype=np.int64) + 1) * gw - 1) // w
    src = perm.astype(np.int64).reshape(gh, gw)[by[:, None], bx[None, :]]  # H x W source blocks
    ys = block_sources(np.arange(h)[:, None], h, gh, by[:, None], src // gw)
    xs = block_sources(np.arange(w)[None, :], w, gw, bx[None, :], src % gw)
    return b[torch.from_numpy(ys), torch.from_numpy(xs)]


def mix_normalize_cpu(
    images: torch.Tensor,
    records: np.ndarray,
    masks: torch.Tensor | None,
    gather: torch.Tensor | None = None,
    *,
    mean255: torch.Tensor,
    inv_std255: torch.Tensor,
    out: torch.Tensor,
    erase: np.ndarray | None = None,
) -> torch.Tensor:
    """Mix, normalise, cast and lay out ``images`` (N_src x H x W x 3 uint8) into ``out`` (n x 3 x H x W);
    then erase ``erase``'s boxes (``dalimix.ops.record.erase_table``)."""
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
        for i in gather_rows(rec):
            assert gather is not None  # validate_records refuses gather records without a table
            r = rec[i]
            off, gh, gw = int(r["p0"]), int(r["p1"]), int(r["p2"])
            b[i] = gather_partner(b[i], gather[off : off + gh * gw].numpy(), gh, gw)  # the flipped partner, permuted
        for i in gather_self_rows(rec):
            assert gather is not None
            r = rec[i]
            off, gh, gw = int(r["p3"]), int(r["p1"]), int(r["p2"])
            j = int(mixed[i])
            v[j] = gather_partner(v[j], gather[off : off + gh * gw].numpy(), gh, gw)  # the flipped own image, permuted
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
    if erase is not None:
        erase_torch(out, erase)
    return out


_M32 = 0xFFFFFFFF


def hash32_torch(x: torch.Tensor) -> torch.Tensor:
    """The kernel's ``dm_hash32`` on an int64 tensor of 32-bit values (the low 32 bits are kept)."""
    x = x ^ (x >> 16)
    x = (x * 0x7FEB352D) & _M32
    x = x ^ (x >> 15)
    x = (x * 0x846CA68B) & _M32
    return x ^ (x >> 16)


def erase_normal_torch(box_key: torch.Tensor, element: torch.Tensor) -> torch.Tensor:
    """The kernel's ``dm_erase_normal``: normal(0, 1) float32 noise of ``element`` under ``box_key``."""
    r1 = hash32_torch(hash32_torch(element) ^ box_key)
    r2 = hash32_torch(r1 ^ 0x9E3779B9)
    u1 = ((r1 >> 8) + 1).to(torch.float32) * 2.0**-24
    u2 = ((r2 >> 8).to(torch.float32) * 2.0**-24).to(torch.float32)
    t = torch.where(u2 < 0.5, u2, 1 - u2)
    sign = torch.where(t <= 0.25, 1.0, -1.0)
    t = torch.where(t <= 0.25, t, 0.5 - t)
    x = torch.tensor(6.28318530717958647692, dtype=torch.float32) * t
    x2 = x * x
    p = torch.full_like(x2, 2.08767570e-09)
    for c in (-2.75573192e-07, 2.48015873e-05, -1.38888889e-03, 4.16666667e-02, -0.5, 1.0):
        p = p * x2 + c  # the kernel's fmaf(p, x2, c), within an ulp
    return torch.sqrt(-2 * torch.log(u1)) * (sign * p)


def erase_torch(images: torch.Tensor, table: np.ndarray) -> torch.Tensor:
    """Erase ``images`` (``n x 3 x H x W``, any float dtype and memory format, any device) in place with
    the kernel's erase table: per sample, per box in drawing order, the fill over the box (0, the box's
    colour, or the kernel's hash noise), cast to ``images.dtype``. Returns ``images``."""
    n, c, h, w = images.shape
    dev = images.device
    for i in np.flatnonzero(table[:, 0] > 0):
        row = table[i]
        mode, key = int(row[1]), int(row[2]) & _M32
        for b in range(int(row[0])):
            y0, x0, y1, x1 = (int(v) for v in row[ERASE_BOXES + 4 * b : ERASE_BOXES + 4 * b + 4])
            if y0 >= y1 or x0 >= x1:
                continue
            region = images[i, :, y0:y1, x0:x1]
            if mode == ERASE_MODES["const"]:
                region.zero_()
            elif mode == ERASE_MODES["rand"]:
                rgb = row[ERASE_COLORS + 3 * b : ERASE_COLORS + 3 * b + 3].view(np.float32)
                region.copy_(torch.from_numpy(rgb.copy()).to(dev).view(c, 1, 1).expand_as(region))
            else:
                box_key = hash32_torch(torch.tensor(key ^ b, dtype=torch.int64, device=dev))
                ys = torch.arange(y0, y1, device=dev).view(1, -1, 1)
                xs = torch.arange(x0, x1, device=dev).view(1, 1, -1)
                cs = torch.arange(c, device=dev).view(-1, 1, 1)
                element = (ys * w + xs) * 3 + cs  # C x bh x bw, the kernel's (y * W + x) * 3 + c
                region.copy_(erase_normal_torch(box_key, element & _M32))
    return images
