"""The public loader: DALI decodes and augments, dalimix's fused kernel finishes the batch.

``ImageLoader`` replaces ``torch.utils.data.DataLoader`` (+ a mixing transform) in a training
script: iterate it to get ``(images, labels)`` — or ``(images, targets)`` with a mixer — as torch
tensors on the chosen device.

Epochs, order and sharding are planned here (``plan_epoch``): each epoch is a permutation drawn
from (seed, epoch), the same on every rank; rank ``r`` of ``W`` reads every ``W``-th entry of it
starting at ``r``. DALI gets exactly that file list, so what each rank reads is known in advance.

Output lifetime: every batch is written into a fresh tensor from torch's caching allocator, on the
consumer's current CUDA stream. The training loop may keep a batch as long as it likes; nothing
dalimix does later overwrites it.
"""

from __future__ import annotations

import enum
import weakref
from dataclasses import dataclass, field

import numpy as np
import torch

from . import rng as rng_mod
from . import validate as v
from .autoaug import parse_auto_augment
from .errors import DatasetError, DecodeError
from .hook import make_stage, require_hook
from .ops import Normalization, allocate_output, identity_records, mix_normalize
from .ops.kernels import OUTPUT_TYPES
from .pipeline import INTERPOLATIONS, AugmentSpec, build_pipeline, default_num_threads, resolve_device
from .policy import Policy, PolicyStage
from .sources import Samples, read_file_list, scan_image_folder

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
ON_ERROR = ("raise", "skip")

_DTYPES = {
    "float32": torch.float32, "fp32": torch.float32, "float": torch.float32,
    "float16": torch.float16, "fp16": torch.float16, "half": torch.float16,
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
}


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
    def parse(cls, value) -> "LastBatchPolicy":
        if isinstance(value, cls):
            return value
        name = getattr(value, "name", value)
        if isinstance(name, str) and name.upper() in cls.__members__ and not isinstance(value, bool):
            return cls[name.upper()]
        raise ValueError(f"last_batch_policy={value!r} is not one of 'drop', 'partial', 'fill' (or DALI's LastBatchPolicy)")


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


@dataclass
class BatchInfo:
    """What the loader knows about the batch it just yielded (``loader.last_batch``).

    ``sample_ids`` index ``loader.dataset`` (its ``paths`` and ``labels``); ``params`` are the mix
    parameters (None without a mixer); ``labels`` the batch's int64 labels on the loader's device;
    ``unmixed`` the same batch unmixed (normalised, cast, laid out) when the loader keeps it
    (``keep_unmixed=True`` or a mask hook), else None; ``extra["policy"]`` is the
    ``dalimix.policy.PolicyBatch`` of a loader with an augmentation ``Policy`` (which sub-policy
    each sample got, which steps ran).
    """

    epoch: int
    step: int
    sample_ids: np.ndarray
    params: object = None
    extra: dict = field(default_factory=dict)
    labels: torch.Tensor | None = None
    unmixed: torch.Tensor | None = None


class _EpochSampler:
    """``loader.sampler``: carries ``set_epoch`` for training loops that call ``loader.sampler.set_epoch(e)``."""

    def __init__(self, loader: "ImageLoader"):
        # weak: a loader dropped by its owner is freed (and its DALI threads stopped) at once,
        # not at some later garbage collection
        self._loader = weakref.ref(loader)

    def set_epoch(self, epoch: int) -> None:
        self._loader().set_epoch(epoch)

    def __len__(self) -> int:
        loader = self._loader()
        return len(loader) * loader.batch_size


