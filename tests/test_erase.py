"""Random erasing (dalimix.erase), fused into the kernel's pass: a float64 reference (boxes at the
edges, 1x1 images, N = 1, odd widths, overlapping boxes, every method, flips, dtype and layout), a
numpy mirror of the kernel's hash RNG, the noise's statistics, timm's statistics, the loader's stream."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from reference import random_records, reference_mix_normalize
from test_kernels import CASES, run_shim, stable_seed, ulp_tolerance

from dalimix import ImageLoader
from dalimix.erase import ErasePlan, RandomErasing, from_timm
from dalimix.ops import Normalization, mix_normalize
from dalimix.ops.kernels import OUTPUT_TYPES
from dalimix.ops.record import ERASE_STRIDE, erase_table, set_flips

MODES = ["const", "rand", "pixel"]


# ------------------------------------------------------------------ the reference, in numpy / float64
def np_hash(x) -> np.ndarray:
    """The kernel's 32-bit hash, written again here: xor-shift 16, * 0x7feb352d, 15, * 0x846ca68b, 16."""
    x = np.asarray(x, dtype=np.uint64) & 0xFFFFFFFF
    x ^= x >> 16
    x = (x * 0x7FEB352D) & 0xFFFFFFFF
    x ^= x >> 15
    x = (x * 0x846CA68B) & 0xFFFFFFFF
    return x ^ (x >> 16)


def np_noise(seed: int, sample: int, box: int, y, x, c, width: int) -> np.ndarray:
    """Normal noise of (seed, sample, box, y, x, c) as the kernel defines it, in float64: keys from the
    seed's halves, the sample and the box; two 24-bit uniforms of element (y W + x) 3 + c; Box-Muller."""
    seed &= 2**64 - 1
    key = np_hash(np_hash(np_hash(np_hash(seed & 0xFFFFFFFF) ^ (seed >> 32)) ^ sample) ^ box)
    e = (np.asarray(y) * width + np.asarray(x)) * 3 + np.asarray(c)
    r1 = np_hash(np_hash(e) ^ key)
    r2 = np_hash(r1 ^ 0x9E3779B9)
    u1 = ((r1 >> 8) + 1).astype(np.float64) * 2.0**-24
    u2 = (r2 >> 8).astype(np.float64) * 2.0**-24
    return np.sqrt(-2 * np.log(u1)) * np.cos(2 * np.pi * u2)


def as_dtype(x: np.ndarray, dtype: torch.dtype) -> np.ndarray:
    return torch.from_numpy(np.asarray(x, np.float32)).to(dtype).double().numpy()


def erase_reference(ref: np.ndarray, boxes, mode: str, seed: int, colors, dtype):
    """``ref`` (n x 3 x H x W float64, the mixed output) with timm's boxes filled in drawing order; and
    the n x H x W mask of erased pixels."""
    out = ref.copy()
    n, _, h, w = out.shape
    inside = np.zeros((n, h, w), bool)
    for i in range(n):
        for k, (top, left, bh, bw) in enumerate(boxes[i]):
            if bh == 0 or bw == 0:
                continue
            ys, xs = slice(top, top + bh), slice(left, left + bw)
            inside[i, ys, xs] = True
            if mode == "const":
                out[i, :, ys, xs] = 0
            elif mode == "rand":
                out[i, :, ys, xs] = as_dtype(colors[i, k], dtype)[:, None, None]
            else:
                c, y, x = np.meshgrid(np.arange(3), np.arange(top, top + bh), np.arange(left, left + bw), indexing="ij")
                out[i, :, ys, xs] = np_noise(seed, i, k, y, x, c, w)
    return out, inside


def edge_boxes(rng, n: int, h: int, w: int, k: int = 3) -> np.ndarray:
    """N x K boxes (top, left, h, w) at the edges and corners, the whole image, single pixels, empty
    slots, and boxes that overlap each other."""
    boxes = np.zeros((n, k, 4), np.int64)
    for i in range(n):
        for j in range(k):
            kind = rng.integers(6)
            if kind == 0:  # anywhere
                bh, bw = rng.integers(1, h + 1), rng.integers(1, w + 1)
                boxes[i, j] = rng.integers(0, h - bh + 1), rng.integers(0, w - bw + 1), bh, bw
            elif kind == 1:  # the whole image
                boxes[i, j] = 0, 0, h, w
            elif kind == 2:  # the bottom-right pixel
                boxes[i, j] = h - 1, w - 1, 1, 1
            elif kind == 3:  # touching the top-left corner
                boxes[i, j] = 0, 0, rng.integers(1, h + 1), rng.integers(1, w + 1)
            elif kind == 4:  # touching the right edge
                bw = rng.integers(1, w + 1)
                boxes[i, j] = rng.integers(0, h), w - bw, 1, bw
            # kind 5: an empty slot (box not found)
    return boxes


