"""AutoMix: the Mix Block against a float64 re-derivation, its shapes, the losses and schedules,
gradients only into the Mix Block in its flow, feature taps on torchvision/timm models, and the
whole step on a loader through the mask hook."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from dalimix import ImageLoader
from dalimix.automix import (
    AutoMix,
    FeatureTap,
    MixBlock,
    adjust_to_lam,
    cosine_decay,
    cosine_rise,
    mask_spatial_std,
)


class TinyNet(nn.Module):
    """A 4-stage CNN: stage3 is an N x 32 x H/8 x W/8 feature map."""

    def __init__(self, num_classes=4):
        super().__init__()
        self.stage1 = nn.Sequential(nn.Conv2d(3, 8, 3, 2, 1), nn.BatchNorm2d(8), nn.ReLU())
        self.stage2 = nn.Sequential(nn.Conv2d(8, 16, 3, 2, 1), nn.BatchNorm2d(16), nn.ReLU())
        self.stage3 = nn.Sequential(nn.Conv2d(16, 32, 3, 2, 1), nn.BatchNorm2d(32), nn.ReLU())
        self.stage4 = nn.Sequential(nn.Conv2d(32, 32, 3, 2, 1), nn.ReLU())
        self.fc = nn.Linear(32, num_classes)

    def forward(self, x):
        x = self.stage4(self.stage3(self.stage2(self.stage1(x))))
        return self.fc(x.mean(dim=(2, 3)))


def reference_logits(mb: MixBlock, z: torch.Tensor, lam: np.ndarray, partner: np.ndarray) -> np.ndarray:
    """The Mix Block's formula written out per sample in float64."""
    wq = mb.query.weight.detach().double()[:, :, 0, 0].numpy()
    bq = mb.query.bias.detach().double().numpy()
    wv = mb.value.weight.detach().double()[0, :, 0, 0].numpy()
    bv = float(mb.value.bias.detach())
    n, c, h, w = z.shape
    zz = z.double().numpy().reshape(n, c, h * w)
    out = np.empty((n, h * w))
    for s in range(n):
        xi, xj = zz[s], zz[partner[s]]
        if mb.lam_concat:
            xi = np.concatenate([xi, np.full((1, h * w), lam[s])])
            xj = np.concatenate([xj, np.full((1, h * w), 1 - lam[s])])
        q, k = wq @ xi + bq[:, None], wq @ xj + bq[:, None]
        scores = q.T @ k / math.sqrt(mb.inter_channels)
        p = np.exp(scores - scores.max(1, keepdims=True))
        p /= p.sum(1, keepdims=True)
        if mb.value_from == "own":
            out[s] = p.T @ (wv @ xi + bv)
        else:  # OpenMixup's PixelMixBlock: P v_j is the logit of the partner's weight
            out[s] = -(p @ (wv @ xj + bv))
    return out.reshape(n, 1, h, w)


def openmixup_own_mask(mb: MixBlock, z, lam, partner, size, mode) -> np.ndarray:
    """OpenMixup's PixelMixBlock (value from the partner) in float64: ``mask_lam_ = sigmoid(up(P v_j))``
    is the partner's weight and ``mask[:, 0] = 1 - mask_lam_`` the own image's."""
    partner_logits = -torch.from_numpy(reference_logits(mb, z, lam, partner))
    extra = {} if mode == "nearest" else {"align_corners": False}
    return (1 - torch.sigmoid(F.interpolate(partner_logits, size=size, mode=mode, **extra))).numpy()


