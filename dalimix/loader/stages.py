"""The per-batch finishing stages, run in order on DALI's uint8 batch.

``labels -> policy -> unmixed -> mix plan -> mask hook -> fused kernel -> targets``: each stage
reads and fills a ``Batch``; ``Finisher`` holds the list for the loader's current settings (a
stage that has nothing to do is not in it). The horizontal flip drawn with the crop is applied by
the fused kernel (``dalimix.ops.record.set_flips``): the unmixed batch, the mask hook and the
mixed batch all see the flipped images; a ``Policy`` runs on the uint8 images before the flip.
Random erasing is planned on the host and done by the fused kernel in its pass (its erase table),
on the mixed, normalised output as timm's prefetcher does; the unmixed batch is not erased.
"""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import Executor
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from .. import rng as rng_mod
from ..hook import require_hook
from ..ops import identity_records, mix_normalize
from ..ops.record import set_flips
from ..ops.staging import to_device
from .plan import Ticket, plan_batch

if TYPE_CHECKING:
    from ..hook import MaskHookStage
    from ..mix import Mixer
    from ..mix.params import MixParams
    from ..ops import Normalization
    from ..sources import Samples
    from .outputs import OutputRing


@dataclass
class Batch:
    """One batch on its way through the stages (``n`` = the real samples of the ticket)."""

    ticket: Ticket
    images_u8: torch.Tensor  # N_src x H x W x 3 uint8
    flips: np.ndarray  # N_src bools
    labels: torch.Tensor | None = None
    labels_host: np.ndarray | None = None
    params: MixParams | None = None
    records: np.ndarray | None = None
    masks: torch.Tensor | None = None
    unmixed: torch.Tensor | None = None
    images: torch.Tensor | None = None
    extra: dict = field(default_factory=dict)
    result: tuple | None = None

    @property
    def n(self) -> int:
        return self.ticket.valid

    @property
    def ids(self) -> np.ndarray:
        return self.ticket.ids[: self.ticket.valid]


@dataclass
class Finishing:
    """What the stages need from the loader (no loader reference: the stages see only this)."""

    samples: Samples
    device: torch.device
    norm: Normalization
    dtype: torch.dtype
    channels_last: bool
    height: int
    width: int
    seed: int
    shard_id: int
    mix: Mixer | None
    num_classes: int
    ring: OutputRing
    planner: Callable[[], Executor]  # the executor for mix planning ahead
    policy_stage: Any = None  # () -> PolicyStage, or None
    hook: MaskHookStage | None = None
    keep_unmixed: bool = False
    erasing: Any = None  # dalimix.erase.RandomErasing or None
    kernel_threads: int | None = None  # CPU: threads of the host kernel (the calling one included)
    # the Finisher's plan lookup: batch -> (params, records)
    planned: Callable[[Batch], tuple[Any, Any]] | None = None


def _labels(f: Finishing, b: Batch) -> None:
    """The batch's labels. With a mixer they travel with the mix parameters (``_mix_plan``: one
    staged copy per batch); without one they are the batch's only staged copy besides the records."""
    b.labels_host = f.samples.labels[b.ids]
    if f.mix is None:
        (b.labels,) = to_device([b.labels_host], f.device)


def _policy(f: Finishing, b: Batch) -> None:
    """Batch ``step``'s policy draws, made now from the vector current now (see dalimix.policy)."""
    rng = rng_mod.generator(f.seed, rng_mod.POLICY, f.shard_id, b.ticket.epoch, b.ticket.step)
    b.images_u8, draws = f.policy_stage().apply(b.images_u8, rng)
    b.extra["policy"] = draws.take(b.n)


def _out(f: Finishing, n: int) -> torch.Tensor:
    return f.ring.get(n, f.height, f.width, dtype=f.dtype, channels_last=f.channels_last)


def _unmixed(f: Finishing, b: Batch) -> None:
    records = set_flips(identity_records(b.n), b.flips)
    b.unmixed = mix_normalize(
        b.images_u8,
        records,
        None,
        norm=f.norm,
        dtype=f.dtype,
        channels_last=f.channels_last,
        out=_out(f, b.n),
        threads=f.kernel_threads,
    )


# Finisher.stages() lists these three only with a mixer (and _hook only with a hook): the asserts
# state that for the type checker
def _mix_plan(f: Finishing, b: Batch) -> None:
    """The plan, then the batch's one staged copy: labels, partner, target lam, host masks and the
    mask hook's inputs (fresh device tensors the targets and the hook may keep; no host wait)."""
    assert f.planned is not None
    b.params, b.records = f.planned(b)
    b.labels = b.params.stage(f.device, labels=b.labels_host, hook=f.hook is not None).labels


