"""Mixing methods. Each samples its parameters on the host and fills rows of a ``MixParams``;
none launches anything: the one fused kernel consumes the parameters of the whole batch.

Every method has the same three steps, kornia style:
- ``draw_lam(rng, count)``: its mixing-ratio distribution;
- ``fill(params, rows, lam, rng=, height=, width=, shared=)``: geometry (box, mask, grid, blob)
  for those rows; ``shared=True`` gives all rows one geometry (timm's "batch" mode);
- ``params(n, height=, width=, lam=, partner=, box=, mask=, rng=)``: a whole batch of this method
  with any parameter given explicitly instead of sampled (reproducible runs, tests against other
  libraries).

Convention: ``lam`` is the weight of the sample's OWN image (the fraction of its pixels that stay,
or its blend weight); the partner gets ``1 - lam``. Targets use ``target_lam`` (= ``lam`` except
SamplePairing, which keeps the sample's label).
"""

from __future__ import annotations

import math
import os
import threading
from concurrent.futures import ThreadPoolExecutor
from functools import lru_cache

import numpy as np

from .. import validate as v
from ..ops.record import (
    FLAG_BILINEAR,
    METHOD_BLEND,
    METHOD_BOX,
    METHOD_GRID,
    METHOD_MASK,
    METHOD_RESIZE,
    METHOD_SMOOTH,
)
from .params import PAIRINGS, MixParams, pair_indices


def _positive(name: str, value) -> float:
    return v.number(name, value, lo=0, lo_open=True)


def _range(name: str, value, lo: float, hi: float) -> tuple[float, float]:
    return v.pair(name, value, lo=lo, hi=hi)


def _number_or_range(name: str, value, lo: float, hi: float) -> tuple[float, float]:
    """A number x (-> (x, x)) or a (min, max) range."""
    if isinstance(value, (tuple, list, np.ndarray)):
        return _range(name, value, lo, hi)
    x = v.number(name, value, lo=lo, hi=hi)
    return x, x


def _as_rows(value, rows: np.ndarray, dtype) -> np.ndarray:
    arr = np.asarray(value, dtype=dtype)
    return np.broadcast_to(arr, (len(rows),) + arr.shape[1:] if arr.ndim else (len(rows),)).copy()


def _rng(rng):
    return rng if rng is not None else np.random.default_rng()


class MixMethod:
    """Base class: see the module docstring for the contract."""

    name = "none"

    def draw_lam(self, rng: np.random.Generator, count: int) -> np.ndarray:
        raise NotImplementedError

    def fill(
        self, p: MixParams, rows: np.ndarray, lam: np.ndarray, *, rng, height: int, width: int, shared: bool
    ) -> None:
        raise NotImplementedError

    def set_epoch(self, epoch: int) -> None:
        """Methods with an epoch schedule (SamplePairing) switch here."""

    @property
    def active(self) -> bool:
        return True

    def params(self, n: int, *, height: int, width: int, lam=None, partner=None, rng=None, **explicit) -> MixParams:
        """A batch of ``n`` samples mixed by this method; ``lam`` (scalar or per sample), ``partner``
        (a pairing name or an index array; default: the method's own ``pairing`` if it has one, else
        "flip") and method-specific geometry may be given explicitly."""
        rng = _rng(rng)
        p = MixParams.unmixed(n, (self.name,))
        if partner is None:
            partner = getattr(self, "pairing", None) or "flip"
        p.partner = pair_indices(n, partner, rng) if isinstance(partner, str) else _check_partner(partner, n)
        rows = np.arange(n)
        lam_rows = self.draw_lam(rng, n) if lam is None else _as_rows(lam, rows, np.float64)
        self._fill_explicit(p, rows, lam_rows, rng=rng, height=height, width=width, **explicit)
        p.kind[:] = 0
        return p

    def _refuse(self, explicit: dict) -> None:
        """``params()``'s keyword arguments this method does not take (each takes its own, or none)."""
        if explicit:
            raise TypeError(f"{type(self).__name__}.params() takes no {', '.join(explicit)}")

    def _fill_explicit(self, p, rows, lam, *, rng, height, width, **explicit):
        self._refuse(explicit)
        self.fill(p, rows, lam, rng=rng, height=height, width=width, shared=False)

    def __repr__(self) -> str:
        fields = ", ".join(f"{k}={v!r}" for k, v in vars(self).items() if not k.startswith("_"))
        return f"{type(self).__name__}({fields})"


def _check_partner(partner, n: int) -> np.ndarray:
    partner = np.asarray(partner, dtype=np.int64)
    if partner.shape != (n,) or ((partner < 0) | (partner >= n)).any():
        raise ValueError(f"partner must be {n} indices in [0, {n}), got {partner!r}")
    return partner


class MixUp(MixMethod):
    """MixUp (Zhang et al., "mixup: Beyond Empirical Risk Minimization", ICLR 2018).

    ``lam ~ Beta(alpha, alpha)``; ``x = lam * x_i + (1 - lam) * x_j``; targets mixed by ``lam``.
    """

    name = "mixup"

    def __init__(self, *, alpha: float = 1.0):
        self.alpha = _positive("alpha", alpha)

    def draw_lam(self, rng, count):
        return rng.beta(self.alpha, self.alpha, size=count)

    def fill(self, p, rows, lam, *, rng, height, width, shared):
        lam = np.asarray(lam, dtype=np.float64)
        p.method[rows] = METHOD_BLEND
        p.blend[rows] = lam.astype(np.float32)
        # the kernel blends with the float32 weight: targets use the same number
        p.lam[rows] = p.blend[rows].astype(np.float64)
        p.target_lam[rows] = p.lam[rows]


