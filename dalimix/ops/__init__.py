"""The fused mix/normalise/cast/layout operation and its backends.

``mix_normalize`` is the one entry point the loader calls per batch: on CUDA one launch of the
kernel in ``kernels/mix_normalize.cu`` (CuPy); on the CPU the same kernel code compiled for the
host (``dalimix.ops.host``), or, where no C++ compiler is available, a vectorised torch twin
(``dalimix.ops.cpu``; ``DALIMIX_CPU_BACKEND=torch`` forces it). One contract, the same float32
arithmetic.
"""

from __future__ import annotations

import numpy as np
import torch

from .kernels import OUTPUT_TYPES, mix_normalize_entry
from .record import RECORD_DTYPE, identity_records, validate_erase, validate_records

__all__ = ["Normalization", "mix_normalize", "allocate_output", "RECORD_DTYPE", "identity_records"]


class Normalization:
    """Per-channel mean/std given on the 0..1 scale (timm/torchvision convention), applied to 0..255 input.

    ``out = (x - 255 * mean) / (255 * std)``; the kernels get ``255 * mean`` and ``1 / (255 * std)``.
    """

    def __init__(self, mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225)):
        try:
            mean = tuple(float(m) for m in mean)
            std = tuple(float(s) for s in std)
        except (TypeError, ValueError):
            raise ValueError(f"mean and std need 3 numbers each (R, G, B), got mean={mean!r} std={std!r}") from None
        if len(mean) != 3 or len(std) != 3:
            raise ValueError(f"mean and std need 3 values (R, G, B), got mean={mean} std={std}")
        if not all(np.isfinite(mean)) or not all(np.isfinite(std)) or min(std) <= 0:
            raise ValueError(f"std must be positive and mean/std finite, got mean={mean} std={std}")
        self.mean = mean
        self.std = std
        m255 = [float(np.float32(255.0 * m)) for m in mean]
        s255 = [float(np.float32(1.0 / (255.0 * s))) for s in std]
        self.mean255 = (m255[0], m255[1], m255[2])
        self.inv_std255 = (s255[0], s255[1], s255[2])
        self._cpu = (
            torch.tensor(self.mean255, dtype=torch.float32),
            torch.tensor(self.inv_std255, dtype=torch.float32),
        )

    def __repr__(self) -> str:
        return f"Normalization(mean={self.mean}, std={self.std})"


def allocate_output(
    n: int, height: int, width: int, *, dtype: torch.dtype, channels_last: bool, device
) -> torch.Tensor:
    """An ``n x 3 x H x W`` tensor in NCHW or channels_last memory order."""
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    return torch.empty((n, 3, height, width), dtype=dtype, device=device, memory_format=fmt)


