"""The four loaders ``dalimix bench`` compares, built the way each library's users build them.

All read the same ImageFolder tree, shuffle, drop the last partial batch, and produce the same
train batch: random resized crop (area 0.08..1, aspect 3/4..4/3, bilinear, antialiased) to
``size`` x ``size``, horizontal flip with p = 0.5, float32 ``N x 3 x H x W`` normalised with
ImageNet's mean/std, on the benchmark's device. Mixing on: MixUp (alpha 0.8) or CutMix (alpha 1.0),
one of the two per batch with p = 0.5, soft targets (label smoothing 0.1 where the library has it).

Workers: one number ``W`` for all: dalimix ``num_threads=W``, DALI ``num_threads=W``,
torchvision/timm ``DataLoader(num_workers=W)``. Each also has its main (Python) thread.

- ``dalimix``: ``ImageLoader(..., mix=dalimix.mix.Mixup(mixup_alpha=0.8, cutmix_alpha=1.0))``.
- ``torchvision``: ``ImageFolder`` + ``v2.Compose([RandomResizedCrop, RandomHorizontalFlip,
  ToImage, ToDtype(float32, scale=True), Normalize])``, ``DataLoader(num_workers=W,
  pin_memory=<on GPU>)`` with ``v2.RandomChoice([v2.CutMix, v2.MixUp])`` in ``collate_fn``
  (torchvision's documented recipe); batches moved to the GPU in the loop.
- ``timm``: ``create_loader`` on ``ImageDataset``; on GPU with its prefetcher (uint8 batches,
  normalised on the GPU) and ``FastCollateMixup`` as ``collate_fn`` (timm's train.py does this);
  on CPU without the prefetcher, ``Mixup`` applied to each batch in the loop.
- ``dali``: ``readers.file`` -> ``decoders.image_random_crop`` -> ``resize`` ->
  ``crop_mirror_normalize`` (float, CHW) -> ``DALIGenericIterator``, then ``handmix.mix_batch``.

Every builder returns an object with ``epoch()`` (an iterator over one epoch's ``(images,
targets)``) and ``close()``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

MEAN = (0.485, 0.456, 0.406)
STD = (0.229, 0.224, 0.225)
SCALE = (0.08, 1.0)
RATIO = (3 / 4, 4 / 3)
MIXUP_ALPHA, CUTMIX_ALPHA, SWITCH_PROB, SMOOTHING = 0.8, 1.0, 0.5, 0.1


@dataclass(frozen=True)
class Config:
    """One contender configuration (what a runner process builds)."""

    library: str
    mix: bool
    root: str
    num_classes: int
    batch_size: int
    size: int
    workers: int
    device: str
    seed: int = 0

    @property
    def cuda(self) -> bool:
        return self.device.startswith("cuda")


class _DalimixContender:
    def __init__(self, cfg: Config):
        from dalimix import ImageLoader
        from dalimix.mix import Mixup

        mix = (
            Mixup(
                mixup_alpha=MIXUP_ALPHA, cutmix_alpha=CUTMIX_ALPHA, switch_prob=SWITCH_PROB, label_smoothing=SMOOTHING
            )
            if cfg.mix
            else None
        )
        self.loader = ImageLoader(
            root=cfg.root,
            batch_size=cfg.batch_size,
            size=cfg.size,
            device=cfg.device,
            num_threads=cfg.workers,
            seed=cfg.seed,
            mix=mix,
            last_batch_policy="drop",
            scale=SCALE,
            ratio=RATIO,
            mean=MEAN,
            std=STD,
        )

    def epoch(self):
        yield from self.loader

    def close(self):
        self.loader.close()


class TorchvisionMixCollate:
    """``collate_fn`` of torchvision's recipe: default collate, then CutMix or MixUp on the batch."""

    def __init__(self, num_classes: int):
        from torchvision.transforms import v2

        self.mix = v2.RandomChoice(
            [
                v2.CutMix(num_classes=num_classes, alpha=CUTMIX_ALPHA),
                v2.MixUp(num_classes=num_classes, alpha=MIXUP_ALPHA),
            ]
        )

    def __call__(self, batch):
        from torch.utils.data import default_collate

        return self.mix(*default_collate(batch))


class _TorchvisionContender:
    def __init__(self, cfg: Config):
        from torch.utils.data import DataLoader, default_collate
        from torchvision import datasets
        from torchvision.transforms import v2

        transform = v2.Compose(
            [
                v2.RandomResizedCrop(cfg.size, scale=SCALE, ratio=RATIO, antialias=True),
                v2.RandomHorizontalFlip(p=0.5),
                v2.ToImage(),
                v2.ToDtype(torch.float32, scale=True),
                v2.Normalize(mean=MEAN, std=STD),
            ]
        )
        dataset = datasets.ImageFolder(cfg.root, transform=transform)
        self.device = torch.device(cfg.device)
        self.loader = DataLoader(
            dataset,
            batch_size=cfg.batch_size,
            shuffle=True,
            num_workers=cfg.workers,
            pin_memory=cfg.cuda,
            drop_last=True,
            collate_fn=TorchvisionMixCollate(cfg.num_classes) if cfg.mix else default_collate,
        )

    def epoch(self):
        for images, targets in self.loader:
            yield images.to(self.device, non_blocking=True), targets.to(self.device, non_blocking=True)

    def close(self):
        pass


