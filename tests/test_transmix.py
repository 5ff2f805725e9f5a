"""TransMix: the re-weighted lam against a hand-computed case and the official formula, the box at
token resolution, the attention recorder on a timm ViT, and targets from a loader batch."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from dalimix import ImageLoader
from dalimix.mix import (
    CompactTargets,
    CutMix,
    FMix,
    GridMix,
    Mixer,
    MixUp,
    Mixup,
    ResizeMix,
    SamplePairing,
    SmoothMix,
    one_hot_smoothed,
)
from dalimix.mix.params import MixParams
from dalimix.transmix import (
    ClsAttention,
    own_weight_maps,
    reweighted_lam,
    reweighted_targets,
    token_box_mask,
    transmix_lam,
    transmix_targets,
)
from tests.reference import reference_mix_normalize


def cutmix_params(n, h, w, box, partner="flip"):
    return CutMix().params(n, height=h, width=w, lam=0.5, box=box, partner=partner)


def test_hand_computed_case():
    """4x4 image, 2x2 tokens, the partner's box on the top-left token: area 4/16, attention
    [0.4, 0.1, 0.3, 0.2] -> partner weight (0.25 + 0.4) / 2 = 0.325, own lam 0.675."""
    p = cutmix_params(2, 4, 4, (0, 0, 2, 2))
    attn = torch.tensor([[0.4, 0.1, 0.3, 0.2], [0.1, 0.1, 0.1, 0.7]])
    lam = transmix_lam(p, attn, height=4, width=4)
    torch.testing.assert_close(lam, torch.tensor([0.675, 1 - (0.25 + 0.1) / 2]))
    # unnormalised attention (the class token's own share left out) gives the same ratio
    torch.testing.assert_close(transmix_lam(p, attn * 0.8, height=4, width=4), lam)
    # targets: own label weight lam, partner's 1 - lam
    labels = torch.tensor([0, 2])
    t = transmix_targets(labels, p, attn, num_classes=3, height=4, width=4)
    torch.testing.assert_close(t, torch.tensor([[0.675, 0.0, 0.325], [1 - 0.825, 0.0, 0.825]]))
    c = transmix_targets(labels, p, attn, num_classes=3, height=4, width=4, form="compact", smoothing=0.1)
    assert isinstance(c, CompactTargets) and c.smoothing == 0.1
    torch.testing.assert_close(
        c.to_soft(3), transmix_targets(labels, p, attn, num_classes=3, height=4, width=4, smoothing=0.1)
    )


def test_box_at_token_resolution_follows_nearest_resizing():
    """A box not aligned to the patches: token (ty, tx) is covered iff the pixel nearest resizing
    samples for it is in the box — exactly the official nn.Upsample(size=grid) of the pixel mask."""
    rng = np.random.default_rng(0)
    for _ in range(20):
        h, w = int(rng.integers(8, 40)), int(rng.integers(8, 40))
        gh, gw = int(rng.integers(1, 9)), int(rng.integers(1, 9))
        y0, y1 = np.sort(rng.integers(0, h + 1, 2))
        x0, x1 = np.sort(rng.integers(0, w + 1, 2))
        p = cutmix_params(1, h, w, (y0, x0, y1, x1))
        pixel = torch.zeros(1, 1, h, w)
        pixel[..., y0:y1, x0:x1] = 1
        want = F.interpolate(pixel, size=(gh, gw), mode="nearest")[0, 0]
        torch.testing.assert_close(token_box_mask(p, (gh, gw), height=h, width=w)[0], want)


def official_lam(box, attn, h, w, grid):
    """The official transmix_label arithmetic (box = (y0, y1, x0, x1) showing the flipped partner):
    returns the partner's weight."""
    yl, yh, xl, xh = box
    lam0 = (yh - yl) * (xh - xl) / (h * w)
    mask = torch.zeros(h, w)
    mask[yl:yh, xl:xh] = 1
    mask = F.interpolate(mask[None, None], size=grid, mode="nearest").int().view(1, -1).repeat(len(attn), 1)
    w1, w2 = torch.sum((1 - mask) * attn, dim=1), torch.sum(mask * attn, dim=1)
    return (lam0 + w2 / (w1 + w2)) / 2


