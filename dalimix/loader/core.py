"""The public loader: DALI decodes and augments, dalimix's fused kernel finishes the batch."""

from __future__ import annotations

import weakref
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from .. import rng as rng_mod
from .. import validate as v
from .._keywords import suggest_keywords
from ..errors import DatasetError
from ..hook import MaskHookStage, make_stage
from ..mix.params import MixParams
from ..pipeline import default_num_threads
from ..scan import check_loader_files
from ..sources import Samples, resolve_source
from .feed import PipelineFeed
from .iterator import EpochContext, EpochIterator
from .options import IMAGENET_MEAN, IMAGENET_STD, LoaderOptions
from .outputs import OutputRing, release_free_heap
from .plan import EpochPlan, LastBatchPolicy, Traversal, plan_epoch
from .recovery import Recovery
from .stages import Batch, Finisher, Finishing

TRIM_EVERY = 8192  # images between two trims of the C heap (``release_free_heap``), at epoch ends


@dataclass
class BatchInfo:
    """What the loader knows about the batch it just yielded (``loader.last_batch``).

    ``sample_ids`` index ``loader.dataset`` (its ``paths`` and ``labels``); ``params`` are the mix
    parameters (None without a mixer); ``labels`` the batch's int64 labels on the loader's device;
    ``unmixed`` the same batch unmixed (flipped, normalised, cast, laid out) when the loader keeps
    it (``keep_unmixed=True`` or a mask hook), else None; ``flips`` which samples are mirrored;
    ``extra["policy"]`` is the ``dalimix.policy.PolicyBatch`` of a loader with an augmentation
    ``Policy`` (which sub-policy each sample got, which steps ran).
    """

    epoch: int
    step: int
    sample_ids: np.ndarray
    params: MixParams | None = None
    extra: dict = field(default_factory=dict)
    labels: torch.Tensor | None = None
    unmixed: torch.Tensor | None = None
    flips: np.ndarray | None = None


class _EpochSampler:
    """``loader.sampler``: carries ``set_epoch`` for training loops that call ``loader.sampler.set_epoch(e)``."""

    def __init__(self, loader: ImageLoader):
        # weak: a loader dropped by its owner is freed (and its DALI threads stopped) at once
        self._loader = weakref.ref(loader)

    def _get(self) -> ImageLoader:
        loader = self._loader()
        if loader is None:
            raise RuntimeError("loader.sampler: its ImageLoader was garbage-collected")
        return loader

    def set_epoch(self, epoch: int) -> None:
        self._get().set_epoch(epoch)

    def __len__(self) -> int:
        loader = self._get()
        return len(loader) * loader.batch_size