@pytest.mark.parametrize("lam_concat", [True, False])
@pytest.mark.parametrize("mode", ["nearest", "bilinear"])
def test_default_mix_block_is_openmixups_pixel_mix_block(lam_concat, mode):
    """The released AutoMix/SAMix configs take the value from the partner; the own image's weight is
    1 - sigmoid(upsample(P v_j)), with or without the lam channel, nearest or bilinear."""
    torch.manual_seed(1)
    n, c, h, w = 4, 6, 3, 5
    mb = MixBlock(c, lam_concat=lam_concat, init_std=0.5)
    assert mb.value_from == "partner" and mb.query.in_channels == c + lam_concat
    nn.init.normal_(mb.value.bias, std=0.3)
    z = torch.randn(n, c, h, w)
    lam = np.random.default_rng(0).random(n)
    partner = np.array([2, 3, 1, 0])
    got = MixBlock.mask(mb(z, torch.from_numpy(lam), torch.from_numpy(partner)), (12, 20), mode)
    np.testing.assert_allclose(
        got.detach().numpy(), openmixup_own_mask(mb, z, lam, partner, (12, 20), mode), rtol=1e-4, atol=1e-5
    )
    am = AutoMix(model=TinyNet(), feature_layer="stage3", input_size=32)
    assert am.mix_block.value_from == "partner" and am.mix_block.lam_concat


@pytest.mark.parametrize("value_from", ["own", "partner"])
@pytest.mark.parametrize("lam_concat", [True, False])
@pytest.mark.parametrize("shape", [(3, 16, 4, 4), (4, 7, 3, 5), (1, 2, 1, 1)])
def test_mix_block_matches_float64_formula(value_from, lam_concat, shape):
    torch.manual_seed(0)
    n, c, h, w = shape
    mb = MixBlock(c, value_from=value_from, lam_concat=lam_concat, init_std=0.5)
    nn.init.normal_(mb.query.bias, std=0.3)
    nn.init.normal_(mb.value.bias, std=0.3)
    z = torch.randn(shape)
    lam = np.random.default_rng(1).random(n)
    partner = np.random.default_rng(2).permutation(n)
    got = mb(z, torch.from_numpy(lam), torch.from_numpy(partner))
    assert got.shape == (n, 1, h, w) and got.dtype == torch.float32
    np.testing.assert_allclose(got.detach().numpy(), reference_logits(mb, z, lam, partner), rtol=1e-4, atol=1e-5)
    # a scalar lam is the same as that lam for every sample
    torch.testing.assert_close(mb(z, 0.3, partner), mb(z, torch.full((n,), 0.3), partner))


def test_mix_block_shapes_and_lam_embedding():
    mb = MixBlock(256)
    assert mb.query.in_channels == 257 and mb.query.out_channels == 128 and mb.value.out_channels == 1
    z = torch.randn(2, 256, 14, 14)  # ResNet-18 stage 3 at 224 px
    with torch.no_grad():
        logits = mb(z, 0.4, [1, 0])
    assert logits.shape == (2, 1, 14, 14)
    mask = MixBlock.mask(logits, (224, 224))
    assert mask.shape == (2, 1, 224, 224)
    torch.testing.assert_close(mask, torch.sigmoid(logits.repeat_interleave(16, 2).repeat_interleave(16, 3)))
    # initial weights N(0, 0.01): the first masks are almost a constant 0.5
    assert abs(float(mask.mean()) - 0.5) < 0.05 and float(mask_spatial_std(logits)) < 0.02
    # lam enters: another lam, other logits
    assert not torch.allclose(mb(z, 0.9, [1, 0]), logits)
    with pytest.raises(ValueError, match="features must be N x 256"):
        mb(torch.zeros(2, 3, 4, 4), 0.5, [1, 0])
    with pytest.raises(ValueError, match="lam must be a float or 2 values"):
        mb(z, [0.1, 0.2, 0.3], [1, 0])
    with pytest.raises(ValueError, match="value_from='v'"):
        MixBlock(4, value_from="v")
    with pytest.raises(ValueError, match="lam_concat=1"):
        MixBlock(4, lam_concat=1)
    with pytest.raises(ValueError, match="mode='cubic'"):
        MixBlock.mask(logits, (4, 4), "cubic")