class SamplePairing(MixMethod):
    """SamplePairing (Inoue, "Data Augmentation by Pairing Samples for Images Classification", 2018).

    ``x = (x_i + x_j) / 2`` and the label stays ``y_i``, with ``x_j`` a random other image of the
    batch (the paper's pairing). SamplePairing chooses its samples' partners itself, whatever the
    mixer's ``pairing``: ``pairing="derangement"`` (default: a random permutation with no fixed point
    and no 2-cycle, so no two samples of a batch of 3 or more hold the same average), ``"roll"``
    (i with i-1, also distinct) or ``"flip"`` (i with n-1-i, timm's pairing: samples i and n-1-i
    then hold the SAME image with two labels). On an epoch schedule: active from ``start_epoch``
    until ``end_epoch`` (exclusive, None = forever), in cycles of ``on_epochs`` epochs on and
    ``off_epochs`` off (``off_epochs=0``: always on within the range). The loader's ``set_epoch``
    switches it; while off, the samples that chose it stay unmixed.
    """

    name = "samplepairing"

    def __init__(
        self,
        *,
        pairing: str = "derangement",
        start_epoch: int = 0,
        end_epoch: int | None = None,
        on_epochs: int = 1,
        off_epochs: int = 0,
    ):
        self.pairing = v.choice("pairing", pairing, PAIRINGS)
        self.start_epoch = v.integer("start_epoch", start_epoch, lo=0)
        self.end_epoch = (
            None
            if end_epoch is None
            else v.integer("end_epoch", end_epoch, lo=self.start_epoch, hint=" (>= start_epoch, or None for no end)")
        )
        self.on_epochs = v.integer("on_epochs", on_epochs, lo=1)
        self.off_epochs = v.integer("off_epochs", off_epochs, lo=0)
        self._epoch = 0

    def is_active(self, epoch: int) -> bool:
        if epoch < self.start_epoch or (self.end_epoch is not None and epoch >= self.end_epoch):
            return False
        return (epoch - self.start_epoch) % (self.on_epochs + self.off_epochs) < self.on_epochs

    def set_epoch(self, epoch):
        self._epoch = int(epoch)

    @property
    def active(self):
        return self.is_active(self._epoch)

    def draw_lam(self, rng, count):
        return np.full(count, 0.5)

    def fill(self, p, rows, lam, *, rng, height, width, shared):
        p.method[rows] = METHOD_BLEND
        p.blend[rows] = 0.5
        p.lam[rows] = 0.5
        p.target_lam[rows] = 1.0