def plan_for(rng, mode: str, n: int, h: int, w: int):
    boxes = edge_boxes(rng, n, h, w)
    colors = rng.standard_normal((n, boxes.shape[1], 3)).astype(np.float32) if mode == "rand" else None
    return ErasePlan(boxes=boxes, colors=colors, seed=int(rng.integers(0, 2**63)))


def check(got, ref, inside, mode, dtype, norm, clean=None):
    """Outside the boxes: the mixed value (the reference's ulp tolerance; bit for bit the unerased run
    ``clean`` where given); inside: const/rand exactly the cast fill, pixel the noise to an ulp."""
    got = got.astype(np.float64)
    mask = np.broadcast_to(inside[:, None], got.shape)
    err = np.abs(got - ref)
    tol = ulp_tolerance(ref, dtype, norm)
    assert not (err > tol)[~mask].any(), f"outside the boxes: worst {err[~mask].max()}"
    if clean is not None:
        assert np.array_equal(got[~mask], clean.astype(np.float64)[~mask])
    if mode == "pixel":
        assert not (err > tol)[mask].any(), f"noise: worst {err[mask].max()}"
    else:
        np.testing.assert_array_equal(got[mask], ref[mask])


# ------------------------------------------------------------------------------------------ kernel
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("dtype", list(OUTPUT_TYPES))
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
@pytest.mark.parametrize("case", CASES, ids=lambda c: "n%d_%dx%d_src%d" % (c[3], c[1], c[2], c[0]))
def test_kernel_erases_like_the_float64_reference(shim, mode, dtype, channels_last, case):
    """The CUDA source through the host shim (the launch the GPU gets): every method and flip, up to
    three overlapping boxes per sample at the edges; untouched outside the boxes."""
    n_src, h, w, n = case
    n_src = max(n_src, n)
    rng = np.random.default_rng(stable_seed("erase", mode, h, w, n, str(dtype), channels_last))
    norm = Normalization(mean=rng.uniform(0.3, 0.6, 3), std=rng.uniform(0.15, 0.35, 3))
    for _ in range(2):
        images = rng.integers(0, 256, (n_src, h, w, 3), dtype=np.uint8)
        records, pool = random_records(rng, n, n_src, h, w)
        set_flips(records, rng.random(n_src) < 0.5)
        plan = plan_for(rng, mode, n, h, w)
        table = erase_table(plan.boxes, mode=mode, seed=plan.seed, colors=plan.colors)
        got = run_shim(shim, images, records, pool, norm, dtype, channels_last, erase=table)
        clean = run_shim(shim, images, records, pool, norm, dtype, channels_last)
        mixed = reference_mix_normalize(images, records, pool, norm.mean, norm.std)
        ref, inside = erase_reference(mixed, plan.boxes, mode, plan.seed, plan.colors, dtype)
        check(got, ref, inside, mode, dtype, norm, clean)


def test_kernel_erasing_under_any_grid_and_the_scalar_path(shim):
    """Grid-stride in every dimension and the misaligned (scalar) path erase the same pixels."""
    rng = np.random.default_rng(3)
    images = rng.integers(0, 256, (3, 9, 16, 3), dtype=np.uint8)
    records, pool = random_records(rng, 3, 3, 9, 16)
    plan = plan_for(rng, "pixel", 3, 9, 16)
    table = erase_table(plan.boxes, mode="pixel", seed=plan.seed)
    norm = Normalization()
    want = run_shim(shim, images, records, pool, norm, torch.float32, False, erase=table)
    for grid, block in [(1, 1), ((1, 2, 1), (2, 3, 1)), ((3, 1, 2), (1, 1, 1)), ((2, 5, 7), (4, 2, 1))]:
        got = run_shim(shim, images, records, pool, norm, torch.float32, False, grid=grid, block=block, erase=table)
        np.testing.assert_array_equal(got, want)
    np.testing.assert_array_equal(
        run_shim(shim, images, records, pool, norm, torch.float32, False, misalign=True, erase=table), want
    )


