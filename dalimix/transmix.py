"""TransMix (Chen et al., "TransMix: Attend to Mix for Vision Transformers", CVPR 2022): re-weight
CutMix labels by the vision transformer's own attention on the box.

For a CutMix sample whose partner shows inside a box, TransMix takes the class token's attention to
the patch tokens in the last block (mean over heads) from the same forward pass, and sets the
partner's label weight to ``(lam0 + lam1) / 2`` with ``lam0`` the box's area fraction and
``lam1 = sum(mask * attn) / sum(attn)``, ``mask`` the box at token resolution (the official
repository's orientation: the box holds the partner, ``target = y_own * (1 - lam) + y_partner * lam``).
In dalimix's convention ``lam`` is the OWN image's weight, so the returned lam is
``1 - (lam0 + lam1) / 2``. Samples mixed otherwise (MixUp, unmixed) keep their targets.

    rec = ClsAttention(vit)                       # a timm VisionTransformer
    for images, _ in loader:                      # mix=Mixup(mixup_alpha=0.8, cutmix_alpha=1.0)
        with rec:
            logits = vit(images)
        info = loader.last_batch
        targets = transmix_targets(info.labels, info.params, rec.attention, num_classes=C,
                                   height=H, width=W, grid=rec.grid)
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .mix.params import MixParams
from .mix.targets import CompactTargets, soft_targets
from .ops import Normalization, mix_normalize
from .ops.record import METHOD_BOX, METHOD_NONE
from .ops.staging import to_device


def _nearest_sources(in_size: int, out_size: int) -> np.ndarray:
    """Pixel each of ``out_size`` tokens samples under nearest resizing (F.interpolate's rule, as the
    official ``nn.Upsample(size=grid)`` of the pixel mask)."""
    scale = np.float32(in_size) / np.float32(out_size)
    return np.minimum(np.floor(np.arange(out_size, dtype=np.float32) * scale).astype(np.int64), in_size - 1)


def _grid(tokens: int, grid) -> tuple[int, int]:
    if grid is None:
        side = int(round(tokens**0.5))
        if side * side != tokens:
            raise ValueError(
                f"{tokens} patch tokens do not form a square grid; pass grid=(rows, cols) (timm: model.patch_embed.grid_size)"
            )
        return side, side
    gh, gw = (int(g) for g in grid)
    if gh * gw != tokens:
        raise ValueError(f"grid={grid} has {gh * gw} tokens but the attention has {tokens}")
    return gh, gw


def token_box_mask(params: MixParams, grid, *, height: int, width: int, device=None) -> torch.Tensor:
    """The CutMix boxes at token resolution: N x rows x cols float32, 1 where the partner's box
    covers a token (CutMix samples only; 0 everywhere for other samples).

    A token is covered when the pixel it samples under nearest resizing of the ``height x width``
    box mask to the token grid lies in the box (the official repository's rule).
    """
    gh, gw = (int(g) for g in grid)
    ys = _nearest_sources(height, gh)[None, :, None]
    xs = _nearest_sources(width, gw)[None, None, :]
    box: np.ndarray = params.box.astype(np.int64)[:, :, None, None]
    y0, x0, y1, x1 = box[:, 0], box[:, 1], box[:, 2], box[:, 3]
    inside = (ys >= y0) & (ys < y1) & (xs >= x0) & (xs < x1)
    inside &= (params.method == METHOD_BOX)[:, None, None]
    return to_device([inside.astype(np.float32)], device if device is not None else "cpu")[0].view(inside.shape)


def transmix_lam(params: MixParams, attention: torch.Tensor, *, height: int, width: int, grid=None) -> torch.Tensor:
    """Per-sample lam (weight of the sample's own image and label), N float32 on ``attention.device``:
    ``reweighted_lam`` with TransMix's settings (CutMix samples only, tokens by nearest resizing,
    ``attention_weight=0.5``).

    Args:
        params: the batch's mix parameters (``loader.last_batch.params``).
        attention: N x T class-token-to-patch attention of the last block, mean over heads, patches in
            row-major order (``ClsAttention.attention``).
        height, width: the image size the boxes refer to.
        grid: (rows, cols) of the patch grid (default: square).
    """
    return reweighted_lam(
        params,
        attention,
        height=height,
        width=width,
        grid=grid,
        attention_weight=0.5,
        tokens="nearest",
        rows=params.method == METHOD_BOX,
    )


def transmix_targets(
    labels: torch.Tensor,
    params: MixParams,
    attention: torch.Tensor,
    *,
    num_classes: int,
    height: int,
    width: int,
    grid=None,
    smoothing: float = 0.0,
    form: str = "soft",
):
    """The targets that follow from ``transmix_lam``: soft N x C (timm's rule with ``smoothing``) or
    ``CompactTargets`` (``form="compact"``), on ``labels.device``."""
    lam = transmix_lam(params, attention, height=height, width=width, grid=grid)
    return lam_targets(labels, params, lam, num_classes=num_classes, smoothing=smoothing, form=form)


# ------------------------------------------------------------- any attention, any method
TOKEN_RULES = ("area", "nearest")
_PROBE = Normalization(mean=(0.0, 0.0, 0.0), std=(1.0 / 255.0,) * 3)  # uint8 value v -> exactly v


def own_weight_maps(params: MixParams, *, height: int, width: int, device=None) -> torch.Tensor:
    """N x H x W float32: the weight of each sample's OWN image at every pixel, for any method, from
    the fused kernel itself (it mixes an all-ones batch with an all-zeros partner, so every method's
    geometry — boxes, masks, hook masks, grids, blobs, resized boxes — has one definition)."""
    device = torch.device(
        device if device is not None else (params.device_masks.device if params.device_masks is not None else "cpu")
    )
    n = params.n
    probe = torch.ones(n + 1, height, width, 3, dtype=torch.uint8, device=device)
    probe[n] = 0
    rec = params.records()
    rec["partner"] = n  # every partner is the zero image
    out = mix_normalize(probe, rec, params.mask_pool(device), norm=_PROBE, dtype=torch.float32)
    return out[:, 0]


def token_own_fraction(own: torch.Tensor, grid, rule: str = "area") -> torch.Tensor:
    """N x rows x cols: each token's share of own image. ``"area"``: the mean over the token's pixels
    (adaptive average pooling; TokenMix/TLA-style token labels); ``"nearest"``: the pixel nearest
    resizing samples for it (TransMix's official rule)."""
    gh, gw = (int(g) for g in grid)
    if rule == "area":
        return F.adaptive_avg_pool2d(own.unsqueeze(1), (gh, gw)).squeeze(1)
    if rule == "nearest":
        _, h, w = own.shape
        ys, xs = to_device([_nearest_sources(h, gh), _nearest_sources(w, gw)], own.device)
        return own[:, ys][:, :, xs]
    raise ValueError(f"tokens={rule!r}: 'area' (mean over the token's pixels) or 'nearest' (TransMix's rule)")


def reweighted_lam(
    params: MixParams,
    weights: torch.Tensor,
    *,
    height: int,
    width: int,
    grid=None,
    attention_weight=0.5,
    tokens: str = "area",
    rows=None,
) -> torch.Tensor:
    """Label re-weighting after the forward pass, for any attention or region weighting and any
    mixing method: N float32 own-label weights on ``weights.device``.

    ``lam' = (1 - a) * lam_pixels + a * lam_attention`` with ``lam_pixels`` the own image's pixel
    share (exact, from the kernel: ``own_weight_maps``) and ``lam_attention = sum(A * own) / sum(A)``
    the share of the weighting ``A`` (N x T tokens in row-major order, or N x rows x cols) that
    falls on the own image's tokens (``own`` from ``token_own_fraction`` with ``tokens``):

    - TransMix (Chen et al., CVPR 2022): class-token attention, ``a = 0.5``, ``tokens="nearest"``,
      CutMix samples (``transmix_lam``);
    - TokenMix (Liu et al., ECCV 2022) and TLA-style token-label alignment (Xiao et al., 2022):
      a (teacher's) activation or token attention, ``a = 1``, ``tokens="area"``;
    - MixPro's progressive attention labeling (Zhao et al., ICLR 2023): ``a`` the progressive factor
      (a float or N values, e.g. rising with training progress or per-sample confidence).

    Args:
        params: the batch's mix parameters (``loader.last_batch.params``).
        weights: non-negative N x T or N x rows x cols weighting (detached here).
        height, width: the image size.
        grid: (rows, cols) for N x T weights (default: square).
        attention_weight: ``a``, a float in [0, 1] or N values.
        tokens: "area" or "nearest" (see ``token_own_fraction``).
        rows: N booleans: which samples to re-weight (default: every mixed sample whose label follows
            its pixels, i.e. all but unmixed and SamplePairing samples); the others keep their lam.
    """
    if weights.dim() == 3:
        if weights.shape[0] != params.n:
            raise ValueError(f"weights must be N x rows x cols with N = {params.n}, got {tuple(weights.shape)}")
        gh, gw = weights.shape[1:]
    elif weights.dim() == 2 and weights.shape[0] == params.n:
        gh, gw = _grid(weights.shape[1], grid)
    else:
        raise ValueError(
            f"attention must be N x T with N = {params.n} (one row per sample), got {tuple(weights.shape)}"
        )
    if tokens not in TOKEN_RULES:
        raise ValueError(f"tokens={tokens!r}: 'area' (mean over the token's pixels) or 'nearest' (TransMix's rule)")
    attn = weights.detach().to(torch.float32).reshape(params.n, gh * gw)
    device = attn.device
    if rows is None:
        rows = (params.method != METHOD_NONE) & (params.target_lam == params.lam)
    rows = np.asarray(rows, dtype=bool)
    if isinstance(attention_weight, torch.Tensor) and attention_weight.device.type != "cpu":
        a = attention_weight.detach().to(device=device, dtype=torch.float32, non_blocking=True)  # device to device
        a = a.reshape(-1)
        in_range = a.numel() in (1, params.n) and bool(((a >= 0) & (a <= 1)).all())  # host sync: a device a
        (use,) = to_device([rows], device)
    else:
        a_host = np.asarray(attention_weight, dtype=np.float32).reshape(-1)
        in_range = a_host.size in (1, params.n) and bool(((a_host >= 0) & (a_host <= 1)).all())
        a, use = to_device([a_host, rows], device) if in_range else (None, None)
    if not in_range:
        raise ValueError(f"attention_weight must be in [0, 1]: a float or {params.n} values")
    own = own_weight_maps(params, height=height, width=width, device=device)
    lam_pixels = own.to(torch.float64).mean(dim=(1, 2)).to(torch.float32)
    frac = token_own_fraction(own, (gh, gw), tokens).reshape(params.n, -1)
    lam_attention = (frac * attn).sum(dim=1) / attn.sum(dim=1).clamp_min(torch.finfo(torch.float32).tiny)
    lam = (1 - a) * lam_pixels + a * lam_attention
    return torch.where(use, lam, params.target_lam_tensor(device))


def lam_targets(
    labels: torch.Tensor,
    params: MixParams,
    lam: torch.Tensor,
    *,
    num_classes: int,
    smoothing: float = 0.0,
    form: str = "soft",
):
    """Targets of the batch with per-sample own-label weights ``lam`` (from ``reweighted_lam``):
    soft N x C (timm's rule with ``smoothing``) or ``CompactTargets``, on ``labels.device``."""
    if lam.device != labels.device:
        lam = lam.to(labels.device)  # host sync: only when lam and labels live on different devices
    partner = params.partner_tensor(labels.device)
    if form == "compact":
        return CompactTargets(labels, labels[partner], lam, smoothing)
    if form != "soft":
        raise ValueError(f"form={form!r}: 'soft' or 'compact'")
    return soft_targets(labels, partner, lam, num_classes, smoothing)


def reweighted_targets(
    labels: torch.Tensor,
    params: MixParams,
    weights: torch.Tensor,
    *,
    num_classes: int,
    height: int,
    width: int,
    grid=None,
    attention_weight=0.5,
    tokens: str = "area",
    rows=None,
    smoothing: float = 0.0,
    form: str = "soft",
):
    """``lam_targets`` of ``reweighted_lam`` (same arguments): the one call after the forward pass."""
    lam = reweighted_lam(
        params,
        weights,
        height=height,
        width=width,
        grid=grid,
        attention_weight=attention_weight,
        tokens=tokens,
        rows=rows,
    )
    return lam_targets(labels, params, lam, num_classes=num_classes, smoothing=smoothing, form=form)


class ClsAttention:
    """Records the class token's attention to the patch tokens in one block of a timm
    ``VisionTransformer`` during a forward pass (mean over heads, detached, as the official code).

    Use as a context manager around the forward pass; ``attention`` is then N x T, ``grid`` the
    patch grid. Inside the context that block computes attention explicitly (timm's non-fused path,
    the same numbers up to rounding) so its probabilities can be read.

    Args:
        model: a timm vision transformer (``blocks[i].attn`` with ``attn_drop``; ``num_prefix_tokens``).
        block: which block (default: the last).
    """

    def __init__(self, model: nn.Module, *, block: int = -1):
        blocks = getattr(model, "blocks", None)
        attn = getattr(blocks[block], "attn", None) if blocks is not None else None
        if attn is None or not isinstance(getattr(attn, "attn_drop", None), nn.Module):
            raise ValueError(
                f"{type(model).__name__} is not a timm VisionTransformer (model.blocks[{block}].attn.attn_drop); "
                "compute the class-token attention yourself and pass it to transmix_lam"
            )
        self.module = attn
        self.prefix = int(getattr(model, "num_prefix_tokens", 1))
        patch = getattr(model, "patch_embed", None)
        self.grid = tuple(patch.grid_size) if patch is not None and getattr(patch, "grid_size", None) else None
        self.attention: torch.Tensor | None = None
        self._handle: Any = None  # torch's RemovableHandle while inside the block
        self._fused = None

    def _keep(self, module, inputs, output):
        probs = inputs[0]  # N x heads x tokens x tokens, after the softmax
        self.attention = probs.detach()[:, :, 0, self.prefix :].mean(dim=1)

    def __enter__(self) -> ClsAttention:
        self.attention = None
        self._fused = getattr(self.module, "fused_attn", None)
        if self._fused is not None:
            self.module.fused_attn = False
        self._handle = self.module.attn_drop.register_forward_hook(self._keep)
        return self

    def __exit__(self, *exc) -> None:
        if self._handle is not None:
            self._handle.remove()
            self._handle = None
        if self._fused is not None:
            self.module.fused_attn = self._fused
        if exc[0] is None and self.attention is None:
            raise ValueError(
                "the block's attention was never computed inside the context: run the model's forward there"
            )
