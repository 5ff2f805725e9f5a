"""The mixing engine: methods against timm and torchvision, statistics, modes, targets, the loader."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy import stats

from dalimix import ImageLoader
from dalimix.losses import MixCrossEntropy
from dalimix.mix import (
    CompactTargets,
    CutMix,
    FMix,
    GridMix,
    Mixer,
    MixParams,
    MixUp,
    Mixup,
    ResizeMix,
    SamplePairing,
    SmoothMix,
    pair_indices,
    soft_targets,
)
from dalimix.mix.params import DISTINCT_PAIRINGS
from dalimix.ops import Normalization, mix_normalize
from dalimix.ops.record import METHOD_NONE

ALL_METHODS = [MixUp(), CutMix(), FMix(), ResizeMix(), GridMix(n_holes=(2, 5)), SmoothMix(), SamplePairing()]


def batch(n=6, h=24, w=32, seed=0):
    rng = np.random.default_rng(seed)
    return torch.from_numpy(rng.integers(0, 256, (n, h, w, 3), dtype=np.uint8)), torch.from_numpy(
        rng.integers(0, 10, n)
    )


def normalised(images, norm=None):
    """What timm / torchvision mix: the normalised float batch, N x 3 x H x W."""
    return mix_normalize(images, norm=norm or Normalization())


# ------------------------------------------------------------------------ oracles: timm
def timm_mixup(monkeypatch, *, lam, use_cutmix, boxes=None, **kw):
    """timm's Mixup with its parameter draws replaced by the given lam, method and boxes."""
    import timm.data.mixup as tm

    m = tm.Mixup(num_classes=10, **kw)
    if m.mode == "batch":
        monkeypatch.setattr(m, "_params_per_batch", lambda: (lam, use_cutmix))
    else:
        monkeypatch.setattr(m, "_params_per_elem", lambda n: (np.array(lam, np.float32), np.array(use_cutmix)))
    if boxes is not None:
        it = iter(boxes)

        def fixed_box(img_shape, lam, ratio_minmax=None, correct_lam=True, count=None):
            yl, yh, xl, xh = next(it)
            if correct_lam or ratio_minmax is not None:
                lam = 1.0 - (yh - yl) * (xh - xl) / float(img_shape[-2] * img_shape[-1])
            return (yl, yh, xl, xh), lam

        monkeypatch.setattr(tm, "cutmix_bbox_and_lam", fixed_box)
    return m


