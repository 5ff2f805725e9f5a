"""Images/s of the train loader reading an image folder vs the same images packed into WebDataset shards.

Packs the demo data set (or --data DIR) into shards in a temporary folder, then runs both loaders
for the same epochs, interleaved, same seed (their batches are identical bit for bit), and prints
the median images/s of each, and the time to index the shards.

    python benchmarks/webdataset_speed.py [--data DIR] [--batch-size 32] [--size 224] [--device cpu] [--rounds 3]
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time

os.environ.setdefault("DALI_LOG_LEVEL", "3")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", help="ImageFolder root (default: the demo data set)")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--shard-size", type=int, default=100)
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args(argv)

    from dalimix import ImageLoader
    from dalimix.webdataset import index_webdataset, pack_image_folder

    if args.data is None:
        from dalimix.demo_data import demo_dataset

        args.data = str(demo_dataset(progress=True))
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        tars = pack_image_folder(args.data, tmp, shard_size=args.shard_size)
        packed = time.perf_counter() - t0
        t0 = time.perf_counter()
        samples = index_webdataset(tmp)
        indexed = time.perf_counter() - t0
        print(
            f"{len(samples)} images in {len(tars)} shards: packed in {packed:.2f} s, indexed in {indexed * 1e3:.1f} ms"
        )
        kw = dict(batch_size=args.batch_size, size=args.size, device=args.device, last_batch_policy="drop")
        loaders = {"folder": ImageLoader(root=args.data, **kw), "webdataset": ImageLoader(webdataset=tmp, **kw)}
        rates = {name: [] for name in loaders}
        for epoch in range(args.rounds):
            for name, loader in loaders.items():
                loader.set_epoch(epoch)
                n, t0 = 0, time.perf_counter()
                for images, _ in loader:
                    n += images.shape[0]
                rates[name].append(n / (time.perf_counter() - t0))
        for name, r in rates.items():
            print(
                f"{name:>10}: {statistics.median(r):.1f} images/s (median of {args.rounds} epochs, "
                f"{loaders[name].num_threads} DALI threads, {args.size}x{args.size}, batch {args.batch_size}, {args.device})"
            )
        for loader in loaders.values():
            loader.close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