@pytest.mark.parametrize("mode", ["nearest", "bilinear"])
@pytest.mark.parametrize("size", [(24, 40), (23, 37)])
def test_mask_adjust_rescales_each_mask_to_its_lam(mode, size):
    """OpenMixup's mask_adjust in float64: above lam m * lam / mean, below 1 - (1 - m)(1 - lam)/(1 - mean);
    the kernel's upsampling of the returned logits gives masks of mean lam exactly."""
    torch.manual_seed(0)
    logits = torch.randn(5, 1, 3, 5) * 2
    lam = torch.tensor([0.1, 0.3, 0.5, 0.7, 0.95])
    adjusted = adjust_to_lam(logits, lam, size, mode)
    assert adjusted.shape[-2:] == ((3, 5) if mode == "nearest" else size)
    extra = {} if mode == "nearest" else {"align_corners": False}
    m = torch.sigmoid(F.interpolate(logits.double(), size=size, mode=mode, **extra)).clamp(1e-8, 1 - 1e-8)
    mean = m.mean(dim=(1, 2, 3), keepdim=True)
    lam64 = lam.double().view(-1, 1, 1, 1)
    want = torch.where(mean > lam64, m * lam64 / mean, 1 - (1 - m) * (1 - lam64) / (1 - mean))
    got = torch.sigmoid(F.interpolate(adjusted.double(), size=size, mode=mode, **extra))
    torch.testing.assert_close(got, want, rtol=0, atol=2e-6)
    torch.testing.assert_close(got.mean(dim=(1, 2, 3)), lam.double(), rtol=0, atol=2e-6)


def test_switch_off_skips_the_mix_block_classification_loss_on_schedule():
    am = make_automix(switch_off=1.0)
    clean = torch.randn(4, 3, 32, 32)
    labels = torch.tensor([0, 1, 2, 3])
    feats = am.features(clean)
    calls = []
    am.ema.register_forward_hook(lambda *a: calls.append(1))
    am.update(0.0)  # c = 1: always trained
    flows = [am.mix_block_flow(clean, labels, feats, lam=0.3, partner=[1, 2, 3, 0]) for _ in range(5)]
    assert len(calls) == 5 and all(float(f["loss_mix_block"].detach()) > 0 for f in flows)
    am.update(1.0)  # c = 0: never trained, the mask loss stays
    calls.clear()
    flow = am.mix_block_flow(clean, labels, feats, lam=0.9, partner=[1, 2, 3, 0])
    assert calls == [] and float(flow["loss_mix_block"].detach()) == 0.0
    half = make_automix(switch_off=0.5)
    half.update(0.0)
    half.ema.register_forward_hook(lambda *a: calls.append(1))
    for _ in range(400):
        half.mix_block_flow(clean, labels, feats, lam=0.3, partner=[1, 2, 3, 0])
    assert 150 < len(calls) < 250  # trained with probability switch_off * c = 0.5
    with pytest.raises(ValueError, match="switch_off"):
        make_automix(switch_off=2)
    with pytest.raises(ValueError, match="mask_adjust"):
        make_automix(mask_adjust=-0.1)
    with pytest.raises(ValueError, match="upsampling"):
        make_automix(upsampling="area")


def test_feature_tap_stops_after_the_layer_and_shares_parameters():
    net = TinyNet()
    calls = []
    net.stage4.register_forward_hook(lambda *a: calls.append(1))
    tap = FeatureTap(net, "stage3")
    net.eval()
    x = torch.randn(2, 3, 32, 32)
    feats = tap(x)
    assert feats.shape == (2, 32, 4, 4) and not calls
    torch.testing.assert_close(feats, net.stage3(net.stage2(net.stage1(x))))
    with pytest.raises(
        ValueError, match="feature_layer='layer3' is not a module of TinyNet; its top-level modules are"
    ):
        FeatureTap(net, "layer3")
    with pytest.raises(ValueError, match="outputs .* N x C x h x w"):
        FeatureTap(net, "fc")(torch.randn(2, 3, 32, 32))


