"""``dalimix`` command line: demo, preview, pack, bench, scan.

Each sub-command lives in its own function and imports what it needs when it runs, so
``dalimix --help`` stays fast.
"""

from __future__ import annotations

import argparse
import re
import sys
import time
from pathlib import Path

# dalimix.mix.METHODS' names, listed here so that `dalimix --help` does not import torch
MIX_NAMES = (
    "attentivemix",
    "cutmix",
    "fmix",
    "gridmix",
    "mixup",
    "puzzlemix",
    "resizemix",
    "saliencymix",
    "samplepairing",
    "smoothmix",
)


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} is not >= 1")
    return value


# --dtype spellings (the loader's own: dalimix.ops.kernels), without importing torch for --help
DTYPES = {
    "float32": "float32",
    "fp32": "float32",
    "float": "float32",
    "float16": "float16",
    "fp16": "float16",
    "half": "float16",
    "bfloat16": "bfloat16",
    "bf16": "bfloat16",
}


def _setting(text: str) -> tuple[str, object]:
    """``KEY=VALUE`` of ``--set``: the value a Python literal (``3``, ``(2, 3)``, ``None``, ``'a'``),
    else the text as a string (``random``)."""
    import ast

    key, sep, value = text.partition("=")
    key = key.strip()
    if not sep or not key.isidentifier():
        raise argparse.ArgumentTypeError(f"{text!r}: KEY=VALUE, e.g. n_labels=3")
    try:
        return key, ast.literal_eval(value)
    except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
        return key, value


def _dtype(text: str) -> str:
    if text.lower() not in DTYPES:
        raise argparse.ArgumentTypeError(f"{text!r}: one of {', '.join(DTYPES)}")
    return DTYPES[text.lower()]


def _add_data_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--data",
        metavar="DIR",
        help="ImageFolder root, or a 'path label' file list such as "
        "`dalimix scan --fix-list` writes (default: the embedded demo data set)",
    )
    p.add_argument("--device", choices=["cpu", "cuda"], default=None, help="default: cuda when available")
    p.add_argument("--batch-size", type=_positive_int, default=32)
    p.add_argument("--size", type=_positive_int, default=224, help="output size in px (default 224)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--on-error",
        choices=["raise", "skip"],
        default="raise",
        help="a file that does not decode: stop with its name (raise, default) or replace it (skip)",
    )
    p.add_argument(
        "--decoder-log",
        action="store_true",
        help="keep nvImageCodec's own [ERROR] lines (dalimix names every undecodable file itself)",
    )


# The loader speaks Python keywords; on the command line the same advice names the flags.
_CLI_WORDS = (
    (re.compile(r"on_error=['\"]skip['\"]"), "--on-error skip"),
    (re.compile(r"on_error=['\"]raise['\"]"), "--on-error raise"),
    (re.compile(r"\bfile_list=(?:<[^>]*>|\.\.\.)?"), "--data FILE (a 'path label' file list)"),
    (re.compile(r"\broot=(?:<[^>]*>)?"), "--data DIR"),
    (re.compile(r"\bbatch_size=(-?\d+)"), r"--batch-size \1"),
    (re.compile(r"\bsize=(-?\d+)"), r"--size \1"),
    (re.compile(r"\bnum_threads="), "--workers "),
)


def cli_message(text: str) -> str:
    """An error message from the library, with its Python keywords replaced by the CLI's flags."""
    for pattern, flag in _CLI_WORDS:
        text = pattern.sub(flag, text)
    return text


def _data_source(args) -> dict:
    """ImageLoader's source arguments for --data: a folder is an ImageFolder root, a file a file list,
    ``.tar`` shards a WebDataset (``dalimix.sources.source_for_path``)."""
    from .sources import source_for_path

    if args.data:
        return source_for_path(args.data)
    from .demo_data import demo_dataset

    return {"root": str(demo_dataset(progress=True))}


SHOWCASE = ("MixUp", "CutMix", "FMix", "ResizeMix", "GridMix", "SmoothMix")


