"""Summaries of a ``dalimix bench`` run: markdown tables, JSON, a PNG bar chart.

Per (library, mixing, batch size): images/s as the median over the timed epochs with their
minimum and maximum; CPU cores used (process-tree CPU seconds / wall seconds, median) and CPU
milliseconds per image (process-tree CPU seconds / images, median: less moved by other
work on a shared machine, which lowers cores used and images/s but not CPU per image); peak memory
(process tree PSS, the largest sample over the timed epochs); GPU memory: what the device got back
when the loader's process ended (its CUDA context, torch's cache and DALI's pools, read as
device-wide used memory before and after, one process at a time; see ``procstat``), else NVML's
per-process peak, else torch's peak reserved memory (which leaves out the context and DALI's
pools); each also as a ratio to dalimix at the same batch size and mixing setting.
"""

from __future__ import annotations

import json
import statistics
from pathlib import Path

from . import LABELS
from .machine import one_line, short_name

MIB = 2**20


def summarize(raw: dict) -> list[dict]:
    """One row per result record, with medians, spreads and ratios to dalimix."""
    rows = []
    for rec in raw["results"]:
        ep = rec["epochs"]
        ips = [e["images"] / e["wall_s"] for e in ep if e["wall_s"] > 0]
        cores = [e["cpu_s"] / e["wall_s"] for e in ep if e["wall_s"] > 0]
        cpu_ms = [1e3 * e["cpu_s"] / e["images"] for e in ep if e["images"]]
        gpu_nvml = [e["nvml_gpu_peak_bytes"] for e in ep if e.get("nvml_gpu_peak_bytes")]
        gpu_torch = [e["torch_gpu_peak_bytes"] for e in ep if e.get("torch_gpu_peak_bytes") is not None]
        rows.append(
            {
                "library": rec["library"],
                "mix": rec["mix"],
                "batch_size": rec["batch_size"],
                "epochs": len(ep),
                "images_per_epoch": ep[0]["images"] if ep else 0,
                "images_per_s": statistics.median(ips) if ips else None,
                "images_per_s_min": min(ips) if ips else None,
                "images_per_s_max": max(ips) if ips else None,
                "cpu_cores": statistics.median(cores) if cores else None,
                "cpu_ms_per_image": statistics.median(cpu_ms) if cpu_ms else None,
                "memory_mib": max(e["memory_peak_bytes"] for e in ep) / MIB if ep else None,
                "memory_kind": "rss" if any(e.get("memory_kind") == "rss" for e in ep) else "pss",
                **_gpu_memory(rec.get("gpu_freed_bytes"), gpu_nvml, gpu_torch),
                "setup_s": rec.get("setup_s"),
                "first_batch": ep[0].get("first_batch") if ep else None,
            }
        )
    base = {(r["mix"], r["batch_size"]): r for r in rows if r["library"] == "dalimix"}
    for r in rows:
        ref = base.get((r["mix"], r["batch_size"]))
        for key in ("images_per_s", "cpu_cores", "cpu_ms_per_image", "memory_mib", "gpu_mib"):
            value, ref_value = r[key], (ref or {}).get(key)
            r[f"{key}_vs_dalimix"] = value / ref_value if value is not None and ref_value else None
    return rows


GPU_NOTES = {
    "device": "what the device got back when each loader's process ended (CUDA context, torch's cache and "
    "DALI's pools; device-wide used memory before and after, one process at a time)",
    "nvml": "per-process use from NVML",
    "torch": "torch's peak reserved memory (the CUDA context and DALI's own pools not included)",
}


def _gpu_memory(freed, nvml_peaks: list, torch_peaks: list) -> dict:
    """One GPU memory figure per row, and which measure it is ("device", "nvml", "torch" or None)."""
    if freed:
        return {"gpu_mib": freed / MIB, "gpu_kind": "device"}
    if nvml_peaks:
        return {"gpu_mib": max(nvml_peaks) / MIB, "gpu_kind": "nvml"}
    if torch_peaks:
        return {"gpu_mib": max(torch_peaks) / MIB, "gpu_kind": "torch"}
    return {"gpu_mib": None, "gpu_kind": None}


def mixing_cost(rows: list[dict]) -> list[dict]:
    """images/s with mixing on over off, per library and batch size (both measured in the same run)."""
    by_key = {(r["library"], r["batch_size"], r["mix"]): r for r in rows}
    out = []
    for (lib, batch, mix), r in by_key.items():
        off = by_key.get((lib, batch, False))
        if mix and off and r["images_per_s"] and off["images_per_s"]:
            out.append(
                {
                    "library": lib,
                    "batch_size": batch,
                    "on": r["images_per_s"],
                    "off": off["images_per_s"],
                    "on_over_off": r["images_per_s"] / off["images_per_s"],
                }
            )
    return out


