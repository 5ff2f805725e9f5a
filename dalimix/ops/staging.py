"""Host→device staging: the one way small host arrays reach the GPU in the per-batch path.

Every per-batch copy from host to device goes through a ``PinnedRing`` (one per device,
``ring(device)``): the arrays of one call are packed into ONE reused pinned slot (each group at a
16-byte aligned offset) and travel in ONE asynchronous copy on the caller's stream. Nothing is
pinned per batch and the host never waits:

- a slot is reused only once the event recorded after its copy (``keep=True``) or after the work
  that read it (``keep=False``, released by the caller) has completed — checked with
  ``Event.query``, never waited for: when every slot is in flight the ring grows by one;
- only when ``max_slots`` slots are all in flight (a GPU that many batches behind the host) is the
  oldest waited for (``# host sync:`` below, counted in ``waits``).

Two lifetimes:

``keep=True`` (``to_device``)
    the copy lands in a fresh tensor of torch's caching allocator (allocated on the stream: no
    sync, no cudaMalloc in the steady state). The ring never touches it again, so it may be handed
    to the user and kept (labels, target lam, partner, the hook's lam). The slot's event is
    recorded right after the copy: the pinned slot is free as soon as the copy has run.
``keep=False``
    the copy lands in the slot's own device buffer (nothing allocated per call); the views are
    valid for work queued before ``Staged.release(stream)``. The kernel's records use it.

On the CPU ``to_device`` returns plain tensors (fresh copies, never views of the inputs) and no
pinned memory is touched.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

ALIGN = 16  # bytes between groups in a slot: every dtype's views are aligned

_TORCH_DTYPES = {
    np.dtype(np.float32): torch.float32,
    np.dtype(np.float64): torch.float64,
    np.dtype(np.int64): torch.int64,
    np.dtype(np.int32): torch.int32,
    np.dtype(np.int16): torch.int16,
    np.dtype(np.uint8): torch.uint8,
    np.dtype(np.bool_): torch.bool,
}


def _group(g) -> list[np.ndarray]:
    """A group is one array or a list of arrays of one dtype (concatenated flat, no padding)."""
    arrays = [g] if isinstance(g, np.ndarray) else [np.asarray(a) for a in g]
    if not arrays:
        raise ValueError("a staging group needs at least one array (give an empty array for none)")
    if any(a.dtype != arrays[0].dtype for a in arrays):
        raise ValueError(f"one staging group holds one dtype, got {sorted({str(a.dtype) for a in arrays})}")
    return arrays


def _torch_dtype(dtype: np.dtype) -> torch.dtype:
    """The torch dtype of a group's view; structured records travel as their bytes (uint8)."""
    return _TORCH_DTYPES.get(np.dtype(dtype), torch.uint8)


def _layout(groups) -> tuple[list[list[np.ndarray]], list[int], list[int], int]:
    """Arrays per group, each group's byte offset and size, and the packed size."""
    arrays = [_group(g) for g in groups]
    offsets, sizes, total = [], [], 0
    for group in arrays:
        offsets.append(total)
        size = sum(a.nbytes for a in group)
        sizes.append(size)
        total += -(-size // ALIGN) * ALIGN
    return arrays, offsets, sizes, max(total, ALIGN)


class CudaMemory:
    """What the ring needs from CUDA (a fake with the same methods tests the bookkeeping on the CPU)."""

    def pinned(self, nbytes: int) -> torch.Tensor:
        return torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)

    def buffer(self, nbytes: int, device: torch.device, stream) -> torch.Tensor:
        with torch.cuda.stream(stream):
            return torch.empty(nbytes, dtype=torch.uint8, device=device)

    def event(self):
        return torch.cuda.Event()

    def copy(self, dst: torch.Tensor, src: torch.Tensor, stream) -> None:
        with torch.cuda.stream(stream):
            dst.copy_(src, non_blocking=True)  # from pinned memory: queued, the host goes on

    def wait(self, stream, event) -> None:
        stream.wait_event(event)  # GPU-side order, not a host wait

    def record_stream(self, tensor: torch.Tensor, stream) -> None:
        tensor.record_stream(stream)


