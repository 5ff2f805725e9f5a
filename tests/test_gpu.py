"""CUDA paths (skipped, with the reason, where torch sees no GPU): the CuPy-compiled kernel against
the CPU backend and the float64 reference, and the loader with nvJPEG decoding."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from dalimix import ImageLoader
from dalimix.mix import Mixup
from dalimix.ops import Normalization, mix_normalize
from dalimix.ops.kernels import OUTPUT_TYPES
from reference import random_records, reference_mix_normalize
from test_kernels import CASES, ulp_tolerance

pytestmark = pytest.mark.gpu


@pytest.mark.parametrize("dtype", list(OUTPUT_TYPES))
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
@pytest.mark.parametrize("case", CASES + [(64, 224, 224, 64)], ids=lambda c: "n%d_%dx%d" % (c[3], c[1], c[2]))
def test_cuda_kernel_matches_reference_and_cpu(dtype, channels_last, case):
    n_src, h, w, n = case
    n_src = max(n_src, n)
    rng = np.random.default_rng(n * 1000 + h)
    norm = Normalization()
    images = rng.integers(0, 256, (n_src, h, w, 3), dtype=np.uint8)
    records, pool = random_records(rng, n, n_src, h, w)
    cuda = mix_normalize(torch.from_numpy(images).cuda(), records, torch.from_numpy(pool).cuda(), norm=norm,
                         dtype=dtype, channels_last=channels_last)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    assert cuda.is_cuda and cuda.dtype == dtype and cuda.is_contiguous(memory_format=fmt)
    got = cuda.float().cpu().numpy()
    ref = reference_mix_normalize(images, records, pool, norm.mean, norm.std)
    assert not (np.abs(got - ref) > ulp_tolerance(ref, dtype, norm)).any()
    cpu = mix_normalize(torch.from_numpy(images), records, torch.from_numpy(pool), norm=norm, dtype=dtype,
                        channels_last=channels_last).float().numpy()
    assert not (np.abs(got - cpu) > 2 * ulp_tolerance(ref, dtype, norm)).any()


def test_kernel_runs_on_the_current_stream():
    images = torch.randint(0, 256, (8, 64, 64, 3), dtype=torch.uint8, device="cuda")
    side = torch.cuda.Stream()
    with torch.cuda.stream(side):
        out = mix_normalize(images)
    side.synchronize()
    torch.testing.assert_close(out, mix_normalize(images))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_loader_with_mixing(small_dataset, dtype):
    mix = Mixup(mixup_alpha=0.8, cutmix_alpha=1.0, mode="elem")
    loader = ImageLoader(root=small_dataset, batch_size=8, size=64, device="cuda", dtype=dtype, channels_last=True, mix=mix)
    seen = []
    kept = []
    for images, targets in loader:
        assert images.is_cuda and targets.is_cuda and images.dtype == dtype
        assert torch.isfinite(images.float()).all()
        torch.testing.assert_close(targets.sum(1), torch.ones(len(targets), device="cuda"))
        seen += loader.last_batch.sample_ids.tolist()
        kept.append(images)  # the loader never writes into a batch it handed out
    assert sorted(seen) == list(range(20))
    first = kept[0].clone()
    for _ in loader:
        pass
    torch.testing.assert_close(kept[0], first)


def test_cuda_and_cpu_eval_agree(small_dataset):
    """nvJPEG and the CPU decoder differ by rounding: eval batches agree closely on average."""
    kw = dict(root=small_dataset, batch_size=20, size=64, train=False)
    gpu = next(iter(ImageLoader(device="cuda", **kw)))[0].cpu()
    cpu = next(iter(ImageLoader(device="cpu", **kw)))[0]
    assert (gpu - cpu).abs().mean() < 0.05