class ImageLoader:
    """DALI-decoded, dalimix-finished image batches for PyTorch training and evaluation.

    Yields ``(images, labels)``: ``images`` is ``N x 3 x H x W`` of ``dtype`` (NCHW, or the same
    shape in channels_last memory order), normalised with ``mean``/``std`` (0..1 scale);
    ``labels`` is ``N`` int64. With ``mix=...`` it yields ``(images, targets)`` as the mixer says.

    One DALI pipeline serves the loader's whole life: epochs, ``set_epoch``, resume and skipped
    files are changes of the plan that feeds it (see ``dalimix.loader.feed``), and the next
    epoch's first batches are read while the current one ends.

    Args (keyword-only):
        root: ImageFolder tree ``root/<class>/<image>`` (classes sorted, like torchvision).
        file_list: text file of ``path label`` lines (alternative to ``root``; relative paths are
            taken from ``root`` if given, else from the list's folder).
        webdataset: WebDataset tar shards: a folder of ``.tar`` files, a glob, or a list of paths
            (see ``dalimix.webdataset``); ``webdataset_keys`` = (image extensions, label extension),
            default every image extension and ``"cls"``.
        samples: a ``dalimix.sources.Samples`` built elsewhere (e.g. ``dalimix.create_loader``).
        batch_size: samples per batch (per rank).
        train: True: random resized crop + horizontal flip; False: resize shorter side + centre crop.
        size: output size, ``int`` or ``(height, width)``, at most 4096 per side; refused when the
            estimated buffers exceed the memory available (``validate.loader_memory``).
        device: ``"cuda"``/``"cuda:N"`` (nvJPEG decoding, GPU ops, CUDA kernel), ``"cpu"`` (DALI
            CPU-only mode, the kernel compiled for the CPU); default CUDA when available.
        dtype: torch.float32, torch.float16 or torch.bfloat16 (strings like "bf16" accepted).
        channels_last: write channels_last memory order.
        mean, std: per-channel normalisation on the 0..1 scale (ImageNet's by default).
        scale, ratio: random resized crop area fraction and aspect range (torchvision's defaults and
            its rule: up to 10 tries, then the centre crop).
        hflip: probability of a horizontal flip (train; applied by the fused kernel).
        crop_pct: eval centre crop fraction; the shorter side is resized to floor(max(H, W) / crop_pct).
        interpolation: "bilinear" (default), "bicubic", "nearest" or "triangular" (antialiased).
        shuffle: reshuffle every epoch (default: ``train``).
        seed: the seed of every random stream (order, crops, flips, DALI augmentation, mixing,
            erasing); the same on all ranks (per-rank streams are derived from it). None (default):
            the script's seed, ``dalimix.rng.script_seed()`` (from ``torch.manual_seed``; rank 0's
            under torch.distributed).
        shard_id, num_shards: this rank and the number of ranks; default from torch.distributed
            when it is initialised, else 0 and 1.
        last_batch_policy: DROP, PARTIAL (default) or FILL; see ``LastBatchPolicy``.
        num_threads: DALI worker threads (default: the CPU cores this process may use).
        prefetch: batches DALI prepares ahead, across epoch boundaries (default 2, at most
            ``validate.MAX_PREFETCH`` = 32).
        mix: a mixer from ``dalimix.mix`` (or None for plain labels).
        auto_augment: train only: a preset string run by DALI (``"original"``, ``"rand-m9-n2"``,
            ``"trivialaugment"``; see ``dalimix.autoaug``) or a ``dalimix.policy.Policy`` whose
            vector the training loop may replace at any step. Applied after the crop, before the
            flip and mixing.
        classes: class names for a file list (default "0", "1", ...).
        on_error: what an unreadable file does. "raise" (default): a ``DecodeError`` naming the
            file(s), the epoch and the step. "skip": the sample is replaced by the next readable
            sample of this rank's epoch order (wrapping around), so batches keep their size and the
            substitute's label comes with it; each file is warned about once, listed in
            ``loader.skipped`` (path -> reason) and kept out of later epochs, and
            ``loader.skip_count`` counts the replaced samples handed out.
        overlap_epochs: deprecated, no effect (epochs always overlap); ``True`` warns, ``False`` is ignored.
        keep_unmixed: also write each batch unmixed into ``loader.last_batch.unmixed`` (one more
            pass of the fused kernel; a registered mask hook implies it).
        reuse_outputs: CPU: write batches into recycled tensors, each reused only once nothing else
            refers to it (default True; False: a fresh tensor every batch). CUDA batches always come
            from torch's caching allocator.
        augment: train only: a ``dalimix.augment.Augment`` (timm's vflip, colour jitter, grayscale,
            blur, random interpolation), run by DALI after the crop.
        erasing: train only: a ``dalimix.erase.RandomErasing`` applied to the finished (normalised,
            mixed) batch, as timm's prefetcher does; the fused kernel erases in its own pass.
        strict: check every file once at construction as ``dalimix scan --strict`` does (DALI and
            PIL both decode it in full; verdicts cached by file size and mtime): bad files raise a
            ``DecodeError`` naming them, or are skipped under ``on_error="skip"``. See the docs'
            Reliability page for what is checked with and without it.
    """

    @suggest_keywords(
        {
            "num_workers": "num_threads= (DALI threads)",
            "drop_last": "last_batch_policy='drop'",
            "image_size": "size=",
            "input_size": "size=",
        }
    )
    def __init__(
        self,
        *,
        root=None,
        file_list=None,
        webdataset=None,
        webdataset_keys=None,
        samples=None,
        batch_size: int,
        train: bool = True,
        size=224,
        device=None,
        dtype=torch.float32,
        channels_last: bool = False,
        mean=IMAGENET_MEAN,
        std=IMAGENET_STD,
        scale=(0.08, 1.0),
        ratio=(3 / 4, 4 / 3),
        hflip: float = 0.5,
        crop_pct: float = 0.875,
        interpolation: str = "bilinear",
        shuffle: bool | None = None,
        seed: int | None = None,
        shard_id: int | None = None,
        num_shards: int | None = None,
        last_batch_policy=LastBatchPolicy.PARTIAL,
        num_threads: int | None = None,
        prefetch: int = 2,
        mix=None,
        auto_augment=None,
        classes=None,
        on_error: str = "raise",
        overlap_epochs: bool | None = None,
        keep_unmixed: bool = False,
        reuse_outputs: bool = True,
        strict: bool = False,
        augment=None,
        erasing=None,
    ):
        source_given = any(x is not None for x in (root, file_list, webdataset, samples))
        if not source_given:
            resolve_source()  # raises the "give the data" error before anything else is checked
        v.data_source(root=root, file_list=file_list, webdataset=webdataset, samples=samples, classes=classes)
        v.mixer(mix)
        o = LoaderOptions.parse(
            batch_size=batch_size,
            train=train,
            size=size,
            device=device,
            dtype=dtype,
            channels_last=channels_last,
            mean=mean,
            std=std,
            scale=scale,
            ratio=ratio,
            hflip=hflip,
            crop_pct=crop_pct,
            interpolation=interpolation,
            shuffle=shuffle,
            seed=seed,
            shard_id=shard_id,
            num_shards=num_shards,
            last_batch_policy=last_batch_policy,
            num_threads=num_threads,
            prefetch=prefetch,
            auto_augment=auto_augment,
            on_error=on_error,
            overlap_epochs=overlap_epochs,
            keep_unmixed=keep_unmixed,
            reuse_outputs=reuse_outputs,
            augment=augment,
            erasing=erasing,
        )
        self.options = o
        self.batch_size, self.spec, self.device, self.dtype = o.batch_size, o.spec, o.device, o.dtype
        self.channels_last, self.norm, self.policy, self.seed = o.channels_last, o.norm, o.policy, o.seed
        self.shuffle, self.shard_id, self.num_shards = o.shuffle, o.shard_id, o.num_shards
        self.last_batch_policy, self.num_threads, self.prefetch = o.last_batch_policy, o.num_threads, o.prefetch
        self.on_error, self.keep_unmixed, self.erasing = o.on_error, o.keep_unmixed, o.erasing
        self.samples: Samples = resolve_source(
            root=root,
            file_list=file_list,
            webdataset=webdataset,
            webdataset_keys=webdataset_keys,
            samples=samples,
            classes=classes,
        )
        if len(self) == 0:
            raise DatasetError(
                f"{self.samples.source}: {len(self.samples)} samples over {self.num_shards} shard(s) make no batch of "
                f"{self.batch_size} under {self.last_batch_policy.name}; use a smaller batch_size or last_batch_policy='partial'"
            )
        self._recovery = Recovery(self.samples, self.on_error, self.device)
        self._files = check_loader_files(
            self.samples, on_error=self.on_error, strict=strict, workers=self.num_threads, mark=self._recovery.mark
        )
        self.mix = mix
        self.sampler = _EpochSampler(self)
        self.batch_sampler = None
        self.last_batch: BatchInfo | None = None
        self._traversal = Traversal(self.plan, self.batch_size, self._recovery.substitute)
        self._feed = PipelineFeed(
            samples=self.samples,
            spec=self.spec,
            device=self.device,
            batch_size=self.batch_size,
            num_threads=self.num_threads,
            prefetch=self.prefetch,
            seed=self.seed,
            dali_seed=rng_mod.derive_seed(self.seed, rng_mod.DALI, self.shard_id),
            shard_id=self.shard_id,
            traversal=self._traversal,
            recovery=self._recovery,
            checkpointing=_dali_draws(self.spec),
        )
        self._finishing = Finishing(
            samples=self.samples,
            device=self.device,
            norm=self.norm,
            dtype=self.dtype,
            channels_last=self.channels_last,
            height=self.spec.height,
            width=self.spec.width,
            seed=self.seed,
            shard_id=self.shard_id,
            mix=mix,
            num_classes=self.num_classes,
            ring=OutputRing(self.device, 4 if o.reuse_outputs else 0),
            planner=self._planner,
            policy_stage=self._get_policy_stage if self.policy is not None else None,
            keep_unmixed=self.keep_unmixed,
            erasing=self.erasing,
            kernel_threads=_kernel_threads(self.num_threads),
        )
        self._finisher = Finisher(self._finishing)
        self._mask_hook: MaskHookStage | None = None
        if mix is not None and hasattr(mix, "bind"):
            mix.bind(self)  # after the finishing stages: a mixer with a mask policy registers its hook here
        self._epoch = 0
        self._epoch_is_set = False
        self._iterated = False
        self._active: EpochIterator | None = None
        self._resume: tuple[int, int] | None = None  # (epoch, step) set by seek()
        self._planner_pool: Any = None  # ThreadPoolExecutor, made on first use
        self._policy_stage: Any = None  # PolicyStage, made on first use
        self._since_trim = 0  # images handed out since the C heap was last trimmed

    # ----------------------------------------------------------------------------------- info
    @property
    def dataset(self) -> Samples:
        """The samples (``paths``, ``labels``, ``classes``, ``class_to_idx``, ``len()``)."""
        return self.samples

    @property
    def classes(self) -> list[str]:
        return self.samples.classes

    @property
    def class_to_idx(self) -> dict[str, int]:
        return self.samples.class_to_idx

    @property
    def num_classes(self) -> int:
        return len(self.samples.classes)

    @property
    def epoch(self) -> int:
        """The epoch the next (or current) iteration reads."""
        return self._epoch

    @property
    def skipped(self) -> dict[str, str]:
        """Unreadable files met so far (``on_error="skip"``): path -> reason."""
        return self._recovery.skipped

    @property
    def skip_count(self) -> int:
        """Samples replaced so far in the batches handed out."""
        return self._recovery.skip_count

    @property
    def pipelines_built(self) -> int:
        """DALI pipelines built so far: 1 for the loader's life (more only after DALI failed on a file,
        or when a resumed ``auto_augment`` preset restores DALI's checkpoint)."""
        return self._feed.builds

    @property
    def mixup_enabled(self) -> bool:
        """timm's switch (``--mixup-off-epoch``): False turns mixing off, targets keep their form."""
        return self.mix is not None and bool(getattr(self.mix, "mixup_enabled", True))

    @mixup_enabled.setter
    def mixup_enabled(self, value: bool) -> None:
        if self.mix is not None:
            self.mix.mixup_enabled = bool(value)

    def __len__(self) -> int:
        return self.plan(0).num_batches

    def __repr__(self) -> str:
        return (
            f"ImageLoader({self.samples.source!r}, {len(self.samples)} samples, {self.num_classes} classes, "
            f"batch_size={self.batch_size}, {'train' if self.spec.train else 'eval'}, "
            f"size={self.spec.height}x{self.spec.width}, device={self.device}, dtype={self.dtype}, "
            f"shard {self.shard_id}/{self.num_shards}, {self.last_batch_policy.name})"
        )

    # ------------------------------------------------------------------------------ epochs
    def set_epoch(self, epoch: int) -> None:
        """Read epoch ``epoch`` next (its own permutation and random streams). Without calls to
        ``set_epoch`` every new iteration reads the epoch after the previous one."""
        self._epoch = v.integer("epoch", epoch, lo=0)
        self._epoch_is_set = True
        if self._resume is not None and self._resume[0] != self._epoch:
            self._resume = None  # another epoch than the resumed one: start it afresh
        if self.mix is not None and hasattr(self.mix, "set_epoch"):
            self.mix.set_epoch(self._epoch)

    def plan(self, epoch: int) -> EpochPlan:
        """This rank's sample order for ``epoch``."""
        return plan_epoch(
            len(self.samples),
            batch_size=self.batch_size,
            epoch=epoch,
            seed=self.seed,
            shuffle=self.shuffle,
            shard_id=self.shard_id,
            num_shards=self.num_shards,
            policy=self.last_batch_policy,
        )

    def __iter__(self) -> EpochIterator:
        self._retire("a newer iter(loader) replaced it")
        if self._iterated and not self._epoch_is_set:
            self._epoch += 1
            if self.mix is not None and hasattr(self.mix, "set_epoch"):
                self.mix.set_epoch(self._epoch)
        self._iterated = True
        self._epoch_is_set = False
        start = 0
        if self._resume is not None and self._resume[0] == self._epoch:
            start = self._resume[1]
        self._resume = None
        ctx = EpochContext(
            epoch=self._epoch,
            num_batches=self.plan(self._epoch).num_batches,
            take=self._take,
            finish=self._finish,
            plan_ahead=self._plan_ahead,
            dead=self._why_dead,
            ended=self._epoch_ended,
        )
        self._active = EpochIterator(ctx, start_step=start)
        return self._active

    def _epoch_ended(self) -> None:
        """Hand the C heap's free pages back every ``TRIM_EVERY`` images or so (at an epoch's end):
        a trim costs milliseconds, too much to pay after every epoch of a few hundred images."""
        self._since_trim += self.plan(self._epoch).num_batches * self.batch_size
        if self._since_trim >= TRIM_EVERY:
            self._since_trim = 0
            release_free_heap()

    def _retire(self, why: str) -> None:
        if self._active is not None:
            self._active.retired = why
            self._active = None

    def _why_dead(self, it) -> str | None:
        if it is self._active:
            return None
        return it.retired or "the loader no longer serves it"

    # ------------------------------------------------------------------------- resume
    def position(self) -> tuple[int, int]:
        """(epoch, step) of the batch this loader yields next (what ``state_dict`` saves)."""
        if self._resume is not None:
            return self._resume
        it = self._active
        if it is not None and not self._epoch_is_set and it.epoch == self._epoch:
            if it.step < it.ctx.num_batches:
                return it.epoch, it.step
            return it.epoch + 1, 0
        if self._epoch_is_set or not self._iterated:
            return self._epoch, 0
        return self._epoch + 1, 0

    def seek(self, epoch: int, step: int, *, dali_checkpoint=None) -> None:
        """Make the next iteration start at batch ``step`` of ``epoch`` (``load_state_dict`` uses
        it; ``dali_checkpoint``: an ``auto_augment`` preset's DALI random streams to continue)."""
        epoch = v.integer("epoch", epoch, lo=0)
        num_batches = self.plan(epoch).num_batches
        step = v.integer("step", step, lo=0)
        if step >= max(num_batches, 1):
            raise ValueError(f"step {step} is outside epoch {epoch}'s {num_batches} batches")
        self._retire("the loader was moved to another position (seek / load_state_dict)")
        self.set_epoch(epoch)
        self._iterated = True
        self._resume = (epoch, step) if step > 0 else None
        if dali_checkpoint is not None:
            self._feed.restore(dali_checkpoint)

    def dali_checkpoint(self):
        """DALI's checkpoint after the last batch handed out: only an ``auto_augment`` preset's
        random streams live in DALI, so it is None for every other loader."""
        return self._feed.checkpoint()

    def state_dict(self) -> dict:
        """Where this rank's loader stands: epoch, next step, DALI's checkpoint and what must match on
        resume. Save it with ``torch.save``; see ``dalimix.resume``."""
        from ..resume import loader_state

        return loader_state(self)

    def load_state_dict(self, state) -> None:
        """Continue exactly where ``state`` (from ``state_dict()``, or a list of every rank's) left
        off: the next batch is the one the interrupted run would have yielded next. Raises
        ValueError when the state is from another data set, batch size, seed, shard or pipeline."""
        from ..resume import restore_loader_state

        restore_loader_state(self, state)

    # ------------------------------------------------------------------------- one batch
    def _take(self, epoch: int, step: int):
        return self._feed.take(epoch, step)

    def _finish(self, taken) -> tuple:
        ticket, images_u8, flips = taken
        batch = Batch(ticket=ticket, images_u8=images_u8, flips=flips)
        try:
            self._finisher.run(batch)
        finally:
            del images_u8
            batch.images_u8 = None
            if self.device.type == "cpu":
                self._feed.release()  # the kernel has read DALI's buffer (on CUDA: at the next take)
            else:
                self._feed.consumed()
            self._recovery.count_replaced(ticket.planned[: ticket.valid])
        self.last_batch = BatchInfo(
            epoch=ticket.epoch,
            step=ticket.step,
            sample_ids=batch.ids,
            params=batch.params,
            labels=batch.labels,
            unmixed=batch.unmixed,
            extra=batch.extra,
            flips=batch.flips[: ticket.valid],
        )
        assert batch.result is not None, "the finishing stages set every batch's result"
        return batch.result

    def _plan_ahead(self, epoch: int, step: int) -> None:
        self._finisher.plan_ahead(epoch, step, int(self._traversal.plan(epoch).valid[step]))

    def _get_policy_stage(self):
        if self._policy_stage is None:
            from ..policy import PolicyStage

            assert self.policy is not None  # only asked for when a policy is set
            self._policy_stage = PolicyStage(
                self.policy,
                device=self.device,
                batch_size=self.batch_size,
                num_threads=self.num_threads,
                height=self.spec.height,
                width=self.spec.width,
            )
        return self._policy_stage

    def _planner(self):
        if self._planner_pool is None:
            from concurrent.futures import ThreadPoolExecutor

            self._planner_pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="dalimix-planner")
        return self._planner_pool

    # ------------------------------------------------------------------------- life
    def close(self, *, wait: bool = True) -> None:
        """Stop DALI's threads and the planner thread now (also happens when the loader is garbage
        collected). Iterators still open raise ``StaleIteratorError`` afterwards."""
        self._retire("loader.close() was called")
        feed = getattr(self, "_feed", None)
        if feed is not None:
            feed.close()
        pool, self._planner_pool = getattr(self, "_planner_pool", None), None
        if pool is not None:
            pool.shutdown(wait=wait, cancel_futures=True)
        stage, self._policy_stage = getattr(self, "_policy_stage", None), None
        if stage is not None:
            stage.close()

    def __del__(self):
        # The cyclic GC may run this on any thread, even one that is starting up inside Python's
        # threading internals: joining the planner thread there deadlocks, so do not wait for it.
        try:
            self.close(wait=False)
        except Exception:
            pass

    # ------------------------------------------------------------------------- mask hook
    def set_mask_hook(
        self,
        fn,
        *,
        interpolation: str = "nearest",
        logits: bool = False,
        target_lam: str = "mask",
        validate: str = "auto",
        labels: bool = False,
        draws: bool = False,
    ) -> None:
        """Let ``fn(images, lam, partner) -> masks`` supply the masks of ``LearnedMask`` samples, for
        the very batch being mixed (see ``dalimix.hook`` and docs/learned-masks.md). ``labels=True``:
        called ``fn(images, lam, partner, labels)``; ``draws=True``: also ``draws=`` the batch's host
        draws by method name (``MixParams.draws``). The hook may return ``(masks, perm)``: a block
        permutation of the partner per sample (PuzzleMix's transport), or ``(masks, perm, perm_self)``:
        the own image's too (nearest masks)."""
        self._mask_hook = make_stage(
            self,
            fn,
            interpolation=interpolation,
            logits=logits,
            target_lam=target_lam,
            validate=validate,
            labels=labels,
            draws=draws,
        )
        self._finishing.hook = self._mask_hook

    def remove_mask_hook(self) -> None:
        """Stop calling the hook (a pending deferred check is resolved first)."""
        hook, self._mask_hook = self._mask_hook, None
        self._finishing.hook = None
        if hook is not None:
            hook.resolve_pending()


def _dali_draws(spec) -> bool:
    """Whether DALI itself draws random numbers for this loader (an ``auto_augment`` preset, or
    timm's colour jitter / grayscale / blur / random interpolation): its streams then run on across
    the loader's one pipeline, and a state carries DALI's checkpoint."""
    return spec.auto_augment is not None or spec.extra is not None


def _kernel_threads(dali_threads: int) -> int:
    """Threads of the CPU kernel: the loop's own thread plus the cores DALI's threads leave free. Where
    DALI keeps every core busy more kernel threads would only take turns with it, paying thread
    hand-offs and cache misses for nothing (one thread is the least CPU per batch)."""
    return max(1, min(torch.get_num_threads(), default_num_threads() - dali_threads + 1))
