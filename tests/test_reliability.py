"""Reliability: scanning data sets, fuzzed files, random invalid arguments, clean shutdown."""

from __future__ import annotations

import gc
import json
import os
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dalimix import DalimixError, ImageLoader
from dalimix.cli import main
from dalimix.mix import CutMix, FMix, GridMix, Mixer, MixUp, Mixup, ResizeMix, SamplePairing, SmoothMix
from dalimix.ops import mix_normalize
from dalimix.ops.record import RECORD_DTYPE
from conftest import write_image


def make_dataset(root: Path, n_per_class=3):
    rng = np.random.default_rng(0)
    for cls in ("a", "b"):
        for i in range(n_per_class):
            write_image(root / cls / f"{i}.jpg", rng.integers(0, 255, (24, 30, 3), dtype=np.uint8))
    return root


# ------------------------------------------------------------------------------- scan
def test_scan_lists_bad_files_and_writes_a_clean_list(tmp_path, capsys):
    root = make_dataset(tmp_path / "data")
    (root / "a" / "1.jpg").write_bytes(b"")
    jpg = (root / "b" / "0.jpg").read_bytes()
    (root / "b" / "0.jpg").write_bytes(jpg[: len(jpg) // 3])
    (root / "b" / "fake.png").write_text("hello")
    out = tmp_path / "clean.txt"
    assert main(["scan", str(root), "--fix-list", str(out), "--workers", "2", "--quiet"]) == 1
    text = capsys.readouterr().out
    for bad, why in (("a/1.jpg", "is empty"), ("b/0.jpg", "truncated"), ("b/fake.png", "not an image")):
        assert f"{root / bad}: " in text and why in text
    assert "scanned 7 files in 2 classes: 3 unreadable" in text
    loader = ImageLoader(file_list=out, batch_size=2, size=16, device="cpu")
    assert loader.classes == ["a", "b"] and len(loader.dataset) == 4
    assert sum(len(y) for _, y in loader) == 4
    assert main(["scan", str(make_dataset(tmp_path / "good")), "--quiet"]) == 0


# ------------------------------------------------------------------------------- fuzz
FUZZ_SCRIPT = textwrap.dedent(
    """
    import json, os, sys
    import numpy as np
    from hypothesis import given, settings, strategies as st, HealthCheck
    from PIL import Image
    from dalimix import ImageLoader, DecodeError

    work = sys.argv[1]
    rng = np.random.default_rng(0)
    os.makedirs(f"{work}/data/a", exist_ok=True)
    for i in range(2):
        Image.fromarray(rng.integers(0, 255, (20, 26, 3), dtype=np.uint8)).save(f"{work}/data/a/good{i}.jpg")
    seeds = {}
    for fmt in ("jpg", "png", "webp"):
        p = f"{work}/seed.{fmt}"
        Image.fromarray(rng.integers(0, 255, (21, 27, 3), dtype=np.uint8)).save(p, progressive=fmt == "jpg")
        seeds[fmt] = open(p, "rb").read()
    target = f"{work}/data/a/fuzz"
    log = open(f"{work}/log.jsonl", "w")

    @settings(max_examples=int(sys.argv[2]), deadline=None, database=None, derandomize=True,
              suppress_health_check=list(HealthCheck))
    @given(fmt=st.sampled_from(sorted(seeds)), cut=st.one_of(st.just(1.0), st.just(0.0), st.floats(0, 1)),
           flips=st.lists(st.tuples(st.floats(0.3, 1), st.integers(0, 255)), max_size=4))
    def check(fmt, cut, flips):
        data = bytearray(seeds[fmt][: int(len(seeds[fmt]) * cut)])
        for where, value in flips:
            if data:
                data[min(int(where * len(data)), len(data) - 1)] = value
        for old in os.listdir(f"{work}/data/a"):
            if old.startswith("fuzz"):
                os.remove(f"{work}/data/a/{old}")
        path = f"{target}.{fmt}"
        open(path, "wb").write(bytes(data))
        log.write(json.dumps({"fmt": fmt, "cut": cut, "flips": flips}) + "\\n"); log.flush()
        loader = ImageLoader(root=f"{work}/data", batch_size=3, size=16, device="cpu", num_threads=1)
        try:
            for images, labels in loader:
                assert images.shape[1:] == (3, 16, 16) and bool(images.isfinite().all())
            outcome = "decoded"
        except DecodeError as e:
            assert path in str(e), str(e)
            outcome = "error"
        log.write(json.dumps({"outcome": outcome}) + "\\n"); log.flush()

    check()
    print("ok")
    """
)


def test_fuzzed_files_give_an_image_or_a_dalimix_error(tmp_path):
    """Random truncations, byte flips and empty files of JPEG/PNG/WebP: every case yields a
    correct batch or a DecodeError naming the file; the process neither crashes nor hangs
    (it runs in a subprocess with a time bound)."""
    script = tmp_path / "fuzz.py"
    script.write_text(FUZZ_SCRIPT)
    env = {**os.environ, "DALI_LOG_LEVEL": "3"}
    try:
        res = subprocess.run([sys.executable, str(script), str(tmp_path), "40"], capture_output=True, text=True,
                             timeout=240, env=env)
    except subprocess.TimeoutExpired:
        pytest.fail(f"fuzzing hung; last inputs: {(tmp_path / 'log.jsonl').read_text()[-500:]}")
    log = (tmp_path / "log.jsonl").read_text().splitlines()
    assert res.returncode == 0, f"rc={res.returncode}\n{res.stdout[-2000:]}\n{res.stderr[-3000:]}\nlast input: {log[-1:]}"
    outcomes = [json.loads(line)["outcome"] for line in log if "outcome" in line]
    assert len(outcomes) >= 40 and {"decoded", "error"} <= set(outcomes)


# -------------------------------------------------------------- random invalid arguments
junk = st.one_of(st.none(), st.booleans(), st.integers(-5, 5), st.floats(allow_nan=True, allow_infinity=True),
                 st.text(max_size=6), st.tuples(st.integers(-3, 300)), st.tuples(st.floats(-2, 2), st.floats(-2, 2)),
                 st.lists(st.integers(-2, 3), max_size=3))

LOADER_ARGS = ["batch_size", "size", "dtype", "channels_last", "mean", "std", "scale", "ratio", "hflip", "crop_pct",
               "interpolation", "seed", "shard_id", "num_shards", "last_batch_policy", "num_threads", "prefetch", "device"]


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_loader_arguments_fail_cleanly(small_dataset, data):
    """Random values for random arguments: the loader is built, or a ValueError / dalimix error says why."""
    names = data.draw(st.lists(st.sampled_from(LOADER_ARGS), min_size=1, max_size=3, unique=True))
    kwargs = {"root": small_dataset, "batch_size": 4, "device": "cpu", "size": 16}
    kwargs.update({k: data.draw(junk, label=k) for k in names})
    try:
        loader = ImageLoader(**kwargs)
    except (ValueError, DalimixError):
        return
    loader.close()


@settings(max_examples=200, deadline=None)
@given(data=st.data())
def test_mixer_arguments_fail_cleanly(data):
    makers = {
        "Mixup": (Mixup, ["mixup_alpha", "cutmix_alpha", "cutmix_minmax", "prob", "switch_prob", "mode", "correct_lam",
                          "label_smoothing", "num_classes", "pairing", "targets"]),
        "MixUp": (MixUp, ["alpha"]),
        "CutMix": (CutMix, ["alpha", "minmax", "correct_lam"]),
        "FMix": (FMix, ["alpha", "decay_power", "mask_size", "mask_scale"]),
        "ResizeMix": (ResizeMix, ["scope", "interpolation"]),
        "GridMix": (GridMix, ["alpha", "n_holes", "hole_aspect_ratio", "cut_area_ratio", "cut_aspect_ratio"]),
        "SmoothMix": (SmoothMix, ["sigma_range"]),
        "SamplePairing": (SamplePairing, ["start_epoch", "end_epoch", "on_epochs", "off_epochs"]),
    }
    cls, args = makers[data.draw(st.sampled_from(sorted(makers)))]
    names = data.draw(st.lists(st.sampled_from(args), min_size=1, max_size=3, unique=True))
    kwargs = {k: data.draw(junk, label=k) for k in names}
    try:
        method = cls(**kwargs)
    except ValueError:
        return
    # what was accepted must work
    mixer = method if isinstance(method, Mixer) else Mixer(methods=[method], num_classes=5)
    mixer.num_classes = mixer.num_classes or 5
    mixer.set_epoch(0)
    try:
        p = mixer.plan(6, rng=np.random.default_rng(0), height=32, width=32)
    except ValueError:  # e.g. GridMix holes that do not fit this image size
        return
    images = torch.zeros(6, 32, 32, 3, dtype=torch.uint8)
    x, t = mixer(images, torch.zeros(6, dtype=torch.int64), params=p)
    assert torch.isfinite(x).all() and torch.isfinite(t).all()


@settings(max_examples=200, deadline=None)
@given(data=st.data())
def test_garbage_records_are_refused_before_any_kernel_runs(data):
    n = data.draw(st.integers(1, 4))
    raw = data.draw(st.lists(st.integers(-(2**31), 2**31 - 1), min_size=16 * n, max_size=16 * n))
    rec = np.array(raw, dtype=np.int32).view(RECORD_DTYPE)
    images = torch.zeros(n, 6, 5, 3, dtype=torch.uint8)
    try:
        out = mix_normalize(images, rec, torch.zeros(8))
    except ValueError:
        return
    assert torch.isfinite(out).all() or (rec["method"] == 6).any()  # SmoothMix with huge 1/(2 sigma^2) stays finite too


# -------------------------------------------------------------------------- shutdown
def _native_threads() -> int:
    return len(os.listdir("/proc/self/task"))


@pytest.mark.skipif(not Path("/proc/self/task").exists(), reason="counts threads through /proc (Linux)")
def test_dropping_a_loader_mid_epoch_leaves_no_threads(small_dataset):
    def run(epochs_started):
        loader = ImageLoader(root=small_dataset, batch_size=4, size=16, device="cpu", mix=Mixup())
        for _ in range(epochs_started):
            it = iter(loader)
            next(it)
            next(it)
        del it, loader
        gc.collect()  # the loader and its running iterator refer to each other: a cycle for the collector

    run(1)  # warm up process-wide pools (torch's, DALI's) that live as long as the process
    gc.collect()
    before = _native_threads()
    run(3)
    deadline = time.time() + 5
    while _native_threads() > before and time.time() < deadline:
        time.sleep(0.05)
    assert _native_threads() == before
    # a loader's own threads are gone (the host kernels' pool is process-wide, like torch's)
    assert not [t.name for t in threading.enumerate() if t.name.startswith(("dalimix-planner", "dalimix-reaper"))]
    # no child processes either
    children = Path(f"/proc/{os.getpid()}/task/{os.getpid()}/children")
    if children.exists():
        assert children.read_text().strip() == ""


# ------------------------------------------------------------------------ on_error
def corrupt_dataset(root: Path) -> tuple[Path, list[Path]]:
    rng = np.random.default_rng(1)
    for cls in ("a", "b"):
        for i in range(7):
            write_image(root / cls / f"{i}.jpg", rng.integers(0, 255, (20 + i, 24, 3), dtype=np.uint8))
    bad = [root / "a" / "3.jpg", root / "b" / "5.jpg"]
    bad[0].write_bytes(b"")
    data = bad[1].read_bytes()
    bad[1].write_bytes(data[: len(data) // 4])
    return root, bad


def run_epochs(loader, epochs):
    out = []
    for e in range(epochs):
        loader.set_epoch(e)
        for images, labels in loader:
            ids = loader.last_batch.sample_ids.copy()
            out.append((e, ids, images.clone(), labels.clone()))
    return out


def test_skip_replaces_unreadable_files_deterministically(tmp_path):
    root, bad = corrupt_dataset(tmp_path / "data")
    kw = dict(root=root, batch_size=4, size=16, device="cpu", seed=2, on_error="skip")
    loader = ImageLoader(**kw)
    bad_ids = {loader.dataset.paths.index(str(p)) for p in bad}
    with pytest.warns(Warning) as record:
        got = run_epochs(loader, 3)
    warned = [str(w.message) for w in record if "dalimix: skipping" in str(w.message)]
    assert len(warned) == 2 and all(any(str(p) in m for m in warned) for p in bad)  # once per file
    assert set(loader.skipped) == {str(p) for p in bad}
    assert "empty" in loader.skipped[str(bad[0])] and "truncated" in loader.skipped[str(bad[1])]
    assert loader.skip_count == 6  # two files, three epochs
    for epoch in range(3):
        batches = [g for g in got if g[0] == epoch]
        assert [len(g[1]) for g in batches] == [4, 4, 4, 2]  # sizes kept
        ids = np.concatenate([g[1] for g in batches])
        assert not set(ids.tolist()) & bad_ids
        # each unreadable sample's place went to the next readable one in the epoch order
        order = loader.plan(epoch).order[:14]
        expected = order.copy()
        for pos in np.flatnonzero(np.isin(order, list(bad_ids))):
            nxt = pos + 1
            while order[nxt % 14] in bad_ids:
                nxt += 1
            expected[pos] = order[nxt % 14]
        assert ids.tolist() == expected.tolist()
        for g in batches:
            assert g[3].tolist() == loader.dataset.labels[g[1]].tolist()
    # the same seed gives the same batches, whether the bad files are found during the run or known
    again = run_epochs(ImageLoader(**kw), 3)
    for a, b in zip(got, again):
        assert np.array_equal(a[1], b[1]) and torch.equal(a[2], b[2])


def test_raise_is_the_default_and_names_the_way_out(tmp_path):
    root, bad = corrupt_dataset(tmp_path / "data")
    loader = ImageLoader(root=root, batch_size=14, size=16, device="cpu")
    with pytest.raises(DalimixError) as e:
        list(loader)
    msg = str(e.value)
    assert all(str(p) in msg for p in bad) and "epoch 0, step 0" in msg and "on_error='skip'" in msg
    with pytest.raises(ValueError, match="on_error='ignore'"):
        ImageLoader(root=root, batch_size=4, on_error="ignore")


# ------------------------------------------------------------------------- kill -9
KILL_SCRIPT = textwrap.dedent(
    """
    import os, sys, time, torch
    from dalimix import ImageLoader
    from dalimix.mix import Mixup
    root, ckpt, mode = sys.argv[1], sys.argv[2], sys.argv[3]
    loader = ImageLoader(root=root, batch_size=3, size=16, device="cpu", seed=5, num_threads=1,
                         mix=Mixup(mixup_alpha=0.8, cutmix_alpha=1.0, mode="elem"))
    seen = []
    if mode == "resume":
        saved = torch.load(ckpt, weights_only=True)
        loader.load_state_dict(saved["loader"])
        seen = list(saved["seen"])
    loader.set_epoch(0)
    for images, targets in loader:
        seen += loader.last_batch.sample_ids.tolist()
        # one atomic checkpoint after every step: what was trained on, and where to go on
        torch.save({"loader": loader.state_dict(), "seen": seen}, ckpt + ".tmp")
        os.replace(ckpt + ".tmp", ckpt)
        if mode == "run" and len(seen) >= 9:
            print("ready", flush=True)
            time.sleep(600)  # killed here, mid-epoch
    print(" ".join(map(str, seen)), flush=True)
    """
)


def test_kill_9_mid_epoch_and_resume_loses_and_repeats_nothing(small_dataset, tmp_path):
    script = tmp_path / "train.py"
    script.write_text(KILL_SCRIPT)
    ckpt = str(tmp_path / "ckpt.pt")
    env = {**os.environ, "DALI_LOG_LEVEL": "3"}
    full = subprocess.run([sys.executable, str(script), str(small_dataset), str(tmp_path / "full.pt"), "full"],
                          capture_output=True, text=True, env=env, timeout=120)
    assert full.returncode == 0, full.stderr
    want = [int(i) for i in full.stdout.split()]
    victim = subprocess.Popen([sys.executable, str(script), str(small_dataset), ckpt, "run"], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True, env=env)
    try:
        assert victim.stdout.readline().strip() == "ready"
    finally:
        victim.kill()  # SIGKILL: no cleanup, no flush beyond what is on disk
        victim.wait(timeout=30)
    assert victim.returncode == -9
    resumed = subprocess.run([sys.executable, str(script), str(small_dataset), ckpt, "resume"], capture_output=True,
                             text=True, env=env, timeout=120)
    assert resumed.returncode == 0, resumed.stderr
    got = [int(i) for i in resumed.stdout.split()]
    assert got == want  # the same samples in the same order: none lost, none repeated
    assert sorted(got) == list(range(20))


# ------------------------------------------------- random hook outputs and new arguments
def _hook_output(draw_kind, rng, n, h, w):
    """Masks a careless hook might return."""
    kinds = {
        "good": lambda: torch.rand(n, 1, 7, 5),
        "good_f16": lambda: torch.rand(n, 1, h, w).half(),
        "nan": lambda: torch.full((n, 1, 4, 4), float("nan")),
        "inf": lambda: torch.full((n, 1, 4, 4), float("inf")),
        "above_one": lambda: torch.rand(n, 1, 4, 4) + 1.5,
        "negative": lambda: -torch.rand(n, 1, 4, 4) - 0.1,
        "wrong_n": lambda: torch.rand(n + 1, 1, 4, 4),
        "three_channels": lambda: torch.rand(n, 3, 4, 4),
        "three_dims": lambda: torch.rand(n, 4, 4),
        "too_big": lambda: torch.rand(n, 1, h + 3, w),
        "int": lambda: torch.ones(n, 1, 4, 4, dtype=torch.int32),
        "float64": lambda: torch.rand(n, 1, 4, 4, dtype=torch.float64),
        "numpy": lambda: np.random.rand(n, 1, 4, 4),
        "none": lambda: None,
        "raises": lambda: (_ for _ in ()).throw(RuntimeError("hook bug")),
        "empty": lambda: torch.rand(n, 1, 0, 4),
    }
    return kinds[draw_kind]()


@pytest.fixture(scope="module")
def hooked_loader(small_dataset):
    from dalimix.hook import LearnedMask

    state = {"kind": "good"}
    loader = ImageLoader(root=small_dataset, batch_size=2, size=12, device="cpu",
                         mix=Mixer(methods=[LearnedMask()], mode="elem", num_classes=4))
    loader.set_mask_hook(lambda images, lam, partner: _hook_output(state["kind"], None, images.shape[0], 12, 12))
    return loader, state


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(kind=st.sampled_from(["good", "good_f16", "nan", "inf", "above_one", "negative", "wrong_n", "three_channels",
                             "three_dims", "too_big", "int", "float64", "numpy", "none", "raises", "empty"]))
def test_random_hook_outputs_give_a_batch_or_a_clear_error(hooked_loader, kind):
    from dalimix.hook import MaskHookError

    loader, state = hooked_loader
    it = getattr(hooked_loader, "_it", None)

    def next_batch():
        nonlocal it
        for _ in range(2):
            try:
                return next(it)
            except (StopIteration, TypeError):
                it = iter(loader)
        raise AssertionError("no batch")

    state["kind"] = kind
    try:
        images, targets = next_batch()
        assert kind in ("good", "good_f16", "float64") and torch.isfinite(images).all()
    except MaskHookError as e:
        assert kind not in ("good", "good_f16") and str(e)
    state["kind"] = "good"
    images, targets = next_batch()  # the loader stays usable
    assert torch.isfinite(images).all() and torch.allclose(targets.sum(1), torch.ones(len(targets)))


@settings(max_examples=120, deadline=None)
@given(data=st.data())
def test_policy_hook_and_automix_arguments_fail_cleanly(data):
    import torchvision

    from dalimix.automix import AutoMix
    from dalimix.hook import LearnedMask
    from dalimix.policy import Policy

    which = data.draw(st.sampled_from(["policy", "probs", "learned", "automix"]))
    try:
        if which == "policy":
            Policy(sub_policies=data.draw(st.one_of(junk, st.lists(st.lists(st.tuples(st.sampled_from(
                ["rotate", "flip?", "hflip", "invert", 3]), junk, junk), max_size=2), max_size=2))),
                probs=data.draw(junk))
        elif which == "probs":
            p = Policy(sub_policies=[[("hflip", 1.0, 0)], [("invert", 0.5, 0)]])
            before = p.probs
            try:
                p.set_probs(data.draw(st.one_of(junk, st.lists(st.floats(allow_nan=True), max_size=3))))
            except ValueError:
                assert np.array_equal(p.probs, before)  # a refused vector leaves the old one in place
        elif which == "learned":
            LearnedMask(alpha=data.draw(junk), mixup_margin=data.draw(junk))
        else:
            kw = {k: data.draw(junk, label=k) for k in data.draw(st.lists(st.sampled_from(
                ["input_size", "alpha", "momentum", "mask_loss_weight", "mixup_margin"]), max_size=2, unique=True))}
            AutoMix(model=torchvision.models.resnet18(num_classes=4), feature_layer=data.draw(
                st.sampled_from(["layer3", "layer9", "fc"])), **kw)
    except (ValueError, DalimixError):
        pass