@pytest.mark.parametrize(
    "factory, layer, channels",
    [
        ("torchvision.resnet18", "layer3", 256),
        ("timm.resnet10t", "layer3", 256),
        ("timm.convnext_atto", "stages.2", 160),
    ],
)
def test_any_torchvision_or_timm_cnn(factory, layer, channels):
    lib, name = factory.split(".")
    if lib == "torchvision":
        import torchvision

        model = getattr(torchvision.models, name)(num_classes=4)
    else:
        import timm

        model = timm.create_model(name, pretrained=False, num_classes=4)
    am = AutoMix(model=model, feature_layer=layer, input_size=64)
    assert am.mix_block.in_channels == channels
    clean = torch.randn(3, 3, 64, 64)
    logits = am.mask_hook(clean, torch.full((3,), 0.6), torch.tensor([2, 0, 1]))
    assert logits.shape == (3, 1, 4, 4) and not logits.requires_grad  # stage 3 is 1/16 of the input


def make_automix(**kw):
    torch.manual_seed(0)
    return AutoMix(model=TinyNet(), feature_layer="stage3", input_size=32, **kw)


def test_mix_block_flow_gradients_reach_only_the_mix_block():
    am = make_automix()
    clean = torch.randn(4, 3, 32, 32)
    labels = torch.tensor([0, 1, 2, 3])
    flow = am.mix_block_flow(clean, labels, am.features(clean), lam=0.3, partner=[1, 2, 3, 0])
    (flow["loss_mix_block"] + flow["loss_mask"]).backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in am.mix_block.parameters())
    assert all(p.grad is None for p in am.model.parameters())
    assert all(p.grad is None and not p.requires_grad for p in am.ema.parameters())
    # the mixed batch is mask * x_i + (1 - mask) * x_j, and the loss is the EMA model's mixup CE
    mask, partner = flow["mask"].detach(), torch.tensor([1, 2, 3, 0])
    torch.testing.assert_close(flow["mixed"].detach(), mask * clean + (1 - mask) * clean[partner])
    out = am.ema(flow["mixed"].detach())
    want = 0.3 * F.cross_entropy(out, labels) + 0.7 * F.cross_entropy(out, labels[partner])
    torch.testing.assert_close(flow["loss_mix_block"].detach(), want)


def test_mask_loss_and_its_cosine_annealing():
    am = make_automix()
    clean = torch.randn(4, 3, 32, 32)
    feats = am.features(clean)
    with torch.no_grad():  # a mask of mean ~0.5: for lam 0.2 the loss is 0.1 * (|0.5 - 0.2| - 0.1)
        flow = am.mix_block_flow(clean, torch.zeros(4, dtype=torch.long), feats, lam=0.2, partner=[1, 0, 3, 2])
    mean = float(flow["mask"].mean())
    assert float(flow["loss_mask"]) == pytest.approx(0.1 * (abs(mean - 0.2) - 0.1), rel=1e-5)
    with torch.no_grad():  # within the margin: no loss
        assert (
            float(
                am.mix_block_flow(
                    clean, torch.zeros(4, dtype=torch.long), feats, lam=mean - 0.05, partner=[1, 0, 3, 2]
                )["loss_mask"]
            )
            == 0.0
        )
    for progress, weight in [(0.0, 0.1), (0.5, 0.05), (1.0, 0.0)]:
        am.update(progress)
        assert am.mask_loss_weight == pytest.approx(weight, abs=1e-12)
    assert cosine_decay(0.1, 0.25) == pytest.approx(0.1 * (math.cos(math.pi / 4) + 1) / 2)


def test_momentum_schedule_and_ema_update():
    assert cosine_rise(0.999, 0.99999, 0.0) == pytest.approx(0.999)
    assert cosine_rise(0.999, 0.99999, 1.0) == pytest.approx(0.99999)
    assert cosine_rise(0.999, 0.99999, 0.5) == pytest.approx((0.999 + 0.99999) / 2)
    am = make_automix()
    for p in am.model.parameters():
        p.data.add_(1.0)
    before = [p.clone() for p in am.ema.parameters()]
    am.update(0.0)
    assert am.momentum == pytest.approx(0.999)
    for e, b, p in zip(am.ema.parameters(), before, am.model.parameters()):
        torch.testing.assert_close(e, 0.999 * b + 0.001 * p)
    # the feature tap reads the EMA model's (updated) parameters
    x = torch.randn(2, 3, 32, 32)
    am.eval()
    torch.testing.assert_close(am.features(x), am.ema.stage3(am.ema.stage2(am.ema.stage1(x))))


