"""dalimix with MixUp/CutMix against DALI's own plain pipeline without mixing, in one process.

    python benchmarks/vs_plain_dali.py [--data DIR] [--batch-size 64] [--size 224] [--threads 2] [--rounds 5]

Plain DALI: ``readers.file -> decoders.image_random_crop -> resize -> crop_mirror_normalize``
(float CHW, random mirror), run with ``pipe.run()`` and handed to torch with DLPack. dalimix:
``ImageLoader(mix=Mixup(mixup_alpha=0.8, cutmix_alpha=1.0, label_smoothing=0.1))``, float32 NCHW
plus soft targets. One epoch of each per round, alternating (the first round is a warm-up);
prints the median images/s and CPU ms/image (this process: all its threads) and the ratios.
``dalimix bench --libraries dalimix,dali`` measures the same in separate processes.
"""

from __future__ import annotations

import argparse
import resource
import statistics
import time


def cpu_s() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def main(argv=None) -> int:
    import torch
    from nvidia.dali import fn, pipeline_def, types

    from dalimix import ImageLoader
    from dalimix.mix import Mixup

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default=None)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=5)
    args = ap.parse_args(argv)
    if args.data is None:
        from dalimix.demo_data import demo_dataset

        args.data = str(demo_dataset(progress=True))
    b, size = args.batch_size, args.size

    @pipeline_def(batch_size=b, num_threads=args.threads, device_id=None, seed=1)
    def plain():
        jpegs, labels = fn.readers.file(file_root=args.data, random_shuffle=True, name="Reader")
        images = fn.decoders.image_random_crop(
            jpegs,
            device="cpu",
            output_type=types.RGB,
            random_area=[0.08, 1.0],
            random_aspect_ratio=[3 / 4, 4 / 3],
            num_attempts=10,
        )
        images = fn.resize(images, resize_x=size, resize_y=size, interp_type=types.INTERP_LINEAR, antialias=True)
        images = fn.crop_mirror_normalize(
            images,
            dtype=types.FLOAT,
            output_layout="CHW",
            mean=[255 * m for m in (0.485, 0.456, 0.406)],
            std=[255 * s for s in (0.229, 0.224, 0.225)],
            mirror=fn.random.coin_flip(probability=0.5),
        )
        return images, labels

    pipe = plain()
    pipe.build()
    loader = ImageLoader(
        root=args.data,
        batch_size=b,
        size=size,
        device="cpu",
        num_threads=args.threads,
        mix=Mixup(mixup_alpha=0.8, cutmix_alpha=1.0, label_smoothing=0.1),
        last_batch_policy="drop",
    )
    steps = len(loader)

    def dali_epoch():
        for _ in range(steps):
            images, labels = pipe.run()
            x = torch.from_dlpack(images.as_tensor())
            y = torch.from_dlpack(labels.as_tensor()).view(-1).long()
            del x, y
        return steps * b

    def dalimix_epoch():
        n = 0
        for images, _ in loader:
            n += images.shape[0]
        return n

    res = {"dalimix+mix": [], "dali plain": []}
    for rnd in range(args.rounds + 1):
        order = [("dalimix+mix", dalimix_epoch), ("dali plain", dali_epoch)]
        for name, fn_ in order if rnd % 2 else order[::-1]:
            c0, t0 = cpu_s(), time.perf_counter()
            n = fn_()
            wall, cpu = time.perf_counter() - t0, cpu_s() - c0
            if rnd:
                res[name].append((n / wall, 1e3 * cpu / n))
    med = {k: (statistics.median(a for a, _ in v), statistics.median(c for _, c in v)) for k, v in res.items()}
    for k, (ips, ms) in med.items():
        print(
            f"{k:12s}: {ips:7.1f} images/s, {ms:5.2f} CPU ms/image (median of {args.rounds} epochs of "
            f"{steps * b} images, batch {b}, {size} px, {args.threads} threads)"
        )
    a, p = med["dalimix+mix"], med["dali plain"]
    print(
        f"dalimix with mixing / DALI plain without: {a[0] / p[0]:.3f}x images/s, {a[1] / p[1]:.3f}x CPU ms/image; "
        f"pipelines built by dalimix: {loader.pipelines_built}"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
