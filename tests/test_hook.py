"""The mask hook: called once per batch with that batch, masks upsampled in the kernel exactly as
F.interpolate, exact mask-mean lams, clear errors, and a loader that stays usable after them."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from reference import reference_mix_normalize, resample
from test_kernels import run_shim

from dalimix import ImageLoader
from dalimix.hook import LearnedMask, MaskHookError, full_resolution_mask_mean, hooked_rows, upsampling_weights
from dalimix.mix import FMix, Mixer, one_hot_smoothed
from dalimix.ops import Normalization, mix_normalize
from dalimix.ops.record import FLAG_BILINEAR, FLAG_SIGMOID, METHOD_BLEND, METHOD_MASK

PLAIN = Normalization(mean=(0, 0, 0), std=(1, 1, 1))  # out = x / 255


def learned_loader(root, **kw):
    mix = Mixer(
        methods=[LearnedMask(alpha=2.0, mixup_margin=kw.pop("margin", 0.0))],
        mode=kw.pop("mode", "elem"),
        label_smoothing=kw.pop("smoothing", 0.0),
    )
    return ImageLoader(
        root=root,
        batch_size=kw.pop("batch_size", 6),
        size=kw.pop("size", 32),
        device="cpu",
        mix=mix,
        seed=kw.pop("seed", 5),
        **kw,
    )


class Recorder:
    """A hook that records its calls and returns random low-res masks (or logits)."""

    def __init__(self, shape=(4, 5), logits=False, seed=0):
        self.calls = []
        self.shape = shape
        self.logits = logits
        self.gen = torch.Generator().manual_seed(seed)

    def __call__(self, images, lam, partner):
        n = images.shape[0]
        if self.logits:
            masks = torch.randn(n, 1, *self.shape, generator=self.gen) * 3
        else:
            masks = torch.rand(n, 1, *self.shape, generator=self.gen)
        self.calls.append(dict(images=images, lam=lam.clone(), partner=partner.clone(), masks=masks))
        return masks


def upsample(masks: torch.Tensor, size, mode: str) -> torch.Tensor:
    return F.interpolate(
        masks.float(), size=size, mode=mode, **({"align_corners": False} if mode == "bilinear" else {})
    )


# ------------------------------------------------------------------------------ the loader path
@pytest.mark.parametrize("mode, logits", [("nearest", False), ("bilinear", True)])
def test_hook_called_once_per_batch_with_that_batch(small_dataset, mode, logits):
    plain = ImageLoader(root=small_dataset, batch_size=6, size=32, device="cpu", seed=5)
    expected = [images for images, _ in plain]
    loader = learned_loader(small_dataset, prefetch=3)
    hook = Recorder(logits=logits)
    loader.set_mask_hook(hook, interpolation=mode, logits=logits)
    seen = 0
    for k, (images, targets) in enumerate(loader):
        assert len(hook.calls) == k + 1  # exactly once, before the batch is yielded: no lag
        call = hook.calls[-1]
        info = loader.last_batch
        assert call["images"] is info.unmixed
        torch.testing.assert_close(call["images"], expected[k], rtol=0, atol=0)  # the clean batch, same augmentation
        np.testing.assert_array_equal(call["lam"].numpy(), info.params.lam.astype(np.float32))
        np.testing.assert_array_equal(call["partner"].numpy(), info.params.partner)
        # the kernel mixed exactly m * x_i + (1 - m) * x_j with m the upsampled mask (sigmoid after upsampling)
        m = upsample(call["masks"], (32, 32), mode)
        if logits:
            m = torch.sigmoid(m)
        clean = call["images"].double()
        want = m.double() * clean + (1 - m.double()) * clean[torch.from_numpy(info.params.partner)]
        torch.testing.assert_close(images.double(), want, rtol=0, atol=2e-5)
        # targets: the mask mean at full resolution is each sample's lam
        lam = m.mean(dim=(1, 2, 3))
        torch.testing.assert_close(info.params.device_target_lam, lam, rtol=0, atol=1e-6)
        onehot = one_hot_smoothed(info.labels, loader.num_classes, 0.0)
        torch.testing.assert_close(targets, lam[:, None] * onehot + (1 - lam[:, None]) * onehot[info.params.partner])
        seen += len(images)
    assert len(hook.calls) == len(loader) and seen == 20


def test_planned_target_lam_and_mixup_fallback(small_dataset):
    loader = learned_loader(small_dataset, margin=0.3, batch_size=10)
    hook = Recorder()
    loader.set_mask_hook(hook, target_lam="planned")
    images, targets = next(iter(loader))
    p = loader.last_batch.params
    near = np.minimum(p.lam, 1 - p.lam) <= 0.3
    assert near.any() and (~near).any(), "seed 5 gives both kinds of lam in this batch"
    assert (p.method[near] == METHOD_BLEND).all() and (p.method[~near] == METHOD_MASK).all()
    assert set(hooked_rows(p)) == set(np.flatnonzero(~near))
    assert p.device_target_lam is None  # planned lam, from the host
    onehot = one_hot_smoothed(loader.last_batch.labels, loader.num_classes, 0.0)
    lam = torch.from_numpy(p.lam).float()[:, None]
    torch.testing.assert_close(targets, lam * onehot + (1 - lam) * onehot[p.partner])
    # blended rows ignore the hook's mask: plain MixUp with lam
    clean = loader.last_batch.unmixed
    rows = torch.from_numpy(np.flatnonzero(near))
    part = torch.from_numpy(p.partner)[rows]
    want = lam[rows].view(-1, 1, 1, 1) * clean[rows] + (1 - lam[rows].view(-1, 1, 1, 1)) * clean[part]
    torch.testing.assert_close(images[rows], want, rtol=0, atol=2e-5)


def test_keep_unmixed_without_hook_and_no_copy_by_default(small_dataset):
    kw = dict(root=small_dataset, batch_size=5, size=32, device="cpu", seed=2)
    plain = [x for x, _ in ImageLoader(**kw)]
    loader = ImageLoader(keep_unmixed=True, **kw)
    for k, _ in enumerate(loader):
        torch.testing.assert_close(loader.last_batch.unmixed, plain[k], rtol=0, atol=0)
    default = ImageLoader(**kw)
    next(iter(default))
    assert default.last_batch.unmixed is None


def test_shared_mask_tensor_is_reused_and_grows(small_dataset):
    loader = learned_loader(small_dataset, batch_size=6)
    sizes = iter([(2, 2), (2, 2), (7, 6), (3, 3)])

    def hook(images, lam, partner):
        return torch.full((images.shape[0], 1, *next(sizes)), 0.25)

    loader.set_mask_hook(hook)
    ptrs = []
    for _ in loader:
        m = loader.last_batch.params.device_masks
        ptrs.append((m.data_ptr(), tuple(m.shape)))
        assert torch.all(m == 0.25)
    assert ptrs[0][0] == ptrs[1][0]  # same shared storage
    assert ptrs[2][1] == (6, 1, 7, 6) and ptrs[3][1] == (2, 1, 3, 3)
    assert ptrs[3][0] == ptrs[2][0]  # grown once, then reused


def test_masks_may_be_float16(small_dataset):
    loader = learned_loader(small_dataset)
    loader.set_mask_hook(lambda images, lam, partner: torch.full((images.shape[0], 1, 3, 3), 0.75, dtype=torch.float16))
    next(iter(loader))
    torch.testing.assert_close(loader.last_batch.params.device_target_lam, torch.full((6,), 0.75))


# ------------------------------------------------------------------------------------ errors
BAD = [
    (lambda im, lam, p: torch.rand(im.shape[0], 4, 4), "returned shape .* expected 6 x 1 x h x w"),
    (lambda im, lam, p: torch.rand(im.shape[0] - 1, 1, 4, 4), "returned shape"),
    (lambda im, lam, p: torch.rand(im.shape[0], 1, 33, 4), "1 <= h <= 32"),
    (lambda im, lam, p: torch.rand(im.shape[0], 1, 4, 4, device="meta"), "masks on meta; the loader mixes on cpu"),
    (
        lambda im, lam, p: torch.rand(im.shape[0], 1, 4, 4, dtype=torch.float64),
        "torch.float64 masks; use torch.float32",
    ),
    (lambda im, lam, p: np.zeros((im.shape[0], 1, 4, 4)), "returned ndarray; return a torch.Tensor"),
    (lambda im, lam, p: torch.full((im.shape[0], 1, 4, 4), float("nan")), r"96 nan value\(s\) \(first in sample 0"),
    (
        lambda im, lam, p: torch.zeros(im.shape[0], 1, 4, 4).index_fill_(0, torch.tensor([3]), float("inf")),
        r"16 inf value\(s\) \(first in sample 3",
    ),
    (lambda im, lam, p: torch.full((im.shape[0], 1, 4, 4), 1.5), r"96 above 1 value\(s\).*in \[0, 1\]"),
    (lambda im, lam, p: torch.full((im.shape[0], 1, 4, 4), -0.1), r"96 below 0 value\(s\)"),
]


@pytest.mark.parametrize(
    "fn, message", BAD, ids=["rank3", "count", "too_tall", "device", "dtype", "numpy", "nan", "inf", "above", "below"]
)
def test_bad_masks_are_refused_and_the_loader_stays_usable(small_dataset, fn, message):
    loader = learned_loader(small_dataset)
    state = {"bad": True}

    def hook(images, lam, partner):
        if state.pop("bad", False):
            return fn(images, lam, partner)
        return torch.full((images.shape[0], 1, 2, 2), 0.5)

    loader.set_mask_hook(hook)
    it = iter(loader)
    with pytest.raises(MaskHookError, match=message) as err:
        next(it)
    assert "epoch 0, step 0" in str(err.value)
    images, targets = next(it)  # the failed batch is skipped, the next one works
    assert loader.last_batch.step == 1 and images.shape == (6, 3, 32, 32)
    assert torch.isfinite(images).all()
    assert sum(1 for _ in it) == 2  # and the rest of the epoch


def test_logit_masks_may_leave_0_1_but_not_be_nan(small_dataset):
    loader = learned_loader(small_dataset)
    loader.set_mask_hook(lambda im, lam, p: torch.full((im.shape[0], 1, 2, 2), 7.0), logits=True)
    next(iter(loader))
    torch.testing.assert_close(loader.last_batch.params.device_target_lam, torch.sigmoid(torch.full((6,), 7.0)))
    loader.set_mask_hook(lambda im, lam, p: torch.full((im.shape[0], 1, 2, 2), float("-inf")), logits=True)
    with pytest.raises(MaskHookError, match="inf value.*finite logits"):
        next(iter(loader))


def test_hook_exception_is_chained_and_loader_recovers(small_dataset):
    loader = learned_loader(small_dataset)
    calls = []

    def hook(images, lam, partner):
        calls.append(images.shape[0])
        if len(calls) == 2:
            raise RuntimeError("feature extractor ran out of memory")
        return torch.full((images.shape[0], 1, 2, 2), 0.5)

    loader.set_mask_hook(hook)
    it = iter(loader)
    next(it)
    with pytest.raises(MaskHookError, match="raised RuntimeError at epoch 0, step 1: feature extractor ran out") as err:
        next(it)
    assert isinstance(err.value.__cause__, RuntimeError)
    next(it)
    assert loader.last_batch.step == 2
    assert len([x for x, _ in loader]) == 4  # a new epoch runs in full
    loader.remove_mask_hook()
    with pytest.raises(MaskHookError, match="use LearnedMask but no mask hook is registered"):
        next(iter(loader))


def test_registration_is_validated(small_dataset):
    plain_mix = ImageLoader(root=small_dataset, batch_size=4, size=32, device="cpu", mix=Mixer(methods=[FMix()]))
    with pytest.raises(ValueError, match="needs a mixer with LearnedMask"):
        plain_mix.set_mask_hook(lambda *a: None)
    loader = learned_loader(small_dataset)
    with pytest.raises(ValueError, match="must be callable"):
        loader.set_mask_hook(3)
    with pytest.raises(ValueError, match="interpolation='bicubic'"):
        loader.set_mask_hook(lambda *a: None, interpolation="bicubic")
    with pytest.raises(ValueError, match="target_lam='mean'"):
        loader.set_mask_hook(lambda *a: None, target_lam="mean")
    with pytest.raises(ValueError, match="validate='lazy'"):
        loader.set_mask_hook(lambda *a: None, validate="lazy")
    with pytest.raises(ValueError, match="mixup_margin=0.5"):
        LearnedMask(mixup_margin=0.5)


class TinyMaskNet(torch.nn.Module):
    """my_net(images) -> N x 1 x 4 x 4 logits: a trainable policy whose masks require grad."""

    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 1, 3, padding=1)

    def forward(self, images):
        return F.adaptive_avg_pool2d(self.conv(images.float()), 4)


@pytest.mark.parametrize("kind", ["net_sigmoid", "parameter", "requires_grad"])
def test_hook_masks_that_require_grad_are_used_detached(small_dataset, kind):
    """The README pattern `my_net(images).sigmoid()` (and an nn.Parameter, or any tensor that
    requires grad) works: the loader reads the masks detached, mixes exactly with them, and leaves
    the trainer's graph alone."""
    torch.manual_seed(0)
    net = TinyMaskNet()
    param = torch.nn.Parameter(torch.rand(6, 1, 3, 3))
    seen = []

    def hook(images, lam, partner):
        if kind == "net_sigmoid":
            m = net(images).sigmoid()
        elif kind == "parameter":
            m = param[: images.shape[0]] if images.shape[0] == 6 else param[: images.shape[0]].clone()
        else:
            m = torch.rand(images.shape[0], 1, 2, 5).requires_grad_()
        assert m.requires_grad
        seen.append(m)
        return m

    loader = learned_loader(small_dataset)
    loader.set_mask_hook(hook)
    for k, (images, targets) in enumerate(loader):
        info = loader.last_batch
        m = upsample(seen[-1].detach(), images.shape[-2:], "nearest")
        clean = info.unmixed.double()
        want = m.double() * clean + (1 - m.double()) * clean[torch.from_numpy(info.params.partner)]
        torch.testing.assert_close(images.double(), want, rtol=0, atol=2e-5)
        assert not images.requires_grad and not info.params.device_masks.requires_grad
    assert k >= 1
    if kind == "net_sigmoid":  # the trainer can still backpropagate through its own masks
        seen[-1].sum().backward()
        assert net.conv.weight.grad is not None


