"""Epoch planning and traversal: which samples each batch reads, and every random draw fed to DALI.

Each epoch is a permutation drawn from (seed, epoch), the same on every rank; rank ``r`` of ``W``
reads every ``W``-th entry of it starting at ``r`` (``plan_epoch``). A ``Ticket`` is one batch as
DALI is fed it; ``Traversal`` hands out tickets from any (epoch, step) on, running on into the next
epoch so the pipeline never drains at an epoch's end. Crop windows and flips are drawn from
(seed, rank, epoch, step) only: epoch ``e`` gives the same batches whatever ran before it.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

import numpy as np

from .. import rng as rng_mod
from ..pipeline import plan_crops


class LastBatchPolicy(enum.Enum):
    """What happens to the samples left over when a rank's share is not a multiple of the batch size.

    DROP: they are left out this epoch (``len = floor(share / batch)``; every rank uses the
    smallest share, so all ranks run the same number of steps).
    PARTIAL: the last batch is smaller (``len = ceil(share / batch)``; ranks may differ by one step).
    FILL: the last batch is filled up by wrapping around to the start of the rank's own share
    (``len = ceil(largest share / batch)`` on every rank; a few samples appear twice).
    The names are DALI's; DALI's own ``LastBatchPolicy`` values and the strings are accepted too.
    """

    DROP = "drop"
    PARTIAL = "partial"
    FILL = "fill"

    @classmethod
    def parse(cls, value) -> LastBatchPolicy:
        if isinstance(value, cls):
            return value
        name = getattr(value, "name", value)
        if isinstance(name, str) and name.upper() in cls.__members__ and not isinstance(value, bool):
            return cls[name.upper()]
        raise ValueError(
            f"last_batch_policy={value!r} is not one of 'drop', 'partial', 'fill' (or DALI's LastBatchPolicy)"
        )


@dataclass(frozen=True)
class EpochPlan:
    """One rank's reading order for one epoch: ``order`` holds ``num_batches * batch_size`` sample ids
    (padding included); ``valid[i]`` is how many of batch ``i``'s samples are real."""

    epoch: int
    order: np.ndarray
    valid: np.ndarray

    @property
    def num_batches(self) -> int:
        return len(self.valid)


def plan_epoch(
    num_samples: int,
    *,
    batch_size: int,
    epoch: int,
    seed: int,
    shuffle: bool,
    shard_id: int,
    num_shards: int,
    policy: LastBatchPolicy,
) -> EpochPlan:
    """Sample ids for ``shard_id`` in ``epoch`` (see the module docstring and ``LastBatchPolicy``)."""
    if shuffle:
        perm = rng_mod.generator(seed, rng_mod.SHUFFLE, epoch).permutation(num_samples)
    else:
        perm = np.arange(num_samples)
    share = perm[shard_id::num_shards]
    smallest = num_samples // num_shards
    largest = -(-num_samples // num_shards)
    if policy is LastBatchPolicy.DROP:
        nb = smallest // batch_size
        order = share[: nb * batch_size]
        valid = np.full(nb, batch_size)
    elif policy is LastBatchPolicy.PARTIAL:
        nb = -(-len(share) // batch_size)
        valid = np.full(nb, batch_size)
        if nb:
            valid[-1] = len(share) - (nb - 1) * batch_size
        order = _pad_by_wrapping(share, nb * batch_size)
    else:
        nb = -(-largest // batch_size)
        order = _pad_by_wrapping(share, nb * batch_size)
        valid = np.full(nb, batch_size)
    return EpochPlan(epoch=epoch, order=np.asarray(order, dtype=np.int64), valid=valid.astype(np.int64))


def _pad_by_wrapping(share: np.ndarray, length: int) -> np.ndarray:
    if len(share) >= length or len(share) == 0:
        return share[:length]
    reps = -(-length // len(share))
    return np.tile(share, reps)[:length]


def plan_batch(mix, seed: int, shard_id: int, height: int, width: int, n: int, epoch: int, step: int):
    """(MixParams, records) of one batch. A free function: the planner thread holds no loader."""
    if mix is None:
        return None
    rng = rng_mod.generator(seed, rng_mod.MIX, shard_id, epoch, step)
    params = mix.plan(n, rng=rng, height=height, width=width)
    return params, params.records()


@dataclass(frozen=True)
class Ticket:
    """One batch as DALI is fed it: ``ids`` (``batch_size`` sample ids, known-unreadable ones already
    replaced), ``planned`` (the plan's ids before replacement), ``valid`` real samples, and the
    random draws: ``windows`` (crop fractions, train) and ``flips`` (one bool per sample)."""

    epoch: int
    step: int
    ids: np.ndarray
    planned: np.ndarray
    valid: int

    @property
    def key(self) -> tuple[int, int]:
        return self.epoch, self.step


class Traversal:
    """Tickets in reading order from any (epoch, step) on: epoch ``e``'s batches, then ``e + 1``'s."""

    def __init__(self, plan_fn, batch_size: int, substitute):
        self._plan_fn = plan_fn  # epoch -> EpochPlan
        self._batch = batch_size
        self._substitute = substitute  # order -> order with unreadable samples replaced
        self._plans: dict[int, EpochPlan] = {}
        self._orders: dict[int, np.ndarray] = {}  # epoch -> its order with unreadable samples replaced

    def invalidate(self) -> None:
        """Unreadable samples were found: replace them from now on."""
        self._orders.clear()

    def plan(self, epoch: int) -> EpochPlan:
        plan = self._plans.get(epoch)
        if plan is None:
            if len(self._plans) >= 3:  # the current epoch and the next are all that is ever asked for
                self._plans.clear()
                self._orders.clear()
            plan = self._plans[epoch] = self._plan_fn(epoch)
        return plan

    def ticket(self, epoch: int, step: int) -> Ticket:
        plan = self.plan(epoch)
        b = self._batch
        order = self._orders.get(epoch)
        if order is None:
            order = self._orders[epoch] = self._substitute(plan.order)
        lo, hi = step * b, (step + 1) * b
        return Ticket(epoch=epoch, step=step, ids=order[lo:hi], planned=plan.order[lo:hi], valid=int(plan.valid[step]))

    def after(self, key: tuple[int, int]) -> tuple[int, int]:
        """The (epoch, step) read after ``key``: the next step, or the next epoch's first."""
        epoch, step = key
        if step + 1 < self.plan(epoch).num_batches:
            return epoch, step + 1
        return epoch + 1, 0


def draw_augment(spec, seed: int, shard_id: int, ticket: Ticket, sizes: np.ndarray):
    """(crop windows or None, flips) of ``ticket``'s samples: a function of (seed, rank, epoch, step)
    and the images' sizes only."""
    rng = rng_mod.generator(seed, rng_mod.CROP, shard_id, ticket.epoch, ticket.step)
    n = len(ticket.ids)
    if not spec.train:
        return None, np.zeros(n, dtype=bool)
    windows = plan_crops(sizes, rng, scale=spec.scale, ratio=spec.ratio)
    flips = rng.random(n) < spec.hflip
    return windows, flips
