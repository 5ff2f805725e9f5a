"""CPU backend: the fused kernel's own per-pixel code compiled for the host.

``kernels/mix_normalize_host.cpp`` includes ``mix_normalize.cu`` and loops its per-pixel function
over samples, rows and pixels in memory order (straight, vectorisable loops for the unmixed and
MixUp cases). It is compiled once per machine with the C++ compiler (``$CXX``, else ``g++``/``c++``;
``-O3 -march=native``) into ``<cache>/host-kernels/`` and called through ctypes, which releases
the GIL, so a batch is split over a few threads (the calling thread and ``threads - 1`` pool threads). Where no compiler works, ``available()`` is False
and ``dalimix.ops`` uses the vectorised torch twin (``dalimix.ops.cpu``) instead, with a warning.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import threading
import warnings
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch

from .kernels import ENTRIES, kernel_dir

HOST_SOURCE = "mix_normalize_host.cpp"

_lock = threading.Lock()
_state: dict = {}


def _cache_dir() -> Path:
    from ..demo_data import cache_root

    return cache_root() / "host-kernels"


def _machine_tag() -> str:
    """Compiled with -march=native: the library belongs to this kind of processor."""
    flags = ""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith(("flags", "model name", "Features")):
                    flags += line
                if line.strip() == "":
                    break
    except OSError:
        pass
    return platform.machine() + (flags or platform.processor())


def _compile() -> ctypes.CDLL:
    cxx = os.environ.get("CXX") or shutil.which("g++") or shutil.which("c++")
    if cxx is None:
        raise RuntimeError("no C++ compiler found (set CXX or install g++)")
    kdir = kernel_dir()
    sources = "".join((kdir / f).read_text() for f in sorted(os.listdir(kdir)) if f.endswith((".cu", ".cuh", ".cpp")))
    flags = ["-std=c++17", "-O3", "-march=native", "-shared", "-fPIC", "-fno-math-errno"]
    digest = hashlib.sha256((sources + _machine_tag() + " ".join(flags) + cxx).encode()).hexdigest()[:20]
    out_dir = _cache_dir()
    lib = out_dir / f"mix_normalize-{digest}.so"
    if not lib.exists():
        out_dir.mkdir(parents=True, exist_ok=True)
        tmp = out_dir / f".mix_normalize-{digest}.{os.getpid()}.so"
        cmd = [cxx, *flags, f"-I{kdir}", str(kdir / HOST_SOURCE), "-o", str(tmp)]
        res = subprocess.run(cmd, capture_output=True, text=True)
        if res.returncode != 0:
            tmp.unlink(missing_ok=True)
            raise RuntimeError(f"{' '.join(cmd)} failed:\n{res.stderr[-2000:]}")
        os.replace(tmp, lib)
    so = ctypes.CDLL(str(lib))
    for entry in ENTRIES.values():
        fn = getattr(so, host_entry(entry.name))
        fn.restype = None
        fn.argtypes = (
            [ctypes.c_void_p] * 5 + [ctypes.c_int] * 3 + [ctypes.c_float] * 6 + [ctypes.c_int] * 2 + [ctypes.c_void_p]
        )
    return so


def host_entry(cuda_entry: str) -> str:
    """dalimix_mix_normalize_<dtype>_<layout> -> dalimix_host_mix_normalize_<dtype>_<layout>."""
    return cuda_entry.replace("dalimix_", "dalimix_host_", 1)


def library() -> ctypes.CDLL | None:
    """The compiled host kernels, or None (with one warning) where they cannot be built."""
    with _lock:
        if "lib" not in _state:
            if os.environ.get("DALIMIX_CPU_BACKEND", "").lower() == "torch":
                _state["lib"] = None
            else:
                try:
                    _state["lib"] = _compile()
                except (RuntimeError, OSError) as e:
                    _state["lib"] = None
                    warnings.warn(
                        f"dalimix: the CPU build of the fused kernel is unavailable ({str(e).splitlines()[0]}); "
                        "using the slower torch implementation",
                        stacklevel=3,
                    )
        return _state["lib"]


def available() -> bool:
    return library() is not None


def _pool(threads: int) -> ThreadPoolExecutor:
    """A pool of ``threads`` workers, kept for the process's life (one per size asked for; a forked
    child makes its own: the parent's worker threads do not exist there)."""
    with _lock:
        if _state.get("pools_pid") != os.getpid():
            _state["pools"], _state["pools_pid"] = {}, os.getpid()
        pools = _state["pools"]
        pool = pools.get(threads)
        if pool is None:
            pool = pools[threads] = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="dalimix-host")
        return pool


def mix_normalize_host(
    images: torch.Tensor,
    records: np.ndarray,
    masks: torch.Tensor | None,
    gather: torch.Tensor | None = None,
    *,
    entry: str,
    mean255,
    inv_std255,
    out: torch.Tensor,
    threads: int | None = None,
    erase: np.ndarray | None = None,
) -> torch.Tensor:
    """The fused op on the CPU through the compiled kernel; same contract as ``dalimix.ops.mix_normalize``."""
    so = library()
    if so is None:
        raise RuntimeError("the host kernels are not available")
    n = len(records)
    _, h, w, _ = images.shape
    rec = np.ascontiguousarray(records)
    pool_t = masks if masks is not None and masks.numel() else torch.zeros(1)
    table = None if erase is None else np.ascontiguousarray(erase, dtype=np.int32)
    erase_ptr = ctypes.c_void_p(None if table is None else table.ctypes.data)
    gather_t = gather if gather is not None and gather.numel() else torch.zeros(1, dtype=torch.int32)
    fn = getattr(so, host_entry(entry))
    args = (
        ctypes.c_void_p(images.data_ptr()),
        ctypes.c_void_p(rec.ctypes.data),
        ctypes.c_void_p(pool_t.data_ptr()),
        ctypes.c_void_p(gather_t.data_ptr()),
        ctypes.c_void_p(out.data_ptr()),
        n,
        h,
        w,
        *mean255,
        *inv_std255,
    )
    threads = max(1, min(threads or torch.get_num_threads(), n))
    if threads == 1 or n * h * w < 65536:
        fn(*args, 0, n, erase_ptr)
        return out
    bounds = np.linspace(0, n, threads + 1).astype(int).tolist()
    pool = _pool(threads - 1)  # the calling thread works on the last share itself

    def share(a: int, b: int) -> None:
        fn(*args, a, b, erase_ptr)

    jobs = [pool.submit(share, a, b) for a, b in zip(bounds[:-2], bounds[1:-1]) if b > a]
    try:
        share(bounds[-2], bounds[-1])
    finally:
        for job in jobs:
            job.result()
    return out
