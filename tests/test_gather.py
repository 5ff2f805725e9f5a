"""The kernel's block gather (FLAG_GATHER, PuzzleMix's transport of the partner; FLAG_GATHER_SELF, of the
own image too) against a float64
reference built from its definition: the host shim (the CUDA source), the host kernels and the torch
twin, every dtype and layout, odd sizes, flips."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from reference import reference_gather, reference_mix_normalize
from test_kernels import run_shim, stable_seed, ulp_tolerance
from test_ops import backend  # noqa: F401  (fixture)

from dalimix.ops import Normalization, mix_normalize
from dalimix.ops.kernels import OUTPUT_TYPES
from dalimix.ops.record import (
    FLAG_BILINEAR,
    FLAG_FLIP_PARTNER,
    FLAG_FLIP_SELF,
    FLAG_GATHER,
    FLAG_GATHER_SELF,
    FLAG_SIGMOID,
    METHOD_MASK,
    RECORD_DTYPE,
)

# (H, W, gh, gw): divisible grids, grids that do not divide the image (blocks of two sizes), 1 x 1,
# a grid as fine as the image, widths that are and are not a multiple of the 4-pixel vector width
GRIDS = [(8, 8, 2, 2), (12, 16, 3, 4), (13, 17, 4, 3), (7, 5, 7, 5), (9, 10, 1, 1), (5, 11, 2, 5), (16, 12, 4, 4)]


def gather_batch(rng, h, w, gh, gw, n=3, *, flags=0, identity=False, mask_hw=None):
    """n MASK records with FLAG_GATHER, their masks (float32 pool) and permutations (int32 table)."""
    mh, mw = mask_hw or (gh, gw)
    images = rng.integers(0, 256, (n, h, w, 3), dtype=np.uint8)
    rec = np.zeros(n, dtype=RECORD_DTYPE)
    rec["partner"] = (np.arange(n) + 1) % n
    rec["method"] = METHOD_MASK
    rec["lam"] = 1.0
    rec["flags"] = FLAG_GATHER | flags
    rec["mask_offset"] = np.arange(n) * mh * mw
    rec["mask_h"], rec["mask_w"] = mh, mw
    k = gh * gw
    rec["p0"], rec["p1"], rec["p2"] = np.arange(n) * k, gh, gw
    if flags & FLAG_SIGMOID:
        pool = rng.normal(0, 2, n * mh * mw).astype(np.float32)
    else:
        pool = rng.integers(0, 2, n * mh * mw).astype(np.float32)  # PuzzleMix's binary masks
        pool[: mh * mw] = rng.uniform(0, 1, mh * mw)  # and one soft one
    tables = n * (2 if flags & FLAG_GATHER_SELF else 1)  # the own images' permutations after the partners'
    rec["p3"] = (n + np.arange(n)) * k if flags & FLAG_GATHER_SELF else 0
    table = np.concatenate([np.arange(k) if identity else rng.permutation(k) for _ in range(tables)]).astype(np.int32)
    return images, rec, pool, table


def test_reference_gather_moves_whole_blocks():
    """The reference itself: a known permutation of 2 x 2 blocks of a 4 x 6 image swaps the quadrants."""
    b = np.arange(4 * 6).reshape(4, 6, 1).astype(np.float64)
    got = reference_gather(b, [3, 2, 1, 0], 2, 2)
    want = np.block([[b[2:, 3:, 0], b[2:, :3, 0]], [b[:2, 3:, 0], b[:2, :3, 0]]])[..., None]
    assert np.array_equal(got, want)
    # 5 rows in 2 blocks ([0, 2) and [2, 5)): the 3-row block read from the 2-row block repeats its last row
    b = np.arange(5).reshape(5, 1, 1).astype(np.float64)
    assert reference_gather(b, [1, 0], 2, 1)[:, 0, 0].tolist() == [2, 3, 0, 1, 1]


@pytest.mark.parametrize("dtype", list(OUTPUT_TYPES))
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
@pytest.mark.parametrize("grid", GRIDS, ids=lambda g: "%dx%d_grid%dx%d" % g)
def test_shim_gather_matches_float64_reference(shim, dtype, channels_last, grid):
    h, w, gh, gw = grid
    rng = np.random.default_rng(stable_seed(grid, str(dtype), channels_last))
    norm = Normalization(mean=rng.uniform(0.3, 0.6, 3), std=rng.uniform(0.15, 0.35, 3))
    for flags in (
        0,
        FLAG_FLIP_PARTNER,
        FLAG_FLIP_SELF | FLAG_FLIP_PARTNER,
        FLAG_BILINEAR,
        FLAG_BILINEAR | FLAG_SIGMOID,
        FLAG_GATHER_SELF,
        FLAG_GATHER_SELF | FLAG_FLIP_SELF,
        FLAG_GATHER_SELF | FLAG_FLIP_SELF | FLAG_FLIP_PARTNER,
        FLAG_GATHER_SELF | FLAG_SIGMOID,
        FLAG_GATHER_SELF | FLAG_FLIP_PARTNER | FLAG_SIGMOID,
    ):
        images, rec, pool, table = gather_batch(rng, h, w, gh, gw, flags=flags)
        got = run_shim(shim, images, rec, pool, norm, dtype, channels_last, gather=table)
        ref = reference_mix_normalize(images, rec, pool, norm.mean, norm.std, gather=table)
        err = np.abs(got.astype(np.float64) - ref)
        assert not (err > ulp_tolerance(ref, dtype, norm)).any(), f"flags {flags}: worst {err.max()}"


def test_shim_identity_permutation_is_the_plain_mask(shim):
    """FLAG_GATHER with the identity permutation writes exactly what the mask method writes."""
    rng = np.random.default_rng(3)
    norm = Normalization()
    for h, w, gh, gw in GRIDS:
        for flags in (0, FLAG_FLIP_PARTNER, FLAG_BILINEAR):
            images, rec, pool, table = gather_batch(rng, h, w, gh, gw, flags=flags, identity=True)
            got = run_shim(shim, images, rec, pool, norm, torch.float32, False, gather=table)
            plain = rec.copy()
            plain["flags"] &= ~FLAG_GATHER
            want = run_shim(shim, images, plain, pool, norm, torch.float32, False)
            assert np.array_equal(got, want), (h, w, gh, gw, flags)


def test_shim_identity_own_permutation_is_the_partner_only_gather(shim):
    """FLAG_GATHER_SELF with the identity own permutation writes exactly what FLAG_GATHER alone writes."""
    rng = np.random.default_rng(7)
    norm = Normalization()
    for h, w, gh, gw in GRIDS:
        for flags in (0, FLAG_FLIP_SELF, FLAG_FLIP_PARTNER | FLAG_SIGMOID):
            images, rec, pool, table = gather_batch(rng, h, w, gh, gw, flags=flags | FLAG_GATHER_SELF)
            k = gh * gw
            table[len(rec) * k :] = np.tile(np.arange(k, dtype=np.int32), len(rec))
            got = run_shim(shim, images, rec, pool, norm, torch.float32, False, gather=table)
            plain = rec.copy()
            plain["flags"] &= ~FLAG_GATHER_SELF
            want = run_shim(shim, images, plain, pool, norm, torch.float32, False, gather=table)
            assert np.array_equal(got, want), (h, w, gh, gw, flags)


def test_shim_own_permutation_shows_under_a_mask_of_ones(shim):
    """A mask of ones (the own image everywhere) still shows the own image permuted, not as it lies."""
    rng = np.random.default_rng(8)
    norm = Normalization()
    images, rec, pool, table = gather_batch(rng, 8, 12, 2, 3, flags=FLAG_GATHER_SELF)
    pool[:] = 1.0
    got = run_shim(shim, images, rec, pool, norm, torch.float32, False, gather=table)
    ref = reference_mix_normalize(images, rec, pool, norm.mean, norm.std, gather=table)
    assert np.abs(got - ref).max() < 1e-4
    plain = rec.copy()
    plain["flags"] &= ~FLAG_GATHER_SELF
    assert not np.allclose(got, run_shim(shim, images, plain, pool, norm, torch.float32, False, gather=table))


def test_shim_gather_mask_and_grid_may_differ(shim):
    """The mask's resolution and the transport grid are independent (a 2 x 2 mask, a 4 x 4 transport)."""
    rng = np.random.default_rng(4)
    norm = Normalization()
    images, rec, pool, table = gather_batch(rng, 16, 16, 4, 4, mask_hw=(2, 2))
    got = run_shim(shim, images, rec, pool, norm, torch.float32, True, gather=table)
    ref = reference_mix_normalize(images, rec, pool, norm.mean, norm.std, gather=table)
    assert np.abs(got - ref).max() < 1e-3


