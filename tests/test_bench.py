"""``dalimix bench`` and ``benchmarks/bench_mix.py``: smoke runs at tiny sizes, and the pieces that
compute the figures (process-tree CPU and memory, ratios, the data view, the hand-written mixing
of the DALI baseline) checked against known answers. No timing is asserted: speed lives in the
benchmarks' printed numbers."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

from dalimix.bench import handmix, procstat, report
from dalimix.bench.driver import Settings, class_files, make_view
from dalimix.cli import main

REPO = Path(__file__).resolve().parents[1]
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _env() -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH")) if p)
    return env


# ----------------------------------------------------------------------------- smoke runs
def test_bench_quick_runs_every_loader_with_mixing_on_and_off(small_dataset, tmp_path, capsys):
    rc = main(
        ["bench", "--quick", "--data", str(small_dataset), "--out", str(tmp_path), "--no-progress", "--device", "cpu"]
    )
    printed = capsys.readouterr().out
    assert rc == 0, printed
    files = {p.suffix: p for p in tmp_path.iterdir()}
    assert set(files) == {".json", ".md", ".png"}
    assert files[".png"].read_bytes()[:8] == PNG_MAGIC
    raw = json.loads(files[".json"].read_text())
    assert raw["errors"] == []
    assert raw["machine"]["cpu_model"] and raw["machine"]["versions"]["torch"]
    assert "DataLoader num_workers" in raw["worker_mapping"]
    seen = {(r["library"], r["mix"]) for r in raw["results"]}
    assert seen == {(lib, mix) for lib in ("dalimix", "torchvision", "timm", "dali") for mix in (True, False)}
    for rec in raw["results"]:
        assert len(rec["warmup"]) == 1 and len(rec["epochs"]) == 2
        for ep in rec["epochs"]:
            # 20 files, batch 8, drop last: 2 batches of 8 in every loader
            assert (ep["images"], ep["batches"]) == (16, 2)
            assert ep["wall_s"] > 0 and ep["cpu_s"] > 0 and ep["memory_peak_bytes"] > 50 * 2**20
            first = ep["first_batch"]
            assert first["shape"] == [8, 3, 64, 64] and first["dtype"] == "float32" and first["finite"]
            assert first["device"] == "cpu"
            # soft targets with mixing (4 classes), class indices without
            assert first["targets_shape"] == ([8, 4] if rec["mix"] else [8])
    rows = {(r["library"], r["mix"]): r for r in raw["summary"]}
    assert rows[("dalimix", True)]["images_per_s_vs_dalimix"] == pytest.approx(1.0)
    tv = rows[("torchvision", True)]
    assert tv["images_per_s_vs_dalimix"] == pytest.approx(tv["images_per_s"] / rows[("dalimix", True)]["images_per_s"])
    assert len(raw["mixing_cost"]) == 4
    # the printed markdown is the written one
    md = files[".md"].read_text()
    assert md.strip() in printed
    for label in ("dalimix", "torchvision DataLoader + v2", "timm create_loader", "DALI + torch mixing"):
        assert f"| {label}" in md


def test_bench_mix_quick(small_dataset, tmp_path):
    out = subprocess.run(
        [
            sys.executable,
            str(REPO / "benchmarks" / "bench_mix.py"),
            "--quick",
            "--device",
            "cpu",
            "--data",
            str(small_dataset),
            "--out",
            str(tmp_path),
            "--no-progress",
        ],
        capture_output=True,
        text=True,
        env=_env(),
        timeout=600,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads(next(tmp_path.glob("bench-mix-cpu-*.json")).read_text())
    cases = {r["case"]: r for r in result["stage"]}
    for method in (
        "none",
        "mixup",
        "cutmix",
        "fmix",
        "resizemix",
        "gridmix",
        "smoothmix",
        "samplepairing",
        "fmix 1/4 res",
        "saliencymix",
        "attentivemix",
        "mixup|cutmix elem",
    ):
        assert cases[f"dalimix {method}"]["stage_ms"] > 0 and cases[f"dalimix {method}"]["op_ms"] > 0
    for base in ("timm Mixup", "torchvision v2", "torch by hand", "timm FastCollateMixup"):
        for method in ("mixup", "cutmix"):
            row = cases[f"{base} {method}"]
            assert row["stage_ms"] > 0 and row["mix_only_ms"] > 0 and row["stage_vs_dalimix"] > 0
    assert cases["dalimix mixup"]["op_vs_dalimix_mixup"] == pytest.approx(1.0)
    plans = {(r["method"], r["mode"]) for r in result["planning"]}
    assert (
        ("fmix", "elem") in plans
        and ("mixup|cutmix", "batch") in plans
        and ("puzzlemix", "elem") in plans
        and len(plans) == 24
    )
    loader = {r["setup"]: r for r in result["loader"]}
    assert set(loader) == {"off", "mixup|cutmix batch", "fmix elem"}
    assert loader["off"]["vs_off"] == pytest.approx(1.0)
    assert loader["fmix elem"]["plan_ms_per_batch"] > 0 and loader["fmix elem"]["wait_ms_per_batch"] is not None
    assert "Mixing stage" in out.stdout and "Planning" in out.stdout
    erase = {r["case"]: r for r in result["erase"]}
    for mode in ("const", "pixel"):
        for p in (0.25, 1.0):
            for how in ("fused", "separate pass (old)"):
                row = erase[f"+ erasing {mode} p={p} {how}"]
                assert row["wall_ms"] > 0 and row["cpu_ms"] >= 0
    assert erase["MixUp, no erasing"]["wall_vs_mixup"] == pytest.approx(1.0) and "Random erasing" in out.stdout


def test_gpu_suite_dry_run_shows_three_stages_that_fit_one_call_each():
    out = subprocess.run(
        ["bash", str(REPO / "benchmarks" / "gpu_suite.sh"), "--dry-run"], capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 0, out.stderr
    text = out.stdout
    stages = text.split("\nstage ")[1:]
    assert [s.split(":")[0] for s in stages] == ["1", "2", "3"]
    for i, stage in enumerate(stages):
        assert f"bash benchmarks/gpu_suite.sh {i + 1}" in stage
        assert f"dali-py312.tar.xz.part0{i}" in stage and "SHA256SUMS" in stage
        budget = int(stage.split("budget: ")[1].split(" s")[0])
        assert 60 <= budget <= 540  # inside the 600 s call limit, with room for the call itself
        travels = stage.split("travels: ")[1].split(" MiB")[0]
        if travels != "?":  # the bundle was built here: each call stays under 64 MiB
            assert float(travels) <= 64
    assert (
        sum(int(s.split("budget: ")[1].split(" s")[0]) for s in stages) <= 12 * 60
    )  # + start-up and transfers: 15 min
    assert "bench_mix.py --device cuda --no-loader --batch-sizes 256" in stages[0]
    assert "nvidia" not in stages[0].split("run:")[0] or "xz -d" not in stages[0]  # no DALI before stage 3
    assert "xz -d" in stages[2] and "-m gpu" in stages[2] and "dalimix.cli bench --device cuda" in stages[2]
    assert "results:" in text


def test_gpu_suite_stage_commands_select_tests_that_exist():
    """The -k expressions of stages 1 and 3 select tests (a typo would select none), stage 1 none
    that needs DALI, and between them every GPU test of tests/test_gpu.py once."""
    import shlex

    out = subprocess.run(
        ["bash", str(REPO / "benchmarks" / "gpu_suite.sh"), "--dry-run"], capture_output=True, text=True, timeout=60
    ).stdout
    selected = []
    for line in out.splitlines():
        line = line.strip()
        if line.startswith("run: python3 -m pytest") and " -k " in line:
            args = shlex.split(line[len("run: python3 ") :])
            res = subprocess.run(
                [sys.executable, *args, "--collect-only"],
                capture_output=True,
                text=True,
                cwd=REPO,
                env=_env(),
                timeout=120,
            )
            assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-2000:]
            selected.append({n for n in res.stdout.split() if "::" in n})
    stage1, stage3 = selected
    assert stage1 and stage3 and not stage1 & stage3
    assert not any("loader" in n or "policy" in n or "dataset" in n for n in stage1)
    assert any("standalone_twenty_batches" in n for n in stage1) and any(
        "twenty_batches_without" in n and "standalone" not in n for n in stage3
    )
    gpu_tests = subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",
            "-q",
            "-m",
            "gpu",
            "tests/test_gpu.py",
            "--collect-only",
            "-p",
            "no:cacheprovider",
        ],
        capture_output=True,
        text=True,
        cwd=REPO,
        env=_env(),
        timeout=120,
    ).stdout
    assert {n for n in gpu_tests.split() if "::" in n} <= stage1 | stage3


def test_gpu_bundle_pins():
    out = subprocess.run(
        ["bash", str(REPO / "benchmarks" / "gpu_bundle.sh"), "--dry-run"], capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 0, out.stderr
    pins = dict(line.split("wheel: ")[1].split("==") for line in out.stdout.splitlines() if line.startswith("wheel: "))
    assert pins["nvidia-dali-cuda130"] == "2.4.0" and pins["nvidia-libnvcomp-cu13"] == "5.3.0.16"
    assert pins["nvidia-nvimgcodec-cu13"].startswith("0.9.") and "nvidia-nvjpeg" in pins
    assert {"six", "packaging", "astunparse", "gast", "optree"} <= set(pins)
    assert "nvidia-nvjpeg2k-cu13" not in pins and "numpy" not in pins


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without a GPU")
def test_gpu_suite_refuses_without_a_gpu():
    out = subprocess.run(
        ["bash", str(REPO / "benchmarks" / "gpu_suite.sh"), "1"],
        capture_output=True,
        text=True,
        env=dict(_env(), PYTHON=sys.executable),
        timeout=120,
    )
    assert out.returncode == 1
    assert "no CUDA GPU" in out.stderr
    bad = subprocess.run(
        ["bash", str(REPO / "benchmarks" / "gpu_suite.sh"), "tests"], capture_output=True, text=True, timeout=60
    )
    assert bad.returncode == 2 and "1, 2 or 3" in bad.stderr


@pytest.mark.gpu
def test_bench_quick_on_cuda(small_dataset, tmp_path):
    rc = main(
        ["bench", "--quick", "--data", str(small_dataset), "--out", str(tmp_path), "--no-progress", "--device", "cuda"]
    )
    assert rc == 0
    raw = json.loads(next(tmp_path.glob("*.json")).read_text())
    assert raw["errors"] == []
    for rec in raw["results"]:
        assert rec["epochs"][0]["first_batch"]["device"].startswith("cuda")
    assert all(r["gpu_mib"] for r in raw["summary"])


# ----------------------------------------------------------------------------- arguments
def test_bench_rejects_bad_arguments(tmp_path, capsys):
    assert main(["bench", "--batch-sizes", "7", "--device", "cpu", "--out", str(tmp_path)]) == 2
    assert "even" in capsys.readouterr().err
    missing = tmp_path / "no-such-folder"
    assert main(["bench", "--data", str(missing), "--device", "cpu", "--out", str(tmp_path), "--no-progress"]) == 2
    assert str(missing) in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["bench", "--libraries", "dalimix,keras"])
    assert "keras" in capsys.readouterr().err
    with pytest.raises(ValueError, match="workers"):
        Settings(workers=0).validate()


# --------------------------------------------------------------------------- the pieces
def test_make_view_repeats_or_subsets_every_class(small_dataset, tmp_path):
    info = make_view(small_dataset, tmp_path / "rep", images=50, max_images=None)
    assert (info["source_files"], info["repeats"], info["files"]) == (20, 3, 60)
    view = class_files(tmp_path / "rep")
    assert sorted(view) == sorted(class_files(small_dataset))
    assert all(len(v) == 15 for v in view.values())
    # every link resolves to a file of the source, each listed 3 times
    targets = [p.resolve() for v in view.values() for p in v]
    assert sorted(set(targets)) == sorted(p.resolve() for v in class_files(small_dataset).values() for p in v)
    sub = make_view(small_dataset, tmp_path / "sub", images=4, max_images=8)
    assert (sub["distinct_files"], sub["repeats"]) == (8, 1)
    assert all(len(v) == 2 for v in class_files(tmp_path / "sub").values())


def test_procstat_counts_the_whole_tree(tmp_path):
    # a parent that burns 0.3 s of CPU, a child that burns 0.4 s and exits (waited for), and a
    # child that burns 0.3 s and stays alive: the tree's CPU time counts all three
    script = textwrap.dedent("""
        import os, sys, time
        def burn(s):
            end = time.process_time() + s
            while time.process_time() < end:
                pass
        pid = os.fork()
        if pid == 0:
            burn(0.4); os._exit(0)
        os.waitpid(pid, 0)
        r, w = os.pipe()
        live = os.fork()
        if live == 0:
            burn(0.3); os.write(w, b"x"); time.sleep(30); os._exit(0)
        os.read(r, 1)
        burn(0.3)
        print(live, flush=True)
        time.sleep(30)
    """)
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    live = None
    try:
        live = int(proc.stdout.readline())
        assert live in procstat.tree(proc.pid)
        cpu = procstat.cpu_seconds(proc.pid)
        assert 0.95 <= cpu < 5.0
        mem, kind = procstat.memory_bytes(proc.pid)
        assert kind in ("pss", "rss") and mem > 1 << 20
        with procstat.PeakSampler(proc.pid, interval=0.01) as sampler:
            pass
        assert sampler.peak_bytes >= mem // 2
    finally:
        proc.kill()
        proc.wait()
        if live is not None:
            try:
                os.kill(live, 9)
            except OSError:
                pass


def test_report_ratios_and_tables():
    def rec(lib, mix, ips, cores, mem):
        epoch = {
            "images": 100,
            "batches": 1,
            "wall_s": 100 / ips,
            "cpu_s": cores * 100 / ips,
            "memory_peak_bytes": mem * report.MIB,
            "memory_kind": "pss",
            "torch_gpu_peak_bytes": None,
        }
        return {"library": lib, "mix": mix, "batch_size": 64, "setup_s": 1.0, "epochs": [epoch, dict(epoch)]}

    raw = {
        "machine": {
            "date": "2026-01-01T00:00:00",
            "cpu_model": "X",
            "usable_cpus": 2,
            "memory_gib": 8,
            "gpu": None,
            "versions": {},
            "loadavg_start": [1.0],
            "loadavg_end": [2.0],
        },
        "settings": {"device": "cpu", "size": 224, "epochs": 2, "warmup": 1},
        "data": {"classes": 8, "distinct_files": 384, "repeats": 3, "files": 1152},
        "worker_mapping": "W = 2",
        "results": [
            rec("dalimix", True, 200, 1.5, 400),
            rec("torchvision", True, 50, 2.0, 800),
            rec("dalimix", False, 250, 1.4, 390),
            rec("torchvision", False, 100, 2.0, 790),
        ],
        "errors": [{"library": "timm", "mix": True, "batch_size": 64, "error": "ImportError: no timm"}],
    }
    rows = {(r["library"], r["mix"]): r for r in report.summarize(raw)}
    tv = rows[("torchvision", True)]
    assert tv["images_per_s_vs_dalimix"] == pytest.approx(0.25)
    assert tv["cpu_cores_vs_dalimix"] == pytest.approx(2.0 / 1.5)
    assert tv["memory_mib_vs_dalimix"] == pytest.approx(2.0)
    cost = {c["library"]: c["on_over_off"] for c in report.mixing_cost(list(rows.values()))}
    assert cost == pytest.approx({"dalimix": 0.8, "torchvision": 0.5})
    md = report.markdown(raw)
    assert "| torchvision DataLoader + v2 | on" in md and "0.25×" in md
    assert "not measured: ImportError: no timm" in md


class _FakeDevice:
    """A GPU seen device-wide: a base use plus what each live process holds; a process's memory
    comes back a couple of readings after it ended (as the driver hands it back)."""

    def __init__(self, total=80 << 30, base=600 << 20):
        self.total, self.base, self.held, self.leaving = total, base, {}, []

    def read(self):
        if self.leaving:
            self.leaving[0][1] -= 1
            if self.leaving[0][1] <= 0:
                self.held.pop(self.leaving.pop(0)[0])
        return self.total - self.base - sum(self.held.values()), self.total


class _FakeRunner:
    def __init__(self, device, key, holds):
        self.device, self.key = device, key
        device.held[key] = holds

    def stop(self):
        self.device.leaving.append([self.key, 2])


def test_gpu_memory_is_what_the_device_gets_back_from_each_process():
    """Each process's figure is everything it held (context + torch + DALI pools, here one number
    per fake process), measured the same way for every loader, whatever the others hold."""
    device = _FakeDevice()
    memory = procstat.DeviceMemory(device.read, "fake")
    holds = {("dalimix", True, 64): 1500 << 20, ("dali", True, 64): 2100 << 20, ("torchvision", True, 64): 500 << 20}
    runners = [_FakeRunner(device, key, value) for key, value in holds.items()]
    assert memory.used_bytes() == device.base + sum(holds.values())
    assert procstat.stop_and_measure(runners, memory) == holds
    assert device.held == {}
    # no reader: stopped together, nothing measured
    runners = [_FakeRunner(device, ("timm", False, 64), 1 << 20)]
    assert procstat.stop_and_measure(runners, None) == {("timm", False, 64): None}
    # a reader that fails gives None, not a wrong number
    broken = procstat.DeviceMemory(lambda: 1 / 0, "broken")
    assert broken.used_bytes() is None
    assert procstat.stop_and_measure([_FakeRunner(_FakeDevice(), "k", 5)], broken) == {"k": None}


def test_report_prefers_the_device_measure_and_says_when_rows_differ():
    def rec(lib, freed=None, nvml=None, torch_peak=None):
        epoch = {
            "images": 100,
            "batches": 1,
            "wall_s": 1.0,
            "cpu_s": 1.0,
            "memory_peak_bytes": report.MIB,
            "memory_kind": "pss",
            "torch_gpu_peak_bytes": torch_peak,
            "nvml_gpu_peak_bytes": nvml,
        }
        return {
            "library": lib,
            "mix": True,
            "batch_size": 64,
            "setup_s": 1.0,
            "epochs": [epoch],
            "gpu_freed_bytes": freed,
        }

    raw = {
        "machine": {
            "date": "2026-01-01T00:00:00",
            "cpu_model": "X",
            "usable_cpus": 2,
            "memory_gib": 8,
            "gpu": {"name": "G", "memory_gib": 80},
            "versions": {},
            "loadavg_start": [1.0],
            "loadavg_end": [2.0],
        },
        "settings": {"device": "cuda", "size": 224, "epochs": 1, "warmup": 1},
        "data": {"classes": 8, "distinct_files": 384, "repeats": 3, "files": 1152},
        "worker_mapping": "W = 2",
        "results": [
            rec("dalimix", freed=1000 * report.MIB, torch_peak=200 * report.MIB),
            rec("dali", freed=3000 * report.MIB, torch_peak=100 * report.MIB),
        ],
        "errors": [],
    }
    rows = {r["library"]: r for r in report.summarize(raw)}
    assert rows["dali"]["gpu_kind"] == "device" and rows["dali"]["gpu_mib"] == pytest.approx(3000)
    assert rows["dali"]["gpu_mib_vs_dalimix"] == pytest.approx(3.0)  # not torch's 0.5
    md = report.markdown(raw)
    assert "GPU: what the device got back" in md and "NOT like with like" not in md
    raw["results"][1]["gpu_freed_bytes"] = None  # one process could not be measured that way
    md = report.markdown(raw)
    assert "NOT like with like" in md and "DALI + torch mixing mixing on b64: torch" in md


def test_handmix_matches_reference_and_timm_targets():
    from timm.data.mixup import mixup_target

    rng = np.random.default_rng(0)
    x = torch.from_numpy(rng.normal(size=(6, 3, 10, 12)))
    labels = torch.tensor([0, 3, 1, 4, 2, 3])
    ref = 0.3 * x + 0.7 * x.flip(0)
    mixed, targets = handmix.mix_batch(
        x.clone(), labels, num_classes=5, rng=rng, method="mixup", lam=0.3, label_smoothing=0.1
    )
    torch.testing.assert_close(mixed, ref)
    torch.testing.assert_close(targets, mixup_target(labels, 5, lam=0.3, smoothing=0.1))

    rng = np.random.default_rng(1)
    box = handmix.cutmix_box(0.6, 10, 12, np.random.default_rng(1))
    mixed, targets = handmix.mix_batch(
        x.clone(), labels, num_classes=5, rng=rng, method="cutmix", lam=0.6, label_smoothing=0.0
    )
    y0, y1, x0, x1 = box
    expected = x.clone()
    expected[:, :, y0:y1, x0:x1] = x.flip(0)[:, :, y0:y1, x0:x1]
    torch.testing.assert_close(mixed, expected)
    lam = 1 - (y1 - y0) * (x1 - x0) / 120
    torch.testing.assert_close(targets, mixup_target(labels, 5, lam=lam, smoothing=0.0))
    with pytest.raises(ValueError, match="float"):
        handmix.mix_batch(torch.zeros(2, 3, 4, 4, dtype=torch.uint8), labels[:2], num_classes=5, rng=rng)


def test_report_compares_dalimix_mixed_with_plain_dali():
    def rec(lib, mix, ips, cpu_s):
        epoch = {
            "images": 100,
            "batches": 1,
            "wall_s": 100 / ips,
            "cpu_s": cpu_s,
            "memory_peak_bytes": report.MIB,
            "memory_kind": "pss",
            "torch_gpu_peak_bytes": None,
        }
        return {"library": lib, "mix": mix, "batch_size": 64, "setup_s": 1.0, "epochs": [epoch]}

    raw = {
        "machine": {
            "date": "2026-01-01T00:00:00",
            "cpu_model": "X",
            "usable_cpus": 2,
            "memory_gib": 8,
            "gpu": None,
            "versions": {},
        },
        "settings": {"device": "cpu", "size": 224, "epochs": 1, "warmup": 1},
        "data": {"classes": 8, "distinct_files": 384, "repeats": 1, "files": 384},
        "worker_mapping": "W = 2",
        "results": [rec("dalimix", True, 490, 0.42), rec("dali", False, 500, 0.40), rec("dali", True, 400, 0.5)],
    }
    free = report.mixing_for_free(report.summarize(raw))
    assert len(free) == 1 and free[0]["ratio"] == pytest.approx(0.98) and free[0]["cpu_ms_ratio"] == pytest.approx(1.05)
    assert "DALI's plain pipeline without mixing" in report.markdown(raw) and "0.980" in report.markdown(raw)
