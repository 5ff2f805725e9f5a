"""Augmentation policies the training loop can change at any step.

A policy is a list of sub-policies and a probability vector over them. A sub-policy is a short
sequence of ``(operation, probability, magnitude bin)`` steps — the form of AutoAugment (Cubuk et
al., "AutoAugment: Learning Augmentation Strategies from Data", CVPR 2019) — and the vector over
sub-policies is what AWS Auto-Aug searches (Tian et al., "Improving Auto-Augment via
Augmentation-Wise Weight Sharing", NeurIPS 2020). The operations are DALI's
(``nvidia.dali.auto_aug``): they run on the loader's device, on uint8 ``H x W x 3`` images after
the random resized crop, before the fused mix kernel (which also applies the flip).

Timing: the sub-policies of batch ``t`` are drawn inside the ``next()`` call that returns batch
``t``, from the vector current when that call reaches the policy stage; so a vector set with
``policy.set_probs(v)`` after batch ``t - 1`` was returned is the one batch ``t`` uses, and every
batch after it until the next ``set_probs``. DALI prefetches decoding and cropping as
usual; the policy runs in a second DALI pipeline that is fed one batch at a time and is never run
ahead. Every random choice of the policy (sub-policy, whether each step runs, the sign of each
magnitude) is drawn on the host from ``(seed, POLICY, rank, epoch, step)`` and reported in
``loader.last_batch.extra["policy"]`` (a ``PolicyBatch``).
"""

from __future__ import annotations

import threading
from dataclasses import dataclass

import numpy as np
import torch

# Operations by name: DALI's suite with the ranges of DALI's AutoAugment ImageNet policy (shear
# 0.3, rotate 30 degrees, enhance factors 0.1..1.9, posterize, solarize, solarize_add), translations
# relative to the image side (timm's 0.45), and horizontal / vertical flips.
MAGNITUDE_OPERATIONS = (
    "shear_x",
    "shear_y",
    "translate_x",
    "translate_y",
    "rotate",
    "brightness",
    "contrast",
    "color",
    "sharpness",
    "posterize",
    "solarize",
    "solarize_add",
)
PLAIN_OPERATIONS = ("identity", "invert", "equalize", "auto_contrast", "hflip", "vflip")
OPERATIONS = MAGNITUDE_OPERATIONS + PLAIN_OPERATIONS
PROB_TOLERANCE = 1e-4  # |sum(probs) - 1| allowed by set_probs


def _suite(max_translate_rel: float) -> dict:
    """Name -> DALI ``Augmentation`` (built on demand: importing DALI's auto_aug costs a little)."""
    from nvidia.dali import fn
    from nvidia.dali.auto_aug import augmentations as a
    from nvidia.dali.auto_aug.core import augmentation

    @augmentation
    def hflip(data, _):
        return fn.flip(data, horizontal=1)

    @augmentation
    def vflip(data, _):
        return fn.flip(data, vertical=1, horizontal=0)

    return {
        "shear_x": a.shear_x.augmentation((0, 0.3), True),
        "shear_y": a.shear_y.augmentation((0, 0.3), True),
        "translate_x": a.translate_x.augmentation((0, max_translate_rel), True),
        "translate_y": a.translate_y.augmentation((0, max_translate_rel), True),
        "rotate": a.rotate.augmentation((0, 30), True),
        "brightness": a.brightness.augmentation((0.1, 1.9), False, None),
        "contrast": a.contrast.augmentation((0.1, 1.9), False, None),
        "color": a.color.augmentation((0.1, 1.9), False, None),
        "sharpness": a.sharpness.augmentation((0.1, 1.9), False, a.sharpness_kernel_shifted),
        "posterize": a.posterize.augmentation((0, 4), False, a.poster_mask_uint8),
        "solarize": a.solarize.augmentation((0, 256), False),
        "solarize_add": a.solarize_add.augmentation((0, 110), False),
        "identity": a.identity,
        "invert": a.invert,
        "equalize": a.equalize,
        "auto_contrast": a.auto_contrast,
        "hflip": hflip,
        "vflip": vflip,
    }


def _is_dali_augmentation(op) -> bool:
    try:
        from nvidia.dali.auto_aug.core import _Augmentation
    except ImportError:  # pragma: no cover - DALI is a dependency
        return False
    return isinstance(op, _Augmentation)


