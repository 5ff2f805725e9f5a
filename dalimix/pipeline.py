"""DALI pipeline builders: train (random resized crop + flip) and eval (resize + centre crop).

DALI stops at uint8 HWC: normalising, casting, laying out and mixing are the fused kernel's job.
Each epoch gets its own pipeline over the exact file order dalimix planned for this rank, so the
sample order, sharding and padding are dalimix's (see ``dalimix.loader``), and DALI's own random
streams are seeded from (seed, rank, epoch).
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass

import torch

from . import augment

INTERPOLATIONS = ("bilinear", "bicubic", "nearest", "triangular")


@dataclass(frozen=True)
class DeviceStrings:
    """Where each stage runs: ``decoder`` for ``fn.decoders.*``, ``ops`` for resize/crop/flip."""

    decoder: str
    ops: str
    device_id: int | None


def resolve_device(device) -> torch.device:
    """``None`` -> CUDA when torch sees a GPU, else CPU. Accepts ``"cpu"``, ``"cuda"``, ``"cuda:1"``, torch.device.

    A bare ``"cuda"`` is ``cuda:LOCAL_RANK`` under torchrun (``dalimix.distributed.default_cuda_index``).
    """
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise ValueError(f"device={device!r} is not a device; use 'cpu', 'cuda' or 'cuda:N'") from None
    if dev.type not in ("cpu", "cuda"):
        raise ValueError(f"device={device!r}: dalimix runs on 'cpu' or 'cuda'")
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device={device!r} but torch sees no CUDA GPU; use device='cpu'")
        from .distributed import default_cuda_index

        dev = torch.device("cuda", dev.index if dev.index is not None else default_cuda_index())
    return dev


def device_strings(device: torch.device) -> DeviceStrings:
    """The one place that maps a torch device to DALI's device strings and ``device_id``.

    CUDA: nvJPEG "mixed" decoding and GPU ops on that GPU. CPU: DALI's CPU-only mode
    (``device_id=None``), no GPU touched.
    """
    if device.type == "cuda":
        return DeviceStrings(decoder="mixed", ops="gpu", device_id=device.index or 0)
    return DeviceStrings(decoder="cpu", ops="cpu", device_id=None)


@dataclass(frozen=True)
class AugmentSpec:
    """What the DALI part of the pipeline does to each image (all validated by ImageLoader)."""

    train: bool
    height: int
    width: int
    scale: tuple[float, float] = (0.08, 1.0)
    ratio: tuple[float, float] = (3 / 4, 4 / 3)
    hflip: float = 0.5
    crop_pct: float = 0.875
    interpolation: str = "bilinear"
    auto_augment: str | None = None  # a preset's canonical string (dalimix.autoaug), train only, after the flip
    extra: augment.Augment | None = None  # timm's vflip / colour jitter / grayscale / blur / random interpolation

    @property
    def resize_shorter(self) -> int:
        """Eval: the shorter side is resized to floor(max(H, W) / crop_pct) (timm's rule for square sizes)."""
        return int(math.floor(max(self.height, self.width) / self.crop_pct))


def default_num_threads() -> int:
    """The CPU cores this process may use, split between torchrun's processes on this machine."""
    from .distributed import local_world_size

    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        cores = os.cpu_count() or 1
    return max(1, cores // local_world_size())


def _interp(name: str):
    from nvidia.dali import types

    return {
        "bilinear": types.INTERP_LINEAR,
        "bicubic": types.INTERP_CUBIC,
        "nearest": types.INTERP_NN,
        "triangular": types.INTERP_TRIANGULAR,
    }[name]


def _op_seed(seed: int, op: int) -> int:
    """A fixed seed per random operator, so the streams do not depend on the rest of the graph
    (the same crops and flips whichever reader feeds the decoder)."""
    from .rng import derive_seed

    return derive_seed(seed, op)


def build_pipeline(
    files: list[str],
    sample_ids: list[int],
    *,
    spec: AugmentSpec,
    device: torch.device,
    batch_size: int,
    num_threads: int,
    seed: int,
    prefetch: int,
    reader=None,
    checkpointing: bool = True,
    checkpoint=None,
):
    """A built DALI pipeline reading ``files`` in order; outputs (uint8 N x H x W x 3, sample id per image).

    ``sample_ids[i]`` travels with ``files[i]`` as DALI's label, so every output image is traced back
    to the sample it came from (labels, error reports, skip lists). ``reader``: a callable that
    returns the (encoded bytes, sample id) DALI nodes instead of ``fn.readers.file`` (tar shards,
    ``dalimix.webdataset``). ``checkpointing``/``checkpoint``: DALI's pipeline checkpointing (its
    random streams and reader position), for exact resume (``dalimix.resume``).
    """
    from nvidia.dali import fn, pipeline_def, types

    dev = device_strings(device)

    @pipeline_def(
        batch_size=batch_size,
        num_threads=num_threads,
        device_id=dev.device_id,
        seed=seed,
        prefetch_queue_depth=prefetch,
        enable_checkpointing=checkpointing,
        checkpoint=checkpoint,
        # DALI's auto_aug and dalimix.augment branch per sample
        enable_conditionals=spec.auto_augment is not None or (spec.extra is not None and spec.extra.needs_conditionals),
    )
    def pipe():
        if reader is not None:
            encoded, ids = reader()
        else:
            encoded, ids = fn.readers.file(files=files, labels=sample_ids, random_shuffle=False, name="reader")
        if spec.train:
            images = fn.decoders.image_random_crop(
                encoded,
                device=dev.decoder,
                output_type=types.RGB,
                random_area=list(spec.scale),
                random_aspect_ratio=list(spec.ratio),
                num_attempts=10,
                seed=_op_seed(seed, 1),
            )
            images = fn.resize(
                images,
                device=dev.ops,
                resize_x=spec.width,
                resize_y=spec.height,
                interp_type=augment.interp_type(_interp(spec.interpolation), spec.extra, seed=_op_seed(seed, 3)),
                antialias=True,
            )
            if spec.hflip > 0:
                images = fn.flip(images, device=dev.ops, horizontal=fn.random.coin_flip(probability=spec.hflip, seed=_op_seed(seed, 2)))
            images = augment.secondary(images, spec.extra, spec.auto_augment, height=spec.height, width=spec.width,
                                       seed=_op_seed(seed, 4))
        else:
            images = fn.decoders.image(encoded, device=dev.decoder, output_type=types.RGB)
            images = fn.resize(
                images,
                device=dev.ops,
                resize_shorter=spec.resize_shorter,
                interp_type=_interp(spec.interpolation),
                antialias=True,
            )
            images = fn.crop(images, device=dev.ops, crop=(spec.height, spec.width), out_of_bounds_policy="pad")
        return images, ids

    p = pipe()
    p.build()
    return p