def test_matches_the_official_formula_and_orientation():
    torch.manual_seed(0)
    n, h, w, grid = 6, 32, 32, (4, 4)
    box = (5, 23, 8, 30)
    attn = torch.rand(n, 16)
    p = cutmix_params(n, h, w, (box[0], box[2], box[1], box[3]), partner="flip")
    own = transmix_lam(p, attn, height=h, width=w)
    torch.testing.assert_close(own, 1 - official_lam(box, attn, h, w, grid))
    # official target = y1 * (1 - lam) + y2 * lam with y2 the flipped batch
    labels = torch.arange(n) % 3
    y1 = one_hot_smoothed(labels, 3, 0.1)
    lam = official_lam(box, attn, h, w, grid)[:, None]
    torch.testing.assert_close(
        transmix_targets(labels, p, attn, num_classes=3, height=h, width=w, smoothing=0.1),
        y1 * (1 - lam) + y1.flip(0) * lam,
    )


def test_only_cutmix_samples_are_reweighted():
    p = MixParams.unmixed(3, ("mixup", "cutmix"))
    MixUp()._fill_explicit(p, np.array([0]), np.array([0.7]), rng=None, height=8, width=8)
    CutMix()._fill_explicit(p, np.array([1]), np.array([0.5]), rng=None, height=8, width=8, box=(0, 0, 4, 8))
    p.partner = np.array([2, 0, 1])
    attn = torch.tensor([[1.0, 0.0, 0.0, 0.0]] * 3)
    lam = transmix_lam(p, attn, height=8, width=8)
    torch.testing.assert_close(
        lam, torch.tensor([np.float32(0.7), 1 - (0.5 + 1.0) / 2, 1.0])
    )  # attention all in the box
    assert token_box_mask(p, (2, 2), height=8, width=8)[[0, 2]].sum() == 0


def test_bad_attention_is_refused():
    p = cutmix_params(2, 8, 8, (0, 0, 4, 4))
    with pytest.raises(ValueError, match="attention must be N x T with N = 2"):
        transmix_lam(p, torch.rand(3, 4), height=8, width=8)
    with pytest.raises(ValueError, match="5 patch tokens do not form a square grid"):
        transmix_lam(p, torch.rand(2, 5), height=8, width=8)
    with pytest.raises(ValueError, match=r"grid=\(2, 3\) has 6 tokens but the attention has 4"):
        transmix_lam(p, torch.rand(2, 4), height=8, width=8, grid=(2, 3))
    with pytest.raises(ValueError, match="is not a timm VisionTransformer"):
        ClsAttention(torch.nn.Linear(2, 2))


def small_vit(**kw):
    from timm.models.vision_transformer import VisionTransformer

    torch.manual_seed(0)
    return VisionTransformer(img_size=32, patch_size=8, embed_dim=48, depth=2, num_heads=3, num_classes=4, **kw)