class _TimmContender:
    def __init__(self, cfg: Config):
        from timm.data import FastCollateMixup, ImageDataset, Mixup, create_loader

        mix_args = dict(
            mixup_alpha=MIXUP_ALPHA,
            cutmix_alpha=CUTMIX_ALPHA,
            switch_prob=SWITCH_PROB,
            label_smoothing=SMOOTHING,
            num_classes=cfg.num_classes,
        )
        self.mixup_fn = None
        collate = None
        if cfg.mix and cfg.cuda:
            collate = FastCollateMixup(**mix_args)
        elif cfg.mix:
            self.mixup_fn = Mixup(**mix_args)
        self.loader = create_loader(
            ImageDataset(cfg.root),
            input_size=(3, cfg.size, cfg.size),
            batch_size=cfg.batch_size,
            is_training=True,
            scale=SCALE,
            ratio=RATIO,
            hflip=0.5,
            color_jitter=None,
            interpolation="bilinear",
            mean=MEAN,
            std=STD,
            num_workers=cfg.workers,
            collate_fn=collate,
            pin_memory=cfg.cuda,
            use_prefetcher=cfg.cuda,
            device=torch.device(cfg.device),
        )

    def epoch(self):
        for images, targets in self.loader:
            if self.mixup_fn is not None:
                images, targets = self.mixup_fn(images, targets)
            yield images, targets

    def close(self):
        pass


class _DaliContender:
    def __init__(self, cfg: Config):
        from nvidia.dali import fn, pipeline_def, types
        from nvidia.dali.plugin.pytorch import DALIGenericIterator, LastBatchPolicy

        decoder, ops = ("mixed", "gpu") if cfg.cuda else ("cpu", "cpu")
        device_id = (torch.device(cfg.device).index or 0) if cfg.cuda else None

        @pipeline_def(batch_size=cfg.batch_size, num_threads=cfg.workers, device_id=device_id, seed=cfg.seed + 1)
        def train_pipe():
            jpegs, labels = fn.readers.file(file_root=cfg.root, random_shuffle=True, name="Reader")
            images = fn.decoders.image_random_crop(
                jpegs,
                device=decoder,
                output_type=types.RGB,
                random_area=list(SCALE),
                random_aspect_ratio=list(RATIO),
                num_attempts=10,
            )
            images = fn.resize(
                images,
                device=ops,
                resize_x=cfg.size,
                resize_y=cfg.size,
                interp_type=types.INTERP_LINEAR,
                antialias=True,
            )
            images = fn.crop_mirror_normalize(
                images,
                device=ops,
                dtype=types.FLOAT,
                output_layout="CHW",
                mean=[255 * m for m in MEAN],
                std=[255 * s for s in STD],
                mirror=fn.random.coin_flip(probability=0.5),
            )
            return images, labels.gpu() if cfg.cuda else labels

        pipe = train_pipe()
        pipe.build()
        self.iterator = DALIGenericIterator(
            pipe,
            ["images", "labels"],
            reader_name="Reader",
            last_batch_policy=LastBatchPolicy.DROP,
            auto_reset=False,
            prepare_first_batch=False,
        )
        self.mix = cfg.mix
        self.num_classes = cfg.num_classes
        self.rng = np.random.default_rng(cfg.seed)
        self._started = False

    def epoch(self):
        from .handmix import mix_batch

        if self._started:
            self.iterator.reset()  # here, not at the end of the last epoch: DALI starts working at reset
        self._started = True
        for out in self.iterator:
            images, labels = out[0]["images"], out[0]["labels"].view(-1).long()
            if self.mix:
                yield mix_batch(
                    images,
                    labels,
                    num_classes=self.num_classes,
                    rng=self.rng,
                    mixup_alpha=MIXUP_ALPHA,
                    cutmix_alpha=CUTMIX_ALPHA,
                    switch_prob=SWITCH_PROB,
                    label_smoothing=SMOOTHING,
                )
            else:
                yield images, labels

    def close(self):
        del self.iterator


BUILDERS = {
    "dalimix": _DalimixContender,
    "torchvision": _TorchvisionContender,
    "timm": _TimmContender,
    "dali": _DaliContender,
}


def build(cfg: Config):
    """The contender for ``cfg`` (imports its library only now)."""
    if cfg.library not in BUILDERS:
        raise ValueError(f"library={cfg.library!r}: one of {', '.join(BUILDERS)}")
    torch.manual_seed(cfg.seed)
    return BUILDERS[cfg.library](cfg)
