"""CUDA paths (skipped, with the reason, where torch sees no GPU): the CuPy-compiled kernel against
the CPU backend and the float64 reference, and the loader with nvJPEG decoding."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from reference import random_records, reference_mix_normalize
from test_kernels import CASES, ulp_tolerance

from dalimix import ImageLoader
from dalimix.mix import Mixup
from dalimix.ops import Normalization, mix_normalize
from dalimix.ops.kernels import OUTPUT_TYPES

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
    cuda = mix_normalize(
        torch.from_numpy(images).cuda(),
        records,
        torch.from_numpy(pool).cuda(),
        norm=norm,
        dtype=dtype,
        channels_last=channels_last,
    )
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    assert cuda.is_cuda and cuda.dtype == dtype and cuda.is_contiguous(memory_format=fmt)
    got = cuda.float().cpu().numpy()
    ref = reference_mix_normalize(images, records, pool, norm.mean, norm.std)
    assert not (np.abs(got - ref) > ulp_tolerance(ref, dtype, norm)).any()
    cpu = (
        mix_normalize(
            torch.from_numpy(images),
            records,
            torch.from_numpy(pool),
            norm=norm,
            dtype=dtype,
            channels_last=channels_last,
        )
        .float()
        .numpy()
    )
    assert not (np.abs(got - cpu) > 2 * ulp_tolerance(ref, dtype, norm)).any()


# about 50 ms at 2 GHz: far longer than the host needs to queue the work that follows it
SLEEP_CYCLES = 100_000_000


def test_kernel_runs_on_the_current_stream():
    """A busy side stream writes the input after a sleep; the kernel launched under that stream
    must see the write. Launched on any other stream (the legacy default stream, CuPy's own) it
    would run at once and read the zeros that were there before."""
    src = torch.randint(0, 256, (8, 64, 64, 3), dtype=torch.uint8, device="cuda")
    want = mix_normalize(src)  # compiles the entry: no compilation inside the timed window below
    torch.cuda.synchronize()
    images = torch.zeros_like(src)
    side = torch.cuda.Stream()
    asleep = torch.cuda.Event()
    with torch.cuda.stream(side):
        torch.cuda._sleep(SLEEP_CYCLES)
        asleep.record(side)
        images.copy_(src)
        out = mix_normalize(images)
    launched_while_busy = not asleep.query()
    side.synchronize()
    assert launched_while_busy, "the side stream's sleep ended before the launch: the test proves nothing, sleep longer"
    torch.testing.assert_close(out, want, rtol=0, atol=0)


# ------------------------------------------------------------------- no host sync in the hot path
# fmix_compact: host FMix masks (the staged mask pool) and compact targets (the staged target lam kept
# by the user); saliency: a mask policy of the mixer (the hook stage, saliency's staged constants)
SYNC_PATHS = ["plain", "mixup_cutmix_elem", "fmix_compact", "saliency", "mask_hook", "automix", "policy"]


@pytest.fixture(scope="module")
def eighty_images(tmp_path_factory):
    """80 generated JPEGs (4 classes): 10 batches of 8 per epoch."""
    from dalimix.demo_data import generate

    root = tmp_path_factory.mktemp("eighty")
    generate(root, per_class=20, classes=("bar", "disc", "ring", "star"))
    return root


def _hook(images, lam, partner):
    """A mask hook of plain torch ops: N x 1 x 8 x 8 masks in [0, 1] from the clean images."""
    return torch.sigmoid(images.float().mean(1, keepdim=True)[:, :, ::8, ::8])


def _path(name, root, device="cuda"):
    """(loader, step): a loader for one hot path and what a training step does with its batch."""
    from test_automix import TinyNet

    from dalimix.automix import AutoMix
    from dalimix.hook import LearnedMask
    from dalimix.mix import Mixer
    from dalimix.policy import Policy

    kw = dict(root=root, batch_size=8, size=64, device=device, dtype=torch.bfloat16, channels_last=True, seed=1)
    total = torch.zeros((), device=device)

    def consume(images, targets):
        total.add_(images.float().mean()).add_(targets.float().mean())

    if name == "plain":
        return ImageLoader(**kw), consume
    if name == "mixup_cutmix_elem":
        return ImageLoader(mix=Mixup(mixup_alpha=0.8, cutmix_alpha=1.0, mode="elem", num_classes=4), **kw), consume
    if name == "fmix_compact":
        return ImageLoader(mix=_fmix_compact(), **kw), _consume_compact(total)
    if name == "saliency":
        return ImageLoader(mix=_saliency(), **kw), consume
    if name == "mask_hook":
        loader = ImageLoader(mix=Mixer(methods=[LearnedMask(alpha=1.0)]), **kw)
        loader.set_mask_hook(_hook, validate="deferred")
        return loader, consume
    if name == "policy":
        policy = Policy(sub_policies=[[("hflip", 0.5, None), ("rotate", 0.5, 6)], [("equalize", 0.7, None)]])
        return ImageLoader(auto_augment=policy, mix=Mixup(mixup_alpha=0.8, num_classes=4), **kw), consume
    assert name == "automix"
    torch.manual_seed(0)
    am = AutoMix(model=TinyNet(), feature_layer="stage3", input_size=64).to(device)
    loader = ImageLoader(mix=am.mixer(), **kw)
    am.attach(loader)
    opt = torch.optim.SGD(am.parameters(), lr=0.01)
    steps = [0]

    def train(images, targets):
        with torch.autocast(device, dtype=torch.bfloat16):
            losses = am(images, targets, loader.last_batch)
        opt.zero_grad(set_to_none=True)
        losses["loss"].backward()
        opt.step()
        steps[0] += 1
        am.update(steps[0] / 20)

    return loader, train


def _batches(loader, count):
    """``count`` batches, over as many epochs as it takes."""
    done = 0
    while done < count:
        for batch in loader:
            yield batch
            done += 1
            if done == count:
                return


def _fmix_compact():
    from dalimix.mix import FMix, Mixer, MixUp

    return Mixer(methods=[FMix(alpha=1.0), MixUp(alpha=0.8)], mode="elem", num_classes=4, targets="compact")


def _saliency():
    from dalimix.mix import Mixer, MixUp
    from dalimix.mix.saliency import SaliencyMix

    return Mixer(methods=[SaliencyMix(alpha=1.0), MixUp(alpha=0.8)], mode="elem", num_classes=4)


def _consume_compact(total):
    kept = []  # the compact targets' tensors kept across batches: later batches must not overwrite them

    def consume(images, targets):
        total.add_(images.float().mean()).add_(targets.lam.mean()).add_(targets.y_b.float().mean())
        kept.append((targets.y_a, targets.lam, targets.y_a.clone(), targets.lam.clone()))

    consume.kept = kept
    return consume


def _check_kept(step):
    """The targets kept from every batch still hold their values after all later batches."""
    for y_a, lam, y_copy, lam_copy in getattr(step, "kept", []):
        assert torch.equal(y_a, y_copy) and torch.equal(lam, lam_copy)


STANDALONE_PATHS = [
    "plain",
    "mixup_cutmix_elem",
    "fmix_compact",
    "saliency",
    "fmix_device",
    "mask_hook",
    "automix",
    "samix_eta",
]


def standalone_path(name, device="cuda", n=8, size=64, dtype=torch.bfloat16):
    """``step(i)``: batch ``i`` of one hot path without DALI (uint8 batches made on the device, the
    loader's finishing done by hand: planning, the hook stage, the fused kernel, targets, and for
    AutoMix its training step), so the first GPU call needs no DALI."""
    from types import SimpleNamespace

    from test_automix import TinyNet

    from dalimix.automix import AutoMix
    from dalimix.hook import LearnedMask, MaskHook, MaskHookStage
    from dalimix.mix import Mixer
    from dalimix.ops.record import identity_records

    gen = torch.Generator(device=device).manual_seed(0)
    sources = [
        torch.randint(0, 256, (n, size, size, 3), dtype=torch.uint8, device=device, generator=gen) for _ in range(4)
    ]
    labels = [torch.randint(0, 4, (n,), device=device, generator=gen) for _ in range(4)]
    fmt = dict(dtype=dtype, channels_last=True)
    total = torch.zeros((), device=device)

    def consume(images, targets):
        total.add_(images.float().mean()).add_(targets.float().mean())

    if name == "plain":
        return lambda i: consume(mix_normalize(sources[i % 4], **fmt), labels[i % 4])
    if name == "mixup_cutmix_elem":
        mixer = Mixup(mixup_alpha=0.8, cutmix_alpha=1.0, mode="elem", num_classes=4)
        return lambda i: consume(*mixer(sources[i % 4], labels[i % 4], rng=np.random.default_rng(i), **fmt))
    if name in ("fmix_compact", "saliency"):
        mixer = _fmix_compact() if name == "fmix_compact" else _saliency()
        eat = _consume_compact(total) if name == "fmix_compact" else consume

        def mixed(i):
            eat(*mixer(sources[i % 4], labels[i % 4], rng=np.random.default_rng(i), **fmt))

        mixed.kept = getattr(eat, "kept", [])
        return mixed
    if name == "fmix_device":  # FMix masks planned on the device: no host sync, an event orders the kernel
        from dalimix.mix import FMix

        mixer = Mixer(methods=[FMix(device=device)], mode="elem", num_classes=4)
        return lambda i: consume(*mixer(sources[i % 4], labels[i % 4], rng=np.random.default_rng(i), **fmt))
    am = None
    if name in ("automix", "samix_eta"):
        torch.manual_seed(0)
        extra = dict(variant="samix", mix_block_loss="eta_balanced") if name == "samix_eta" else {}
        am = AutoMix(model=TinyNet(), feature_layer="stage3", input_size=size, **extra).to(device)
        mixer = am.mixer(num_classes=4)
        hook = MaskHook(
            fn=am.mask_hook, interpolation="nearest", logits=True, target_lam="planned", validate="deferred"
        )
        opt = torch.optim.SGD(am.parameters(), lr=0.01)
    else:
        assert name == "mask_hook"
        mixer = Mixer(methods=[LearnedMask(alpha=1.0)], num_classes=4)
        hook = MaskHook(fn=_hook, validate="deferred")
    stage = MaskHookStage(hook, torch.device(device))

    def step(i):
        images_u8, y = sources[i % 4], labels[i % 4]
        unmixed = mix_normalize(images_u8, identity_records(n), None, **fmt)
        params = mixer.plan(n, rng=np.random.default_rng(i), height=size, width=size)
        records, masks = stage.prepare(unmixed, params, epoch=0, step=i)
        images = mix_normalize(images_u8, records, masks, **fmt)
        targets = mixer.targets(y, params, num_classes=4)
        if am is None:
            return consume(images, targets)
        with torch.autocast(device, dtype=dtype):
            losses = am(images, targets, SimpleNamespace(unmixed=unmixed, labels=y))
        step.losses = losses
        opt.zero_grad(set_to_none=True)
        losses["loss"].backward()
        opt.step()
        am.update((i + 1) / 21)

    step.automix = am
    return step


@pytest.mark.parametrize("path", STANDALONE_PATHS)
def test_standalone_twenty_batches_without_a_host_sync(path):
    """Without DALI: after the first batch, 20 batches of each hot path under
    ``torch.cuda.set_sync_debug_mode("error")`` (the loader's version is the next test)."""
    step = standalone_path(path)
    step(0)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for i in range(1, 21):
            step(i)
    finally:
        torch.cuda.set_sync_debug_mode(0)
    torch.cuda.synchronize()
    _check_kept(step)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_standalone_automix_on_half_precision_batches(dtype):
    """Without DALI: AutoMix's hook and step on bf16 / fp16 CUDA batches (a float32 model)."""
    step = standalone_path("automix", dtype=dtype)
    for i in range(3):
        step(i)
        assert all(torch.isfinite(v).all() for v in step.losses.values() if isinstance(v, torch.Tensor))
    am = step.automix
    assert am.last_hook_logits.dtype == torch.float32 and am.last_hook_logits.is_cuda


@pytest.mark.parametrize("path", SYNC_PATHS)
def test_twenty_batches_without_a_host_sync(eighty_images, path):
    """After the first batch, 20 batches (across an epoch boundary) and what the training step does
    with them under ``torch.cuda.set_sync_debug_mode("error")``: any synchronising torch call in
    the loader, the mixing, the hook, the policy stage or AutoMix's step raises."""
    loader, step = _path(path, eighty_images)
    batches = _batches(loader, 21)
    step(*next(batches))  # first batch: compilation, allocations, pipeline start
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for images, targets in batches:
            step(images, targets)
    finally:
        torch.cuda.set_sync_debug_mode(0)
    torch.cuda.synchronize()
    _check_kept(step)


@pytest.mark.parametrize("path", SYNC_PATHS)
def test_next_does_not_wait_for_the_work_queued_since_the_last_batch(eighty_images, path):
    """The host runs ahead of the GPU: with a sleep queued on the stream after batch t, ``next()``
    returns batch t + 1 while the sleep still runs (a sync that torch does not see, in DALI or
    an event wait, would end only after it)."""
    loader, step = _path(path, eighty_images)
    batches = _batches(loader, 4)
    step(*next(batches))
    torch.cuda.synchronize()
    for _ in range(3):
        torch.cuda._sleep(4 * SLEEP_CYCLES)
        asleep = torch.cuda.Event()
        asleep.record()
        images, targets = next(batches)
        returned_while_busy = not asleep.query()
        step(images, targets)
        torch.cuda.synchronize()
        assert returned_while_busy, f"{path}: next() waited for the GPU work queued after the previous batch"


def test_policy_stage_follows_a_busy_stream():
    """The policy stage reads its input and hands out its output in the stream order of the
    consumer: the input is written after a sleep on a side stream, the consumer reads the output
    there, and further batches are applied before the GPU has caught up."""
    from dalimix.policy import Policy, PolicyStage

    stage = PolicyStage(
        Policy(sub_policies=[[("hflip", 1.0, None)]]),
        device=torch.device("cuda"),
        batch_size=4,
        num_threads=2,
        height=32,
        width=32,
    )
    rng = np.random.default_rng(0)
    sources = [torch.randint(0, 256, (4, 32, 32, 3), dtype=torch.uint8, device="cuda") for _ in range(6)]
    torch.cuda.synchronize()
    side = torch.cuda.Stream()
    got = []
    with torch.cuda.stream(side):
        for src in sources:
            images = torch.zeros_like(src)
            torch.cuda._sleep(SLEEP_CYCLES)
            images.copy_(src)
            out, _ = stage.apply(images, rng)
            got.append(out.clone())  # the consumer, queued on the side stream
    side.synchronize()
    stage.close()
    for src, out in zip(sources, got):
        assert torch.equal(out, src.flip(2))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_loader_with_mixing(small_dataset, dtype):
    mix = Mixup(mixup_alpha=0.8, cutmix_alpha=1.0, mode="elem")
    loader = ImageLoader(
        root=small_dataset, batch_size=8, size=64, device="cuda", dtype=dtype, channels_last=True, mix=mix
    )
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
