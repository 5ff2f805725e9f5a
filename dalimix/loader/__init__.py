"""The public loader, as a package by what each part does.

- ``core``: ``ImageLoader`` (iterator protocol, ``len``, ``set_epoch``, state, mask hook) and ``BatchInfo``.
- ``options``: every constructor option validated in one place.
- ``plan``: epoch planning (one permutation per (seed, epoch), strided shards, DROP/PARTIAL/FILL)
  and the traversal that feeds batches across epoch boundaries, with their random draws.
- ``feed``: the pipeline's life (ONE DALI pipeline per loader, fed per batch).
- ``stages``: the per-batch finishing stages (labels, policy, unmixed, mix plan, hook, kernel, targets).
- ``outputs``: recycled CPU output buffers. ``recovery``: unreadable files. ``iterator``: one epoch.
Resume lives in ``dalimix.resume``.
"""

from .core import BatchInfo, ImageLoader
from .iterator import EpochIterator, StaleIteratorError
from .options import IMAGENET_MEAN, IMAGENET_STD, ON_ERROR, LoaderOptions
from .plan import EpochPlan, LastBatchPolicy, plan_batch, plan_epoch

__all__ = [
    "BatchInfo",
    "EpochIterator",
    "EpochPlan",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "ImageLoader",
    "LastBatchPolicy",
    "LoaderOptions",
    "ON_ERROR",
    "StaleIteratorError",
    "plan_batch",
    "plan_epoch",
]
