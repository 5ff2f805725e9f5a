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
from dalimix.automix import AutoMix, FeatureTap, MixBlock, cosine_decay, cosine_rise, mask_spatial_std


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
        xi = np.concatenate([zz[s], np.full((1, h * w), lam[s])])
        xj = np.concatenate([zz[partner[s]], np.full((1, h * w), 1 - lam[s])])
        q, k = wq @ xi + bq[:, None], wq @ xj + bq[:, None]
        scores = q.T @ k / math.sqrt(mb.inter_channels)
        p = np.exp(scores - scores.max(1, keepdims=True))
        p /= p.sum(1, keepdims=True)
        if mb.value_from == "own":
            out[s] = p.T @ (wv @ xi + bv)
        else:
            out[s] = p @ (wv @ xj + bv)
    return out.reshape(n, 1, h, w)


@pytest.mark.parametrize("value_from", ["own", "partner"])
@pytest.mark.parametrize("shape", [(3, 16, 4, 4), (4, 7, 3, 5), (1, 2, 1, 1)])
def test_mix_block_matches_float64_formula(value_from, shape):
    torch.manual_seed(0)
    n, c, h, w = shape
    mb = MixBlock(c, value_from=value_from, init_std=0.5)
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
    with pytest.raises(ValueError, match="feature_layer='layer3' is not a module of TinyNet; its top-level modules are"):
        FeatureTap(net, "layer3")
    with pytest.raises(ValueError, match="outputs .* N x C x h x w"):
        FeatureTap(net, "fc")(torch.randn(2, 3, 32, 32))


@pytest.mark.parametrize("factory, layer, channels", [
    ("torchvision.resnet18", "layer3", 256),
    ("timm.resnet10t", "layer3", 256),
    ("timm.convnext_atto", "stages.2", 160),
])
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
        assert float(am.mix_block_flow(clean, torch.zeros(4, dtype=torch.long), feats, lam=mean - 0.05,
                                       partner=[1, 0, 3, 2])["loss_mask"]) == 0.0
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


def test_automix_step_on_the_loader(small_dataset):
    am = make_automix(mixup_margin=0.0)
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
        m = torch.sigmoid(F.interpolate(logits, size=(32, 32), mode="nearest"))
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
    assert main(["--data", str(small_dataset), "--device", "cpu", "--steps", "4", "--batch-size", "6", "--size", "32",
                 "--out", str(out)]) == 0
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
            torch.testing.assert_close(images, m * clean + (1 - m) * clean[torch.from_numpy(info.params.partner).cuda()],
                                       rtol=0, atol=2e-5)
        losses = am(images, targets, info)
        opt.zero_grad()
        losses["loss"].backward()
        opt.step()
        am.update((step + 1) / len(loader))
        assert torch.isfinite(losses["loss"])