def test_hash_noise_matches_its_numpy_mirror(shim):
    """A box over the whole image: the kernel's noise is the numpy mirror's, to float32 rounding."""
    h, w = 21, 37
    images = np.zeros((2, h, w, 3), np.uint8)
    boxes = np.array([[[0, 0, h, w]], [[0, 0, h, w]]])
    seed = 0x1234_5678_9ABC_DEF0
    table = erase_table(boxes, mode="pixel", seed=seed)
    from dalimix.ops import identity_records

    got = run_shim(
        shim, images, identity_records(2), np.zeros(1, np.float32), Normalization(), torch.float32, False, erase=table
    )
    c, y, x = np.meshgrid(np.arange(3), np.arange(h), np.arange(w), indexing="ij")
    for i in range(2):
        np.testing.assert_allclose(got[i], np_noise(seed, i, 0, y, x, c, w), rtol=2e-6, atol=2e-6)
    assert not np.allclose(got[0], got[1])  # each sample its own noise


def test_erase_table_layout_matches_the_header():
    """dalimix.ops.record's ERASE_* constants are the kernel header's DM_ERASE_* defines."""
    import re

    from dalimix.ops import record
    from dalimix.ops.kernels import kernel_source

    text = kernel_source("dalimix_common.cuh")
    defines = {k: int(v) for k, v in re.findall(r"#define DM_ERASE_(\w+) (\d+)", text)}
    assert defines["MAX_BOXES"] == record.ERASE_MAX_BOXES and defines["STRIDE"] == record.ERASE_STRIDE
    assert defines["BOXES"] == record.ERASE_BOXES and defines["COLORS"] == record.ERASE_COLORS
    assert {m: defines[m.upper()] for m in record.ERASE_MODES} == record.ERASE_MODES
    assert record.ERASE_COLORS + 3 * record.ERASE_MAX_BOXES <= record.ERASE_STRIDE


# ------------------------------------------------------------------------------- the CPU backends
@pytest.fixture(params=["host", "torch"])
def backend(request, monkeypatch):
    from dalimix.ops import host

    if request.param == "torch":
        monkeypatch.setattr(host, "available", lambda: False)
    else:
        assert host.available(), "the host kernels did not compile (is g++ installed?)"
    return request.param


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("dtype", list(OUTPUT_TYPES))
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
def test_cpu_backends_erase_like_the_float64_reference(backend, mode, dtype, channels_last):
    rng = np.random.default_rng(stable_seed("erase-cpu", mode, str(dtype), channels_last))
    norm = Normalization(mean=rng.uniform(0.3, 0.6, 3), std=rng.uniform(0.15, 0.35, 3))
    for n_src, h, w, n in CASES:
        n_src = max(n_src, n)
        images = rng.integers(0, 256, (n_src, h, w, 3), dtype=np.uint8)
        records, pool = random_records(rng, n, n_src, h, w)
        set_flips(records, rng.random(n_src) < 0.5)
        plan = plan_for(rng, mode, n, h, w)
        table = erase_table(plan.boxes, mode=mode, seed=plan.seed, colors=plan.colors)
        args = (torch.from_numpy(images), records, torch.from_numpy(pool))
        kw = dict(norm=norm, dtype=dtype, channels_last=channels_last)
        got = mix_normalize(*args, **kw, erase=table)
        fmt = torch.channels_last if channels_last else torch.contiguous_format
        assert got.is_contiguous(memory_format=fmt)
        clean = mix_normalize(*args, **kw).float().numpy()
        mixed = reference_mix_normalize(images, records, pool, norm.mean, norm.std)
        ref, inside = erase_reference(mixed, plan.boxes, mode, plan.seed, plan.colors, dtype)
        check(got.float().numpy(), ref, inside, mode, dtype, norm, clean)