def mixing_for_free(rows: list[dict]) -> list[dict]:
    """dalimix with mixing against DALI's own plain pipeline without mixing, per batch size: the
    images/s ratio and the CPU ms/image ratio (goal: >= 0.98 and within 5%)."""
    by_key = {(r["library"], r["batch_size"], r["mix"]): r for r in rows}
    out = []
    for (lib, batch, mix), r in sorted(by_key.items(), key=lambda kv: kv[0][1]):
        plain = by_key.get(("dali", batch, False))
        if lib == "dalimix" and mix and plain and r["images_per_s"] and plain["images_per_s"]:
            cpu = (
                r["cpu_ms_per_image"] / plain["cpu_ms_per_image"]
                if r["cpu_ms_per_image"] and plain["cpu_ms_per_image"]
                else None
            )
            out.append(
                {
                    "batch_size": batch,
                    "dalimix_mixed": r["images_per_s"],
                    "dali_plain": plain["images_per_s"],
                    "ratio": r["images_per_s"] / plain["images_per_s"],
                    "cpu_ms_ratio": cpu,
                }
            )
    return out


def _num(value, fmt: str = "{:.0f}") -> str:
    return "–" if value is None else fmt.format(value)


def _ratio(value) -> str:
    return "–" if value is None else f"{value:.2f}×"


def markdown_table(header: list[str], rows: list[list[str]]) -> str:
    """A markdown table with aligned columns (readable in a terminal, pasteable into the README)."""
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(header)]
    line = lambda cells: "| " + " | ".join(c.ljust(w) for c, w in zip(cells, widths)) + " |"  # noqa: E731
    rule = "|" + "|".join("-" * (w + 2) for w in widths) + "|"
    return "\n".join([line(header), rule, *(line(r) for r in rows)])


def context_lines(raw: dict) -> list[str]:
    m, s, d = raw["machine"], raw["settings"], raw["data"]
    load = ""
    if m.get("loadavg_start") and m.get("loadavg_end"):
        load = f"; load average {m['loadavg_start'][0]:.1f} at the start, {m['loadavg_end'][0]:.1f} at the end"
    v = m["versions"]
    return [
        f"{m['date'][:10]}, {one_line(m)}, device {s['device']}{load}.",
        f"{raw['worker_mapping']}. Image size {s['size']}×{s['size']}, float32 NCHW out.",
        f"Data: {d['classes']} classes, {d['distinct_files']} distinct files listed {d['repeats']}× "
        f"({d['files']} per epoch); median and min–max of {s['epochs']} epochs after {s['warmup']} warm-up, "
        "epochs of all loaders interleaved.",
        f"torch {v.get('torch')}, torchvision {v.get('torchvision')}, timm {v.get('timm')}, "
        f"DALI {v.get('nvidia-dali')}, dalimix {v.get('dalimix')} ({m.get('dalimix_commit')}), Python {v.get('python')}.",
    ]


