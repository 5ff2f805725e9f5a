"""dalimix: DALI decodes and augments, dalimix's fused CUDA kernels mix, normalise, cast and lay out.

    from dalimix import ImageLoader
    loader = ImageLoader(root="train/", batch_size=256, size=224, device="cuda")
    for images, labels in loader: ...
"""

from .errors import DalimixError, DalimixWarning, DatasetError, DecodeError, StateError
from .loader import BatchInfo, EpochPlan, ImageLoader, LastBatchPolicy, plan_epoch
from .compat import create_loader
from .ops import Normalization, mix_normalize

__version__ = "0.1.0"

__all__ = [
    "BatchInfo",
    "DalimixError",
    "DalimixWarning",
    "DatasetError",
    "StateError",
    "DecodeError",
    "EpochPlan",
    "ImageLoader",
    "LastBatchPolicy",
    "Normalization",
    "create_loader",
    "mix_normalize",
    "plan_epoch",
    "__version__",
]
