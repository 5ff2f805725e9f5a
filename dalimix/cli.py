"""``dalimix`` command line: demo, preview, bench, scan.

Each sub-command lives in its own function and imports what it needs when it runs, so
``dalimix --help`` stays fast.
"""

from __future__ import annotations

import argparse
import sys
import time


def _add_data_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data", metavar="DIR", help="ImageFolder root (default: the embedded demo data set)")
    p.add_argument("--device", choices=["cpu", "cuda"], default=None, help="default: cuda when available")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--size", type=int, default=224)
    p.add_argument("--seed", type=int, default=0)


def _data_root(args) -> str:
    if args.data:
        return args.data
    from .demo_data import demo_dataset

    return str(demo_dataset(progress=True))


def cmd_demo(args) -> int:
    """Run the train loader over the data for a couple of epochs; print images/s; save a batch grid."""
    import torch
    from tqdm import tqdm

    from .loader import ImageLoader
    from .viz import denormalize, save_grid

    root = _data_root(args)
    mix = None
    if not args.no_mix:
        from .mix import Mixup

        mix = Mixup(mixup_alpha=0.8, cutmix_alpha=1.0, label_smoothing=0.1)
    loader = ImageLoader(
        root=root, batch_size=args.batch_size, size=args.size, device=args.device, seed=args.seed,
        dtype=args.dtype, mix=mix, last_batch_policy="drop" if mix is not None else "partial",
    )
    print(f"dalimix demo: {loader}")
    if mix is not None:
        print(f"mixing: {mix}")
    sync = torch.cuda.synchronize if loader.device.type == "cuda" else (lambda: None)
    grid_batch = None
    total_images, total_time = 0, 0.0
    for epoch in range(args.epochs):
        loader.set_epoch(epoch)
        n_images = 0
        t0 = time.perf_counter()
        for images, targets in tqdm(loader, desc=f"epoch {epoch}", unit="batch", leave=False):
            n_images += images.shape[0]
            if grid_batch is None:
                grid_batch = (images, targets, loader.last_batch)
        sync()
        dt = time.perf_counter() - t0
        total_images += n_images
        total_time += dt
        print(f"epoch {epoch}: {n_images} images in {dt:.2f} s = {n_images / dt:.1f} images/s")
    print(f"device: {loader.device}; {total_images} images in {total_time:.2f} s = "
          f"{total_images / total_time:.1f} images/s over {args.epochs} epochs "
          f"(batch {loader.batch_size}, {loader.spec.height}x{loader.spec.width}, {loader.dtype}, "
          f"{loader.num_threads} DALI threads)")
    images, targets, info = grid_batch
    captions = _captions(loader, targets, info)
    path = save_grid(denormalize(images, loader.norm), args.out, captions=captions)
    print(f"batch grid: {path.resolve()}")
    loader.close()
    return 0


def _captions(loader, targets, info) -> list[str]:
    names = loader.classes
    labels = loader.dataset.labels[info.sample_ids]
    params = info.params
    out = []
    for i, lab in enumerate(labels):
        if params is None:
            out.append(names[lab])
            continue
        j = int(params.partner[i])
        out.append(f"{params.method_name(i)} {names[lab]} {params.lam[i]:.2f} / {names[labels[j]]}")
    return out


def cmd_bench(args) -> int:
    """dalimix vs torchvision vs timm vs DALI + torch, mixing on and off (see ``dalimix.bench``)."""
    from .bench.command import run_command

    return run_command(args)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dalimix", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("demo", help="run the loader on the demo data (or --data DIR), print images/s, save a batch grid")
    _add_data_args(p)
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    p.add_argument("--no-mix", action="store_true", help="plain labels, no MixUp/CutMix")
    p.add_argument("--out", default="dalimix-demo.png", help="where to write the PNG grid")
    p.set_defaults(func=cmd_demo)

    from .bench.command import add_arguments as add_bench_arguments

    p = sub.add_parser("bench", help="images/s, CPU, memory: dalimix vs torchvision vs timm vs DALI + torch, mixing on/off")
    add_bench_arguments(p)
    p.set_defaults(func=cmd_bench)
    return parser


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    from .errors import DalimixError

    try:
        return args.func(args)
    except (DalimixError, ValueError) as e:
        print(f"dalimix {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
