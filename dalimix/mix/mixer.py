"""Mixers: choose methods and lams per batch, pair or element, and build targets.

``Mixer`` takes any set of methods with probabilities. ``Mixup`` takes timm's ``Mixup``
arguments (``mixup_alpha, cutmix_alpha, cutmix_minmax, prob, switch_prob, mode, correct_lam,
label_smoothing, num_classes``) so a timm training script changes one line.

Whatever the mode and the mixture, a batch is ONE kernel launch: the mixer only fills the
per-sample parameter array (``MixParams``), and "elem" mode costs the kernel what "batch" costs.

Pairing: ``flip`` by default (i <-> n-1-i, timm's ``x.flip(0)``): it is what timm does, so
results match timm's Mixup for the same parameters, and it is an involution, which "pair" mode
needs (both samples of a pair share one lam and one geometry). ``roll`` is torchvision's pairing,
``derangement`` a random partner that is never the sample itself (and never a sample whose partner
it is: no two samples mix the same two images). A method with its own ``pairing`` (SamplePairing)
draws the partners of the samples it mixes itself. With flip, the middle sample
of an odd batch (and the only sample of a batch of 1) is paired with itself: mixing it is a no-op
and its target is its own label.
"""

from __future__ import annotations

import numpy as np
import torch

from .. import validate as v
from ..ops import Normalization, allocate_output, mix_normalize
from ..ops.record import METHOD_MASK
from ..ops.staging import to_device
from .methods import CutMix, MixMethod, MixUp
from .params import PAIRINGS, MixParams, pair_indices
from .saliency import MaskPolicy
from .targets import CompactTargets, soft_targets

MODES = ("batch", "pair", "elem")
TARGET_FORMS = ("soft", "compact")


