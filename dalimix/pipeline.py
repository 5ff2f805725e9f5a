"""The DALI pipeline: train (random resized crop) and eval (resize + centre crop), fed per batch.

DALI stops at uint8 HWC: flipping, normalising, casting, laying out and mixing are the fused
kernel's job. A loader builds ONE pipeline for its whole life; it is fed batch by batch through
``external_source`` nodes (``feed``): the encoded bytes of the samples dalimix planned, and in
training each sample's crop window. Sample order, sharding and padding are dalimix's (see
``dalimix.loader``), and so is every random draw (``plan_crops``: a function of (seed, rank, epoch,
step)), so a batch does not depend on what the pipeline ran before it. Only an ``auto_augment``
preset draws from DALI's own random streams (seeded from (seed, rank)); DALI's checkpoint carries
those for exact resume.
"""

from __future__ import annotations

import io
import math
import os
from dataclasses import dataclass

import numpy as np
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
    """What is done to each image before mixing (all validated by ImageLoader): DALI decodes, crops
    and resizes; ``hflip`` is drawn with the crop and applied by the fused kernel."""

    train: bool
    height: int
    width: int
    scale: tuple[float, float] = (0.08, 1.0)
    ratio: tuple[float, float] = (3 / 4, 4 / 3)
    hflip: float = 0.5
    crop_pct: float = 0.875
    interpolation: str = "bilinear"
    auto_augment: str | None = None  # a preset's canonical string (dalimix.autoaug), train only, before the flip
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


def plan_crops(sizes: np.ndarray, rng: np.random.Generator, *, scale, ratio) -> np.ndarray:
    """Random resized crop windows, torchvision's ``RandomResizedCrop.get_params`` rule, vectorised.

    Args:
        sizes: ``n x 2`` (height, width) of each decoded image; 0 where unknown.
        rng: the batch's generator; exactly ``n x 10 x 2`` + ``n x 2`` uniforms are drawn, whatever
            the sizes, so the next batch's draws never depend on this one's images.
        scale, ratio: area fraction and aspect (w/h) ranges.

    Returns:
        ``n x 4`` float32 ``(x, y, w, h)`` as fractions of the image's width and height (whole pixels
        in the image's own grid): up to 10 attempts of (area, log-aspect), the first that fits wins,
        else the centre crop with the aspect clamped to ``ratio``. Unknown sizes get the whole image.
    """
    n = len(sizes)
    h_img: np.ndarray = sizes[:, 0].astype(np.float64)[:, None]
    w_img: np.ndarray = sizes[:, 1].astype(np.float64)[:, None]
    draws = rng.random((n, 10, 2))
    place = rng.random((n, 2))
    area = h_img * w_img * (scale[0] + (scale[1] - scale[0]) * draws[..., 0])
    log_r = np.log(ratio[0]) + (np.log(ratio[1]) - np.log(ratio[0])) * draws[..., 1]
    aspect = np.exp(log_r)
    w = np.round(np.sqrt(area * aspect))
    h = np.round(np.sqrt(area / aspect))
    fits = (w > 0) & (w <= w_img) & (h > 0) & (h <= h_img)
    first = np.argmax(fits, axis=1)
    ok = fits[np.arange(n), first]
    cw, ch = w[np.arange(n), first], h[np.arange(n), first]
    # fallback: the centre crop of the whole image with its aspect clamped into ``ratio``
    wi, hi = w_img[:, 0], h_img[:, 0]
    in_ratio = np.divide(wi, hi, out=np.ones_like(wi), where=hi > 0)
    fw = np.where(in_ratio < ratio[0], wi, np.where(in_ratio > ratio[1], np.round(hi * ratio[1]), wi))
    fh = np.where(in_ratio < ratio[0], np.round(wi / ratio[0]), hi)
    cw, ch = np.where(ok, cw, fw), np.where(ok, ch, fh)
    x = np.where(ok, np.floor(place[:, 0] * (wi - cw + 1)), np.floor((wi - cw) / 2))
    y = np.where(ok, np.floor(place[:, 1] * (hi - ch + 1)), np.floor((hi - ch) / 2))
    unknown = (wi <= 0) | (hi <= 0)
    wi, hi = np.where(unknown, 1, wi), np.where(unknown, 1, hi)
    out = np.stack([x / wi, y / hi, cw / wi, ch / hi], axis=1)
    out[unknown] = (0, 0, 1, 1)
    return out.astype(np.float32)