def test_arguments_are_validated():
    with pytest.raises(ValueError, match=r"end_momentum=0.999: a number in \[0.9999, 1\] \(>= momentum\)"):
        make_automix(momentum=0.9999, end_momentum=0.999)
    with pytest.raises(ValueError, match="mixup_margin"):
        make_automix(mixup_margin=0.6)
    with pytest.raises(ValueError, match="alpha"):
        make_automix(alpha=0)
    with pytest.raises(ValueError, match="must be a torch.nn.Module"):
        AutoMix(model="resnet", feature_layer="layer3")


@pytest.mark.parametrize(
    "upsampling, mask_adjust", [("nearest", 0.0), ("bilinear", 0.0), ("nearest", 1.0), ("bilinear", 1.0)]
)
def test_automix_step_on_the_loader(small_dataset, upsampling, mask_adjust):
    am = make_automix(mixup_margin=0.0, upsampling=upsampling, mask_adjust=mask_adjust)
    loader = ImageLoader(root=small_dataset, batch_size=6, size=32, device="cpu", seed=3, mix=am.mixer())
    hook_calls = []
    hook = am.mask_hook

    def counting_hook(images, lam, partner):
        hook_calls.append(images)
        return hook(images, lam, partner)

    am.mask_hook = counting_hook
    am.attach(loader)
    opt = torch.optim.SGD(am.parameters(), lr=0.05)
    before = [p.clone() for p in am.mix_block.parameters()]
    for step, (images, targets) in enumerate(loader):
        info = loader.last_batch
        assert hook_calls[-1] is info.unmixed and len(hook_calls) == step + 1
        p = info.params
        assert np.allclose(p.lam, p.lam[0]) and (p.partner != np.arange(len(p.partner))).all()  # batch lam, deranged
        # the kernel mixed with sigmoid(nearest upsampling) of the hook's (detached) logits
        logits = am.last_hook_logits
        assert not logits.requires_grad
        extra = {} if upsampling == "nearest" else {"align_corners": False}
        m = torch.sigmoid(F.interpolate(logits, size=(32, 32), mode=upsampling, **extra))
        if mask_adjust:  # every backbone mask rescaled to its planned lam
            torch.testing.assert_close(m.mean(dim=(1, 2, 3)), torch.from_numpy(p.lam).float(), rtol=0, atol=1e-5)
        clean = info.unmixed
        torch.testing.assert_close(images, m * clean + (1 - m) * clean[torch.from_numpy(p.partner)], rtol=0, atol=2e-5)
        # targets carry the planned lam (AutoMix's rule), not the mask mean
        assert p.device_target_lam is None
        losses = am(images, targets, info)
        assert set(losses) >= {"loss", "loss_mix", "loss_clean", "loss_mix_block", "loss_mask", "mask_std"}
        assert all(torch.isfinite(v).all() for v in losses.values() if isinstance(v, torch.Tensor))
        opt.zero_grad()
        losses["loss"].backward()
        assert all(q.grad is not None for q in am.model.parameters() if q.requires_grad)
        opt.step()
        am.update((step + 1) / len(loader))
    assert len(hook_calls) == len(loader)
    assert any(not torch.equal(a, b) for a, b in zip(before, am.mix_block.parameters()))
    with pytest.raises(ValueError, match="batch.unmixed/labels are missing"):
        am(images, targets, type("B", (), {"unmixed": None, "labels": None})())


def test_example_runs(small_dataset, tmp_path, capsys):
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))
    from train_automix import main

    out = tmp_path / "masks.png"
    assert (
        main(
            [
                "--data",
                str(small_dataset),
                "--device",
                "cpu",
                "--steps",
                "4",
                "--batch-size",
                "6",
                "--size",
                "32",
                "--out",
                str(out),
            ]
        )
        == 0
    )
    text = capsys.readouterr().out
    assert "mask spatial std" in text and "step    3" in text and out.stat().st_size > 0