def markdown(raw: dict, rows: list[dict] | None = None) -> str:
    """The results as markdown: context, the main table, the mixing-cost table, errors."""
    rows = summarize(raw) if rows is None else rows
    gpu = any(r["gpu_mib"] is not None for r in rows)
    header = [
        "loader",
        "mixing",
        "batch",
        "images/s",
        "min–max",
        "vs dalimix",
        "CPU cores",
        "vs dalimix",
        "CPU ms/image",
        "vs dalimix",
        "memory MiB",
        "vs dalimix",
    ]
    if gpu:
        header += ["GPU MiB", "vs dalimix"]
    order = {lib: i for i, lib in enumerate(LABELS)}
    body = []
    for r in sorted(rows, key=lambda r: (r["batch_size"], not r["mix"], order.get(r["library"], 99))):
        cells = [
            LABELS.get(r["library"], r["library"]),
            "on" if r["mix"] else "off",
            str(r["batch_size"]),
            _num(r["images_per_s"]),
            f"{_num(r['images_per_s_min'])}–{_num(r['images_per_s_max'])}",
            _ratio(r["images_per_s_vs_dalimix"]),
            _num(r["cpu_cores"], "{:.2f}"),
            _ratio(r["cpu_cores_vs_dalimix"]),
            _num(r["cpu_ms_per_image"], "{:.1f}"),
            _ratio(r["cpu_ms_per_image_vs_dalimix"]),
            _num(r["memory_mib"]),
            _ratio(r["memory_mib_vs_dalimix"]),
        ]
        if gpu:
            cells += [_num(r["gpu_mib"]), _ratio(r["gpu_mib_vs_dalimix"])]
        body.append(cells)
    parts = [" ".join(context_lines(raw)), "", markdown_table(header, body)]
    cost = mixing_cost(rows)
    if cost:
        parts += [
            "",
            "Mixing on vs off, same loader, same run:",
            "",
            markdown_table(
                ["loader", "batch", "images/s on", "images/s off", "on / off"],
                [
                    [
                        LABELS.get(c["library"], c["library"]),
                        str(c["batch_size"]),
                        _num(c["on"]),
                        _num(c["off"]),
                        f"{c['on_over_off']:.3f}",
                    ]
                    for c in sorted(cost, key=lambda c: (c["batch_size"], order.get(c["library"], 99)))
                ],
            ),
        ]
    free = mixing_for_free(rows)
    if free:
        parts += [
            "",
            "dalimix with mixing vs DALI's plain pipeline without mixing, same run:",
            "",
            markdown_table(
                ["batch", "dalimix mixed images/s", "DALI plain images/s", "ratio", "CPU ms/image ratio"],
                [
                    [
                        str(f["batch_size"]),
                        _num(f["dalimix_mixed"]),
                        _num(f["dali_plain"]),
                        f"{f['ratio']:.3f}",
                        _num(f["cpu_ms_ratio"], "{:.3f}"),
                    ]
                    for f in free
                ],
            ),
        ]
    kinds = {r["memory_kind"] for r in rows}
    note = (
        "Memory: peak PSS of the process and its workers"
        if kinds == {"pss"}
        else "Memory: peak RSS (PSS unreadable here)"
    )
    if gpu:
        gk = sorted({r["gpu_kind"] for r in rows if r["gpu_kind"]})
        if len(gk) == 1:
            note += "; GPU: " + GPU_NOTES[gk[0]]
        else:  # some process could not be measured like the others: say so per row
            note += "; GPU: NOT like with like, rows measured differently: " + "; ".join(
                f"{LABELS.get(r['library'], r['library'])} mixing {'on' if r['mix'] else 'off'} b{r['batch_size']}: "
                f"{r['gpu_kind']}"
                for r in rows
                if r["gpu_kind"]
            )
    parts += ["", note + "."]
    for e in raw.get("errors", []):
        parts.append(
            f"- {LABELS.get(e['library'], e['library'])}, mixing {'on' if e['mix'] else 'off'}, "
            f"batch {e['batch_size']}: not measured: {e['error']}"
        )
    return "\n".join(parts) + "\n"


def chart(raw: dict, rows: list[dict], path: Path) -> Path:
    """Grouped bars: images/s per loader, mixing off and on, one panel per batch size (min–max whiskers)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    batches = sorted({r["batch_size"] for r in rows})
    libs = [lib for lib in LABELS if any(r["library"] == lib for r in rows)]
    fig, axes = plt.subplots(1, len(batches), figsize=(5.5 * len(batches), 4.2), squeeze=False)
    for ax, batch in zip(axes[0], batches):
        for k, (mix, colour) in enumerate(((False, "#9ecae1"), (True, "#08519c"))):
            xs, ys, lo, hi = [], [], [], []
            for i, lib in enumerate(libs):
                r = next(
                    (r for r in rows if r["library"] == lib and r["mix"] == mix and r["batch_size"] == batch), None
                )
                if r is None or r["images_per_s"] is None:
                    continue
                xs.append(i + (k - 0.5) * 0.38)
                ys.append(r["images_per_s"])
                lo.append(r["images_per_s"] - r["images_per_s_min"])
                hi.append(r["images_per_s_max"] - r["images_per_s"])
            ax.bar(xs, ys, width=0.36, color=colour, yerr=[lo, hi], capsize=3, label=f"mixing {'on' if mix else 'off'}")
        ax.set_xticks(range(len(libs)))
        ax.set_xticklabels(
            [LABELS[lib].replace(" + ", "\n+ ").replace(" create", "\ncreate") for lib in libs], fontsize=8
        )
        ax.set_title(f"batch {batch}")
        ax.set_ylabel("images/s (median, min–max)")
        ax.legend(fontsize=8)
    m = raw["machine"]
    fig.suptitle(f"dalimix bench, {raw['settings']['device']}: {one_line(m)} ({m['date'][:10]})", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def write(raw: dict, out_dir: str | Path, stamp: str) -> dict[str, Path]:
    """Write ``bench-<cpu-Nc | cuda-gpu-name>-<stamp>.{json,md,png}`` into ``out_dir``; returns the paths."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    rows = summarize(raw)
    stem = f"bench-{short_name(raw['machine'], raw['settings']['device'])}-{stamp}"
    paths = {"json": out_dir / f"{stem}.json", "md": out_dir / f"{stem}.md", "png": out_dir / f"{stem}.png"}
    full = dict(raw, summary=rows, mixing_cost=mixing_cost(rows), mixing_for_free=mixing_for_free(rows))
    paths["json"].write_text(json.dumps(full, indent=1) + "\n")
    paths["md"].write_text(markdown(raw, rows))
    if rows:
        chart(raw, rows, paths["png"])
    else:
        del paths["png"]
    return paths
