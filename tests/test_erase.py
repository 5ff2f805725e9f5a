"""Random erasing on the batch (dalimix.erase): a float64 reference, timm's statistics, the loader's stream."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from dalimix import ImageLoader
from dalimix.erase import RandomErasing, from_timm


def reference(images: torch.Tensor, eraser: RandomErasing, plan) -> torch.Tensor:
    """Per sample, per box in drawing order, the fill written into a float64 copy (timm's loop)."""
    out = images.double().clone()
    n, c, h, w = out.shape
    noise = None
    if eraser.mode == "pixel":
        gen = torch.Generator().manual_seed(plan.seed)
        noise = torch.randn((n, c, h, w), generator=gen, dtype=torch.float32).to(images.dtype).double()
    for i in range(n):
        for k, (top, left, bh, bw) in enumerate(plan.boxes[i]):
            if bh == 0 or bw == 0:
                continue
            region = (i, slice(None), slice(top, top + bh), slice(left, left + bw))
            if eraser.mode == "const":
                out[region] = 0
            elif eraser.mode == "rand":
                out[region] = torch.from_numpy(plan.colors[i, k]).to(images.dtype).double()[:, None, None]
            else:
                out[region] = noise[region]
    return out


@pytest.mark.parametrize("mode", ["const", "rand", "pixel"])
@pytest.mark.parametrize(
    "dtype, channels_last", [(torch.float32, False), (torch.float16, True), (torch.bfloat16, False)]
)
def test_matches_the_float64_reference(mode, dtype, channels_last):
    eraser = RandomErasing(probability=0.7, mode=mode, max_count=3)
    rng = np.random.default_rng(5)
    images = torch.randn(16, 3, 23, 31).to(dtype)
    if channels_last:
        images = images.contiguous(memory_format=torch.channels_last)
    plan = eraser.plan(16, 3, 23, 31, rng)
    assert plan.boxes[..., 2:].any(-1).sum() >= 8  # boxes were drawn, some overlap-capable
    want = reference(images, eraser, plan)
    got = eraser.apply(images.clone(), plan)
    assert got.dtype == dtype and got.shape == images.shape
    assert got.is_contiguous(memory_format=torch.channels_last) == channels_last
    torch.testing.assert_close(got.double(), want, rtol=0, atol=0)


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
    """Erased share of samples, erased area and (one box) log aspect ratio: dalimix's draws against
    timm's RandomErasing on the same sizes, within 4 standard errors."""
    n, h, w = 3000, 24, 40
    theirs = _timm_boxes(n, h, w, probability=0.4, max_count=count)
    eraser = RandomErasing(probability=0.4, mode="const", max_count=count)
    ours = eraser(torch.ones(n, 3, h, w), np.random.default_rng(1))[:, 0] == 0
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


def test_loader_erases_reproducibly_after_mixing(small_dataset):
    from dalimix.mix import Mixup

    def batches(seed):
        loader = ImageLoader(
            root=small_dataset,
            batch_size=5,
            size=24,
            device="cpu",
            seed=seed,
            num_threads=1,
            mix=Mixup(),
            erasing=RandomErasing(probability=1.0, mode="const"),
        )
        return [x.clone() for x, _ in loader]

    a, b, c = batches(3), batches(3), batches(4)
    assert all(torch.equal(x, y) for x, y in zip(a, b)) and not all(torch.equal(x, y) for x, y in zip(a, c))
    # every sample has an erased (all-zero across channels) box
    assert all(((x == 0).all(1).flatten(1).any(1)).all() for x in a)
    with pytest.raises(ValueError, match="train=True"):
        ImageLoader(root=small_dataset, batch_size=5, train=False, erasing=RandomErasing())
