"""Runs the contenders side by side: same data, same machine, same run, epochs interleaved.

For each batch size, one process per (library, mixing on/off) builds its loader; then, round by
round, each process runs one epoch while the others wait (the order rotates every round). The
first ``warmup`` rounds are not counted. While an epoch runs the driver samples that process
tree's memory (and, with NVML, its GPU memory). On CUDA the processes are stopped one at a time
at the end and each one's GPU memory is what the device gets back when it ends (see
``procstat.stop_and_measure``).

The data: an ImageFolder tree (``--data``, or the demo data set). So that an epoch has at least
``min_batches`` batches of the largest batch size, the benchmark reads a *view* of it: a temporary
tree of symbolic links that lists every file ``k`` times (or, with ``max_images``, a class-balanced
subset). Every contender reads the same view.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from . import LIBRARIES
from .contenders import Config
from .procstat import DeviceMemory, PeakSampler, nvml, stop_and_measure


@dataclass
class Settings:
    """What ``dalimix bench`` runs (validated by ``validate``)."""

    data: str | None = None
    device: str = "cpu"
    batch_sizes: tuple[int, ...] = (64, 256)
    size: int = 224
    workers: int | None = None
    epochs: int = 3
    warmup: int = 1
    min_batches: int = 4
    max_images: int | None = 5000
    libraries: tuple[str, ...] = LIBRARIES
    mixing: tuple[bool, ...] = (True, False)
    seed: int = 0

    @classmethod
    def quick(cls, **overrides) -> Settings:
        """Tiny sizes for a smoke run: one small batch size, 64 px, short epochs."""
        base: dict[str, Any] = dict(batch_sizes=(8,), size=64, epochs=2, warmup=1, min_batches=2, max_images=32)
        base.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**base)

    def validate(self) -> Settings:
        if self.device not in ("cpu", "cuda"):
            raise ValueError(f"device={self.device!r}: 'cpu' or 'cuda'")
        if not self.batch_sizes or any(int(b) < 2 for b in self.batch_sizes):
            raise ValueError(f"batch sizes {self.batch_sizes}: give integers >= 2, e.g. --batch-sizes 64,256")
        if any(int(b) % 2 for b in self.batch_sizes):
            raise ValueError(f"batch sizes {self.batch_sizes}: timm's Mixup needs even batch sizes")
        for name in ("size", "epochs", "min_batches"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"{name}={getattr(self, name)}: a positive integer")
        if int(self.warmup) < 0:
            raise ValueError(f"warmup={self.warmup}: 0 or more epochs")
        if self.workers is not None and int(self.workers) < 1:
            raise ValueError(f"workers={self.workers}: a positive integer (DALI threads = DataLoader workers)")
        unknown = [lib for lib in self.libraries if lib not in LIBRARIES]
        if unknown or not self.libraries:
            raise ValueError(f"libraries {list(self.libraries)}: choose from {', '.join(LIBRARIES)}")
        if self.max_images is not None and int(self.max_images) < 1:
            raise ValueError(f"max_images={self.max_images}: a positive integer")
        if self.device == "cuda":
            import torch

            if not torch.cuda.is_available():
                raise ValueError("device='cuda' but torch sees no CUDA GPU; use --device cpu")
        return self


# ------------------------------------------------------------------------------- the data view
def class_files(root: str | os.PathLike) -> dict[str, list[Path]]:
    """``{class: [files]}`` of an ImageFolder tree (torchvision's rules, through dalimix's scanner)."""
    from ..sources import scan_image_folder

    samples = scan_image_folder(root)
    out: dict[str, list[Path]] = {c: [] for c in samples.classes}
    for path, label in zip(samples.paths, samples.labels.tolist()):
        out[samples.classes[label]].append(Path(path))
    return out


def make_view(root: str | os.PathLike, dest: str | os.PathLike, *, images: int, max_images: int | None) -> dict:
    """Fill ``dest`` with a tree of symbolic links to ``root``'s files: about ``images`` files
    (each file repeated ``k`` times), or a class-balanced subset of at most ``max_images``.

    Returns a description (files in the source, files in the view, repeats).
    """
    files = class_files(root)
    total = sum(len(v) for v in files.values())
    if max_images is not None and total > max_images:
        # the first files of every class, round robin, so the subset keeps all classes
        keep: dict[str, list[Path]] = {c: [] for c in files}
        order = [(i, c) for c, v in files.items() for i in range(len(v))]
        order.sort(key=lambda t: t[0])
        for i, c in order[:max_images]:
            keep[c].append(files[c][i])
        files = keep
    subset = sum(len(v) for v in files.values())
    repeats = max(1, math.ceil(images / subset))
    dest = Path(dest)
    for c, paths in files.items():
        folder = dest / c
        folder.mkdir(parents=True, exist_ok=True)
        for r in range(repeats):
            for p in paths:
                (folder / f"{p.stem}.r{r}{p.suffix}").symlink_to(p.resolve())
    return {
        "source": str(root),
        "classes": len(files),
        "source_files": total,
        "distinct_files": subset,
        "repeats": repeats,
        "files": subset * repeats,
    }


# ---------------------------------------------------------------------------------- runners
class Runner:
    """A contender's process: start, ask for epochs, stop."""

    def __init__(self, cfg: Config, log_dir: Path):
        self.cfg = cfg
        self.key = (cfg.library, cfg.mix, cfg.batch_size)
        self.log_path = log_dir / f"{cfg.library}-{'mix' if cfg.mix else 'nomix'}-b{cfg.batch_size}.log"
        self._log = open(self.log_path, "w")
        env = dict(os.environ)
        package_parent = str(Path(__file__).resolve().parents[2])
        env["PYTHONPATH"] = os.pathsep.join(p for p in (package_parent, env.get("PYTHONPATH")) if p)
        env.setdefault("DALI_LOG_LEVEL", "3")
        env["PYTHONUNBUFFERED"] = "1"
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "dalimix.bench.runner", json.dumps(asdict(cfg))],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self._log,
            text=True,
            env=env,
        )
        assert self.proc.stdin is not None and self.proc.stdout is not None  # both are pipes
        self._to_runner, self._from_runner = self.proc.stdin, self.proc.stdout
        self.error: str | None = None
        self.setup_s: float | None = None

    def _read(self) -> dict:
        line = self._from_runner.readline()
        if not line:
            self.proc.wait(timeout=30)
            return {"error": f"the process ended (exit code {self.proc.returncode}); last output: {self.log_tail()}"}
        return json.loads(line)

    def wait_ready(self) -> bool:
        reply = self._read()
        if "error" in reply:
            self.error = reply["error"]
            return False
        self.setup_s = reply.get("setup_s")
        return True

    def epoch(self) -> dict:
        self._to_runner.write("epoch\n")
        self._to_runner.flush()
        reply = self._read()
        if "error" in reply:
            self.error = reply["error"]
        return reply

    def log_tail(self, lines: int = 6) -> str:
        self._log.flush()
        try:
            text = self.log_path.read_text(errors="replace").strip().splitlines()
        except OSError:
            return ""
        return " | ".join(text[-lines:])

    def ask_to_stop(self) -> None:
        try:
            if self.proc.poll() is None:
                self._to_runner.write("quit\n")
                self._to_runner.flush()
        except (OSError, ValueError):
            pass

    def stop(self) -> None:
        """Wait for the process to end (after ``ask_to_stop``); kill it if it does not."""
        self.ask_to_stop()
        try:
            self.proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        finally:
            self._log.close()


