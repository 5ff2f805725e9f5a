"""The mask hook: a trainer's callable supplies low-resolution masks for the very batch being mixed.

A trainer registers ``fn(images, lam, partner) -> masks`` on a loader whose mixer contains
``LearnedMask``. For every batch the loader

1. writes the batch once UNMIXED (identity records through the fused kernel: normalised, cast and
   laid out exactly like the training batch) — these are the ``images`` the hook sees;
2. calls ``fn`` on the current stream with the planned ``lam`` (N float32) and ``partner``
   (N int64), both on the loader's device;
3. checks the masks (shape, device, dtype, finite, in [0, 1] unless they are logits) and copies them
   into one preallocated float32 device tensor shared by all batches (grown when needed);
4. mixes with the fused kernel, which upsamples every mask (nearest or bilinear, F.interpolate's
   index rules, ``align_corners=False``) and applies the sigmoid after upsampling for logits;
5. sets the targets' lam of the hooked samples to the mask mean at full resolution (on the device,
   no host round trip), or keeps the planned lam (``target_lam="planned"``, AutoMix's rule).

A hook registered with ``labels=True`` is called ``fn(images, lam, partner, labels)`` (the batch's
int64 labels on the device: a saliency from the model's loss needs them). One registered with
``draws=True`` also gets ``draws=params.draws`` (a keyword: the batch's host draws, keyed by method
name, that its method made at planning time, e.g. PuzzleMix's block grid with ``block_num="random"``:
sampled on the host from the plan's generator, so a resumed or re-seeded run draws the same).
A hook may return
``(masks, perm)`` instead of the masks: ``perm`` an int32/int64 tensor ``N x gh x gw`` (or
``N x (h w)`` on the masks' own grid) holding, for every output block (row-major), the partner's
source block — the partner is then read block-permuted by the kernel (``FLAG_GATHER``: PuzzleMix's
transport, Kim et al., ICML 2020). Every hooked sample's row must be a permutation of
``0 .. gh gw - 1``; it is checked like the masks (eagerly, or one batch later without a host sync)
and clamped into range on the device, so a bad table never makes the kernel read outside the image.
A hook may also return ``(masks, perm, perm_self)``: ``perm_self`` (same form and grid; ``perm`` may
be None then, the partner as it is) gives the sample's own source block for every output block, so
both images are transported (``FLAG_GATHER_SELF``; nearest masks only).

Nothing here runs when no hook is registered.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from . import validate as v
from .errors import DalimixError
from .mix.methods import MixMethod, _positive
from .mix.params import MixParams
from .mix.saliency import MaskPolicy
from .ops.record import FLAG_BILINEAR, FLAG_GATHER, FLAG_GATHER_SELF, FLAG_SIGMOID, METHOD_BLEND, METHOD_MASK
from .ops.staging import to_device

INTERPOLATIONS = ("nearest", "bilinear")
TARGET_LAMS = ("mask", "planned")
VALIDATIONS = ("auto", "eager", "deferred")
MASK_DTYPES = (torch.float32, torch.float16)
PERM_DTYPES = (torch.int32, torch.int64)


class MaskHookError(DalimixError, ValueError):
    """A mask hook raised, or returned masks the loader cannot use. The message names the problem,
    the batch (epoch, step) and what to do; the loader stays usable (the next batch works)."""


class LearnedMask(MixMethod):
    """Masks from the loader's mask hook: AutoMix's Mix Block (Liu et al., "AutoMix: Unveiling the
    Power of Mixup for Stronger Classifiers", ECCV 2022), saliency, or any policy of the trainer.

    ``lam ~ Beta(alpha, alpha)`` is planned per batch/pair/sample like MixUp's and handed to the hook
    with the partner; the hook returns the masks. Samples whose lam is within ``mixup_margin`` of 0
    or 1 are mixed as plain MixUp instead (AutoMix's ``lam_margin``: 0.08), without the hook's mask.
    """

    name = "learned"

    def __init__(self, *, alpha: float = 2.0, mixup_margin: float = 0.0):
        self.alpha = _positive("alpha", alpha)
        self.mixup_margin = v.number(
            "mixup_margin",
            mixup_margin,
            lo=0,
            hi=0.5,
            hi_open=True,
            hint=" (AutoMix uses 0.08; 0 turns the fallback off)",
        )

    def draw_lam(self, rng, count):
        return rng.beta(self.alpha, self.alpha, size=count)

    def fill(self, p, rows, lam, *, rng, height, width, shared):
        lam = np.asarray(lam, dtype=np.float64)
        blend = np.minimum(lam, 1.0 - lam) <= self.mixup_margin
        hooked = rows[~blend]
        p.method[hooked] = METHOD_MASK
        p.flags[hooked] = 0  # the loader sets the hook's interpolation and sigmoid flags
        p.lam[hooked] = lam[~blend]
        p.target_lam[hooked] = lam[~blend]
        for r in hooked:
            p.masks[r] = None
        mixed = rows[blend]
        p.method[mixed] = METHOD_BLEND
        p.blend[mixed] = lam[blend].astype(np.float32)
        p.lam[mixed] = p.blend[mixed].astype(np.float64)
        p.target_lam[mixed] = p.lam[mixed]


def hooked_rows(params: MixParams) -> np.ndarray:
    """The indices of the samples whose mask comes from the hook (``MixParams.hooked``)."""
    return np.flatnonzero(params.hooked())


def require_hook(params: MixParams | None) -> None:
    """Refuse a batch that needs hook masks when no hook is registered."""
    if params is not None and len(hooked_rows(params)):
        raise MaskHookError(
            f"{len(hooked_rows(params))} sample(s) of this batch use LearnedMask but no mask hook is registered: "
            "call loader.set_mask_hook(fn) first (or remove LearnedMask from the mixer)"
        )


# ------------------------------------------------------------------------ mask mean at full size
def upsampling_weights(in_size: int, out_size: int, bilinear: bool) -> np.ndarray:
    """How much each of ``in_size`` source rows contributes to the sum over ``out_size`` upsampled
    rows, with the kernel's (F.interpolate's) float32 index rules. Nearest and bilinear upsampling
    are linear, so ``mean(up(M)) = w_y^T M w_x / (H W)`` exactly."""
    scale = np.float32(in_size) / np.float32(out_size)
    dst: np.ndarray = np.arange(out_size, dtype=np.float32)
    if not bilinear:
        idx = np.minimum(np.floor(dst * scale).astype(np.int64), in_size - 1)
        return np.bincount(idx, minlength=in_size).astype(np.float64)
    src = np.maximum(scale * (dst + np.float32(0.5)) - np.float32(0.5), np.float32(0))
    lo = src.astype(np.int64)
    hi = np.where(lo < in_size - 1, lo + 1, lo)
    w_hi = (src - lo.astype(np.float32)).astype(np.float32)
    w_lo = (np.float32(1) - w_hi).astype(np.float32)
    return np.bincount(lo, w_lo.astype(np.float64), minlength=in_size) + np.bincount(
        hi, w_hi.astype(np.float64), minlength=in_size
    )


_WEIGHTS: dict = {}


def _weights(h: int, w: int, height: int, width: int, bilinear: bool, device: torch.device):
    key = (h, w, height, width, bilinear, str(device))
    if key not in _WEIGHTS:
        if len(_WEIGHTS) > 64:
            _WEIGHTS.clear()
        wy = upsampling_weights(h, height, bilinear) / height
        wx = upsampling_weights(w, width, bilinear) / width
        _WEIGHTS[key] = tuple(to_device([wy, wx], device))  # once per shape: one staged copy, no wait
    return _WEIGHTS[key]


def full_resolution_mask_mean(
    masks: torch.Tensor, height: int, width: int, *, bilinear: bool, logits: bool
) -> torch.Tensor:
    """Per-sample mean of ``masks`` (N x 1 x h x w) upsampled to ``height x width`` as the kernel does
    (then the sigmoid for logits): N float32 on the masks' device, computed there.

    Exact through the interpolation weight vectors (float64) for nearest and bilinear; nearest
    commutes with the sigmoid, so nearest logits need no full-size tensor either. Bilinear logits
    are upsampled in full (F.interpolate + sigmoid + mean): a N x H x W float32 temporary.
    """
    n, _, h, w = masks.shape
    m = masks.reshape(n, h, w).to(torch.float32)
    if logits and bilinear:
        up = F.interpolate(m.unsqueeze(1), size=(height, width), mode="bilinear", align_corners=False)
        return torch.sigmoid(up).mean(dim=(1, 2, 3))
    if logits:
        m = torch.sigmoid(m)
    wy, wx = _weights(h, w, height, width, bilinear, m.device)
    return torch.einsum("y,nyx,x->n", wy, m.to(torch.float64), wx).to(torch.float32)


# --------------------------------------------------------------------------------- validation
_STAT_NAMES = ("nan", "inf", "below 0", "above 1")


def _value_stats(masks: torch.Tensor, logits: bool) -> torch.Tensor:
    """[nan, inf, below 0, above 1 counts, first bad sample, finite min, finite max] on the device."""
    n = masks.shape[0]
    flat = masks.reshape(n, -1)
    nan = torch.isnan(flat)
    inf = torch.isinf(flat)
    finite = ~(nan | inf)
    if logits:
        low = high = torch.zeros_like(nan)
    else:
        low = (flat < 0) & finite
        high = (flat > 1) & finite
    bad_rows = (nan | inf | low | high).any(dim=1)
    first = torch.argmax(bad_rows.to(torch.int32)) if n else torch.zeros((), dtype=torch.int64, device=flat.device)
    big = torch.full((), float("inf"), device=flat.device, dtype=flat.dtype)  # a fill, not a host->device copy
    lo = torch.where(finite, flat, big).amin() if flat.numel() else big
    hi = torch.where(finite, flat, -big).amax() if flat.numel() else -big
    counts = torch.stack([nan.sum(), inf.sum(), low.sum(), high.sum(), first.to(torch.int64)]).to(torch.float64)
    return torch.cat([counts, torch.stack([lo, hi]).to(torch.float64)])


def _perm_stats(perm: torch.Tensor | None, use: torch.Tensor, device) -> torch.Tensor:
    """[indices out of range, hooked rows that are not a permutation, first such row] on the device
    (zeros without ``perm``); ``use`` marks the hooked rows (N bool on the device)."""
    if perm is None:
        return torch.zeros(3, dtype=torch.float64, device=device)
    n, k = perm.shape
    if n == 0:
        return torch.zeros(3, dtype=torch.float64, device=device)
    outside = ((perm < 0) | (perm >= k)) & use.view(n, 1)
    ids = torch.arange(k, device=perm.device, dtype=perm.dtype)
    not_perm = (perm.sort(dim=1).values != ids).any(dim=1) & use
    first = torch.argmax(not_perm.to(torch.int32)).to(torch.int64)
    return torch.stack([outside.sum(), not_perm.sum(), first]).to(torch.float64)


def _perm_problem(stats: np.ndarray) -> str | None:
    problems = []
    for at, name, whose in ((7, "perm", "the partner's"), (10, "perm_self", "the own image's")):
        outside, rows, first = stats[at : at + 3]
        if rows:
            problems.append(
                f"{name} holds {int(rows)} row(s) that are not a permutation of the block indices (first in "
                f"sample {int(first)}; {int(outside)} index(es) out of range); each hooked sample's row must "
                f"hold every block 0 .. gh*gw-1 once (output block -> {whose} source block)"
            )
    return "; ".join(problems) or None


def _value_problem(stats: np.ndarray, logits: bool) -> str | None:
    perm = _perm_problem(stats)
    counts = stats[:4]
    if not counts.any():
        return perm
    what = ", ".join(f"{int(c)} {name}" for c, name in zip(counts, _STAT_NAMES) if c)
    allowed = "finite logits" if logits else "finite values in [0, 1] (1 = the sample's own image)"
    return (
        f"masks hold {what} value(s) (first in sample {int(stats[4])}; finite range [{stats[5]:.4g}, {stats[6]:.4g}]); "
        f"the hook must return {allowed}"
    ) + (f"; {perm}" if perm else "")


@dataclass
class MaskHook:
    """A registered hook and how its masks are read (see ``ImageLoader.set_mask_hook``)."""

    fn: Callable[..., torch.Tensor]
    interpolation: str = "nearest"
    logits: bool = False
    target_lam: str = "mask"
    validate: str = "auto"
    labels: bool = False  # call fn(images, lam, partner, labels)
    draws: bool = False  # also pass draws=params.draws (the batch's host draws, by method name)

    def __post_init__(self):
        if not callable(self.fn):
            raise ValueError(
                f"the mask hook must be callable as fn(images, lam, partner) -> masks (with labels=True: "
                f"fn(images, lam, partner, labels)), got {self.fn!r}"
            )
        self.labels = v.flag("labels", self.labels)
        self.draws = v.flag("draws", self.draws)
        if self.interpolation not in INTERPOLATIONS:
            raise ValueError(
                f"interpolation={self.interpolation!r}: 'nearest' or 'bilinear' (F.interpolate, align_corners=False)"
            )
        if self.target_lam not in TARGET_LAMS:
            raise ValueError(
                f"target_lam={self.target_lam!r}: 'mask' (the mask mean at full size) or 'planned' (the planned lam)"
            )
        if self.validate not in VALIDATIONS:
            raise ValueError(
                f"validate={self.validate!r}: 'auto' (eager on the CPU, deferred on CUDA), 'eager' (check "
                "before mixing; on CUDA a host sync per batch) or 'deferred' (no host sync; a bad batch is "
                "reported one batch later)"
            )
        self.logits = v.flag("logits", self.logits)

    @property
    def flags(self) -> int:
        return (FLAG_BILINEAR if self.interpolation == "bilinear" else 0) | (FLAG_SIGMOID if self.logits else 0)

    @property
    def name(self) -> str:
        return getattr(self.fn, "__qualname__", None) or type(self.fn).__name__


class MaskHookStage:
    """The loader's side of the hook: calls it, checks and stores its masks, builds records and lams.

    Owns the shared mask tensor (float32, flat, on the loader's device; it only grows). A batch's
    ``params.device_masks`` is a view of it: valid until the next batch is finished — clone it to
    keep it. The copy into it is ordered after the previous batch's kernel even when the consumer
    switches CUDA streams between batches (an event, no host sync).
    """

    def __init__(self, hook: MaskHook, device: torch.device):
        self.hook = hook
        self.device = torch.device(device)
        self._buffer = torch.empty(0, dtype=torch.float32, device=self.device)
        self._buffer_stream = torch.cuda.current_stream(self.device) if self.device.type == "cuda" else None
        self._gather = torch.empty(0, dtype=torch.int32, device=self.device)  # block permutations (int32, flat)
        self._gather_stream = self._buffer_stream
        self._last_stream = None
        self._pending: deque = deque()  # deferred checks in flight: (pinned host stats, event, epoch, step)
        self._stat_buffers: list = []  # pinned stats buffers whose check was read, for reuse

    # ------------------------------------------------------------------------- per batch
    def prepare(self, images: torch.Tensor, params: MixParams, *, epoch: int, step: int, labels=None):
        """Run the hook for this batch; returns ``(records, mask_pool)`` for the fused kernel (a block
        permutation the hook returned is in ``params.device_gather``, the kernel's ``gather``).

        ``images``: the unmixed batch (n x 3 x H x W, the loader's dtype and layout); ``labels``: its
        labels (N int64 on the device), needed by a hook registered with ``labels=True``. Raises
        ``MaskHookError`` if the hook raises or its masks are unusable (nothing of this batch is
        kept then), or if the previous batch's deferred check failed.
        """
        self.resolve_pending(wait=False)
        n, _, height, width = images.shape
        cuda = self.device.type == "cuda"
        # lam, partner, planned target lam and hooked rows: the batch's one staged copy (fresh device
        # tensors the hook may keep; its lam and partner are its own, not the targets')
        staged = params.device_params(self.device, hook=True)
        lam, partner, planned, use_t = staged.lam, staged.hook_partner, staged.target_lam, staged.use
        where = f"epoch {epoch}, step {step}"
        args: tuple = (images, lam, partner)
        if self.hook.labels:
            if labels is None:
                raise MaskHookError(
                    f"the mask hook {self.hook.name} was registered with labels=True but this batch has no "
                    "labels (the loader passes them; a direct MaskHookStage.prepare needs labels=)"
                )
            args = (*args, labels.to(self.device, torch.int64, non_blocking=True))  # device to device
        try:
            result = self.hook.fn(*args, draws=params.draws) if self.hook.draws else self.hook.fn(*args)
        except Exception as exc:
            raise MaskHookError(
                f"the mask hook {self.hook.name} raised {type(exc).__name__} at {where}: {exc}"
            ) from exc
        if isinstance(result, tuple) and len(result) not in (2, 3):
            raise MaskHookError(
                f"mask hook {self.hook.name} at {where} returned a tuple of {len(result)}; return masks, "
                "(masks, perm) or (masks, perm, perm_self)"
            )
        masks, perm, perm_self = (*result, None)[:3] if isinstance(result, tuple) else (result, None, None)
        self._check_form(masks, n, height, width, where)
        masks = masks.detach()  # e.g. my_net(images).sigmoid() or an nn.Parameter: the loader only reads them
        grid = None if perm is None else self._check_perm(perm, masks.shape, n, height, width, where)
        hooked_perm = perm is not None  # else the partner is read as it is: no table of the hook's to check
        if perm_self is not None:
            if self.hook.interpolation != "nearest":
                raise MaskHookError(
                    f"mask hook {self.hook.name} at {where} returned perm_self with interpolation="
                    f"{self.hook.interpolation!r}: the own image is read block-permuted under nearest masks only "
                    "(register the hook with interpolation='nearest')"
                )
            own = self._check_perm(perm_self, masks.shape, n, height, width, where, name="perm_self")
            if grid is None:  # the partner as it is: the identity on the own table's grid
                grid = own
                perm = torch.arange(own[0] * own[1], device=self.device).expand(n, own[0] * own[1])
            elif own != grid:
                raise MaskHookError(
                    f"mask hook {self.hook.name} at {where} returned perm on a {grid[0]}x{grid[1]} grid and "
                    f"perm_self on {own[0]}x{own[1]}: both permute blocks of one grid"
                )
            perm_self = perm_self.detach().reshape(n, grid[0] * grid[1])
        if perm is not None and grid is not None:
            perm = perm.detach().reshape(n, grid[0] * grid[1])
        stats = torch.cat(
            [
                _value_stats(masks, self.hook.logits),
                _perm_stats(perm if hooked_perm else None, use_t, self.device),
                _perm_stats(perm_self, use_t, self.device),
            ]
        )
        if self.hook.validate == "eager" or not cuda:
            problem = _value_problem(stats.cpu().numpy(), self.hook.logits)  # host sync: validate='eager' / CPU
            if problem:
                raise MaskHookError(f"mask hook {self.hook.name} at {where}: {problem}")
        else:
            self._defer(stats, epoch, step)

        stored, gather = self._store(masks, perm, perm_self)
        flags, logits = self.hook.flags, self.hook.logits
        if logits and self.hook.interpolation == "nearest":
            # nearest upsampling commutes with the sigmoid: apply it to the h x w values, not the H x W pixels
            stored.sigmoid_()
            flags, logits = flags & ~FLAG_SIGMOID, False
        rows = hooked_rows(params)
        params.flags[rows] = flags
        params.device_gather = gather
        if grid is not None:  # the partner read block-permuted: p0 = this sample's table offset, p1 x p2 the grid
            k = grid[0] * grid[1]
            params.flags[rows] |= FLAG_GATHER
            params.ints[rows, 0] = rows * k
            params.ints[rows, 1], params.ints[rows, 2] = grid
            if perm_self is not None:  # the own image too: its table after the partners' (p3)
                params.flags[rows] |= FLAG_GATHER_SELF
                params.ints[rows, 3] = (n + rows) * k
        params.device_masks = stored
        if self.hook.target_lam == "mask" and len(rows):
            mean = full_resolution_mask_mean(
                stored, height, width, bilinear=self.hook.interpolation == "bilinear", logits=logits
            )
            params.device_target_lam = torch.where(use_t, mean, planned)
        return params.records(), params.mask_pool(self.device)

    def resolve_pending(self, wait: bool = True) -> None:
        """Raise the deferred check's error of an earlier batch, if it failed.

        Each batch's check is computed on the device and copied to pinned memory behind an event.
        ``wait=False`` (every batch): read the checks whose copy has completed, oldest first, and
        leave the others for a later batch — never a host wait, so with the GPU one batch behind an
        invalid mask is reported at the next batch (later if the GPU is further behind).
        ``wait=True`` (the hook is removed or replaced): wait for all of them.
        """
        while self._pending:
            host, event, epoch, step = self._pending[0]
            if not wait and not event.query():
                return
            if wait:
                event.synchronize()  # host sync: wait=True only (hook removed)
            self._pending.popleft()
            problem = _value_problem(host.numpy(), self.hook.logits)
            self._stat_buffers.append((host, event))
            if problem:
                self._pending.clear()
                raise MaskHookError(
                    f"mask hook {self.hook.name} at epoch {epoch}, step {step} (checked later, "
                    f"validate='deferred'; that batch was already mixed with them): {problem}"
                )

    def _defer(self, stats: torch.Tensor, epoch: int, step: int) -> None:
        """Queue this batch's device-side check: copied to a reused pinned buffer behind an event."""
        stream = torch.cuda.current_stream(self.device)
        if self._stat_buffers:
            host, event = self._stat_buffers.pop()
        else:
            host, event = torch.empty(stats.shape, dtype=stats.dtype, pin_memory=True), torch.cuda.Event()
        host.copy_(stats, non_blocking=True)
        event.record(stream)
        self._pending.append((host, event, epoch, step))

    # ------------------------------------------------------------------------------ helpers
    def _on_device(self, t: torch.Tensor) -> bool:
        """``t`` is on the loader's device ("cuda" and "cuda:0" are the same one)."""
        d = t.device
        return d == self.device or (d.type == self.device.type == "cuda" and (d.index or 0) == (self.device.index or 0))

    def _check_form(self, masks, n: int, height: int, width: int, where: str) -> None:
        name = self.hook.name
        if not isinstance(masks, torch.Tensor):
            raise MaskHookError(
                f"mask hook {name} at {where} returned {type(masks).__name__}; return a torch.Tensor "
                f"of shape {n} x 1 x h x w"
            )
        shape = tuple(masks.shape)
        if (
            masks.dim() != 4
            or shape[0] != n
            or shape[1] != 1
            or not (1 <= shape[2] <= height and 1 <= shape[3] <= width)
        ):
            raise MaskHookError(
                f"mask hook {name} at {where} returned shape {shape}; expected {n} x 1 x h x w with "
                f"1 <= h <= {height} and 1 <= w <= {width} (one low-res mask per sample)"
            )
        if not self._on_device(masks):
            raise MaskHookError(
                f"mask hook {name} at {where} returned masks on {masks.device}; the loader mixes on "
                f"{self.device}: create them there (the images it receives are there)"
            )
        if masks.dtype not in MASK_DTYPES:
            raise MaskHookError(
                f"mask hook {name} at {where} returned {masks.dtype} masks; use torch.float32 or torch.float16"
            )

    def _check_perm(
        self, perm, mask_shape, n: int, height: int, width: int, where: str, *, name: str = "perm"
    ) -> tuple[int, int]:
        """The block permutation's form (no device values read); returns its grid (gh, gw). ``name``:
        "perm" (the partner's) or "perm_self" (the own image's)."""
        hook, whose = self.hook.name, "own image's" if name == "perm_self" else "partner's"
        if not isinstance(perm, torch.Tensor):
            raise MaskHookError(
                f"mask hook {hook} at {where} returned {name} of type {type(perm).__name__}; {name} must be an int "
                f"torch.Tensor of shape {n} x gh x gw (output block -> the {whose} source block)"
            )
        shape = tuple(perm.shape)
        if perm.dim() == 2 and shape[0] == n and shape[1] == mask_shape[2] * mask_shape[3]:
            grid = (int(mask_shape[2]), int(mask_shape[3]))  # N x (h w): the masks' own grid
        elif perm.dim() == 3 and shape[0] == n and 1 <= shape[1] <= height and 1 <= shape[2] <= width:
            grid = (shape[1], shape[2])
        else:
            raise MaskHookError(
                f"mask hook {hook} at {where} returned {name} of shape {shape}; expected {n} x gh x gw with "
                f"1 <= gh <= {height} and 1 <= gw <= {width}, or {n} x {mask_shape[2] * mask_shape[3]} "
                "(the masks' own grid, row-major)"
            )
        if perm.dtype not in PERM_DTYPES:
            raise MaskHookError(
                f"mask hook {hook} at {where} returned {perm.dtype} {name}; use torch.int32 or torch.int64"
            )
        if not self._on_device(perm):
            raise MaskHookError(
                f"mask hook {hook} at {where} returned {name} on {perm.device}; the loader mixes on {self.device}"
            )
        return grid

    def _store(self, masks: torch.Tensor, perm: torch.Tensor | None = None, perm_self: torch.Tensor | None = None):
        """Copy the masks (and the permutations, clamped into range, as int32: the partners' rows, then
        the own images' rows of ``perm_self``) into the shared buffers; returns their views ``(N x 1 x
        h x w float32, flat int32 or None)``."""
        n, _, h, w = masks.shape
        need = n * h * w
        k = 0 if perm is None else perm.shape[1]
        tables = 1 if perm_self is None else 2
        cuda = self.device.type == "cuda"
        current = torch.cuda.current_stream(self.device) if cuda else None
        if cuda and self._last_stream is not None and self._last_stream != current:
            current.wait_event(self._last_stream.record_event())  # the previous kernel read the buffers there
        # an old buffer is freed on growth; record_stream (below, at each use) keeps the caching allocator
        # from handing its memory out before the kernels queued on other streams have read it
        if self._buffer.numel() < need:
            self._buffer = torch.empty(max(need, 2 * self._buffer.numel()), dtype=torch.float32, device=self.device)
            self._buffer_stream = current
        if self._gather.numel() < tables * n * k:
            self._gather = torch.empty(
                max(tables * n * k, 2 * self._gather.numel()), dtype=torch.int32, device=self.device
            )
            self._gather_stream = current
        if cuda:
            if current != self._buffer_stream:
                self._buffer.record_stream(current)  # read on a stream other than its allocation stream
            if perm is not None and current != self._gather_stream:
                self._gather.record_stream(current)
            self._last_stream = current
        view = self._buffer[:need].view(n, 1, h, w)
        view.copy_(masks.detach())
        if perm is None:
            return view, None
        table = self._gather[: tables * n * k]
        table[: n * k].view(n, k).copy_(perm.clamp(0, max(k - 1, 0)))  # in range whatever the (deferred) check finds
        if perm_self is not None:
            table[n * k :].view(n, k).copy_(perm_self.clamp(0, max(k - 1, 0)))
        return view, table


def make_stage(loader, fn, **options) -> MaskHookStage:
    """Check that ``loader`` can use a hook, and build its stage (``options``: ``MaskHook``'s fields,
    as ``ImageLoader.set_mask_hook`` takes them)."""
    hook = MaskHook(fn=fn, **options)
    methods = getattr(loader.mix, "methods", None) or []
    if not any(isinstance(m, (LearnedMask, MaskPolicy)) for m in methods):
        raise ValueError(
            "set_mask_hook needs a mixer with LearnedMask, e.g. ImageLoader(..., mix=Mixer(methods=[LearnedMask(alpha=2.0)])) "
            f"(this loader's mixer is {loader.mix!r})"
        )
    return MaskHookStage(hook, loader.device)
