"""Mixing methods and mixers: parameters sampled on the host, applied by the one fused kernel."""

from .methods import METHODS, CutMix, FMix, GridMix, MixMethod, MixUp, ResizeMix, SamplePairing, SmoothMix
from .mixer import MODES, Mixer, Mixup
from .params import PAIRINGS, MixParams, pair_indices
from .targets import CompactTargets, one_hot_smoothed, soft_targets

__all__ = [
    "METHODS", "MODES", "PAIRINGS", "CompactTargets", "CutMix", "FMix", "GridMix", "MixMethod", "MixParams",
    "MixUp", "Mixer", "Mixup", "ResizeMix", "SamplePairing", "SmoothMix", "one_hot_smoothed", "pair_indices",
    "soft_targets",
]
