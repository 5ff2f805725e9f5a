"""The command line: dalimix demo on a small data set."""

from __future__ import annotations

import re

import numpy as np
import pytest

from dalimix.cli import main


def test_demo_runs_and_writes_a_grid(small_dataset, tmp_path, capsys):
    out = tmp_path / "grid.png"
    assert (
        main(
            [
                "demo",
                "--data",
                str(small_dataset),
                "--epochs",
                "2",
                "--batch-size",
                "4",
                "--size",
                "48",
                "--device",
                "cpu",
                "--out",
                str(out),
            ]
        )
        == 0
    )
    text = capsys.readouterr().out
    assert re.search(r"device: cpu; 40 images in [\d.]+ s = [\d.]+ images/s", text)
    assert "mixing picture: " + str(out.resolve()) in text
    from PIL import Image

    grid = Image.open(out)
    assert grid.size[0] > 48 * 2 and grid.mode == "RGB"


def test_demo_without_mixing(small_dataset, tmp_path, capsys):
    assert (
        main(
            [
                "demo",
                "--data",
                str(small_dataset),
                "--epochs",
                "1",
                "--batch-size",
                "8",
                "--size",
                "32",
                "--device",
                "cpu",
                "--no-mix",
                "--out",
                str(tmp_path / "g.png"),
            ]
        )
        == 0
    )
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
        assert (
            main(
                [
                    "preview",
                    "--mix",
                    name,
                    "--data",
                    str(small_dataset),
                    "--size",
                    "40",
                    "--batch-size",
                    "6",
                    "--device",
                    "cpu",
                    "--out",
                    str(out),
                ]
            )
            == 0
        )
        assert out.exists()
        assert re.search(rf"{name}: 6 samples \(elem mode\), lam [\d.]+\.\.[\d.]+", capsys.readouterr().out)


def test_data_may_be_a_file_list(small_dataset, tmp_path, capsys):
    lst = tmp_path / "clean.txt"
    assert main(["scan", str(small_dataset), "--fix-list", str(lst), "--quiet"]) == 0
    assert (
        main(
            [
                "demo",
                "--data",
                str(lst),
                "--epochs",
                "1",
                "--batch-size",
                "4",
                "--size",
                "32",
                "--device",
                "cpu",
                "--no-mix",
                "--out",
                str(tmp_path / "g.png"),
            ]
        )
        == 0
    )
    assert "20 images" in capsys.readouterr().out


# ----------------------------------------------------------------- first contact


def _run_python(code: str, **kw):
    import subprocess
    import sys
    from pathlib import Path

    repo = Path(__file__).resolve().parent.parent
    env = {**__import__("os").environ, "PYTHONPATH": str(repo)}
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=600, **kw)


def test_help_imports_no_torch():
    res = _run_python(
        "import sys, contextlib, io\n"
        "from dalimix.cli import main\n"
        "with contextlib.redirect_stdout(io.StringIO()) as out:\n"
        "    try: main(['--help'])\n"
        "    except SystemExit: pass\n"
        "assert 'demo' in out.getvalue()\n"
        "print(sorted(m for m in ('torch', 'nvidia.dali', 'numpy', 'cupy') if m in sys.modules))"
    )
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == "[]"


def test_readme_quick_start_names_resolve_after_import_dalimix():
    res = _run_python(
        "import dalimix; print(dalimix.demo_data.CLASSES[0], dalimix.ImageLoader.__name__, "
        "dalimix.mix.Mixup.__name__, dalimix.__version__)"
    )
    assert res.returncode == 0, res.stderr
    assert res.stdout.split()[:3] == ["bar", "ImageLoader", "Mixup"]


def test_version_is_written_once():
    from pathlib import Path

    import tomllib

    import dalimix

    pyproject = tomllib.loads((Path(__file__).resolve().parent.parent / "pyproject.toml").read_text())
    assert "version" not in pyproject["project"] and "version" in pyproject["project"]["dynamic"]
    assert pyproject["tool"]["setuptools"]["dynamic"]["version"] == {"attr": "dalimix.__version__"}
    assert re.fullmatch(r"\d+\.\d+\.\d+", dalimix.__version__)


