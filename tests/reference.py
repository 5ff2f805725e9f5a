"""Float64 reference for the fused mix/normalise operation, written independently of the kernels.

Index selection for resampling follows PyTorch's F.interpolate rules, whose coordinates PyTorch
computes in float32; the reference does the same so that both pick the same source pixels, and
computes every value in float64.
"""

from __future__ import annotations

import numpy as np

from dalimix.ops.record import (
    FLAG_BILINEAR,
    FLAG_FLIP_PARTNER,
    FLAG_FLIP_SELF,
    FLAG_GATHER,
    FLAG_GATHER_SELF,
    FLAG_SIGMOID,
    METHOD_BLEND,
    METHOD_BOX,
    METHOD_GRID,
    METHOD_MASK,
    METHOD_NONE,
    METHOD_RESIZE,
    METHOD_SMOOTH,
)


def nearest_indices(in_size: int, out_size: int) -> np.ndarray:
    scale = np.float32(in_size) / np.float32(out_size)
    idx = np.floor(np.arange(out_size, dtype=np.float32) * scale).astype(np.int64)
    return np.minimum(idx, in_size - 1)


def linear_taps(in_size: int, out_size: int):
    scale = np.float32(in_size) / np.float32(out_size)
    src = scale * (np.arange(out_size, dtype=np.float32) + np.float32(0.5)) - np.float32(0.5)
    src = np.maximum(src, np.float32(0))
    i0 = src.astype(np.int64)
    i1 = np.where(i0 < in_size - 1, i0 + 1, i0)
    w1 = (src - i0.astype(np.float32)).astype(np.float64)
    return i0, i1, w1


def resample(img: np.ndarray, out_h: int, out_w: int, bilinear: bool) -> np.ndarray:
    """img: h x w x C float64 -> out_h x out_w x C (F.interpolate, align_corners=False)."""
    h, w = img.shape[:2]
    if not bilinear:
        return img[nearest_indices(h, out_h)][:, nearest_indices(w, out_w)]
    y0, y1, wy = linear_taps(h, out_h)
    x0, x1, wx = linear_taps(w, out_w)
    wy = wy[:, None, None]
    wx = wx[None, :, None]
    top = img[y0][:, x0] * (1 - wx) + img[y0][:, x1] * wx
    bot = img[y1][:, x0] * (1 - wx) + img[y1][:, x1] * wx
    return top * (1 - wy) + bot * wy