@pytest.mark.parametrize("mode", ["rand", "pixel"])
def test_noise_is_normal_inside_the_boxes(backend, mode):
    """Planned boxes on a large batch: inside, mean ~ 0 and std ~ 1 (4 standard errors); outside,
    the unerased values bit for bit."""
    n, h, w = 64, 40, 48
    rng = np.random.default_rng(7)
    images = torch.from_numpy(rng.integers(0, 256, (n, h, w, 3), dtype=np.uint8))
    eraser = RandomErasing(probability=1.0, mode=mode, max_count=2)
    plan = eraser.plan(n, 3, h, w, rng)
    got = mix_normalize(images, erase=eraser.table(plan))
    clean = mix_normalize(images)
    inside = np.zeros((n, h, w), bool)
    for i, k in zip(*np.nonzero(plan.boxes[..., 2] * plan.boxes[..., 3])):
        top, left, bh, bw = plan.boxes[i, k]
        inside[i, top : top + bh, left : left + bw] = True
    mask = torch.from_numpy(inside)[:, None].expand_as(got)
    assert torch.equal(got[~mask], clean[~mask])
    vals = got[mask].double()
    if mode == "rand":  # one value per box and channel: count the boxes' colours, not their pixels
        vals = torch.from_numpy(plan.colors[plan.boxes[..., 2] > 0].astype(np.float64)).flatten()
    se = 1 / np.sqrt(len(vals))
    assert abs(vals.mean().item()) < 4 * se and abs(vals.std().item() - 1) < 4 * se * np.sqrt(2) + 0.01
    if mode == "pixel":  # pixels of one box are not one value
        assert got[mask].unique().numel() > 0.9 * mask.sum().item()


def test_apply_is_the_kernels_reference():
    """``RandomErasing.apply`` on the kernel's unerased output equals the fused pass."""
    rng = np.random.default_rng(4)
    images = torch.from_numpy(rng.integers(0, 256, (6, 17, 22, 3), dtype=np.uint8))
    for mode in MODES:
        eraser = RandomErasing(probability=0.8, mode=mode, max_count=3)
        plan = eraser.plan(6, 3, 17, 22, rng)
        fused = mix_normalize(images, dtype=torch.float16, erase=eraser.table(plan))
        applied = eraser.apply(mix_normalize(images, dtype=torch.float16), plan)
        torch.testing.assert_close(applied, fused, rtol=0, atol=0 if mode != "pixel" else 2e-3)


def test_bad_tables_are_refused():
    images = torch.zeros(2, 4, 5, 3, dtype=torch.uint8)
    good = erase_table(np.array([[[0, 0, 4, 5]], [[1, 1, 1, 1]]]), mode="const", seed=0)
    bad_box = good.copy()
    bad_box[0, 6] = 5  # y1 past the image
    bad_count = good.copy()
    bad_count[1, 0] = 9
    for table, msg in [
        (good[:1], "shape"),
        (good.astype(np.int64), "int32"),
        (bad_box, "box 0"),
        (bad_count, "count"),
    ]:
        with pytest.raises(ValueError, match=msg):
            mix_normalize(images, erase=table)
    with pytest.raises(ValueError, match="at most 8"):
        erase_table(np.zeros((1, 9, 4), np.int64), mode="const", seed=0)
    with pytest.raises(ValueError, match="max_count"):
        RandomErasing(max_count=9)
    assert good.shape == (2, ERASE_STRIDE)


# --------------------------------------------------------------------------- planning: timm's rule
def _timm_boxes(n, h, w, **kw):
    import random

    from timm.data.random_erasing import RandomErasing as TimmErasing

    random.seed(0)
    torch.manual_seed(0)
    erased = TimmErasing(device="cpu", mode="const", **kw)(torch.ones(n, 3, h, w))
    return erased[:, 0] == 0


def _stats(mask: torch.Tensor):
    hit = mask.flatten(1).any(1)
    area = mask.flatten(1).float().mean(1)[hit]
    rows = mask.any(2).sum(1)[hit].float()
    cols = mask.any(1).sum(1)[hit].float()
    return hit.float().mean().item(), area, torch.log(rows / cols)


@pytest.mark.parametrize("count", [1, 3])
def test_statistics_match_timms_random_erasing(count):
    """Erased share of samples, erased area and (one box) log aspect ratio: dalimix's draws, erased by
    the fused kernel, against timm's RandomErasing on the same sizes, within 4 standard errors."""
    n, h, w = 3000, 24, 40
    theirs = _timm_boxes(n, h, w, probability=0.4, max_count=count)
    eraser = RandomErasing(probability=0.4, mode="const", max_count=count)
    plan = eraser.plan(n, 3, h, w, np.random.default_rng(1))
    norm = Normalization(mean=(0, 0, 0), std=(1, 1, 1))
    ours = mix_normalize(torch.full((n, h, w, 3), 255, dtype=torch.uint8), norm=norm, erase=eraser.table(plan))
    ours = ours[:, 0] == 0
    (p_t, area_t, asp_t), (p_o, area_o, asp_o) = _stats(theirs), _stats(ours)
    assert abs(p_t - p_o) < 4 * np.sqrt(2 * 0.4 * 0.6 / n)
    se = np.sqrt(area_t.var().item() / len(area_t) + area_o.var().item() / len(area_o))
    assert abs(area_t.mean().item() - area_o.mean().item()) < 4 * se
    if count == 1:  # one box: its bounding rows/cols are the box
        se = np.sqrt(asp_t.var().item() / len(asp_t) + asp_o.var().item() / len(asp_o))
        assert abs(asp_t.mean().item() - asp_o.mean().item()) < 4 * se
        assert abs(asp_t.std().item() - asp_o.std().item()) < 0.1