@pytest.mark.parametrize("epochs", ["0", "-1", "x"])
def test_demo_epochs_must_be_positive(epochs, capsys):
    with pytest.raises(SystemExit) as e:
        main(["demo", "--epochs", epochs])
    assert e.value.code == 2
    assert "argument --epochs" in capsys.readouterr().err


@pytest.mark.parametrize("flag", ["--batch-size", "--size"])
def test_sizes_are_checked_by_the_cli(flag, capsys):
    with pytest.raises(SystemExit):
        main(["demo", flag, "0"])
    assert f"argument {flag}: 0 is not >= 1" in capsys.readouterr().err


@pytest.mark.parametrize(
    "text, dtype", [("bf16", "bfloat16"), ("fp16", "float16"), ("float32", "float32"), ("BF16", "bfloat16")]
)
def test_dtype_spellings(text, dtype):
    from dalimix.cli import build_parser

    assert build_parser().parse_args(["demo", "--dtype", text]).dtype == dtype


def test_demo_bf16_runs(small_dataset, tmp_path, capsys):
    assert (
        main(
            [
                "demo",
                "--data",
                str(small_dataset),
                "--epochs",
                "1",
                "--batch-size",
                "4",
                "--size",
                "16",
                "--device",
                "cpu",
                "--dtype",
                "bf16",
                "--out",
                str(tmp_path / "g.png"),
            ]
        )
        == 0
    )
    assert "torch.bfloat16" in capsys.readouterr().out


def test_cli_messages_name_flags_not_keywords():
    from dalimix.cli import cli_message

    text = cli_message("list the good files with `dalimix scan DIR --fix-list OUT`, or pass on_error='skip'")
    assert text.endswith("or pass --on-error skip")
    assert "--data FILE" in cli_message("data root x is not a folder; pass a folder, or use file_list=")
    assert cli_message("batch_size=0: an int >= 1") == "--batch-size 0: an int >= 1"