def reference_gather(b: np.ndarray, perm, gh: int, gw: int) -> np.ndarray:
    """FLAG_GATHER from its definition, block by block: output block j (row-major on a gh x gw grid,
    blocks from the integer boundaries floor(i H / gh)) shows source block perm[j] at the same
    in-block offset, the source block's last row / column repeated where it is shorter."""
    h, w = b.shape[:2]
    ys = [i * h // gh for i in range(gh + 1)]
    xs = [i * w // gw for i in range(gw + 1)]
    out = np.empty_like(b)
    for j in range(gh * gw):
        by, bx = divmod(j, gw)
        sy, sx = divmod(int(perm[j]), gw)
        for y in range(ys[by], ys[by + 1]):
            ry = ys[sy] + min(y - ys[by], ys[sy + 1] - ys[sy] - 1)
            for x in range(xs[bx], xs[bx + 1]):
                out[y, x] = b[ry, xs[sx] + min(x - xs[bx], xs[sx + 1] - xs[sx] - 1)]
    return out


def reference_mix_normalize(images, records, masks, mean, std, gather=None) -> np.ndarray:
    """images: N_src x H x W x 3 uint8; returns n x 3 x H x W float64."""
    n = len(records)
    _, h, w, _ = images.shape
    src = images.astype(np.float64)
    out = np.empty((n, h, w, 3))
    for s, r in enumerate(records):
        # horizontal flips first (flip each image, then mix), boxes and masks in output coordinates
        a = src[s][:, ::-1] if r["flags"] & FLAG_FLIP_SELF else src[s]
        b = src[r["partner"]][:, ::-1] if r["flags"] & FLAG_FLIP_PARTNER else src[r["partner"]]
        m = int(r["method"])
        if m == METHOD_NONE:
            v = a
        elif m == METHOD_BLEND:
            lam = float(np.float32(r["lam"]))
            v = lam * a + (1 - lam) * b
        elif m in (METHOD_BOX, METHOD_RESIZE):
            v = a.copy()
            y0, x0, y1, x1 = (int(r[k]) for k in ("y0", "x0", "y1", "x1"))
            if y1 > y0 and x1 > x0:
                patch = (
                    b[y0:y1, x0:x1]
                    if m == METHOD_BOX
                    else resample(b, y1 - y0, x1 - x0, bool(r["flags"] & FLAG_BILINEAR))
                )
                v[y0:y1, x0:x1] = patch
        elif m == METHOD_GRID:
            # holes of p2 x p3 pixels every p0 x p1 pixels, laid from the box corner, clipped to the box
            partner = np.zeros((h, w), bool)
            y0, x0, y1, x1 = (int(r[k]) for k in ("y0", "x0", "y1", "x1"))
            for hy in range(y0, y1, int(r["p1"])):
                for hx in range(x0, x1, int(r["p0"])):
                    partner[hy : min(hy + int(r["p3"]), y1), hx : min(hx + int(r["p2"]), x1)] = True
            v = np.where(partner[..., None], b, a)
        elif m == METHOD_SMOOTH:
            sigma2x2 = 1.0 / float(r["f0"]) if r["f0"] > 0 else np.inf
            yy = (np.arange(h) + int(r["p0"])) % (2 * h) - (2 * h - 1) / 2
            xx = (np.arange(w) + int(r["p1"])) % (2 * w) - (2 * w - 1) / 2
            g = np.exp(-(yy[:, None] ** 2 + xx[None, :] ** 2) / sigma2x2)[..., None]
            v = g * b + (1 - g) * a
        elif m == METHOD_MASK:
            off, mh, mw = int(r["mask_offset"]), int(r["mask_h"]), int(r["mask_w"])
            low = masks[off : off + mh * mw].astype(np.float64).reshape(mh, mw, 1)
            full = resample(low, h, w, bool(r["flags"] & FLAG_BILINEAR))
            if r["flags"] & FLAG_SIGMOID:
                full = 1 / (1 + np.exp(-full))
            if r["flags"] & FLAG_GATHER:
                gh, gw = int(r["p1"]), int(r["p2"])
                b = reference_gather(b, gather[int(r["p0"]) : int(r["p0"]) + gh * gw], gh, gw)
                if r["flags"] & FLAG_GATHER_SELF:
                    a = reference_gather(a, gather[int(r["p3"]) : int(r["p3"]) + gh * gw], gh, gw)
            v = full * a + (1 - full) * b
        else:
            raise ValueError(m)
        out[s] = v
    out = (out - 255.0 * np.asarray(mean)) / (255.0 * np.asarray(std))
    return out.transpose(0, 3, 1, 2)


def random_records(rng: np.random.Generator, n: int, n_src: int, h: int, w: int, methods=None):
    """Random records over every method and flag, plus the mask pool they read (float32)."""
    from dalimix.ops.record import RECORD_DTYPE

    methods = methods or [METHOD_NONE, METHOD_BLEND, METHOD_BOX, METHOD_MASK, METHOD_RESIZE, METHOD_GRID, METHOD_SMOOTH]
    rec = np.zeros(n, dtype=RECORD_DTYPE)
    pool = []
    offset = 0
    for i in range(n):
        m = methods[rng.integers(len(methods))]
        rec[i]["method"] = m
        rec[i]["partner"] = rng.integers(n_src)
        rec[i]["lam"] = rng.random()
        rec[i]["flags"] = rng.integers(0, 4) if m == METHOD_MASK else rng.integers(0, 2)
        kind = rng.integers(4)
        if kind == 0:  # anywhere, possibly empty
            y0, y1 = np.sort(rng.integers(0, h + 1, 2))
            x0, x1 = np.sort(rng.integers(0, w + 1, 2))
        elif kind == 1:  # the whole image
            y0, y1, x0, x1 = 0, h, 0, w
        elif kind == 2:  # one pixel at a corner
            y0, x0 = h - 1, w - 1
            y1, x1 = h, w
        else:  # touching the left/top edges
            y0, x0 = 0, 0
            y1, x1 = rng.integers(1, h + 1), rng.integers(1, w + 1)
        rec[i]["y0"], rec[i]["x0"], rec[i]["y1"], rec[i]["x1"] = y0, x0, y1, x1
        mh = int(rng.choice([1, 2, max(1, h // 2), h, rng.integers(1, h + 1)]))
        mw = int(rng.choice([1, 3, max(1, w // 2), w, rng.integers(1, w + 1)]))
        rec[i]["mask_offset"], rec[i]["mask_h"], rec[i]["mask_w"] = offset, mh, mw
        if m == METHOD_GRID:
            rec[i]["p0"], rec[i]["p1"] = rng.integers(1, w + 2), rng.integers(1, h + 2)
            rec[i]["p2"], rec[i]["p3"] = rng.integers(0, rec[i]["p0"] + 1), rng.integers(0, rec[i]["p1"] + 1)
        if m == METHOD_SMOOTH:
            rec[i]["p0"], rec[i]["p1"] = rng.integers(0, h + 1), rng.integers(0, w + 1)
            rec[i]["f0"] = 1.0 / (2 * (rng.uniform(0.25, 0.5) * h) ** 2)
        vals = rng.normal(0, 3, mh * mw) if rec[i]["flags"] & FLAG_SIGMOID else rng.random(mh * mw)
        pool.append(vals.astype(np.float32))
        offset += mh * mw
    return rec, np.concatenate(pool) if pool else np.zeros(1, np.float32)
