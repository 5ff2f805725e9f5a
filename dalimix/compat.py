"""``dalimix.create_loader``: timm's ``create_loader`` argument names, dalimix's loader.

A timm training script replaces ``from timm.data import create_loader`` with
``from dalimix import create_loader``; the ``FastCollateMixup`` it passes as ``collate_fn`` (or a
``Mixup`` passed as ``mix=``) becomes the loader's mixer. The
data set can stay what the script already builds (timm's ``create_dataset(...)``, a torchvision
``ImageFolder``), or be a path: an ImageFolder root, a ``path label`` file list (``.txt``), or
WebDataset shards (a folder of ``.tar`` files, a glob, a ``.tar`` path).
"""

from __future__ import annotations

import os
import warnings

import numpy as np
import torch

from .augment import Augment
from .erase import from_timm as erase_from_timm
from .errors import DatasetError
from .loader import IMAGENET_MEAN, IMAGENET_STD, ImageLoader, LastBatchPolicy
from .sources import Samples, _fingerprint, source_for_path

# What becomes of each timm create_loader argument (tests/test_dropin.py checks that every name in
# timm's signature is listed here or handled by name in create_loader).
HONOURED = (
    "dataset",
    "input_size",
    "batch_size",
    "is_training",
    "no_aug",
    "re_prob",
    "re_mode",
    "re_count",
    "re_split",
    "train_crop_mode",
    "scale",
    "ratio",
    "hflip",
    "vflip",
    "color_jitter",
    "color_jitter_prob",
    "grayscale_prob",
    "gaussian_blur_prob",
    "auto_augment",
    "interpolation",
    "mean",
    "std",
    "num_workers",
    "distributed",
    "crop_pct",
    "crop_mode",
    "collate_fn",
    "fp16",
    "img_dtype",
    "device",
    "use_prefetcher",
    "use_multi_epochs_loader",
    "batch_choice_seed",
    "pin_memory",
)
# Arguments about worker processes, which dalimix does not have (DALI's threads do the work): any value
# leaves the batches as they are.
NO_WORKERS = {
    "persistent_workers": "dalimix has no worker processes to keep (DALI's threads live as long as the loader)",
    "worker_seeding": "dalimix has no worker processes to seed (its streams come from the loader's seed)",
}
# Arguments with no dalimix counterpart: accepted at timm's "off" value, refused (with the reason) otherwise.
OFF_ONLY = {
    "num_aug_repeats": ((0,), "repeated augmentation (RepeatAugSampler) is not implemented"),
    "num_aug_splits": ((0, 1), "augmentation splits (AugMixDataset, JSD loss) are not implemented"),
    "crop_border_pixels": ((None,), "the eval crop has no border option"),
    "tf_preprocessing": ((False,), "TensorFlow preprocessing is not implemented"),
    "input_size_choices": ((None,), "scheduled input sizes are not implemented"),
    "batch_size_choices": ((None,), "scheduled batch sizes are not implemented"),
    "batch_choice_weights": ((None,), "scheduled batch sizes are not implemented"),
    "num_batches": ((None,), "a fixed number of batches per epoch is not implemented"),
}
# Only read by timm when scheduled sizes are on (refused above): accepted, no effect.
SCHEDULE_ONLY = ("batch_choice_schedule", "batch_schedule_epochs", "batch_schedule_spread", "batch_schedule_random_mix")


