"""The CPU fused stage with a fresh output tensor per batch vs a recycled one (page faults).

    python benchmarks/output_reuse.py [--batch-size 64] [--size 224] [--repeats 30]

Times ``mix_normalize`` (MixUp records, float32 NCHW) into ``allocate_output(...)`` every call
("fresh", what the loader did before) and into ``OutputRing.get(...)`` ("ring", what it does now),
interleaved; prints the median ms per batch of each.
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
import torch


def main(argv=None) -> int:
    from dalimix.loader.outputs import OutputRing
    from dalimix.mix import Mixup
    from dalimix.ops import allocate_output, mix_normalize

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--repeats", type=int, default=30)
    args = ap.parse_args(argv)
    n, s = args.batch_size, args.size
    images = torch.from_numpy(np.random.default_rng(0).integers(0, 256, (n, s, s, 3), dtype=np.uint8))
    params = Mixup(mixup_alpha=0.8, cutmix_alpha=0.0).plan(n, rng=np.random.default_rng(1), height=s, width=s)
    records = params.records()
    ring = OutputRing(torch.device("cpu"), 4)
    times = {"fresh": [], "ring": []}
    for i in range(args.repeats + 2):
        for kind in ("fresh", "ring") if i % 2 else ("ring", "fresh"):
            t0 = time.perf_counter()
            if kind == "fresh":
                out = allocate_output(n, s, s, dtype=torch.float32, channels_last=False, device="cpu")
            else:
                out = ring.get(n, s, s, dtype=torch.float32, channels_last=False)
            mix_normalize(images, records, None, out=out)
            dt = time.perf_counter() - t0
            del out
            if i >= 2:
                times[kind].append(1e3 * dt)
    for kind, t in times.items():
        print(f"{kind:5s}: median {statistics.median(t):6.2f} ms per batch of {n} at {s}x{s} (min {min(t):.2f})")
    print(f"fresh / ring: {statistics.median(times['fresh']) / statistics.median(times['ring']):.2f}x")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