@dataclass
class PolicyBatch:
    """The policy's draws for one batch of ``N`` samples with sub-policies of at most ``L`` steps.

    Attributes:
        sub_policy: N int64, the sub-policy each sample got.
        applied: N x L bool, whether each step of its sub-policy ran (steps past the sub-policy's
            length are False).
        negated: N x L bool, whether the step's magnitude was negated (only operations that negate
            at random use it: shear, translate, rotate).
        probs: the K float64 vector the draw used.
        version: how many ``set_probs`` calls that vector had seen (0 = the initial vector).
        stage_ops, magnitude: N x L int32, what the DALI stage receives (operation index in the
            step's list, magnitude bin).
    """

    sub_policy: np.ndarray
    applied: np.ndarray
    negated: np.ndarray
    probs: np.ndarray
    version: int
    stage_ops: np.ndarray
    magnitude: np.ndarray

    def __len__(self) -> int:
        return len(self.sub_policy)

    def take(self, n: int) -> PolicyBatch:
        """The first ``n`` samples (the real ones of a partial last batch)."""
        return PolicyBatch(
            self.sub_policy[:n],
            self.applied[:n],
            self.negated[:n],
            self.probs,
            self.version,
            self.stage_ops[:n],
            self.magnitude[:n],
        )

    def counts(self) -> np.ndarray:
        """How many samples got each sub-policy (K int64)."""
        return np.bincount(self.sub_policy, minlength=len(self.probs))