@pytest.mark.gpu
def test_automix_step_on_a_cuda_loader(small_dataset):
    torch.manual_seed(0)
    am = AutoMix(model=TinyNet(), feature_layer="stage3", input_size=32).cuda()
    loader = ImageLoader(root=small_dataset, batch_size=6, size=32, device="cuda", seed=3, mix=am.mixer())
    am.attach(loader)
    opt = torch.optim.SGD(am.parameters(), lr=0.05)
    for step, (images, targets) in enumerate(loader):
        info = loader.last_batch
        m = torch.sigmoid(F.interpolate(am.last_hook_logits, size=(32, 32), mode="nearest"))
        if (info.params.method == 3).all():
            clean = info.unmixed
            torch.testing.assert_close(
                images, m * clean + (1 - m) * clean[torch.from_numpy(info.params.partner).cuda()], rtol=0, atol=2e-5
            )
        losses = am(images, targets, info)
        opt.zero_grad()
        losses["loss"].backward()
        opt.step()
        am.update((step + 1) / len(loader))
        assert torch.isfinite(losses["loss"])


def reference_samix_partner_logits(mb: MixBlock, z: torch.Tensor, lam: np.ndarray, partner: np.ndarray) -> np.ndarray:
    """OpenMixup's PixelMixBlock with SAMix's released settings (lam_mul + lam_residual, x_qk_concat,
    a ConvNeck value: conv - BN (eval) - ELU - conv - dropout (eval)) in float64: the logits ``P v_j``
    of the partner's weight."""
    d = lambda t: t.detach().double().numpy()
    wq, bq = d(mb.query.weight)[:, :, 0, 0], d(mb.query.bias)
    wk, bk = d(mb.key.weight)[:, :, 0, 0], d(mb.key.bias)
    conv1, bn, _, conv2, _ = mb.value
    w1, w2 = d(conv1.weight)[:, :, 0, 0], d(conv2.weight)[:, :, 0, 0]
    gamma, beta, mean, var = d(bn.weight), d(bn.bias), d(bn.running_mean), d(bn.running_var)
    n, c, h, w = z.shape
    zz = z.double().numpy().reshape(n, c, h * w)
    out = np.empty((n, h * w))
    for s in range(n):
        xi, xj = zz[s] * (1 + lam[s]), zz[partner[s]] * (1 + (1 - lam[s]))
        both = np.concatenate([xi, xj])
        q, k = wq @ both + bq[:, None], wk @ both + bk[:, None]
        scores = q.T @ k / math.sqrt(mb.inter_channels)
        p = np.exp(scores - scores.max(1, keepdims=True))
        p /= p.sum(1, keepdims=True)
        hid = (w1 @ xj - mean[:, None]) / np.sqrt(var[:, None] + bn.eps) * gamma[:, None] + beta[:, None]
        hid = np.where(hid > 0, hid, np.expm1(hid))
        out[s] = p @ (w2 @ hid)[0]
    return out.reshape(n, 1, h, w)


def test_samix_mix_block_matches_openmixups_released_settings():
    torch.manual_seed(3)
    n, c, h, w = 4, 8, 3, 4
    mb = MixBlock.samix(c, init_std=0.4)
    assert mb.query.in_channels == 2 * c and mb.key is not None and not mb.lam_concat and mb.lam_mul
    bn = mb.value[1]
    bn.running_mean.normal_(0, 0.1)
    bn.running_var.uniform_(0.5, 2.0)
    nn.init.normal_(bn.weight, 1.0, 0.2)
    nn.init.normal_(bn.bias, 0.0, 0.2)
    mb.eval()
    z = torch.randn(n, c, h, w)
    lam = np.random.default_rng(0).random(n)
    partner = np.array([1, 2, 3, 0])
    got = mb(z, torch.from_numpy(lam), torch.from_numpy(partner))
    np.testing.assert_allclose(
        got.detach().numpy(), -reference_samix_partner_logits(mb, z, lam, partner), rtol=1e-4, atol=1e-5
    )
    with pytest.raises(ValueError, match="choose one"):
        MixBlock(c, lam_concat=True, lam_mul=True)


