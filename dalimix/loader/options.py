"""ImageLoader's options, validated in one place (``LoaderOptions.parse``)."""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import torch

from .. import rng as rng_mod
from .. import validate as v
from ..autoaug import parse_auto_augment
from ..ops import Normalization
from ..ops.kernels import OUTPUT_TYPES
from ..pipeline import INTERPOLATIONS, AugmentSpec, default_num_threads, resolve_device
from ..policy import Policy
from .plan import LastBatchPolicy

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
ON_ERROR = ("raise", "skip")

_DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "float": torch.float32,
    "float16": torch.float16,
    "fp16": torch.float16,
    "half": torch.float16,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
}


@dataclass(frozen=True)
class LoaderOptions:
    """Everything ImageLoader was given, checked (the data source aside: ``dalimix.sources.resolve_source``)."""

    batch_size: int
    spec: AugmentSpec
    device: torch.device
    dtype: torch.dtype
    channels_last: bool
    norm: Normalization
    policy: Policy | None
    seed: int
    shuffle: bool
    shard_id: int
    num_shards: int
    last_batch_policy: LastBatchPolicy
    num_threads: int
    prefetch: int
    on_error: str
    keep_unmixed: bool
    reuse_outputs: bool
    erasing: object  # dalimix.erase.RandomErasing or None

    @classmethod
    def parse(
        cls,
        *,
        batch_size,
        train,
        size,
        device,
        dtype,
        channels_last,
        mean,
        std,
        scale,
        ratio,
        hflip,
        crop_pct,
        interpolation,
        shuffle,
        seed,
        shard_id,
        num_shards,
        last_batch_policy,
        num_threads,
        prefetch,
        auto_augment,
        on_error,
        overlap_epochs,
        keep_unmixed,
        reuse_outputs,
        augment=None,
        erasing=None,
    ) -> LoaderOptions:
        if overlap_epochs is not None and v.flag("overlap_epochs", overlap_epochs):
            # False asked for what no longer exists (a drained epoch boundary): only timing, accepted quietly
            warnings.warn(
                "ImageLoader(overlap_epochs=...) is deprecated and has no effect: the loader's one DALI "
                "pipeline always reads the next epoch's first batches while the current one ends",
                DeprecationWarning,
                stacklevel=3,
            )
        height, width = v.size("size", size, hint=", e.g. 224 or (224, 224)")
        scale = v.pair("scale", scale, lo=0, hi=1, lo_open=True, hint=" (area fraction of the random crop)")
        ratio = v.pair("ratio", ratio, lo=0, lo_open=True, hint=" (aspect ratio range of the random crop)")
        hflip = v.number("hflip", hflip, lo=0, hi=1, hint=" (probability of a horizontal flip)")
        crop_pct = v.number("crop_pct", crop_pct, lo=0, hi=1, lo_open=True, hint=" (0.875 is the usual eval crop)")
        v.choice("interpolation", interpolation, INTERPOLATIONS)
        policy = auto_augment if isinstance(auto_augment, Policy) else None
        preset = None if policy is not None else parse_auto_augment(auto_augment)
        spec = AugmentSpec(
            train=v.flag("train", train),
            height=height,
            width=width,
            scale=scale,
            ratio=ratio,
            hflip=hflip,
            crop_pct=crop_pct,
            interpolation=interpolation,
            auto_augment=None if preset is None else preset.canonical,
            extra=_train_only("augment", augment, train),
        )
        if (preset is not None or policy is not None) and not spec.train:
            raise ValueError(f"auto_augment={auto_augment!r} augments training batches: use it with train=True")
        shard_id, num_shards = _shards(shard_id, num_shards)
        batch_size = _positive_int("batch_size", batch_size)
        dtype = _dtype(dtype)
        device = resolve_device(device)
        v.normalization(mean, std)
        prefetch = v.prefetch(prefetch)
        v.loader_memory(
            batch_size=batch_size,
            height=height,
            width=width,
            prefetch=prefetch,
            itemsize=dtype.itemsize,
            device=device,
            keep_unmixed=keep_unmixed,
        )
        return cls(
            batch_size=batch_size,
            spec=spec,
            device=device,
            dtype=dtype,
            channels_last=v.flag("channels_last", channels_last),
            norm=Normalization(mean, std),
            policy=policy,
            seed=rng_mod.script_seed()
            if seed is None
            else v.integer("seed", seed, lo=0, hint=" (equal on every rank)"),
            shuffle=spec.train if shuffle is None else v.flag("shuffle", shuffle),
            shard_id=shard_id,
            num_shards=num_shards,
            last_batch_policy=LastBatchPolicy.parse(last_batch_policy),
            num_threads=default_num_threads() if num_threads is None else _positive_int("num_threads", num_threads),
            prefetch=prefetch,
            on_error=v.choice("on_error", on_error, ON_ERROR),
            keep_unmixed=v.flag("keep_unmixed", keep_unmixed),
            reuse_outputs=v.flag("reuse_outputs", reuse_outputs),
            erasing=_train_only("erasing", erasing, train),
        )


def _train_only(name: str, value, train):
    """``augment=`` / ``erasing=``: the right type, and training loaders only."""
    if value is None:
        return None
    from ..augment import Augment
    from ..erase import RandomErasing

    want = {"augment": Augment, "erasing": RandomErasing}[name]
    if not isinstance(value, want):
        raise ValueError(f"{name}={type(value).__name__}: a {want.__module__}.{want.__name__}")
    if not train:
        raise ValueError(f"{name}= augments training batches: use it with train=True")
    return value


def _positive_int(name: str, value) -> int:
    return v.integer(name, value, lo=1)


def _dtype(dtype) -> torch.dtype:
    if isinstance(dtype, str):
        if dtype.lower() not in _DTYPES:
            raise ValueError(f"dtype={dtype!r}: use torch.float32, torch.float16 or torch.bfloat16")
        dtype = _DTYPES[dtype.lower()]
    if not isinstance(dtype, torch.dtype) or dtype not in OUTPUT_TYPES:
        raise ValueError(f"dtype={dtype!r}: use torch.float32, torch.float16 or torch.bfloat16")
    return dtype


def _shards(shard_id, num_shards) -> tuple[int, int]:
    if shard_id is None and num_shards is None:
        from ..distributed import rank_and_world

        return rank_and_world() or (0, 1)
    if shard_id is None or num_shards is None:
        raise ValueError("give both shard_id and num_shards (or neither, to take them from torch.distributed)")
    num_shards = _positive_int("num_shards", num_shards)
    return v.integer("shard_id", shard_id, lo=0, hi=num_shards - 1, hint=f" (num_shards={num_shards})"), num_shards
