"""AutoMix's Mix Block: a lam-conditioned cross-attention between two samples' feature maps that
outputs a mixing mask (Liu et al., "AutoMix: Unveiling the Power of Mixup for Stronger
Classifiers", ECCV 2022; behaviour of OpenMixup's ``PixelMixBlock`` with ``lam_concat=True``).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

VALUE_SOURCES = ("own", "partner")


class MixBlock(nn.Module):
    """Mask logits for mixing sample ``i`` (weight ``lam``) with its partner ``j`` (``1 - lam``).

    For features ``z`` (N x C x h x w) of the clean batch:

    - lam embedding: ``x_i = [z_i, lam]`` and ``x_j = [z_j, 1 - lam]`` (a constant extra channel);
    - query and key: ONE shared 1x1 conv ``C + 1 -> C / reduction`` applied to ``x_i`` and ``x_j``;
    - ``P = softmax(q_i^T k_j / sqrt(C / reduction))`` over ``j``'s positions, in float32;
    - value: a 1x1 conv ``C + 1 -> 1``; with ``value_from="own"`` (OpenMixup's code) it reads
      ``x_i`` and the logits are ``P^T v_i`` (indexed by ``j``'s positions), with
      ``value_from="partner"`` it reads ``x_j`` and the logits are ``P v_j`` (plain cross-attention);
    - logits reshaped to ``h x w``. The mask is ``sigmoid(upsample_nearest(logits))``: ``mask()``
      does it here (differentiable), the loader's kernel does it for the mask hook
      (``logits=True``, the sigmoid after upsampling).

    The convs start from N(0, 0.01) weights and zero biases (OpenMixup's init), so the first masks
    are close to a constant 0.5.
    """

    def __init__(self, in_channels: int, *, reduction: int = 2, value_from: str = "own", init_std: float = 0.01):
        super().__init__()
        if isinstance(in_channels, bool) or int(in_channels) < 1:
            raise ValueError(f"in_channels={in_channels!r}: the feature map's channel count (e.g. 256 for ResNet-18's layer3)")
        if int(reduction) < 1:
            raise ValueError(f"reduction={reduction!r}: a positive int (query/key width = in_channels // reduction)")
        if value_from not in VALUE_SOURCES:
            raise ValueError(f"value_from={value_from!r}: 'own' (OpenMixup: P^T v_i) or 'partner' (P v_j)")
        self.in_channels = int(in_channels)
        self.inter_channels = max(self.in_channels // int(reduction), 1)
        self.value_from = value_from
        self.query = nn.Conv2d(self.in_channels + 1, self.inter_channels, kernel_size=1)  # shared by q and k
        self.value = nn.Conv2d(self.in_channels + 1, 1, kernel_size=1)
        for conv in (self.query, self.value):
            nn.init.normal_(conv.weight, std=init_std)
            nn.init.zeros_(conv.bias)

    def forward(self, features: torch.Tensor, lam, partner) -> torch.Tensor:
        """Mask logits N x 1 x h x w (float32).

        Args:
            features: N x C x h x w feature map of the clean batch.
            lam: weight of each sample's own image: a float or N values.
            partner: N partner indices into the batch (a tensor or array).
        """
        if features.dim() != 4 or features.shape[1] != self.in_channels:
            raise ValueError(f"features must be N x {self.in_channels} x h x w, got {tuple(features.shape)}")
        z = features.to(torch.float32)
        n, _, h, w = z.shape
        lam = torch.as_tensor(lam, dtype=torch.float32, device=z.device).reshape(-1)
        if lam.numel() == 1:
            lam = lam.expand(n)
        if lam.numel() != n:
            raise ValueError(f"lam must be a float or {n} values, got {lam.numel()}")
        partner = torch.as_tensor(partner, dtype=torch.long, device=z.device).reshape(-1)
        if partner.numel() != n:
            raise ValueError(f"partner must hold {n} indices, got {partner.numel()}")
        lam_map = lam.view(n, 1, 1, 1).expand(n, 1, h, w)
        x_i = torch.cat([z, lam_map], dim=1)
        x_j = torch.cat([z[partner], 1.0 - lam_map], dim=1)
        q = self.query(x_i).flatten(2)  # N x d x hw
        k = self.query(x_j).flatten(2)
        attn = torch.softmax(q.transpose(1, 2) @ k / math.sqrt(self.inter_channels), dim=-1)  # N x hw_i x hw_j
        if self.value_from == "own":
            v = self.value(x_i).flatten(2).transpose(1, 2)  # N x hw x 1
            logits = attn.transpose(1, 2) @ v
        else:
            v = self.value(x_j).flatten(2).transpose(1, 2)
            logits = attn @ v
        return logits.view(n, 1, h, w)

    @staticmethod
    def mask(logits: torch.Tensor, size) -> torch.Tensor:
        """``sigmoid(nearest upsampling of logits to size)``: N x 1 x H x W, differentiable."""
        return torch.sigmoid(F.interpolate(logits, size=tuple(size), mode="nearest"))