def test_samix_variant_trains_its_mix_block_with_the_variance_mask_loss():
    am = make_automix(variant="samix")
    assert am.mix_block.qk_concat and am.mix_block.lam_mul and isinstance(am.mix_block.value, nn.Sequential)
    clean = torch.randn(4, 3, 32, 32)
    labels = torch.tensor([0, 1, 2, 3])
    flow = am.mix_block_flow(clean, labels, am.features(clean), lam=0.3, partner=[1, 2, 3, 0])
    mask = flow["mask"].detach()
    want = 0.1 * (torch.clamp((mask.mean() - 0.3).abs() - 0.1, min=0) - 2 * mask.var(unbiased=False))
    torch.testing.assert_close(flow["loss_mask"].detach(), want)
    (flow["loss_mix_block"] + flow["loss_mask"]).backward()
    assert all(p.grad is not None for p in am.mix_block.parameters())
    assert all(p.grad is None for p in am.model.parameters())
    with pytest.raises(ValueError, match="variant"):
        make_automix(variant="puzzlemix")


def test_samix_eta_balanced_mix_block_loss():
    """mix_block_loss="eta_balanced": the Mix Block flow classifies its mixed batch with SAMix's
    η-balanced loss (the EMA model's logits, the flow's lam and partners); "ce" (the default) is the
    mixup cross-entropy; gradients still reach only the Mix Block."""
    from dalimix.losses import EtaBalancedMixLoss
    from dalimix.mix import CompactTargets

    clean = torch.randn(4, 3, 32, 32)
    labels = torch.tensor([0, 1, 2, 3])
    partner = [1, 2, 3, 0]
    for loss, eta in (("eta_balanced", 0.5), ("eta_balanced", 1.0), ("ce", 0.5)):
        am = make_automix(variant="samix", mix_block_loss=loss, eta=eta)
        flow = am.mix_block_flow(clean, labels, am.features(clean), lam=0.3, partner=partner)
        with torch.no_grad():
            out = am.ema(flow["mixed"])
        t = CompactTargets(labels, labels[partner], torch.full((4,), 0.3))
        if loss == "ce":
            want = 0.3 * F.cross_entropy(out, labels) + 0.7 * F.cross_entropy(out, labels[partner])
        else:
            want = EtaBalancedMixLoss(eta=eta)(out, t)
        torch.testing.assert_close(flow["loss_mix_block"].detach(), want)
        flow["loss_mix_block"].backward()
        assert all(p.grad is None for p in am.model.parameters())
        assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in am.mix_block.parameters())
    assert make_automix().mix_block_loss == "ce"
    with pytest.raises(ValueError, match="mix_block_loss"):
        make_automix(mix_block_loss="bce")
    with pytest.raises(ValueError, match="eta"):
        make_automix(mix_block_loss="eta_balanced", eta=-0.1)


def test_eta_balanced_step_reads_nothing_back_to_the_host(monkeypatch):
    """The whole step with the η-balanced loss calls no Tensor.item / cpu / tolist / numpy (on CUDA
    each would be a host sync)."""
    am = make_automix(variant="samix", mix_block_loss="eta_balanced")
    clean = torch.randn(4, 3, 32, 32)
    labels = torch.tensor([0, 1, 2, 3])
    feats = am.features(clean)

    def refuse(self, *a, **k):
        raise AssertionError("a host read-back in the training step")

    for name in ("item", "cpu", "tolist", "numpy"):
        monkeypatch.setattr(torch.Tensor, name, refuse)
    flow = am.mix_block_flow(clean, labels, feats, lam=0.4, partner=np.array([1, 2, 3, 0]))
    (flow["loss_mix_block"] + flow["loss_mask"]).backward()
