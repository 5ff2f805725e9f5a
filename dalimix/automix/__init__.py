"""AutoMix (Liu et al., ECCV 2022) on dalimix's mask hook: Mix Block, momentum pipeline, two flows."""

from .features import FeatureTap
from .mixblock import MixBlock, adjust_to_lam
from .momentum import cosine_decay, cosine_rise, ema_update
from .trainer import AutoMix, mask_spatial_std

__all__ = [
    "AutoMix",
    "FeatureTap",
    "MixBlock",
    "adjust_to_lam",
    "cosine_decay",
    "cosine_rise",
    "ema_update",
    "mask_spatial_std",
]