@pytest.mark.parametrize("dtype", list(OUTPUT_TYPES))
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
def test_cpu_backends_gather_match_float64_reference(backend, dtype, channels_last):  # noqa: F811
    rng = np.random.default_rng(stable_seed("cpu", str(dtype), channels_last))
    norm = Normalization(mean=rng.uniform(0.3, 0.6, 3), std=rng.uniform(0.15, 0.35, 3))
    for h, w, gh, gw in GRIDS:
        for flags in (
            0,
            FLAG_FLIP_PARTNER | FLAG_FLIP_SELF,
            FLAG_BILINEAR | FLAG_SIGMOID,
            FLAG_GATHER_SELF | FLAG_FLIP_SELF,
            FLAG_GATHER_SELF | FLAG_FLIP_PARTNER | FLAG_SIGMOID,
        ):
            images, rec, pool, table = gather_batch(rng, h, w, gh, gw, flags=flags)
            out = mix_normalize(
                torch.from_numpy(images),
                rec,
                torch.from_numpy(pool),
                torch.from_numpy(table),
                norm=norm,
                dtype=dtype,
                channels_last=channels_last,
            )
            ref = reference_mix_normalize(images, rec, pool, norm.mean, norm.std, gather=table)
            err = np.abs(out.float().numpy().astype(np.float64) - ref)
            assert not (err > ulp_tolerance(ref, dtype, norm)).any(), (h, w, gh, gw, flags, err.max())


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda r, t: r.__setitem__("p1", 0), "block permutation of a 0x2 grid"),
        (lambda r, t: r.__setitem__("p2", 99), "does not fit a gather table"),
        (lambda r, t: r.__setitem__("p0", 100), "does not fit a gather table"),
        (lambda r, t: t.__setitem__(slice(0, 1), 7), r"outside \[0, 4\)"),
        (lambda r, t: t.__setitem__(slice(0, 1), -1), r"outside \[0, 4\)"),
        (lambda r, t: r.__setitem__("p3", 100), "own image's block permutation"),
        (lambda r, t: r.__setitem__("p3", -1), "own image's block permutation"),
        (lambda r, t: t.__setitem__(slice(12, 13), 4), r"\(own image\) holds block indices outside \[0, 4\)"),
        (lambda r, t: r.__setitem__("flags", FLAG_GATHER_SELF), "FLAG_GATHER_SELF is valid only"),
        (lambda r, t: r.__setitem__("flags", FLAG_GATHER | FLAG_GATHER_SELF | FLAG_BILINEAR), "nearest masks only"),
    ],
)
def test_bad_gather_records_and_tables_are_refused(change, message):
    rng = np.random.default_rng(5)
    images, rec, pool, table = gather_batch(rng, 8, 8, 2, 2, flags=FLAG_GATHER_SELF)
    change(rec, table)
    with pytest.raises(ValueError, match=message):
        mix_normalize(torch.from_numpy(images), rec, torch.from_numpy(pool), torch.from_numpy(table))