class ImageLoader:
    """DALI-decoded, dalimix-finished image batches for PyTorch training and evaluation.

    Yields ``(images, labels)``: ``images`` is ``N x 3 x H x W`` of ``dtype`` (NCHW, or the same
    shape in channels_last memory order), normalised with ``mean``/``std`` (0..1 scale);
    ``labels`` is ``N`` int64. With ``mix=...`` it yields ``(images, targets)`` as the mixer says.

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
        size: output size, ``int`` or ``(height, width)``.
        device: ``"cuda"``/``"cuda:N"`` (nvJPEG decoding, GPU ops, CUDA kernel), ``"cpu"`` (DALI
            CPU-only mode, the kernel compiled for the CPU); default CUDA when available.
        dtype: torch.float32, torch.float16 or torch.bfloat16 (strings like "bf16" accepted).
        channels_last: write channels_last memory order.
        mean, std: per-channel normalisation on the 0..1 scale (ImageNet's by default).
        scale, ratio: random resized crop area fraction and aspect range (torchvision's defaults).
        hflip: probability of a horizontal flip (train).
        crop_pct: eval centre crop fraction; the shorter side is resized to floor(max(H, W) / crop_pct).
        interpolation: "bilinear" (default), "bicubic", "nearest" or "triangular" (antialiased).
        shuffle: reshuffle every epoch (default: ``train``).
        seed: the seed of every random stream (order, DALI augmentation, mixing, erasing); the same
            on all ranks (per-rank streams are derived from it). None (default): the script's seed,
            ``dalimix.rng.script_seed()`` (from ``torch.manual_seed``; rank 0's under torch.distributed).
        shard_id, num_shards: this rank and the number of ranks; default from torch.distributed
            when it is initialised, else 0 and 1.
        last_batch_policy: DROP, PARTIAL (default) or FILL; see ``LastBatchPolicy``.
        num_threads: DALI worker threads (default: the CPU cores this process may use).
        prefetch: batches DALI prepares ahead (default 2).
        mix: a mixer from ``dalimix.mix`` (or None for plain labels).
        auto_augment: train only: a preset string run by DALI (``"original"``, ``"rand-m9-n2"``,
            ``"trivialaugment"``; see ``dalimix.autoaug``) or a ``dalimix.policy.Policy`` whose
            vector the training loop may replace at any step. Applied after crop and flip, before mixing.
        classes: class names for a file list (default "0", "1", ...).
        on_error: what an unreadable file does. "raise" (default): a ``DecodeError`` naming the
            file(s), the epoch and the step. "skip": the sample is replaced by the next readable
            sample of this rank's epoch order (wrapping around), so batches keep their size and the
            substitute's label comes with it; each file is warned about once, listed in
            ``loader.skipped`` (path -> reason) and kept out of later epochs, and
            ``loader.skip_count`` counts the replaced samples handed out.
        overlap_epochs: open the next epoch's DALI pipeline as soon as the current one has
            scheduled its last batch, so DALI never waits at an epoch boundary (worth it when an
            epoch is a few batches; two pipelines are alive for a moment, and the resident memory
            grows by some tens of MiB over the first epochs before it settles). Default False.
        keep_unmixed: also write each batch unmixed into ``loader.last_batch.unmixed`` (one more
            pass of the fused kernel; a registered mask hook implies it).
        augment: train only: a ``dalimix.augment.Augment`` (timm's vflip, colour jitter, grayscale,
            blur, random interpolation), run by DALI after the flip.
        erasing: train only: a ``dalimix.erase.RandomErasing`` applied to the finished (normalised,
            mixed) batch, as timm's prefetcher does.
    """

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
        overlap_epochs: bool = False,
        keep_unmixed: bool = False,
        augment=None,
        erasing=None,
    ):
        if root is None and file_list is None and webdataset is None and samples is None:
            raise ValueError("give the data: root=<ImageFolder folder>, file_list=<'path label' text file> "
                             "or webdataset=<folder or glob of .tar shards>")
        given = [n for n, v in (("root", root), ("file_list", file_list), ("webdataset", webdataset), ("samples", samples))
                 if v is not None]
        if len(given) > 1 and given != ["root", "file_list"]:
            raise ValueError(f"{' and '.join(given)} given: name the data once (root= goes with file_list= only)")
        self.batch_size = _positive_int("batch_size", batch_size)
        height, width = v.size("size", size, hint=", e.g. 224 or (224, 224)")
        self.dtype = _dtype(dtype)
        self.channels_last = v.flag("channels_last", channels_last)
        self.norm = Normalization(mean, std)
        scale = v.pair("scale", scale, lo=0, hi=1, lo_open=True, hint=" (area fraction of the random crop)")
        ratio = v.pair("ratio", ratio, lo=0, lo_open=True, hint=" (aspect ratio range of the random crop)")
        hflip = v.number("hflip", hflip, lo=0, hi=1, hint=" (probability of a horizontal flip)")
        crop_pct = v.number("crop_pct", crop_pct, lo=0, hi=1, lo_open=True, hint=" (0.875 is the usual eval crop)")
        v.choice("interpolation", interpolation, INTERPOLATIONS)
        self.policy = auto_augment if isinstance(auto_augment, Policy) else None
        preset = None if self.policy is not None else parse_auto_augment(auto_augment)
        self.spec = AugmentSpec(
            train=v.flag("train", train), height=height, width=width, scale=scale, ratio=ratio,
            hflip=hflip, crop_pct=crop_pct, interpolation=interpolation,
            auto_augment=None if preset is None else preset.canonical, extra=_train_only("augment", augment, train),
        )
        self.erasing = _train_only("erasing", erasing, train)
        if (preset is not None or self.policy is not None) and not self.spec.train:
            raise ValueError(f"auto_augment={auto_augment!r} augments training batches: use it with train=True")
        self.seed = rng_mod.script_seed() if seed is None else v.integer("seed", seed, lo=0, hint=" (equal on every rank)")
        self.shuffle = self.spec.train if shuffle is None else v.flag("shuffle", shuffle)
        self.shard_id, self.num_shards = _shards(shard_id, num_shards)
        self.last_batch_policy = LastBatchPolicy.parse(last_batch_policy)
        self.num_threads = default_num_threads() if num_threads is None else _positive_int("num_threads", num_threads)
        self.prefetch = _positive_int("prefetch", prefetch)
        self.on_error = v.choice("on_error", on_error, ON_ERROR)
        self.overlap_epochs = v.flag("overlap_epochs", overlap_epochs)
        self.skipped: dict[str, str] = {}  # unreadable files met so far (on_error="skip"): path -> reason
        self.skip_count = 0  # samples replaced so far in the batches handed out
        self._bad_ids: set[int] = set()
        self.device = resolve_device(device)

        if samples is not None:
            if not isinstance(samples, Samples):
                raise ValueError(f"samples={type(samples).__name__}: a dalimix.sources.Samples (or pass root=/file_list=)")
            self.samples: Samples = samples
        elif webdataset is not None:
            from .webdataset import index_webdataset

            self.samples = index_webdataset(webdataset, keys=webdataset_keys, classes=classes)
        elif file_list is not None:
            self.samples = read_file_list(file_list, root=root, classes=classes)
        else:
            self.samples = scan_image_folder(root)
        if len(self) == 0:
            raise DatasetError(
                f"{self.samples.source}: {len(self.samples)} samples over {self.num_shards} shard(s) make no batch of "
                f"{self.batch_size} under {self.last_batch_policy.name}; use a smaller batch_size or last_batch_policy='partial'"
            )
        self.mix = mix
        if mix is not None and hasattr(mix, "bind"):
            mix.bind(self)
        self.sampler = _EpochSampler(self)
        self.batch_sampler = None
        self.last_batch: BatchInfo | None = None
        self.keep_unmixed = bool(keep_unmixed)
        self._mask_hook = None
        self._epoch = 0
        self._epoch_is_set = False
        self._iterated = False
        self._active: _EpochIterator | None = None
        self._resume = None  # (epoch, step, DALI checkpoint) set by load_state_dict
        self._planner_pool = None
        self._reaper_pool = None
        self._next_iter = None  # the next epoch's iterator, opened ahead of time
        self._policy_stage: PolicyStage | None = None

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
            len(self.samples), batch_size=self.batch_size, epoch=epoch, seed=self.seed, shuffle=self.shuffle,
            shard_id=self.shard_id, num_shards=self.num_shards, policy=self.last_batch_policy,
        )

    def __iter__(self) -> "_EpochIterator":
        active = self._active
        if active is not None:
            active.close()
        if self._iterated and not self._epoch_is_set:
            self._epoch += 1
            if self.mix is not None and hasattr(self.mix, "set_epoch"):
                self.mix.set_epoch(self._epoch)
        self._iterated = True
        self._epoch_is_set = False
        start, checkpoint = 0, None
        if self._resume is not None and self._resume[0] == self._epoch:
            _, start, checkpoint = self._resume
        self._resume = None
        it, self._next_iter = self._next_iter, None
        if it is None or start or it.plan.epoch != self._epoch:
            if it is not None:
                it.close(retire=True)
            it = _EpochIterator(self, self.plan(self._epoch), start_step=start, checkpoint=checkpoint)
        self._active = it
        return it

    def _prepare_next(self, epoch: int) -> None:
        """Build epoch ``epoch``'s pipeline and let DALI start on it while the current epoch drains
        (the epoch after this one is the usual next request); ``__iter__`` adopts it if it is."""
        if self._next_iter is None:
            plan = self.plan(epoch)
            if plan.num_batches:
                it = _EpochIterator(self, plan)
                it._open(plan_ahead=False)  # the mixer learns its epoch at set_epoch: plan the first batch then
                self._next_iter = it

    def state_dict(self) -> dict:
        """Where this rank's loader stands: epoch, next step, DALI's checkpoint and what must match on
        resume. Save it with ``torch.save``; see ``dalimix.resume``."""
        from .resume import loader_state

        return loader_state(self)

    def load_state_dict(self, state) -> None:
        """Continue exactly where ``state`` (from ``state_dict()``, or a list of every rank's) left
        off: the next batch is the one the interrupted run would have yielded next. Raises
        ValueError when the state is from another data set, batch size, seed, shard or pipeline."""
        from .resume import restore_loader_state

        restore_loader_state(self, state)

    def close(self, *, wait: bool = True) -> None:
        """Stop DALI's threads and the planner thread now (also happens when the loader is garbage collected)."""
        active = self._active
        if active is not None:
            active.close()
            self._active = None
        nxt, self._next_iter = getattr(self, "_next_iter", None), None
        if nxt is not None:
            nxt.close()
        for name in ("_planner_pool", "_reaper_pool"):
            pool = getattr(self, name, None)
            if pool is not None:
                pool.shutdown(wait=wait, cancel_futures=name == "_planner_pool")
                setattr(self, name, None)
        if self._policy_stage is not None:
            self._policy_stage.close()
            self._policy_stage = None

    def _thread(self, attr: str):
        """The loader's own single-thread executor ``attr`` ("_planner_pool", "_reaper_pool"), made on first use."""
        pool = getattr(self, attr)
        if pool is None:
            from concurrent.futures import ThreadPoolExecutor

            pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="dalimix-" + attr[1:].split("_")[0])
            setattr(self, attr, pool)
        return pool

    def _retire(self, pipe) -> None:
        """Shut a finished epoch's DALI pipeline down on a background thread (the last reference
        goes with the work item, so DALI's shutdown runs there)."""
        self._thread("_reaper_pool").submit(_drop, pipe)

    def _planner(self):
        return self._thread("_planner_pool")

    def __del__(self):
        # The cyclic GC may run this on any thread, even one that is starting up inside Python's
        # threading internals: joining the planner thread there deadlocks, so do not wait for it.
        try:
            self.close(wait=False)
        except Exception:
            pass

    # ------------------------------------------------------------------------- mask hook
    def set_mask_hook(self, fn, *, interpolation: str = "nearest", logits: bool = False, target_lam: str = "mask",
                      validate: str = "eager") -> None:
        """Let ``fn(images, lam, partner) -> masks`` supply the masks of ``LearnedMask`` samples, for
        the very batch being mixed (see ``dalimix.hook`` and the README's mask hook section)."""
        self._mask_hook = make_stage(self, fn, interpolation=interpolation, logits=logits, target_lam=target_lam,
                                     validate=validate)

    def remove_mask_hook(self) -> None:
        """Stop calling the hook (a pending deferred check is resolved first)."""
        hook, self._mask_hook = self._mask_hook, None
        if hook is not None:
            hook.resolve_pending()

    # ------------------------------------------------------------------------ bad files
    def _substitute(self, order: np.ndarray) -> np.ndarray:
        """``order`` with every known-unreadable sample replaced by the next readable one after it
        (cyclically); unchanged when nothing is known bad."""
        if not self._bad_ids:
            return order
        bad = np.isin(order, np.fromiter(self._bad_ids, dtype=np.int64))
        if bad.all():
            raise DecodeError(f"every sample of this rank's epoch is unreadable ({len(self.skipped)} files skipped so far); "
                              "check the data with `dalimix scan`", files=list(self.skipped.items()))
        good_pos = np.flatnonzero(~bad)
        # for each position, the first readable position at or after it, wrapping to the start
        nxt = np.searchsorted(good_pos, np.arange(len(order)))
        nxt = np.where(nxt < len(good_pos), good_pos[nxt % len(good_pos)], good_pos[0])
        return order[nxt]

    def _mark_bad(self, found: list[tuple[int, str]], epoch: int, step: int) -> None:
        import warnings

        from .errors import DalimixWarning

        for i, reason in found:
            path = self.samples.paths[i]
            self._bad_ids.add(int(i))
            if path not in self.skipped:
                self.skipped[path] = reason
                warnings.warn(f"dalimix: skipping {path}: {reason} (epoch {epoch}, step {step}); it is replaced by the "
                              "next readable sample of the epoch from now on", DalimixWarning, stacklevel=3)

    # ------------------------------------------------------------------------- one batch
    def _plan_mix(self, n: int, epoch: int, step: int):
        """Mix parameters of batch ``step`` (``n`` samples): a function of (seed, rank, epoch, step) only."""
        return plan_batch(self.mix, self.seed, self.shard_id, self.spec.height, self.spec.width, n, epoch, step)

    def _apply_policy(self, images_u8: torch.Tensor, epoch: int, step: int):
        """Batch ``step``'s policy draws, made now from the vector current now, applied by the policy stage."""
        if self._policy_stage is None:
            self._policy_stage = PolicyStage(self.policy, device=self.device, batch_size=self.batch_size,
                                             num_threads=self.num_threads, height=self.spec.height,
                                             width=self.spec.width)
        rng = rng_mod.generator(self.seed, rng_mod.POLICY, self.shard_id, epoch, step)
        return self._policy_stage.apply(images_u8, rng)

    def _finish(self, images_u8: torch.Tensor, sample_ids: np.ndarray, epoch: int, step: int, planned=None,
                extra=None):
        """uint8 batch (N_src x H x W x 3) -> (images, labels or targets)."""
        n = len(sample_ids)
        labels_np = self.samples.labels[sample_ids]
        labels = torch.from_numpy(labels_np)
        if self.device.type == "cuda":
            labels = labels.pin_memory().to(self.device, non_blocking=True)
        params = None
        records = identity_records(n)
        masks = None
        unmixed = None
        if self.keep_unmixed or self._mask_hook is not None:
            unmixed = mix_normalize(images_u8, records, None, norm=self.norm, dtype=self.dtype,
                                    channels_last=self.channels_last)
        if self.mix is not None:
            params, records = planned if planned is not None else self._plan_mix(n, epoch, step)
            if self._mask_hook is not None:
                records, masks = self._mask_hook.prepare(unmixed, params, epoch=epoch, step=step)
            else:
                require_hook(params)
                masks = params.mask_pool(self.device)
        out = allocate_output(n, self.spec.height, self.spec.width, dtype=self.dtype,
                              channels_last=self.channels_last, device=self.device)
        images = mix_normalize(images_u8, records, masks, norm=self.norm, dtype=self.dtype,
                               channels_last=self.channels_last, out=out)
        if self.erasing is not None:
            self.erasing(images, rng_mod.generator(self.seed, rng_mod.ERASE, self.shard_id, epoch, step))
        self.last_batch = BatchInfo(epoch=epoch, step=step, sample_ids=sample_ids, params=params, labels=labels,
                                    unmixed=unmixed, extra=extra or {})
        if self.mix is not None:
            # a mixer's own num_classes wins (bind() checked it covers the data set's classes)
            return images, self.mix.targets(labels, params, num_classes=getattr(self.mix, "num_classes", None)
                                            or self.num_classes)
        return images, labels