def encoded_size(data: np.ndarray) -> tuple[int, int]:
    """(height, width) of an encoded image as DALI decodes it (EXIF orientation applied), from its
    header only; (0, 0) when the header cannot be read (the decoder then reports the file)."""
    from PIL import Image

    try:
        with Image.open(io.BytesIO(data.data)) as im:
            w, h = im.size
            if im.format == "JPEG" or im.format == "TIFF" or im.format == "WEBP":
                if im.getexif().get(0x0112, 1) in (5, 6, 7, 8):  # rotated by 90 degrees
                    w, h = h, w
    except Exception:  # PIL raises many types for bad headers
        return 0, 0
    return int(h), int(w)


def _op_seed(seed: int, op: int) -> int:
    """A fixed seed per random operator, so the streams do not depend on the rest of the graph."""
    from .rng import derive_seed

    return derive_seed(seed, op)


def build_pipeline(
    *,
    spec: AugmentSpec,
    device: torch.device,
    batch_size: int,
    num_threads: int,
    seed: int,
    prefetch: int,
    checkpointing: bool = False,
    checkpoint=None,
):
    """A built DALI pipeline fed by ``feed``; outputs (uint8 N x H x W x 3, sample id per image).

    Inputs per batch: ``encoded`` (each sample's bytes), ``ids`` (each sample's id, handed back
    with its image so every output is traced to its file), and in training ``window`` (``plan_crops``).
    No flip here: the fused kernel reads flipped samples mirrored (``dalimix.ops.record.set_flips``).
    ``seed`` seeds DALI's own random streams, used only by ``auto_augment`` presets;
    ``checkpointing``/``checkpoint``: DALI's checkpoint of those streams (``dalimix.resume``).
    """
    from nvidia.dali import fn, pipeline_def, types

    dev = device_strings(device)

    @pipeline_def(
        batch_size=batch_size,
        num_threads=num_threads,
        device_id=dev.device_id,
        seed=seed,
        prefetch_queue_depth=prefetch,
        exec_dynamic=True,  # outputs shared on the consumer's stream, freed in stream order
        enable_checkpointing=checkpointing,
        checkpoint=checkpoint,
        # DALI's auto_aug and dalimix.augment branch per sample
        enable_conditionals=spec.auto_augment is not None or (spec.extra is not None and spec.extra.needs_conditionals),
    )
    def pipe():
        encoded = fn.external_source(name="encoded", dtype=types.UINT8, ndim=1, no_copy=True)
        ids = fn.external_source(name="ids", dtype=types.INT32, ndim=1)
        if spec.train:
            window = fn.external_source(name="window", dtype=types.FLOAT, ndim=1)
            images = fn.decoders.image_slice(
                encoded,
                window[0:2],
                window[2:4],
                device=dev.decoder,
                output_type=types.RGB,
                normalized_anchor=True,
                normalized_shape=True,
            )
            images = fn.resize(
                images,
                device=dev.ops,
                resize_x=spec.width,
                resize_y=spec.height,
                interp_type=augment.interp_type(_interp(spec.interpolation), spec.extra, seed=_op_seed(seed, 3)),
                antialias=True,
            )
            images = augment.secondary(
                images, spec.extra, spec.auto_augment, height=spec.height, width=spec.width, seed=_op_seed(seed, 4)
            )
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


def feed(pipe, encoded: list, ids: np.ndarray, windows: np.ndarray | None) -> None:
    """Hand one batch to ``pipe`` (``schedule_run`` then runs it). ``encoded`` is used in place
    (``no_copy``): the caller keeps the arrays alive until the batch's outputs are taken."""
    from nvidia.dali.tensors import TensorCPU

    # DALI's own wrapping of each array (type checks by name, per sample) costs more than the feed
    pipe.feed_input("encoded", [TensorCPU(e) for e in encoded])
    pipe.feed_input("ids", np.ascontiguousarray(ids, dtype=np.int32).reshape(-1, 1))
    if windows is not None:
        pipe.feed_input("window", np.ascontiguousarray(windows, dtype=np.float32))
