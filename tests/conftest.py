"""Shared fixtures: the host shim, small generated data sets, the GPU marker's skip."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))

GPU_REASON = "needs a CUDA GPU: torch.cuda.is_available() is False on this machine (run benchmarks/gpu_suite.sh where there is one)"


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason=GPU_REASON)
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def shim(tmp_path_factory):
    from dalimix.testing.hostshim import HostShim

    return HostShim(build_dir=tmp_path_factory.mktemp("shim"))


@pytest.fixture(scope="session")
def small_dataset(tmp_path_factory) -> Path:
    """An ImageFolder tree of 4 classes x 5 generated photo-like JPEGs (20 files)."""
    from dalimix.demo_data import generate

    root = tmp_path_factory.mktemp("small")
    generate(root, per_class=5, classes=("bar", "disc", "ring", "star"))
    return root


def write_image(path: Path, array: np.ndarray, fmt: str | None = None, mode: str | None = None, **kw) -> Path:
    from PIL import Image

    img = Image.fromarray(array)
    if mode:
        img = img.convert(mode)
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path, format=fmt, **kw)
    return path


@pytest.fixture(autouse=True)
def _quiet_dali_logs(monkeypatch):
    monkeypatch.setenv("DALI_LOG_LEVEL", os.environ.get("DALI_LOG_LEVEL", "3"))