@pytest.fixture
def broken_dataset(small_dataset, tmp_path):
    import shutil

    root = tmp_path / "broken"
    shutil.copytree(small_dataset, root)
    good = (root / "bar" / "bar_000.jpg").read_bytes()
    (root / "bar" / "bar_001.jpg").write_bytes(good[: len(good) // 3])  # truncated
    return root


def test_decode_error_names_the_cli_flag_and_hides_the_codec_log(broken_dataset, tmp_path, capfd):
    rc = main(
        [
            "demo",
            "--data",
            str(broken_dataset),
            "--epochs",
            "1",
            "--batch-size",
            "4",
            "--size",
            "16",
            "--device",
            "cpu",
            "--out",
            str(tmp_path / "g.png"),
        ]
    )
    err = capfd.readouterr().err
    assert rc == 2
    assert "bar_001.jpg" in err and "--on-error skip" in err and "on_error=" not in err
    assert "[ERROR]" not in err


def test_on_error_skip_flag(broken_dataset, tmp_path, capfd):
    from dalimix import DalimixWarning

    with pytest.warns(DalimixWarning, match="bar_001.jpg"):
        assert (
            main(
                [
                    "demo",
                    "--data",
                    str(broken_dataset),
                    "--epochs",
                    "1",
                    "--batch-size",
                    "4",
                    "--size",
                    "16",
                    "--device",
                    "cpu",
                    "--on-error",
                    "skip",
                    "--no-mix",
                    "--out",
                    str(tmp_path / "g.png"),
                ]
            )
            == 0
        )
    out, err = capfd.readouterr()
    assert "20 images" in out and "[ERROR]" not in err


def test_decoder_log_filter_keeps_everything_else(capfd):
    import os

    from dalimix._quiet import DecoderLogFilter

    with DecoderLogFilter() as f:
        os.write(2, b"epoch 0:  8%|# | 1/12\r\x1b[0;31m[ERROR] \x1b[0m[libjpeg_turbo_decoder] Could not decode jpeg\n")
        os.write(2, b"[ERROR] [nvimgcodec] Could not create decoder\n")  # not a decode failure: kept
        os.write(2, b"[ERR")  # split across writes
        os.write(2, b"OR] [libtiff_decoder] bad\nlast line\n")
    err = capfd.readouterr().err
    assert f.dropped == 2
    assert err == "epoch 0:  8%|# | 1/12\r[ERROR] [nvimgcodec] Could not create decoder\nlast line\n"


def test_decoder_log_filter_drops_the_format_parsers_lines_too():
    """nvImageCodec's jpeg_parser reports a damaged JPEG (zeroed Huffman tables) with its own
    [ERROR] lines before any decoder runs; they are the same noise as the decoders' lines."""
    from dalimix._quiet import split_decoder_lines

    line = b"\x1b[0;31m[ERROR] \x1b[0m[jpeg_parser] Invalid marker\n"
    assert split_decoder_lines(b"a\n" + line * 3 + b"b\n") == (b"a\nb\n", b"", 3)
    assert split_decoder_lines(b"[ERROR] [png_parser] x\n") == (b"", b"", 1)
    kept = b"[ERROR] [nvimgcodec] Could not create parser\n"
    assert split_decoder_lines(kept) == (kept, b"", 0)


def test_skipped_damaged_jpeg_leaves_no_codec_line_and_is_named(tmp_path, capfd):
    """`dalimix demo --on-error skip` over a JPEG whose Huffman tables are zeroed (PIL reads it,
    DALI's parser refuses it): stderr holds dalimix's warning naming the file, and no [ERROR] line."""
    import badfiles
    from PIL import Image

    from dalimix import DalimixWarning

    for c in ("a", "b"):
        (tmp_path / "data" / c).mkdir(parents=True)
        for i in range(4):
            Image.fromarray(badfiles.photo(seed=i)).save(tmp_path / "data" / c / f"{c}{i}.jpg")
    bad = tmp_path / "data" / "a" / "zeroed_dht.jpg"
    bad.write_bytes(badfiles.zeroed_dht(badfiles.jpeg_bytes(badfiles.photo())))
    argv = ["demo", "--data", str(tmp_path / "data"), "--epochs", "1", "--batch-size", "4", "--size", "16"]
    argv += ["--device", "cpu", "--on-error", "skip", "--no-mix", "--out", str(tmp_path / "g.png")]
    with pytest.warns(DalimixWarning, match="zeroed_dht.jpg"):
        assert main(argv) == 0
    err = capfd.readouterr().err
    assert "[ERROR]" not in err, err
    assert "nvImageCodec's decoder log hidden" in err


def test_split_decoder_lines_holds_a_partial_marker():
    from dalimix._quiet import split_decoder_lines

    assert split_decoder_lines(b"abc\x1b[0;3") == (b"abc", b"\x1b[0;3", 0)
    assert split_decoder_lines(b"abc[") == (b"abc", b"[", 0)
    assert split_decoder_lines(b"no marker\r") == (b"no marker\r", b"", 0)


def test_preset_prints_no_dali_deprecation_warnings(small_dataset):
    res = _run_python(
        "import warnings; warnings.simplefilter('default')\n"
        "from dalimix import ImageLoader\n"
        f"l = ImageLoader(root={str(small_dataset)!r}, batch_size=4, size=16, device='cpu', "
        "auto_augment='rand-m9-n2')\n"
        "for e in range(2):\n"
        "    for _ in l: pass\n"
        "from dalimix.policy import Policy\n"
        "p = Policy(sub_policies=[[('equalize', 1.0, None)], [('sharpness', 0.5, 4)]])\n"
        f"l = ImageLoader(root={str(small_dataset)!r}, batch_size=4, size=16, device='cpu', "
        "auto_augment=p)\n"
        "for _ in l: pass\n"
        "warnings.warn('other warnings still show', DeprecationWarning)\n"
    )
    assert res.returncode == 0, res.stderr
    assert "is now deprecated" not in res.stderr
    assert "other warnings still show" in res.stderr


def test_num_workers_hint():
    from dalimix import ImageLoader

    with pytest.raises(TypeError, match=r"num_workers= is not an argument of ImageLoader: use num_threads="):
        ImageLoader(root=".", batch_size=4, num_workers=2)
    with pytest.raises(TypeError, match=r"did you mean batch_size="):
        ImageLoader(root=".", batch_sise=4)


def test_cuda_path_names_the_extra(monkeypatch):
    import sys

    import torch

    from dalimix._optional import MissingExtraError
    from dalimix.ops import cuda

    monkeypatch.setitem(sys.modules, "cupy", None)  # as if CuPy were not installed
    with pytest.raises(MissingExtraError, match=r"pip install 'dalimix\[cuda\]'"):
        cuda._function(torch.device("cuda", 0), next(iter(cuda.ENTRIES)))


def test_bench_names_the_extra(monkeypatch, capsys):
    import sys

    monkeypatch.setitem(sys.modules, "matplotlib", None)
    assert main(["bench", "--quick"]) == 2
    assert "pip install 'dalimix[bench]'" in capsys.readouterr().err


def test_demo_data_progress(tmp_path, capsys):
    from dalimix.demo_data import generate

    generate(tmp_path, per_class=1, classes=("bar", "disc"), progress=True)
    assert "demo data" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.rglob("*.jpg")) == ["bar_000.jpg", "disc_000.jpg"]


@pytest.mark.parametrize("size", [16, 64, 224])
def test_mixing_picture_has_every_method_and_lam(small_dataset, size):
    from dalimix.mix import CutMix, FMix, MixUp
    from dalimix.viz import load_tile, method_table

    a, b = (load_tile(small_dataset / c / f"{c}_000.jpg", size) for c in ("bar", "disc"))
    picture = method_table(a, b, [MixUp(), CutMix(), FMix()], lams=(0.8, 0.5, 0.2), names=("bar", "disc"))
    tile = max(size, 160)
    assert picture.width >= 3 * tile and picture.height >= 4 * tile  # 3 lam columns; inputs + 3 method rows
    px = np.asarray(picture)
    assert px.std() > 10  # not blank


def test_preview_passes_set_keywords_to_the_method(small_dataset, tmp_path, capsys):
    out = tmp_path / "puzzlemix.png"
    args = ["preview", "--mix", "puzzlemix", "--data", str(small_dataset), "--size", "32", "--batch-size", "4"]
    args += ["--device", "cpu", "--out", str(out)]
    assert main([*args, "--set", "n_labels=3", "--set", "block_num=random", "--set", "block_choices=(2, 4)"]) == 0
    assert out.exists() and "puzzlemix: 4 samples" in capsys.readouterr().out
    from dalimix.cli import _preview_method

    method = _preview_method("puzzlemix", [("n_labels", 3), ("block_num", "random"), ("t_size", None)])
    assert (method.n_labels, method.block_num, method.t_size) == (3, "random", None)
    # an unknown keyword, a refused value: exit 2, the method and its keywords named, no traceback
    for bad, message in (
        ("nlabels=3", r"--set nlabels: --mix puzzlemix \(PuzzleMix\) has no such keyword"),
        ("n_labels=1", r"--set n_labels=1: --mix puzzlemix \(PuzzleMix\) refused it: n_labels=1: an int >= 2"),
    ):
        assert main([*args, "--set", bad]) == 2
        err = capsys.readouterr().err
        assert re.search(message, err) and "PuzzleMix's keywords: alpha, block_num" in err, err
        assert "Traceback" not in err
    with pytest.raises(SystemExit) as exit_:  # not KEY=VALUE: argparse's usage error
        main([*args, "--set", "n_labels"])
    assert exit_.value.code == 2 and "KEY=VALUE" in capsys.readouterr().err