def cmd_demo(args) -> int:
    """Run the train loader over the data for a few epochs; print images/s; save a picture of the mixing."""
    import torch
    from tqdm import tqdm

    from .loader import ImageLoader

    source = _data_source(args)
    mix = None
    if not args.no_mix:
        from .mix import Mixup

        mix = Mixup(mixup_alpha=0.8, cutmix_alpha=1.0, label_smoothing=0.1)
    loader = ImageLoader(
        **source,
        batch_size=args.batch_size,
        size=args.size,
        device=args.device,
        seed=args.seed,
        dtype=args.dtype,
        mix=mix,
        last_batch_policy="drop" if mix is not None else "partial",
        on_error=args.on_error,
    )
    print(f"dalimix demo: {loader}")
    if mix is not None:
        print(f"mixing: {mix}")
    sync = torch.cuda.synchronize if loader.device.type == "cuda" else (lambda: None)
    total_images, total_time = 0, 0.0
    try:
        for epoch in range(args.epochs):
            loader.set_epoch(epoch)
            n_images = 0
            t0 = time.perf_counter()
            for images, _ in tqdm(loader, desc=f"epoch {epoch}", unit="batch", leave=False):
                n_images += images.shape[0]
            sync()
            dt = time.perf_counter() - t0
            total_images += n_images
            total_time += dt
            print(f"epoch {epoch}: {n_images} images in {dt:.2f} s = {n_images / max(dt, 1e-9):.1f} images/s")
    finally:
        loader.close()
    if total_images == 0:
        print(
            f"dalimix demo: no batch in {args.epochs} epoch(s) ({len(loader.dataset)} samples, "
            f"batch {loader.batch_size}, drop-last): use a smaller --batch-size",
            file=sys.stderr,
        )
        return 2
    print(
        f"device: {loader.device}; {total_images} images in {total_time:.2f} s = "
        f"{total_images / total_time:.1f} images/s over {args.epochs} epochs "
        f"(batch {loader.batch_size}, {loader.spec.height}x{loader.spec.width}, {loader.dtype}, "
        f"{loader.num_threads} DALI threads)"
    )
    path = _save_showcase(loader, args)
    print(f"mixing picture: {path.resolve()} ({', '.join(SHOWCASE)} at several lam)")
    return 0


