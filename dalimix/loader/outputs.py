"""Output buffers: on the CPU, batches are written into recycled tensors instead of fresh pages.

A fresh ``N x 3 x H x W`` float tensor per batch (38 MB at 64 x 224 x 224 fp32) is above glibc's
mmap threshold: every batch maps new pages and pays a page fault per 4 KiB while the kernel
writes it (~10 ms at batch 64), and the resident set creeps up with the heap's fragmentation.
``OutputRing`` keeps a few buffers per shape and hands one out again only when nothing outside the
ring refers to it any more (neither the tensor, nor a view of it, nor a numpy array over it), so
reuse is invisible: a batch the training loop still holds is never overwritten. On CUDA torch's
caching allocator already recycles memory in stream order, so each batch gets a tensor from it.
"""

from __future__ import annotations

import sys
from typing import Any

import torch

from ..ops import allocate_output


def _storage_uses(t: torch.Tensor) -> int:
    return torch._C._storage_Use_Count(t.untyped_storage()._cdata)


_CAN_COUNT = hasattr(torch._C, "_storage_Use_Count")


def _ring_refs() -> int:
    """References to a ring tensor nobody else holds, as ``get``'s loop sees them."""
    slots = [(object(), 0)]
    for t, _ in slots:
        return sys.getrefcount(t)
    raise AssertionError("unreachable")


_RING_REFS = _ring_refs()


_LIBC: Any = None  # glibc (ctypes.CDLL) once looked up, False where it has no malloc_trim


def release_free_heap() -> None:
    """Hand the C heap's free pages back to the system (glibc's ``malloc_trim``; nothing elsewhere).

    Called at the end of an epoch once ``TRIM_EVERY`` images (``dalimix.loader.core``) have been
    handed out since the last call: DALI's per-batch buffers and the mixer's per-batch arrays come
    and go in varied sizes, and glibc keeps what they free in its heap, so the resident size would
    otherwise wander upwards over a long run (a few ms per call)."""
    global _LIBC
    if _LIBC is None:
        import ctypes
        import ctypes.util

        try:
            libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
            _LIBC = libc if hasattr(libc, "malloc_trim") else False
        except OSError:
            _LIBC = False
    if _LIBC:
        _LIBC.malloc_trim(0)


class OutputRing:
    """Up to ``size`` recycled output tensors per (shape, dtype, layout); ``size=0``: always fresh."""

    def __init__(self, device: torch.device, size: int = 4):
        self.device = device
        self.size = size if (device.type == "cpu" and _CAN_COUNT) else 0
        self._slots: dict[tuple, list[tuple[torch.Tensor, int]]] = {}

    def get(self, n: int, height: int, width: int, *, dtype: torch.dtype, channels_last: bool) -> torch.Tensor:
        """An ``n x 3 x H x W`` tensor nobody else holds (its old contents are garbage)."""
        if self.size == 0:
            return allocate_output(n, height, width, dtype=dtype, channels_last=channels_last, device=self.device)
        slots = self._slots.setdefault((n, height, width, dtype, channels_last), [])
        for t, uses in slots:
            if sys.getrefcount(t) <= _RING_REFS and _storage_uses(t) <= uses:
                return t
        t = allocate_output(n, height, width, dtype=dtype, channels_last=channels_last, device=self.device)
        if len(slots) < self.size:
            slots.append((t, _storage_uses(t)))  # the storage's uses while only the ring holds it
        return t

    def clear(self) -> None:
        self._slots.clear()