def test_validate_auto_is_eager_on_the_cpu(small_dataset):
    """The default validate='auto' checks before mixing on the CPU: the bad batch itself raises."""
    loader = learned_loader(small_dataset)
    loader.set_mask_hook(lambda images, lam, partner: torch.full((images.shape[0], 1, 2, 2), float("nan")))
    assert loader._mask_hook.hook.validate == "auto"
    with pytest.raises(MaskHookError, match="nan value"):
        next(iter(loader))


# ------------------------------------------------- the kernel's upsampling of hook masks (records path)
def hook_params(n, h, w, masks, flags, fmix_rows=()):
    """MixParams of n LearnedMask samples whose masks sit on the device, plus some FMix host masks."""
    p = LearnedMask().params(n, height=h, width=w, lam=0.5, partner="roll")
    for r in fmix_rows:
        p.masks[r] = np.arange(12, dtype=np.float32).reshape(3, 4) % 2
    p.flags[hooked_rows(p)] = flags
    p.device_masks = masks
    return p


@pytest.mark.parametrize("bilinear", [False, True], ids=["nearest", "bilinear"])
@pytest.mark.parametrize("sigmoid", [False, True], ids=["probs", "logits"])
@pytest.mark.parametrize("shape", [(1, 1), (3, 2), (7, 7), (5, 11), (28, 19)])
def test_hook_masks_upsample_like_interpolate(shim, bilinear, sigmoid, shape):
    """Device masks through records()/mask_pool(): CPU backend and host-shim kernel equal
    F.interpolate(mode, align_corners=False) (then the sigmoid) per sample; FMix host masks in the
    same batch still read their own slots."""
    n, h, w = 4, 28, 28
    rng = np.random.default_rng(hash((shape, bilinear, sigmoid)) % 2**32)
    masks = torch.from_numpy(
        (rng.normal(0, 3, (n, 1) + shape) if sigmoid else rng.random((n, 1) + shape)).astype(np.float32)
    )
    flags = (FLAG_BILINEAR if bilinear else 0) | (FLAG_SIGMOID if sigmoid else 0)
    p = hook_params(n, h, w, masks, flags, fmix_rows=(2,))
    records, pool = p.records(), p.mask_pool("cpu")
    images = np.zeros((n + 1, h, w, 3), np.uint8)
    images[:n] = 255  # own images white, every partner the extra black image: out = mask
    records["partner"] = n
    want = upsample(masks, (h, w), "bilinear" if bilinear else "nearest")
    if sigmoid:
        want = torch.sigmoid(want)
    want = want[:, 0].numpy()
    got_cpu = mix_normalize(torch.from_numpy(images), records, pool, norm=PLAIN).numpy()[:, 0]
    got_shim = run_shim(shim, images, records, pool.numpy(), PLAIN, torch.float32, False)[:, 0]
    for got in (got_cpu, got_shim):
        for i in (0, 1, 3):
            np.testing.assert_allclose(got[i], want[i], atol=2e-6)
        rows = np.minimum(np.floor(np.arange(28, dtype=np.float32) * np.float32(3 / 28)).astype(int), 2)
        cols = np.minimum(np.floor(np.arange(28, dtype=np.float32) * np.float32(4 / 28)).astype(int), 3)
        np.testing.assert_allclose(got[2], p.masks[2][rows][:, cols], atol=1e-7)  # FMix, nearest 3x4 -> 28x28
    ref = reference_mix_normalize(images, records, pool.numpy(), PLAIN.mean, PLAIN.std)[:, 0]
    np.testing.assert_allclose(got_shim, ref, atol=2e-6)