# ------------------------------------------------------------------------------------- run
def run(settings: Settings, *, progress: bool = True, log_dir: str | os.PathLike | None = None) -> dict:
    """Run the benchmark; returns the raw results (``report`` summarises and writes them)."""
    from .machine import describe, usable_cpus

    settings.validate()
    workers = int(settings.workers or usable_cpus())
    if settings.data is None:
        from ..demo_data import demo_dataset

        root = str(demo_dataset(progress=progress))
    else:
        root = str(settings.data)
    machine = describe(with_gpu=settings.device == "cuda")
    epoch_images = settings.min_batches * max(settings.batch_sizes)
    view_dir = Path(tempfile.mkdtemp(prefix="dalimix-bench-view-"))
    own_logs = log_dir is None
    logs = Path(tempfile.mkdtemp(prefix="dalimix-bench-logs-")) if log_dir is None else Path(log_dir)
    logs.mkdir(parents=True, exist_ok=True)
    results: list[dict] = []
    errors: list[dict] = []
    try:
        data = make_view(root, view_dir, images=epoch_images, max_images=settings.max_images)
        gpu = nvml(0) if settings.device == "cuda" else None
        device_memory = DeviceMemory.open(0) if settings.device == "cuda" else None
        configs = [(lib, mix) for lib in settings.libraries for mix in settings.mixing]
        rounds = settings.warmup + settings.epochs
        bar = progress_bar(len(settings.batch_sizes) * len(configs) * rounds, enabled=progress)
        for batch_size in settings.batch_sizes:
            runners = [
                Runner(
                    Config(
                        library=lib,
                        mix=mix,
                        root=str(view_dir),
                        num_classes=data["classes"],
                        batch_size=int(batch_size),
                        size=int(settings.size),
                        workers=workers,
                        device=settings.device,
                        seed=settings.seed,
                    ),
                    logs,
                )
                for lib, mix in configs
            ]
            records = {r.key: _record(r.cfg) for r in runners}
            try:
                for r in runners:
                    bar.set_postfix_str(f"starting {r.cfg.library} b{batch_size}")
                    if not r.wait_ready():
                        errors.append(
                            {"library": r.cfg.library, "mix": r.cfg.mix, "batch_size": batch_size, "error": r.error}
                        )
                        bar.update(rounds)
                    records[r.key]["setup_s"] = r.setup_s
                live = [r for r in runners if r.error is None]
                for rnd in range(rounds):
                    order = live[rnd % len(live) :] + live[: rnd % len(live)] if live else []
                    for r in order:
                        if r.error is not None:
                            bar.update(1)
                            continue
                        bar.set_postfix_str(
                            f"b{batch_size} {r.cfg.library} mix {'on' if r.cfg.mix else 'off'}"
                            f" {'warm-up' if rnd < settings.warmup else f'epoch {rnd - settings.warmup + 1}'}"
                        )
                        t0 = time.perf_counter()
                        with PeakSampler(r.proc.pid, gpu=gpu) as mem:
                            reply = r.epoch()
                        reply["driver_s"] = time.perf_counter() - t0
                        bar.update(1)
                        if "error" in reply:
                            errors.append(
                                {
                                    "library": r.cfg.library,
                                    "mix": r.cfg.mix,
                                    "batch_size": batch_size,
                                    "error": reply["error"],
                                    "log": r.log_tail(),
                                }
                            )
                            continue
                        reply.update(
                            memory_peak_bytes=mem.peak_bytes,
                            memory_kind=mem.kind,
                            nvml_gpu_peak_bytes=mem.gpu_peak_bytes,
                            round=rnd,
                        )
                        key = "warmup" if rnd < settings.warmup else "epochs"
                        records[r.key][key].append(reply)
                results.extend(rec for rec in records.values() if rec["epochs"])
            finally:
                # on CUDA one at a time, each measured; else in parallel (a second each to tear torch down)
                freed = stop_and_measure(runners, device_memory)
                for key, value in freed.items():
                    records[key]["gpu_freed_bytes"] = value
                    records[key]["gpu_freed_source"] = device_memory.source if device_memory else None
        bar.close()
    finally:
        shutil.rmtree(view_dir, ignore_errors=True)
        if own_logs and not errors:
            shutil.rmtree(logs, ignore_errors=True)
    machine["loadavg_end"] = list(os.getloadavg()) if hasattr(os, "getloadavg") else None
    settings_out = asdict(settings)
    settings_out.update(workers=workers, epoch_images=data["files"], data_root=root)
    return {
        "kind": "dalimix-bench",
        "machine": machine,
        "settings": settings_out,
        "data": data,
        "worker_mapping": f"W = {workers}: dalimix num_threads = DALI num_threads = DataLoader num_workers (torchvision, timm) = {workers}",
        "results": results,
        "errors": errors,
        "logs": None if own_logs and not errors else str(logs),
    }


def _record(cfg: Config) -> dict:
    return {
        "library": cfg.library,
        "mix": cfg.mix,
        "batch_size": cfg.batch_size,
        "size": cfg.size,
        "workers": cfg.workers,
        "device": cfg.device,
        "setup_s": None,
        "warmup": [],
        "epochs": [],
    }


class NoProgress:
    """Stands in for a tqdm bar when progress is off."""

    def update(self, n=1):
        pass

    def set_postfix_str(self, s):
        pass

    def close(self):
        pass


def progress_bar(total: int, desc: str = "dalimix bench", *, enabled: bool = True, unit: str = "epoch", leave=True):
    """A tqdm progress bar (or a ``NoProgress`` when disabled)."""
    if not enabled:
        return NoProgress()
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit=unit, dynamic_ncols=True, leave=leave)


def timestamp() -> str:
    return time.strftime("%Y%m%d-%H%M%S")
