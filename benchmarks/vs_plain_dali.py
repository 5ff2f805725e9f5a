"""dalimix with MixUp/CutMix against DALI's own plain pipeline without mixing, in one process.

    python benchmarks/vs_plain_dali.py [--data DIR] [--images 384,3072] [--batch-sizes 64,256]
        [--cells 384x64,3072x256] [--size 224] [--threads 2] [--rounds 5] [--min-window 1024]

Plain DALI: ``readers.file -> decoders.image_random_crop -> resize -> crop_mirror_normalize``
(float CHW, random mirror), run with ``pipe.run()`` and handed to torch with DLPack. dalimix:
``ImageLoader(mix=Mixup(mixup_alpha=0.8, cutmix_alpha=1.0, label_smoothing=0.1))``, float32 NCHW
plus soft targets. Both read the same file list: the photos of ``--data`` (default: the demo data
set, 384 real-looking JPEGs) repeated until an epoch has ``--images`` images, so short and long
epochs are measured on the same photos. Each cell (images x batch size) builds one DALI pipeline
and one loader, then runs one window of each per round, alternating which goes first (round 0 is a
warm-up). A window is whole epochs of at least ``--min-window`` images, and ends once the process
is idle again: each contender keeps one batch in flight when its loop stops, and that work is paid
in its own window rather than in the next one's. Prints, per cell, the median images/s and CPU
ms/image (this process: all its threads)
of each, and dalimix / DALI as the ratio of the medians and the median of the per-round ratios.
``dalimix bench --libraries dalimix,dali`` measures the same in separate processes.
"""

from __future__ import annotations

import argparse
import os
import resource
import statistics
import tempfile
import time


def cpu_s() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def wait_idle(poll: float = 0.005) -> float:
    """Wait until this process's threads stop working (two polls in a row with under 10% of a core
    busy); returns the time the work was last seen. A window ends there, so the batch each
    contender has in flight when its loop stops is paid in its own window, not in the other's."""
    last_busy = time.perf_counter()
    c, quiet = cpu_s(), 0
    while quiet < 2:
        time.sleep(poll)
        now = cpu_s()
        if now - c < 0.1 * poll:
            quiet += 1
        else:
            quiet, last_busy = 0, time.perf_counter()
        c = now
    return last_busy


def write_list(samples, images: int, folder: str) -> str:
    """A ``path label`` list of ``images`` entries: the samples in order, repeated as needed."""
    path = os.path.join(folder, f"list-{images}.txt")
    with open(path, "w") as f:
        for k in range(images):
            i = k % len(samples)
            f.write(f"{samples.paths[i]} {int(samples.labels[i])}\n")
    return path


