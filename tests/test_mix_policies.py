"""Mask policies: SaliencyMix and AttentiveMix against float64 references of their papers'
definitions (and OpenMixup's rules where those leave a choice), named like any method in a
mixer and a loader, previewable."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from dalimix import ImageLoader
from dalimix.cli import main
from dalimix.mix import AttentiveMix, Mixer, MixUp, SaliencyMix, spectral_residual
from dalimix.ops import Normalization
from tests.reference import resample

PLAIN = Normalization(mean=(0, 0, 0), std=(1, 1, 1))


def reference_spectral_residual(img: np.ndarray) -> np.ndarray:
    """Hou & Zhang's spectral residual in float64, OpenCV's steps: img H x W x 3 on the 0..1 scale."""
    h, w, _ = img.shape
    grey = img.astype(np.float64) @ np.array([0.299, 0.587, 0.114])
    small = resample(grey[:, :, None], 64, 64, bilinear=True)[:, :, 0]
    spec = np.fft.fft2(small)
    amp = np.maximum(np.abs(spec), 1e-20)
    log_amp = np.log(amp)
    padded = np.pad(log_amp, 1, mode="reflect")  # reflect-101
    box = sum(padded[dy : dy + 64, dx : dx + 64] for dy in range(3) for dx in range(3)) / 9
    back = np.abs(np.fft.ifft2(np.exp(log_amp - box) * spec / amp))
    x = np.arange(5) - 2.0
    g = np.exp(-x * x / 128.0)
    g /= g.sum()
    padded = np.pad(back, 2, mode="reflect")
    rows = sum(g[k] * padded[:, k : k + 64] for k in range(5))
    smooth = sum(g[k] * rows[k : k + 64, :] for k in range(5))
    return resample((smooth**2)[:, :, None], h, w, bilinear=True)[:, :, 0]


def openmixup_box(peak_y: int, peak_x: int, lam: float, h: int, w: int):
    """The official SaliencyMix / OpenMixup ``saliency_bbox`` for a given peak (rows, then columns)."""
    cut = np.sqrt(1.0 - lam)
    cut_h, cut_w = int(h * cut), int(w * cut)
    return (
        int(np.clip(peak_y - cut_h // 2, 0, h)),
        int(np.clip(peak_x - cut_w // 2, 0, w)),
        int(np.clip(peak_y + cut_h // 2, 0, h)),
        int(np.clip(peak_x + cut_w // 2, 0, w)),
    )


def images(n, h, w, seed=0):
    g = torch.Generator().manual_seed(seed)
    u8 = torch.randint(0, 256, (n, h, w, 3), dtype=torch.uint8, generator=g)
    # a bright blob per image so the saliency has a clear peak
    for i in range(n):
        y, x = int(torch.randint(4, h - 4, (1,), generator=g)), int(torch.randint(4, w - 4, (1,), generator=g))
        u8[i] //= 4
        u8[i, y - 3 : y + 3, x - 3 : x + 3] = 255
    return u8


@pytest.mark.parametrize("size", [(48, 64), (37, 53), (128, 96)])
def test_spectral_residual_matches_float64_reference(size):
    h, w = size
    u8 = images(3, h, w, seed=h)
    x = u8.permute(0, 3, 1, 2).float() / 255
    got = spectral_residual(x).numpy().astype(np.float64)
    for i in range(3):
        want = reference_spectral_residual(u8[i].numpy() / 255.0)
        np.testing.assert_allclose(got[i] / want.max(), want / want.max(), atol=2e-4)
        assert np.unravel_index(got[i].argmax(), (h, w)) == np.unravel_index(want.argmax(), (h, w))
    # normalised input with its Normalization gives the same map as the 0..1 pixels
    norm = Normalization()
    mean, std = torch.tensor(norm.mean).view(1, 3, 1, 1), torch.tensor(norm.std).view(1, 3, 1, 1)
    torch.testing.assert_close(
        spectral_residual((x - mean) / std, norm=norm), spectral_residual(x), rtol=1e-3, atol=1e-6
    )


def test_saliency_peak_finds_a_salient_object():
    g = torch.Generator().manual_seed(0)
    u8 = (torch.rand(1, 64, 64, 3, generator=g) * 60 + 60).to(torch.uint8)  # a textured background
    u8[0, 40:46, 10:16] = 250
    sal = spectral_residual(u8.permute(0, 3, 1, 2).float() / 255)[0]
    y, x = divmod(int(sal.argmax()), 64)
    assert 37 <= y <= 48 and 7 <= x <= 18


@pytest.mark.parametrize("shared_box", [False, True])
@pytest.mark.parametrize("size", [(48, 64), (37, 53)])
def test_saliencymix_against_the_float64_reference(size, shared_box):
    h, w = size
    n = 5
    u8, labels = images(n, h, w, seed=w), torch.arange(n)
    mix = Mixer(methods=[SaliencyMix(shared_box=shared_box)], mode="elem", num_classes=10)
    p = mix.plan(n, rng=np.random.default_rng(1), height=h, width=w)
    lam32 = p.lam.astype(np.float32).astype(np.float64)  # the hook receives float32
    out, targets = mix(u8, labels, params=p, norm=PLAIN)
    src = u8.numpy().astype(np.float64)
    for i in range(n):
        j = int(p.partner[i])
        ref_i = 0 if shared_box else i
        ref_j = int(p.partner[ref_i])
        sal = reference_spectral_residual(src[ref_j] / 255.0)
        py, px = np.unravel_index(sal.argmax(), (h, w))
        y0, x0, y1, x1 = openmixup_box(py, px, lam32[ref_i], h, w)
        want = src[i].copy()
        want[y0:y1, x0:x1] = src[j, y0:y1, x0:x1]  # the partner's salient region at the same place
        np.testing.assert_allclose(out[i].permute(1, 2, 0).numpy() * 255, want, atol=1e-3)
        lam = 1 - (y1 - y0) * (x1 - x0) / (h * w)
        assert float(targets[i, labels[i]]) == pytest.approx(lam, abs=1e-6) or j == i
        assert float(targets[i, labels[j]]) == pytest.approx(1 - lam, abs=1e-6) or j == i


def fake_features(grids):
    """features(images) -> the given N x 1 x h x w grids (the attention maps of the test)."""
    return lambda x: grids.to(x.device)


@pytest.mark.parametrize("patches_from", ["partner", "own"])
@pytest.mark.parametrize("top_k", [6, 1, None])
def test_attentivemix_against_the_float64_reference(patches_from, top_k):
    n, h, w, g = 6, 28, 35, (4, 5)
    torch.manual_seed(0)
    att = torch.rand(n, 2, *g)
    policy = AttentiveMix(features=fake_features(att), top_k=top_k, patches_from=patches_from, alpha=1.0)
    mix = Mixer(methods=[policy], mode="elem", num_classes=10, pairing="roll")
    u8, labels = images(n, h, w), torch.arange(n)
    p = mix.plan(n, rng=np.random.default_rng(2), height=h, width=w)
    out, targets = mix(u8, labels, params=p, norm=PLAIN)
    src = u8.numpy().astype(np.float64)
    score = att.double().mean(1).numpy().reshape(n, -1)
    cells = g[0] * g[1]
    for i in range(n):
        j = int(p.partner[i])
        scored = score[j] if patches_from == "partner" else score[i]
        if top_k is None:  # OpenMixup's AttentiveMix+: k from lam
            share = 1 - np.float32(p.lam[i]) if patches_from == "partner" else np.float32(p.lam[i])
            k = min(max(int(cells * np.float64(share)), 1), cells)
        else:
            k = top_k
        top = np.argsort(-scored, kind="stable")[:k]
        cell_mask = np.zeros(cells)
        cell_mask[top] = 1
        own = 1 - cell_mask if patches_from == "partner" else cell_mask
        mask = resample(own.reshape(g)[:, :, None], h, w, bilinear=False)  # nearest, the kernel's rule
        want = mask * src[i] + (1 - mask) * src[j]
        np.testing.assert_allclose(out[i].permute(1, 2, 0).numpy() * 255, want, atol=1e-3)
        assert float(targets[i, labels[i]]) == pytest.approx(mask.mean(), abs=1e-6)


def test_a_mixer_takes_one_policy_and_validates():
    net = lambda x: x
    with pytest.raises(ValueError, match="one mask policy"):
        Mixer(methods=[SaliencyMix(), AttentiveMix(features=net)])
    with pytest.raises(ValueError, match="features=None"):
        AttentiveMix()
    with pytest.raises(ValueError, match="top_k=0"):
        AttentiveMix(features=net, top_k=0)
    with pytest.raises(ValueError, match="patches_from='both'"):
        AttentiveMix(features=net, patches_from="both")
    with pytest.raises(ValueError, match="shared_box"):
        SaliencyMix(shared_box="yes")
    bad = Mixer(methods=[AttentiveMix(features=lambda x: x[:, :1, 0])], num_classes=4)
    with pytest.raises(ValueError, match="N x C x h x w"):
        bad(images(2, 16, 16), torch.arange(2), rng=0)


def test_policies_are_named_like_any_method_on_a_loader(small_dataset):
    """The mixer registers the policy's hook: no set_mask_hook call; other methods mix as before."""
    loader = ImageLoader(
        root=small_dataset,
        batch_size=8,
        size=48,
        device="cpu",
        seed=0,
        mix=Mixer(methods=[MixUp(), SaliencyMix()], mode="elem"),
    )
    for _, (x, t) in zip(range(2), loader):
        info = loader.last_batch
        p = info.params
        sal = p.kind == 1
        assert info.unmixed is not None
        torch.testing.assert_close(t.sum(1), torch.ones(len(t)))
        if sal.any():
            masks = p.device_masks[torch.from_numpy(sal)]
            assert masks.shape[-2:] == (48, 48) and set(masks.unique().tolist()) <= {0.0, 1.0}
            clean, partner = info.unmixed, torch.from_numpy(p.partner)
            m = p.device_masks
            want = m * clean + (1 - m) * clean[partner]
            torch.testing.assert_close(x[torch.from_numpy(sal)], want[torch.from_numpy(sal)], atol=2e-5, rtol=0)
            lam = p.device_target_lam[torch.from_numpy(sal)]
            torch.testing.assert_close(lam, masks.mean(dim=(1, 2, 3)), atol=1e-6, rtol=0)
    loader.close()


@pytest.mark.parametrize("name", ["saliencymix", "attentivemix"])
def test_preview(small_dataset, tmp_path, capsys, name):
    out = tmp_path / f"{name}.png"
    assert (
        main(
            [
                "preview",
                "--mix",
                name,
                "--data",
                str(small_dataset),
                "--size",
                "64",
                "--batch-size",
                "4",
                "--device",
                "cpu",
                "--out",
                str(out),
            ]
        )
        == 0
    )
    assert out.exists() and f"{name}: 4 samples" in capsys.readouterr().out
