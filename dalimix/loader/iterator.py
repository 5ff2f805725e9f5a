"""One epoch's iterator. It sees the loader only through an ``EpochContext``: take a batch, finish
it, plan ahead, and whether it is still the loader's current iteration."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from ..errors import DalimixError


class StaleIteratorError(DalimixError, RuntimeError):
    """``next()`` on an iterator the loader no longer serves (closed, or replaced by a newer ``iter``)."""


@dataclass(frozen=True)
class EpochContext:
    """What an epoch's iterator may do."""

    epoch: int
    num_batches: int
    take: Callable[[int, int], object]  # (epoch, step) -> DALI's batch
    finish: Callable[[object], tuple]  # DALI's batch -> (images, labels or targets)
    plan_ahead: Callable[[int, int], None]  # (epoch, step): start planning that batch's mixing
    dead: Callable[[object], str | None]  # iterator -> None while it is current, else why not
    ended: Callable[[], None] = lambda: None  # the epoch's last batch was handed out


class EpochIterator:
    """Iterates one epoch from ``start_step``; ``len()`` is the number of batches still to come."""

    def __init__(self, ctx: EpochContext, start_step: int = 0):
        self.ctx = ctx
        self.epoch = ctx.epoch
        self.step = start_step
        self.retired: str | None = None  # why the loader stopped serving this iterator

    def __iter__(self):
        return self

    def __len__(self) -> int:
        return max(self.ctx.num_batches - self.step, 0)

    def __next__(self):
        if self.step >= self.ctx.num_batches:
            raise StopIteration
        why = self.ctx.dead(self)
        if why is not None:
            raise StaleIteratorError(
                f"this iterator over epoch {self.epoch} is finished: {why}; "
                "start a new iteration with iter(loader) (or a new for loop)"
            )
        taken = self.ctx.take(self.epoch, self.step)  # a DecodeError here leaves the step where it is
        self.step += 1
        if self.step < self.ctx.num_batches:
            self.ctx.plan_ahead(self.epoch, self.step)
        result = self.ctx.finish(taken)  # a batch whose finishing fails (e.g. a mask hook error) is skipped
        if self.step == self.ctx.num_batches:
            self.ctx.ended()
        return result