# ------------------------------------------------------------------------------ mask-mean lam
@pytest.mark.parametrize("bilinear", [False, True], ids=["nearest", "bilinear"])
@pytest.mark.parametrize("logits", [False, True], ids=["probs", "logits"])
@pytest.mark.parametrize(
    "shape, size",
    [
        ((1, 1), (7, 9)),
        ((3, 5), (32, 32)),
        ((7, 7), (224, 224)),
        ((14, 14), (224, 224)),
        ((5, 11), (33, 35)),
        ((13, 1), (40, 3)),
    ],
)
def test_mask_mean_is_exact(bilinear, logits, shape, size):
    rng = np.random.default_rng(11)
    low = (rng.normal(0, 2, (3,) + shape) if logits else rng.random((3,) + shape)).astype(np.float32)
    got = full_resolution_mask_mean(torch.from_numpy(low)[:, None], *size, bilinear=bilinear, logits=logits).numpy()
    for i in range(3):
        up = resample(low[i][..., None].astype(np.float64), *size, bilinear)[..., 0]  # float64 reference
        if logits:
            up = 1 / (1 + np.exp(-up))
        assert abs(got[i] - up.mean()) < 2e-7, (got[i], up.mean())


def test_upsampling_weights_sum_to_the_output_size():
    for a, b in [(1, 5), (3, 7), (7, 224), (13, 40), (5, 5)]:
        for bil in (False, True):
            wts = upsampling_weights(a, b, bil)
            assert wts.shape == (a,) and abs(wts.sum() - b) < 1e-9 and (wts >= 0).all()