class _Slot:
    __slots__ = (
        "host",
        "host_np",
        "device",
        "event",
        "device_event",
        "device_stream",
        "alloc_stream",
        "leased",
        "stamp",
    )

    def __init__(self, nbytes: int, memory):
        self.host = memory.pinned(nbytes)
        self.host_np = self.host.numpy()  # a view of the pinned buffer (no copy, no sync)
        self.device = None  # the slot's device buffer, made on the first keep=False use
        self.event: Any = None  # recorded after the last work that read the host buffer (copy or kernel)
        self.device_event: Any = None  # recorded after the last work that read the device buffer
        self.device_stream = None  # the stream of that work
        self.alloc_stream = None  # the stream the device buffer was allocated on
        self.leased = False  # filled and handed out, not yet released
        self.stamp = 0  # when it was last released (the ring's clock)

    def free(self) -> bool:
        return not self.leased and (self.event is None or self.event.query())


class Staged:
    """The device tensors of one ``PinnedRing.stage`` call (``tensors``, one flat tensor per group)."""

    __slots__ = ("tensors", "_ring", "_slot")

    def __init__(self, tensors: list[torch.Tensor], ring: PinnedRing | None, slot: _Slot | None):
        self.tensors = tensors
        self._ring, self._slot = ring, slot

    def release(self, stream) -> None:
        """The work that reads the tensors is queued on ``stream``: the slot returns to the ring once
        it has run (an event, no wait). Needed for ``keep=False`` only; a second call does nothing."""
        slot, self._slot = self._slot, None
        if slot is not None and self._ring is not None:
            with self._ring._lock:
                self._ring._release(slot, stream)


