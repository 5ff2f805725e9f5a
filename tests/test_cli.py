"""The command line: dalimix demo on a small data set."""

from __future__ import annotations

import re

from dalimix.cli import main


def test_demo_runs_and_writes_a_grid(small_dataset, tmp_path, capsys):
    out = tmp_path / "grid.png"
    assert main(["demo", "--data", str(small_dataset), "--epochs", "2", "--batch-size", "4", "--size", "48",
                 "--device", "cpu", "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert re.search(r"device: cpu; 40 images in [\d.]+ s = [\d.]+ images/s", text)
    assert "batch grid: " + str(out.resolve()) in text
    from PIL import Image

    grid = Image.open(out)
    assert grid.size[0] > 48 * 2 and grid.mode == "RGB"


def test_demo_without_mixing(small_dataset, tmp_path, capsys):
    assert main(["demo", "--data", str(small_dataset), "--epochs", "1", "--batch-size", "8", "--size", "32",
                 "--device", "cpu", "--no-mix", "--out", str(tmp_path / "g.png")]) == 0
    assert "20 images" in capsys.readouterr().out


def test_errors_are_reported_not_raised(tmp_path, capsys):
    assert main(["demo", "--data", str(tmp_path / "missing"), "--device", "cpu"]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_preview_every_method(small_dataset, tmp_path, capsys):
    from dalimix.cli import MIX_NAMES
    from dalimix.mix import METHODS

    assert tuple(sorted(METHODS)) == MIX_NAMES
    for name in ("cutmix", "fmix", "samplepairing"):
        out = tmp_path / f"{name}.png"
        assert main(["preview", "--mix", name, "--data", str(small_dataset), "--size", "40", "--batch-size", "6",
                     "--device", "cpu", "--out", str(out)]) == 0
        assert out.exists()
        assert re.search(rf"{name}: 6 samples \(elem mode\), lam [\d.]+\.\.[\d.]+", capsys.readouterr().out)


def test_data_may_be_a_file_list(small_dataset, tmp_path, capsys):
    lst = tmp_path / "clean.txt"
    assert main(["scan", str(small_dataset), "--fix-list", str(lst), "--quiet"]) == 0
    assert main(["demo", "--data", str(lst), "--epochs", "1", "--batch-size", "4", "--size", "32", "--device", "cpu",
                 "--no-mix", "--out", str(tmp_path / "g.png")]) == 0
    assert "20 images" in capsys.readouterr().out
