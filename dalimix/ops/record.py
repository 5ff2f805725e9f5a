"""The per-sample parameter record consumed by the fused kernel (mirror of ``DmRecord``).

One record per output sample, 16 four-byte fields (64 bytes). The mix planner fills an array of
them on the host; the backends hand it to the kernel (CUDA) or read it (CPU). The layout must stay
identical to ``struct DmRecord`` in ``kernels/dalimix_common.cuh``; a test compares the two.
"""

from __future__ import annotations

import numpy as np

METHOD_NONE = 0
METHOD_BLEND = 1
METHOD_BOX = 2
METHOD_MASK = 3
METHOD_RESIZE = 4
METHOD_GRID = 5
METHOD_SMOOTH = 6
METHOD_LAST = METHOD_SMOOTH

FLAG_BILINEAR = 1
FLAG_SIGMOID = 2
FLAG_FLIP_SELF = 4  # read the sample's own image mirrored left-right (before mixing)
FLAG_FLIP_PARTNER = 8  # read the partner image mirrored left-right (before mixing)
FLIP_FLAGS = FLAG_FLIP_SELF | FLAG_FLIP_PARTNER

RECORD_DTYPE = np.dtype(
    [
        ("partner", "<i4"),
        ("method", "<i4"),
        ("lam", "<f4"),
        ("flags", "<i4"),
        ("y0", "<i4"),
        ("x0", "<i4"),
        ("y1", "<i4"),
        ("x1", "<i4"),
        ("mask_offset", "<i4"),
        ("mask_h", "<i4"),
        ("mask_w", "<i4"),
        ("p0", "<i4"),
        ("p1", "<i4"),
        ("p2", "<i4"),
        ("p3", "<i4"),
        ("f0", "<f4"),
    ]
)
assert RECORD_DTYPE.itemsize == 64


def identity_records(n: int) -> np.ndarray:
    """Records that leave every sample unmixed: ``n`` records, method NONE, partner = self."""
    rec: np.ndarray = np.zeros(n, dtype=RECORD_DTYPE)
    rec["partner"] = np.arange(n, dtype=np.int32)
    rec["lam"] = 1.0
    return rec


def set_flips(records: np.ndarray, flip) -> np.ndarray:
    """Mark which source images the kernel reads mirrored left-right (horizontal flip, in place).

    ``flip``: one bool per source image (``N_src``). Sets ``FLAG_FLIP_SELF`` of record ``i`` from
    ``flip[i]`` and ``FLAG_FLIP_PARTNER`` from ``flip[partner[i]]`` (other flags kept), so every image
    is flipped the same way wherever it is read: the result is "flip each image, then mix". Boxes,
    masks and grids stay in output coordinates. Returns ``records``.
    """
    flip = np.asarray(flip)
    if flip.ndim != 1 or flip.dtype.kind not in "bui":
        raise ValueError(
            f"flip must be a 1-D bool array with one value per source image, got {flip.dtype} {flip.shape}"
        )
    flip = flip.astype(bool)
    n = len(records)
    if n and int(records["partner"].min()) < 0:
        raise ValueError(
            f"record {int(np.argmin(records['partner']))}: negative partner {int(records['partner'].min())}"
        )
    if len(flip) < n or (n and int(records["partner"].max()) >= len(flip)):
        raise ValueError(
            f"flip has {len(flip)} values; {n} records (partners up to "
            f"{int(records['partner'].max()) if n else -1}) need one per source image"
        )
    flags = records["flags"] & ~np.int32(FLIP_FLAGS)
    flags |= np.where(flip[:n], FLAG_FLIP_SELF, 0).astype(np.int32)
    flags |= np.where(flip[records["partner"]], FLAG_FLIP_PARTNER, 0).astype(np.int32)
    records["flags"] = flags
    return records


def validate_records(rec: np.ndarray, *, n_src: int, height: int, width: int, mask_pool_size: int) -> None:
    """Raise ``ValueError`` if any record would read outside the images or the mask pool.

    The kernels trust the records; this check runs on the host before every launch (it is a few
    vectorised comparisons over ``n`` records).
    """
    if rec.dtype != RECORD_DTYPE or rec.ndim != 1:
        raise ValueError(f"records must be a 1-D array of RECORD_DTYPE, got dtype {rec.dtype} and shape {rec.shape}")
    if len(rec) > n_src:
        raise ValueError(f"{len(rec)} records for a batch of {n_src} images: at most one record per image")
    bad = (rec["partner"] < 0) | (rec["partner"] >= n_src)
    if bad.any():
        i = int(np.flatnonzero(bad)[0])
        raise ValueError(f"record {i}: partner {int(rec['partner'][i])} is outside the batch [0, {n_src})")
    method = rec["method"]
    if ((method < METHOD_NONE) | (method > METHOD_LAST)).any():
        i = int(np.flatnonzero((method < METHOD_NONE) | (method > METHOD_LAST))[0])
        raise ValueError(f"record {i}: unknown method id {int(method[i])}")
    boxed = (method == METHOD_BOX) | (method == METHOD_RESIZE) | (method == METHOD_GRID)
    if boxed.any():
        y0, x0, y1, x1 = (rec[k][boxed] for k in ("y0", "x0", "y1", "x1"))
        ok = (0 <= y0) & (y0 <= y1) & (y1 <= height) & (0 <= x0) & (x0 <= x1) & (x1 <= width)
        if not ok.all():
            i = int(np.flatnonzero(boxed)[np.flatnonzero(~ok)[0]])
            r = rec[i]
            raise ValueError(
                f"record {i}: box y[{r['y0']}, {r['y1']}) x[{r['x0']}, {r['x1']}) is not inside the {height}x{width} image"
            )
    grid = method == METHOD_GRID
    if grid.any() and ((rec["p0"][grid] < 1) | (rec["p1"][grid] < 1)).any():
        i = int(np.flatnonzero(grid)[np.flatnonzero((rec["p0"][grid] < 1) | (rec["p1"][grid] < 1))[0]])
        raise ValueError(f"record {i}: grid patch {int(rec['p0'][i])}x{int(rec['p1'][i])} must be at least 1x1")
    smooth = method == METHOD_SMOOTH
    if smooth.any() and not (np.isfinite(rec["f0"][smooth]) & (rec["f0"][smooth] >= 0)).all():
        raise ValueError("SmoothMix records need a finite, non-negative 1/(2 sigma^2) in f0")
    masked = method == METHOD_MASK
    if masked.any():
        off, mh, mw = rec["mask_offset"][masked], rec["mask_h"][masked], rec["mask_w"][masked]
        ok = (off >= 0) & (mh >= 1) & (mw >= 1) & (off.astype(np.int64) + mh.astype(np.int64) * mw <= mask_pool_size)
        if not ok.all():
            i = int(np.flatnonzero(masked)[np.flatnonzero(~ok)[0]])
            raise ValueError(
                f"record {i}: mask of {int(rec['mask_h'][i])}x{int(rec['mask_w'][i])} at offset "
                f"{int(rec['mask_offset'][i])} does not fit a mask pool of {mask_pool_size} values"
            )