def run_cell(
    list_path: str, classes, *, images: int, batch: int, size: int, threads: int, rounds: int, min_window: int
) -> dict:
    import torch
    from nvidia.dali import fn, pipeline_def, types

    from dalimix import ImageLoader
    from dalimix.mix import Mixup

    @pipeline_def(batch_size=batch, num_threads=threads, device_id=None, seed=1)
    def plain():
        jpegs, labels = fn.readers.file(file_list=list_path, file_root="/", random_shuffle=True, name="Reader")
        out = fn.decoders.image_random_crop(
            jpegs,
            device="cpu",
            output_type=types.RGB,
            random_area=[0.08, 1.0],
            random_aspect_ratio=[3 / 4, 4 / 3],
            num_attempts=10,
        )
        out = fn.resize(out, resize_x=size, resize_y=size, interp_type=types.INTERP_LINEAR, antialias=True)
        out = fn.crop_mirror_normalize(
            out,
            dtype=types.FLOAT,
            output_layout="CHW",
            mean=[255 * m for m in (0.485, 0.456, 0.406)],
            std=[255 * s for s in (0.229, 0.224, 0.225)],
            mirror=fn.random.coin_flip(probability=0.5),
        )
        return out, labels

    pipe = plain()
    pipe.build()
    loader = ImageLoader(
        file_list=list_path,
        classes=classes,
        batch_size=batch,
        size=size,
        device="cpu",
        num_threads=threads,
        mix=Mixup(mixup_alpha=0.8, cutmix_alpha=1.0, label_smoothing=0.1),
        last_batch_policy="drop",
    )
    steps = len(loader)

    def dali_epoch():
        for _ in range(steps):
            out, labels = pipe.run()
            x = torch.from_dlpack(out.as_tensor())
            y = torch.from_dlpack(labels.as_tensor()).view(-1).long()
            del x, y
        return steps * batch

    def dalimix_epoch():
        n = 0
        for out, _ in loader:
            n += out.shape[0]
        return n

    per_window = max(1, -(-min_window // (steps * batch)))  # whole epochs, at least min_window images
    res: dict = {"dalimix+mix": [], "dali plain": []}
    wait_idle()
    for rnd in range(rounds + 1):
        order = [("dalimix+mix", dalimix_epoch), ("dali plain", dali_epoch)]
        for name, epoch in order if rnd % 2 else order[::-1]:
            c0, t0 = cpu_s(), time.perf_counter()
            n = sum(epoch() for _ in range(per_window))
            end = wait_idle()
            wall, cpu = end - t0, cpu_s() - c0
            if rnd:
                res[name].append((n / wall, 1e3 * cpu / n))
    built = loader.pipelines_built
    loader.close()
    return {"steps": steps, "results": res, "built": built, "per_window": per_window}


def main(argv=None) -> int:
    from dalimix.sources import resolve_source

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default=None, help="an ImageFolder tree or file list (default: the demo data set)")
    ap.add_argument("--images", default="384,3072", help="epoch lengths in images (the photos repeated as needed)")
    ap.add_argument("--batch-sizes", default="64,256")
    ap.add_argument("--cells", default=None, help="only these IMAGESxBATCH cells, e.g. 3072x64,384x256")
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=5, help="measured windows of each per cell (after one warm-up)")
    ap.add_argument("--min-window", type=int, default=1024, help="images per window at least (whole epochs)")
    args = ap.parse_args(argv)
    if args.data is None:
        from dalimix.demo_data import demo_dataset

        args.data = str(demo_dataset(progress=True))
    samples = resolve_source(**({"file_list": args.data} if os.path.isfile(args.data) else {"root": args.data}))
    if args.cells:
        cells = [tuple(int(v) for v in c.lower().split("x")) for c in args.cells.split(",")]
    else:
        cells = [(int(i), int(b)) for i in args.images.split(",") for b in args.batch_sizes.split(",")]
    print(
        f"{len(samples)} photos from {args.data}; {args.size} px, {args.threads} threads, {args.rounds} rounds per cell; "
        f"load average {os.getloadavg()[0]:.2f} on {os.cpu_count()} cores",
        flush=True,
    )
    with tempfile.TemporaryDirectory(prefix="dalimix-vs-dali-") as folder:
        for images, batch in cells:
            if images < batch:
                print(f"{images} images x batch {batch}: skipped (an epoch needs at least one batch)")
                continue
            cell = run_cell(
                write_list(samples, images, folder),
                samples.classes,
                images=images,
                batch=batch,
                size=args.size,
                threads=args.threads,
                rounds=args.rounds,
                min_window=args.min_window,
            )
            res = cell["results"]
            med = {k: (statistics.median(a for a, _ in v), statistics.median(c for _, c in v)) for k, v in res.items()}
            paired_ips = statistics.median(a / p for (a, _), (p, _) in zip(res["dalimix+mix"], res["dali plain"]))
            paired_cpu = statistics.median(a / p for (_, a), (_, p) in zip(res["dalimix+mix"], res["dali plain"]))
            a, p = med["dalimix+mix"], med["dali plain"]
            print(
                f"epoch {cell['steps'] * batch:5d} images x {cell['per_window']}, batch {batch:3d}: "
                f"dalimix+mix {a[0]:7.1f} img/s {a[1]:5.2f} CPU ms/img | dali plain {p[0]:7.1f} img/s "
                f"{p[1]:5.2f} CPU ms/img | ratio {a[0] / p[0]:.3f}x img/s, {a[1] / p[1]:.3f}x CPU ms/img "
                f"(paired {paired_ips:.3f}x, {paired_cpu:.3f}x); dalimix pipelines built: {cell['built']}",
                flush=True,
            )
    print(f"load average at the end: {os.getloadavg()[0]:.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
