"""What exact resume costs: the time to the first batch of a loader resumed at step k, against a
fresh loader's first batch and against a loader already reading (moved with load_state_dict).

Crops, flips and mixing are dalimix's draws from (seed, rank, epoch, step), so a resumed loader
simply starts feeding its one DALI pipeline at (epoch, step): nothing is replayed, and the state
holds no DALI checkpoint (an ``auto_augment`` preset's loader aside).

    python benchmarks/resume_cost.py [--data DIR] [--batch-size 32] [--size 224] [--device cpu] [--rounds 3] [--step 7]
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

os.environ.setdefault("DALI_LOG_LEVEL", "3")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", help="ImageFolder root (default: the demo data set)")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--step", type=int, default=7)
    args = ap.parse_args(argv)

    from dalimix import ImageLoader
    from dalimix.mix import Mixup

    root = args.data
    if root is None:
        from dalimix.demo_data import demo_dataset

        root = str(demo_dataset(progress=True))

    def make():
        return ImageLoader(
            root=root,
            batch_size=args.batch_size,
            size=args.size,
            device=args.device,
            seed=1,
            mix=Mixup(mixup_alpha=0.8, cutmix_alpha=1.0),
        )

    def first_batch(loader) -> float:
        t0 = time.perf_counter()
        next(iter(loader))
        return time.perf_counter() - t0

    source = make()
    it = iter(source)
    for _ in range(args.step):
        next(it)
    state = source.state_dict()
    fresh, resumed, moved = [], [], []
    running = make()
    for _ in range(args.rounds):
        fresh.append(first_batch(make()))
        loader = make()
        loader.load_state_dict(state)
        resumed.append(first_batch(loader))
        list(iter(running))  # reading another epoch, DALI busy with the next one
        running.load_state_dict(state)
        moved.append(first_batch(running))
    ms = lambda xs: f"{1e3 * statistics.median(xs):7.1f} ms"  # noqa: E731
    print(f"first batch of a fresh loader:                      {ms(fresh)}")
    print(f"first batch of a loader resumed at step {args.step}:           {ms(resumed)}")
    print(
        f"first batch of a reading loader moved to step {args.step}:     {ms(moved)} "
        f"(pipelines built: {running.pipelines_built})"
    )
    print(f"state size: {len(repr(state))} characters, DALI checkpoint: {state['dali_checkpoint']!r}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
