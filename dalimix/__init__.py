"""dalimix: DALI decodes and augments, dalimix's fused CUDA kernels mix, normalise, cast and lay out.

    from dalimix import ImageLoader
    loader = ImageLoader(root="train/", batch_size=256, size=224, device="cuda")
    for images, labels in loader: ...

The names below and the sub-modules (``dalimix.mix``, ``dalimix.demo_data``, ...) are imported on
first use, so ``import dalimix`` (and ``dalimix --help``) does not pay for importing torch and DALI.
"""

from __future__ import annotations

import importlib
import importlib.util
from typing import TYPE_CHECKING, Any

# The one place the version is written: pyproject.toml reads it (dynamic version).
__version__ = "0.1.0"

# public name -> the sub-module that defines it
_EXPORTS = {
    "DalimixError": "errors",
    "DalimixWarning": "errors",
    "DatasetError": "errors",
    "DecodeError": "errors",
    "StateError": "errors",
    "BatchInfo": "loader",
    "EpochPlan": "loader",
    "ImageLoader": "loader",
    "LastBatchPolicy": "loader",
    "plan_epoch": "loader",
    "create_loader": "compat",
    "Normalization": "ops",
    "mix_normalize": "ops",
}

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

if TYPE_CHECKING:  # for type checkers and IDEs; at run time __getattr__ imports on first use
    from .compat import create_loader
    from .errors import DalimixError, DalimixWarning, DatasetError, DecodeError
    from .loader import BatchInfo, EpochPlan, ImageLoader, LastBatchPolicy, plan_epoch
    from .ops import Normalization, mix_normalize


def __getattr__(name: str) -> Any:
    """Import a public name's module, or a sub-module (``dalimix.demo_data``), on first access."""
    module = _EXPORTS.get(name)
    if module is not None:
        value = getattr(importlib.import_module(f".{module}", __name__), name)
        globals()[name] = value
        return value
    if not name.startswith("_") and importlib.util.find_spec(f"{__name__}.{name}") is not None:
        return importlib.import_module(f".{name}", __name__)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))