def create_loader(
    dataset,
    input_size,
    batch_size: int,
    is_training: bool = False,
    no_aug: bool = False,
    re_prob: float = 0.0,
    re_mode: str = "const",
    re_count: int = 1,
    re_split: bool = False,
    train_crop_mode: str | None = None,
    scale=None,
    ratio=None,
    hflip: float = 0.5,
    vflip: float = 0.0,
    color_jitter=0.4,
    color_jitter_prob: float | None = None,
    grayscale_prob: float | None = 0.0,
    gaussian_blur_prob: float | None = 0.0,
    auto_augment=None,
    num_aug_repeats: int = 0,
    num_aug_splits: int = 0,
    interpolation: str = "bilinear",
    mean=IMAGENET_MEAN,
    std=IMAGENET_STD,
    num_workers: int | None = None,
    distributed: bool = False,
    crop_pct: float | None = None,
    crop_mode: str | None = None,
    crop_border_pixels: int | None = None,
    collate_fn=None,
    pin_memory: bool = False,
    fp16: bool = False,
    img_dtype=torch.float32,
    device=None,
    use_prefetcher: bool = True,
    use_multi_epochs_loader: bool = False,
    persistent_workers: bool = True,
    worker_seeding: str = "all",
    tf_preprocessing: bool = False,
    input_size_choices=None,
    batch_size_choices=None,
    batch_choice_weights=None,
    batch_choice_seed: int | None = None,
    batch_choice_schedule: str = "constant",
    batch_schedule_epochs: int | None = None,
    batch_schedule_spread: float = 0.65,
    batch_schedule_random_mix: float = 0.1,
    num_batches: int | None = None,
    *,
    mix=None,
    channels_last: bool = False,
    seed: int | None = None,
    last_batch_policy=None,
    webdataset_keys=None,
    prefetch: int = 2,
) -> ImageLoader:
    """timm's ``create_loader`` (timm 1.0's signature, same order and defaults), an ``ImageLoader`` back.

    timm's ``train.py`` call works as it is: the README's drop-in table says what each argument
    becomes. In short:

    Args:
        dataset: a path (ImageFolder root, ``.txt`` file list, WebDataset shards: folder of
            ``.tar``, glob, ``.tar``), timm's ``ImageDataset`` (its reader's ``samples`` and
            ``class_to_idx``), a torchvision ``ImageFolder``/``DatasetFolder``, or a ``dalimix.sources.Samples``.
        input_size: ``224``, ``(H, W)`` or timm's ``(3, H, W)``.
        is_training, no_aug, scale, ratio, hflip, vflip, interpolation (``"random"``: bilinear or
            bicubic per sample), mean, std, crop_pct, crop_mode (None/"center"): as timm.
        color_jitter, color_jitter_prob, grayscale_prob, gaussian_blur_prob, auto_augment: timm's
            train transforms, run by DALI (``dalimix.augment``, ``dalimix.autoaug``); ``None``
            probabilities are off; colour jitter is off under an ``auto_augment`` other than ``3a``
            (timm's rule). Training only, as in timm.
        re_prob, re_mode, re_count, re_split: random erasing on the normalised, mixed batch, as
            timm's prefetcher does (``dalimix.erase``). Training only.
        collate_fn: timm's ``FastCollateMixup``/``Mixup`` (train.py's mixing): the loader mixes with
            ``dalimix.mix.Mixup`` of the same arguments (``mix=`` does the same).
        num_workers: DALI threads. distributed: shard over the initialised ``torch.distributed`` ranks.
        fp16, img_dtype: output dtype. device: as ``ImageLoader``.
        use_prefetcher, pin_memory, use_multi_epochs_loader: dalimix always hands out finished
            batches on ``device`` (what timm's prefetcher does); ``use_prefetcher=False`` and
            ``pin_memory=True`` on a CPU device warn that they change nothing;
            ``use_multi_epochs_loader=True`` asks for what the loader always does: the next
            epoch's first batches are read while the current one ends (one DALI pipeline).
        batch_choice_seed: train.py passes its ``--seed`` here: the stream's seed unless ``seed=``.
        persistent_workers, worker_seeding: no worker processes, no effect on the batches.
        num_aug_repeats, num_aug_splits, crop_border_pixels, tf_preprocessing: only their "off"
            value; others raise ValueError with the reason.
        input_size_choices, batch_size_choices, batch_choice_weights, num_batches: the same. The
            batch_schedule_* arguments only matter with those.
        mix: a ``dalimix.mix`` mixer or timm's ``Mixup``; training only.
        seed: the loader's seed; None: ``batch_choice_seed`` if given, else the script's torch seed
            (``dalimix.rng.script_seed``).
        channels_last, last_batch_policy, webdataset_keys, prefetch: ``ImageLoader``'s.
    """
    for name, (offs, reason) in OFF_ONLY.items():
        value = locals()[name]
        if not any(value is off or (off is not None and value == off) for off in offs):
            raise ValueError(
                f"create_loader: {name}={value!r}: {reason} in dalimix; leave it at {offs[0]!r} "
                "or use timm's own loader for it"
            )
    train = bool(is_training) and not no_aug
    if train_crop_mode not in (None, "rrc"):
        raise ValueError(f"train_crop_mode={train_crop_mode!r}: dalimix does timm's 'rrc' (random resized crop) only")
    if crop_mode not in (None, "center"):
        raise ValueError(f"crop_mode={crop_mode!r}: dalimix does the centre crop only (None or 'center')")
    random_interp = interpolation == "random"
    if random_interp and not train:
        raise ValueError(
            "interpolation='random' is for training loaders (timm draws it per training crop); "
            "give the eval loader 'bilinear' or 'bicubic'"
        )
    if collate_fn is not None:
        if mix is not None:
            raise ValueError("collate_fn= and mix= both given: pass the mixer once")
        if not _is_timm_mixup(collate_fn):
            raise ValueError(
                f"collate_fn={collate_fn!r}: dalimix builds its batches itself; only timm's Mixup / "
                "FastCollateMixup is taken (as the loader's mixer)"
            )
        mix = collate_fn
    if mix is not None and not is_training:
        raise ValueError(
            "mix= (or a mixing collate_fn) is for training loaders; an eval loader (is_training=False) never mixes"
        )
    if not use_prefetcher:
        warnings.warn(
            "dalimix.create_loader: use_prefetcher=False changes nothing: dalimix always hands out "
            "normalised batches on the loader's device (what timm's prefetcher does)",
            stacklevel=2,
        )
    shard_id = num_shards = None
    if distributed:
        import torch.distributed as dist

        if not (dist.is_available() and dist.is_initialized()):
            raise ValueError(
                "distributed=True but torch.distributed is not initialised; call "
                "torch.distributed.init_process_group() first (torchrun sets the environment)"
            )
    else:
        shard_id, num_shards = 0, 1
    if last_batch_policy is None:
        last_batch_policy = LastBatchPolicy.DROP if is_training else LastBatchPolicy.PARTIAL
    if seed is None and batch_choice_seed is not None:
        seed = batch_choice_seed
    augment = erasing = None
    if train:
        aa_on = bool(auto_augment) and not hasattr(auto_augment, "set_probs")
        jitter_off = aa_on and "3a" not in str(auto_augment)  # timm: AA/RA turn colour jitter off, 3a does not
        augment = Augment(
            vflip=vflip,
            color_jitter=None if jitter_off else color_jitter,
            color_jitter_prob=color_jitter_prob,
            grayscale_prob=grayscale_prob or 0.0,
            gaussian_blur_prob=gaussian_blur_prob or 0.0,
            random_interpolation=random_interp,
        )
        erasing = erase_from_timm(re_prob, re_mode, re_count, re_split, num_aug_splits)
    source = _source_kwargs(dataset, webdataset_keys)
    loader = ImageLoader(
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
        interpolation="bilinear" if random_interp else interpolation,
        seed=seed,
        shard_id=shard_id,
        num_shards=num_shards,
        last_batch_policy=last_batch_policy,
        num_threads=num_workers or None,
        prefetch=prefetch,
        mix=_mixer(mix),
        auto_augment=(auto_augment or None) if train else None,
        augment=augment if augment is not None and (augment.active or augment.random_interpolation) else None,
        erasing=erasing,
    )
    if pin_memory and loader.device.type != "cuda":
        warnings.warn(
            f"dalimix.create_loader: pin_memory=True changes nothing on device={loader.device}: the batches "
            "are made where they are used",
            stacklevel=2,
        )
    return loader


