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

import numpy as np
import torch
from torch import nn

from .mix.params import MixParams
from .mix.targets import CompactTargets, soft_targets
from .ops.record import METHOD_BOX


def _nearest_sources(in_size: int, out_size: int) -> np.ndarray:
    """Pixel each of ``out_size`` tokens samples under nearest resizing (F.interpolate's rule, as the
    official ``nn.Upsample(size=grid)`` of the pixel mask)."""
    scale = np.float32(in_size) / np.float32(out_size)
    return np.minimum(np.floor(np.arange(out_size, dtype=np.float32) * scale).astype(np.int64), in_size - 1)


def _grid(tokens: int, grid) -> tuple[int, int]:
    if grid is None:
        side = int(round(tokens ** 0.5))
        if side * side != tokens:
            raise ValueError(f"{tokens} patch tokens do not form a square grid; pass grid=(rows, cols) (timm: model.patch_embed.grid_size)")
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
    y0, x0, y1, x1 = (params.box[:, k].astype(np.int64)[:, None, None] for k in range(4))
    inside = (ys >= y0) & (ys < y1) & (xs >= x0) & (xs < x1)
    inside &= (params.method == METHOD_BOX)[:, None, None]
    return torch.from_numpy(inside.astype(np.float32)).to(device if device is not None else "cpu")


def transmix_lam(params: MixParams, attention: torch.Tensor, *, height: int, width: int, grid=None) -> torch.Tensor:
    """Per-sample lam (weight of the sample's own image and label), N float32 on ``attention.device``.

    Args:
        params: the batch's mix parameters (``loader.last_batch.params``).
        attention: N x T class-token-to-patch attention of the last block, mean over heads, patches in
            row-major order (``ClsAttention.attention``).
        height, width: the image size the boxes refer to.
        grid: (rows, cols) of the patch grid (default: square).
    """
    if attention.dim() != 2 or attention.shape[0] != params.n:
        raise ValueError(f"attention must be N x T with N = {params.n} (one row per sample), got {tuple(attention.shape)}")
    gh, gw = _grid(attention.shape[1], grid)
    attn = attention.detach().to(torch.float32)
    mask = token_box_mask(params, (gh, gw), height=height, width=width, device=attn.device).reshape(params.n, -1)
    inside = (mask * attn).sum(dim=1)
    total = attn.sum(dim=1)
    lam1 = inside / total.clamp_min(torch.finfo(torch.float32).tiny)
    area = (params.box[:, 2] - params.box[:, 0]).astype(np.float64) * (params.box[:, 3] - params.box[:, 1])
    lam0 = torch.from_numpy((area / float(height * width)).astype(np.float32)).to(attn.device)
    own = 1.0 - (lam0 + lam1) / 2.0
    boxed = torch.from_numpy(params.method == METHOD_BOX).to(attn.device)
    return torch.where(boxed, own, params.target_lam_tensor(attn.device))


def transmix_targets(labels: torch.Tensor, params: MixParams, attention: torch.Tensor, *, num_classes: int, height: int,
                     width: int, grid=None, smoothing: float = 0.0, form: str = "soft"):
    """The targets that follow from ``transmix_lam``: soft N x C (timm's rule with ``smoothing``) or
    ``CompactTargets`` (``form="compact"``), on ``labels.device``."""
    lam = transmix_lam(params, attention, height=height, width=width, grid=grid).to(labels.device)
    partner = torch.from_numpy(params.partner).to(labels.device)
    if form == "compact":
        return CompactTargets(labels, labels[partner], lam, smoothing)
    if form != "soft":
        raise ValueError(f"form={form!r}: 'soft' or 'compact'")
    return soft_targets(labels, partner, lam, num_classes, smoothing)


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
            raise ValueError(f"{type(model).__name__} is not a timm VisionTransformer (model.blocks[{block}].attn.attn_drop); "
                             "compute the class-token attention yourself and pass it to transmix_lam")
        self.module = attn
        self.prefix = int(getattr(model, "num_prefix_tokens", 1))
        patch = getattr(model, "patch_embed", None)
        self.grid = tuple(patch.grid_size) if patch is not None and getattr(patch, "grid_size", None) else None
        self.attention: torch.Tensor | None = None
        self._handle = None
        self._fused = None

    def _keep(self, module, inputs, output):
        probs = inputs[0]  # N x heads x tokens x tokens, after the softmax
        self.attention = probs.detach()[:, :, 0, self.prefix:].mean(dim=1)

    def __enter__(self) -> "ClsAttention":
        self.attention = None
        self._fused = getattr(self.module, "fused_attn", None)
        if self._fused is not None:
            self.module.fused_attn = False
        self._handle = self.module.attn_drop.register_forward_hook(self._keep)
        return self

    def __exit__(self, *exc) -> None:
        self._handle.remove()
        if self._fused is not None:
            self.module.fused_attn = self._fused
        if exc[0] is None and self.attention is None:
            raise ValueError("the block's attention was never computed inside the context: run the model's forward there")
