"""examples/search_awsaug.py end to end on a tiny data set (two rounds, one fine-tuning step each)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "search_awsaug.py"


def test_search_runs_and_plots(small_dataset, tmp_path, capsys):
    spec = importlib.util.spec_from_file_location("search_awsaug", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    out = tmp_path / "search.png"
    history = module.main(
        [
            "--data",
            str(small_dataset),
            "--size",
            "24",
            "--batch-size",
            "4",
            "--stage1-epochs",
            "1",
            "--rounds",
            "2",
            "--candidates",
            "2",
            "--finetune-steps",
            "1",
            "--heldout-per-class",
            "2",
            "--out",
            str(out),
        ]
    )
    assert history.shape == (3, len(module.SUB_POLICIES))
    np.testing.assert_allclose(history.sum(1), 1.0)
    assert np.allclose(history[0], 1 / len(module.SUB_POLICIES))
    assert out.stat().st_size > 10_000 and out.read_bytes()[:4] == b"\x89PNG"
    text = capsys.readouterr().out
    assert "12 training images, 8 held out, 4 classes" in text and "final distribution" in text