def _save_showcase(loader, args) -> Path:
    """Two images of different classes mixed by every method at four lam, as one captioned PNG."""
    import numpy as np

    from . import mix as m
    from .viz import load_tile, method_table

    labels = np.asarray(loader.dataset.labels)
    size = min(loader.spec.height, loader.spec.width)
    picked: list[tuple[int, np.ndarray]] = []
    for i in np.argsort(labels, kind="stable")[:: max(1, len(labels) // 64)]:  # spread over the classes
        if picked and labels[i] == labels[picked[0][0]]:
            continue
        try:
            picked.append((int(i), load_tile(loader.dataset.paths[i], size)))
        except Exception:  # an unreadable file: dalimix reports those elsewhere; take another
            continue
        if len(picked) == 2:
            break
    if len(picked) < 2:  # one class only: two images of it
        picked = [(i, load_tile(loader.dataset.paths[i], size)) for i in range(min(2, len(labels)))]
    (a, tile_a), (b, tile_b) = picked[0], picked[-1]
    tiles = [tile_a, tile_b]
    names = tuple(loader.classes[labels[i]] for i in (a, b))
    if names[0] == names[1]:
        names = (f"{names[0]} #1", f"{names[1]} #2")
    options = {"GridMix": {"n_holes": max(1, min(20, size // 2))}}  # holes at least 2 px apart
    methods = [getattr(m, name)(**options.get(name, {})) for name in SHOWCASE]
    picture = method_table(tiles[0], tiles[1], methods, names=names, seed=args.seed)
    path = Path(args.out)
    path.parent.mkdir(parents=True, exist_ok=True)
    picture.save(path)
    return path


def _preview_method(name: str, settings: list):
    """The method ``name`` built with the ``--set`` keywords: a ValueError naming the method and
    its keywords for one it does not take or a value it refuses."""
    import inspect

    from .mix import METHODS

    cls = METHODS[name]
    kwargs = dict(settings)
    params = inspect.signature(cls).parameters.values()
    accepted = [q.name for q in params if q.kind in (q.KEYWORD_ONLY, q.POSITIONAL_OR_KEYWORD)]
    keywords = f"{cls.__name__}'s keywords: {', '.join(accepted) or 'none'}"
    unknown = [k for k in kwargs if k not in accepted]
    if unknown:
        raise ValueError(f"--set {', '.join(unknown)}: --mix {name} ({cls.__name__}) has no such keyword; {keywords}")
    if name == "attentivemix" and "features" not in kwargs:
        # needs a feature extractor: an untrained ResNet-18's last stage shows the mechanics
        import torchvision

        from .automix import FeatureTap

        net = torchvision.models.resnet18().eval()
        tap = FeatureTap(net, "layer4")
        kwargs["features"] = lambda x: tap(x) if net.to(x.device) is not None else None
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as e:
        given = ", ".join(f"{k}={v!r}" for k, v in settings)
        raise ValueError(f"--set {given}: --mix {name} ({cls.__name__}) refused it: {e}; {keywords}") from None


def cmd_preview(args) -> int:
    """A PNG grid of one batch mixed by one method, each tile captioned with its lam."""
    from .loader import ImageLoader
    from .mix import Mixer
    from .viz import denormalize, save_grid

    method = _preview_method(args.mix, args.set)
    mixer = Mixer(methods=[method], mode=args.mode, prob=1.0)
    if args.mix == "samplepairing":
        method.set_epoch(0)
    loader = ImageLoader(
        **_data_source(args),
        batch_size=args.batch_size,
        size=args.size,
        device=args.device,
        seed=args.seed,
        mix=mixer,
        last_batch_policy="partial",
        on_error=args.on_error,
    )
    try:
        images, targets = next(iter(loader))
        info = loader.last_batch
        path = save_grid(
            denormalize(images, loader.norm),
            args.out or f"dalimix-preview-{args.mix}.png",
            captions=_captions(loader, targets, info),
        )
    finally:
        loader.close()
    assert info is not None and info.params is not None  # the batch just taken was mixed
    lam = info.params.lam
    print(f"{args.mix}: {images.shape[0]} samples ({args.mode} mode), lam {lam.min():.2f}..{lam.max():.2f}")
    print(f"preview grid: {path.resolve()}")
    return 0


def cmd_scan(args) -> int:
    """Decode every file in parallel; print the unreadable ones; optionally write a clean file list."""
    from .scan import load_samples, scan, write_file_list

    samples = load_samples(args.data, args.file_list)
    result = scan(samples, strict=args.strict, workers=args.workers, progress=not args.quiet)
    for i, reason in result.bad:
        print(f"{samples.paths[i]}: {reason}")
    print(f"scanned {len(samples)} files in {len(samples.classes)} classes: {len(result.bad)} unreadable")
    if args.fix_list:
        path = write_file_list(result, args.fix_list)
        print(
            f"clean file list ({len(result.good_indices)} files): {path.resolve()} "
            f"(ImageLoader(file_list=...) reads it, and so does --data in dalimix demo/preview)"
        )
    return 1 if result.bad else 0


def cmd_pack(args) -> int:
    """Pack an ImageFolder tree into WebDataset tar shards (see dalimix.webdataset)."""
    from .webdataset import pack_image_folder

    tars = pack_image_folder(
        args.src,
        args.out,
        shard_size=args.shard_size,
        prefix=args.prefix,
        shuffle_seed=args.shuffle_seed,
        overwrite=args.overwrite,
    )
    print(f"{len(tars)} shard(s) in {args.out}: {tars[0].name} .. {tars[-1].name} (+ .idx index files, classes.txt)")
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
    from ._optional import require

    require("matplotlib", "bench", "dalimix bench (its PNG chart)")
    from .bench import LIBRARIES

    for lib in ("torchvision", "timm"):
        if lib in (args.libraries or LIBRARIES):
            require(lib, "bench", f"dalimix bench's {lib} contender")
    from .bench.command import run_command

    return run_command(args)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dalimix", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser(
        "demo", help="run the loader on the demo data (or --data DIR), print images/s, save a batch grid"
    )
    _add_data_args(p)
    p.add_argument("--epochs", type=_positive_int, default=2)
    p.add_argument("--dtype", default="float32", type=_dtype, metavar="{float32,float16,bfloat16,fp16,bf16}")
    p.add_argument("--no-mix", action="store_true", help="plain labels, no MixUp/CutMix")
    p.add_argument(
        "--out",
        default="dalimix-demo.png",
        help="where to write the PNG: every mixing method at several lam, on two of the images",
    )
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("preview", help="write a PNG grid of samples mixed by one method, lam on each tile")
    p.add_argument("--mix", required=True, choices=MIX_NAMES)
    _add_data_args(p)
    p.set_defaults(batch_size=16)
    p.add_argument("--mode", default="elem", choices=["batch", "pair", "elem"])
    p.add_argument("--out", default=None, help="default: dalimix-preview-<method>.png")
    p.add_argument(
        "--set",
        action="append",
        default=[],
        type=_setting,
        metavar="KEY=VALUE",
        help="a keyword of the method's constructor, e.g. --set n_labels=3 for puzzlemix (repeatable; "
        "VALUE a Python literal, else a string)",
    )
    p.set_defaults(func=cmd_preview)

    p = sub.add_parser(
        "scan", help="decode every file of a data set, list the unreadable ones, write a clean file list"
    )
    p.add_argument("data", metavar="DIR", help="ImageFolder root (or the root for --file-list's relative paths)")
    p.add_argument("--file-list", help="scan this 'path label' list instead of an ImageFolder tree")
    p.add_argument("--fix-list", metavar="OUT", help="write the readable files as a file list the loader accepts")
    p.add_argument(
        "--strict",
        action="store_true",
        help="also refuse files PIL cannot decode in full, as ImageLoader(strict=True) does",
    )
    p.add_argument("--workers", type=_positive_int, default=None, help="decoding processes (default: the usable cores)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_scan)

    p = sub.add_parser("pack", help="pack an ImageFolder tree into WebDataset .tar shards (image + .cls per sample)")
    p.add_argument("src", metavar="DIR", help="ImageFolder root: DIR/<class>/<image>")
    p.add_argument("out", metavar="OUT", help="folder for the shards (created)")
    p.add_argument("--shard-size", type=int, default=1000, help="samples per shard (default 1000)")
    p.add_argument("--prefix", default="shard", help="shard file names: PREFIX-000000.tar, ...")
    p.add_argument(
        "--shuffle-seed", type=int, default=None, help="store the samples in a random order drawn from this seed"
    )
    p.add_argument("--overwrite", action="store_true", help="replace shards already in OUT")
    p.set_defaults(func=cmd_pack)

    from .bench.command import add_arguments as add_bench_arguments

    p = sub.add_parser(
        "bench", help="images/s, CPU, memory: dalimix vs torchvision vs timm vs DALI + torch, mixing on/off"
    )
    add_bench_arguments(p)
    p.set_defaults(func=cmd_bench)
    return parser


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    from contextlib import nullcontext

    from ._optional import MissingExtraError
    from ._quiet import DecoderLogFilter
    from .errors import DalimixError

    quiet = args.command in ("demo", "preview") and not args.decoder_log
    log_filter = DecoderLogFilter() if quiet else nullcontext()
    try:
        with log_filter:
            return args.func(args)
    except (DalimixError, ValueError, MissingExtraError) as e:
        print(f"dalimix {args.command}: error: {cli_message(str(e))}", file=sys.stderr)
        return 2
    finally:
        if isinstance(log_filter, DecoderLogFilter) and log_filter.dropped:
            print(
                f"dalimix {args.command}: {log_filter.dropped} line(s) of nvImageCodec's decoder log hidden "
                "(--decoder-log shows them)",
                file=sys.stderr,
            )


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