class CutMix(MixMethod):
    """CutMix (Yun et al., "CutMix: Regularization Strategy to Train Strong Classifiers with
    Localizable Features", ICCV 2019), with timm's box rules.

    ``lam ~ Beta(alpha, alpha)``; a box of ``int(H * sqrt(1 - lam)) x int(W * sqrt(1 - lam))``
    at a uniform centre, clipped at the edges, shows the partner. ``correct_lam``: ``lam = 1 - box_area / (H * W)``
    (the pixel fraction actually kept). ``minmax=(a, b)``: box sides uniform in
    ``[a * H, b * H) x [a * W, b * W)``, fully inside the image, lam always corrected.
    """

    name = "cutmix"

    def __init__(self, *, alpha: float = 1.0, minmax=None, correct_lam: bool = True):
        self.alpha = _positive("alpha", alpha)
        self.minmax = None if minmax is None else _range("cutmix_minmax", minmax, 0.0, 1.0)
        self.correct_lam = v.flag("correct_lam", correct_lam)

    def draw_lam(self, rng, count):
        return rng.beta(self.alpha, self.alpha, size=count)

    def boxes(self, rng, lam: np.ndarray, height: int, width: int) -> np.ndarray:
        """``len(lam)`` boxes ``(y0, x0, y1, x1)``."""
        count = len(lam)
        if self.minmax is not None:
            lo, hi = self.minmax
            cut_h = rng.integers(int(height * lo), max(int(height * hi), int(height * lo) + 1), size=count)
            cut_w = rng.integers(int(width * lo), max(int(width * hi), int(width * lo) + 1), size=count)
            y0 = rng.integers(0, height - cut_h + 1)
            x0 = rng.integers(0, width - cut_w + 1)
            return np.stack([y0, x0, y0 + cut_h, x0 + cut_w], 1).astype(np.int32)
        ratio = np.sqrt(1.0 - np.asarray(lam, dtype=np.float64))
        cut_h = (height * ratio).astype(np.int64)
        cut_w = (width * ratio).astype(np.int64)
        cy = rng.integers(0, height, size=count)
        cx = rng.integers(0, width, size=count)
        y0 = np.clip(cy - cut_h // 2, 0, height)
        y1 = np.clip(cy + (cut_h + 1) // 2, 0, height)
        x0 = np.clip(cx - cut_w // 2, 0, width)
        x1 = np.clip(cx + (cut_w + 1) // 2, 0, width)
        return np.stack([y0, x0, y1, x1], 1).astype(np.int32)

    def fill(self, p, rows, lam, *, rng, height, width, shared):
        lam = np.asarray(lam, dtype=np.float64)
        box = self.boxes(rng, lam[:1] if shared else lam, height, width)
        self._set(p, rows, lam, np.broadcast_to(box, (len(rows), 4)), height, width)

    def _set(self, p, rows, lam, box, height, width):
        p.method[rows] = METHOD_BOX
        p.box[rows] = box
        if self.correct_lam or self.minmax is not None:
            area = (box[:, 2] - box[:, 0]).astype(np.float64) * (box[:, 3] - box[:, 1])
            lam = 1.0 - area / float(height * width)
        p.lam[rows] = lam
        p.target_lam[rows] = lam

    def _fill_explicit(self, p, rows, lam, *, rng, height, width, box=None, **explicit):
        self._refuse(explicit)
        if box is None:
            return self.fill(p, rows, lam, rng=rng, height=height, width=width, shared=False)
        box = np.broadcast_to(np.asarray(box, dtype=np.int32), (len(rows), 4))
        self._set(p, rows, lam, box, height, width)


class ResizeMix(MixMethod):
    """ResizeMix (Qin et al., "ResizeMix: Mixing Data with Preserved Object Information and True
    Labels", 2020), as OpenMixup samples it.

    ``tau ~ U(scope)``; a box of ``int(tau * H) x int(tau * W)`` at a uniform centre, clipped at
    the edges, receives the WHOLE partner image resized to the box (in the kernel, nearest by
    default or bilinear); ``lam = 1 - box_area / (H * W)``. ``use_alpha=True`` (OpenMixup's option,
    for self-supervised use): ``tau ~ Beta(alpha, alpha)``, redrawn ``~ U(scope)`` when it falls
    outside ``scope``.
    """

    name = "resizemix"

    def __init__(
        self, *, scope=(0.1, 0.8), interpolation: str = "nearest", use_alpha: bool = False, alpha: float = 1.0
    ):
        self.scope = _range("scope", scope, 0.0, 1.0)
        self.interpolation = v.choice("interpolation", interpolation, ("nearest", "bilinear"))
        self.use_alpha = v.flag("use_alpha", use_alpha)
        self.alpha = _positive("alpha", alpha)

    def draw_lam(self, rng, count):
        """The scale ``tau`` of each box (ResizeMix's own parameter), not the final lam."""
        lo, hi = self.scope
        if not self.use_alpha:
            return rng.uniform(lo, hi, size=count)
        tau = rng.beta(self.alpha, self.alpha, size=count)
        outside = (tau < lo) | (tau > hi)
        tau[outside] = rng.uniform(lo, hi, size=int(outside.sum()))
        return tau

    def boxes(self, rng, tau: np.ndarray, height: int, width: int) -> np.ndarray:
        tau = np.clip(np.asarray(tau, dtype=np.float64), self.scope[0], self.scope[1])
        cut_h: np.ndarray = (height * tau).astype(np.int64)
        cut_w: np.ndarray = (width * tau).astype(np.int64)
        cy = rng.integers(0, height, size=len(tau))
        cx = rng.integers(0, width, size=len(tau))
        y0, y1 = np.clip(cy - cut_h // 2, 0, height), np.clip(cy + cut_h // 2, 0, height)
        x0, x1 = np.clip(cx - cut_w // 2, 0, width), np.clip(cx + cut_w // 2, 0, width)
        return np.stack([y0, x0, y1, x1], 1).astype(np.int32)

    def fill(self, p, rows, lam, *, rng, height, width, shared):
        box = self.boxes(rng, np.asarray(lam)[:1] if shared else lam, height, width)
        self._set(p, rows, np.broadcast_to(box, (len(rows), 4)), height, width)

    def _set(self, p, rows, box, height, width):
        p.method[rows] = METHOD_RESIZE
        p.box[rows] = box
        p.flags[rows] = FLAG_BILINEAR if self.interpolation == "bilinear" else 0
        area = (box[:, 2] - box[:, 0]).astype(np.float64) * (box[:, 3] - box[:, 1])
        p.lam[rows] = 1.0 - area / float(height * width)
        p.target_lam[rows] = p.lam[rows]

    def _fill_explicit(self, p, rows, lam, *, rng, height, width, box=None, **explicit):
        self._refuse(explicit)
        if box is None:
            return self.fill(p, rows, lam, rng=rng, height=height, width=width, shared=False)
        self._set(p, rows, np.broadcast_to(np.asarray(box, dtype=np.int32), (len(rows), 4)), height, width)


def nearest_counts(in_size: int, out_size: int) -> np.ndarray:
    """How many output pixels each input pixel covers under nearest upsampling (the kernel's rule)."""
    scale = np.float32(in_size) / np.float32(out_size)
    idx = np.minimum(np.floor(np.arange(out_size, dtype=np.float32) * scale).astype(np.int64), in_size - 1)
    return np.bincount(idx, minlength=in_size)


def full_resolution_mean(mask: np.ndarray, height: int, width: int) -> float:
    """Mean of ``mask`` (h x w) after nearest upsampling to ``height x width``, exactly."""
    cy: np.ndarray = nearest_counts(mask.shape[0], height).astype(np.float64)
    cx: np.ndarray = nearest_counts(mask.shape[1], width).astype(np.float64)
    return float(cy @ mask.astype(np.float64) @ cx) / (height * width)


def full_resolution_means(masks, height: int, width: int) -> np.ndarray:
    """``full_resolution_mean`` of each mask; one matrix product when they share a shape."""
    shapes = {m.shape for m in masks}
    if len(shapes) != 1:
        return np.array([full_resolution_mean(m, height, width) for m in masks])
    h, w = shapes.pop()
    cy: np.ndarray = nearest_counts(h, height).astype(np.float64)
    cx: np.ndarray = nearest_counts(w, width).astype(np.float64)
    stack = np.stack(masks).astype(np.float64)
    return np.einsum("y,nyx,x->n", cy, stack, cx) / (height * width)


_FMIX_CHUNK_PIXELS = 1 << 21  # samples per planning chunk: about 8 MB of float32 masks
_fmix_state: dict = {}
_fmix_lock = threading.Lock()


def _fmix_pool() -> ThreadPoolExecutor:
    """The planning pool of this process (a forked child makes its own: the parent's threads are
    not there)."""
    with _fmix_lock:
        pool = _fmix_state.get("pool")
        if pool is None or _fmix_state.get("pid") != os.getpid():
            pool = ThreadPoolExecutor(max_workers=min(4, os.cpu_count() or 1), thread_name_prefix="dalimix-fmix")
            _fmix_state["pool"], _fmix_state["pid"] = pool, os.getpid()
        return pool


def _mask_device(device, mask_size, mask_scale):
    """FMix's ``device``: None (masks planned on the host) or a torch device, full resolution only."""
    if device is None:
        return None
    import torch

    try:
        device = torch.device(device)
    except (RuntimeError, TypeError) as e:
        raise ValueError(f"device={device!r}: a torch device ('cuda', 'cuda:1', 'cpu') or None ({e})") from None
    if device.type not in ("cpu", "cuda"):
        raise ValueError(
            f"device={str(device)!r}: FMix plans masks on 'cuda' (or 'cpu') devices, or on the host (None)"
        )
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(
            f"device={str(device)!r} but torch sees no CUDA GPU: use device=None (masks planned on the host)"
        )
    if mask_size is not None or mask_scale != 1:
        raise ValueError(
            f"device={str(device)!r} samples full-resolution masks only: drop mask_size / mask_scale, or "
            "plan coarse masks on the host (device=None)"
        )
    return device


def _to_device(arr: np.ndarray, device):
    """A small host array on ``device`` without a host synchronisation: a fresh tensor, staged through
    the device's pinned ring on CUDA (``dalimix.ops.staging``)."""
    from ..ops.staging import to_device

    arr = np.ascontiguousarray(arr)
    return to_device([arr], device)[0].reshape(arr.shape)


def _record_event(device):
    """A CUDA event after the work queued so far on ``device``'s current stream (None on the CPU)."""
    if device.type != "cuda":
        return None
    import torch

    event = torch.cuda.Event()
    event.record(torch.cuda.current_stream(device))
    return event


_device_scales: dict = {}


def _device_scale(h: int, w: int, decay_power: float, device):
    key = (h, w, decay_power, str(device))
    scale = _device_scales.get(key)
    if scale is None:
        scale = _to_device(_spectrum_scale(h, w, decay_power).copy(), device)
        _device_scales[key] = scale
    return scale


@lru_cache(maxsize=4096)
def _ranked_sum(low: int, high: int, size: int) -> float:
    """Sum of a ranked mask's values (float32, as the device builds them): 1 below rank ``low``,
    the ramp over ``[low, high)``, 0 after."""
    low_c, high_c = min(max(low, 0), size), min(max(high, 0), size)
    rank = np.arange(low_c, high_c)
    ramp = (1.0 - (rank - low) / max(high - low - 1, 1)).astype(np.float32)
    return float(low_c + ramp.sum(dtype=np.float64))


def kth_smallest(flat: np.ndarray, kth: np.ndarray) -> np.ndarray:
    """Per row of ``flat`` (count x size), its ``kth[i]``-th smallest value: exactly
    ``np.partition(row, k)[k]``, found in a narrow band. A sorted strided sample of each row gives
    bounds around rank ``k`` (4 standard deviations of a sample quantile wide); the values between
    them (a few percent of the row) are partitioned; a row whose rank falls outside its band (rare)
    is partitioned whole."""
    count, size = flat.shape
    out = np.empty(count, dtype=flat.dtype)
    step = max(1, size // 1024)
    if step < 4:  # small rows: the band would not pay for itself
        for i, (row, k) in enumerate(zip(flat, kth)):
            out[i] = np.partition(row, k)[k]
        return out
    sample = np.sort(flat[:, ::step], axis=1)
    m = sample.shape[1]
    centre = np.asarray(kth) * (m / size)
    margin = 4.0 * np.sqrt(m * 0.25) + 2.0
    lo_i = np.floor(centre - margin).astype(np.int64)
    hi_i = np.ceil(centre + margin).astype(np.int64)
    rows = np.arange(count)
    lo = np.where(lo_i >= 0, sample[rows, np.clip(lo_i, 0, m - 1)], -np.inf)
    hi = np.where(hi_i < m, sample[rows, np.clip(hi_i, 0, m - 1)], np.inf)
    for i in range(count):
        row, k = flat[i], int(kth[i])
        below = row < lo[i]
        band = row[~below & (row <= hi[i])]
        j = k - int(np.count_nonzero(below))
        out[i] = np.partition(band, j)[j] if 0 <= j < len(band) else np.partition(row, k)[k]
    return out


@lru_cache(maxsize=32)
def _spectrum_scale_pairs(h: int, w: int, decay_power: float) -> np.ndarray:
    """``_spectrum_scale`` with each value twice (h x 2 (w // 2 + 1)): the scale of a (re, im) pair."""
    pairs = np.repeat(_spectrum_scale(h, w, decay_power), 2, axis=1)
    pairs.setflags(write=False)
    return pairs


@lru_cache(maxsize=32)
def _spectrum_scale(h: int, w: int, decay_power: float) -> np.ndarray:
    """FMix's filter ``1 / max(f, 1 / max(h, w)) ** decay_power`` on the real FFT's grid (float32,
    read-only: shared by every plan of that size)."""
    fy = np.fft.fftfreq(h)[:, None]
    fx = np.fft.rfftfreq(w)[None, :]
    freqs = np.sqrt(fy * fy + fx * fx)
    scale = (1.0 / np.maximum(freqs, 1.0 / max(h, w)) ** decay_power).astype(np.float32)
    scale.setflags(write=False)
    return scale


class FMix(MixMethod):
    """FMix (Harris et al., "FMix: Enhancing Mixed Sample Data Augmentation", 2020), as the FMix
    release samples it.

    A low-frequency mask: Gaussian noise in Fourier space scaled by ``1 / f ** decay_power``
    (frequencies below ``1 / max(h, w)`` clamped), inverse FFT, and the top ``lam`` fraction of
    its pixels set to 1 (own image), the rest 0 (partner); ``lam ~ Beta(alpha, alpha)``, or
    ``Beta(alpha + 1, alpha)`` with ``reformulate=True`` (the release's reformulation).
    ``max_soft`` (in [0, 0.5]) softens the edge as the release does: the ``2 * s`` pixels ranked
    around the threshold, ``s = int(h * w * min(max_soft, lam, 1 - lam))``, fall linearly from 1 to 0.

    The mask is sampled at the output size by default (``mask_scale=1``, as the release). A
    coarser mask (``mask_scale=k``: ``ceil(H / k) x ceil(W / k)``, or ``mask_size``) is upsampled
    nearest in the kernel: cheaper to plan and to read, but its edges move in k x k blocks and lam
    lies on a 1 / (h * w) grid (at 32 px and k = 4: 4 x 4 blocks, lam in steps of 1/64), and the
    spectrum above that resolution's Nyquist frequency is lost (at decay_power 1 a visible part).
    The reported ``lam`` is the mask mean at full resolution, exactly.

    Planning on the host draws the whole batch's noise in one call, then inverse-FFTs and
    thresholds it in chunks of samples on a small thread pool (float32; the threshold by selection,
    not a sort; the filter cached per size). ``device="cuda"`` samples the masks on that device
    instead (torch's generator and FFT there, a stable sort ranks the pixels; no host
    synchronisation, the lams follow from the ranks on the host): full resolution only, one such
    method per mixer, and the loader's device should be that device.
    """

    name = "fmix"

    def __init__(
        self,
        *,
        alpha: float = 1.0,
        decay_power: float = 3.0,
        max_soft: float = 0.0,
        reformulate: bool = False,
        mask_size=None,
        mask_scale: int = 1,
        device=None,
    ):
        self.alpha = _positive("alpha", alpha)
        self.decay_power = v.number("decay_power", decay_power, lo=0, hi=10, lo_open=True)
        self.max_soft = v.number("max_soft", max_soft, lo=0, hi=0.5, hint=" (the release's soft-edge width, 0 = hard)")
        self.reformulate = v.flag("reformulate", reformulate)
        self.mask_size = None if mask_size is None else v.size("mask_size", mask_size)
        self.mask_scale = v.integer(
            "mask_scale", mask_scale, lo=1, hint=" (output size / mask size; 1 = full resolution)"
        )
        self.device = _mask_device(device, self.mask_size, self.mask_scale)

    def draw_lam(self, rng, count):
        return rng.beta(self.alpha + 1.0 if self.reformulate else self.alpha, self.alpha, size=count)

    def resolution(self, height: int, width: int) -> tuple[int, int]:
        if self.mask_size is not None:
            return min(self.mask_size[0], height), min(self.mask_size[1], width)
        return -(-height // self.mask_scale), -(-width // self.mask_scale)

    def low_freq_images(self, rng, count: int, h: int, w: int) -> np.ndarray:
        """``count`` smooth random images (h x w, float32): complex Gaussian noise scaled by
        ``1 / max(f, 1 / max(h, w)) ** decay_power``, inverse real FFT."""
        return self._inverse(self._noise(rng, count, h, w), h, w)

    @staticmethod
    def _noise(rng, count: int, h: int, w: int) -> np.ndarray:
        """``count`` complex Gaussian spectra as float32 pairs (count x h x (w // 2 + 1) x 2): torch's
        normal generator seeded from ``rng`` (one seed per call, so plans stay reproducible from the
        numpy generator; one draw for the whole batch)."""
        import torch

        gen = torch.Generator().manual_seed(int(rng.integers(0, 2**62)))
        return torch.randn((count, h, w // 2 + 1, 2), generator=gen).numpy()  # host sync: none, host noise

    def _inverse(self, noise: np.ndarray, h: int, w: int) -> np.ndarray:
        """Scale ``noise`` in place by the filter (computed once per (h, w, decay_power)) and
        inverse-FFT it (numpy's, float32 in and out)."""
        count, _, half, _ = noise.shape
        flat = noise.reshape(count, h, 2 * half)  # (re, im) pairs side by side: one contiguous product
        np.multiply(flat, _spectrum_scale_pairs(h, w, self.decay_power), out=flat)
        return np.fft.irfft2(noise.view(np.complex64)[..., 0], s=(h, w))

    def masks(self, rng, lam: np.ndarray, h: int, w: int) -> tuple[np.ndarray, np.ndarray]:
        """``len(lam)`` masks (float32, h x w) and their exact means: ``low_freq_images`` then
        ``binarize``, in chunks of samples on a small thread pool (numpy's FFT and selection release
        the GIL, and a chunk's arrays stay in cache). The noise is drawn for the whole batch first,
        so the masks do not depend on the chunking."""
        lam = np.asarray(lam, dtype=np.float64)
        count = len(lam)
        noise = self._noise(rng, count, h, w)
        out: np.ndarray = np.empty((count, h, w), dtype=np.float32)
        means: np.ndarray = np.empty(count, dtype=np.float64)
        chunk = max(1, min(count, _FMIX_CHUNK_PIXELS // (h * w)))

        def work(start: int) -> None:
            part = slice(start, min(start + chunk, count))
            out[part] = self.binarize(self._inverse(noise[part], h, w), lam[part])
            means[part] = out[part].mean(axis=(1, 2), dtype=np.float64)

        starts = range(0, count, chunk)
        if len(starts) == 1:
            work(0)
        else:
            for f in [_fmix_pool().submit(work, s) for s in starts]:
                f.result()
        return out, means

    def binarize(self, images: np.ndarray, lam: np.ndarray) -> np.ndarray:
        """Per image: 1 on its top ``round(lam * h * w)`` pixels, 0 elsewhere (float32); with
        ``max_soft``, the release's linear ramp from 1 to 0 over the ``2 * s`` pixels ranked
        ``[keep - s, keep + s)``."""
        count, h, w = images.shape
        flat: np.ndarray = images.reshape(count, -1).astype(np.float32, copy=False)
        size = flat.shape[1]
        lam = np.asarray(lam, dtype=np.float64)
        keep = np.rint(lam * size).astype(np.int64)
        if self.max_soft > 0:
            soft = (size * np.minimum(self.max_soft, np.minimum(lam, 1.0 - lam))).astype(np.int64)
            if soft.any():
                return self._soft(flat, keep, soft).reshape(count, h, w)
        # each mask's k-th largest value by selection, row by row (O(h w) per mask, not a sort)
        threshold = kth_smallest(flat, np.clip(size - keep, 0, size - 1))
        masks = flat >= threshold[:, None]
        masks[keep <= 0] = False
        return masks.view(np.uint8).astype(np.float32).reshape(count, h, w)

    @staticmethod
    def _soft(flat: np.ndarray, keep: np.ndarray, soft: np.ndarray) -> np.ndarray:
        size = flat.shape[1]
        order = np.argsort(-flat, axis=1, kind="stable")  # rank r -> pixel
        rank = np.arange(size)[None, :]
        low, high = (keep - soft)[:, None], (keep + soft)[:, None]
        ramp = 1.0 - (rank - low) / np.maximum(high - low - 1, 1)  # np.linspace(1, 0, high - low)
        by_rank = np.where(rank < low, 1.0, np.where(rank < high, ramp, 0.0)).astype(np.float32)
        out = np.empty_like(flat)
        np.put_along_axis(out, order, by_rank, axis=1)
        return out

    def fill(self, p, rows, lam, *, rng, height, width, shared):
        lam = np.asarray(lam, dtype=np.float64)
        mh, mw = self.resolution(height, width)
        count = 1 if shared else len(rows)
        if self.device is not None:
            return self._fill_device(p, rows, lam[:count], rng=rng, height=height, width=width)
        masks, means = self.masks(rng, lam[:count], mh, mw)
        if shared:
            self._set(p, rows, [masks[0]] * len(rows), height, width)
        elif (mh, mw) == (height, width):  # full resolution: lam is each mask's plain mean
            self._set(p, rows, list(masks), height, width, lam=means)
        else:
            self._set(p, rows, list(masks), height, width)

    def device_masks(self, rng, lam: np.ndarray, h: int, w: int):
        """``len(lam)`` masks (count x h x w float32 on ``device``) and their exact means (host
        float64), sampled on the device with no host synchronisation: the same noise model as
        ``masks`` (torch's generator on the device, seeded from ``rng``; torch's FFT), each mask's
        pixels ranked by a stable descending sort, rank ``r`` -> 1 for ``r < keep - s``, the
        release's linear ramp over ``[keep - s, keep + s)``, 0 after (``s = 0`` without
        ``max_soft``). Exactly ``keep = round(lam h w)`` pixels are 1 in a hard mask, so the means
        follow from ``keep`` and ``s`` on the host."""
        import torch

        lam = np.asarray(lam, dtype=np.float64)
        count, size = len(lam), h * w
        keep = np.rint(lam * size).astype(np.int64)
        soft: np.ndarray = np.zeros(count, dtype=np.int64)
        if self.max_soft > 0:
            soft = (size * np.minimum(self.max_soft, np.minimum(lam, 1.0 - lam))).astype(np.int64)
        low, high = keep - soft, keep + soft
        device = self.device
        gen = torch.Generator(device=device).manual_seed(int(rng.integers(0, 2**62)))
        noise = torch.randn((count, h, w // 2 + 1, 2), generator=gen, device=device)
        spectra = torch.view_as_complex(noise) * _device_scale(h, w, self.decay_power, device)
        images = torch.fft.irfft2(spectra, s=(h, w)).reshape(count, size)
        order = torch.sort(images, dim=1, descending=True, stable=True).indices  # rank -> pixel
        bounds = _to_device(np.stack([low, high], 1), device)
        lo, hi = bounds[:, :1], bounds[:, 1:]
        rank = torch.arange(size, device=device)[None, :]
        ramp = 1.0 - (rank - lo).double() / torch.clamp(hi - lo - 1, min=1).double()
        by_rank = torch.where(rank < lo, 1.0, torch.where(rank < hi, ramp, 0.0)).float()
        out = torch.empty_like(by_rank).scatter_(1, order, by_rank)
        means = np.array([_ranked_sum(int(a), int(b), size) for a, b in zip(low, high)]) / size
        return out.reshape(count, h, w), means

    def _fill_device(self, p, rows, lam, *, rng, height, width):
        import torch

        masks, means = self.device_masks(rng, lam, height, width)
        if p.device_masks is None:
            p.device_masks = torch.zeros((p.n, 1, height, width), dtype=torch.float32, device=self.device)
        elif tuple(p.device_masks.shape) != (p.n, 1, height, width) or p.device_masks.device != masks.device:
            raise ValueError(
                "FMix(device=...): the batch already holds device masks of another shape or device "
                f"({tuple(p.device_masks.shape)} on {p.device_masks.device}); use one device FMix per mixer"
            )
        index = _to_device(np.asarray(rows, dtype=np.int64), self.device)
        p.device_masks[index, 0] = masks if len(masks) == len(rows) else masks.expand(len(rows), -1, -1)
        p.device_ready = _record_event(self.device)
        if p.device_planned is None:
            p.device_planned = np.zeros(p.n, dtype=bool)
        p.device_planned[rows] = True
        p.method[rows] = METHOD_MASK
        p.flags[rows] = 0
        for r in rows:
            p.masks[r] = None
        p.lam[rows] = means if len(means) == len(rows) else means[0]
        p.target_lam[rows] = p.lam[rows]

    def _set(self, p, rows, masks, height, width, lam=None):
        """Store ``masks`` for ``rows``; ``lam`` (their exact means, when the caller has them) or the
        full-resolution mean of each mask."""
        p.method[rows] = METHOD_MASK
        p.flags[rows] = 0
        for r, m in zip(rows, masks):
            p.masks[r] = m
        if lam is None:
            lam = self._means(masks, height, width)
        p.lam[rows] = lam
        p.target_lam[rows] = lam

    @staticmethod
    def _means(masks, height: int, width: int):
        if all(m is masks[0] for m in masks):
            return full_resolution_mean(masks[0], height, width)
        if all(m.shape == (height, width) for m in masks):  # full resolution: the plain mean
            return np.stack(masks).mean(axis=(1, 2), dtype=np.float64)
        return full_resolution_means(masks, height, width)

    def _fill_explicit(self, p, rows, lam, *, rng, height, width, mask=None, **explicit):
        self._refuse(explicit)
        if mask is None:
            return self.fill(p, rows, lam, rng=rng, height=height, width=width, shared=False)
        mask = np.asarray(mask, dtype=np.float32)
        masks = [mask] * len(rows) if mask.ndim == 2 else list(mask)
        if len(masks) != len(rows) or any(m.ndim != 2 or m.shape[0] > height or m.shape[1] > width for m in masks):
            raise ValueError(f"mask must be h x w or {len(rows)} x h x w with h <= {height}, w <= {width}")
        if any(not np.isfinite(m).all() or m.min() < 0 or m.max() > 1 for m in masks):
            raise ValueError("mask values must be finite and in [0, 1] (1 = the sample's own image)")
        self._set(p, rows, masks, height, width)


class GridMix(MixMethod):
    """GridMix (Baek et al., "GridMix: Strong regularization through local context mapping",
    Pattern Recognition 2021), as OpenMixup samples it.

    A cut region (``cut_area_ratio`` of the image, aspect ``cut_aspect_ratio``, uniform position)
    is tiled with patches ``ceil(width / n_holes)`` wide and ``hole_aspect_ratio`` times as high;
    in each patch a hole of side ratio ``sqrt(1 - lam)`` (at least 1 pixel, at most the patch
    minus 1) shows the partner. ``lam ~ Beta(alpha, alpha)`` sets the hole size; the reported lam
    is the exact fraction of own pixels. Computed in the kernel from 8 integers: no mask memory.
    Each argument may be a number or a (min, max) range sampled per grid.
    """

    name = "gridmix"

    def __init__(
        self, *, alpha: float = 1.0, n_holes=20, hole_aspect_ratio=1.0, cut_area_ratio=1.0, cut_aspect_ratio=1.0
    ):
        self.alpha = _positive("alpha", alpha)
        if isinstance(n_holes, (tuple, list)) and len(n_holes) == 2:
            self.n_holes = tuple(v.integer("n_holes", h, lo=1) for h in n_holes)
            if self.n_holes[0] > self.n_holes[1]:
                raise ValueError(f"n_holes={n_holes!r}: (min, max) with min <= max")
        else:
            h = v.integer("n_holes", n_holes, lo=1, hint=" or a (min, max) range")
            self.n_holes = (h, h)
        self.hole_aspect_ratio = _number_or_range("hole_aspect_ratio", hole_aspect_ratio, 1e-3, 1e3)
        self.cut_area_ratio = _number_or_range("cut_area_ratio", cut_area_ratio, 1e-3, 1.0)
        self.cut_aspect_ratio = _number_or_range("cut_aspect_ratio", cut_aspect_ratio, 1e-3, 1e3)

    def draw_lam(self, rng, count):
        return rng.beta(self.alpha, self.alpha, size=count)

    def grid(self, rng, lam: float, height: int, width: int):
        """One grid: ((y0, x0, y1, x1) cut region, (patch_w, patch_h, hole_w, hole_h))."""
        n_holes = int(rng.integers(self.n_holes[0], self.n_holes[1] + 1))
        hole_aspect = rng.uniform(*self.hole_aspect_ratio)
        cut_area = int(height * width * rng.uniform(*self.cut_area_ratio))
        cut_aspect = rng.uniform(*self.cut_aspect_ratio)
        cut_w = min(int(np.sqrt(cut_area / cut_aspect)), width)
        cut_h = min(int(cut_w * cut_aspect), height)
        x0 = int((width - cut_w) * rng.random())
        y0 = int((height - cut_h) * rng.random())
        if not (1 <= n_holes <= cut_w // 2):
            raise ValueError(
                f"GridMix: n_holes={n_holes} does not fit a cut region {cut_w} pixels wide; use n_holes <= {max(cut_w // 2, 1)}"
            )
        patch_w = math.ceil(cut_w / n_holes)
        patch_h = max(int(patch_w * hole_aspect), 2)
        ratio = np.sqrt(1.0 - lam)
        hole_w = min(max(int(patch_w * ratio), 1), patch_w - 1)
        hole_h = min(max(int(patch_h * ratio), 1), patch_h - 1)
        return (y0, x0, y0 + cut_h, x0 + cut_w), (patch_w, patch_h, hole_w, hole_h)

    @staticmethod
    def partner_fraction(box, pattern, height: int, width: int) -> float:
        y0, x0, y1, x1 = box
        pw, ph, hw, hh = pattern
        span_x, span_y = x1 - x0, y1 - y0
        holes_x = (span_x // pw) * hw + min(span_x % pw, hw)
        holes_y = (span_y // ph) * hh + min(span_y % ph, hh)
        return holes_x * holes_y / float(height * width)

    def fill(self, p, rows, lam, *, rng, height, width, shared):
        lam = np.asarray(lam, dtype=np.float64)
        grids = (
            [self.grid(rng, float(lam[0]), height, width)] * len(rows)
            if shared
            else [self.grid(rng, float(v), height, width) for v in lam]
        )
        for r, (box, pattern) in zip(rows, grids):
            p.method[r] = METHOD_GRID
            p.box[r] = box
            p.ints[r] = pattern
            p.lam[r] = 1.0 - self.partner_fraction(box, pattern, height, width)
            p.target_lam[r] = p.lam[r]


class SmoothMix(MixMethod):
    """SmoothMix (Lee et al., "SmoothMix: a Simple Yet Effective Data Augmentation to Train Robust
    Classifiers", CVPR Workshops 2020), as OpenMixup samples it.

    A Gaussian blob ``g`` shows the partner: ``x = (1 - g) * x_i + g * x_j``. Its centre is shifted
    by a uniform offset from the image centre, ``sigma ~ U(0.25, 0.5) * H``, and distances are
    measured on OpenMixup's rolled grid (period 2H x 2W). ``lam = 1 - mean(g)`` exactly. Computed
    in the kernel from 3 numbers: no mask memory.
    """

    name = "smoothmix"

    def __init__(self, *, sigma_range=(0.25, 0.5)):
        self.sigma_range = _range("sigma_range", sigma_range, 1e-3, 10.0)

    def draw_lam(self, rng, count):
        return np.full(count, np.nan)  # SmoothMix's lam follows from its blob, not from a draw

    def blob(self, rng, height: int, width: int):
        """(y offset, x offset, 1 / (2 sigma^2)) of one blob."""
        shift_y = int(int(rng.integers(0, height)) - height / 2)
        shift_x = int(int(rng.integers(0, width)) - width / 2)
        sigma = rng.uniform(*self.sigma_range) * height
        return height // 2 - shift_y, width // 2 - shift_x, np.float32(1.0 / (2.0 * sigma * sigma))

    @staticmethod
    def partner_fraction(oy: int, ox: int, k: np.float32, height: int, width: int) -> float:
        dy = (np.arange(height) + oy) % (2 * height) - (2 * height - 1) / 2
        dx = (np.arange(width) + ox) % (2 * width) - (2 * width - 1) / 2
        return float(np.exp(-dy * dy * float(k)).mean() * np.exp(-dx * dx * float(k)).mean())

    def fill(self, p, rows, lam, *, rng, height, width, shared):
        blobs = [self.blob(rng, height, width)] * len(rows) if shared else [self.blob(rng, height, width) for _ in rows]
        for r, (oy, ox, k) in zip(rows, blobs):
            p.method[r] = METHOD_SMOOTH
            p.ints[r] = (oy, ox, 0, 0)
            p.floats[r] = k
            p.lam[r] = 1.0 - self.partner_fraction(oy, ox, k, height, width)
            p.target_lam[r] = p.lam[r]
