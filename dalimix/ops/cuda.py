"""CUDA backend: the kernels in ``kernels/*.cu`` compiled at run time by CuPy (NVRTC).

Launches on the caller's current torch CUDA stream, so the output is stream-ordered with the
training step that consumes it. The per-batch path never waits on the GPU from the host and
allocates nothing in the steady state:

- records travel through a ring of pinned host slots, each with its own device buffer; a slot is
  reused only once the event recorded after its last kernel has completed (``Event.query``, never
  a wait: a busy ring grows by a slot instead), and its device buffer is rewritten only after that
  kernel on the GPU's side (``Stream.wait_event``) when the caller switched streams;
- records without masks get a one-element placeholder pool allocated once per device;
- the CuPy stream wrapping torch's current stream is made once per stream
  (``cupy.cuda.Stream.from_external``, CuPy 14's replacement for the deprecated ``ExternalStream``).
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from typing import Any

import numpy as np
import torch

from .._optional import require
from .kernels import ENTRIES, kernel_dir, kernel_source, launch_config

_lock = threading.Lock()
_modules: dict[tuple[int, str, str], Any] = {}  # cupy.RawModule (CuPy is not type-analysed)
_sms: dict[int, int] = {}
_placeholders: dict[int, torch.Tensor] = {}
_streams: OrderedDict = OrderedDict()
_rings: dict[int, PinnedRing] = {}
_MAX_STREAMS = 64


def _function(device: torch.device, name: str):
    """The compiled CuPy function for entry ``name`` on ``device``: each entry is compiled alone
    (``-DDM_ENTRY_MASK``), once per device, so a loader pays NVRTC only for the one it launches."""
    cupy = require("cupy", "cuda", "the CUDA path (device='cuda')")

    entry = ENTRIES[name]
    key = (device.index or 0, entry.file, name)
    with _lock:
        module = _modules.get(key)
        if module is None:
            bit = [e for e in ENTRIES if ENTRIES[e].file == entry.file].index(name)
            with cupy.cuda.Device(key[0]):
                module = cupy.RawModule(
                    code=kernel_source(entry.file),
                    options=("--std=c++17", f"-I{kernel_dir()}", f"-DDM_ENTRY_MASK={1 << bit}"),
                )
            _modules[key] = module
    return module.get_function(name)


def _multiprocessors(device: torch.device) -> int:
    index = device.index or 0
    if index not in _sms:
        _sms[index] = torch.cuda.get_device_properties(device).multi_processor_count
    return _sms[index]


def _placeholder_pool(device: torch.device) -> torch.Tensor:
    """One float32 zero per device, the mask pool of batches without masks (never read by the kernel)."""
    index = device.index or 0
    pool = _placeholders.get(index)
    if pool is None:
        pool = _placeholders[index] = torch.zeros(1, dtype=torch.float32, device=device)
    return pool


class _TorchStreamHandle:
    """The CUDA stream protocol (``__cuda_stream__``) for a raw stream handle."""

    def __init__(self, ptr: int):
        self.ptr = int(ptr)

    def __cuda_stream__(self):
        return (0, self.ptr)


def cupy_stream(stream: torch.cuda.Stream):
    """The CuPy stream for a torch stream (cached per device and handle)."""
    import cupy

    key = (stream.device.index or 0, int(stream.cuda_stream))
    with _lock:
        cs = _streams.get(key)
        if cs is None:
            if hasattr(cupy.cuda.Stream, "from_external"):
                cs = cupy.cuda.Stream.from_external(_TorchStreamHandle(key[1]))
            else:  # CuPy < 14
                cs = cupy.cuda.ExternalStream(key[1], key[0])
            _streams[key] = cs
            if len(_streams) > _MAX_STREAMS:
                _streams.popitem(last=False)
        else:
            _streams.move_to_end(key)
    return cs


class _Slot:
    __slots__ = ("host", "host_np", "device", "event", "stream", "alloc_stream")

    def __init__(self, nbytes: int, device: torch.device, stream: torch.cuda.Stream):
        self.host = torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)
        self.host_np = self.host.numpy()
        with torch.cuda.stream(stream):
            self.device = torch.empty(nbytes, dtype=torch.uint8, device=device)
        self.event: Any = None  # a torch.cuda.Event recorded after the last work that read this slot
        self.stream = None  # the stream of that work
        self.alloc_stream = stream


class PinnedRing:
    """Host→device staging through reused pinned slots, guarded by events (no host waits).

    ``upload(array, stream)`` returns a device view of ``array``'s bytes valid for work queued on
    ``stream`` until ``release(stream)`` is called after that work; the slot is reused once the
    event recorded then has completed. A slot still in flight is never waited for: the ring grows
    (up to ``max_slots``; past that, the oldest slot is waited for, which only a GPU more than
    ``max_slots`` batches behind the host can cause).
    """

    def __init__(self, device: torch.device, *, slots: int = 4, slot_bytes: int = 64 * 1024, max_slots: int = 64):
        self.device = torch.device(device)
        self.slot_bytes = slot_bytes
        self.max_slots = max_slots
        self._initial = slots
        self._slots: list[_Slot] = []
        self._next = 0
        self._current: _Slot | None = None
        self.lock = threading.Lock()  # held from upload to release by one launch
        self.grown = 0  # slots added because all were in flight (a diagnostic)
        self.waits = 0  # host waits (only when max_slots are all in flight)

    def _take(self, nbytes: int, stream: torch.cuda.Stream) -> _Slot:
        n = len(self._slots)
        for i in range(n):
            slot = self._slots[(self._next + i) % n]
            if slot.event is None or slot.event.query():
                if slot.host.numel() < nbytes:
                    self._slots[(self._next + i) % n] = slot = _Slot(
                        max(nbytes, 2 * slot.host.numel()), self.device, stream
                    )
                self._next = (self._next + i + 1) % n
                return slot
        if n < self.max_slots:
            slot = _Slot(max(nbytes, self.slot_bytes), self.device, stream)
            self._slots.insert(self._next, slot)
            self._next = (self._next + 1) % len(self._slots)
            if n >= self._initial:
                self.grown += 1
            return slot
        slot = self._slots[self._next]  # every slot in flight: only a GPU far behind gets here
        self.waits += 1
        slot.event.synchronize()  # host sync: only with max_slots batches in flight
        if slot.host.numel() < nbytes:
            self._slots[self._next] = slot = _Slot(max(nbytes, 2 * slot.host.numel()), self.device, stream)
        self._next = (self._next + 1) % len(self._slots)
        return slot

    def upload(self, array: np.ndarray, stream: torch.cuda.Stream) -> torch.Tensor:
        """Copy ``array`` (C-contiguous) to the device on ``stream``; a uint8 device view of its bytes."""
        raw = np.ascontiguousarray(array).view(np.uint8).reshape(-1)
        nbytes = raw.size
        slot = self._take(max(nbytes, 1), stream)
        slot.host_np[:nbytes] = raw
        if slot.stream is not None and slot.stream != stream and slot.event is not None:
            stream.wait_event(slot.event)  # the device buffer was read on another stream: GPU-side order
        if stream != slot.alloc_stream:
            slot.device.record_stream(stream)
        dev = slot.device[:nbytes]
        with torch.cuda.stream(stream):
            dev.copy_(slot.host[:nbytes], non_blocking=True)
        self._current = slot
        slot.stream = stream
        return dev

    def release(self, stream: torch.cuda.Stream) -> None:
        """Mark the last upload's slot free once the work queued on ``stream`` so far has completed."""
        slot, self._current = self._current, None
        if slot is not None:
            if slot.event is None:
                slot.event = torch.cuda.Event()
            slot.event.record(stream)


