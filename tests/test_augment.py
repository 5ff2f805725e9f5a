"""timm's train-time augmentations inside DALI (dalimix.augment), checked exactly where they can be."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from dalimix import ImageLoader
from dalimix.augment import Augment, _timm_ops, jitter_factors


def _batches(root, **kw):
    """uint8-scale batches (mean 0, std 1/255 scale: values are the DALI uint8 pixels), fixed crops."""
    loader = ImageLoader(
        root=root,
        batch_size=10,
        size=24,
        device="cpu",
        seed=4,
        hflip=0.0,
        num_threads=1,
        mean=(0, 0, 0),
        std=(1 / 255, 1 / 255, 1 / 255),
        **kw,
    )
    out = torch.cat([x.clone() for x, _ in loader])
    loader.close()
    return out


@pytest.fixture(scope="module")
def plain(small_dataset):
    return _batches(small_dataset)


def test_vflip_and_grayscale_are_exact(small_dataset, plain):
    flipped = _batches(small_dataset, augment=Augment(vflip=1.0))
    assert torch.equal(flipped, plain.flip(2))  # the same crops, flipped upside down
    grey = _batches(small_dataset, augment=Augment(grayscale_prob=1.0))
    assert torch.equal(grey[:, 0], grey[:, 1]) and torch.equal(grey[:, 1], grey[:, 2])
    luma = (plain * torch.tensor([0.299, 0.587, 0.114])[:, None, None]).sum(1)
    assert (grey[:, 0] - luma).abs().max() <= 1.0  # PIL's "L" within a grey level
    half = _batches(small_dataset, augment=Augment(grayscale_prob=0.5))
    is_grey = (half[:, 0] == half[:, 1]).flatten(1).all(1) & (half[:, 1] == half[:, 2]).flatten(1).all(1)
    assert 0 < int(is_grey.sum()) < 20 and torch.equal(half[~is_grey], plain[~is_grey])


def test_random_interpolation_draws_bilinear_or_bicubic_per_sample(small_dataset):
    mixed = _batches(small_dataset, augment=Augment(random_interpolation=True))
    lin = _batches(small_dataset, interpolation="bilinear")
    cub = _batches(small_dataset, interpolation="bicubic")
    is_lin = (mixed == lin).flatten(1).all(1)
    is_cub = (mixed == cub).flatten(1).all(1)
    assert (is_lin | is_cub).all() and is_lin.any() and is_cub.any()


def test_brightness_jitter_scales_each_image_by_one_factor(small_dataset, plain):
    out = _batches(small_dataset, augment=Augment(color_jitter=(0.4, 0, 0, 0)))
    factors = []
    for x, p in zip(out, plain):
        ok = (p > 40) & (x < 250)
        ratio = x[ok] / p[ok]
        assert ratio.max() - ratio.min() < 2.5 / 40  # one factor, up to rounding
        factors.append(ratio.median().item())
    assert 0.6 - 0.02 <= min(factors) and max(factors) <= 1.4 + 0.02 and np.std(factors) > 0.05


def test_full_jitter_blur_and_3a_change_images_reproducibly(small_dataset, plain):
    aug = Augment(color_jitter=(0.4, 0.4, 0.4, 0.1), gaussian_blur_prob=1.0)
    a, b = _batches(small_dataset, augment=aug), _batches(small_dataset, augment=aug)
    assert torch.equal(a, b) and (a != plain).flatten(1).any(1).all()
    blurred = _batches(small_dataset, augment=Augment(gaussian_blur_prob=1.0))
    tv = lambda x: (x[..., 1:] - x[..., :-1]).abs().flatten(1).mean(1)  # noqa: E731
    assert (tv(blurred) <= tv(plain)).all() and int((tv(blurred) < tv(plain)).sum()) >= 14  # sigma 0.1: ~unchanged
    three = _batches(small_dataset, auto_augment="3a")
    solarized = torch.where(plain >= 128, 255 - plain, plain)
    kinds = [
        (
            "solarize"
            if torch.equal(x, s)
            else "grey"
            if torch.equal(x[0], x[1]) and torch.equal(x[1], x[2])
            else "blur"
            if tv(x[None]) <= tv(p[None])
            else "?"
        )
        for x, s, p in zip(three, solarized, plain)
    ]
    assert "?" not in kinds and len(set(kinds)) == 3


def test_randaugment_layer_probability_and_noise(small_dataset, plain):
    assert torch.equal(_batches(small_dataset, auto_augment="rand-m9-p0"), plain)  # no layer runs
    a = _batches(small_dataset, auto_augment="rand-m9-mstd0.5-inc1")
    assert torch.equal(a, _batches(small_dataset, auto_augment="rand-m9-mstd0.5-inc1"))
    changed = (a != plain).flatten(1).any(1)
    assert 5 <= int(changed.sum()) <= 20  # p = 0.5 per layer, 2 layers: ~3/4 changed


def test_augmix_blends_chains_with_the_original(small_dataset, plain):
    """AugMix output: reproducible, changed, and a blend — never further from the original than the
    full 0..255 range allows, on average well inside it (lam ~ Beta(1, 1))."""
    a = _batches(small_dataset, auto_augment="augmix")
    assert torch.equal(a, _batches(small_dataset, auto_augment="augmix"))
    diff = (a - plain).abs().flatten(1).mean(1)
    assert (diff > 0).sum() >= 18 and diff.mean() < 40


@pytest.mark.parametrize("increasing", [False, True])
def test_operation_parameters_are_timms_level_functions(increasing, monkeypatch):
    """Each operation's parameter at a magnitude level is what timm's LEVEL_TO_ARG gives (signs fixed)."""
    from timm.data import auto_augment as taa

    monkeypatch.setattr(taa, "_randomly_negate", lambda v: v)
    ops = _timm_ops(increasing, 0.45)
    suffix = "Increasing" if increasing else ""
    for level in (0.0, 2.5, 7.0, 9.0, 10.0):
        for name, conv in [
            ("Rotate", float),
            ("ShearX", lambda p: float(p[0])),
            ("TranslateXRel", lambda p: float(p[0])),
            ("SolarizeAdd", int),
            ("Solarize" + suffix, int),
            ("Color" + suffix, float),
            ("Contrast" + suffix, float),
            ("Brightness" + suffix, float),
        ]:
            want = taa.LEVEL_TO_ARG[name](level, {"translate_pct": 0.45})[0]
            got = conv(ops[name]._map_mag_to_param(np.float32(level)))
            assert got == pytest.approx(want, rel=1e-5, abs=1e-5), (name, level)
        bits = taa.LEVEL_TO_ARG["Posterize" + suffix](level, {})[0]
        mask = int(ops["Posterize" + suffix]._map_mag_to_param(np.float32(level)))
        assert mask == (0xFF ^ ((1 << (8 - bits)) - 1) if bits < 8 else 0xFF)


def test_jitter_factors_follow_timm():
    assert jitter_factors(0.4) == (0.4, 0.4, 0.4, 0.0)
    assert jitter_factors((0.1, 0.2, 0.3)) == (0.1, 0.2, 0.3, 0.0)
    assert jitter_factors(0) is None and jitter_factors(None) is None
    for bad in (-0.1, (0.1, 0.2), (0.1, 0.1, 0.1, 0.7)):
        with pytest.raises(ValueError, match="color_jitter"):
            jitter_factors(bad)
    with pytest.raises(ValueError, match="train=True"):
        ImageLoader(root="/nonexistent", batch_size=2, train=False, augment=Augment(vflip=0.5))


@pytest.mark.gpu
def test_augmentations_build_and_run_on_the_gpu(small_dataset):
    """The same graph pieces with DALI's GPU operators: every Augment field, 3a and timm RandAugment."""
    aug = Augment(
        vflip=0.5,
        color_jitter=(0.4, 0.4, 0.4, 0.1),
        color_jitter_prob=0.8,
        grayscale_prob=0.2,
        gaussian_blur_prob=0.5,
        random_interpolation=True,
    )
    for aa in (None, "3a", "rand-m9-mstd0.5-inc1"):
        loader = ImageLoader(
            root=small_dataset, batch_size=10, size=24, device="cuda", seed=4, augment=aug, auto_augment=aa
        )
        a = torch.cat([x.clone() for x, _ in loader])
        b = torch.cat(
            [
                x.clone()
                for x, _ in loader.__class__(
                    root=small_dataset, batch_size=10, size=24, device="cuda", seed=4, augment=aug, auto_augment=aa
                )
            ]
        )
        assert a.is_cuda and torch.isfinite(a).all() and torch.equal(a, b)