def _hook(f: Finishing, b: Batch) -> None:
    assert f.hook is not None and b.params is not None
    b.records, b.masks = f.hook.prepare(b.unmixed, b.params, epoch=b.ticket.epoch, step=b.ticket.step, labels=b.labels)


def _mask_pool(f: Finishing, b: Batch) -> None:
    assert b.params is not None
    require_hook(b.params)
    b.masks = b.params.mask_pool(f.device)


def _kernel(f: Finishing, b: Batch) -> None:
    records = identity_records(b.n) if b.records is None else b.records
    set_flips(records, b.flips)
    table = None
    if f.erasing is not None:  # timm's random erasing, fused: boxes drawn here, filled by the kernel
        rng = rng_mod.generator(f.seed, rng_mod.ERASE, f.shard_id, b.ticket.epoch, b.ticket.step)
        plan = f.erasing.plan(b.n, 3, f.height, f.width, rng)
        b.extra["erase"] = plan
        table = f.erasing.table(plan)
    gather = getattr(b.params, "device_gather", None)  # block permutations of the partner (mask hook)
    b.images = mix_normalize(
        b.images_u8,
        records,
        b.masks,
        gather,
        norm=f.norm,
        dtype=f.dtype,
        channels_last=f.channels_last,
        out=_out(f, b.n),
        erase=table,
        threads=f.kernel_threads,
    )


def _targets(f: Finishing, b: Batch) -> None:
    if f.mix is None:
        b.result = (b.images, b.labels)
    else:
        assert b.params is not None  # _mix_plan ran
        # a mixer's own num_classes wins (its bind() checked that it covers the data set's classes)
        num_classes = getattr(f.mix, "num_classes", None) or f.num_classes
        b.result = (b.images, f.mix.targets(b.labels, b.params, num_classes=num_classes))


PLANNED_AHEAD = 2  # plans kept at once: the batch being finished and the next one


class Finisher:
    """Runs the stages; plans the next batch's mix parameters on the planner thread meanwhile."""

    def __init__(self, finishing: Finishing):
        self.f = finishing
        finishing.planned = lambda b: self._take_plan(b)  # looked up per call (benchmarks time it)
        # plan key -> future: the batch being finished and the one planned ahead of it (the iterator
        # plans batch step + 1 before it finishes batch step)
        self._planned: dict[tuple, Any] = {}

    def stages(self) -> list:
        f = self.f
        out = [_labels]
        if f.policy_stage is not None:
            out.append(_policy)
        if f.keep_unmixed or f.hook is not None:
            out.append(_unmixed)
        if f.mix is not None:
            out += [_mix_plan, _hook if f.hook is not None else _mask_pool]
        return out + [_kernel, _targets]

    def run(self, batch: Batch) -> Batch:
        try:
            for stage in self.stages():
                stage(self.f, batch)
        finally:
            if batch.params is not None:
                batch.params.staged = None  # the batch's staged tensors belong to it, not to later readers
        return batch

    def plan_ahead(self, epoch: int, step: int, n: int) -> None:
        """Sample batch ``step``'s mix parameters on the planner thread (FMix masks and the like cost
        milliseconds; numpy and torch release the GIL while they work)."""
        f = self.f
        if f.mix is None or n <= 0:
            return
        key = self._key(epoch, step, n)
        if key in self._planned:  # planned already (by an iteration of this epoch that was left): still valid
            return
        while len(self._planned) >= PLANNED_AHEAD:  # never taken (another epoch or step was asked for)
            self._planned.pop(next(iter(self._planned))).cancel()
        self._planned[key] = f.planner().submit(
            plan_batch, f.mix, f.seed, f.shard_id, f.height, f.width, n, epoch, step
        )

    def _key(self, epoch: int, step: int, n: int) -> tuple:
        """A plan is used only for the batch it was made for, and only while the mixer's on/off switch
        is as it was (``mixup_enabled`` changed since: the batch is planned again)."""
        return epoch, step, n, bool(getattr(self.f.mix, "mixup_enabled", True))

    def _take_plan(self, b: Batch):
        e, s, n = b.ticket.epoch, b.ticket.step, b.n
        future = self._planned.pop(self._key(e, s, n), None)  # only evicted plans are cancelled
        if future is not None:
            return future.result()
        f = self.f
        return plan_batch(f.mix, f.seed, f.shard_id, f.height, f.width, n, e, s)