def test_split_leaves_the_clean_share_alone_and_arguments_are_checked():
    eraser = from_timm(1.0, "pixel", 1, re_split=True)
    assert eraser.num_splits == 2 and from_timm(0.0) is None
    out = eraser(torch.zeros(8, 3, 16, 16), np.random.default_rng(0))
    assert (out[:4] == 0).all() and (out[4:] != 0).flatten(1).any(1).all()
    for kw, msg in [
        (dict(probability=1.5), "probability"),
        (dict(mode="noise"), "mode"),
        (dict(max_count=0), "max_count"),
    ]:
        with pytest.raises(ValueError, match=msg):
            RandomErasing(**kw)


# ---------------------------------------------------------------------------------------- loader
@pytest.mark.parametrize("mode", ["const", "pixel"])
def test_loader_erases_in_the_kernel_reproducibly_after_mixing(small_dataset, mode):
    from dalimix.loader.stages import Finisher
    from dalimix.mix import Mixup

    def loader(seed, **kw):
        return ImageLoader(
            root=small_dataset,
            batch_size=5,
            size=24,
            device="cpu",
            seed=seed,
            num_threads=1,
            mix=Mixup(),
            erasing=RandomErasing(probability=1.0, mode=mode),
            **kw,
        )

    def batches(seed):
        return [x.clone() for x, _ in loader(seed)]

    a, b, c = batches(3), batches(3), batches(4)
    assert all(torch.equal(x, y) for x, y in zip(a, b)) and not all(torch.equal(x, y) for x, y in zip(a, c))
    if mode == "const":  # every sample has an erased (all-zero across channels) box
        assert all(((x == 0).all(1).flatten(1).any(1)).all() for x in a)
    # no pass of its own: the stage list is the kernel's, which gets the table
    finisher = loader(3)._finisher
    assert isinstance(finisher, Finisher) and finisher.f.erasing is not None
    names = [s.__name__ for s in finisher.stages()]
    assert names[-2:] == ["_kernel", "_targets"] and "_erase" not in names
    with pytest.raises(ValueError, match="train=True"):
        ImageLoader(root=small_dataset, batch_size=5, train=False, erasing=RandomErasing())


# ------------------------------------------------------------------------------------------- GPU
@pytest.mark.gpu
@pytest.mark.parametrize("mode", MODES)
def test_cuda_erasing_matches_the_host_build_without_host_sync_or_allocation(mode):
    """The table rides in the records' pinned slot: back-to-back batches on a busy stream each get
    their own boxes; the same values as the host build (noise to logf rounding); the allocator flat."""
    rng = np.random.default_rng(30)
    images = torch.from_numpy(rng.integers(0, 256, (6, 40, 52, 3), dtype=np.uint8)).cuda()
    records, pool = random_records(rng, 6, 6, 40, 52, methods=[0, 1, 2])
    eraser = RandomErasing(probability=0.9, mode=mode, max_count=3)
    tables = [eraser.table(eraser.plan(6, 3, 40, 52, rng)) for _ in range(8)]
    out = torch.empty(6, 3, 40, 52, device="cuda", dtype=torch.float16)
    mix_normalize(images, records, dtype=torch.float16, out=out, erase=tables[0])
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    side = torch.cuda.Stream()
    outs = []
    with torch.cuda.stream(side):
        torch.cuda._sleep(50_000_000)
        torch.cuda.set_sync_debug_mode("error")
        try:
            for t in tables:
                outs.append(mix_normalize(images, records, dtype=torch.float16, erase=t))
        finally:
            torch.cuda.set_sync_debug_mode(0)
    torch.cuda.synchronize()
    assert torch.cuda.memory_allocated() - before <= sum(o.numel() * 2 for o in outs) + 2**20
    for t, o in zip(tables, outs):
        want = mix_normalize(images.cpu(), records, dtype=torch.float16, erase=t)
        torch.testing.assert_close(o.cpu(), want, rtol=0, atol=0 if mode != "pixel" else 4e-3)
