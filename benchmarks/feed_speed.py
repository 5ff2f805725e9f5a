"""Bytes or paths: how the loader's one DALI pipeline should be fed (CPU, interleaved epochs).

    python benchmarks/feed_speed.py [--data DIR] [--batch-size 64] [--size 224] [--threads 2] [--epochs 6]

"bytes": the host reads each planned file (``Samples.read_batch``) and feeds the encoded bytes
through ``external_source`` (what ``ImageLoader`` does, for image folders and tar shards alike).
"paths": the host feeds each file's path (as uint8) and DALI's own threads read it with
``fn.io.file.read``. Both decode with the same crop windows and resize; only the feed differs.
The host must read each image's header anyway (torchvision's crop rule needs the size), so
"paths" costs a header read on the host plus DALI's read of the whole file.
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np


def build(feed_kind: str, batch: int, threads: int, size: int):
    from nvidia.dali import fn, pipeline_def, types

    @pipeline_def(batch_size=batch, num_threads=threads, device_id=None, seed=1, prefetch_queue_depth=2)
    def pipe():
        if feed_kind == "paths":
            names = fn.external_source(name="encoded", dtype=types.UINT8, ndim=1)
            encoded = fn.io.file.read(names)
        else:
            encoded = fn.external_source(name="encoded", dtype=types.UINT8, ndim=1)
        window = fn.external_source(name="window", dtype=types.FLOAT, ndim=1)
        images = fn.decoders.image_slice(encoded, window[0:2], window[2:4], device="cpu", output_type=types.RGB)
        return fn.resize(images, resize_x=size, resize_y=size, antialias=True)

    p = pipe()
    p.build()
    return p


def main(argv=None) -> int:
    from dalimix.pipeline import encoded_size, plan_crops
    from dalimix.sources import scan_image_folder

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default=None)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--epochs", type=int, default=6)
    args = ap.parse_args(argv)
    if args.data is None:
        from dalimix.demo_data import demo_dataset

        args.data = str(demo_dataset(progress=True))
    samples = scan_image_folder(args.data)
    b = args.batch_size
    n = len(samples) // b * b
    rng = np.random.default_rng(0)

    def header(path):
        with open(path, "rb") as f:
            return encoded_size(np.frombuffer(f.read(65536), dtype=np.uint8))

    pipes = {kind: build(kind, b, args.threads, args.size) for kind in ("bytes", "paths")}
    times = {kind: [] for kind in pipes}
    for epoch in range(args.epochs + 1):
        for kind in ("bytes", "paths") if epoch % 2 else ("paths", "bytes"):
            pipe = pipes[kind]
            order = rng.permutation(len(samples))[:n]
            t0 = time.perf_counter()
            fed = 0
            for step in range(n // b):
                ids = order[step * b : (step + 1) * b]
                if kind == "bytes":
                    data = samples.read_batch(ids)
                    sizes = np.array([encoded_size(d) for d in data])
                else:
                    data = [np.frombuffer(samples.paths[i].encode(), dtype=np.uint8) for i in ids]
                    sizes = np.array([header(samples.paths[i]) for i in ids])
                windows = plan_crops(sizes, rng, scale=(0.08, 1), ratio=(3 / 4, 4 / 3))
                pipe.feed_input("encoded", data)
                pipe.feed_input("window", list(windows))
                fed += 1
                if fed == 2 or step >= 2:  # the first schedule_run runs the 2 prefetched iterations
                    pipe.schedule_run()
                if step >= 1:
                    pipe.share_outputs()
                    pipe.release_outputs()
            pipe.share_outputs()
            pipe.release_outputs()
            dt = time.perf_counter() - t0
            if epoch:
                times[kind].append(n / dt)
            pipes[kind] = build(kind, b, args.threads, args.size)  # a fresh pipeline per round, equal for both
    for kind, ips in times.items():
        print(
            f"{kind:6s}: median {statistics.median(ips):7.1f} images/s (min {min(ips):.1f}, max {max(ips):.1f}) "
            f"over {len(ips)} interleaved epochs of {n} images, batch {b}, {args.threads} threads, {args.size} px"
        )
    print(f"bytes / paths: {statistics.median(times['bytes']) / statistics.median(times['paths']):.3f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
