"""AutoMix's momentum pipeline schedules and the EMA update (cosine schedules, as OpenMixup's
``CosineScheduleHook`` for the momentum and ``CustomCosineAnnealingHook`` for the mask loss)."""

from __future__ import annotations

import math

import torch
from torch import nn


def cosine_rise(start: float, end: float, progress: float) -> float:
    """``start`` at progress 0, ``end`` at progress 1, along half a cosine."""
    p = min(max(float(progress), 0.0), 1.0)
    return end - (end - start) * (math.cos(math.pi * p) + 1.0) / 2.0


def cosine_decay(start: float, progress: float) -> float:
    """``start`` at progress 0 annealed to 0 at progress 1, along half a cosine."""
    return cosine_rise(start, 0.0, progress)


@torch.no_grad()
def ema_update(ema: nn.Module, model: nn.Module, momentum: float) -> None:
    """``ema_param = m * ema_param + (1 - m) * param`` for every parameter, in place (buffers such as
    BatchNorm statistics are left to the EMA model's own forward passes, as in OpenMixup)."""
    for e, p in zip(ema.parameters(), model.parameters()):
        e.mul_(momentum).add_(p.detach(), alpha=1.0 - momentum)
