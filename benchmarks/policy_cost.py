"""What exact-timing policies cost: the same AutoAugment ImageNet policy run inline in the prefetched
DALI pipeline (``auto_augment="original"``: DALI draws the sub-policies, uniformly) and as a
``dalimix.policy.Policy`` (drawn on the host when the batch is asked for, applied by the second,
non-prefetched DALI pipeline), next to no augmentation. Runs are interleaved; prints images/s.

    python benchmarks/policy_cost.py --device cpu --size 64 --batch-size 32 --rounds 3
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time

import torch


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", help="ImageFolder root (default: the demo data set)")
    ap.add_argument("--device", default=None, choices=["cpu", "cuda"])
    ap.add_argument("--size", type=int, default=64)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--rounds", type=int, default=3, help="interleaved epochs per variant")
    ap.add_argument(
        "--repeat",
        type=int,
        default=8,
        help="list every file this many times (a file list), so an epoch is long enough that the per-epoch "
        "pipeline build does not dominate",
    )
    ap.add_argument(
        "--consume-ms",
        type=float,
        default=0.0,
        help="simulated training step per batch (sleep), so prefetching has something to hide behind",
    )
    args = ap.parse_args()

    from nvidia.dali.auto_aug.auto_augment import get_image_net_policy

    from dalimix import ImageLoader
    from dalimix.demo_data import demo_dataset
    from dalimix.policy import Policy
    from dalimix.sources import scan_image_folder

    root = args.data or str(demo_dataset(progress=True))
    listing = tempfile.NamedTemporaryFile("w", suffix=".txt", delete=False)
    samples = scan_image_folder(root)
    for _ in range(args.repeat):
        for path, label in zip(samples.paths, samples.labels):
            listing.write(f"{path} {label}\n")
    listing.close()
    variants = {
        "no augmentation": None,
        "preset 'original' (inline, prefetched)": "original",
        "Policy, ImageNet AA (exact timing, 2nd stage)": Policy.from_dali(
            get_image_net_policy(use_shape=True, max_translate_rel=0.45)
        ),
    }
    loaders = {
        name: ImageLoader(
            file_list=listing.name,
            batch_size=args.batch_size,
            size=args.size,
            device=args.device,
            auto_augment=aa,
            last_batch_policy="drop",
        )
        for name, aa in variants.items()
    }
    sync = torch.cuda.synchronize if next(iter(loaders.values())).device.type == "cuda" else (lambda: None)
    stage_ms: list[float] = []
    policy_loader = loaders["Policy, ImageNet AA (exact timing, 2nd stage)"]
    apply_policy = policy_loader._apply_policy

    def timed_apply(*a, **kw):  # the time the policy stage adds to next(), not hidden by prefetching
        t = time.perf_counter()
        out = apply_policy(*a, **kw)
        sync()
        stage_ms.append((time.perf_counter() - t) * 1000)
        return out

    policy_loader._apply_policy = timed_apply
    for loader in loaders.values():  # warm-up: builds the pipelines (and the policy stage)
        for _ in loader:
            pass
    stage_ms.clear()
    rates = {name: [] for name in loaders}
    for _ in range(args.rounds):
        for name, loader in loaders.items():
            n = 0
            t0 = time.perf_counter()
            for images, _labels in loader:
                n += images.shape[0]
                if args.consume_ms:
                    time.sleep(args.consume_ms / 1000)
            sync()
            rates[name].append(n / (time.perf_counter() - t0))
    dev = next(iter(loaders.values())).device
    print(
        f"device {dev}, {len(samples) * args.repeat} samples per epoch, {args.size}x{args.size}, batch {args.batch_size}, consume {args.consume_ms} ms/batch, "
        f"{args.rounds} interleaved epochs each (median images/s, min..max)"
    )
    base = statistics.median(rates["no augmentation"])
    for name, r in rates.items():
        med = statistics.median(r)
        print(f"  {name:48s} {med:8.1f}  ({min(r):.1f}..{max(r):.1f})  x{med / base:.2f} of no augmentation")
    print(
        f"  policy stage inside next(): median {statistics.median(stage_ms):.1f} ms per batch "
        f"(min {min(stage_ms):.1f}, {len(stage_ms)} batches) on the critical path"
    )
    for loader in loaders.values():
        loader.close()
    os.unlink(listing.name)


if __name__ == "__main__":
    main()
