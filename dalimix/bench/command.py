"""The ``dalimix bench`` sub-command: arguments and what it prints and writes."""

from __future__ import annotations

import argparse

from . import LIBRARIES


def _int_list(text: str) -> tuple[int, ...]:
    try:
        values = tuple(int(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: comma-separated integers, e.g. 64,256") from None
    if not values:
        raise argparse.ArgumentTypeError(f"{text!r}: at least one integer")
    return values


def _libraries(text: str) -> tuple[str, ...]:
    names = tuple(v.strip() for v in text.split(",") if v.strip())
    bad = [n for n in names if n not in LIBRARIES]
    if bad or not names:
        raise argparse.ArgumentTypeError(f"{text!r}: comma-separated names from {','.join(LIBRARIES)}")
    return names


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data", metavar="DIR", help="ImageFolder root (default: the embedded demo data set)")
    p.add_argument("--device", choices=["cpu", "cuda"], default=None, help="default: cuda when available")
    p.add_argument(
        "--quick",
        action="store_true",
        help="smoke run: batch 8, 64 px, 32 images per epoch, 1 warm-up + 2 epochs (under a minute)",
    )
    p.add_argument(
        "--out",
        metavar="DIR",
        default="benchmarks/results",
        help="where the JSON, markdown table and PNG go (default: benchmarks/results)",
    )
    p.add_argument("--batch-sizes", type=_int_list, default=None, metavar="B,B", help="default: 64,256")
    p.add_argument("--size", type=int, default=None, help="output size in px (default 224)")
    p.add_argument(
        "--workers",
        type=int,
        default=None,
        metavar="W",
        help="DALI threads = DataLoader workers for every loader (default: the usable cores)",
    )
    p.add_argument("--epochs", type=int, default=None, help="timed epochs per loader (default 3)")
    p.add_argument("--warmup", type=int, default=None, help="untimed epochs first (default 1)")
    p.add_argument(
        "--min-batches",
        type=int,
        default=None,
        help="the data is listed repeatedly until an epoch has this many batches of the largest size (default 4)",
    )
    p.add_argument(
        "--max-images",
        type=int,
        default=None,
        help="use a class-balanced subset of at most this many files of a larger data set (default 5000)",
    )
    p.add_argument(
        "--libraries",
        type=_libraries,
        default=None,
        metavar="L,L",
        help=f"which loaders (default: {','.join(LIBRARIES)})",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def settings_from_args(args):
    """``Settings`` from parsed arguments (``--quick`` picks tiny defaults; explicit values win)."""
    from .driver import Settings

    device = args.device
    if device is None:
        import torch

        device = "cuda" if torch.cuda.is_available() else "cpu"
    overrides = dict(
        data=args.data,
        device=device,
        batch_sizes=args.batch_sizes,
        size=args.size,
        workers=args.workers,
        epochs=args.epochs,
        warmup=args.warmup,
        min_batches=args.min_batches,
        max_images=args.max_images,
        libraries=args.libraries,
        seed=args.seed,
    )
    if args.quick:
        return Settings.quick(**overrides)
    return Settings(**{k: v for k, v in overrides.items() if v is not None})


def run_command(args) -> int:
    """Run, print the markdown tables, write JSON/markdown/PNG under ``--out``."""
    from . import report
    from .driver import run, timestamp

    settings = settings_from_args(args)
    raw = run(settings, progress=not args.no_progress)
    print()
    print(report.markdown(raw))
    paths = report.write(raw, args.out, timestamp())
    for kind, path in paths.items():
        print(f"{kind}: {path}")
    if raw["logs"]:
        print(f"runner logs: {raw['logs']}")
    return 0 if raw["results"] else 1
