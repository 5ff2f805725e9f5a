"""CPU time and memory of a process and its descendants (DataLoader workers), read from ``/proc``.

CPU: ``utime + stime`` of the process (all its threads: DALI's, torch's) and of every live
descendant, plus ``cutime + cstime`` (descendants that already exited and were waited for), so a
difference of two readings is the CPU time the whole tree spent in between, whatever exited.

Memory: PSS (proportional set size: each shared page split between the processes that map it),
so forked workers that share the parent's pages are not counted twice. Where ``smaps_rollup`` is
not readable the RSS is used instead (an over-count for forked workers); ``memory_kind`` says which.

GPU memory: NVML's per-process list is empty inside most containers (other PID namespace) and
torch's ``max_memory_reserved`` leaves out the CUDA context and DALI's own pools. ``DeviceMemory``
reads the device-wide used memory instead (NVML's device counters, else CUDA's free/total), and
``stop_and_measure`` stops processes one at a time: what the device gets back when a process ends
is everything it held (context, torch's cache, DALI's pools), the same measure for every loader.
Caching allocators keep what they reserved, so at the end this is the process's peak.
"""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path

_TICK = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
_PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


def _stat_fields(pid: int) -> list[str] | None:
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # the command name (field 2) may hold spaces and parentheses: split after its last ')'
    return text[text.rindex(")") + 2 :].split()


def children(pid: int) -> list[int]:
    """Direct children of ``pid`` (from ``/proc/<pid>/task/*/children``, else a scan of ``/proc``)."""
    out: list[int] = []
    tasks = Path(f"/proc/{pid}/task")
    try:
        for task in tasks.iterdir():
            try:
                out.extend(int(c) for c in (task / "children").read_text().split())
            except FileNotFoundError:
                return _children_by_scan(pid)
            except OSError:
                continue
    except OSError:
        return []
    return out


def _children_by_scan(pid: int) -> list[int]:
    out = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            fields = _stat_fields(int(entry.name))
            if fields and int(fields[1]) == pid:
                out.append(int(entry.name))
    return out


def tree(pid: int) -> list[int]:
    """``pid`` and all its live descendants."""
    pids, todo = [], [pid]
    while todo:
        p = todo.pop()
        pids.append(p)
        todo.extend(children(p))
    return pids


def cpu_seconds(pid: int) -> float:
    """CPU seconds of ``pid``'s tree so far (see the module docstring)."""
    total = 0
    for p in tree(pid):
        fields = _stat_fields(p)
        if fields is None:
            continue
        # after the name: state(0) ppid(1) ... utime(11) stime(12) cutime(13) cstime(14)
        total += int(fields[11]) + int(fields[12]) + int(fields[13]) + int(fields[14])
    return total / _TICK


def memory_bytes(pid: int) -> tuple[int, str]:
    """(bytes, "pss" or "rss") of ``pid``'s tree now."""
    total, kind = 0, "pss"
    for p in tree(pid):
        try:
            for line in Path(f"/proc/{p}/smaps_rollup").read_text().splitlines():
                if line.startswith("Pss:"):
                    total += int(line.split()[1]) * 1024
                    break
            continue  # read (a process that is exiting has no lines left: it holds nothing)
        except OSError:
            pass
        try:
            rss_pages = int(Path(f"/proc/{p}/statm").read_text().split()[1])
        except (OSError, IndexError, ValueError):
            continue  # gone
        if rss_pages:
            total += rss_pages * _PAGE
            kind = "rss"
    return total, kind


class _Nvml:
    """Per-process GPU memory through NVML (``pynvml``, from the nvidia-ml-py package), if present."""

    def __init__(self, device_index: int):
        import pynvml

        pynvml.nvmlInit()
        self._nvml = pynvml
        self._handle = pynvml.nvmlDeviceGetHandleByIndex(device_index)

    def used_bytes(self, pids: set[int]) -> int | None:
        try:
            procs = self._nvml.nvmlDeviceGetComputeRunningProcesses(self._handle)
        except Exception:
            return None
        found = [p.usedGpuMemory for p in procs if p.pid in pids and p.usedGpuMemory is not None]
        return sum(found) if found else None