class PinnedRing:
    """Reused pinned slots for host→device copies, guarded by events (see the module docstring).

    ``slots`` are made on demand up to ``max_slots``; a slot too small for a call is replaced by one
    twice its size (or the call's). ``grown`` counts slots added because all were in flight and
    ``waits`` the host waits (only with ``max_slots`` slots in flight).
    """

    def __init__(
        self,
        device,
        *,
        slots: int = 4,
        slot_bytes: int = 64 * 1024,
        max_slots: int = 64,
        memory=None,
    ):
        self.device = torch.device(device)
        self.slot_bytes = int(slot_bytes)
        self.max_slots = int(max_slots)
        self._initial = int(slots)
        self.memory = memory if memory is not None else CudaMemory()
        self._slots: list[_Slot] = []
        self._clock = 0  # release order, to wait for the oldest slot
        self._lock = threading.Lock()
        self.grown = 0
        self.waits = 0

    # ------------------------------------------------------------------ per call
    def stage(self, groups: Sequence, stream, *, keep: bool) -> Staged:
        """Copy ``groups`` (each a C-contiguous array or a list of arrays of one dtype) to the device
        on ``stream`` in one copy; returns their flat device tensors (``Staged.tensors``).

        ``keep=True``: fresh tensors of the caching allocator, the caller's to keep; ``keep=False``:
        views of the slot's device buffer, valid for work queued before ``Staged.release(stream)``.
        """
        arrays, offsets, sizes, total = _layout(groups)
        with self._lock:
            slot = self._take(total)
            for group, off in zip(arrays, offsets):
                pos = off
                for a in group:
                    n = a.nbytes
                    slot.host_np[pos : pos + n] = np.ascontiguousarray(a).view(np.uint8).reshape(-1)
                    pos += n
            if keep:
                dev = self.memory.buffer(total, self.device, stream)
            else:
                if slot.device is None or slot.device.numel() < total:
                    slot.device = self.memory.buffer(max(total, self.slot_bytes), self.device, stream)
                    slot.alloc_stream = stream
                elif slot.device_stream is not None and slot.device_stream != stream:
                    # its buffer was last read on another stream: the copy waits for that on the GPU
                    self.memory.wait(stream, slot.device_event)
                if stream != slot.alloc_stream:
                    self.memory.record_stream(slot.device, stream)
                dev = slot.device
            self.memory.copy(dev[:total], slot.host[:total], stream)
            if keep:
                self._release(slot, stream, device=False)  # the pinned slot is free once this copy has run
        tensors = [
            dev[off : off + size].view(_torch_dtype(group[0].dtype)) for group, off, size in zip(arrays, offsets, sizes)
        ]
        return Staged(tensors, None if keep else self, None if keep else slot)

    def _release(self, slot: _Slot, stream, *, device: bool = True) -> None:
        if slot.event is None:
            slot.event = self.memory.event()
        slot.event.record(stream)  # the pinned host buffer is free once this has completed
        slot.stamp, self._clock = self._clock, self._clock + 1
        if device:  # ... and the device buffer has been read on `stream`
            if slot.device_event is None:
                slot.device_event = self.memory.event()
            slot.device_event.record(stream)
            slot.device_stream = stream
        slot.leased = False

    def _take(self, nbytes: int) -> _Slot:
        """A slot whose last use has completed, leased to the caller: the smallest free one that
        fits (small records stay out of the slots grown for large mask pools), else a free one
        grown to fit, else a new one; only with ``max_slots`` in flight the oldest is waited for."""
        free = [k for k, slot in enumerate(self._slots) if slot.free()]
        if free:
            fits = [k for k in free if self._slots[k].host.numel() >= nbytes]
            k = min(fits, key=lambda k: self._slots[k].host.numel()) if fits else free[0]
            if not fits:
                self._slots[k] = _Slot(max(nbytes, 2 * self._slots[k].host.numel()), self.memory)
            return self._lease(k)
        if len(self._slots) < self.max_slots:
            if len(self._slots) >= self._initial:
                self.grown += 1
            self._slots.append(_Slot(max(nbytes, self.slot_bytes), self.memory))
            return self._lease(len(self._slots) - 1)
        n = len(self._slots)
        waitable = [k for k in range(n) if not self._slots[k].leased]
        if not waitable:
            raise RuntimeError(
                f"all {n} staging slots are handed out and none was released: call Staged.release(stream) "
                "after queuing the work that reads a keep=False staging"
            )
        k = min(waitable, key=lambda k: self._slots[k].stamp)  # every slot in flight: the oldest
        self.waits += 1
        self._slots[k].event.synchronize()  # host sync: only with max_slots copies in flight
        if self._slots[k].host.numel() < nbytes:
            self._slots[k] = _Slot(max(nbytes, 2 * self._slots[k].host.numel()), self.memory)
        return self._lease(k)

    def _lease(self, k: int) -> _Slot:
        slot = self._slots[k]
        slot.leased = True
        return slot


_rings: dict[int, PinnedRing] = {}
_rings_lock = threading.Lock()


def ring(device) -> PinnedRing:
    """The staging ring of CUDA ``device`` (one per device, made on first use)."""
    device = torch.device(device)
    index = device.index if device.index is not None else torch.cuda.current_device()
    with _rings_lock:
        r = _rings.get(index)
        if r is None:
            r = _rings[index] = PinnedRing(torch.device("cuda", index))
    return r


def to_device(groups: Sequence, device, *, stream=None) -> list[torch.Tensor]:
    """Small host arrays to ``device`` as tensors the caller may keep: one flat tensor per group
    (a group is an array, or a list of arrays of one dtype laid end to end).

    On CUDA one pinned slot and one asynchronous copy for all groups (``keep=True``), on ``stream``
    (default: the current stream); on the CPU fresh tensors (copies, never views of the inputs).
    """
    device = torch.device(device)
    if device.type != "cuda":
        out = []
        for g in groups:
            arrays = _group(g)
            flat = np.concatenate([a.reshape(-1) for a in arrays]) if len(arrays) > 1 else arrays[0].reshape(-1).copy()
            out.append(torch.from_numpy(flat))
        return out
    stream = stream if stream is not None else torch.cuda.current_stream(device)
    return ring(device).stage(groups, stream, keep=True).tensors