@pytest.mark.parametrize("reg_tokens", [0, 2])
def test_cls_attention_recorder_on_a_timm_vit(reg_tokens):
    vit = small_vit(reg_tokens=reg_tokens).eval()
    x = torch.randn(3, 3, 32, 32)
    want_logits = vit(x)
    captured = {}
    attn_mod = vit.blocks[-1].attn
    handle = attn_mod.register_forward_pre_hook(lambda m, args: captured.setdefault("x", args[0]))
    rec = ClsAttention(vit)
    with rec:
        logits = vit(x)
    handle.remove()
    assert attn_mod.fused_attn == type(attn_mod)(48, num_heads=3).fused_attn  # restored
    torch.testing.assert_close(logits, want_logits, rtol=1e-4, atol=1e-5)  # fused vs explicit attention
    # recompute the last block's attention by hand from its input
    t = captured["x"]
    b, n, c = t.shape
    qkv = attn_mod.qkv(t).reshape(b, n, 3, 3, c // 3).permute(2, 0, 3, 1, 4)
    q, k = qkv[0], qkv[1]
    probs = torch.softmax(q @ k.transpose(-2, -1) * attn_mod.scale, dim=-1)
    prefix = 1 + reg_tokens
    torch.testing.assert_close(rec.attention, probs[:, :, 0, prefix:].mean(1))
    assert rec.grid == (4, 4) and rec.attention.shape == (3, 16) and not rec.attention.requires_grad


def test_transmix_on_a_loader_batch(small_dataset):
    mix = Mixup(mixup_alpha=0.8, cutmix_alpha=1.0, switch_prob=0.5, mode="elem", label_smoothing=0.1)
    loader = ImageLoader(root=small_dataset, batch_size=10, size=32, device="cpu", mix=mix, seed=1)
    vit = small_vit().train()
    rec = ClsAttention(vit)
    images, targets = next(iter(loader))
    with rec:
        logits = vit(images)
    info = loader.last_batch
    p = info.params
    boxed = p.method == 2
    assert boxed.any() and (~boxed).any()
    t = transmix_targets(
        info.labels, p, rec.attention, num_classes=4, height=32, width=32, grid=rec.grid, smoothing=0.1
    )
    torch.testing.assert_close(t[~torch.from_numpy(boxed)], targets[~torch.from_numpy(boxed)])  # MixUp rows unchanged
    lam = transmix_lam(p, rec.attention, height=32, width=32, grid=rec.grid)
    mask = token_box_mask(p, rec.grid, height=32, width=32).flatten(1)
    for i in np.flatnonzero(boxed):
        a = rec.attention[i]
        want = 1 - ((1 - p.lam[i]) + float((mask[i] * a).sum() / a.sum())) / 2  # correct_lam: 1 - lam = box area
        assert float(lam[i]) == pytest.approx(want, abs=1e-6)
    loss = torch.sum(-t * torch.log_softmax(logits, -1), -1).mean()
    loss.backward()  # the targets carry no gradient; the loss trains the ViT
    assert vit.head.weight.grad is not None and not t.requires_grad


def test_example_runs(small_dataset, capsys):
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))
    from train_transmix import main

    assert (
        main(["--data", str(small_dataset), "--device", "cpu", "--steps", "6", "--batch-size", "6", "--size", "32"])
        == 0
    )
    text = capsys.readouterr().out
    assert "clean-image accuracy" in text and "step    5" in text


# ------------------------------------------------ re-weighting for any method and weighting


def reference_own_maps(params, h, w):
    """Own-image weight per pixel in float64: the reference mix of an all-ones batch with a zero partner."""
    n = params.n
    probe = np.ones((n + 1, h, w, 3), np.uint8)
    probe[n] = 0
    rec = params.records()
    rec["partner"] = n
    pool = params.mask_pool("cpu")
    out = reference_mix_normalize(probe, rec, None if pool is None else pool.numpy(), (0, 0, 0), (1 / 255,) * 3)
    return out[:, 0]


ANY_METHODS = [
    MixUp(),
    CutMix(),
    FMix(mask_scale=3),
    ResizeMix(),
    GridMix(n_holes=(2, 4)),
    SmoothMix(),
    SamplePairing(),
]