def _drop(obj) -> None:
    """Run on the reaper thread: the work item holds the last reference to ``obj``."""


def plan_batch(mix, seed: int, shard_id: int, height: int, width: int, n: int, epoch: int, step: int):
    """(MixParams, records) of one batch. A free function: the planner thread holds no loader."""
    if mix is None:
        return None
    rng = rng_mod.generator(seed, rng_mod.MIX, shard_id, epoch, step)
    params = mix.plan(n, rng=rng, height=height, width=width)
    return params, params.records()


class _EpochIterator:
    """Iterates one epoch: owns that epoch's DALI pipeline and releases DALI's buffers in order."""

    def __init__(self, loader: ImageLoader, plan: EpochPlan, start_step: int = 0, checkpoint=None):
        self.loader = loader
        self.plan = plan
        self.step = start_step
        self._start = start_step
        self._checkpoint = checkpoint  # DALI's state after batch start_step - 1 (None: replay)
        self._pipe = None
        self._scheduled = 0
        self._held = None  # (DALI outputs, CUDA event) of the previous batch, GPU only
        self._planned = None  # (step, future) of the next batch's mix parameters
        self._order = plan.order  # what DALI reads: the plan with known-unreadable samples replaced
        self._good_checkpoint = checkpoint  # on_error="skip": DALI's state after the last good batch

    def __iter__(self):
        return self

    def __len__(self) -> int:
        return self.plan.num_batches - self.step

    def _open(self, plan_ahead: bool = True) -> None:
        ld = self.loader
        ids = self._order = ld._substitute(self.plan.order)
        reader = getattr(ld.samples, "dali_reader", None)
        self._pipe = build_pipeline(
            [ld.samples.paths[i] for i in ids], [int(i) for i in ids],
            spec=ld.spec, device=ld.device, batch_size=ld.batch_size, num_threads=ld.num_threads,
            seed=rng_mod.derive_seed(ld.seed, rng_mod.DALI, ld.shard_id, self.plan.epoch), prefetch=ld.prefetch,
            reader=None if reader is None else reader(ids, ld.batch_size), checkpoint=self._checkpoint,
        )
        if self._start and self._checkpoint is None:
            from .resume import replay

            replay(self._pipe, self._start, prefetch=ld.prefetch)
        self._scheduled = self._start
        self._schedule()
        if plan_ahead:
            self._plan_ahead(self._start)

    def _schedule(self) -> None:
        while self._scheduled < self.plan.num_batches and self._scheduled - self.step < self.loader.prefetch:
            self._pipe.schedule_run()
            self._scheduled += 1
        if self._scheduled == self.plan.num_batches and self.loader.overlap_epochs and self.loader._active is self:
            self.loader._prepare_next(self.plan.epoch + 1)

    def dali_checkpoint(self):
        """DALI's serialized state after the last batch this iterator yielded (None before any)."""
        if self._pipe is not None:
            return self._pipe.checkpoint()
        return self._checkpoint

    def _release_held(self) -> None:
        if self._held is not None:
            _, event = self._held
            event.synchronize()  # our kernel has finished reading DALI's buffer
            self._held = None
            self._pipe.release_outputs()

    def __next__(self):
        if self.step >= self.plan.num_batches:
            self.close()
            raise StopIteration
        ld = self.loader
        if self._pipe is None:
            self._open()
        self._release_held()
        self._schedule()
        outputs = self._share_outputs()
        images_tl, ids_tl = outputs
        ids = np.asarray(ids_tl.as_tensor()).reshape(-1).astype(np.int64)
        valid = int(self.plan.valid[self.step])
        images_u8 = torch.from_dlpack(images_tl.as_tensor())
        planned = self._take_plan()
        self._plan_ahead(self.step + 1)
        try:
            extra = {}
            if ld.policy is not None:  # drawn now, from the vector current now (see dalimix.policy)
                images_u8, draws = ld._apply_policy(images_u8, self.plan.epoch, self.step)
                extra["policy"] = draws.take(valid)
            result = ld._finish(images_u8, ids[:valid], self.plan.epoch, self.step, planned, extra)
        finally:  # a batch whose finishing fails (e.g. a mask hook error) is skipped; the next one works
            if ld.device.type == "cuda":
                event = torch.cuda.Event()
                event.record(torch.cuda.current_stream(ld.device))
                self._held = (outputs, event)
            else:
                self._pipe.release_outputs()
            if ld._bad_ids:
                b = ld.batch_size
                ld.skip_count += int(np.isin(self.plan.order[self.step * b:self.step * b + valid],
                                             np.fromiter(ld._bad_ids, dtype=np.int64)).sum())
            self.step += 1
            if ld.on_error == "skip" and self._pipe is not None and self.step < self.plan.num_batches:
                self._good_checkpoint = self._pipe.checkpoint()
            if self.step >= self.plan.num_batches:
                self.close(retire=True)
        return result

    def _share_outputs(self):
        """DALI's outputs for ``self.step``; under on_error="skip", unreadable files are found,
        replaced, and the epoch's pipeline is rebuilt at this step from DALI's last good state."""
        while True:
            try:
                return self._pipe.share_outputs()
            except RuntimeError as e:
                found = self._find_unreadable()
                if self.loader.on_error != "skip" or not found:
                    err = self._decode_error(e, found)
                    self.close()
                    raise err from e
                self.loader._mark_bad(found, self.plan.epoch, self.step)
                self._restart_here()

    def _restart_here(self) -> None:
        self._pipe = None  # the failed pipeline is dropped, its threads with it
        self._held = None
        self._start, self._checkpoint = self.step, self._good_checkpoint
        planned = self._planned
        self._open()
        if planned is not None and planned[0] == self.step:
            self._planned = planned  # the mix parameters of this step stay what they were

    def _in_flight(self) -> list[int]:
        b = self.loader.batch_size
        ids = self._order[self.step * b: max(self._scheduled, self.step + 1) * b]
        return list(dict.fromkeys(int(i) for i in ids))

    def _take_plan(self):
        if self._planned is not None and self._planned[0] == self.step:
            return self._planned[1].result()
        return None

    def _plan_ahead(self, step: int) -> None:
        """Sample the next batch's mix parameters on the loader's planner thread (FMix masks and
        the like cost milliseconds; numpy and torch release the GIL while they work)."""
        self._planned = None
        ld = self.loader
        if ld.mix is None or step >= self.plan.num_batches:
            return
        n = int(self.plan.valid[step])
        self._planned = (step, ld._planner().submit(plan_batch, ld.mix, ld.seed, ld.shard_id, ld.spec.height,
                                                    ld.spec.width, n, self.plan.epoch, step))

    def _find_unreadable(self) -> list[tuple[int, str]]:
        """The samples of the batches in flight that do not decode: PIL first; if PIL reads them
        all, DALI's own CPU decoder one file at a time."""
        samples = self.loader.samples
        ids = self._in_flight()
        found = [(i, r) for i in ids if (r := samples.check_image(i))]
        if not found:
            from .diagnose import dali_decode_error

            found = [(i, r) for i in ids if (r := dali_decode_error(samples.read_bytes(i)))]
        return found

    def _decode_error(self, exc: Exception, found: list[tuple[int, str]]) -> DecodeError:
        """A DecodeError naming the files behind a DALI failure, the epoch and the step."""
        ld = self.loader
        suspects = [(ld.samples.paths[i], r) for i, r in found]
        where = f"epoch {self.plan.epoch}, step {self.step}"
        if suspects:
            listing = "; ".join(f"{p} {r}" for p, r in suspects[:10])
            more = f" (and {len(suspects) - 10} more)" if len(suspects) > 10 else ""
            msg = (f"could not decode {len(suspects)} file(s) at {where}: {listing}{more}. Remove or replace them, "
                   "list the good files with `dalimix scan DIR --fix-list OUT`, or pass on_error='skip'")
        else:
            ids = self._in_flight()
            first = str(exc).strip().splitlines()
            detail = next((line for line in first if "rror" in line), first[0] if first else "")
            paths = [ld.samples.paths[i] for i in ids[:3]]
            msg = (f"DALI failed at {where} on one of the files {paths}{' ...' if len(ids) > 3 else ''} "
                   f"({detail.strip()}); PIL and DALI's CPU decoder read each of them alone")
        return DecodeError(msg, files=suspects, epoch=self.plan.epoch, step=self.step)

    def close(self, *, retire: bool = False) -> None:
        """Release DALI's buffers and threads. ``retire``: hand the pipeline to the loader's reaper
        thread (an epoch's end: DALI's shutdown takes ~0.1 s, which the next epoch need not wait for)."""
        if self._pipe is not None:
            if self._held is not None:
                self._held[1].synchronize()
                self._held = None
            pipe, self._pipe = self._pipe, None
            if retire:
                self.loader._retire(pipe)
            del pipe


def _train_only(name: str, value, train):
    """``augment=`` / ``erasing=``: the right type, and training loaders only."""
    if value is None:
        return None
    from .augment import Augment
    from .erase import RandomErasing

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
        from .distributed import rank_and_world

        return rank_and_world() or (0, 1)
    if shard_id is None or num_shards is None:
        raise ValueError("give both shard_id and num_shards (or neither, to take them from torch.distributed)")
    num_shards = _positive_int("num_shards", num_shards)
    return v.integer("shard_id", shard_id, lo=0, hi=num_shards - 1, hint=f" (num_shards={num_shards})"), num_shards