def test_mask_mean_matches_the_kernel_output(shim):
    """The lam the targets get is the mean of the weight the kernel really applied."""
    n, h, w = 3, 30, 26
    masks = torch.rand(n, 1, 4, 6, generator=torch.Generator().manual_seed(1))
    for bilinear in (False, True):
        p = hook_params(n, h, w, masks, FLAG_BILINEAR if bilinear else 0)
        records = p.records()
        records["partner"] = n
        images = np.zeros((n + 1, h, w, 3), np.uint8)
        images[:n] = 255
        out = run_shim(shim, images, records, p.mask_pool("cpu").numpy(), PLAIN, torch.float32, False)[:, 0]
        lam = full_resolution_mask_mean(masks, h, w, bilinear=bilinear, logits=False).numpy()
        np.testing.assert_allclose(out.mean(axis=(1, 2)), lam, atol=1e-6)


# -------------------------------------------------------------------------------------- GPU
@pytest.mark.gpu
@pytest.mark.parametrize("validate", ["eager", "deferred"])
def test_cuda_hook_path(small_dataset, validate):
    mix = Mixer(methods=[LearnedMask(alpha=2.0)], mode="elem")
    loader = ImageLoader(root=small_dataset, batch_size=6, size=32, device="cuda", mix=mix, seed=5)
    hook = Recorder(logits=True)
    calls = []

    def cuda_hook(images, lam, partner):
        assert images.is_cuda and lam.is_cuda and partner.is_cuda
        calls.append(len(calls))
        return hook(images.cpu(), lam.cpu(), partner.cpu()).cuda()

    loader.set_mask_hook(cuda_hook, logits=True, interpolation="bilinear", validate=validate)
    for images, targets in loader:
        call = hook.calls[-1]
        info = loader.last_batch
        m = torch.sigmoid(upsample(call["masks"], (32, 32), "bilinear")).cuda()
        clean = info.unmixed.double()
        want = m.double() * clean + (1 - m.double()) * clean[torch.from_numpy(info.params.partner).cuda()]
        torch.testing.assert_close(images.double(), want, rtol=0, atol=2e-5)
        torch.testing.assert_close(info.params.device_target_lam, m.mean(dim=(1, 2, 3)), rtol=0, atol=1e-6)
    assert len(calls) == len(loader)
    bad = {"n": 0}

    def nan_hook(images, lam, partner):
        bad["n"] += 1
        fill = float("nan") if bad["n"] == 1 else 0.5
        return torch.full((images.shape[0], 1, 2, 2), fill, device="cuda")

    loader.set_mask_hook(nan_hook, validate=validate)
    it = iter(loader)
    if validate == "deferred":
        next(it)  # mixed with the bad masks; reported at the next batch whose check has arrived
        torch.cuda.synchronize()  # the GPU is then done with it: the next batch reads its flag
    with pytest.raises(MaskHookError, match="nan value"):
        next(it)
    next(it)


