"""Mixing methods and mixers: parameters sampled on the host, applied by the one fused kernel."""

from .methods import CutMix, FMix, GridMix, MixMethod, MixUp, ResizeMix, SamplePairing, SmoothMix
from .mixer import MODES, Mixer, Mixup
from .params import PAIRINGS, MixParams, pair_indices
from .puzzlemix import GradientSaliency, PuzzleMix
from .saliency import AttentiveMix, MaskPolicy, SaliencyMix, spectral_residual
from .targets import CompactTargets, one_hot_smoothed, soft_targets

# every method by name (``dalimix preview --mix NAME``)
METHODS = {
    cls.name: cls
    for cls in (MixUp, CutMix, SamplePairing, FMix, ResizeMix, GridMix, SmoothMix, SaliencyMix, AttentiveMix, PuzzleMix)
}

__all__ = [
    "METHODS",
    "MODES",
    "PAIRINGS",
    "AttentiveMix",
    "CompactTargets",
    "CutMix",
    "FMix",
    "GradientSaliency",
    "GridMix",
    "MaskPolicy",
    "MixMethod",
    "MixParams",
    "MixUp",
    "Mixer",
    "Mixup",
    "PuzzleMix",
    "ResizeMix",
    "SaliencyMix",
    "SamplePairing",
    "SmoothMix",
    "one_hot_smoothed",
    "pair_indices",
    "soft_targets",
    "spectral_residual",
]
