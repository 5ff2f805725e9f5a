"""The per-sample parameter record consumed by the fused kernel (mirror of ``DmRecord``).

One record per output sample, 16 four-byte fields (64 bytes). The mix planner fills an array of
them on the host; the backends hand it to the kernel (CUDA) or read it (CPU). The layout must stay
identical to ``struct DmRecord`` in ``kernels/dalimix_common.cuh``; a test compares the two.
The record is full: random erasing travels in its own per-sample table (``erase_table``, below).
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
# MASK only: the partner is read block-permuted (PuzzleMix's transport). p0 = offset of the sample's
# permutation in the kernel's ``gather`` table (int32), p1 x p2 = its block grid gh x gw; output block j
# (row-major) shows the partner's block ``gather[p0 + j]`` at the same in-block offset (and with
# ``FLAG_GATHER_SELF`` the own image's block ``gather[p3 + j]``). Blocks of a grid
# of g over n pixels are [floor(i n / g), floor((i + 1) n / g)); where the source block is one pixel
# shorter than the output block its last row / column repeats. The flips apply first ("flip, then mix").
FLAG_GATHER = 16
FLAG_GATHER_SELF = 32  # with FLAG_GATHER, nearest masks: the own image block-permuted too (same grid), table at p3

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


def gather_rows(rec: np.ndarray) -> np.ndarray:
    """Indices of the records whose partner is read block-permuted (MASK with ``FLAG_GATHER``)."""
    return np.flatnonzero((rec["method"] == METHOD_MASK) & ((rec["flags"] & FLAG_GATHER) != 0))


def gather_self_rows(rec: np.ndarray) -> np.ndarray:
    """Indices of the gather records whose own image is read block-permuted too (``FLAG_GATHER_SELF``)."""
    rows = gather_rows(rec)
    return rows[(rec["flags"][rows] & FLAG_GATHER_SELF) != 0]


def validate_records(
    rec: np.ndarray, *, n_src: int, height: int, width: int, mask_pool_size: int, gather_size: int = 0
) -> None:
    """Raise ``ValueError`` if any record would read outside the images, the mask pool or the gather
    table (``gather_size`` int32 values; the table's values themselves are checked by its producer).

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
    lone = ((rec["flags"] & FLAG_GATHER_SELF) != 0) & ((method != METHOD_MASK) | ((rec["flags"] & FLAG_GATHER) == 0))
    if lone.any():
        i = int(np.flatnonzero(lone)[0])
        raise ValueError(
            f"record {i}: FLAG_GATHER_SELF is valid only on a MASK record with FLAG_GATHER (the own image's "
            "permutation shares the partner's grid); set FLAG_GATHER with p0..p2 too, or drop FLAG_GATHER_SELF"
        )
    smooth_self = ((rec["flags"] & FLAG_GATHER_SELF) != 0) & ((rec["flags"] & FLAG_BILINEAR) != 0)
    if smooth_self.any():
        i = int(np.flatnonzero(smooth_self)[0])
        raise ValueError(
            f"record {i}: FLAG_GATHER_SELF reads nearest masks only (the kernel has no bilinear variant of "
            "it); drop FLAG_BILINEAR, or FLAG_GATHER_SELF"
        )
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
        gathered = np.flatnonzero(masked & ((rec["flags"] & FLAG_GATHER) != 0))
        gself = gathered[(rec["flags"][gathered] & FLAG_GATHER_SELF) != 0]
        if len(gself):
            p3 = rec["p3"][gself].astype(np.int64)
            k = rec["p1"][gself].astype(np.int64) * rec["p2"][gself]
            ok = (p3 >= 0) & (p3 + k <= gather_size)
            if not ok.all():
                i = int(gself[np.flatnonzero(~ok)[0]])
                raise ValueError(
                    f"record {i}: the own image's block permutation of a {int(rec['p1'][i])}x{int(rec['p2'][i])} "
                    f"grid at offset p3={int(rec['p3'][i])} does not fit a gather table of {gather_size} values"
                )
        if len(gathered):
            off, gh, gw = (rec[k][gathered].astype(np.int64) for k in ("p0", "p1", "p2"))
            ok = (off >= 0) & (gh >= 1) & (gw >= 1) & (gh <= height) & (gw <= width) & (off + gh * gw <= gather_size)
            ok &= ((height + 1) * gh < 2**31) & ((width + 1) * gw < 2**31)  # the kernel's 32-bit block math
            if not ok.all():
                i = int(gathered[np.flatnonzero(~ok)[0]])
                raise ValueError(
                    f"record {i}: block permutation of a {int(rec['p1'][i])}x{int(rec['p2'][i])} grid at offset "
                    f"{int(rec['p0'][i])} does not fit a gather table of {gather_size} values or the "
                    f"{height}x{width} image (1 <= grid <= image size)"
                )


# ------------------------------------------------------------------------------- erase table
# Random erasing rides along with the records as one more kernel argument: per output sample one row
# of ERASE_STRIDE int32 (mirror of DM_ERASE_* in kernels/dalimix_common.cuh; a test compares them).
ERASE_MAX_BOXES = 8
ERASE_STRIDE = 64
ERASE_BOXES = 4  # first box column: y0, x0, y1, x1 per box
ERASE_COLORS = ERASE_BOXES + 4 * ERASE_MAX_BOXES  # float32 bits of box b's colour, channel c: 3b + c
ERASE_MODES = {"const": 0, "rand": 1, "pixel": 2}


def hash32(x: np.ndarray) -> np.ndarray:
    """The kernel's 32-bit integer hash (``dm_hash32``), elementwise on a uint32 array."""
    x = np.asarray(x, dtype=np.uint32).copy()
    x ^= x >> np.uint32(16)
    x *= np.uint32(0x7FEB352D)
    x ^= x >> np.uint32(15)
    x *= np.uint32(0x846CA68B)
    x ^= x >> np.uint32(16)
    return x


def erase_sample_keys(seed: int, n: int) -> np.ndarray:
    """The noise key of samples ``0..n-1`` (table column 2): the hash of the seed's two 32-bit
    halves and the sample's index, so every sample of every batch draws its own noise."""
    seed = int(seed) & (2**64 - 1)
    k = hash32(np.asarray(seed & 0xFFFFFFFF, dtype=np.uint32))
    k = hash32(k ^ np.uint32(seed >> 32))
    return hash32(k ^ np.arange(n, dtype=np.uint32))


def erase_table(boxes: np.ndarray, *, mode: str, seed: int, colors: np.ndarray | None = None) -> np.ndarray:
    """The kernel's erase table for one batch.

    Args:
        boxes: ``N x K`` x (top, left, height, width) integers, ``K <= ERASE_MAX_BOXES``, in drawing
            order (a later box covers an earlier one); height or width 0: no box.
        mode: "const", "rand" or "pixel".
        seed: the noise seed of mode "pixel" (any integer; 64 bits are used).
        colors: ``N x K x 3`` float32, the box colours of mode "rand".

    Returns:
        ``N x ERASE_STRIDE`` int32.
    """
    boxes = np.asarray(boxes)
    if boxes.ndim != 3 or boxes.shape[-1] != 4:
        raise ValueError(f"boxes must be N x K x 4 (top, left, height, width), got shape {boxes.shape}")
    n, k, _ = boxes.shape
    if k > ERASE_MAX_BOXES:
        raise ValueError(f"at most {ERASE_MAX_BOXES} erasing boxes per sample, got {k} (lower max_count)")
    if mode not in ERASE_MODES:
        raise ValueError(f"mode must be one of {sorted(ERASE_MODES)}, got {mode!r}")
    table = np.zeros((n, ERASE_STRIDE), dtype=np.int32)
    if n == 0:
        return table
    corners: list[np.ndarray] = [boxes[..., i].astype(np.int64) for i in range(4)]
    top, left, h, w = corners
    used = (h > 0) & (w > 0)
    last = np.where(used.any(1), k - np.argmax(used[:, ::-1], axis=1), 0)  # boxes 0..last-1 are read
    table[:, 0] = last
    table[:, 1] = ERASE_MODES[mode]
    table[:, 2] = erase_sample_keys(seed, n).view(np.int32)
    cols = np.stack([top, left, top + h, left + w], axis=-1) * used[..., None]
    table[:, ERASE_BOXES : ERASE_BOXES + 4 * k] = cols.reshape(n, 4 * k)
    if mode == "rand":
        if colors is None or np.shape(colors) != (n, k, 3):
            raise ValueError(f"mode 'rand' needs colors of shape {(n, k, 3)}, got {np.shape(colors)}")
        rgb = np.ascontiguousarray(colors, dtype=np.float32).view(np.int32)
        table[:, ERASE_COLORS : ERASE_COLORS + 3 * k] = rgb.reshape(n, 3 * k)
    return table


def validate_erase(table: np.ndarray, *, n: int, height: int, width: int) -> None:
    """Raise ``ValueError`` if an erase table does not fit ``n`` samples of ``height x width``."""
    if not isinstance(table, np.ndarray) or table.dtype != np.int32 or table.shape != (n, ERASE_STRIDE):
        got = f"{table.dtype} {table.shape}" if isinstance(table, np.ndarray) else type(table).__name__
        raise ValueError(
            f"erase must be an int32 array of shape ({n}, {ERASE_STRIDE}) (dalimix.ops.record.erase_table), got {got}"
        )
    count, mode = table[:, 0], table[:, 1]
    if ((count < 0) | (count > ERASE_MAX_BOXES)).any():
        i = int(np.flatnonzero((count < 0) | (count > ERASE_MAX_BOXES))[0])
        raise ValueError(f"erase row {i}: box count {int(count[i])} is outside [0, {ERASE_MAX_BOXES}]")
    if ((mode < 0) | (mode > 2)).any():
        i = int(np.flatnonzero((mode < 0) | (mode > 2))[0])
        raise ValueError(f"erase row {i}: unknown mode id {int(mode[i])} (0 const, 1 rand, 2 pixel)")
    box = table[:, ERASE_BOXES : ERASE_BOXES + 4 * ERASE_MAX_BOXES].reshape(n, ERASE_MAX_BOXES, 4)
    read = np.arange(ERASE_MAX_BOXES)[None, :] < count[:, None]
    y0, x0, y1, x1 = (box[..., i] for i in range(4))
    ok = (0 <= y0) & (y0 <= y1) & (y1 <= height) & (0 <= x0) & (x0 <= x1) & (x1 <= width)
    bad = read & ~ok
    if bad.any():
        i, b = (int(v) for v in np.argwhere(bad)[0])
        raise ValueError(
            f"erase row {i}: box {b} y[{y0[i, b]}, {y1[i, b]}) x[{x0[i, b]}, {x1[i, b]}) is not inside the "
            f"{height}x{width} image"
        )