@pytest.mark.gpu
def test_cuda_shared_mask_buffer_grows_safely_across_streams(small_dataset):
    """Batches consumed on a side stream while the hook's masks grow (the shared buffer is
    reallocated): record_stream keeps the old buffer's memory from being reused while a kernel on
    the side stream may still read it; every batch is mixed with its own masks."""
    mix = Mixer(methods=[LearnedMask(alpha=2.0)], mode="elem")
    loader = ImageLoader(root=small_dataset, batch_size=6, size=32, device="cuda", mix=mix, seed=5)
    sizes = iter([(1, 1), (2, 2), (4, 4), (8, 8), (16, 16), (32, 32)] * 4)
    seen = []

    def hook(images, lam, partner):
        m = torch.rand(images.shape[0], 1, *next(sizes), device=images.device)
        seen.append(m.clone())
        return m

    loader.set_mask_hook(hook)
    side = torch.cuda.Stream()
    with torch.cuda.stream(side):
        for images, _ in loader:
            torch.cuda._sleep(10_000_000)  # the consumer lags: the next batch's buffer growth must wait for it
            info = loader.last_batch
            m = upsample(seen[-1], (32, 32), "nearest")
            clean = info.unmixed.double()
            want = m.double() * clean + (1 - m.double()) * clean[torch.from_numpy(info.params.partner).cuda()]
            torch.testing.assert_close(images.double(), want, rtol=0, atol=2e-5)