class Mixer:
    """Mixes a batch with one of several methods, chosen with probabilities.

    Args (keyword-only):
        methods: a list of ``MixMethod`` (e.g. ``[MixUp(alpha=0.8), CutMix(alpha=1.0)]``).
        probs: probability of each method (default: uniform); must sum to 1.
        prob: probability that a batch/pair/element is mixed at all (timm's ``prob``).
        mode: "batch" (one lam, method and geometry per batch), "pair" (per pair i, n-1-i) or
            "elem" (per sample) — timm's modes.
        pairing: "flip" (default), "roll" or "derangement" (see the module docstring).
        label_smoothing: timm's smoothing: ``off = eps / C``, ``on = 1 - eps + off``.
        num_classes: C (default: the loader's number of classes).
        targets: "soft" (N x C float32, timm's form) or "compact" (``CompactTargets``: y_a, y_b,
            lam — for ``dalimix.losses.MixCrossEntropy`` when C is large).
    """

    def __init__(
        self,
        *,
        methods,
        probs=None,
        prob: float = 1.0,
        mode: str = "batch",
        pairing: str = "flip",
        label_smoothing: float = 0.0,
        num_classes: int | None = None,
        targets: str = "soft",
    ):
        methods = v.methods(methods)
        self.methods = methods
        self.names = tuple(m.name for m in methods)
        if probs is None:
            probs = np.full(len(methods), 1.0 / len(methods))
        try:
            probs = np.asarray(probs, dtype=np.float64)
        except (TypeError, ValueError):
            probs = np.array([np.nan])
        if (
            probs.shape != (len(methods),)
            or not np.isfinite(probs).all()
            or (probs < 0).any()
            or abs(probs.sum() - 1) > 1e-6
        ):
            listed = probs.tolist()  # once: a host array, at construction
            raise ValueError(f"probs={listed}: {len(methods)} non-negative numbers that sum to 1")
        self.probs = probs / probs.sum()
        self.prob = v.number("prob", prob, lo=0, hi=1, hint=" (the probability of mixing)")
        self.mode = v.choice("mode", mode, MODES)
        self.pairing = v.choice("pairing", pairing, PAIRINGS)
        if mode == "pair" and pairing != "flip":
            raise ValueError("mode='pair' mixes i with n-1-i and back: it needs pairing='flip'")
        for m in methods:
            own = getattr(m, "pairing", None)
            if mode == "pair" and own not in (None, "flip"):
                raise ValueError(
                    f"mode='pair' mixes i with n-1-i and back: {type(m).__name__}(pairing={own!r}) "
                    "cannot choose other partners; use mode='elem' or pairing='flip'"
                )
        self.label_smoothing = v.number("label_smoothing", label_smoothing, lo=0, hi=1, hi_open=True)
        self.num_classes = None if num_classes is None else v.integer("num_classes", num_classes, lo=1)
        self.target_form = v.choice("targets", targets, TARGET_FORMS)
        self.mixup_enabled = True
        if len([m for m in methods if isinstance(m, MaskPolicy)]) > 1:
            raise ValueError(
                "a mixer takes one mask policy (SaliencyMix or AttentiveMix): the loader has one mask hook; "
                "mix two policies in separate loaders or write one hook that does both"
            )
        on_device = [m for m in methods if getattr(m, "device", None) is not None]
        if on_device:
            from ..hook import LearnedMask

            if len(on_device) > 1 or any(isinstance(m, (MaskPolicy, LearnedMask)) for m in methods):
                raise ValueError(
                    "a mixer takes one method with masks on the device (FMix(device=...), LearnedMask, "
                    "SaliencyMix or AttentiveMix): they share the batch's device masks; plan FMix on the host "
                    "(device=None) to combine it with the others"
                )

    def __repr__(self) -> str:
        methods = ", ".join(f"{m!r}: p={p:.2f}" for m, p in zip(self.methods, self.probs))
        return (
            f"{type(self).__name__}([{methods}], prob={self.prob}, mode={self.mode!r}, pairing={self.pairing!r}, "
            f"label_smoothing={self.label_smoothing}, targets={self.target_form!r})"
        )

    # ------------------------------------------------------------------ loader protocol
    def bind(self, loader) -> None:
        """Called by ``ImageLoader``: take C from the data set, check it otherwise; register the mask
        hook of a built-in mask policy (SaliencyMix, AttentiveMix) if the mixer has one."""
        if self.num_classes is None:
            self.num_classes = loader.num_classes
        elif self.num_classes < loader.num_classes:
            raise ValueError(
                f"num_classes={self.num_classes} but the data set has {loader.num_classes} classes "
                f"({type(self).__name__}'s targets could not hold its labels); pass num_classes >= "
                f"{loader.num_classes} (the model's outputs) or None (the data set's)"
            )
        policy = self.mask_policy
        if policy is not None and hasattr(loader, "set_mask_hook"):
            policy.bind(loader)
            loader.set_mask_hook(policy.mask_policy, **policy.hook_options)

    @property
    def mask_policy(self):
        """The mixer's built-in mask policy (a ``MaskPolicy`` method), or None."""
        policies = [m for m in self.methods if isinstance(m, MaskPolicy)]
        return policies[0] if policies else None

    def set_epoch(self, epoch: int) -> None:
        for m in self.methods:
            m.set_epoch(epoch)

    # ------------------------------------------------------------------------ planning
    def plan(self, n: int, *, rng: np.random.Generator, height: int, width: int, partner=None) -> MixParams:
        """Sample the mix parameters of one batch of ``n`` samples (labels play no part, so the
        loader plans the next batch while the current one is in use)."""
        n = int(n)
        p = MixParams.unmixed(n, self.names)
        if not self.mixup_enabled or n == 0:
            return p
        p.partner = pair_indices(n, self.pairing, rng) if partner is None else np.asarray(partner, dtype=np.int64)
        if self.mode == "batch":
            units = [np.arange(n)]
        elif self.mode == "pair":
            units = [np.array([i]) for i in range(n // 2)]
        else:
            units = [np.array([i]) for i in range(n)]
        k = len(units)
        mixed = rng.random(k) < self.prob
        choice = rng.choice(len(self.methods), size=k, p=self.probs)
        for mi, method in enumerate(self.methods):
            sel = np.flatnonzero(mixed & (choice == mi))
            if len(sel) == 0 or not method.active:
                continue
            lam = method.draw_lam(rng, len(sel))
            if self.mode == "batch":
                rows = units[0]
                method.fill(p, rows, np.full(len(rows), lam[0]), rng=rng, height=height, width=width, shared=True)
            else:
                rows = np.concatenate([units[u] for u in sel])
                method.fill(p, rows, lam, rng=rng, height=height, width=width, shared=False)
                if self.mode == "pair":
                    _copy_rows(p, rows, p.partner[rows])
                    rows = np.concatenate([rows, p.partner[rows]])
            own = getattr(method, "pairing", None)
            if partner is None and own is not None and own != self.pairing:
                p.partner[rows] = pair_indices(n, own, rng)[rows]
            p.kind[rows] = mi
        return p

    # ------------------------------------------------------------------------- targets
    def targets(self, labels: torch.Tensor, params: MixParams, num_classes: int | None = None):
        """Soft ``N x C`` targets (timm's rule) or ``CompactTargets``, on ``labels.device``."""
        c = num_classes or self.num_classes
        if c is None:
            raise ValueError("num_classes is unknown: pass num_classes= to the mixer or use it with an ImageLoader")
        staged = params.device_params(labels.device, masks=False)  # one staged copy, or the batch's own
        partner = staged.partner
        lam = params.target_lam_tensor(labels.device, staged)
        if self.target_form == "compact":
            return CompactTargets(labels, labels[partner], lam, self.label_smoothing)
        return soft_targets(labels, partner, lam, c, self.label_smoothing)

    # --------------------------------------------------------- a tensor batch, directly
    def __call__(
        self,
        images: torch.Tensor,
        labels: torch.Tensor,
        *,
        rng=None,
        norm: Normalization | None = None,
        dtype=torch.float32,
        channels_last: bool = False,
        params: MixParams | None = None,
    ):
        """Mix a uint8 ``N x H x W x 3`` batch (CPU or CUDA) outside a loader: ``(images, targets)``.

        ``params`` (from ``plan`` or a method's ``params``) replaces sampling; ``rng`` is a
        ``numpy.random.Generator`` or a seed.
        """
        if images.dim() != 4 or images.shape[-1] != 3 or images.dtype != torch.uint8:
            raise ValueError(f"images must be uint8 N x H x W x 3, got {images.dtype} {tuple(images.shape)}")
        n, h, w, _ = images.shape
        c = self.num_classes
        if c is not None and labels.numel():
            if labels.is_cuda:  # checked on the device: reading the range back would stall the host every batch
                torch._assert_async(
                    ((labels >= 0) & (labels < c)).all(), f"labels must be in [0, {c}) for num_classes={c}"
                )
            elif int(labels.min()) < 0 or int(labels.max()) >= c:
                raise ValueError(
                    f"labels must be in [0, {c}) for num_classes={c}; got [{int(labels.min())}, {int(labels.max())}]"
                )
        if params is None:
            rng = rng if isinstance(rng, np.random.Generator) else np.random.default_rng(rng)
            params = self.plan(n, rng=rng, height=h, width=w)
        out = allocate_output(n, h, w, dtype=dtype, channels_last=channels_last, device=images.device)
        policy = self.mask_policy
        hooked = policy is not None and (params.method == METHOD_MASK).any() and params.device_masks is None
        previous = params.staged
        params.stage(images.device, hook=hooked)  # partner, target lam, host masks (+ the hook's): one copy
        try:
            return self._mix(images, labels, params, out, norm, dtype, channels_last, hooked)
        finally:
            params.staged = previous

    def _mix(self, images, labels, params, out, norm, dtype, channels_last, hooked):
        records, pool = params.records(), None
        policy = self.mask_policy
        if hooked:
            from ..hook import (  # the loader's hook stage, run here for a tensor batch
                MaskHook,
                MaskHookStage,
            )

            unmixed = mix_normalize(images, None, None, norm=norm, dtype=dtype, channels_last=channels_last)
            if policy._norm is None:
                policy._norm = norm or Normalization()
            stage = MaskHookStage(MaskHook(fn=policy.mask_policy, **policy.hook_options), images.device)
            records, pool = stage.prepare(unmixed, params, epoch=0, step=0, labels=labels)
        else:
            pool = params.mask_pool(images.device)
        mixed = mix_normalize(
            images, records, pool, params.device_gather, norm=norm, dtype=dtype, channels_last=channels_last, out=out
        )
        return mixed, self.targets(labels, params, self.num_classes)


def _copy_rows(p: MixParams, src: np.ndarray, dst: np.ndarray) -> None:
    for name in ("method", "lam", "target_lam", "blend", "box", "flags", "ints", "floats"):
        arr = getattr(p, name)
        arr[dst] = arr[src]
    for s, d in zip(src, dst):
        p.masks[d] = p.masks[s]
    if p.device_planned is not None and len(src):  # masks planned on the device (FMix(device=...))
        assert p.device_masks is not None  # device-planned rows always come with device masks
        p.device_planned[dst] = p.device_planned[src]
        src_t, dst_t = to_device([np.asarray(src, np.int64), np.asarray(dst, np.int64)], p.device_masks.device)
        p.device_masks[dst_t] = p.device_masks[src_t]


class Mixup(Mixer):
    """timm's ``Mixup`` arguments, dalimix's fused kernel: MixUp and/or CutMix.

    Same names, defaults and meaning as ``timm.data.Mixup``: ``mixup_alpha`` (MixUp on if > 0),
    ``cutmix_alpha`` (CutMix on if > 0), ``cutmix_minmax`` (CutMix box side range, overrides the
    alpha box, lam corrected), ``prob`` (probability of mixing per batch/pair/element),
    ``switch_prob`` (probability of CutMix when both are on), ``mode`` ("batch", "pair", "elem"),
    ``correct_lam``, ``label_smoothing``, ``num_classes`` (default: the loader's). Set
    ``mixup_enabled = False`` (or ``loader.mixup_enabled = False``) for timm's ``--mixup-off-epoch``.
    """

    def __init__(
        self,
        *,
        mixup_alpha: float = 1.0,
        cutmix_alpha: float = 0.0,
        cutmix_minmax=None,
        prob: float = 1.0,
        switch_prob: float = 0.5,
        mode: str = "batch",
        correct_lam: bool = True,
        label_smoothing: float = 0.1,
        num_classes: int | None = None,
        pairing: str = "flip",
        targets: str = "soft",
    ):
        methods: list[MixMethod] = []
        probs: list[float] = []
        switch_prob = v.number("switch_prob", switch_prob, lo=0, hi=1)
        mixup_alpha = v.number("mixup_alpha", mixup_alpha, lo=0, hint=" (0 = MixUp off)")
        cutmix_alpha = v.number("cutmix_alpha", cutmix_alpha, lo=0, hint=" (0 = CutMix off)")
        use_cutmix = cutmix_alpha > 0 or cutmix_minmax is not None
        if mixup_alpha > 0:
            methods.append(MixUp(alpha=mixup_alpha))
            probs.append(1.0 - float(switch_prob) if use_cutmix else 1.0)
        if use_cutmix:
            # with cutmix_minmax timm forces cutmix_alpha = 1 (the box ignores lam anyway)
            alpha = 1.0 if cutmix_minmax is not None else cutmix_alpha
            methods.append(CutMix(alpha=alpha, minmax=cutmix_minmax, correct_lam=correct_lam))
            probs.append(float(switch_prob) if float(mixup_alpha) > 0 else 1.0)
        if not methods:
            raise ValueError("Mixup needs mixup_alpha > 0, cutmix_alpha > 0 or cutmix_minmax")
        super().__init__(
            methods=methods,
            probs=probs,
            prob=prob,
            mode=mode,
            pairing=pairing,
            label_smoothing=label_smoothing,
            num_classes=num_classes,
            targets=targets,
        )
        self.mixup_alpha = mixup_alpha
        self.cutmix_alpha = cutmix_alpha
        self.cutmix_minmax = cutmix_minmax
        self.switch_prob = switch_prob
        self.correct_lam = v.flag("correct_lam", correct_lam)