def mix_normalize(
    images: torch.Tensor,
    records: np.ndarray | None = None,
    masks: torch.Tensor | None = None,
    gather: torch.Tensor | None = None,
    *,
    norm: Normalization | None = None,
    dtype: torch.dtype = torch.float32,
    channels_last: bool = False,
    out: torch.Tensor | None = None,
    erase: np.ndarray | None = None,
    threads: int | None = None,
) -> torch.Tensor:
    """Mix, normalise, cast and lay out a uint8 batch in one pass (random erasing included).

    Args:
        images: ``N_src x H x W x 3`` uint8, contiguous, on CPU or CUDA (never written).
        records: ``n <= N_src`` records of ``RECORD_DTYPE`` (host numpy); None = no mixing.
        masks: flat float32 mask pool on ``images.device`` for records with method MASK.
        gather: flat int32 table of block permutations on ``images.device`` for MASK records with
            ``FLAG_GATHER`` (and ``FLAG_GATHER_SELF``: the own image's at ``p3``) (``dalimix.ops.record``); on the CPU its values are checked here, on
            CUDA they are trusted (the mask hook stage checks and clamps them on the device).
        norm: mean/std; ImageNet's by default.
        dtype: float32, float16 or bfloat16.
        channels_last: write channels_last memory order (the tensor is still ``n x 3 x H x W``).
        out: optional preallocated output (shape, dtype, layout and device must match).
        erase: optional random erasing of the output in the same pass: ``n x ERASE_STRIDE`` int32 host
            table (``dalimix.ops.record.erase_table``; ``dalimix.erase.RandomErasing.table`` makes it
            from a plan); fills are normalised values (0, the box colour, or the kernel's hash noise).
        threads: CPU only: threads the host kernel splits the batch over, the calling one included
            (default ``torch.get_num_threads()``; the loader passes the cores DALI leaves free, plus one).

    Returns:
        ``n x 3 x H x W`` tensor of ``dtype`` on ``images.device``.
    """
    if (
        not isinstance(images, torch.Tensor)
        or images.dtype != torch.uint8
        or images.dim() != 4
        or images.shape[-1] != 3
    ):
        got = f"{images.dtype} {tuple(images.shape)}" if isinstance(images, torch.Tensor) else type(images).__name__
        raise ValueError(f"images must be a uint8 tensor N x H x W x 3, got {got}")
    if not images.is_contiguous():
        raise ValueError("images must be contiguous (N x H x W x 3 in memory)")
    if dtype not in OUTPUT_TYPES:
        raise ValueError(f"dtype {dtype} is not supported; use torch.float32, torch.float16 or torch.bfloat16")
    if threads is not None and (isinstance(threads, bool) or not isinstance(threads, int) or threads < 1):
        raise ValueError(f"threads must be a positive int (or None for torch.get_num_threads()), got {threads!r}")
    norm = norm or Normalization()
    n_src, h, w, _ = images.shape
    if h * w * 3 >= 2**32:
        raise ValueError(
            f"images of {h}x{w} pixels are too large: the kernels index within one image with 32 bits "
            "(H * W * 3 < 2^32); crop or resize them first"
        )
    if records is None:
        records = identity_records(n_src)
    pool = 0 if masks is None else masks.numel()
    table = 0 if gather is None else gather.numel()
    validate_records(records, n_src=n_src, height=h, width=w, mask_pool_size=pool, gather_size=table)
    if gather is not None:
        _check_gather(gather, records, images.device)
    if masks is not None and (
        masks.dtype != torch.float32 or masks.device != images.device or not masks.is_contiguous()
    ):
        raise ValueError(
            f"masks must be a contiguous float32 tensor on {images.device}, got {masks.dtype} on {masks.device}"
        )
    n = len(records)
    if erase is not None:
        validate_erase(erase, n=n, height=h, width=w)
        if not erase[:, 0].any():
            erase = None  # no boxes in the batch: the kernel gets a null table
    if out is None:
        out = allocate_output(n, h, w, dtype=dtype, channels_last=channels_last, device=images.device)
    else:
        fmt = torch.channels_last if channels_last else torch.contiguous_format
        if (
            out.shape != (n, 3, h, w)
            or out.dtype != dtype
            or out.device != images.device
            or not out.is_contiguous(memory_format=fmt)
        ):
            raise ValueError(
                f"out must be a {n}x3x{h}x{w} {dtype} tensor on {images.device} in "
                f"{'channels_last' if channels_last else 'NCHW'} order, got {out.dtype} {tuple(out.shape)} on {out.device}"
            )
    if n == 0:
        return out
    if images.device.type == "cuda":
        from .cuda import mix_normalize_cuda

        return mix_normalize_cuda(
            images,
            records,
            masks,
            gather,
            entry=mix_normalize_entry(dtype, channels_last),
            mean255=norm.mean255,
            inv_std255=norm.inv_std255,
            out=out,
            erase=erase,
        )
    from . import host

    if host.available():
        return host.mix_normalize_host(
            images,
            records,
            masks,
            gather,
            entry=mix_normalize_entry(dtype, channels_last),
            mean255=norm.mean255,
            inv_std255=norm.inv_std255,
            out=out,
            erase=erase,
            threads=threads,
        )
    from .cpu import mix_normalize_cpu

    mean255, inv_std255 = norm._cpu
    return mix_normalize_cpu(
        images, records, masks, gather, mean255=mean255, inv_std255=inv_std255, out=out, erase=erase
    )


def _check_gather(gather: torch.Tensor, records: np.ndarray, device: torch.device) -> None:
    """The gather table's form; on the CPU also every gathered sample's values (within its grid)."""
    if gather.dtype != torch.int32 or gather.device != device or not gather.is_contiguous() or gather.dim() != 1:
        raise ValueError(
            f"gather must be a flat contiguous int32 tensor on {device}, got {gather.dtype} "
            f"{tuple(gather.shape)} on {gather.device}"
        )
    if device.type == "cuda":
        return  # no host sync: the producer (dalimix.hook.MaskHookStage) keeps the values in range
    from .record import FLAG_GATHER_SELF, gather_rows

    rows = gather_rows(records)
    table = gather.numpy()  # host sync: none, a CPU tensor (CUDA returned above)
    for i in rows:
        k = int(records["p1"][i]) * int(records["p2"][i])
        own = int(records["flags"][i]) & FLAG_GATHER_SELF
        for field in ("p0", "p3") if own else ("p0",):
            off = int(records[field][i])
            vals = table[off : off + k]
            if len(vals) and (int(vals.min()) < 0 or int(vals.max()) >= k):
                image = "partner" if field == "p0" else "own image"
                raise ValueError(
                    f"record {int(i)}: gather[{off}:{off + k}] ({image}) holds block indices outside [0, {k}) "
                    f"(the {int(records['p1'][i])}x{int(records['p2'][i])} grid)"
                )
