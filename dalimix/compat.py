"""``dalimix.create_loader``: timm's ``create_loader`` argument names, dalimix's loader.

A timm training script replaces ``from timm.data import create_loader`` (and the ``Mixup`` /
``FastCollateMixup`` it builds) with ``from dalimix import create_loader`` and passes ``mix=``. The
data set can stay what the script already builds (timm's ``create_dataset(...)``, a torchvision
``ImageFolder``), or be a path: an ImageFolder root, a ``path label`` file list (``.txt``), or
WebDataset shards (a folder of ``.tar`` files, a glob, a ``.tar`` path).
"""

from __future__ import annotations

import os
import warnings

import numpy as np
import torch

from .errors import DatasetError
from .loader import IMAGENET_MEAN, IMAGENET_STD, ImageLoader, LastBatchPolicy
from .sources import Samples, _fingerprint, source_for_path

# timm create_loader arguments dalimix has no equivalent for: accepted at these ("off") values,
# refused otherwise so nothing is silently dropped.
_OFF_ONLY = {
    "re_prob": (0, None), "vflip": (0,), "num_aug_repeats": (0,), "num_aug_splits": (0,),
    "train_crop_mode": (None, "rrc"), "grayscale_prob": (0,), "gaussian_blur_prob": (0,), "color_jitter_prob": (None,),
    "crop_border_pixels": (None,), "collate_fn": (None,), "tf_preprocessing": (False,), "input_size_choices": (None,),
    "batch_size_choices": (None,), "batch_choice_weights": (None,), "num_batches": (None,),
}
# timm arguments that only steer the torch DataLoader machinery dalimix replaces, or that only
# matter when an "off only" one above is on: accepted, no effect.
_NO_EFFECT = ("pin_memory", "persistent_workers", "use_prefetcher", "use_multi_epochs_loader", "worker_seeding",
              "re_mode", "re_count", "re_split", "batch_choice_seed", "batch_choice_schedule",
              "batch_schedule_epochs", "batch_schedule_spread", "batch_schedule_random_mix")


def create_loader(
    dataset,
    input_size,
    batch_size: int,
    is_training: bool = False,
    no_aug: bool = False,
    scale=None,
    ratio=None,
    hflip: float = 0.5,
    color_jitter=0.4,
    auto_augment=None,
    interpolation: str = "bilinear",
    mean=IMAGENET_MEAN,
    std=IMAGENET_STD,
    num_workers: int | None = None,
    distributed: bool = False,
    crop_pct: float | None = None,
    crop_mode: str | None = None,
    fp16: bool = False,
    img_dtype=torch.float32,
    device=None,
    *,
    mix=None,
    channels_last: bool = False,
    seed: int = 0,
    last_batch_policy=None,
    webdataset_keys=None,
    prefetch: int = 2,
    **timm_options,
) -> ImageLoader:
    """timm's ``create_loader`` names, an ``ImageLoader`` back.

    Args:
        dataset: a path (ImageFolder root, ``.txt`` file list, WebDataset shards: folder of
            ``.tar``, glob, ``.tar``), timm's ``ImageDataset`` (its reader's ``samples`` and
            ``class_to_idx``), a torchvision ``ImageFolder``/``DatasetFolder`` (``samples``,
            ``classes``), or a ``dalimix.sources.Samples``.
        input_size: ``224``, ``(H, W)`` or timm's ``(3, H, W)``.
        batch_size: per rank.
        is_training: random resized crop + flip, reshuffled every epoch, last batch dropped (timm's
            ``drop_last=is_training``); else resize + centre crop, fixed order, every sample once.
        no_aug: training order without augmentation (eval transform, shuffled).
        scale, ratio, hflip, interpolation, mean, std, crop_pct: as timm (None: timm's defaults
            ``(0.08, 1)``, ``(3/4, 4/3)``, ``0.875``); ``interpolation="random"`` is not supported.
        color_jitter: dalimix's pipeline has no colour jitter: a non-zero value in training warns
            (timm's default 0.4 included; pass 0 to silence).
        auto_augment: timm's strings (``"rand-m9-n2"``, ``"original"``, ``"trivialaugment"``, see
            ``dalimix.autoaug``) or a ``dalimix.policy.Policy``; training only, as in timm (an eval
            loader ignores it).
        num_workers: DALI threads (default: this process's share of the cores).
        distributed: True: shard over the ``torch.distributed`` ranks (must be initialised);
            False: every rank reads the whole data set (timm's meaning).
        crop_mode: ``None``/``"center"`` only.
        fp16, img_dtype: output dtype (``fp16=True`` is ``img_dtype=torch.float16``).
        device: ``"cuda"`` (``cuda:LOCAL_RANK`` under torchrun), ``"cpu"``, default CUDA if available.
        mix: a ``dalimix.mix`` mixer, or timm's ``Mixup`` object (converted to ``dalimix.mix.Mixup``
            with the same arguments); training only.
        channels_last, seed, last_batch_policy, webdataset_keys, prefetch: ``ImageLoader``'s.
        **timm_options: the rest of timm's arguments. Those about worker processes and pinning
            (``pin_memory``, ``persistent_workers``, ``use_prefetcher``, ...) have no effect; those
            for augmentations dalimix lacks (``re_prob``, ``vflip``, ...) are
            accepted at their "off" value and raise ValueError otherwise.
    """
    for name, value in timm_options.items():
        if name in _NO_EFFECT:
            continue
        if name not in _OFF_ONLY:
            raise TypeError(f"create_loader() got an unexpected keyword argument {name!r}")
        if not any(value is off or (off is not None and value == off) for off in _OFF_ONLY[name]):
            raise ValueError(f"create_loader: {name}={value!r} has no dalimix equivalent; leave it off "
                             f"({_OFF_ONLY[name][0]!r}) or use timm's own loader for it")
    if interpolation == "random":
        raise ValueError("interpolation='random' is not supported; use 'bilinear', 'bicubic' or 'nearest'")
    if crop_mode not in (None, "center"):
        raise ValueError(f"crop_mode={crop_mode!r}: dalimix does the centre crop only (None or 'center')")
    train = bool(is_training) and not no_aug
    if train and color_jitter and float(np.max(np.atleast_1d(np.asarray(color_jitter, dtype=float)))) > 0:
        warnings.warn(f"dalimix.create_loader: color_jitter={color_jitter!r} is not applied (dalimix has no colour "
                      "jitter); pass color_jitter=0 to silence this", stacklevel=2)
    if mix is not None and not is_training:
        raise ValueError("mix= is for training loaders; an eval loader (is_training=False) never mixes")
    shard_id = num_shards = None
    if distributed:
        import torch.distributed as dist

        if not (dist.is_available() and dist.is_initialized()):
            raise ValueError("distributed=True but torch.distributed is not initialised; call "
                             "torch.distributed.init_process_group() first (torchrun sets the environment)")
    else:
        shard_id, num_shards = 0, 1
    if last_batch_policy is None:
        last_batch_policy = LastBatchPolicy.DROP if is_training else LastBatchPolicy.PARTIAL
    source = _source_kwargs(dataset, webdataset_keys)
    return ImageLoader(
        **source,
        batch_size=batch_size,
        train=train,
        shuffle=bool(is_training),
        size=_input_size(input_size),
        device=device,
        dtype=torch.float16 if fp16 else img_dtype,
        channels_last=channels_last,
        mean=tuple(mean),
        std=tuple(std),
        scale=(0.08, 1.0) if scale is None else tuple(scale),
        ratio=(3 / 4, 4 / 3) if ratio is None else tuple(ratio),
        hflip=hflip,
        crop_pct=0.875 if crop_pct is None else crop_pct,
        interpolation=interpolation,
        seed=seed,
        shard_id=shard_id,
        num_shards=num_shards,
        last_batch_policy=last_batch_policy,
        num_threads=num_workers or None,
        prefetch=prefetch,
        mix=_mixer(mix),
        auto_augment=(auto_augment or None) if train else None,
    )


