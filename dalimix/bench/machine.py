"""What a benchmark ran on: CPU model and cores, memory, GPU, library versions, load."""

from __future__ import annotations

import datetime as _dt
import os
import platform
import re
import subprocess
import sys
from importlib import metadata
from pathlib import Path

# distribution names, first match wins (DALI and CuPy are published per CUDA version)
_DISTRIBUTIONS = {
    "torch": ("torch",),
    "torchvision": ("torchvision",),
    "timm": ("timm",),
    "nvidia-dali": ("nvidia-dali-cuda130", "nvidia-dali-cuda120", "nvidia-dali-cuda110", "nvidia-dali"),
    "cupy": ("cupy-cuda13x", "cupy-cuda12x", "cupy"),
    "numpy": ("numpy",),
    "pillow": ("pillow",),
    "matplotlib": ("matplotlib",),
}


def _version(names: tuple[str, ...]) -> str | None:
    for name in names:
        try:
            return metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return None


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def usable_cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        return os.cpu_count() or 1


def memory_gib() -> float | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return round(int(line.split()[1]) / 2**20, 1)
    except OSError:
        pass
    return None


def gpu_description() -> dict | None:
    """Name, memory, compute capability and driver of GPU 0, or None without CUDA."""
    try:
        import torch
    except ImportError:
        return None
    if not torch.cuda.is_available():
        return None
    props = torch.cuda.get_device_properties(0)
    gpu = {
        "name": props.name,
        "memory_gib": round(props.total_memory / 2**30, 1),
        "capability": f"{props.major}.{props.minor}",
        "multiprocessors": props.multi_processor_count,
        "cuda_runtime": torch.version.cuda,
        "count": torch.cuda.device_count(),
    }
    try:
        driver = (
            subprocess.run(
                ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                capture_output=True,
                text=True,
                timeout=20,
            )
            .stdout.strip()
            .splitlines()
        )
        if driver:
            gpu["driver"] = driver[0]
    except (OSError, subprocess.SubprocessError):
        pass
    return gpu


def git_commit() -> str | None:
    """The commit of the source tree dalimix runs from (None outside a git checkout)."""
    here = Path(__file__).resolve().parents[2]
    try:
        out = subprocess.run(
            ["git", "-C", str(here), "rev-parse", "--short", "HEAD"], capture_output=True, text=True, timeout=10
        )
    except (OSError, subprocess.SubprocessError):
        return None
    if out.returncode != 0:
        return None
    dirty = subprocess.run(
        ["git", "-C", str(here), "status", "--porcelain", "--untracked-files=no"],
        capture_output=True,
        text=True,
        timeout=10,
    ).stdout.strip()
    return out.stdout.strip() + ("+changes" if dirty else "")


def describe(with_gpu: bool = True) -> dict:
    """A JSON-ready description of this machine and the software on it."""
    import dalimix

    versions = {key: _version(names) for key, names in _DISTRIBUTIONS.items()}
    versions["python"] = platform.python_version()
    versions["dalimix"] = dalimix.__version__
    return {
        "date": _dt.datetime.now().astimezone().isoformat(timespec="seconds"),
        "platform": platform.platform(),
        "cpu_model": cpu_model(),
        "logical_cpus": os.cpu_count(),
        "usable_cpus": usable_cpus(),
        "memory_gib": memory_gib(),
        "gpu": gpu_description() if with_gpu else None,
        "versions": versions,
        "dalimix_commit": git_commit(),
        "python_executable": sys.executable,
        "loadavg_start": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
    }


def short_name(machine: dict, device: str) -> str:
    """A file-name-friendly tag: ``cuda-<gpu name>`` on CUDA, else ``cpu-<N>c``."""
    if device == "cuda" and machine.get("gpu"):
        return "cuda-" + re.sub(r"[^A-Za-z0-9]+", "-", machine["gpu"]["name"]).strip("-").lower()
    return f"cpu-{machine.get('usable_cpus') or os.cpu_count()}c"


def one_line(machine: dict) -> str:
    """``AMD EPYC, 2 cores, 23 GiB; GPU ...`` for titles and tables."""
    text = f"{machine['cpu_model']}, {machine['usable_cpus']} cores, {machine['memory_gib']} GiB"
    gpu = machine.get("gpu")
    if gpu:
        text += f"; {gpu['name']} ({gpu['memory_gib']} GiB)"
    return text
