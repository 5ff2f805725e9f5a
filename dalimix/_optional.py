"""Optional dependencies: import one, or say which ``dalimix[extra]`` to install."""

from __future__ import annotations

import importlib
from types import ModuleType

# extra -> what it brings (pyproject.toml's [project.optional-dependencies])
EXTRAS = {
    "cuda": "CuPy, which compiles and launches dalimix's CUDA kernel (device='cuda')",
    "bench": "matplotlib, torchvision and timm, for `dalimix bench` and benchmarks/",
    "puzzlemix": "SciPy, for PuzzleMix's min-cut and transport",
}


class MissingExtraError(ImportError):
    """An optional dependency is not installed; the message names the ``pip install`` to run."""


def require(module: str, extra: str, purpose: str) -> ModuleType:
    """Import ``module``, or raise ``MissingExtraError`` naming ``pip install 'dalimix[extra]'``."""
    try:
        return importlib.import_module(module)
    except ImportError as e:
        raise MissingExtraError(
            f"{purpose} needs {module!r}, which is not installed (or does not import: {e}). "
            f"Install it with: pip install 'dalimix[{extra}]' ({EXTRAS[extra]})"
        ) from e
