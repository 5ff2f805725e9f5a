"""AutoMix with a half-precision loader (``dtype=torch.bfloat16 / float16``, the usual GPU setting):
the mask hook runs the float32 EMA encoder outside the training step's autocast, and the Mix Block
keeps its float32 math under autocast. On CPU and, where there is one, on a GPU."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from test_automix import TinyNet

from dalimix import ImageLoader
from dalimix.automix import AutoMix

HALF = [torch.bfloat16, torch.float16]
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)]
# two roundings of the loader's output dtype on values of magnitude <= ~2.7 (normalised pixels):
# the reference mixes the unmixed batch, itself rounded to the dtype, and the kernel's output is
# rounded once more (the kernel mixes the uint8 pixels, so its own error is one rounding)
ATOL = {torch.bfloat16: 2 * 2.7 * 2**-8, torch.float16: 2 * 2.7 * 2**-11}


def _automix(device):
    torch.manual_seed(0)
    return AutoMix(model=TinyNet(), feature_layer="stage3", input_size=32, mixup_margin=0.0).to(device)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", HALF, ids=["bf16", "fp16"])
def test_automix_step_on_a_half_precision_loader(small_dataset, dtype, device):
    am = _automix(device)
    loader = ImageLoader(root=small_dataset, batch_size=6, size=32, device=device, seed=3, dtype=dtype, mix=am.mixer())
    am.attach(loader)
    opt = torch.optim.SGD(am.parameters(), lr=0.05)
    before = [p.clone() for p in am.mix_block.parameters()]
    steps = 0
    for step, (images, targets) in enumerate(loader):  # the hook raised MaskHookError at batch 0 before
        info = loader.last_batch
        assert images.dtype == dtype and info.unmixed.dtype == dtype
        logits = am.last_hook_logits
        assert logits.dtype == torch.float32 and torch.isfinite(logits).all()
        # the hook's logits are those of the float32 encoder on the loader's (rounded) clean batch
        clean = info.unmixed
        partner = torch.from_numpy(info.params.partner).to(device)
        lam = torch.from_numpy(info.params.lam.astype("float32")).to(device)
        with torch.no_grad():
            ref = am.mix_block(am._tap(clean.float()), lam, partner)
        torch.testing.assert_close(logits, ref, rtol=1e-5, atol=1e-6)
        # and the kernel mixed the batch with sigmoid(nearest upsampling) of them
        m = torch.sigmoid(F.interpolate(logits, size=(32, 32), mode="nearest"))
        c = clean.float()
        torch.testing.assert_close(images.float(), m * c + (1 - m) * c[partner], rtol=0, atol=ATOL[dtype])
        with torch.autocast(device, dtype=dtype):
            losses = am(images, targets, info)
        assert all(torch.isfinite(v).all() for v in losses.values() if isinstance(v, torch.Tensor))
        opt.zero_grad()
        losses["loss"].backward()
        assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in am.mix_block.parameters())
        opt.step()
        am.update((step + 1) / len(loader))
        steps += 1
    assert steps == len(loader)
    assert any(not torch.equal(a, b) for a, b in zip(before, am.mix_block.parameters()))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", HALF, ids=["bf16", "fp16"])
def test_mix_block_flow_stays_float32_under_autocast(dtype, device):
    """Under the training step's autocast the Mix Block flow computes the same float32 mask as
    without it (the hook computes it in float32 too)."""
    am = _automix(device)
    torch.manual_seed(1)
    clean = torch.randn(4, 3, 32, 32, device=device).to(dtype)
    labels = torch.tensor([0, 1, 2, 3], device=device)
    feats = am.features(clean)
    assert feats.dtype == torch.float32
    kw = dict(lam=0.3, partner=[1, 0, 3, 2])
    plain = am.mix_block_flow(clean.float(), labels, feats, **kw)  # a float32 EMA takes float32 images
    with torch.autocast(device, dtype=dtype):
        auto = am.mix_block_flow(clean, labels, feats, **kw)
    assert auto["logits"].dtype == torch.float32 and auto["mask"].dtype == torch.float32
    torch.testing.assert_close(auto["logits"], plain["logits"], rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(auto["mask"], plain["mask"], rtol=1e-6, atol=1e-7)
    assert auto["mixed"].dtype == dtype
