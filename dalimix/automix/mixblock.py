"""AutoMix's Mix Block: a lam-conditioned cross-attention between two samples' feature maps that
outputs a mixing mask (Liu et al., "AutoMix: Unveiling the Power of Mixup for Stronger
Classifiers", ECCV 2022; the behaviour of OpenMixup's ``PixelMixBlock``, used by every released
AutoMix and SAMix config).
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..ops.staging import to_device

VALUE_SOURCES = ("partner", "own")
UPSAMPLINGS = ("nearest", "bilinear")


class MixBlock(nn.Module):
    """Mask logits for mixing sample ``i`` (weight ``lam``) with its partner ``j`` (``1 - lam``).

    For features ``z`` (N x C x h x w) of the clean batch:

    - lam embedding (``lam_concat=True``, the ImageNet configs): ``x_i = [z_i, lam]`` and
      ``x_j = [z_j, 1 - lam]`` (a constant extra channel); ``lam_concat=False`` (OpenMixup's default,
      the CIFAR configs): ``x_i = z_i``, ``x_j = z_j``, lam enters only through the losses;
    - query and key: ONE shared 1x1 conv ``C (+1) -> C / reduction`` applied to ``x_i`` and ``x_j``;
    - ``P = softmax(q_i^T k_j / sqrt(C / reduction))`` over ``j``'s positions, in float32;
    - value: a 1x1 conv ``C (+1) -> 1``. ``value_from="partner"`` (default; OpenMixup's current
      ``PixelMixBlock`` and every released AutoMix/SAMix config): it reads ``x_j``, ``P v_j`` is the
      logit of the PARTNER's weight at ``i``'s positions, so the own image's logits are ``-P v_j``.
      ``value_from="own"`` (an early OpenMixup variant, kept for comparison): it reads ``x_i`` and
      the own image's logits are ``P^T v_i`` (indexed by ``j``'s positions);
    - logits reshaped to ``h x w``. The mask (own image's weight) is ``sigmoid(upsample(logits))``
      with ``upsampling`` "nearest" or "bilinear" (``F.interpolate``, ``align_corners=False``):
      ``mask()`` does it here (differentiable), the loader's kernel does it for the mask hook.

    SAMix's variant (Li et al., "Boosting Discriminative Visual Representation Learning with
    Scenario-Agnostic Mixup", 2021; its released configs: ``MixBlock.samix(C)``): ``lam_mul=True``
    scales the features by lam instead of a channel (``x_i = z_i (1 + lam)``, ``x_j = z_j (2 - lam)``,
    OpenMixup's ``lam_mul=True, lam_residual=True``); ``qk_concat=True`` computes query and key with
    two convs from the same ``[x_i, x_j]`` (2C channels); ``value_hidden=c`` makes the value a
    non-linear neck ``conv(C -> c) -> BatchNorm -> ELU -> conv(c -> 1) -> dropout(value_dropout)``
    (convs without bias, OpenMixup's ``ConvNeck``).

    The convs start from N(0, 0.01) weights and zero biases (OpenMixup's init), so the first masks
    are close to a constant 0.5.
    """

    def __init__(
        self,
        in_channels: int,
        *,
        reduction: int = 2,
        value_from: str = "partner",
        lam_concat: bool = True,
        lam_mul: bool = False,
        qk_concat: bool = False,
        value_hidden: int | None = None,
        value_dropout: float = 0.0,
        init_std: float = 0.01,
    ):
        super().__init__()
        if isinstance(in_channels, bool) or int(in_channels) < 1:
            raise ValueError(
                f"in_channels={in_channels!r}: the feature map's channel count (e.g. 256 for ResNet-18's layer3)"
            )
        if int(reduction) < 1:
            raise ValueError(f"reduction={reduction!r}: a positive int (query/key width = in_channels // reduction)")
        if value_from not in VALUE_SOURCES:
            raise ValueError(
                f"value_from={value_from!r}: 'partner' (OpenMixup's PixelMixBlock: -P v_j) or "
                "'own' (an early variant: P^T v_i)"
            )
        if not isinstance(lam_concat, bool):
            raise ValueError(
                f"lam_concat={lam_concat!r}: True (lam as an extra channel, ImageNet configs) or False (CIFAR)"
            )
        for name, flag in (("lam_mul", lam_mul), ("qk_concat", qk_concat)):
            if not isinstance(flag, bool):
                raise ValueError(f"{name}={flag!r}: True or False")
        if lam_mul and lam_concat:
            raise ValueError("lam_concat and lam_mul both carry lam into the features: choose one (SAMix: lam_mul)")
        if value_hidden is not None and (isinstance(value_hidden, bool) or int(value_hidden) < 1):
            raise ValueError(
                f"value_hidden={value_hidden!r}: the value neck's hidden channels (SAMix: in_channels // 2) or None"
            )
        if not 0 <= float(value_dropout) < 1:
            raise ValueError(f"value_dropout={value_dropout!r}: a probability in [0, 1)")
        self.in_channels = int(in_channels)
        self.inter_channels = max(self.in_channels // int(reduction), 1)
        self.value_from = value_from
        self.lam_concat = lam_concat
        self.lam_mul = lam_mul
        self.qk_concat = qk_concat
        width = self.in_channels + int(lam_concat)
        qk_width = 2 * self.in_channels if qk_concat else width
        self.query = nn.Conv2d(qk_width, self.inter_channels, kernel_size=1)  # shared by q and k unless qk_concat
        self.key = nn.Conv2d(qk_width, self.inter_channels, kernel_size=1) if qk_concat else None
        if value_hidden is None:
            self.value = nn.Conv2d(width, 1, kernel_size=1)
        else:
            self.value = nn.Sequential(
                nn.Conv2d(width, int(value_hidden), 1, bias=False),
                nn.BatchNorm2d(int(value_hidden)),
                nn.ELU(),
                nn.Conv2d(int(value_hidden), 1, 1, bias=False),
                nn.Dropout(float(value_dropout)),
            )
        for conv in self.modules():
            if isinstance(conv, nn.Conv2d):
                nn.init.normal_(conv.weight, std=init_std)
                if conv.bias is not None:
                    nn.init.zeros_(conv.bias)

    @classmethod
    def samix(cls, in_channels: int, **overrides) -> MixBlock:
        """SAMix's Mix Block as its released configs build it: no lam channel, lam multiplied
        (residual), query and key from ``[x_i, x_j]``, a non-linear value neck of ``C / 2`` hidden
        channels with dropout 0.1."""
        args: dict[str, Any] = dict(
            lam_concat=False,
            lam_mul=True,
            qk_concat=True,
            value_hidden=max(int(in_channels) // 2, 1),
            value_dropout=0.1,
        )
        args.update(overrides)
        return cls(in_channels, **args)

    def forward(self, features: torch.Tensor, lam, partner) -> torch.Tensor:
        """Mask logits N x 1 x h x w (float32) of each sample's OWN image weight.

        Args:
            features: N x C x h x w feature map of the clean batch.
            lam: weight of each sample's own image: a float or N values.
            partner: N partner indices into the batch (a tensor or array).
        """
        if features.dim() != 4 or features.shape[1] != self.in_channels:
            raise ValueError(f"features must be N x {self.in_channels} x h x w, got {tuple(features.shape)}")
        z = features.to(torch.float32)
        n, _, h, w = z.shape
        lam = _lam_on(lam, z.device).to(torch.float32)
        if lam.numel() == 1:
            lam = lam.expand(n)
        if lam.numel() != n:
            raise ValueError(f"lam must be a float or {n} values, got {lam.numel()}")
        partner = partner_on(partner, z.device).reshape(-1)
        if partner.numel() != n:
            raise ValueError(f"partner must hold {n} indices, got {partner.numel()}")
        x_i, x_j = z, z[partner]
        if self.lam_concat:
            lam_map = lam.view(n, 1, 1, 1).expand(n, 1, h, w)
            x_i = torch.cat([x_i, lam_map], dim=1)
            x_j = torch.cat([x_j, 1.0 - lam_map], dim=1)
        if self.lam_mul:
            x_i = x_i * (1.0 + lam.view(n, 1, 1, 1))
            x_j = x_j * (2.0 - lam.view(n, 1, 1, 1))
        if self.qk_concat:
            assert self.key is not None  # built with qk_concat
            both = torch.cat([x_i, x_j], dim=1)
            q, k = self.query(both).flatten(2), self.key(both).flatten(2)
        else:
            q = self.query(x_i).flatten(2)  # N x d x hw
            k = self.query(x_j).flatten(2)
        attn = torch.softmax(q.transpose(1, 2) @ k / math.sqrt(self.inter_channels), dim=-1)  # N x hw_i x hw_j
        if self.value_from == "own":
            v = self.value(x_i).flatten(2).transpose(1, 2)  # N x hw x 1
            logits = attn.transpose(1, 2) @ v
        else:
            v = self.value(x_j).flatten(2).transpose(1, 2)
            logits = -(attn @ v)
        return logits.view(n, 1, h, w)

    @staticmethod
    def mask(logits: torch.Tensor, size, mode: str = "nearest") -> torch.Tensor:
        """``sigmoid(upsampling of logits to size)``: N x 1 x H x W, differentiable (``mode``
        "nearest" or "bilinear", ``align_corners=False``, as the loader's kernel)."""
        if mode not in UPSAMPLINGS:
            raise ValueError(f"mode={mode!r}: 'nearest' or 'bilinear'")
        extra = {} if mode == "nearest" else {"align_corners": False}
        return torch.sigmoid(F.interpolate(logits, size=tuple(size), mode=mode, **extra))


def adjust_to_lam(
    logits: torch.Tensor, lam: torch.Tensor, size, mode: str = "nearest", eps: float = 1e-8
) -> torch.Tensor:
    """AutoMix's ``mask_adjust``: each own-image mask ``m = sigmoid(upsample(logits))`` rescaled so
    that its mean at ``size`` is the sample's lam — ``m * lam / mean`` when the mean is above lam,
    ``1 - (1 - m) * (1 - lam) / (1 - mean)`` when below (masks clamped to ``[eps, 1 - eps]`` first,
    as OpenMixup's ``AutoMixup``) — returned as logits for the same upsampling.

    Nearest upsampling commutes with these pointwise maps, so nearest logits stay h x w (the full-size
    mean comes from the upsampling weights, exactly). For bilinear the sigmoid does not commute: the
    returned logits are N x 1 x H x W (the kernel's bilinear step at scale 1 is the identity).
    Computed on the logits' device, in float64, without a host round trip.
    """
    from ..hook import upsampling_weights

    height, width = (int(s) for s in size)
    n = logits.shape[0]
    lam = _lam_on(lam, logits.device)
    lam = (lam.expand(n) if lam.numel() == 1 else lam).view(n, 1, 1, 1)
    if mode == "bilinear":
        m = MixBlock.mask(logits.to(torch.float32), (height, width), "bilinear").to(torch.float64).clamp(eps, 1 - eps)
        mean = m.mean(dim=(1, 2, 3), keepdim=True)
    else:
        m = torch.sigmoid(logits.to(torch.float64)).clamp(eps, 1 - eps)
        h, w = m.shape[-2:]
        wy, wx = to_device(
            [upsampling_weights(h, height, False) / height, upsampling_weights(w, width, False) / width], m.device
        )
        mean = torch.einsum("y,nyx,x->n", wy, m.reshape(n, h, w), wx).view(n, 1, 1, 1)
    above, below = mean > lam + eps, mean < lam - eps
    m = torch.where(above, m * (lam / mean), torch.where(below, 1 - (1 - m) * ((1 - lam) / (1 - mean)), m))
    return torch.logit(m).to(torch.float32)


def _lam_on(lam, device: torch.device) -> torch.Tensor:
    """lam (a float, N values or a tensor) as float64 on ``device`` without a host wait: a device
    tensor is cast there, a float is a fill, host values travel through the staging ring."""
    if isinstance(lam, torch.Tensor) and lam.device.type != "cpu":
        return lam.to(device=device, dtype=torch.float64, non_blocking=True).reshape(-1)  # device to device
    if isinstance(lam, torch.Tensor) and device.type == "cpu":
        return lam.to(torch.float64).reshape(-1)
    values = np.asarray(lam, dtype=np.float64).reshape(-1)
    if values.size == 1:
        return torch.full((1,), float(values[0]), dtype=torch.float64, device=device)
    return to_device([values], device)[0]


def partner_on(partner, device: torch.device) -> torch.Tensor:
    """Partner indices as int64 on ``device`` without a host wait: a device tensor stays there
    (cast there), host indices travel through the staging ring (one asynchronous copy)."""
    if isinstance(partner, torch.Tensor) and partner.device.type != "cpu":
        return partner.to(device=device, dtype=torch.long, non_blocking=True)  # device to device
    if isinstance(partner, torch.Tensor) and device.type == "cpu":
        return partner.to(torch.long).reshape(-1)
    return to_device([np.asarray(partner, dtype=np.int64)], device)[0]  # a CPU tensor reads as an array