def _is_timm_mixup(obj) -> bool:
    return all(hasattr(obj, a) for a in ("mixup_alpha", "cutmix_alpha", "mix_prob", "switch_prob", "label_smoothing"))


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
        raise DatasetError(
            f"dataset {type(dataset).__name__}: {len(missing)} of its files are missing, e.g. {missing[0]} "
            "(its samples must be image files on disk)"
        )
    by_index = sorted(holder.class_to_idx.items(), key=lambda kv: kv[1])
    classes = [c for c, _ in by_index]
    if [i for _, i in by_index] != list(range(len(classes))):
        classes = [str(i) for i in range(int(labels.max()) + 1)]
    rel = [os.path.relpath(p, root) for p in paths] if root is not None else paths
    return Samples(
        paths=paths,
        labels=labels,
        classes=classes,
        class_to_idx={c: i for i, c in enumerate(classes)},
        source=str(root) if root is not None else type(dataset).__name__,
        fingerprint=_fingerprint(rel, labels),
    )


def _mixer(mix):
    """A dalimix mixer as is; timm's ``Mixup`` converted to ``dalimix.mix.Mixup`` with its arguments."""
    if mix is None or hasattr(mix, "plan"):
        return mix
    if _is_timm_mixup(mix):
        from .mix import Mixup

        converted = Mixup(
            mixup_alpha=mix.mixup_alpha,
            cutmix_alpha=mix.cutmix_alpha,
            cutmix_minmax=mix.cutmix_minmax,
            prob=mix.mix_prob,
            switch_prob=mix.switch_prob,
            mode=mix.mode,
            correct_lam=mix.correct_lam,
            label_smoothing=mix.label_smoothing,
            num_classes=mix.num_classes,
        )
        converted.mixup_enabled = bool(getattr(mix, "mixup_enabled", True))
        return converted
    raise ValueError(f"mix={type(mix).__name__}: a dalimix.mix mixer (Mixup, Mixer) or timm's Mixup")