class Policy:
    """A probability vector over sub-policies of DALI operations; the vector can be replaced at any step.

    Args (keyword-only):
        sub_policies: a list of sub-policies, each a non-empty list of ``(operation, probability,
            magnitude)``: ``operation`` one of ``OPERATIONS`` (``"rotate"``, ``"equalize"``,
            ``"hflip"``, ...) or a DALI ``Augmentation`` (``nvidia.dali.auto_aug.augmentations``,
            or your own made with ``@nvidia.dali.auto_aug.core.augmentation``); ``probability``
            in [0, 1] that the step runs; ``magnitude`` a bin in ``[0, num_magnitude_bins)`` for
            operations with a magnitude, ``None`` for the others.
        probs: the initial vector over sub-policies (default uniform); see ``set_probs``.
        num_magnitude_bins: magnitude bins (11: AutoAugment's levels 0..10).
        max_translate_rel: the largest translation, as a fraction of the image side (0.45).
        fill_value: the value of pixels uncovered by shear, translate and rotate (128).

    ``probs`` reads the current vector; ``set_probs(v)`` replaces it for the next batch on (see
    the module docstring for the exact timing). ``Policy.from_dali(p)`` takes a DALI ``Policy``
    (e.g. ``nvidia.dali.auto_aug.auto_augment.get_image_net_policy(use_shape=True)``).
    """

    def __init__(
        self,
        *,
        sub_policies,
        probs=None,
        num_magnitude_bins: int = 11,
        max_translate_rel: float = 0.45,
        fill_value: int = 128,
    ):
        if (
            isinstance(num_magnitude_bins, bool)
            or not isinstance(num_magnitude_bins, (int, np.integer))
            or num_magnitude_bins < 1
        ):
            raise ValueError(
                f"num_magnitude_bins={num_magnitude_bins!r}: a positive int (11 for AutoAugment's levels 0..10)"
            )
        self.num_magnitude_bins = int(num_magnitude_bins)
        if not (0 < float(max_translate_rel) <= 1):
            raise ValueError(f"max_translate_rel={max_translate_rel!r}: a fraction of the image side in (0, 1]")
        self.max_translate_rel = float(max_translate_rel)
        if isinstance(fill_value, bool) or not isinstance(fill_value, (int, np.integer)) or not 0 <= fill_value <= 255:
            raise ValueError(f"fill_value={fill_value!r}: an int in 0..255")
        self.fill_value = int(fill_value)
        self.sub_policies = self._validate(sub_policies)
        self._build_tables()
        self._lock = threading.Lock()
        k = len(self.sub_policies)
        self._probs = torch.full((k,), 1.0 / k, dtype=torch.float64)  # the shared vector
        self._version = 0
        if probs is not None:
            self._probs.copy_(torch.from_numpy(self._checked(probs)))

    @classmethod
    def from_dali(cls, policy, *, probs=None, fill_value: int = 128) -> Policy:
        """A dalimix ``Policy`` with the sub-policies and magnitude bins of a DALI ``Policy``."""
        subs = getattr(policy, "sub_policies", None)
        if subs is None or not hasattr(policy, "num_magnitude_bins"):
            raise ValueError(
                f"Policy.from_dali({policy!r}): a nvidia.dali.auto_aug.core.Policy, e.g. "
                "auto_augment.get_image_net_policy(use_shape=True)"
            )
        return cls(
            sub_policies=[list(s) for s in subs],
            probs=probs,
            num_magnitude_bins=policy.num_magnitude_bins,
            fill_value=fill_value,
        )

    # ---------------------------------------------------------------------------- validation
    def _validate(self, sub_policies) -> tuple:
        try:
            subs = [list(s) for s in sub_policies]
        except TypeError:
            raise ValueError(
                f"sub_policies={sub_policies!r}: a list of sub-policies, each a list of "
                "(operation, probability, magnitude)"
            ) from None
        if not subs:
            raise ValueError("sub_policies is empty: give at least one sub-policy, e.g. [[('identity', 1.0, None)]]")
        out = []
        for k, sub in enumerate(subs):
            if not sub:
                raise ValueError(f"sub_policies[{k}] is empty: give at least one (operation, probability, magnitude)")
            steps = []
            for j, step in enumerate(sub):
                where = f"sub_policies[{k}][{j}]={step!r}"
                if not isinstance(step, (tuple, list)) or len(step) != 3:
                    raise ValueError(f"{where}: each step is (operation, probability, magnitude)")
                op, p, mag = step
                if isinstance(op, str):
                    if op not in OPERATIONS:
                        raise ValueError(
                            f"{where}: unknown operation {op!r}; use one of {', '.join(OPERATIONS)} "
                            "or a DALI Augmentation"
                        )
                    has_magnitude = op in MAGNITUDE_OPERATIONS
                elif _is_dali_augmentation(op):
                    has_magnitude = op.mag_range is not None
                    if isinstance(op.mag_range, np.ndarray) and len(op.mag_range) != self.num_magnitude_bins:
                        raise ValueError(
                            f"{where}: {op.name} lists {len(op.mag_range)} magnitudes but "
                            f"num_magnitude_bins={self.num_magnitude_bins}"
                        )
                else:
                    raise ValueError(
                        f"{where}: the operation must be a name ({', '.join(OPERATIONS)}) or a DALI "
                        "Augmentation (made with @nvidia.dali.auto_aug.core.augmentation)"
                    )
                if isinstance(p, bool) or not isinstance(p, (int, float, np.floating, np.integer)) or not 0 <= p <= 1:
                    raise ValueError(f"{where}: the probability must be a number in [0, 1]")
                if has_magnitude:
                    if (
                        isinstance(mag, bool)
                        or not isinstance(mag, (int, np.integer))
                        or not 0 <= mag < self.num_magnitude_bins
                    ):
                        raise ValueError(
                            f"{where}: this operation needs a magnitude bin, an int in [0, {self.num_magnitude_bins})"
                        )
                    mag = int(mag)
                elif mag is not None:
                    raise ValueError(f"{where}: this operation takes no magnitude; use None")
                steps.append((op, float(p), mag))
            out.append(tuple(steps))
        return tuple(out)

    def _build_tables(self) -> None:
        """Per step position: the distinct operations used there (plus identity), and per
        sub-policy the index of its operation, its probability and its magnitude bin."""
        k = len(self.sub_policies)
        length = max(len(s) for s in self.sub_policies)
        self._stage_keys: list[list] = []
        self._op_index: np.ndarray = np.zeros((k, length), dtype=np.int32)
        self._step_prob: np.ndarray = np.zeros((k, length), dtype=np.float64)
        self._magnitude: np.ndarray = np.zeros((k, length), dtype=np.int32)
        self._identity: np.ndarray = np.zeros(length, dtype=np.int32)
        for s in range(length):
            keys: list = []
            for sub in self.sub_policies:
                if s < len(sub) and not any(sub[s][0] is key or sub[s][0] == key for key in keys):
                    keys.append(sub[s][0])
            if "identity" not in keys:
                keys.append("identity")
            self._identity[s] = keys.index("identity")
            for i, sub in enumerate(self.sub_policies):
                if s < len(sub):
                    op, p, mag = sub[s]
                    self._op_index[i, s] = next(j for j, key in enumerate(keys) if key is op or key == op)
                    self._step_prob[i, s] = p
                    self._magnitude[i, s] = 0 if mag is None else mag
                else:
                    self._op_index[i, s] = self._identity[s]
            self._stage_keys.append(keys)

    def _checked(self, vec) -> np.ndarray:
        """``vec`` as a float64 numpy vector that sums to 1, or ValueError (nothing is changed)."""
        k = len(self.sub_policies)
        if isinstance(vec, torch.Tensor):
            vec = vec.detach().to("cpu", torch.float64).numpy()
        try:
            arr = np.asarray(vec, dtype=np.float64)
        except (TypeError, ValueError):
            raise ValueError(
                f"probs={vec!r}: {k} numbers (a list, numpy array or torch tensor); "
                "the policy keeps its previous vector"
            ) from None
        if arr.shape != (k,):
            raise ValueError(
                f"probs has shape {tuple(arr.shape)}: the policy has {k} sub-policies, give a vector of "
                f"{k} probabilities; the policy keeps its previous vector"
            )
        if not np.isfinite(arr).all():
            bad = np.flatnonzero(~np.isfinite(arr)).tolist()
            raise ValueError(f"probs has NaN or infinite entries at {bad}; the policy keeps its previous vector")
        if (arr < 0).any():
            bad = np.flatnonzero(arr < 0).tolist()
            raise ValueError(
                f"probs has negative entries at {bad} ({arr[bad].tolist()}); probabilities are >= 0; "
                "the policy keeps its previous vector"
            )
        total = float(arr.sum())
        if abs(total - 1.0) > PROB_TOLERANCE:
            raise ValueError(
                f"probs sums to {total!r}, not 1 (tolerance {PROB_TOLERANCE}); normalise it, e.g. "
                "torch.softmax(logits, 0); the policy keeps its previous vector"
            )
        return arr / total

    # ---------------------------------------------------------------------------- the vector
    def __len__(self) -> int:
        return len(self.sub_policies)

    @property
    def probs(self) -> torch.Tensor:
        """A copy of the current vector (K float64, CPU)."""
        with self._lock:
            return self._probs.clone()

    @property
    def version(self) -> int:
        """How many times ``set_probs`` replaced the vector."""
        return self._version

    def set_probs(self, probs) -> None:
        """Replace the vector from the next batch on (K non-negative numbers summing to 1 within
        ``PROB_TOLERANCE``; renormalised exactly). A list, numpy array or torch tensor (a CUDA
        tensor is copied to the host). Raises ValueError and keeps the previous vector when
        ``probs`` has the wrong length, NaN or infinite or negative entries, or does not sum to 1."""
        arr = self._checked(probs)
        with self._lock:
            self._probs.copy_(torch.from_numpy(arr))
            self._version += 1

    def describe(self, k: int) -> str:
        """Sub-policy ``k`` as text, e.g. ``rotate(p=0.6, m=8) > equalize(p=1.0)``."""
        parts = []
        for op, p, mag in self.sub_policies[k]:
            name = op if isinstance(op, str) else op.name
            parts.append(f"{name}(p={p:g}" + (f", m={mag})" if mag is not None else ")"))
        return " > ".join(parts)

    def __repr__(self) -> str:
        return f"Policy({len(self)} sub-policies, version {self._version}, probs={np.round(self.probs.numpy(), 4).tolist()})"

    # ---------------------------------------------------------------------------- sampling
    def sample(self, n: int, rng: np.random.Generator) -> PolicyBatch:
        """Draw sub-policies, step coins and signs for ``n`` samples from the current vector."""
        with self._lock:
            probs = self._probs.numpy().copy()
            version = self._version
        cdf = np.cumsum(probs)
        cdf /= cdf[-1]
        cdf[-1] = 1.0
        # a zero-probability sub-policy has a zero-width interval of the cdf: never drawn
        sub = np.minimum(np.searchsorted(cdf, rng.random(n), side="right"), len(probs) - 1).astype(np.int64)
        applied = rng.random((n, self._op_index.shape[1])) < self._step_prob[sub]
        negated = rng.random((n, self._op_index.shape[1])) < 0.5
        stage_ops = np.where(applied, self._op_index[sub], self._identity[None, :]).astype(np.int32)
        return PolicyBatch(
            sub_policy=sub,
            applied=applied,
            negated=negated,
            probs=probs,
            version=version,
            stage_ops=stage_ops,
            magnitude=self._magnitude[sub].copy(),
        )

    def stage_augmentations(self) -> list[list]:
        """Per step position, the DALI ``Augmentation`` objects the stage selects from."""
        suite = _suite(self.max_translate_rel)
        return [[suite[key] if isinstance(key, str) else key for key in keys] for keys in self._stage_keys]