@pytest.mark.parametrize("smoothing", [0.0, 0.1])
def test_mixup_batch_equals_timm(monkeypatch, smoothing):
    images, labels = batch()
    lam = 0.3141
    timm_fn = timm_mixup(monkeypatch, lam=lam, use_cutmix=False, mixup_alpha=1.0, label_smoothing=smoothing)
    want_x, want_t = timm_fn(normalised(images), labels)
    mixer = Mixup(mixup_alpha=1.0, label_smoothing=smoothing, num_classes=10)
    params = MixUp().params(len(labels), height=24, width=32, lam=lam)
    got_x, got_t = mixer(images, labels, params=params)
    torch.testing.assert_close(got_x, want_x, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got_t, want_t, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("correct_lam", [True, False])
def test_cutmix_batch_equals_timm(monkeypatch, correct_lam):
    images, labels = batch()
    lam, box = 0.6, (3, 20, 5, 32)  # timm's order: yl, yh, xl, xh — clipped at the right edge
    timm_fn = timm_mixup(
        monkeypatch,
        lam=lam,
        use_cutmix=True,
        boxes=[box],
        mixup_alpha=0.0,
        cutmix_alpha=1.0,
        correct_lam=correct_lam,
        label_smoothing=0.1,
    )
    want_x, want_t = timm_fn(normalised(images), labels)
    mixer = Mixup(mixup_alpha=0.0, cutmix_alpha=1.0, correct_lam=correct_lam, num_classes=10)
    yl, yh, xl, xh = box
    params = CutMix(correct_lam=correct_lam).params(6, height=24, width=32, lam=lam, box=(yl, xl, yh, xh))
    got_x, got_t = mixer(images, labels, params=params)
    torch.testing.assert_close(got_x, want_x, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got_t, want_t, atol=1e-6, rtol=1e-6)


def test_elem_and_pair_modes_equal_timm(monkeypatch):
    """Per-element (and per-pair) lam and method, as timm's elem/pair modes compute them."""
    images, labels = batch(n=6)
    lam = [0.8, 0.35, 1.0, 0.5, 0.2, 0.9]
    use_cutmix = [True, False, False, True, False, True]
    boxes = {0: (2, 10, 4, 30), 3: (0, 24, 0, 16), 5: (5, 6, 7, 9)}
    timm_fn = timm_mixup(
        monkeypatch,
        lam=lam,
        use_cutmix=use_cutmix,
        boxes=[boxes[i] for i in sorted(boxes)],
        mixup_alpha=1.0,
        cutmix_alpha=1.0,
        mode="elem",
        label_smoothing=0.1,
    )
    want_x, want_t = timm_fn(normalised(images), labels)
    p = MixParams.unmixed(6, ("mixup", "cutmix"))
    p.partner = pair_indices(6, "flip")
    for i in range(6):
        if lam[i] == 1.0:
            continue
        rows = np.array([i])
        if use_cutmix[i]:
            yl, yh, xl, xh = boxes[i]
            CutMix()._fill_explicit(p, rows, np.array([lam[i]]), rng=None, height=24, width=32, box=(yl, xl, yh, xh))
        else:
            MixUp().fill(p, rows, np.array([lam[i]]), rng=None, height=24, width=32, shared=False)
    got_x, got_t = Mixup(mixup_alpha=1.0, cutmix_alpha=1.0, mode="elem", num_classes=10)(images, labels, params=p)
    torch.testing.assert_close(got_x, want_x, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got_t, want_t, atol=1e-6, rtol=1e-6)

    # pair mode: pairs (i, n-1-i) share lam and box
    lam3, cut3 = [0.7, 0.4, 0.55], [True, False, True]
    pboxes = [(1, 9, 2, 12), (4, 20, 10, 31)]
    timm_fn = timm_mixup(
        monkeypatch,
        lam=lam3,
        use_cutmix=cut3,
        boxes=pboxes,
        mixup_alpha=1.0,
        cutmix_alpha=1.0,
        mode="pair",
        label_smoothing=0.0,
    )
    want_x, want_t = timm_fn(normalised(images), labels)
    p = MixParams.unmixed(6, ("mixup", "cutmix"))
    p.partner = pair_indices(6, "flip")
    it = iter(pboxes)
    for i in range(3):
        rows = np.array([i, 5 - i])
        if cut3[i]:
            yl, yh, xl, xh = next(it)
            CutMix()._fill_explicit(
                p, rows, np.array([lam3[i]] * 2), rng=None, height=24, width=32, box=(yl, xl, yh, xh)
            )
        else:
            MixUp().fill(p, rows, np.array([lam3[i]] * 2), rng=None, height=24, width=32, shared=False)
    got_x, got_t = Mixup(mixup_alpha=1.0, cutmix_alpha=1.0, mode="pair", label_smoothing=0.0, num_classes=10)(
        images, labels, params=p
    )
    torch.testing.assert_close(got_x, want_x, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got_t, want_t, atol=1e-6, rtol=1e-6)


def test_cutmix_boxes_follow_timm_rules():
    """Same numpy draws, same boxes and lams as timm's cutmix_bbox_and_lam (alpha box and minmax box)."""
    from timm.data.mixup import cutmix_bbox_and_lam

    for minmax in (None, (0.2, 0.8)):
        for lam in (0.05, 0.3, 0.77, 0.999):
            np.random.seed(5)
            (yl, yh, xl, xh), tlam = cutmix_bbox_and_lam((3, 37, 53), lam, ratio_minmax=minmax, correct_lam=True)
            # timm draws with np.random.randint; replay the same draws through a Generator-like shim
            np.random.seed(5)

            class Replay:
                def integers(self, lo, hi=None, size=None):
                    return np.random.randint(lo, hi, size=size)

            box = CutMix(minmax=minmax).boxes(Replay(), np.array([lam]), 37, 53)[0]
            assert tuple(box) == (
                int(np.ravel(yl)[0]),
                int(np.ravel(xl)[0]),
                int(np.ravel(yh)[0]),
                int(np.ravel(xh)[0]),
            )
            p = CutMix(minmax=minmax).params(1, height=37, width=53, lam=lam, box=box)
            assert p.lam[0] == pytest.approx(float(np.ravel(tlam)[0]), abs=1e-12)


# ------------------------------------------------------------------ oracles: torchvision
def test_mixup_and_cutmix_equal_torchvision(monkeypatch):
    from torchvision.transforms import v2

    images, labels = batch(n=5, h=20, w=28)
    x = normalised(images)
    tv = v2.MixUp(num_classes=10)
    monkeypatch.setattr(tv, "make_params", lambda flat: {"lam": 0.27})
    want_x, want_t = tv(x.clone(), labels)
    mixer = Mixer(methods=[MixUp()], pairing="roll", num_classes=10)
    got_x, got_t = mixer(images, labels, params=MixUp().params(5, height=20, width=28, lam=0.27, partner="roll"))
    torch.testing.assert_close(got_x, want_x, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got_t, want_t, atol=1e-6, rtol=1e-6)

    tv = v2.CutMix(num_classes=10)
    x1, y1, x2, y2 = 6, 0, 25, 13
    lam_adj = 1.0 - (x2 - x1) * (y2 - y1) / (20 * 28)
    monkeypatch.setattr(tv, "make_params", lambda flat: {"box": (x1, y1, x2, y2), "lam_adjusted": lam_adj})
    want_x, want_t = tv(x.clone(), labels)
    params = CutMix().params(5, height=20, width=28, lam=0.5, box=(y1, x1, y2, x2), partner="roll")
    got_x, got_t = Mixer(methods=[CutMix()], pairing="roll", num_classes=10)(images, labels, params=params)
    torch.testing.assert_close(got_x, want_x, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got_t, want_t, atol=1e-6, rtol=1e-6)


# --------------------------------------------------------- lam = the own-pixel fraction
@pytest.mark.parametrize("method", ALL_METHODS, ids=lambda m: m.name)
@pytest.mark.parametrize("size", [(24, 32), (17, 23), (64, 64)])
def test_lam_is_the_fraction_of_own_image(method, size):
    """Mix a white image with a black partner: the output's mean brightness is exactly lam
    (the pixel fraction / blend weight of the sample's own image) for every method."""
    h, w = size
    n = 8
    images = torch.zeros(n, h, w, 3, dtype=torch.uint8)
    images[: n // 2] = 255
    rng = np.random.default_rng(1)
    p = method.params(n, height=h, width=w, rng=rng, partner=np.r_[np.arange(n // 2) + n // 2, np.arange(n // 2)])
    norm = Normalization(mean=(0, 0, 0), std=(1, 1, 1))
    out = mix_normalize(images, p.records(), p.mask_pool("cpu"), norm=norm).double()
    frac = out[: n // 2].mean(dim=(1, 2, 3)).numpy()
    np.testing.assert_allclose(frac, p.lam[: n // 2], atol=2e-6)
    assert ((p.lam >= 0) & (p.lam <= 1)).all()
    if method.name == "samplepairing":
        assert (p.target_lam == 1).all()
    else:
        assert np.array_equal(p.target_lam, p.lam)


def test_boxes_stay_in_bounds_and_lam_is_corrected():
    rng = np.random.default_rng(3)
    for method in (CutMix(), CutMix(minmax=(0.3, 0.7)), ResizeMix()):
        for h, w in ((1, 1), (7, 3), (224, 224), (33, 500)):
            p = method.params(64, height=h, width=w, rng=rng)
            y0, x0, y1, x1 = p.box.T
            assert ((0 <= y0) & (y0 <= y1) & (y1 <= h) & (0 <= x0) & (x0 <= x1) & (x1 <= w)).all()
            np.testing.assert_allclose(p.lam, 1 - (y1 - y0) * (x1 - x0) / (h * w))
    # minmax boxes lie fully inside with sides in [lo, hi) of the image
    p = CutMix(minmax=(0.3, 0.7)).params(200, height=100, width=80, rng=rng)
    hs, ws = p.box[:, 2] - p.box[:, 0], p.box[:, 3] - p.box[:, 1]
    assert hs.min() >= 30 and hs.max() < 70 and ws.min() >= 24 and ws.max() < 56


def test_uncorrected_cutmix_keeps_the_drawn_lam():
    p = CutMix(correct_lam=False).params(4, height=10, width=10, lam=0.123, box=(0, 0, 10, 10))
    assert (p.lam == 0.123).all()


# ------------------------------------------------------------------------- statistics
@pytest.mark.parametrize("alpha", [0.2, 1.0, 2.0])
def test_mixup_lam_follows_beta(alpha):
    mixer = Mixer(methods=[MixUp(alpha=alpha)], num_classes=10)
    lams = [mixer.plan(4, rng=np.random.default_rng(s), height=8, width=8).lam[0] for s in range(800)]
    # lam is handed to the kernel in float32: compare at that precision
    assert stats.kstest(lams, stats.beta(alpha, alpha).cdf).pvalue > 1e-3


def test_elem_mode_lams_follow_beta_and_fmix_means_equal_lam():
    mixer = Mixer(methods=[FMix(alpha=1.0)], mode="elem", num_classes=10)
    p = mixer.plan(400, rng=np.random.default_rng(0), height=32, width=32)
    means = np.array([m.mean() for m in p.masks])  # full-resolution masks: the mean is the lam
    np.testing.assert_allclose(p.lam, means, atol=1e-12)
    assert stats.kstest(p.lam, stats.beta(1.0, 1.0).cdf).pvalue > 1e-3
    # masks are binary and spatially coherent (low-frequency): neighbours mostly agree
    m = np.stack(p.masks)
    assert set(np.unique(m)) <= {0.0, 1.0}
    agree = (m[:, 1:, :] == m[:, :-1, :]).mean()
    assert agree > 0.8


def test_fmix_lam_exact_when_upsampling_is_uneven():
    f = FMix(mask_size=(5, 7))
    p = f.params(3, height=23, width=31, rng=np.random.default_rng(2))
    images = torch.zeros(3, 23, 31, 3, dtype=torch.uint8)
    images[0] = 255
    p.partner = np.array([1, 0, 2])
    out = mix_normalize(images, p.records(), p.mask_pool("cpu"), norm=Normalization(mean=(0, 0, 0), std=(1, 1, 1)))
    assert out[0].double().mean().item() == pytest.approx(p.lam[0], abs=1e-9)


def test_fmix_samples_masks_at_full_resolution_by_default():
    """At 32 px a quarter-resolution mask is 4 x 4 blocks with lam on a 1/64 grid; the default is the
    release's full resolution (lam on a 1/1024 grid, edges at pixel level)."""
    p = FMix().params(64, height=32, width=32, rng=np.random.default_rng(0))
    assert {m.shape for m in p.masks} == {(32, 32)}
    lam_grid = p.lam * 32 * 32
    np.testing.assert_allclose(lam_grid, np.rint(lam_grid), atol=1e-9)
    assert (np.abs(p.lam * 64 - np.rint(p.lam * 64)) > 1e-6).mean() > 0.5  # not on the coarse grid
    m = np.stack(p.masks)
    blocky = (m.reshape(64, 8, 4, 8, 4) == m[:, ::4, ::4].reshape(64, 8, 1, 8, 1)).all()
    assert not blocky
    coarse = FMix(mask_scale=4).params(4, height=32, width=32, rng=np.random.default_rng(0))
    assert {m.shape for m in coarse.masks} == {(8, 8)}


def test_fmix_spectrum_follows_the_decay_power():
    """The low-frequency image's Fourier amplitude is proportional to 1 / max(f, 1/max(h, w)) ** decay."""
    h, w, decay = 16, 20, 2.0
    f = FMix(decay_power=decay)
    imgs = f.low_freq_images(np.random.default_rng(0), 4000, h, w).astype(np.float64)
    amp = np.abs(np.fft.rfft2(imgs)).mean(0)
    fy = np.fft.fftfreq(h)[:, None]
    fx = np.fft.rfftfreq(w)[None, :]
    scale = 1.0 / np.maximum(np.sqrt(fy**2 + fx**2), 1.0 / max(h, w)) ** decay
    ratio = amp / scale
    inner = ratio[1:-1, 1:-1]  # edges of the real FFT (DC, Nyquist) have real parts only
    assert inner.std() / inner.mean() < 0.05


def release_binarise(mask: np.ndarray, lam: float, max_soft: float) -> np.ndarray:
    """The FMix release's ``binarise_mask`` in float64, with its random ceil/floor replaced by round."""
    idx = mask.reshape(-1).argsort(kind="stable")[::-1]
    out = mask.reshape(-1).astype(np.float64).copy()
    num = int(np.rint(lam * out.size))
    eff_soft = min(lam, 1 - lam) if (max_soft > lam or max_soft > 1 - lam) else max_soft
    soft = int(out.size * eff_soft)
    low, high = num - soft, num + soft
    out[idx[:high]] = 1
    out[idx[low:]] = 0
    out[idx[low:high]] = np.linspace(1, 0, len(idx[low:high]))
    return out.reshape(mask.shape)


@pytest.mark.parametrize("max_soft", [0.0, 0.05, 0.3, 0.5])
def test_fmix_binarisation_and_soft_edges_match_the_release(max_soft):
    f = FMix(max_soft=max_soft)
    rng = np.random.default_rng(3)
    imgs = f.low_freq_images(rng, 12, 13, 17)
    lam = rng.uniform(0.02, 0.98, size=12)
    lam[:2] = (0.5, 0.04)
    got = f.binarize(imgs, lam)
    # the release ranks descending with ties broken by position from the end; there are no ties here
    want = np.stack([release_binarise(im, l, max_soft) for im, l in zip(imgs.astype(np.float64), lam)])
    np.testing.assert_allclose(got, want, atol=1e-6)
    p = f.params(12, height=13, width=17, rng=rng)
    np.testing.assert_allclose(p.lam, [m.mean() for m in p.masks], atol=1e-12)


def fmix_reference_images(seed: int, count: int, h: int, w: int, decay: float) -> np.ndarray:
    """FMix's low-pass noise in float64 from the paper's definition: the same complex Gaussian draws
    (torch's generator, ``seed``), amplitude ``1 / max(f, 1 / max(h, w)) ** decay``, inverse real FFT."""
    noise = torch.randn((count, h, w // 2 + 1, 2), generator=torch.Generator().manual_seed(seed)).double().numpy()
    fy = np.fft.fftfreq(h)[:, None]
    fx = np.fft.rfftfreq(w)[None, :]
    scale = 1.0 / np.maximum(np.sqrt(fy * fy + fx * fx), 1.0 / max(h, w)) ** decay
    return np.fft.irfft2((noise[..., 0] + 1j * noise[..., 1]) * scale, s=(h, w))


def assert_top_pixels(masks: np.ndarray, images: np.ndarray, lam: np.ndarray) -> None:
    """Each mask is 1 on the top round(lam h w) pixels of its float64 image and 0 elsewhere, except
    possibly on pixels within float32 rounding of that image's threshold."""
    count, h, w = images.shape
    size = h * w
    flat, got = images.reshape(count, -1), masks.reshape(count, -1)
    keep = np.rint(lam * size).astype(np.int64)
    np.testing.assert_array_equal(got.sum(1), keep)  # lam exact to 1 / (h w)
    order = np.argsort(-flat, axis=1, kind="stable")
    want = np.zeros_like(flat)
    np.put_along_axis(want, order, (np.arange(size)[None, :] < keep[:, None]).astype(np.float64), axis=1)
    wrong = got != want
    if wrong.any():
        sorted_desc = np.take_along_axis(flat, order, axis=1)
        threshold = sorted_desc[np.arange(count), np.clip(keep - 1, 0, size - 1)]
        spread = np.abs(flat).max(1, keepdims=True)
        near = np.abs(flat - threshold[:, None]) <= 1e-5 * spread
        assert not (wrong & ~near).any()
    assert wrong.mean() < 1e-3


@pytest.mark.parametrize("h, w, decay", [(13, 17, 3.0), (32, 32, 1.0), (48, 40, 3.0)])
def test_fmix_planner_matches_a_float64_reference(h, w, decay):
    """The batched float32 planner (numpy FFT in chunks on a thread pool, selection per row) against
    the paper's definition in float64 from the same draws: top-ceil/round(lam h w) pixels of the
    low-pass noise are 1."""
    f = FMix(decay_power=decay)
    lam = np.random.default_rng(1).uniform(0, 1, 70)
    lam[:3] = (0.0, 1.0, 0.5)
    masks, means = f.masks(np.random.default_rng(5), lam, h, w)
    seed = int(np.random.default_rng(5).integers(0, 2**62))
    assert_top_pixels(masks, fmix_reference_images(seed, len(lam), h, w, decay), lam)
    np.testing.assert_array_equal(means, np.rint(lam * h * w) / (h * w))
    # the planner before this one: torch's FFT, the same draws (masks agree but for float32 near-ties)
    gen = torch.Generator().manual_seed(seed)
    noise = torch.view_as_complex(torch.randn((len(lam), h, w // 2 + 1, 2), generator=gen))
    fy, fx = np.fft.fftfreq(h)[:, None], np.fft.rfftfreq(w)[None, :]
    scale = (1.0 / np.maximum(np.sqrt(fy * fy + fx * fx), 1.0 / max(h, w)) ** decay).astype(np.float32)
    before = f.binarize(torch.fft.irfft2(noise * torch.from_numpy(scale), s=(h, w)).numpy(), lam)
    assert (before != masks).mean() < 1e-4


def test_fmix_chunking_does_not_change_the_masks(monkeypatch):
    import dalimix.mix.methods as methods

    lam = np.random.default_rng(2).uniform(0, 1, 40)
    whole, _ = FMix().masks(np.random.default_rng(9), lam, 24, 20)
    monkeypatch.setattr(methods, "_FMIX_CHUNK_PIXELS", 24 * 20 * 3)  # 3 samples a chunk, on the pool
    chunked, _ = FMix().masks(np.random.default_rng(9), lam, 24, 20)
    np.testing.assert_array_equal(chunked, whole)


@pytest.mark.parametrize("max_soft", [0.0, 0.1])
def test_fmix_device_planner_matches_the_host_planner(max_soft):
    """FMix(device=...) ranks the same noise (on the CPU device: the same generator) with a stable
    sort; its masks and lams match the host planner's and the release's soft edge."""
    rng = np.random.default_rng(4)
    lam = rng.uniform(0.02, 0.98, 30)
    dev = FMix(device="cpu", max_soft=max_soft)
    masks, means = dev.device_masks(np.random.default_rng(6), lam, 20, 28)
    masks = masks.numpy()
    np.testing.assert_allclose(means, masks.mean(axis=(1, 2), dtype=np.float64), rtol=0, atol=1e-12)
    seed = int(np.random.default_rng(6).integers(0, 2**62))
    images = fmix_reference_images(seed, len(lam), 20, 28, 3.0)
    if max_soft == 0:
        assert_top_pixels(masks, images, lam)
        host, _ = FMix().masks(np.random.default_rng(6), lam, 20, 28)
        assert (host != masks).mean() < 1e-4
    else:
        want = np.stack([release_binarise(im, v, max_soft) for im, v in zip(images, lam)])
        assert (np.abs(masks - want) > 1e-6).mean() < 1e-3  # ranks agree but for float32 near-ties


@pytest.mark.parametrize("mode", ["batch", "pair", "elem"])
def test_fmix_device_masks_through_the_mixer_and_kernel(mode):
    mixer = Mixer(methods=[FMix(device="cpu"), CutMix()], mode=mode, num_classes=10)
    images, _ = batch(n=8, h=16, w=12)
    p = mixer.plan(8, rng=np.random.default_rng(3), height=16, width=12)
    assert p.device_masks is not None and all(m is None for m in p.masks)
    rows = p.method == 3
    assert rows.any()
    dm = p.device_masks[:, 0].double()
    np.testing.assert_allclose(dm.mean((1, 2)).numpy()[rows], p.lam[rows], atol=1e-12)
    if mode == "pair":
        np.testing.assert_array_equal(dm[rows].numpy(), dm[p.partner[rows]].numpy())
    out = mix_normalize(images, p.records(), p.mask_pool("cpu"), norm=Normalization(mean=(0, 0, 0), std=(1, 1, 1)))
    x = images.permute(0, 3, 1, 2).double() / 255
    want = dm[:, None] * x + (1 - dm[:, None]) * x[p.partner]
    torch.testing.assert_close(out[rows].double(), want[rows], atol=1e-6, rtol=0)


def test_fmix_device_rejects_coarse_masks_and_a_second_device_method():
    from dalimix.mix import SaliencyMix

    with pytest.raises(ValueError, match="full-resolution"):
        FMix(device="cpu", mask_scale=4)
    with pytest.raises(ValueError, match="torch device"):
        FMix(device="tpu-ish")
    with pytest.raises(ValueError, match="'meta'"):
        FMix(device="meta")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="no CUDA GPU"):
            FMix(device="cuda")
    from dalimix.hook import LearnedMask

    for other in (SaliencyMix(), LearnedMask(), FMix(device="cpu")):
        with pytest.raises(ValueError, match="device masks"):
            Mixer(methods=[FMix(device="cpu"), other])


@pytest.mark.gpu
def test_fmix_device_planner_on_cuda_does_not_sync():
    mixer = Mixer(methods=[FMix(device="cuda")], mode="elem", num_classes=10)
    mixer.plan(8, rng=np.random.default_rng(0), height=32, width=32)  # warm-up: caches, cuFFT plan
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        p = mixer.plan(64, rng=np.random.default_rng(1), height=224, width=224)
        pool = p.mask_pool("cuda")
    finally:
        torch.cuda.set_sync_debug_mode(0)
    assert pool.is_cuda and p.device_ready is not None
    means = p.device_masks[:, 0].double().mean((1, 2)).cpu().numpy()
    np.testing.assert_allclose(means, p.lam, atol=1e-12)


def test_fmix_reformulate_draws_lam_from_beta_alpha_plus_one():
    lam = FMix(alpha=1.0, reformulate=True).draw_lam(np.random.default_rng(0), 3000)
    assert stats.kstest(lam, stats.beta(2.0, 1.0).cdf).pvalue > 1e-3
    assert stats.kstest(lam, stats.beta(1.0, 1.0).cdf).pvalue < 1e-6


def test_resizemix_use_alpha_draws_tau_from_beta_within_scope():
    lo, hi, a = 0.1, 0.8, 2.0
    taus = ResizeMix(scope=(lo, hi), use_alpha=True, alpha=a).draw_lam(np.random.default_rng(0), 4000)
    assert taus.min() >= lo and taus.max() <= hi
    b = stats.beta(a, a)
    out = b.cdf(lo) + b.sf(hi)  # the redrawn share, uniform over the scope

    def cdf(t):
        return b.cdf(t) - b.cdf(lo) + out * (t - lo) / (hi - lo)

    assert stats.kstest(taus, cdf).pvalue > 1e-3
    assert stats.kstest(taus, stats.uniform(lo, hi - lo).cdf).pvalue < 1e-6


def test_resizemix_tau_is_uniform():
    r = ResizeMix(scope=(0.1, 0.8))
    taus = r.draw_lam(np.random.default_rng(0), 2000)
    assert taus.min() >= 0.1 and taus.max() <= 0.8
    assert stats.kstest(taus, stats.uniform(0.1, 0.7).cdf).pvalue > 1e-3


def test_gridmix_and_smoothmix_geometry():
    g = GridMix(n_holes=4)
    p = g.params(3, height=64, width=64, lam=0.5, rng=np.random.default_rng(0))
    assert (p.ints[:, 0] == 16).all()  # patch width ceil(64 / 4)
    assert (p.ints[:, 2] == int(16 * np.sqrt(0.5))).all()
    with pytest.raises(ValueError, match="n_holes=40 does not fit"):
        GridMix(n_holes=40).params(1, height=32, width=32)
    s = SmoothMix().params(50, height=32, width=32, rng=np.random.default_rng(0))
    sigma = np.sqrt(1 / (2 * s.floats.astype(np.float64)))
    assert (sigma >= 0.25 * 32 - 1e-3).all() and (sigma <= 0.5 * 32 + 1e-3).all()


# ---------------------------------------------------------------------- modes, pairing
@pytest.mark.parametrize("n", [1, 2, 5, 8])
@pytest.mark.parametrize("mode", ["batch", "pair", "elem"])
def test_modes(n, mode):
    mixer = Mixer(methods=[MixUp(), CutMix(), FMix(), GridMix(n_holes=2)], mode=mode, num_classes=10)
    p = mixer.plan(n, rng=np.random.default_rng(n), height=16, width=16)
    assert np.array_equal(p.partner, np.arange(n)[::-1])
    if mode == "batch":
        assert len(set(p.kind.tolist())) == 1 and len(set(p.lam.tolist())) == 1
        assert (p.box == p.box[0]).all()
    if mode == "pair":
        for i in range(n // 2):
            j = n - 1 - i
            assert p.kind[i] == p.kind[j] and p.lam[i] == p.lam[j] and (p.box[i] == p.box[j]).all()
            assert p.masks[i] is p.masks[j]
    if n % 2 == 1 and mode == "pair":
        assert p.method[n // 2] == METHOD_NONE
    images, labels = batch(n=n, h=16, w=16, seed=n)
    x, t = mixer(images, labels, params=p)
    assert x.shape == (n, 3, 16, 16) and t.shape == (n, 10)
    torch.testing.assert_close(t.sum(1), torch.ones(n))
    if n % 2 == 1:
        # the middle sample is its own partner: mixing it changes nothing, its target is its label
        mid = n // 2
        torch.testing.assert_close(x[mid], normalised(images)[mid], atol=1e-5, rtol=0)
        assert t[mid].argmax() == labels[mid] and t[mid].max() == pytest.approx(1.0)


def test_elem_mode_mixes_methods_in_one_launch(monkeypatch):
    """A batch mixing all methods per element is one call of the fused op (one kernel launch)."""
    import dalimix.mix.mixer as mm

    calls = []
    real = mm.mix_normalize
    monkeypatch.setattr(mm, "mix_normalize", lambda *a, **k: calls.append(1) or real(*a, **k))
    mixer = Mixer(methods=ALL_METHODS, mode="elem", num_classes=10)
    images, labels = batch(n=32, h=20, w=20)
    p = mixer.plan(32, rng=np.random.default_rng(0), height=20, width=20)
    assert len(set(p.kind.tolist())) >= 5
    mixer(images, labels, params=p)
    assert calls == [1]


def test_pairings():
    rng = np.random.default_rng(0)
    assert pair_indices(5, "flip").tolist() == [4, 3, 2, 1, 0]
    assert pair_indices(5, "roll").tolist() == [4, 0, 1, 2, 3]
    for n in (2, 3, 4, 10, 257):
        for _ in range(20):
            d = pair_indices(n, "derangement", rng)
            assert sorted(d.tolist()) == list(range(n)) and (d != np.arange(n)).all()
            if n >= 3:  # no 2-cycle: no two samples mix the same pair of images
                assert (d[d] != np.arange(n)).all()
    assert pair_indices(1, "derangement", rng).tolist() == [0]
    with pytest.raises(ValueError, match="pairing='zigzag'"):
        pair_indices(3, "zigzag")


def test_prob_leaves_some_unmixed():
    mixer = Mixer(methods=[MixUp()], mode="elem", prob=0.3, num_classes=10)
    p = mixer.plan(2000, rng=np.random.default_rng(0), height=8, width=8)
    frac = (p.method != METHOD_NONE).mean()
    assert 0.25 < frac < 0.35
    assert (p.lam[p.method == METHOD_NONE] == 1).all()


# --------------------------------------------------------------------------- targets
def test_soft_targets_equal_timm_mixup_target():
    from timm.data.mixup import mixup_target

    labels = torch.tensor([3, 1, 4, 1, 5, 9])
    for lam in (1.0, 0.37):
        want = mixup_target(labels, 10, lam, smoothing=0.2)
        got = soft_targets(labels, torch.arange(5, -1, -1), torch.full((6,), lam), 10, 0.2)
        torch.testing.assert_close(got, want)


def test_compact_and_soft_losses_agree():
    torch.manual_seed(0)
    logits = torch.randn(7, 12)
    labels = torch.randint(0, 12, (7,))
    partner = torch.randperm(7)
    lam = torch.rand(7)
    soft = soft_targets(labels, partner, lam, 12, 0.1)
    compact = CompactTargets(labels, labels[partner], lam, 0.1)
    loss = MixCrossEntropy()
    torch.testing.assert_close(loss(logits, compact), loss(logits, soft))
    torch.testing.assert_close(compact.to_soft(12), soft)
    from timm.loss import SoftTargetCrossEntropy

    torch.testing.assert_close(loss(logits, soft), SoftTargetCrossEntropy()(logits, soft))
    torch.testing.assert_close(loss(logits, labels), torch.nn.functional.cross_entropy(logits, labels))


def test_samplepairing_keeps_the_label_and_follows_its_schedule():
    sp = SamplePairing(start_epoch=2, end_epoch=12, on_epochs=3, off_epochs=2)
    assert [sp.is_active(e) for e in range(14)] == [
        False,
        False,
        True,
        True,
        True,
        False,
        False,
        True,
        True,
        True,
        False,
        False,
        False,
        False,
    ]
    mixer = Mixer(methods=[sp], num_classes=10)
    mixer.set_epoch(0)
    assert (mixer.plan(4, rng=np.random.default_rng(0), height=8, width=8).method == METHOD_NONE).all()
    mixer.set_epoch(3)
    p = mixer.plan(4, rng=np.random.default_rng(0), height=8, width=8)
    assert (p.lam == 0.5).all() and (p.target_lam == 1).all()
    images, labels = batch(n=4, h=8, w=8)
    x, t = mixer(images, labels, params=p)
    assert t.argmax(1).tolist() == labels.tolist()
    partner = torch.from_numpy(p.partner)
    assert (partner != torch.arange(4)).all()
    want = normalised(((images.float() + images[partner].float()) / 2).round().to(torch.uint8))
    torch.testing.assert_close(x, want, atol=0.02, rtol=0)  # the reference rounded to uint8; we did not


def _distinct_images(n, size=6, seed=0):
    """n uint8 images of which no two averages of two different pairs coincide (random pixels)."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, size, size, 3), dtype=torch.uint8, generator=g), torch.arange(n) % 10


@pytest.mark.parametrize("pairing", DISTINCT_PAIRINGS)
@pytest.mark.parametrize("mode", ["batch", "elem"])
@pytest.mark.parametrize("n", [3, 4, 5, 8, 9, 16])
def test_samplepairing_never_repeats_an_image_pair(pairing, mode, n):
    """The paper pairs each image with a random other one: no two outputs may be the same image."""
    mixer = Mixer(methods=[SamplePairing(pairing=pairing)], mode=mode, num_classes=10)
    images, labels = _distinct_images(n, seed=n)
    for seed in range(5):
        p = mixer.plan(n, rng=np.random.default_rng(seed), height=6, width=6)
        assert (p.partner != np.arange(n)).all()
        pairs = {frozenset((i, int(j))) for i, j in enumerate(p.partner)}
        assert len(pairs) == n
        x, _ = mixer(images, labels, params=p)
        flat = x.reshape(n, -1)
        assert (torch.cdist(flat, flat) + torch.eye(n) * 1e9).min() > 1e-3


def test_samplepairing_default_pairing_is_distinct_and_flip_stays_selectable():
    n = 6
    images, labels = _distinct_images(n)
    default = Mixer(methods=[SamplePairing()], num_classes=10)  # the mixer's own pairing is "flip"
    p = default.plan(n, rng=np.random.default_rng(0), height=6, width=6)
    assert len({frozenset((i, int(j))) for i, j in enumerate(p.partner)}) == n
    flip = Mixer(methods=[SamplePairing(pairing="flip")], num_classes=10)
    p = flip.plan(n, rng=np.random.default_rng(0), height=6, width=6)
    assert p.partner.tolist() == [5, 4, 3, 2, 1, 0]
    x, _ = flip(images, labels, params=p)
    torch.testing.assert_close(x[0], x[5])  # flip: samples i and n-1-i are one image with two labels
    # in "elem" mode only SamplePairing's rows take its partners; the other methods keep the mixer's
    mixed = Mixer(methods=[MixUp(), SamplePairing()], mode="elem", num_classes=10)
    p = mixed.plan(64, rng=np.random.default_rng(1), height=6, width=6)
    mix_rows = p.kind == 0
    assert (p.partner[mix_rows] == (63 - np.arange(64))[mix_rows]).all()
    assert (p.partner[p.kind == 1] != np.arange(64)[p.kind == 1]).all()
    with pytest.raises(ValueError, match="cannot choose other partners"):
        Mixer(methods=[SamplePairing()], mode="pair")
    assert Mixer(methods=[SamplePairing(pairing="flip")], mode="pair").mode == "pair"


def test_mixup_disabled_gives_smoothed_one_hots():
    mixer = Mixup(mixup_alpha=1.0, cutmix_alpha=1.0, label_smoothing=0.1, num_classes=10)
    mixer.mixup_enabled = False
    images, labels = batch(n=4, h=8, w=8)
    x, t = mixer(images, labels, rng=0)
    torch.testing.assert_close(x, normalised(images))
    assert torch.allclose(t.max(1).values, torch.full((4,), 0.9 + 0.01)) and t.argmax(1).tolist() == labels.tolist()


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda: Mixup(mixup_alpha=0, cutmix_alpha=0), "needs mixup_alpha > 0"),
        (lambda: Mixup(switch_prob=1.5), "switch_prob=1.5"),
        (lambda: Mixup(mode="tile"), "mode='tile'"),
        (lambda: Mixup(prob=-0.1), "prob=-0.1"),
        (lambda: Mixup(label_smoothing=1.0), "label_smoothing=1.0"),
        (lambda: Mixup(cutmix_minmax=(0.9, 0.1)), "cutmix_minmax="),
        (lambda: Mixer(methods=[]), "methods=\\[\\]"),
        (lambda: Mixer(methods=[MixUp()], probs=[0.5]), "probs="),
        (lambda: Mixer(methods=[MixUp()], mode="pair", pairing="roll"), "needs pairing='flip'"),
        (lambda: MixUp(alpha=0), "alpha=0"),
        (lambda: FMix(decay_power=-1), "decay_power"),
        (lambda: FMix(max_soft=0.6), "max_soft=0.6"),
        (lambda: FMix(reformulate="yes"), "reformulate"),
        (lambda: ResizeMix(scope=(0.5, 2)), "scope="),
        (lambda: ResizeMix(interpolation="cubic"), "interpolation="),
        (lambda: SamplePairing(on_epochs=0), "on_epochs=0"),
        (lambda: FMix().params(2, height=8, width=8, mask=np.full((8, 8), 2.0)), "mask values"),
        (lambda: MixUp().params(3, height=8, width=8, partner=[0, 1, 5]), "partner must be 3 indices"),
        (lambda: Mixup(num_classes=3)(*batch(n=4, h=8, w=8)), "labels must be in \\[0, 3\\)"),
    ],
)
def test_arguments_are_validated(make, message):
    with pytest.raises(ValueError, match=message):
        make()


# ----------------------------------------------------------------------------- loader
def test_loader_with_mixer(small_dataset):
    mix = Mixup(mixup_alpha=0.8, cutmix_alpha=1.0, mode="elem", label_smoothing=0.1)
    loader = ImageLoader(
        root=small_dataset, batch_size=6, size=32, device="cpu", mix=mix, seed=4, last_batch_policy="drop"
    )
    assert mix.num_classes == 4 and loader.mixup_enabled
    runs = []
    for _ in range(2):
        loader.set_epoch(0)
        got = []
        for images, targets in loader:
            p = loader.last_batch.params
            labels = torch.from_numpy(loader.dataset.labels[loader.last_batch.sample_ids])
            want = soft_targets(
                labels, torch.from_numpy(p.partner), torch.from_numpy(p.target_lam.astype(np.float32)), 4, 0.1
            )
            torch.testing.assert_close(targets, want)
            got.append((images, targets))
        runs.append(got)
    for (a, ta), (b, tb) in zip(*runs):
        assert torch.equal(a, b) and torch.equal(ta, tb)
    loader.mixup_enabled = False
    images, targets = next(iter(loader))
    assert (loader.last_batch.params.method == METHOD_NONE).all()


def test_loader_plans_each_batch_once_ahead_on_the_planner_thread(small_dataset, monkeypatch):
    """The iterator plans batch step + 1 before it finishes batch step: that plan is the one used,
    made once, on the planner thread (only an epoch's first batch, with nothing before it, is planned
    when it is finished)."""
    import threading

    from dalimix.loader import stages

    made = []
    real = stages.plan_batch

    def spy(mix, seed, shard_id, height, width, n, epoch, step):
        made.append((epoch, step, threading.current_thread().name))
        return real(mix, seed, shard_id, height, width, n, epoch, step)

    monkeypatch.setattr(stages, "plan_batch", spy)
    loader = ImageLoader(root=small_dataset, batch_size=4, size=32, device="cpu", mix=Mixup(), last_batch_policy="drop")
    for epoch in range(2):
        for _ in loader:
            pass
        steps = [(e, s) for e, s, _ in made if e == epoch]
        assert sorted(steps) == [(epoch, s) for s in range(len(loader))], steps  # each batch once
    where = {(e, s): name for e, s, name in made}
    assert where[(0, 0)] == threading.current_thread().name
    assert all(name.startswith("dalimix-planner") for (e, s), name in where.items() if s > 0), where
    loader.close()


def test_loader_replans_a_batch_planned_before_mixing_was_switched_off(small_dataset):
    """timm's --mixup-off-epoch between two batches of an epoch: the batch planned ahead while mixing
    was on is planned again, unmixed."""
    loader = ImageLoader(root=small_dataset, batch_size=4, size=32, device="cpu", mix=Mixup(mixup_alpha=1.0))
    it = iter(loader)
    next(it)  # batch 1 is planned ahead now, with mixing on
    loader.mixup_enabled = False
    for _ in it:
        assert (loader.last_batch.params.method == METHOD_NONE).all()
    loader.close()


def test_loader_with_fmix_planned_on_the_device(small_dataset):
    """FMix(device=...) through the loader (planner thread, mask pool, kernel): each mixed sample is
    its mask's blend of the unmixed batch, the mask's mean is the targets' lam."""
    mix = Mixer(methods=[FMix(device="cpu")], mode="elem")
    loader = ImageLoader(root=small_dataset, batch_size=6, size=32, device="cpu", mix=mix, seed=2, keep_unmixed=True)
    for images, _ in loader:
        b = loader.last_batch
        p = b.params
        m = p.device_masks.double()
        np.testing.assert_allclose(m.mean((1, 2, 3)).numpy()[p.method == 3], p.lam[p.method == 3], atol=1e-12)
        x = b.unmixed.double()
        want = m * x + (1 - m) * x[p.partner]
        rows = torch.from_numpy(p.method == 3)
        torch.testing.assert_close(images.double()[rows], want[rows], atol=1e-5, rtol=0)
        break


def test_loader_rejects_too_few_classes(small_dataset):
    with pytest.raises(ValueError, match="num_classes=2 but the data set has 4 classes"):
        ImageLoader(root=small_dataset, batch_size=4, device="cpu", mix=Mixup(num_classes=2))


def test_mask_pool_of_fmix_masks_is_their_buffer_without_a_copy():
    mixer = Mixer(methods=[FMix(), CutMix()], mode="elem", num_classes=10)
    p = mixer.plan(40, rng=np.random.default_rng(2), height=20, width=24)
    masks = [m for m in p.masks if m is not None]
    pool = p.mask_pool("cpu")
    np.testing.assert_array_equal(pool.numpy(), np.concatenate([m.reshape(-1) for m in masks]))
    assert np.shares_memory(pool.numpy(), masks[0])
    apart = MixParams.unmixed(2)
    apart.masks = [masks[3], masks[1]]  # not back to back: copied, in record order
    np.testing.assert_array_equal(apart.mask_pool("cpu").numpy(), np.concatenate([masks[3].ravel(), masks[1].ravel()]))


def test_kth_smallest_is_np_partition_exactly():
    """The band selection FMix thresholds with, on smooth, tied and adversarial rows (a strided
    sample that sees only the large values: the band misses, the row is partitioned whole)."""
    from dalimix.mix.methods import kth_smallest

    rng = np.random.default_rng(0)
    size = 64 * 80
    rows = [rng.normal(size=size), rng.integers(0, 4, size).astype(np.float64), np.sort(rng.normal(size=size))]
    adversarial = np.zeros(size)
    adversarial[:: size // 1024] = 10.0 + rng.random(len(adversarial[:: size // 1024]))
    rows.append(adversarial)
    flat = np.stack(rows * 3).astype(np.float32)
    kth = np.array([0, size - 1, size // 2, 7, 100, size - 300, 4000, 1, 2500, 0, size - 1, 3333])
    want = np.array([np.partition(r, k)[k] for r, k in zip(flat, kth)])
    np.testing.assert_array_equal(kth_smallest(flat, kth), want)
    small = flat[:, :100].copy()  # short rows take np.partition directly
    np.testing.assert_array_equal(
        kth_smallest(small, kth % 100), [np.partition(r, k % 100)[k % 100] for r, k in zip(small, kth)]
    )


FORK_FMIX = """
import multiprocessing as mp, sys
import numpy as np
import dalimix.mix.methods as methods
from dalimix.mix import FMix

methods._FMIX_CHUNK_PIXELS = 16 * 16 * 2

def child(lam):
    return FMix().masks(np.random.default_rng(1), lam, 16, 16)[0]

if __name__ == "__main__":
    lam = np.full(8, 0.5)
    want, _ = FMix().masks(np.random.default_rng(1), lam, 16, 16)  # the parent's pool is up
    with mp.get_context("fork").Pool(1) as pool:
        got = pool.apply_async(child, (lam,)).get(timeout=60)
    sys.exit(0 if np.array_equal(got, want) else 3)
"""


def test_fmix_plans_in_a_forked_child_after_the_parent_used_its_pool(tmp_path):
    """The parent's planning pool has no threads in a forked child (a DataLoader worker): the child
    builds its own instead of waiting on it forever. The parent is a fresh process: forking the
    test runner itself, with other tests' threads alive, can deadlock on locks unrelated to dalimix."""
    import subprocess
    import sys

    script = tmp_path / "fork_fmix.py"
    script.write_text(FORK_FMIX)
    out = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]


@pytest.mark.parametrize(
    "method, wrong", [(MixUp(), "box"), (CutMix(), "mask"), (FMix(), "box"), (ResizeMix(), "mask")]
)
def test_params_refuses_another_methods_geometry(method, wrong):
    with pytest.raises(TypeError, match=f"{type(method).__name__}.params\\(\\) takes no {wrong}"):
        method.params(2, height=8, width=8, lam=0.5, **{wrong: None})
