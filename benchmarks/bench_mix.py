"""The mixing stage alone, and what it costs the loader.

    python benchmarks/bench_mix.py [--device cpu|cuda] [--batch-sizes 64,128,256] [--size 224]
                                   [--repeats R] [--data DIR] [--quick] [--out DIR]
    python benchmarks/bench_mix.py --planning-only [--planning-methods fmix] [--planning-baseline REV]

1. Stage: the same uint8 ``N x H x W x 3`` batches (random pixels), the same labels, one process,
   interleaved repeats, median time per batch. Every row ends with a normalised float ``N x 3 x H x W``
   batch and ``N x 1000`` soft targets:
   - dalimix: ``mix_normalize`` (one fused pass: gather partner, mix, normalise, cast, lay out) +
     ``Mixer.targets``, for each method (plans made beforehand, as the loader's planner thread does);
   - timm ``Mixup``, torchvision v2 ``MixUp``/``CutMix``, and MixUp/CutMix written with torch ops
     (what a DALI user adds after ``crop_mirror_normalize``): "normalise + mix" = uint8 -> float,
     ``(x - mean) / std`` as a batch, then the library's mixing (what dalimix's pass replaces);
     "mix only" = the library's call on a batch that is already normalised float (what their
     pipelines have at that point: per-sample normalisation in DataLoader workers or in DALI);
   - timm ``FastCollateMixup`` (CPU only: it runs in DataLoader workers): "mix only" = the collate
     call on per-sample uint8 ``3 x H x W`` numpy arrays; "normalise + mix" adds the prefetcher's
     float normalisation.
   On CUDA it also times dalimix's kernel alone (torch profiler, device time) and reports its
   effective bandwidth — bytes = 2 uint8 images read + 1 output written per sample (1 read for no
   mixing) — against a measured device-to-device copy (``copy_`` of a 1 GiB buffer, read + write).
   Box and mask methods read the partner only where it shows, so their real traffic is lower.
2. Planning (host): ``Mixer.plan`` + ``records`` (the loader runs these on its planner thread) and
   ``mask_pool`` (main thread), per method, in "batch" and "elem" mode, repeats interleaved across
   methods; wall and CPU time. ``--planning-only`` runs this table alone, ``--planning-methods fmix``
   keeps some rows, ``--planning-baseline REV`` adds the FMix of git ``REV`` (before/after in one
   run); with CUDA, "fmix on cuda" plans the masks on the device (``FMix(device="cuda")``).
3. Loader: ``ImageLoader`` images/s with mixing off, MixUp/CutMix, and FMix in "elem" mode,
   epochs interleaved in one process, with the planner thread's time per batch and how long the
   main thread waited for a plan (0 = planning hidden behind the batch before it).
4. Random erasing: MixUp + timm's random erasing fused into the kernel's pass (erase table built
   per call) against MixUp with the separate batched torch pass the loader ran before erasing was
   fused (kept here as the baseline only), and MixUp alone; wall and CPU time per batch
   (``--erase-only`` runs just this table).
The SASS table (``--sass-only``: no GPU needed) has a row for the erasing loop: static instructions
per erased pixel (all three fill modes' code in it; a sample without boxes never enters it).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from dalimix.bench import handmix  # noqa: E402
from dalimix.bench.driver import progress_bar  # noqa: E402
from dalimix.bench.machine import describe, one_line, short_name  # noqa: E402
from dalimix.bench.report import markdown_table  # noqa: E402
from dalimix.erase import ErasePlan, RandomErasing  # noqa: E402
from dalimix.mix import (  # noqa: E402
    AttentiveMix,
    CutMix,
    FMix,
    GridMix,
    Mixer,
    MixUp,
    Mixup,
    PuzzleMix,
    ResizeMix,
    SaliencyMix,
    SamplePairing,
    SmoothMix,
)
from dalimix.ops import Normalization, allocate_output, identity_records, mix_normalize  # noqa: E402

NUM_CLASSES = 1000
MEAN = (0.485, 0.456, 0.406)
STD = (0.229, 0.224, 0.225)
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


# the kernel before the memory-bound rewrite: the SASS table's default "before" column
INSTRUCTION_BOUND_KERNEL = "2564daa"


def dalimix_methods() -> dict:
    """name -> a factory of the mixer whose plans the stage rows use."""
    one = lambda m, mode="batch": lambda: Mixer(methods=[m], mode=mode, num_classes=NUM_CLASSES, label_smoothing=0.1)  # noqa: E731
    return {
        "none": None,
        "mixup": one(MixUp(alpha=0.8)),
        "cutmix": one(CutMix(alpha=1.0)),
        "fmix": one(FMix()),
        "resizemix": one(ResizeMix()),
        "gridmix": one(GridMix()),
        "smoothmix": one(SmoothMix()),
        "samplepairing": one(SamplePairing()),
        "fmix 1/4 res": one(FMix(mask_scale=4)),
        # mask policies: through the loader's hook stage (unmixed pass, masks on the device, checks, mix);
        # AttentiveMix's features here are a 32x average pooling: the user's network is not dalimix's cost
        "saliencymix": one(SaliencyMix()),
        "attentivemix": one(AttentiveMix(features=lambda x: torch.nn.functional.avg_pool2d(x, 32, ceil_mode=True))),
        # PuzzleMix: min-cut masks (4 x 4 blocks) and the partner's blocks permuted by the kernel (FLAG_GATHER)
        "puzzlemix": one(PuzzleMix(block_num=4)),
        "mixup|cutmix elem": lambda: Mixup(mixup_alpha=0.8, cutmix_alpha=1.0, mode="elem", num_classes=NUM_CLASSES),
    }


# ------------------------------------------------------------------ SASS instructions per pixel
# (label, loop variant of today's kernel (DMK_*), (method, flags) the old kernel is specialised to;
# None: the old kernel has no such loop)
SASS_VARIANTS = [
    ("none (normalise only)", "DMK_NONE", (0, 0)),
    ("blend (MixUp)", "DMK_BLEND", (1, 0)),
    ("box (CutMix)", "DMK_BOX", (2, 0)),
    ("mask nearest (FMix)", "DMK_MASK_NEAREST", (3, 0)),
    ("mask bilinear", "DMK_MASK_BILINEAR", (3, 1)),
    ("mask nearest + sigmoid", "DMK_MASK_NEAREST_SIGMOID", (3, 2)),
    ("mask bilinear + sigmoid", "DMK_MASK_BILINEAR_SIGMOID", (3, 3)),
    ("resize nearest (ResizeMix)", "DMK_RESIZE_NEAREST", (4, 0)),
    ("resize bilinear", "DMK_RESIZE_BILINEAR", (4, 1)),
    ("grid (GridMix)", "DMK_GRID", (5, 0)),
    ("smooth (SmoothMix)", "DMK_SMOOTH", (6, 0)),
    # the old kernel has no gather: its plain nearest / bilinear mask is the "before"
    ("mask nearest + gather (PuzzleMix)", "DMK_MASK_NEAREST_GATHER", (3, 0)),
    ("mask bilinear + gather", "DMK_MASK_BILINEAR_GATHER", (3, 1)),
    ("erasing, per erased pixel (fused)", "DMK_NONE -DDM_SASS_ERASE=1", None),
]
OLD_RECORD_LINE = "    const DmRecord R = rec[s];\n"


def find_cuobjdump() -> str | None:
    """cuobjdump from PATH, the CUDA toolkit next to nvcc, or triton's bundled copy."""
    found = shutil.which("cuobjdump")
    if found:
        return found
    nvcc = shutil.which("nvcc")
    candidates = [Path(nvcc).resolve().parent / "cuobjdump"] if nvcc else []
    with contextlib.suppress(ImportError):
        import triton

        candidates.append(Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump")
    return next((str(c) for c in candidates if c.is_file()), None)


def sass_functions(sass: str) -> dict[str, list[tuple[int, str]]]:
    """``cuobjdump -sass`` text -> {function: [(address, instruction text)]}."""
    funcs, name = {}, None
    for line in sass.splitlines():
        m = re.search(r"Function : (\w+)", line)
        if m:
            name = m.group(1)
            funcs[name] = []
            continue
        m = re.match(r"\s*/\*([0-9a-f]{4,})\*/\s+(.*?)\s*;", line)
        if m and name:
            funcs[name].append((int(m.group(1), 16), m.group(2)))
    return funcs


def _store_bytes(ins: str) -> int | None:
    m = re.match(r"(?:@!?U?P\w+\s+)?STG\.E(\S*)", ins)
    if not m:
        return None
    width = {".128": 16, ".64": 8, ".U16": 2, ".S16": 2, ".U8": 1, ".S8": 1}
    return next((b for k, b in width.items() if k in m.group(1)), 4)


def main_loop_cost(code: list[tuple[int, str]], out_bytes: int) -> dict:
    """Static SASS instructions per output pixel of the main loop of one function.

    Loops are the backward branches. The main loop is the innermost loop holding the function's
    widest global stores; each path through it that writes one group of pixels ends in three of
    them (one per channel in NCHW, three wide stores of 4 interleaved pixels in channels_last), so
    ``paths = stores / 3`` and ``pixels per path = store width / element size``. Where an
    enclosing loop exists (today's kernel: the column loop inside the row loop, one group per thread
    and row at the launch's shape) its own instructions are added once per path: the per-row cost.
    ``per pixel = (inner / paths + (outer - inner)) / pixels per path``.
    """
    index = {addr: i for i, (addr, _) in enumerate(code)}
    loops = []
    for i, (addr, ins) in enumerate(code):
        m = re.search(r"\bBRA(?:\.\w+)*\s+0x([0-9a-f]+)", ins)
        if m and int(m.group(1), 16) <= addr and int(m.group(1), 16) in index:
            loops.append((index[int(m.group(1), 16)], i))
    stores = [(i, _store_bytes(ins)) for i, (_, ins) in enumerate(code) if _store_bytes(ins)]
    if not loops or not stores:
        return {"error": "no loop with global stores found"}
    widest = max(b for _, b in stores)
    holding = [(lo, hi) for lo, hi in loops if any(lo <= i <= hi and b == widest for i, b in stores)]
    if not holding:
        return {"error": "the widest stores are outside every loop"}
    inner = min(holding, key=lambda l: l[1] - l[0])
    outer = [l for l in loops if l[0] <= inner[0] and l[1] >= inner[1] and l != inner]
    outer = min(outer, key=lambda l: l[1] - l[0]) if outer else None
    n_inner = inner[1] - inner[0] + 1
    n_stores = sum(1 for i, b in stores if inner[0] <= i <= inner[1] and b == widest)
    paths = max(1, n_stores // 3)
    pixels = widest // out_bytes if widest >= out_bytes else 1
    extra = (outer[1] - outer[0] + 1 - n_inner) if outer else 0
    return {
        "inner_instructions": n_inner,
        "outer_extra": extra,
        "paths": paths,
        "pixels_per_path": pixels,
        "per_pixel": (n_inner / paths + extra) / pixels,
    }


def _compile_sass(src_dir: Path, file: str, defines: dict, arch: str, cuobjdump: str, work: Path) -> dict:
    cubin = work / ("k-" + "-".join(f"{k}{v}" for k, v in defines.items()) + ".cubin")
    cmd = [
        "nvcc",
        "-cubin",
        f"-arch={arch}",
        f"-I{src_dir}",
        *(f"-D{k}={v}" for k, v in defines.items()),
        str(src_dir / file),
        "-o",
        str(cubin),
    ]
    res = subprocess.run(cmd, capture_output=True, text=True)
    if res.returncode != 0:
        raise RuntimeError(f"nvcc failed: {' '.join(cmd)}\n{res.stderr}")
    dump = subprocess.run([cuobjdump, "-sass", str(cubin)], capture_output=True, text=True, check=True).stdout
    return sass_functions(dump)


def old_kernel_sources(ref: str, work: Path) -> Path:
    """The kernel sources at git ``ref`` with the record's method and flags made compile-time
    constants (so nvcc keeps one method's code in the loop, like today's per-variant loops)."""
    d = work / "old"
    d.mkdir(parents=True, exist_ok=True)
    for f in ("mix_normalize.cu", "dalimix_common.cuh"):
        text = subprocess.run(
            ["git", "-C", str(REPO), "show", f"{ref}:kernels/{f}"], capture_output=True, text=True, check=True
        ).stdout
        if f == "mix_normalize.cu":
            if OLD_RECORD_LINE not in text:
                raise RuntimeError(f"{ref}:kernels/{f} has no line {OLD_RECORD_LINE.strip()!r} to specialise")
            text = text.replace(
                OLD_RECORD_LINE,
                "    DmRecord R = rec[s];\n    R.method = DM_SASS_METHOD;\n    R.flags = DM_SASS_FLAGS;\n",
            )
        (d / f).write_text(text)
    return d


def sass_section(args) -> dict:
    """Instructions per output pixel of the main loop, per entry and loop variant, for today's kernel
    and the kernel at ``args.sass_baseline`` (nvcc -cubin for ``args.sass_arch``, cuobjdump -sass)."""
    from dalimix.ops.kernels import ENTRIES, kernel_dir

    cuobjdump = find_cuobjdump()
    if shutil.which("nvcc") is None or cuobjdump is None:
        return {"error": "needs nvcc and cuobjdump (CUDA toolkit) on PATH"}
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        old_dir = None
        if args.sass_baseline:
            try:
                old_dir = old_kernel_sources(args.sass_baseline, work)
            except (RuntimeError, subprocess.CalledProcessError) as e:
                print(f"baseline {args.sass_baseline}: {e}", file=sys.stderr)
        for label, kind, old_kind in SASS_VARIANTS:
            defines = {"DM_SASS_KIND": kind.split(" -D")[0]}
            defines.update(d.split("=") for d in kind.split(" -D")[1:])  # type: ignore[arg-type]
            new = _compile_sass(kernel_dir(), "mix_normalize.cu", defines, args.sass_arch, cuobjdump, work)
            old = (
                _compile_sass(
                    old_dir,
                    "mix_normalize.cu",
                    {"DM_SASS_METHOD": old_kind[0], "DM_SASS_FLAGS": old_kind[1]},
                    args.sass_arch,
                    cuobjdump,
                    work,
                )
                if old_dir and old_kind is not None
                else {}
            )
            for entry in ENTRIES:
                elt = 4 if "_f32_" in entry else 2
                row = {"variant": label, "entry": entry, "after": main_loop_cost(new[entry], elt)}
                if entry in old:
                    row["before"] = main_loop_cost(old[entry], elt)
                rows.append(row)
    return {"arch": args.sass_arch, "baseline": args.sass_baseline, "rows": rows}


def kernels_markdown(rows: list[dict], copy_gbps: float) -> str:
    header = ["method", "dtype", "layout", "kernel µs", "GB/s", "% of copy"]
    body = [
        [
            r["method"],
            r["dtype"],
            r["layout"],
            _fmt(r["kernel_us"], "{:.1f}"),
            _fmt(r["GBps"], "{:.0f}"),
            _fmt(r["percent_of_copy"], "{:.0f}%"),
        ]
        for r in rows
    ]
    return (
        f"Fused kernel alone (device time), batch {rows[0]['batch_size']} x {rows[0]['size']}², against a measured "
        f"device copy of {copy_gbps:.0f} GB/s (read + write)\n\n" + markdown_table(header, body) + "\n"
    )


def sass_markdown(sass: dict) -> str:
    if "error" in sass:
        return f"SASS counts skipped: {sass['error']}\n"
    entries = sorted(
        {r["entry"] for r in sass["rows"]}, key=lambda e: list(dict.fromkeys(r["entry"] for r in sass["rows"])).index(e)
    )
    short = [e.replace("dalimix_mix_normalize_", "") for e in entries]
    lines = [
        f"SASS instructions per output pixel, main loop, {sass['arch']} (before = {sass['baseline']} → after)",
        "",
        "| variant | " + " | ".join(short) + " |",
        "|---" * (len(short) + 1) + "|",
    ]
    by = {(r["variant"], r["entry"]): r for r in sass["rows"]}
    for label, _, _ in SASS_VARIANTS:
        cells = []
        for e in entries:
            r = by.get((label, e))
            after = r["after"].get("per_pixel") if r else None
            before = r.get("before", {}).get("per_pixel") if r else None
            cell = f"{after:.1f}" if after is not None else "?"
            cells.append(f"{before:.0f} → {cell}" if before is not None else cell)
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


# ------------------------------------------------------------------ kernel GB/s, every layout (GPU)
def kernel_section(args, device, copy_bps: float) -> list[dict]:
    """The fused kernel alone (device time) for every method, dtype and layout, as GB/s and % of copy."""
    rows = []
    rng = np.random.default_rng(args.seed)
    norm = Normalization(MEAN, STD)
    n, size = max(args.batch_sizes), args.size
    b = Batch(n, size, device, copies=3, seed=args.seed)
    for name, factory in dalimix_methods().items():
        mixer = factory() if factory else None
        params = mixer.plan(n, rng=rng, height=size, width=size) if mixer else None
        records = params.records() if params is not None else identity_records(n)
        masks = params.mask_pool(device) if params is not None else None
        gather = None
        if mixer is not None and mixer.mask_policy is not None:  # the policy's masks (and gather) via the hook
            records, masks, gather = _hooked(mixer, params, b.u8[0], b.labels, norm)
        for dtype_name in args.dtypes:
            dtype = DTYPES[dtype_name]
            elt = torch.tensor([], dtype=dtype).element_size()
            for channels_last in (False, True):
                out = allocate_output(n, size, size, dtype=dtype, channels_last=channels_last, device=device)

                def run(records=records, masks=masks, gather=gather, out=out, dtype=dtype, channels_last=channels_last):
                    mix_normalize(
                        b.next_u8(),
                        records,
                        masks,
                        gather,
                        norm=norm,
                        dtype=dtype,
                        channels_last=channels_last,
                        out=out,
                    )

                run()
                sec = kernel_seconds(run, device, calls=max(10, args.repeats))
                nbytes = n * size * size * 3 * ((1 if mixer is None else 2) + elt)
                rows.append(
                    {
                        "method": name,
                        "dtype": dtype_name,
                        "layout": "channels_last" if channels_last else "nchw",
                        "batch_size": n,
                        "size": size,
                        "kernel_us": 1e6 * sec if sec else None,
                        "GBps": nbytes / sec / 1e9 if sec else None,
                        "percent_of_copy": 100 * nbytes / sec / copy_bps if sec else None,
                    }
                )
    return rows


# ------------------------------------------------------------------------- random erasing
def separate_erase_pass(images: torch.Tensor, plan: ErasePlan, mode: str) -> torch.Tensor:
    """The batched torch pass the loader ran after the kernel before erasing was fused (the
    baseline of the erase table; not part of dalimix): N x K x H x W box masks, the box on top,
    one ``torch.where`` over the whole batch; pixel noise from torch's generator."""
    n, c, hgt, wid = images.shape
    if n == 0 or not plan.boxes[..., 2:].any():
        return images
    dev = images.device
    boxes = torch.from_numpy(plan.boxes).to(dev, non_blocking=True)
    top, left, h, w = boxes.unbind(-1)
    rows, cols = torch.arange(hgt, device=dev), torch.arange(wid, device=dev)
    in_rows = (rows >= top[..., None]) & (rows < (top + h)[..., None])
    in_cols = (cols >= left[..., None]) & (cols < (left + w)[..., None])
    cover = in_rows[..., :, None] & in_cols[..., None, :]
    inside = cover.any(1)[:, None]
    if mode == "const":
        fill = torch.zeros((), dtype=images.dtype, device=dev)
    elif mode == "rand":
        k = cover.shape[1]
        last = (cover * torch.arange(1, k + 1, device=dev)[None, :, None, None]).argmax(1)
        colors = torch.from_numpy(plan.colors).to(dev, non_blocking=True)
        fill = torch.gather(colors, 1, last.flatten(1)[..., None].expand(-1, -1, c))
        fill = fill.transpose(1, 2).reshape(n, c, hgt, wid).to(images.dtype)
    else:
        gen = torch.Generator(device=dev)
        gen.manual_seed(plan.seed)
        fill = torch.randn((n, c, hgt, wid), generator=gen, device=dev, dtype=torch.float32).to(images.dtype)
    images.copy_(torch.where(inside, fill, images))
    return images


def _erase_cases(b: Batch, norm: Normalization, rng) -> dict:
    """The erase table's cases on batch ``b``: MixUp alone, + erasing fused, + the old separate pass."""
    n, size = b.n, b.size
    mixer = Mixer(methods=[MixUp(alpha=0.8)], num_classes=NUM_CLASSES)
    records = mixer.plan(n, rng=rng, height=size, width=size).records()
    out = allocate_output(n, size, size, dtype=torch.float32, channels_last=False, device=b.device)
    cases = {"MixUp, no erasing": lambda: mix_normalize(b.next_u8(), records, None, norm=norm, out=out)}
    for mode in ("const", "pixel"):
        for p in (0.25, 1.0):
            eraser = RandomErasing(probability=p, mode=mode, max_count=1)
            plan = eraser.plan(n, 3, size, size, rng)

            def fused(eraser=eraser, plan=plan):
                mix_normalize(b.next_u8(), records, None, norm=norm, out=out, erase=eraser.table(plan))

            def separate(plan=plan, mode=mode):
                separate_erase_pass(mix_normalize(b.next_u8(), records, None, norm=norm, out=out), plan, mode)

            cases[f"+ erasing {mode} p={p} fused"] = fused
            cases[f"+ erasing {mode} p={p} separate pass (old)"] = separate
    return cases


def erase_section(args, device, progress_factory) -> list[dict]:
    """MixUp + random erasing fused vs the old separate pass vs MixUp alone: wall and CPU seconds per batch."""
    rows = []
    rng = np.random.default_rng(args.seed)
    norm = Normalization(MEAN, STD)
    size = args.size
    for n in args.batch_sizes:
        b = Batch(n, size, device, copies=2, seed=args.seed)
        cases = _erase_cases(b, norm, rng)
        bar = progress_factory(args.repeats * len(cases), f"erase b{n}")
        wall = {k: [] for k in cases}
        cpu = {k: [] for k in cases}
        for fn in cases.values():
            fn()
        names = list(cases)
        for r in range(args.repeats):
            for name in names[r % len(names) :] + names[: r % len(names)]:
                c0, t0 = time.process_time(), time.perf_counter()
                for _ in range(args.inner):
                    cases[name]()
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
                wall[name].append((time.perf_counter() - t0) / args.inner)
                cpu[name].append((time.process_time() - c0) / args.inner)
                bar.update(1)
        bar.close()
        base_wall, base_cpu = statistics.median(wall[names[0]]), statistics.median(cpu[names[0]])
        for name in names:
            rows.append(
                {
                    "batch_size": n,
                    "size": size,
                    "case": name,
                    "wall_ms": 1e3 * statistics.median(wall[name]),
                    "wall_ms_min": 1e3 * min(wall[name]),
                    "cpu_ms": 1e3 * statistics.median(cpu[name]),
                    "wall_vs_mixup": statistics.median(wall[name]) / base_wall,
                    "cpu_vs_mixup": statistics.median(cpu[name]) / base_cpu if base_cpu else None,
                }
            )
    return rows


def erase_markdown(rows: list[dict]) -> str:
    body = [
        [
            str(r["batch_size"]),
            r["case"],
            _med_min(r, "wall_ms"),
            _fmt(r["wall_vs_mixup"], "{:.2f}×"),
            _fmt(r["cpu_ms"]),
            _fmt(r["cpu_vs_mixup"], "{:.2f}×"),
        ]
        for r in rows
    ]
    return (
        f"Random erasing (timm's rule, one box), {rows[0]['size']}² float32, per batch, interleaved repeats "
        "(wall: median / min; CPU: process time, all threads):\n\n"
        + markdown_table(["batch", "case", "wall ms", "× MixUp", "CPU ms", "CPU × MixUp"], body)
        + "\n"
    )


# --------------------------------------------------------------------------------- timing
def timed(fn, device: torch.device, inner: int = 1) -> float:
    """Seconds per call of ``fn`` (CUDA events on the GPU, the host clock on the CPU)."""
    if device.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(inner):
            fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / 1e3 / inner
    t0 = time.perf_counter()
    for _ in range(inner):
        fn()
    return (time.perf_counter() - t0) / inner


def interleaved(cases: dict, device, repeats: int, inner: int, progress=None) -> dict:
    """``{name: [seconds, ...]}``: one warm-up call each, then ``repeats`` rounds in rotating order."""
    names = list(cases)
    for name in names:
        cases[name]()
    if device.type == "cuda":
        torch.cuda.synchronize()
    out = {name: [] for name in names}
    for r in range(repeats):
        for name in names[r % len(names) :] + names[: r % len(names)]:
            out[name].append(timed(cases[name], device, inner))
            if progress is not None:
                progress.update(1)
    return out


def copy_bandwidth(device: torch.device, nbytes: int, repeats: int) -> float:
    """Bytes/s of ``dst.copy_(src)`` counting the read and the write."""
    src = torch.randint(0, 255, (nbytes,), dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    times = [timed(lambda: dst.copy_(src), device) for _ in range(repeats + 1)][1:]
    return 2 * nbytes / statistics.median(times)


def kernel_seconds(fn, device: torch.device, calls: int) -> float | None:
    """Mean device time of dalimix's fused kernel over ``calls`` calls of ``fn`` (torch profiler)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(calls):
            fn()
        torch.cuda.synchronize(device)
    total, count = 0.0, 0
    for evt in prof.key_averages():
        if "dalimix_mix_normalize" in evt.key:
            device_us = getattr(evt, "device_time_total", None)  # older torch: cuda_time_total
            total += evt.cuda_time_total if device_us is None else device_us
            count += evt.count
    return total / count / 1e6 if count else None


# ----------------------------------------------------------------------------- stage cases
class Batch:
    """The shared inputs: ``copies`` different uint8 batches (so the GPU cache does not hold them), labels."""

    def __init__(self, n: int, size: int, device: torch.device, copies: int, seed: int = 0):
        g = torch.Generator().manual_seed(seed)
        self.n, self.size, self.device = n, size, device
        self.u8 = [
            torch.randint(0, 256, (n, size, size, 3), dtype=torch.uint8, generator=g).to(device) for _ in range(copies)
        ]
        self.labels = torch.randint(0, NUM_CLASSES, (n,), generator=g).to(device)
        self.mean = torch.tensor([255 * m for m in MEAN], device=device).view(1, 3, 1, 1)
        self.std = torch.tensor([255 * s for s in STD], device=device).view(1, 3, 1, 1)
        self.normalised = self.normalise(self.u8[0])
        self._turn = 0

    def next_u8(self) -> torch.Tensor:
        self._turn = (self._turn + 1) % len(self.u8)
        return self.u8[self._turn]

    def normalise(self, u8: torch.Tensor) -> torch.Tensor:
        """uint8 N x H x W x 3 -> float32 N x 3 x H x W, ``(x - mean) / std`` (timm's prefetcher math)."""
        return u8.permute(0, 3, 1, 2).float().sub_(self.mean).div_(self.std)


def dalimix_cases(b: Batch, dtype: torch.dtype, rng) -> tuple[dict, dict, dict]:
    """(stage cases, op-only cases, bytes per call) for every dalimix method at ``dtype``."""
    norm = Normalization(MEAN, STD)
    stage, op, nbytes = {}, {}, {}
    elt = torch.tensor([], dtype=dtype).element_size()
    for name, factory in dalimix_methods().items():
        mixer = factory() if factory else None
        if mixer is None:
            records, params, masks = identity_records(b.n), None, None
        else:
            params = mixer.plan(b.n, rng=rng, height=b.size, width=b.size)
            records = params.records()
            masks = params.mask_pool(b.device)
        out = allocate_output(b.n, b.size, b.size, dtype=dtype, channels_last=False, device=b.device)
        label = f"dalimix {name}" + ("" if dtype == torch.float32 else f" {str(dtype)[6:]}")

        def run_stage(mixer=mixer, params=params, records=records):
            masks_now = params.mask_pool(b.device) if params is not None else None
            dst = allocate_output(b.n, b.size, b.size, dtype=dtype, channels_last=False, device=b.device)
            mix_normalize(b.next_u8(), records, masks_now, norm=norm, dtype=dtype, out=dst)
            if mixer is not None:
                mixer.targets(b.labels, params, NUM_CLASSES)

        def run_op(records=records, masks=masks, out=out):
            mix_normalize(b.next_u8(), records, masks, norm=norm, dtype=dtype, out=out)

        if mixer is not None and mixer.mask_policy is not None:
            run_stage, run_op = _policy_cases(mixer, params, b, norm, dtype, out)

        stage[label], op[label] = run_stage, run_op
        reads = 1 if mixer is None else 2
        nbytes[label] = b.n * b.size * b.size * 3 * (reads + elt)
    return stage, op, nbytes


def _hooked(mixer, params, u8, labels, norm, dtype=torch.float32):
    """One batch's records, mask pool and gather table from a mask policy through the hook stage (cloned)."""
    import copy

    from dalimix.hook import MaskHook, MaskHookStage

    policy = mixer.mask_policy
    policy._norm = norm
    hook = MaskHookStage(MaskHook(fn=policy.mask_policy, **policy.hook_options), u8.device)
    p = copy.copy(params)
    p.flags, p.ints = params.flags.copy(), params.ints.copy()
    unmixed = mix_normalize(u8, None, None, norm=norm, dtype=dtype)
    records, pool = hook.prepare(unmixed, p, epoch=0, step=0, labels=labels)
    gather = None if p.device_gather is None else p.device_gather.clone()
    return records, pool.clone(), gather


def _policy_cases(mixer, params, b: Batch, norm, dtype, out):
    """(stage, op) of a mask policy as the loader runs it: the unmixed pass, the policy's masks on the
    device, the hook stage's checks and copy, the mix, the targets; op = the mix alone."""
    import copy

    from dalimix.hook import MaskHook, MaskHookStage

    policy = mixer.mask_policy
    policy._norm = norm
    hook = MaskHookStage(MaskHook(fn=policy.mask_policy, **policy.hook_options), b.device)

    def run_stage():
        u8, p = b.next_u8(), copy.copy(params)
        p.flags, p.ints = params.flags.copy(), params.ints.copy()
        unmixed = mix_normalize(u8, None, None, norm=norm, dtype=dtype)
        records, pool = hook.prepare(unmixed, p, epoch=0, step=0, labels=b.labels)
        dst = allocate_output(b.n, b.size, b.size, dtype=dtype, channels_last=False, device=b.device)
        mix_normalize(u8, records, pool, p.device_gather, norm=norm, dtype=dtype, out=dst)
        mixer.targets(b.labels, p, NUM_CLASSES)

    records, pool, gather = _hooked(mixer, params, b.u8[0], b.labels, norm, dtype)

    def run_op():
        mix_normalize(b.next_u8(), records, pool, gather, norm=norm, dtype=dtype, out=out)

    return run_stage, run_op


def baseline_cases(b: Batch) -> tuple[dict, dict]:
    """(normalise + mix cases, mix-only cases) of timm, torchvision v2 and hand-written torch."""
    from timm.data import FastCollateMixup
    from timm.data import Mixup as TimmMixup
    from torchvision.transforms import v2

    both, only = {}, {}
    timm_mix = {
        "mixup": TimmMixup(mixup_alpha=0.8, cutmix_alpha=0.0, label_smoothing=0.1, num_classes=NUM_CLASSES),
        "cutmix": TimmMixup(mixup_alpha=0.0, cutmix_alpha=1.0, label_smoothing=0.1, num_classes=NUM_CLASSES),
    }
    for name, fn in timm_mix.items():
        both[f"timm Mixup {name}"] = lambda fn=fn: fn(b.normalise(b.next_u8()), b.labels)
        only[f"timm Mixup {name}"] = lambda fn=fn: fn(b.normalised, b.labels)
    tv_norm = v2.Compose([v2.ToDtype(torch.float32, scale=True), v2.Normalize(mean=MEAN, std=STD)])
    tv_mix = {
        "mixup": v2.MixUp(alpha=0.8, num_classes=NUM_CLASSES),
        "cutmix": v2.CutMix(alpha=1.0, num_classes=NUM_CLASSES),
    }
    for name, fn in tv_mix.items():
        both[f"torchvision v2 {name}"] = lambda fn=fn: fn(tv_norm(b.next_u8().permute(0, 3, 1, 2)), b.labels)
        only[f"torchvision v2 {name}"] = lambda fn=fn: fn(b.normalised, b.labels)
    rng = np.random.default_rng(0)
    for name in ("mixup", "cutmix"):
        kw = dict(num_classes=NUM_CLASSES, rng=rng, method=name)
        both[f"torch by hand {name}"] = lambda kw=kw: handmix.mix_batch(b.normalise(b.next_u8()), b.labels, **kw)
        only[f"torch by hand {name}"] = lambda kw=kw: handmix.mix_batch(b.normalised, b.labels, **kw)
    if b.device.type == "cpu":
        per_sample = [
            [(img.permute(2, 0, 1).contiguous().numpy(), int(y)) for img, y in zip(u8, b.labels)] for u8 in b.u8
        ]
        turn = {"i": 0}

        def samples():
            turn["i"] = (turn["i"] + 1) % len(per_sample)
            return per_sample[turn["i"]]

        fast = {
            "mixup": FastCollateMixup(mixup_alpha=0.8, cutmix_alpha=0.0, label_smoothing=0.1, num_classes=NUM_CLASSES),
            "cutmix": FastCollateMixup(mixup_alpha=0.0, cutmix_alpha=1.0, label_smoothing=0.1, num_classes=NUM_CLASSES),
        }
        for name, fn in fast.items():

            def with_norm(fn=fn):
                x, t = fn(samples())
                return x.float().sub_(b.mean).div_(b.std), t

            both[f"timm FastCollateMixup {name}"] = with_norm
            only[f"timm FastCollateMixup {name}"] = lambda fn=fn: fn(samples())
    return both, only


def stage_section(args, device, progress_factory) -> tuple[list[dict], dict]:
    """Rows of the stage table for every batch size; plus the copy bandwidth."""
    rows = []
    copy_bps = copy_bandwidth(device, args.copy_bytes, repeats=max(3, args.repeats))
    rng = np.random.default_rng(args.seed)
    for n in args.batch_sizes:
        b = Batch(n, args.size, device, copies=3 if device.type == "cuda" else 2, seed=args.seed)
        stage, op, nbytes = {}, {}, {}
        for dtype_name in args.dtypes:
            s, o, nb = dalimix_cases(b, DTYPES[dtype_name], rng)
            stage.update(s)
            op.update(o)
            nbytes.update(nb)
        both, only = baseline_cases(b)
        bar = progress_factory(args.repeats * (len(stage) + len(op) + len(both) + len(only)), f"stage b{n}")
        t_stage = interleaved({**stage, **both}, device, args.repeats, args.inner, bar)
        t_op = interleaved(
            {**op, **{f"{k} (mix only)": v for k, v in only.items()}}, device, args.repeats, args.inner, bar
        )
        bar.close()
        t_kernel = {}
        if device.type == "cuda":
            for name, fn in op.items():
                t_kernel[name] = kernel_seconds(fn, device, calls=max(10, args.repeats))
        ref = {
            "mixup": statistics.median(t_stage["dalimix mixup"]),
            "cutmix": statistics.median(t_stage["dalimix cutmix"]),
        }
        for name, ts in t_stage.items():
            suffix = name[len("dalimix ") :].split(" ")[-1] if name.startswith("dalimix ") else ""
            mixup_name = "dalimix mixup" + (f" {suffix}" if suffix in DTYPES else "")
            ref_op = statistics.median(t_op[mixup_name])
            ref_kernel = t_kernel.get(mixup_name)
            row = {
                "batch_size": n,
                "size": args.size,
                "case": name,
                "stage_ms": 1e3 * statistics.median(ts),
                "stage_ms_min": 1e3 * min(ts),
                "stage_ms_max": 1e3 * max(ts),
            }
            method = "cutmix" if "cutmix" in name and "elem" not in name else "mixup"
            row["stage_vs_dalimix"] = statistics.median(ts) / ref[method] if not name.startswith("dalimix") else None
            if name in t_op:
                row["op_ms"] = 1e3 * statistics.median(t_op[name])
                row["op_ms_min"] = 1e3 * min(t_op[name])
                row["op_vs_dalimix_mixup"] = statistics.median(t_op[name]) / ref_op
            if f"{name} (mix only)" in t_op:
                row["mix_only_ms"] = 1e3 * statistics.median(t_op[f"{name} (mix only)"])
                row["mix_only_ms_min"] = 1e3 * min(t_op[f"{name} (mix only)"])
            if name in t_kernel and t_kernel[name]:
                row["kernel_ms"] = 1e3 * t_kernel[name]
                row["kernel_vs_dalimix_mixup"] = t_kernel[name] / ref_kernel if ref_kernel else None
                row["effective_GBps"] = nbytes[name] / t_kernel[name] / 1e9
                row["percent_of_copy"] = 100 * nbytes[name] / t_kernel[name] / copy_bps
            elif name in nbytes:
                row["effective_GBps"] = nbytes[name] / statistics.median(t_op[name]) / 1e9
                row["percent_of_copy"] = 100 * nbytes[name] / statistics.median(t_op[name]) / copy_bps
            rows.append(row)
    return rows, {"copy_GBps": copy_bps / 1e9, "copy_bytes": args.copy_bytes}


# ------------------------------------------------------------------------------- planning
def baseline_fmix(rev: str):
    """The FMix class of ``dalimix/mix/methods.py`` at git ``rev`` (the planning table's "before" rows)."""
    import importlib.util

    text = subprocess.run(
        ["git", "-C", str(REPO), "show", f"{rev}:dalimix/mix/methods.py"], capture_output=True, text=True, check=True
    ).stdout
    work = Path(tempfile.mkdtemp(prefix="dalimix-baseline-"))
    path = work / "methods.py"
    # its methods subclass today's base class, so today's Mixer takes them
    path.write_text(
        text.replace(
            "class MixMethod:", "from dalimix.mix.methods import MixMethod as _Today\n\n\nclass MixMethod(_Today):", 1
        )
    )
    spec = importlib.util.spec_from_file_location("dalimix.mix._baseline_methods", path)
    module = importlib.util.module_from_spec(spec)
    module.__package__ = "dalimix.mix"
    spec.loader.exec_module(module)
    return module.FMix


def planning_methods(args) -> dict:
    methods = {k: v for k, v in dalimix_methods().items() if v is not None and "elem" not in k}
    methods["mixup|cutmix"] = lambda: Mixup(mixup_alpha=0.8, cutmix_alpha=1.0, num_classes=NUM_CLASSES)
    if torch.cuda.is_available():
        methods["fmix on cuda"] = lambda: Mixer(methods=[FMix(device="cuda")], num_classes=NUM_CLASSES)
    if args.planning_baseline:
        try:
            old = baseline_fmix(args.planning_baseline)
        except (subprocess.CalledProcessError, OSError) as e:
            print(f"planning baseline {args.planning_baseline}: {e}", file=sys.stderr)
        else:
            rev = args.planning_baseline
            methods[f"fmix @{rev}"] = lambda: Mixer(methods=[old()], num_classes=NUM_CLASSES)
            methods[f"fmix 1/4 res @{rev}"] = lambda: Mixer(methods=[old(mask_scale=4)], num_classes=NUM_CLASSES)
    if args.planning_methods:
        wanted = [m.strip() for m in args.planning_methods.split(",") if m.strip()]
        methods = {k: v for k, v in methods.items() if any(k == w or k.startswith(w + " ") for w in wanted)}
    return methods


def planning_section(args, progress_factory) -> list[dict]:
    """Host cost per batch of planning each method in each mode: wall and CPU time (process time of
    the whole process, so the thread pool FMix plans on counts), repeats interleaved across methods."""
    rows = []
    methods = planning_methods(args)
    repeats = max(20, args.repeats) if args.planning_repeats is None else args.planning_repeats
    bar = progress_factory(len(args.batch_sizes) * len(methods) * 2 * (repeats + 1), "planning")
    for n in args.batch_sizes:
        cases = []
        for name, factory in methods.items():
            for mode in ("batch", "elem"):
                mixer = factory()
                mixer.mode = mode
                cases.append(
                    {"name": name, "mode": mode, "mixer": mixer, "rng": np.random.default_rng(args.seed), "t": []}
                )
        for _ in range(repeats + 1):  # the first round warms up (caches, FFT plans, the thread pool)
            for c in cases:
                cuda = "cuda" in c["name"]
                t0, c0 = time.perf_counter(), time.process_time()
                p = c["mixer"].plan(n, rng=c["rng"], height=args.size, width=args.size)
                p.records()
                t1, c1 = time.perf_counter(), time.process_time()
                p.mask_pool("cuda" if cuda else "cpu")
                if cuda:
                    torch.cuda.synchronize()  # device time of the masks, not only the launches
                t2 = time.perf_counter()
                c["t"].append((t1 - t0, c1 - c0, t2 - t1))
                bar.update(1)
        for c in cases:
            t = c["t"][1:]
            plan_t, cpu_t, pool_t = ([r[i] for r in t] for i in range(3))
            rows.append(
                {
                    "batch_size": n,
                    "size": args.size,
                    "method": c["name"],
                    "mode": c["mode"],
                    "plan_ms": 1e3 * statistics.median(plan_t),
                    "plan_ms_min": 1e3 * min(plan_t),
                    "plan_ms_max": 1e3 * max(plan_t),
                    "plan_cpu_ms": 1e3 * statistics.median(cpu_t),
                    "mask_pool_ms": 1e3 * statistics.median(pool_t),
                }
            )
    bar.close()
    return rows


def puzzlemix_planning_section(args, device) -> list[dict]:
    """PuzzleMix's mask planning per batch (saliency, pooling, the masks' cuts and one assignment per
    sample on the host), binary masks (``n_labels=2``: one exact min-cut per sample) and the paper's
    three weights (``n_labels=3``: alpha-beta swap moves, several cuts per sample), repeats
    interleaved: CPU time of the calling thread (``time.process_time``) and wall time."""
    rows = []
    policies = {n_labels: PuzzleMix(block_num=4, n_labels=n_labels) for n_labels in (2, 3)}
    for policy in policies.values():
        policy._norm = Normalization(MEAN, STD)
    g = torch.Generator().manual_seed(args.seed)
    for n in args.batch_sizes:
        images = torch.randn(n, 3, args.size, args.size, generator=g).to(device)
        lam = torch.rand(n, generator=g).to(device)
        partner = torch.roll(torch.arange(n), 1).to(device)
        for transport in (False, True):
            cpu_t: dict[int, list[float]] = {k: [] for k in policies}
            wall_t: dict[int, list[float]] = {k: [] for k in policies}
            for _ in range(max(3, args.repeats // 2) + 1):
                for n_labels, policy in policies.items():
                    policy.transport = transport
                    c0, w0 = time.process_time(), time.perf_counter()
                    policy.plan(images, lam, partner)
                    cpu_t[n_labels].append(time.process_time() - c0)
                    wall_t[n_labels].append(time.perf_counter() - w0)
            for n_labels in policies:
                cpu_ms = 1e3 * statistics.median(cpu_t[n_labels][1:])
                rows.append(
                    {
                        "batch_size": n,
                        "size": args.size,
                        "grid": "4x4",
                        "n_labels": n_labels,
                        "transport": transport,
                        "cpu_ms": cpu_ms,
                        "wall_ms": 1e3 * statistics.median(wall_t[n_labels][1:]),
                        "cpu_ms_per_sample": cpu_ms / n,
                    }
                )
    return rows


def puzzlemix_markdown(rows: list[dict]) -> str:
    header = ["batch", "size", "grid", "n_labels", "transport", "CPU ms / batch", "wall ms / batch", "CPU ms / sample"]
    body = [
        [
            str(r["batch_size"]),
            str(r["size"]),
            r["grid"],
            str(r["n_labels"]),
            "on" if r["transport"] else "off",
            f"{r['cpu_ms']:.1f}",
            f"{r['wall_ms']:.1f}",
            f"{r['cpu_ms_per_sample']:.2f}",
        ]
        for r in rows
    ]
    return "PuzzleMix planning per batch (host: saliency, the masks' cuts and an assignment per sample)\n\n" + (
        markdown_table(header, body) + "\n"
    )


# --------------------------------------------------------------------------------- loader
@contextlib.contextmanager
def plan_probe(mixer):
    """Time the mixer's ``plan`` (on the planner thread) and the loader's wait for it (main thread)."""
    from dalimix.loader.stages import Finisher

    stats = {"plan_s": 0.0, "plans": 0, "wait_s": 0.0, "waits": 0, "wait_measured": False}
    original_plan = mixer.plan

    def plan(*a, **k):
        t0 = time.perf_counter()
        try:
            return original_plan(*a, **k)
        finally:
            stats["plan_s"] += time.perf_counter() - t0
            stats["plans"] += 1

    mixer.plan = plan
    take = getattr(Finisher, "_take_plan", None)  # the loader's hand-over point, if it has one
    if take is not None:

        def timed_take(self, *args):
            t0 = time.perf_counter()
            try:
                return take(self, *args)
            finally:
                stats["wait_s"] += time.perf_counter() - t0
                stats["waits"] += 1

        Finisher._take_plan = timed_take
        stats["wait_measured"] = True
    try:
        yield stats
    finally:
        mixer.plan = original_plan
        if take is not None:
            Finisher._take_plan = take


def loader_section(args, device, progress_factory) -> list[dict]:
    from dalimix import ImageLoader
    from dalimix.bench.driver import make_view

    root = args.data
    if root is None:
        from dalimix.demo_data import demo_dataset

        root = str(demo_dataset(progress=True))
    view = Path(tempfile.mkdtemp(prefix="dalimix-bench-mix-view-"))
    try:
        data = make_view(root, view, images=args.loader_batches * args.loader_batch, max_images=args.loader_max_images)
        setups = {
            "off": None,
            "mixup|cutmix batch": Mixup(mixup_alpha=0.8, cutmix_alpha=1.0),
            "fmix elem": Mixer(methods=[FMix()], mode="elem", label_smoothing=0.1),
        }
        loaders = {
            name: ImageLoader(
                root=str(view),
                batch_size=args.loader_batch,
                size=args.size,
                device=str(device),
                mix=mix,
                last_batch_policy="drop",
                seed=args.seed,
            )
            for name, mix in setups.items()
        }
        results = {name: {"ips": [], "plan_ms": [], "wait_ms": []} for name in setups}
        names = list(setups)
        bar = progress_factory((1 + args.loader_epochs) * len(names), "loader")
        for rnd in range(1 + args.loader_epochs):
            for name in names[rnd % len(names) :] + names[: rnd % len(names)]:
                ld, mix = loaders[name], setups[name]
                with plan_probe(mix) if mix is not None else contextlib.nullcontext({}) as stats:
                    if device.type == "cuda":
                        torch.cuda.synchronize()
                    t0 = time.perf_counter()
                    n = 0
                    for images, _ in ld:
                        n += images.shape[0]
                    if device.type == "cuda":
                        torch.cuda.synchronize()
                    dt = time.perf_counter() - t0
                bar.update(1)
                if rnd == 0:
                    continue  # warm-up
                results[name]["ips"].append(n / dt)
                if stats.get("plans"):
                    results[name]["plan_ms"].append(1e3 * stats["plan_s"] / stats["plans"])
                if stats.get("waits"):
                    results[name]["wait_ms"].append(1e3 * stats["wait_s"] / stats["waits"])
        bar.close()
        for ld in loaders.values():
            ld.close()
    finally:
        shutil.rmtree(view, ignore_errors=True)
    off = statistics.median(results["off"]["ips"])
    rows = []
    for name, r in results.items():
        med = statistics.median(r["ips"])
        rows.append(
            {
                "setup": name,
                "batch_size": args.loader_batch,
                "size": args.size,
                "images_per_epoch": data["files"],
                "images_per_s": med,
                "images_per_s_min": min(r["ips"]),
                "images_per_s_max": max(r["ips"]),
                "vs_off": med / off,
                "plan_ms_per_batch": statistics.median(r["plan_ms"]) if r["plan_ms"] else None,
                "wait_ms_per_batch": statistics.median(r["wait_ms"]) if r["wait_ms"] else None,
            }
        )
    return rows


# --------------------------------------------------------------------------------- output
def _fmt(v, f="{:.2f}"):
    return "–" if v is None else f.format(v)


def _med_min(row: dict, key: str) -> str:
    if row.get(key) is None:
        return "–"
    return f"{row[key]:.2f} / {row[f'{key}_min']:.2f}" if row.get(f"{key}_min") is not None else f"{row[key]:.2f}"


def planning_markdown(rows: list[dict]) -> str:
    return markdown_table(
        ["batch", "size", "method", "mode", "plan ms (median / min)", "plan ms max", "plan CPU ms", "mask pool ms"],
        [
            [
                str(r["batch_size"]),
                str(r["size"]),
                r["method"],
                r["mode"],
                _med_min(r, "plan_ms"),
                _fmt(r["plan_ms_max"]),
                _fmt(r.get("plan_cpu_ms")),
                _fmt(r["mask_pool_ms"]),
            ]
            for r in rows
        ],
    )


def markdown(result: dict) -> str:
    m, s = result["machine"], result["settings"]
    gpu = s["device"] == "cuda"
    parts = [
        f"{m['date'][:10]}, {one_line(m)}, device {s['device']}; load average "
        f"{m['loadavg_start'][0]:.1f} at the start, {m['loadavg_end'][0]:.1f} at the end. "
        f"{s['size']}×{s['size']} px, {NUM_CLASSES} classes, median of {s['repeats']} interleaved repeats. "
        f"Copy bandwidth (copy_, read + write): {result['copy']['copy_GBps']:.1f} GB/s.",
        "",
    ]
    header = ["batch", "case", "stage ms", "× dalimix", "mix only ms", "op ms", "op × MixUp"]
    if gpu:
        header += ["kernel ms", "kernel × MixUp", "GB/s", "% of copy"]
    body = []
    for r in result["stage"]:
        cells = [
            str(r["batch_size"]),
            r["case"],
            _med_min(r, "stage_ms"),
            _fmt(r.get("stage_vs_dalimix"), "{:.2f}×"),
            _med_min(r, "mix_only_ms"),
            _med_min(r, "op_ms"),
            _fmt(r.get("op_vs_dalimix_mixup"), "{:.2f}×"),
        ]
        if gpu:
            cells += [
                _fmt(r.get("kernel_ms"), "{:.3f}"),
                _fmt(r.get("kernel_vs_dalimix_mixup"), "{:.2f}×"),
                _fmt(r.get("effective_GBps"), "{:.0f}"),
                _fmt(r.get("percent_of_copy"), "{:.0f}%"),
            ]
        body.append(cells)
    parts += [
        "Mixing stage, per batch (uint8 in; normalised float + soft targets out); times are median / minimum "
        "of the repeats, ratios of medians:",
        "",
        markdown_table(header, body),
    ]
    parts += [
        "",
        "Planning on the host, per batch (plan + records: planner thread; mask pool: main thread):",
        "",
        planning_markdown(result["planning"]),
    ]
    if result.get("loader"):
        parts += [
            "",
            "ImageLoader, epochs interleaved (wait = main thread blocked on the next batch's plan):",
            "",
            markdown_table(
                ["setup", "batch", "images/s", "min–max", "vs off", "plan ms/batch", "wait ms/batch"],
                [
                    [
                        r["setup"],
                        str(r["batch_size"]),
                        _fmt(r["images_per_s"], "{:.0f}"),
                        f"{r['images_per_s_min']:.0f}–{r['images_per_s_max']:.0f}",
                        _fmt(r["vs_off"], "{:.3f}"),
                        _fmt(r["plan_ms_per_batch"]),
                        _fmt(r["wait_ms_per_batch"], "{:.3f}"),
                    ]
                    for r in result["loader"]
                ],
            ),
        ]
    return "\n".join(parts) + "\n"


def _int_list(text):
    return tuple(int(v) for v in text.split(",") if v.strip())


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", choices=["cpu", "cuda"], default=None, help="default: cuda when available")
    p.add_argument("--batch-sizes", type=_int_list, default=None, help="default 64,128,256")
    p.add_argument("--size", type=int, default=None, help="default 224")
    p.add_argument(
        "--dtypes",
        default=None,
        help="dalimix output dtypes (default: float32 on CPU; float32,float16,bfloat16 on CUDA)",
    )
    p.add_argument("--repeats", type=int, default=None, help="timed repeats per case (default 5 on CPU, 30 on CUDA)")
    p.add_argument("--inner", type=int, default=None, help="calls per timed repeat (default 1 on CPU, 5 on CUDA)")
    p.add_argument(
        "--copy-bytes",
        type=int,
        default=None,
        help="buffer of the copy-bandwidth reference (default 1 GiB on CUDA, 256 MiB on CPU)",
    )
    p.add_argument("--data", default=None, help="ImageFolder tree for the loader section (default: the demo data set)")
    p.add_argument("--loader-batch", type=int, default=None, help="default 64 on CPU, 256 on CUDA")
    p.add_argument("--loader-batches", type=int, default=None, help="batches per loader epoch (default 6)")
    p.add_argument("--loader-epochs", type=int, default=None, help="timed loader epochs per setup (default 3)")
    p.add_argument("--loader-max-images", type=int, default=5000)
    p.add_argument("--no-loader", action="store_true", help="skip the loader section")
    p.add_argument("--quick", action="store_true", help="tiny sizes, a few seconds: a smoke run")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="benchmarks/results", help="where the JSON and markdown go")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument(
        "--sass-only",
        action="store_true",
        help="only the SASS instructions-per-pixel table (no GPU needed: nvcc + cuobjdump)",
    )
    p.add_argument("--no-sass", action="store_true", help="skip the SASS table")
    p.add_argument(
        "--planning-only", action="store_true", help="only the planning table (host cost of Mixer.plan per batch)"
    )
    p.add_argument(
        "--planning-methods",
        default=None,
        help="comma-separated planning rows to keep, by name or prefix (e.g. 'fmix' keeps every FMix row)",
    )
    p.add_argument(
        "--planning-baseline",
        default=None,
        help="git revision whose FMix is timed in the same run (rows 'fmix @REV', 'fmix 1/4 res @REV')",
    )
    p.add_argument("--planning-repeats", type=int, default=None, help="timed plans per case (default max(20, repeats))")
    p.add_argument("--no-erase", action="store_true", help="skip the random erasing table")
    p.add_argument("--erase-only", action="store_true", help="only the random erasing table")
    p.add_argument("--sass-arch", default="sm_90", help="architecture of the SASS table (default sm_90)")
    p.add_argument(
        "--sass-baseline",
        default=INSTRUCTION_BOUND_KERNEL,
        help="git revision whose kernel is the table's 'before' column (default: the last commit of the "
        "instruction-bound kernel, before the per-pixel cost work; '' for none)",
    )
    args = p.parse_args(argv)
    if args.device is None:
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda but torch sees no CUDA GPU")
    cuda = args.device == "cuda"
    quick = dict(
        batch_sizes=(4,),
        size=64,
        repeats=2,
        inner=1,
        copy_bytes=2**20,
        loader_batch=4,
        loader_batches=2,
        loader_epochs=1,
        dtypes="float32",
    )
    full = dict(
        batch_sizes=(64, 128, 256),
        size=224,
        repeats=30 if cuda else 5,
        inner=5 if cuda else 1,
        copy_bytes=2**30 if cuda else 2**28,
        loader_batch=256 if cuda else 64,
        loader_batches=6,
        loader_epochs=3,
        dtypes="float32,float16,bfloat16" if cuda else "float32",
    )
    for key, value in (quick if args.quick else full).items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.erase_only:
        args.no_sass = True
    if args.planning_only or (args.quick and not args.sass_only):
        args.no_sass = True  # a smoke run: the SASS table takes ~22 nvcc builds
    args.dtypes = tuple(d.strip() for d in args.dtypes.split(",") if d.strip())
    bad = [d for d in args.dtypes if d not in DTYPES]
    if bad:
        p.error(f"--dtypes {bad}: use {','.join(DTYPES)}")
    if "float32" not in args.dtypes:
        args.dtypes = ("float32", *args.dtypes)
    if not args.batch_sizes or any(n < 2 or n % 2 for n in args.batch_sizes):
        p.error("--batch-sizes: even integers >= 2 (timm's Mixup needs even batches)")
    for key in ("size", "repeats", "inner", "loader_batch", "loader_batches", "loader_epochs"):
        if getattr(args, key) < 1:
            p.error(f"--{key.replace('_', '-')}: a positive integer")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    device = torch.device(args.device)

    def progress_factory(total, desc):
        return progress_bar(total, desc, enabled=not args.no_progress, unit="run", leave=False)

    machine = describe(with_gpu=device.type == "cuda")
    sass = None if args.no_sass else sass_section(args)
    settings = {k: (list(v) if isinstance(v, tuple) else v) for k, v in vars(args).items()}
    if args.sass_only:
        result = {"kind": "dalimix-bench-mix-sass", "machine": machine, "settings": settings, "sass": sass}
        text = sass_markdown(sass)
    elif args.planning_only:
        planning = planning_section(args, progress_factory)
        machine["loadavg_end"] = list(os.getloadavg())
        result = {"kind": "dalimix-bench-mix-planning", "machine": machine, "settings": settings, "planning": planning}
        text = (
            f"{machine['date'][:10]}, {one_line(machine)}; load average {machine['loadavg_start'][0]:.1f} at the "
            f"start, {machine['loadavg_end'][0]:.1f} at the end. Planning per batch, repeats interleaved:\n\n"
            + planning_markdown(planning)
        )
    elif args.erase_only:
        erase = erase_section(args, device, progress_factory)
        machine["loadavg_end"] = list(os.getloadavg())
        result = {"kind": "dalimix-bench-mix-erase", "machine": machine, "settings": settings, "erase": erase}
        text = (
            f"{machine['date'][:10]}, {one_line(machine)}, device {args.device}; load average "
            f"{machine['loadavg_start'][0]:.1f} at the start, {machine['loadavg_end'][0]:.1f} at the end.\n\n"
            + erase_markdown(erase)
        )
    else:
        stage, copy = stage_section(args, device, progress_factory)
        kernels = kernel_section(args, device, copy["copy_GBps"] * 1e9) if device.type == "cuda" else None
        planning = planning_section(args, progress_factory)
        puzzle = puzzlemix_planning_section(args, device)
        loader = None if args.no_loader else loader_section(args, device, progress_factory)
        erase = None if args.no_erase else erase_section(args, device, progress_factory)
        machine["loadavg_end"] = list(os.getloadavg())
        result = {
            "kind": "dalimix-bench-mix",
            "machine": machine,
            "settings": settings,
            "copy": copy,
            "stage": stage,
            "kernels": kernels,
            "planning": planning,
            "puzzlemix_planning": puzzle,
            "loader": loader,
            "erase": erase,
            "sass": sass,
        }
        text = markdown(result) + "\n" + puzzlemix_markdown(puzzle)
        if erase:
            text += "\n" + erase_markdown(erase)
        if kernels:
            text += "\n" + kernels_markdown(kernels, copy["copy_GBps"])
        if sass is not None:
            text += "\n" + sass_markdown(sass)
    print(text)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    kind = (
        "bench-mix-sass"
        if args.sass_only
        else "bench-mix-planning"
        if args.planning_only
        else "bench-mix-erase"
        if args.erase_only
        else "bench-mix"
    )
    stem = f"{kind}-{short_name(machine, args.device)}-{time.strftime('%Y%m%d-%H%M%S')}"
    (out / f"{stem}.json").write_text(json.dumps(result, indent=1) + "\n")
    (out / f"{stem}.md").write_text(text)
    print(f"json: {out / (stem + '.json')}\nmd: {out / (stem + '.md')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