def nvml(device_index: int = 0):
    """An NVML reader, or None where pynvml is missing or NVML does not start."""
    try:
        return _Nvml(device_index)
    except Exception:
        return None


class DeviceMemory:
    """Used bytes of one GPU, device-wide (all processes): ``read()`` returns ``(free, total)``.

    ``DeviceMemory.open(i)`` reads NVML's device counters where NVML starts, else
    ``torch.cuda.mem_get_info`` (which makes a CUDA context in this process: a constant offset
    that cancels in differences); None without either."""

    def __init__(self, read, source: str):
        self.read = read
        self.source = source

    @classmethod
    def open(cls, device_index: int = 0) -> DeviceMemory | None:
        try:
            import pynvml

            pynvml.nvmlInit()
            handle = pynvml.nvmlDeviceGetHandleByIndex(device_index)

            def read_nvml():
                info = pynvml.nvmlDeviceGetMemoryInfo(handle)
                return int(info.free), int(info.total)

            read_nvml()
            return cls(read_nvml, "nvml")
        except Exception:
            pass
        try:
            import torch

            if not torch.cuda.is_available():
                return None
            torch.cuda.mem_get_info(device_index)
            return cls(lambda: tuple(int(v) for v in torch.cuda.mem_get_info(device_index)), "cuda")
        except Exception:
            return None

    def used_bytes(self) -> int | None:
        try:
            free, total = self.read()
        except Exception:
            return None
        return total - free

    def settled(self, *, timeout: float = 5.0, interval: float = 0.05) -> int | None:
        """Used bytes once two readings ``interval`` apart agree (the driver hands a finished
        process's memory back within moments), or the last reading after ``timeout``."""
        last = self.used_bytes()
        deadline = time.monotonic() + timeout
        while last is not None and time.monotonic() < deadline:
            time.sleep(interval)
            now = self.used_bytes()
            if now == last:
                return now
            last = now
        return last


def stop_and_measure(runners, memory: DeviceMemory | None) -> dict:
    """Stop ``runners`` (objects with ``key`` and ``stop()``) one after the other; returns
    ``{key: bytes the device got back when it ended, or None}``. Without ``memory`` they are asked
    to stop together (``ask_to_stop()`` when they have it) and nothing is measured."""
    if memory is None:
        for r in runners:
            getattr(r, "ask_to_stop", lambda: None)()
        for r in runners:
            r.stop()
        return {r.key: None for r in runners}
    freed = {}
    for r in runners:
        before = memory.settled()
        r.stop()
        after = memory.settled()
        freed[r.key] = before - after if before is not None and after is not None and before > after else None
    return freed


class PeakSampler:
    """Samples a process tree's memory (and GPU memory through NVML) on a thread until stopped.

    ``with PeakSampler(pid) as s: ...`` then ``s.peak_bytes``, ``s.kind``, ``s.gpu_peak_bytes``.
    """

    def __init__(self, pid: int, *, interval: float = 0.05, gpu=None):
        self.pid = pid
        self.interval = interval
        self.gpu = gpu
        self.peak_bytes = 0
        self.kind = "pss"
        self.gpu_peak_bytes = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="dalimix-bench-mem", daemon=True)

    def _sample(self) -> None:
        value, kind = memory_bytes(self.pid)
        if value > self.peak_bytes:
            self.peak_bytes = value
        if kind == "rss":
            self.kind = "rss"
        if self.gpu is not None:
            used = self.gpu.used_bytes(set(tree(self.pid)))
            if used is not None:
                self.gpu_peak_bytes = max(self.gpu_peak_bytes or 0, used)

    def _run(self) -> None:
        while not self._stop.is_set():
            self._sample()
            self._stop.wait(self.interval)

    def __enter__(self) -> PeakSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self._sample()
