"""CUDA backend: the kernels in ``kernels/*.cu`` compiled at run time by CuPy (NVRTC).

Launches on the caller's current torch CUDA stream, so the output is stream-ordered with the
training step that consumes it. The per-batch path never waits on the GPU from the host and
allocates nothing in the steady state:

- records (and the random-erasing table, in the same slot and copy) travel through the device's
  staging ring (``dalimix.ops.staging``): one reused pinned
  slot with its own device buffer per launch, reused only once the event recorded after its kernel
  has completed (``Event.query``, never a wait: a busy ring grows by a slot instead), its device
  buffer rewritten only after that kernel on the GPU's side (``Stream.wait_event``) when the caller
  switched streams;
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
from .staging import ring as staging_ring

_lock = threading.Lock()
_modules: dict[tuple[int, str, str], Any] = {}  # cupy.RawModule (CuPy is not type-analysed)
_sms: dict[int, int] = {}
_placeholders: dict[int, torch.Tensor] = {}
_streams: OrderedDict = OrderedDict()
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


def mix_normalize_cuda(
    images: torch.Tensor,
    records: np.ndarray,
    masks: torch.Tensor | None,
    gather: torch.Tensor | None = None,
    *,
    entry: str,
    mean255: tuple[float, float, float],
    inv_std255: tuple[float, float, float],
    out: torch.Tensor,
    erase: np.ndarray | None = None,
) -> torch.Tensor:
    """Launch entry ``entry`` once for the whole batch; see ``dalimix.ops.mix_normalize``."""
    require("cupy", "cuda", "the CUDA path (device='cuda')")

    device = images.device
    n = len(records)
    _, h, w, _ = images.shape
    stream = torch.cuda.current_stream(device)
    groups = [records] if erase is None else [records, np.ascontiguousarray(erase, dtype=np.int32)]
    staged = staging_ring(device).stage(groups, stream, keep=False)  # the erase table rides in the records' slot
    try:
        erase_ptr = np.uint64(staged.tensors[1].data_ptr()) if erase is not None else np.uint64(0)
        return _launch(
            staged.tensors[0], erase_ptr, stream, images, masks, gather, entry, mean255, inv_std255, out, n, h, w
        )
    finally:
        staged.release(stream)  # the slot returns to the ring once this kernel has run


def _launch(rec_dev, erase_ptr, stream, images, masks, gather, entry, mean255, inv_std255, out, n, h, w):
    device = images.device
    if masks is None or masks.numel() == 0:
        masks = _placeholder_pool(device)
    if gather is None or gather.numel() == 0:
        gather = _placeholder_pool(device)  # never read: validate_records refuses gather records without a table
    fn = _function(device, entry)
    grid, block = launch_config(n, h, w, sms=_multiprocessors(device))
    ptr = lambda t: np.uint64(t.data_ptr())  # noqa: E731
    args = (
        ptr(images),
        ptr(rec_dev),
        ptr(masks),
        ptr(gather),
        ptr(out),
        np.int32(n),
        np.int32(h),
        np.int32(w),
        *(np.float32(m) for m in mean255),
        *(np.float32(s) for s in inv_std255),
        erase_ptr,
    )
    import cupy

    with cupy.cuda.Device(device.index or 0), cupy_stream(stream):
        fn(grid, block, args)
    return out
