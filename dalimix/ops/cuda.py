"""CUDA backend: the kernels in ``kernels/*.cu`` compiled at run time by CuPy (NVRTC).

Launches on the caller's current torch CUDA stream, so the output is stream-ordered with the
training step that consumes it and needs no host synchronisation.
"""

from __future__ import annotations

import threading

import numpy as np
import torch

from .._optional import require
from .kernels import ENTRIES, kernel_dir, kernel_source

_BLOCK = 256
_lock = threading.Lock()
_modules: dict[tuple[int, str], object] = {}


def _function(device: torch.device, name: str):
    """The compiled CuPy function for entry ``name`` on ``device`` (compiled once per device and file)."""
    cupy = require("cupy", "cuda", "the CUDA path (device='cuda')")
    entry = ENTRIES[name]
    key = (device.index or 0, entry.file)
    with _lock:
        module = _modules.get(key)
        if module is None:
            with cupy.cuda.Device(key[0]):
                module = cupy.RawModule(
                    code=kernel_source(entry.file),
                    options=("--std=c++17", f"-I{kernel_dir()}"),
                )
            _modules[key] = module
    return module.get_function(name)


def _grid(device: torch.device, total: int) -> int:
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    return max(1, min((total + _BLOCK - 1) // _BLOCK, sms * 32))


def upload_records(records: np.ndarray, device: torch.device) -> torch.Tensor:
    """Copy the host records to ``device`` asynchronously (through pinned memory)."""
    host = torch.from_numpy(np.ascontiguousarray(records).view(np.uint8))
    return host.pin_memory().to(device, non_blocking=True)


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
    cupy = require("cupy", "cuda", "the CUDA path (device='cuda')")

    device = images.device
    n = len(records)
    _, h, w, _ = images.shape
    rec_dev = upload_records(records, device)
    if masks is None or masks.numel() == 0:
        masks = torch.zeros(1, dtype=torch.float32, device=device)
    fn = _function(device, entry)
    stream = torch.cuda.current_stream(device)
    total = n * h * w
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
    with cupy.cuda.Device(device.index or 0), cupy.cuda.ExternalStream(stream.cuda_stream):
        fn((_grid(device, total),), (_BLOCK,), args)
    # rec_dev and masks were allocated on this stream, so the caching allocator reuses their
    # memory only for work queued after this launch.
    return out
