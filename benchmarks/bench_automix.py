"""AutoMix and the mask path, measured side by side (interleaved repetitions, medians).

1. One AutoMix training step (mask hook: EMA features + Mix Block; backbone, clean and Mix Block
   flows; backward; optimiser step; EMA update) vs one MixUp step (forward, mixup loss, backward,
   optimiser step), same model, same batch.
2. The mask path vs plain MixUp:
   a. the fused kernel alone: MASK records reading hook-style low-res logits (nearest upsampling +
      sigmoid in the kernel) vs BLEND records, same batch (the design's goal on GPU: <= 1.05x);
   b. the whole loader: LearnedMask + a hook returning constant logits (unmixed pass, hook, checks,
      mask copy, mixed pass) vs Mixup(mixup_alpha=1), images/s over whole epochs.

    python benchmarks/bench_automix.py                      # CPU defaults (small sizes, a minute or two)
    python benchmarks/bench_automix.py --device cuda --batch-size 256 --size 224 --model resnet18

CPU timings on a shared machine are noisy: compare the ratios, taken in one run.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

from dalimix import ImageLoader
from dalimix.automix import AutoMix
from dalimix.demo_data import demo_dataset
from dalimix.hook import LearnedMask
from dalimix.losses import MixCrossEntropy
from dalimix.mix import Mixer, MixUp, Mixup
from dalimix.ops import mix_normalize
from dalimix.ops.record import FLAG_SIGMOID


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device) -> float:
    sync(device)
    start = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - start


def interleaved(fns: dict, device, repeats: int) -> dict:
    """Median seconds of each function, run in turn ``repeats`` times after one warm-up each."""
    for fn in fns.values():
        fn()
    times = {k: [] for k in fns}
    for _ in range(repeats):
        for k, fn in fns.items():
            times[k].append(timed(fn, device))
    return {k: statistics.median(v) for k, v in times.items()}


def build_model(name: str, num_classes: int) -> nn.Module:
    if name == "small":
        import sys

        sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))
        from train_automix import small_cnn

        return small_cnn(num_classes)
    import torchvision

    return getattr(torchvision.models, name)(num_classes=num_classes)


class _Batch:
    def __init__(self, unmixed, labels):
        self.unmixed, self.labels = unmixed, labels


def bench_steps(args, device) -> dict:
    torch.manual_seed(0)
    n, size, classes = args.batch_size, args.size, 8
    clean = torch.randn(n, 3, size, size, device=device)
    labels = torch.randint(0, classes, (n,), device=device)
    partner = torch.arange(n, device=device).flip(0)
    lam = torch.full((n,), 0.6, device=device)
    onehot = torch.nn.functional.one_hot(labels, classes).float()
    targets = 0.6 * onehot + 0.4 * onehot[partner]
    mixed = 0.6 * clean + 0.4 * clean[partner]

    plain = build_model(args.model, classes).to(device)
    opt_plain = torch.optim.SGD(plain.parameters(), lr=0.01, momentum=0.9)
    criterion = MixCrossEntropy()
    layer = args.feature_layer
    automix = AutoMix(model=build_model(args.model, classes).to(device), feature_layer=layer, input_size=size).to(
        device
    )
    opt_auto = torch.optim.SGD(automix.parameters(), lr=0.01, momentum=0.9)

    def mixup_step():
        loss = criterion(plain(mixed), targets)
        opt_plain.zero_grad(set_to_none=True)
        loss.backward()
        opt_plain.step()

    def automix_step():
        logits = automix.mask_hook(clean, lam, partner)  # what the loader calls
        m = torch.sigmoid(torch.nn.functional.interpolate(logits, size=(size, size), mode="nearest"))
        images = clean[partner] + m * (clean - clean[partner])  # stands in for the loader's kernel
        losses = automix(images, targets, _Batch(clean, labels))
        opt_auto.zero_grad(set_to_none=True)
        losses["loss"].backward()
        opt_auto.step()
        automix.update(0.5)

    t = interleaved({"mixup_step": mixup_step, "automix_step": automix_step}, device, args.repeats)
    t["automix_over_mixup"] = t["automix_step"] / t["mixup_step"]
    return t


def bench_kernel(args, device) -> dict:
    rng = np.random.default_rng(0)
    n, size = args.batch_size, args.size
    images = torch.from_numpy(rng.integers(0, 256, (n, size, size, 3), dtype=np.uint8)).to(device)
    blend = MixUp().params(n, height=size, width=size, lam=0.6)
    masked = LearnedMask().params(n, height=size, width=size, lam=0.6)
    h = max(1, size // 16)
    masked.device_masks = torch.randn(n, 1, h, h, device=device)
    masked.flags[:] = FLAG_SIGMOID  # logits, nearest upsampling
    rec_blend, rec_mask = blend.records(), masked.records()
    pool = masked.mask_pool(device)
    out = torch.empty(n, 3, size, size, device=device, dtype=torch.float16 if device.type == "cuda" else torch.float32)
    dtype = out.dtype

    def run(records, masks):
        def go():
            for _ in range(args.kernel_inner):
                mix_normalize(images, records, masks, dtype=dtype, out=out)

        return go

    t = interleaved({"kernel_mixup": run(rec_blend, None), "kernel_mask": run(rec_mask, pool)}, device, args.repeats)
    t = {k: v / args.kernel_inner for k, v in t.items()}
    t["kernel_mask_over_mixup"] = t["kernel_mask"] / t["kernel_mixup"]
    t["mask_shape"] = f"{h}x{h} -> {size}x{size}, sigmoid"
    return t


def bench_loader(args, device) -> dict:
    root = args.data or demo_dataset(progress=True)
    kw = dict(root=root, batch_size=args.batch_size, size=args.size, device=device, seed=0, last_batch_policy="drop")
    plain = ImageLoader(mix=Mixup(mixup_alpha=1.0, label_smoothing=0.0), **kw)
    hooked = ImageLoader(mix=Mixer(methods=[LearnedMask(alpha=2.0)]), **kw)
    h = max(1, args.size // 16)
    hooked.set_mask_hook(
        lambda images, lam, partner: torch.zeros(images.shape[0], 1, h, h, device=images.device), logits=True
    )
    count = len(plain) * args.batch_size

    def epoch(loader):
        def go():
            for images, targets in loader:
                pass

        return go

    t = interleaved({"loader_mixup": epoch(plain), "loader_mask_hook": epoch(hooked)}, device, args.loader_repeats)
    out = {"loader_mixup_img_s": count / t["loader_mixup"], "loader_mask_hook_img_s": count / t["loader_mask_hook"]}
    out["loader_mask_hook_time_over_mixup"] = t["loader_mask_hook"] / t["loader_mixup"]
    plain.close()
    hooked.close()
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--model", default="small", help="'small' (examples/train_automix.py's CNN) or a torchvision model")
    p.add_argument("--feature-layer", default="layer3")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--size", type=int, default=64)
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--kernel-inner", type=int, default=3, help="kernel launches per timing")
    p.add_argument("--loader-repeats", type=int, default=3, help="epochs per loader timing")
    p.add_argument("--data", help="ImageFolder root for the loader part (default: the demo data set)")
    p.add_argument("--skip", nargs="*", default=[], choices=["steps", "kernel", "loader"])
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    p.add_argument("--save", action="store_true", help="also write benchmarks/results/<date>-automix-<device>.json")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    result = {
        "device": str(device),
        "model": args.model,
        "batch_size": args.batch_size,
        "size": args.size,
        "torch_threads": torch.get_num_threads(),
    }
    if device.type == "cuda":
        result["gpu"] = torch.cuda.get_device_name(device)
    for name, fn in (("steps", bench_steps), ("kernel", bench_kernel), ("loader", bench_loader)):
        if name not in args.skip:
            part = fn(args, device)
            result.update(part)
            for k, v in part.items():
                print(
                    f"{k:36s} {v * 1000:10.2f} ms"
                    if isinstance(v, float) and not k.endswith(("_over_mixup", "img_s"))
                    else f"{k:36s} {v:10.3f}"
                    if isinstance(v, float)
                    else f"{k:36s} {v}",
                    flush=True,
                )
    if args.save:
        out = Path(__file__).parent / "results" / f"{time.strftime('%Y-%m-%d')}-automix-{device.type}.json"
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(result, indent=2) + "\n")
        print(f"saved {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
