"""Lightning integration: ``DALIMixDataModule``, dalimix loaders in a ``LightningDataModule``.

The ranks come from the trainer (``trainer.global_rank`` / ``trainer.world_size``: each DDP process
reads its own shard), the device from the trainer's strategy (``root_device``), the seed from what the
script seeded (``lightning.seed_everything`` seeds torch: ``dalimix.rng.script_seed``) unless the
loader arguments name one. Batches arrive finished on the device, mixed when a mixer is given;
Lightning calls ``loader.sampler.set_epoch(epoch)`` itself, so every epoch reshuffles.

Needs ``lightning`` (``pip install lightning``; tested with 2.6).
"""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl

from .loader import ImageLoader


class DALIMixDataModule(pl.LightningDataModule):
    """``ImageLoader`` arguments for training (and validation), loaders built in ``setup``.

    Args (keyword-only):
        train: ``ImageLoader`` keyword arguments of the training loader (``root=``, ``batch_size=``,
            ``mix=``, ...; ``train=True`` unless given).
        val: the same for the validation loader (``train=False`` unless given), or None.

    Example::

        dm = DALIMixDataModule(train=dict(root="train/", batch_size=256, mix=Mixup(cutmix_alpha=1.0)),
                               val=dict(root="val/", batch_size=256))
        lightning.Trainer(strategy="ddp", devices=8).fit(model, datamodule=dm)
    """

    def __init__(self, *, train: dict, val: dict | None = None):
        super().__init__()
        for name, kwargs in (("train", train), ("val", val)):
            if kwargs is not None and not isinstance(kwargs, dict):
                raise ValueError(f"{name}={type(kwargs).__name__}: a dict of ImageLoader keyword arguments")
            if kwargs and ("shard_id" in kwargs or "num_shards" in kwargs):
                raise ValueError(f"{name}: shard_id/num_shards come from the trainer's ranks; leave them out")
        self.train_kwargs = {"train": True, **train}
        self.val_kwargs = None if val is None else {"train": False, **val}
        self.train_loader: ImageLoader | None = None
        self.val_loader: ImageLoader | None = None

    def _make(self, kwargs: dict) -> ImageLoader:
        trainer = self.trainer
        extra: dict[str, Any] = {}
        if trainer is not None:
            extra = {"shard_id": int(trainer.global_rank), "num_shards": int(trainer.world_size)}
            if "device" not in kwargs:
                extra["device"] = trainer.strategy.root_device
        return ImageLoader(**kwargs, **extra)

    def setup(self, stage: str | None = None) -> None:
        if stage in (None, "fit") and self.train_loader is None:
            self.train_loader = self._make(self.train_kwargs)
        if stage in (None, "fit", "validate") and self.val_kwargs is not None and self.val_loader is None:
            self.val_loader = self._make(self.val_kwargs)

    def train_dataloader(self) -> ImageLoader:
        if self.train_loader is None:
            self.train_loader = self._make(self.train_kwargs)
        return self.train_loader

    def val_dataloader(self):
        return [] if self.val_loader is None else self.val_loader

    def teardown(self, stage: str | None = None) -> None:
        for name in ("train_loader", "val_loader"):
            loader = getattr(self, name)
            if loader is not None and stage in (None, "fit"):
                loader.close()
                setattr(self, name, None)

    @property
    def num_classes(self) -> int | None:
        """The training data's classes (after ``setup``)."""
        return None if self.train_loader is None else self.train_loader.num_classes
