"""Soak test: many epochs over the demo data with mixing (and a mask hook when the loader has one);
prints resident memory (and GPU memory on a GPU) per epoch. Goal: flat after the first epoch
(growth < 1% over the run). Not part of the test suite: it runs for minutes.

    python benchmarks/soak.py --epochs 30 [--device cpu|cuda] [--batch-size 32] [--size 128]

glibc's malloc raises its mmap threshold as large blocks are freed, after which freed batch-sized
blocks stay in the heap and the resident size wanders by tens of MiB from batch to batch, leak or
no leak. To measure leaks, the script re-runs itself with a fixed threshold
(MALLOC_MMAP_THRESHOLD_=262144) unless --default-malloc is given; both figures are worth reading.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import torch


def rss_mib() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--epochs", type=int, default=30)
    ap.add_argument("--device", default=None)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--size", type=int, default=128)
    ap.add_argument("--data", default=None)
    ap.add_argument("--no-hook", action="store_true")
    ap.add_argument("--out", default="benchmarks/results")
    ap.add_argument("--default-malloc", action="store_true", help="keep glibc's dynamic mmap threshold")
    args = ap.parse_args(argv)
    if not args.default_malloc and "MALLOC_MMAP_THRESHOLD_" not in os.environ:
        os.environ["MALLOC_MMAP_THRESHOLD_"] = "262144"
        os.execv(sys.executable, [sys.executable, *sys.argv])

    from dalimix import ImageLoader
    from dalimix.demo_data import demo_dataset
    from dalimix.hook import LearnedMask
    from dalimix.mix import CutMix, FMix, Mixer, MixUp, ResizeMix

    root = args.data or str(demo_dataset(progress=True))
    methods = [MixUp(), CutMix(), FMix(), ResizeMix()] + ([] if args.no_hook else [LearnedMask()])
    mix = Mixer(methods=methods, mode="elem", label_smoothing=0.1)
    loader = ImageLoader(
        root=root, batch_size=args.batch_size, size=args.size, device=args.device, mix=mix, last_batch_policy="drop"
    )
    hooked = False
    if not args.no_hook:

        def hook(images, lam, partner):
            n = images.shape[0]
            return torch.rand(n, 1, 14, 14, device=images.device)

        loader.set_mask_hook(hook)
        hooked = True
    cuda = loader.device.type == "cuda"
    rows = []
    print(
        f"soak: {loader}, hook={'on' if hooked else 'off'}, "
        f"MALLOC_MMAP_THRESHOLD_={os.environ.get('MALLOC_MMAP_THRESHOLD_', 'dynamic (glibc default)')}"
    )
    print(f"{'epoch':>5} {'images/s':>9} {'RSS MiB':>9}" + (f" {'GPU MiB':>9} {'GPU peak':>9}" if cuda else ""))
    for epoch in range(args.epochs):
        loader.set_epoch(epoch)
        t0 = time.perf_counter()
        n = 0
        for images, targets in loader:
            n += images.shape[0]
            del images, targets
        if cuda:
            torch.cuda.synchronize()
        dt = time.perf_counter() - t0
        gc.collect()
        row = {"epoch": epoch, "images_per_s": n / dt, "rss_mib": rss_mib()}
        if cuda:
            row["gpu_mib"] = torch.cuda.memory_allocated() / 2**20
            row["gpu_peak_mib"] = torch.cuda.max_memory_allocated() / 2**20
        rows.append(row)
        print(
            f"{epoch:5d} {row['images_per_s']:9.1f} {row['rss_mib']:9.1f}"
            + (f" {row['gpu_mib']:9.1f} {row['gpu_peak_mib']:9.1f}" if cuda else ""),
            flush=True,
        )
    loader.close()
    first, last = rows[min(1, len(rows) - 1)], rows[-1]
    growth = 100 * (last["rss_mib"] - first["rss_mib"]) / first["rss_mib"]
    settled = rows[min(5, len(rows) - 1)]
    growth5 = 100 * (last["rss_mib"] - settled["rss_mib"]) / settled["rss_mib"]
    print(
        f"RSS after epoch 1: {first['rss_mib']:.1f} MiB, at the end: {last['rss_mib']:.1f} MiB, growth {growth:+.2f}% "
        f"(goal < 1%); from epoch {settled['epoch']}: {growth5:+.2f}% (goal < 2% under the default malloc)"
    )
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stamp = datetime.now(timezone.utc).strftime("%Y-%m-%d")
    path = out / f"soak-{stamp}-{loader.device.type}.json"
    path.write_text(
        json.dumps(
            {
                "date": stamp,
                "machine": platform.node(),
                "cpu": platform.processor(),
                "args": vars(args),
                "hook": hooked,
                "malloc_mmap_threshold": os.environ.get("MALLOC_MMAP_THRESHOLD_", "dynamic"),
                "rss_growth_percent": growth,
                "rss_growth_from_epoch5_percent": growth5,
                "epochs": rows,
            },
            indent=1,
        )
    )
    print(f"results: {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