class PolicyStage:
    """The second DALI pipeline: applies a ``Policy``'s draws to one uint8 ``N x H x W x 3`` batch.

    It is fed one batch at a time (``apply``) and never runs ahead, so each batch's sub-policies
    are drawn when the batch is asked for.

    On CUDA it works in stream order, without host synchronisation: DALI copies the input on the
    current stream of the images' device (not of the current device: the loader's device may be
    another one) and binds its output to that stream. A batch's output must stay valid until the
    work queued on that stream by the end of the ``next()`` that used it has run (the fused
    kernel reads it there): at the next ``apply`` an event is recorded on that stream and the
    output is kept until the event has completed (polled, never waited for, unless more than
    ``HELD`` outputs are pending: then the oldest is waited for). On CPU the output stays valid
    until the next ``apply`` or ``close``.
    """

    HELD = 3  # outputs kept at most while the GPU catches up (each N x H x W x 3 bytes)

    def __init__(
        self, policy: Policy, *, device: torch.device, batch_size: int, num_threads: int, height: int, width: int
    ):
        from nvidia.dali import fn, pipeline_def, types
        from nvidia.dali.auto_aug.core import select, signed_bin

        from ._quiet import dali_alias_warnings_silenced
        from .pipeline import device_strings

        self.policy = policy
        dev = device_strings(device)
        stage_ops = policy.stage_augmentations()
        bins = policy.num_magnitude_bins
        op_kwargs = dict(shape=(height, width), fill_value=policy.fill_value)
        # DALI prunes inputs nobody reads: feed magnitudes and signs only where an operation uses them
        scaled = [aug for augs in stage_ops for aug in augs if aug.mag_range is not None]
        self._feeds_magnitude = bool(scaled)
        self._feeds_sign = any(aug.randomly_negate for aug in scaled)

        @pipeline_def(
            batch_size=batch_size,
            num_threads=num_threads,
            device_id=dev.device_id,
            seed=0,
            prefetch_queue_depth=1,
            enable_conditionals=True,
        )
        def stage():
            images = fn.external_source(name="images", device=dev.ops, layout="HWC", dtype=types.UINT8)
            ops = fn.external_source(name="ops", dtype=types.INT32)
            mags = fn.external_source(name="mags", dtype=types.INT32) if self._feeds_magnitude else None
            signs = fn.external_source(name="signs", dtype=types.INT32) if self._feeds_sign else None
            for s, augmentations in enumerate(stage_ops):
                magnitude = None
                if mags is not None:
                    magnitude = signed_bin(mags[s], random_sign=signs[s]) if signs is not None else mags[s]
                images = select(
                    augmentations, ops[s], data=images, magnitude_bin=magnitude, num_magnitude_bins=bins, **op_kwargs
                )
            return images

        with dali_alias_warnings_silenced():  # DALI's augmentations use aliases DALI deprecates
            self._pipe = stage()
        self._pipe.build()
        self._holding = False
        self._last: tuple | None = None  # (DALI output, the stream it is bound to) of the previous batch, CUDA
        self._held: list = []  # [(DALI output, event)] released once the event has completed

    def apply(self, images_u8: torch.Tensor, rng: np.random.Generator) -> tuple[torch.Tensor, PolicyBatch]:
        """Draw the policy for this batch now and apply it: (augmented N x H x W x 3 uint8, draws)."""
        self.release()
        batch = self.policy.sample(images_u8.shape[0], rng)
        pipe = self._pipe
        cuda = images_u8.is_cuda
        # CUDA: the stream of the images' device, where the loader's kernels run; CPU: a numpy view
        stream = torch.cuda.current_stream(images_u8.device) if cuda else None
        if cuda:
            pipe.feed_input("images", images_u8, layout="HWC", cuda_stream=stream)
        else:
            pipe.feed_input("images", images_u8.numpy(), layout="HWC")
        pipe.feed_input("ops", batch.stage_ops)
        if self._feeds_magnitude:
            pipe.feed_input("mags", batch.magnitude)
        if self._feeds_sign:
            pipe.feed_input("signs", batch.negated.astype(np.int32))
        pipe.schedule_run()
        # bound to the consumer's stream: ready there, no host wait (None: synchronised with the host)
        (out,) = pipe.share_outputs(cuda_stream=stream) if cuda else pipe.share_outputs()
        self._holding = True
        if cuda:
            self._last = (out, stream)
        return torch.from_dlpack(out.as_tensor()), batch

    def release(self) -> None:
        """Hand the previous batch's output back to DALI: at once on CPU; on CUDA once the work
        queued until now on its stream (its consumers) has run."""
        if self._last is not None:
            out, stream = self._last
            self._last = None
            event = torch.cuda.Event()
            event.record(stream)
            self._held.append((out, event))
        self._held = [(out, event) for out, event in self._held if not event.query()]
        while len(self._held) > self.HELD:
            self._held.pop(0)[1].synchronize()  # the GPU is more than HELD batches behind
        if self._holding:
            self._holding = False
            self._pipe.release_outputs()

    def close(self) -> None:
        for _, event in self._held:
            event.synchronize()
        if self._last is not None:
            self._last[1].synchronize()
        self._held = []
        self._last = None
        self._holding = False
        self._pipe = None