def _input_size(input_size):
    if isinstance(input_size, (tuple, list)) and len(input_size) == 3:
        if input_size[0] != 3:
            raise ValueError(f"input_size={tuple(input_size)}: dalimix makes 3-channel (RGB) images")
        return tuple(input_size[1:])
    return input_size


def _source_kwargs(dataset, webdataset_keys) -> dict:
    if isinstance(dataset, Samples):
        return {"samples": dataset}
    if isinstance(dataset, (str, os.PathLike)):
        return source_for_path(dataset, webdataset_keys=webdataset_keys)
    return {"samples": samples_from_dataset(dataset)}


def samples_from_dataset(dataset) -> Samples:
    """``Samples`` from timm's ``ImageDataset`` (``dataset.reader.samples``, ``class_to_idx``) or a
    torchvision ``DatasetFolder``/``ImageFolder`` (``samples``, ``classes``): same files, labels and order."""
    holder = getattr(dataset, "reader", dataset)
    pairs = getattr(holder, "samples", None)
    if pairs is None or not hasattr(holder, "class_to_idx"):
        raise ValueError(
            f"dataset={type(dataset).__name__}: give a path (ImageFolder root, file list, .tar shards), timm's "
            "ImageDataset (folder reader), a torchvision ImageFolder, or a dalimix.sources.Samples"
        )
    root = getattr(holder, "root", None)
    paths = [os.fspath(p) for p, _ in pairs]
    labels = np.asarray([int(t) for _, t in pairs], dtype=np.int64)
    if not paths:
        raise DatasetError(f"dataset {type(dataset).__name__} at {root} holds no samples")
    missing = [p for p in paths[:1000] if not os.path.isfile(p)]
    if missing:
        raise DatasetError(f"dataset {type(dataset).__name__}: {len(missing)} of its files are missing, e.g. {missing[0]} "
                           "(its samples must be image files on disk)")
    by_index = sorted(holder.class_to_idx.items(), key=lambda kv: kv[1])
    classes = [c for c, _ in by_index]
    if [i for _, i in by_index] != list(range(len(classes))):
        classes = [str(i) for i in range(int(labels.max()) + 1)]
    rel = [os.path.relpath(p, root) for p in paths] if root is not None else paths
    return Samples(paths=paths, labels=labels, classes=classes,
                   class_to_idx={c: i for i, c in enumerate(classes)},
                   source=str(root) if root is not None else type(dataset).__name__,
                   fingerprint=_fingerprint(rel, labels))


def _mixer(mix):
    """A dalimix mixer as is; timm's ``Mixup`` converted to ``dalimix.mix.Mixup`` with its arguments."""
    if mix is None or hasattr(mix, "plan"):
        return mix
    if all(hasattr(mix, a) for a in ("mixup_alpha", "cutmix_alpha", "mix_prob", "switch_prob", "label_smoothing")):
        from .mix import Mixup

        converted = Mixup(mixup_alpha=mix.mixup_alpha, cutmix_alpha=mix.cutmix_alpha, cutmix_minmax=mix.cutmix_minmax,
                     prob=mix.mix_prob, switch_prob=mix.switch_prob, mode=mix.mode, correct_lam=mix.correct_lam,
                     label_smoothing=mix.label_smoothing, num_classes=mix.num_classes)
        converted.mixup_enabled = bool(getattr(mix, "mixup_enabled", True))
        return converted
    raise ValueError(f"mix={type(mix).__name__}: a dalimix.mix mixer (Mixup, Mixer) or timm's Mixup")