def test_gather_record_without_a_table_is_refused():
    rng = np.random.default_rng(6)
    images, rec, pool, _ = gather_batch(rng, 8, 8, 2, 2)
    with pytest.raises(ValueError, match="gather table of 0 values"):
        mix_normalize(torch.from_numpy(images), rec, torch.from_numpy(pool))
    with pytest.raises(ValueError, match="int32"):
        mix_normalize(torch.from_numpy(images), rec, torch.from_numpy(pool), torch.zeros(12, dtype=torch.int64))


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", list(OUTPUT_TYPES))
def test_cuda_gather_matches_float64_reference(dtype):
    """The CUDA build of both gathers (partner, and own image with FLAG_GATHER_SELF) against the float64
    reference, with flips and sigmoid, both layouts."""
    rng = np.random.default_rng(stable_seed("cuda-gather", str(dtype)))
    norm = Normalization()
    for h, w, gh, gw in GRIDS:
        for flags in (
            0,
            FLAG_BILINEAR | FLAG_FLIP_PARTNER,
            FLAG_GATHER_SELF | FLAG_FLIP_SELF,
            FLAG_GATHER_SELF | FLAG_SIGMOID,
        ):
            images, rec, pool, table = gather_batch(rng, h, w, gh, gw, n=5, flags=flags)
            ref = reference_mix_normalize(images, rec, pool, norm.mean, norm.std, gather=table)
            for channels_last in (False, True):
                out = mix_normalize(
                    torch.from_numpy(images).cuda(),
                    rec,
                    torch.from_numpy(pool).cuda(),
                    torch.from_numpy(table).cuda(),
                    norm=norm,
                    dtype=dtype,
                    channels_last=channels_last,
                )
                err = np.abs(out.float().cpu().numpy().astype(np.float64) - ref)
                assert not (err > ulp_tolerance(ref, dtype, norm)).any(), (h, w, gh, gw, flags, err.max())
