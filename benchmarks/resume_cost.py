"""What exact resume costs: DALI pipeline checkpointing on vs off, taking a checkpoint, resuming.

Runs the train pipeline (random resized crop + flip) on the demo data set (or --data DIR) and prints:
per-batch time with ``enable_checkpointing`` on and off (interleaved runs, same pipeline otherwise),
the time of one ``pipe.checkpoint()`` call and its size, and the time to the first batch after a
resume at step k: restoring DALI's checkpoint vs re-running the first k batches.

    python benchmarks/resume_cost.py [--data DIR] [--batch-size 32] [--size 224] [--device cpu] [--rounds 3]
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
    args = ap.parse_args(argv)

    import numpy as np

    from dalimix import rng
    from dalimix.loader import LastBatchPolicy, plan_epoch
    from dalimix.pipeline import AugmentSpec, build_pipeline, default_num_threads, resolve_device
    from dalimix.sources import scan_image_folder

    if args.data is None:
        from dalimix.demo_data import demo_dataset

        args.data = str(demo_dataset(progress=True))
    samples = scan_image_folder(args.data)
    device = resolve_device(args.device)
    b = args.batch_size
    plan = plan_epoch(len(samples), batch_size=b, epoch=0, seed=0, shuffle=True, shard_id=0, num_shards=1,
                      policy=LastBatchPolicy.DROP)
    files = [samples.paths[i] for i in plan.order]
    ids = [int(i) for i in plan.order]
    spec = AugmentSpec(train=True, height=args.size, width=args.size)
    threads = default_num_threads()

    def build(checkpointing, checkpoint=None):
        return build_pipeline(files, ids, spec=spec, device=device, batch_size=b, num_threads=threads,
                              seed=rng.derive_seed(0, rng.DALI, 0, 0), prefetch=2, reader=None,
                              checkpointing=checkpointing, checkpoint=checkpoint)

    def drive(pipe, start, stop, on_batch=None):
        """The loader's pattern: keep `prefetch` runs scheduled, share, release."""
        scheduled = start
        for step in range(start, stop):
            while scheduled < plan.num_batches and scheduled - step < 2:
                pipe.schedule_run()
                scheduled += 1
            pipe.share_outputs()
            pipe.release_outputs()
            if on_batch:
                on_batch(step)

    nb = plan.num_batches
    print(f"{len(samples)} images, batch {b}, {args.size}x{args.size}, {device}, {threads} DALI threads, {nb} batches/epoch")
    per_batch = {True: [], False: []}
    for _ in range(args.rounds):
        for on in (False, True):
            pipe = build(on)
            t0 = time.perf_counter()
            drive(pipe, 0, nb)
            per_batch[on].append((time.perf_counter() - t0) / nb * 1e3)
            del pipe
    off, on = statistics.median(per_batch[False]), statistics.median(per_batch[True])
    print(f"per batch, checkpointing off: {off:.1f} ms  on: {on:.1f} ms  (on/off = {on / off:.3f}; medians of {args.rounds} interleaved epochs)")

    k = nb // 2
    pipe = build(True)
    times = []
    ckpt = {}

    def take(step):
        if step == k:
            t0 = time.perf_counter()
            ckpt["data"] = pipe.checkpoint()  # noqa: F821 (the enclosing pipe, deleted after use)
            times.append(time.perf_counter() - t0)

    drive(pipe, 0, k + 1, take)
    del pipe
    print(f"pipe.checkpoint(): {times[0] * 1e3:.2f} ms, {len(ckpt['data'])} bytes")

    t0 = time.perf_counter()
    pipe = build(True, ckpt["data"])
    drive(pipe, k + 1, k + 2)
    restore = time.perf_counter() - t0
    del pipe
    t0 = time.perf_counter()
    pipe = build(True)
    drive(pipe, 0, k + 2)
    replay = time.perf_counter() - t0
    del pipe
    t0 = time.perf_counter()
    pipe = build(True)
    drive(pipe, 0, 1)
    fresh = time.perf_counter() - t0
    del pipe
    print(f"first batch after resuming at step {k + 1}: DALI checkpoint {restore * 1e3:.0f} ms, "
          f"re-running {k + 1} batches {replay * 1e3:.0f} ms (a fresh epoch's first batch: {fresh * 1e3:.0f} ms)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