def record_ring(device: torch.device) -> PinnedRing:
    """The records' ring of ``device`` (one per device, created on first use)."""
    index = device.index or 0
    with _lock:
        ring = _rings.get(index)
        if ring is None:
            ring = _rings[index] = PinnedRing(device)
    return ring


def upload_records(records: np.ndarray, device: torch.device, stream: torch.cuda.Stream | None = None) -> torch.Tensor:
    """Copy the host records to ``device`` asynchronously through the device's pinned ring.

    The returned device buffer belongs to the ring: valid for work queued on ``stream`` before the
    next ``record_ring(device).release(stream)``.
    """
    stream = stream or torch.cuda.current_stream(device)
    return record_ring(device).upload(records, stream)


def mix_normalize_cuda(
    images: torch.Tensor,
    records: np.ndarray,
    masks: torch.Tensor | None,
    *,
    entry: str,
    mean255: tuple[float, float, float],
    inv_std255: tuple[float, float, float],
    out: torch.Tensor,
) -> torch.Tensor:
    """Launch entry ``entry`` once for the whole batch; see ``dalimix.ops.mix_normalize``."""
    require("cupy", "cuda", "the CUDA path (device='cuda')")

    device = images.device
    n = len(records)
    _, h, w, _ = images.shape
    stream = torch.cuda.current_stream(device)
    ring = record_ring(device)
    with ring.lock:
        return _launch(ring, stream, images, records, masks, entry, mean255, inv_std255, out, n, h, w)


def _launch(ring, stream, images, records, masks, entry, mean255, inv_std255, out, n, h, w):
    device = images.device
    rec_dev = ring.upload(records, stream)
    if masks is None or masks.numel() == 0:
        masks = _placeholder_pool(device)
    fn = _function(device, entry)
    grid, block = launch_config(n, h, w, sms=_multiprocessors(device))
    ptr = lambda t: np.uint64(t.data_ptr())  # noqa: E731
    args = (
        ptr(images),
        ptr(rec_dev),
        ptr(masks),
        ptr(out),
        np.int32(n),
        np.int32(h),
        np.int32(w),
        *(np.float32(m) for m in mean255),
        *(np.float32(s) for s in inv_std255),
    )
    import cupy

    with cupy.cuda.Device(device.index or 0), cupy_stream(stream):
        fn(grid, block, args)
    ring.release(stream)  # the slot returns to the ring once this kernel has run
    return out