@pytest.mark.parametrize("size, grid", [((32, 32), (4, 4)), ((30, 45), (5, 3))])
def test_reweighting_any_method_matches_the_float64_reference(size, grid):
    h, w = size
    n = 28
    p = Mixer(methods=ANY_METHODS, mode="elem", prob=0.9).plan(n, rng=np.random.default_rng(5), height=h, width=w)
    own = own_weight_maps(p, height=h, width=w)
    want = reference_own_maps(p, h, w)
    np.testing.assert_allclose(own.numpy(), want, atol=1e-6)
    # the pixel share is the method's own lam (exact for every method)
    mixed = p.method != 0
    np.testing.assert_allclose(want.mean(axis=(1, 2))[mixed & (p.kind != 6)], p.lam[mixed & (p.kind != 6)], atol=1e-6)
    torch.manual_seed(0)
    attn = torch.rand(n, grid[0] * grid[1])
    a = torch.rand(n)
    lam = reweighted_lam(p, attn, height=h, width=w, grid=grid, attention_weight=a)
    # float64 reference: token share = mean of the own map over the token's pixels (adaptive pooling bins)
    frac = np.empty((n,) + grid)
    for ty in range(grid[0]):
        ys = slice((ty * h) // grid[0], -(-((ty + 1) * h) // grid[0]))
        for tx in range(grid[1]):
            xs = slice((tx * w) // grid[1], -(-((tx + 1) * w) // grid[1]))
            frac[:, ty, tx] = want[:, ys, xs].mean(axis=(1, 2))
    att = attn.double().numpy()
    lam_att = (frac.reshape(n, -1) * att).sum(1) / att.sum(1)
    ref = (1 - a.double().numpy()) * want.mean(axis=(1, 2)) + a.double().numpy() * lam_att
    keep = ~mixed | (p.kind == 6)  # unmixed and SamplePairing samples keep their lam (1: the label stays)
    ref[keep] = p.target_lam[keep]
    np.testing.assert_allclose(lam.numpy(), ref, atol=1e-5)
    assert (lam.numpy()[p.kind == 6] == 1).all()


def test_reweighting_hook_masks_and_special_cases():
    """Hook masks on the device count too; a = 0 gives the pixel share, N x rows x cols weights work,
    and the TransMix settings on CutMix give transmix_lam."""
    n, h, w = 4, 16, 16
    p = MixParams.unmixed(n, ("learned",))
    p.method[:] = 3  # METHOD_MASK from the hook
    p.partner = np.array([1, 2, 3, 0])
    p.lam[:] = p.target_lam[:] = 0.5
    masks = torch.rand(n, 1, 4, 4)
    p.device_masks = masks
    attn = torch.rand(n, 4, 4)
    lam0 = reweighted_lam(p, attn, height=h, width=w, attention_weight=0.0)
    torch.testing.assert_close(lam0, masks.mean(dim=(1, 2, 3)), atol=1e-6, rtol=0)
    lam1 = reweighted_lam(p, attn, height=h, width=w, attention_weight=1.0)  # 4x4 tokens = the mask cells
    want = (masks[:, 0] * attn).sum((1, 2)) / attn.sum((1, 2))
    torch.testing.assert_close(lam1, want, atol=1e-6, rtol=0)
    t = reweighted_targets(torch.arange(n), p, attn, num_classes=4, height=h, width=w, attention_weight=1.0)
    torch.testing.assert_close(t.diagonal(), want, atol=1e-6, rtol=0)
    c = cutmix_params(3, 20, 20, (2, 3, 13, 17))
    att = torch.rand(3, 25)
    torch.testing.assert_close(
        reweighted_lam(c, att, height=20, width=20, tokens="nearest"), transmix_lam(c, att, height=20, width=20)
    )
    with pytest.raises(ValueError, match="attention_weight"):
        reweighted_lam(c, att, height=20, width=20, attention_weight=1.5)
    with pytest.raises(ValueError, match="tokens='box'"):
        reweighted_lam(c, att, height=20, width=20, tokens="box")


@pytest.mark.gpu
def test_reweighting_after_the_forward_pass_waits_for_nothing_on_cuda():
    """On CUDA, TransMix's and the general re-weighting's targets (float and N-value host
    attention_weight, both target forms) run under set_sync_debug_mode("error") after a warm-up,
    and agree with the CPU."""
    n, h, w, grid = 12, 32, 32, (4, 4)
    p = Mixer(methods=ANY_METHODS, mode="elem", prob=0.9).plan(n, rng=np.random.default_rng(7), height=h, width=w)
    attn = torch.rand(n, grid[0] * grid[1], generator=torch.Generator().manual_seed(1))
    labels = torch.arange(n) % 4
    a_host = np.linspace(0, 1, n)
    want = reweighted_targets(labels, p, attn, num_classes=4, height=h, width=w, grid=grid, attention_weight=a_host)
    attn_d, labels_d = attn.cuda(), labels.cuda()

    def run():
        out = reweighted_targets(
            labels_d, p, attn_d, num_classes=4, height=h, width=w, grid=grid, attention_weight=a_host
        )
        transmix_targets(labels_d, p, attn_d, num_classes=4, height=h, width=w, grid=grid, form="compact")
        return out

    run()
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        got = run()
    finally:
        torch.cuda.set_sync_debug_mode(0)
    torch.testing.assert_close(got.cpu(), want, atol=1e-5, rtol=0)
