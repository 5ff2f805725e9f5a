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
from conftest import write_image
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dalimix import DalimixError, ImageLoader
from dalimix.cli import main
from dalimix.mix import CutMix, FMix, GridMix, Mixer, MixUp, Mixup, ResizeMix, SamplePairing, SmoothMix
from dalimix.ops import mix_normalize
from dalimix.ops.record import RECORD_DTYPE


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

    # the kinds a fuzzer rarely finds, each once, under raise, skip and strict: files PIL reads and
    # DALI cannot, headers claiming 60000x60000, byte flips PIL refuses, a FIFO named like an image
    sys.path.insert(0, sys.argv[3])
    import badfiles
    import dalimix.scan
    from pathlib import Path
    from dalimix import DatasetError
    dalimix.scan._cache_dir = lambda: Path(work) / "cache"  # strict verdicts cached here, not in ~/.cache
    specials = {name: data for name, (data, _) in badfiles.corpus().items()}
    specials["fifo.jpg"] = None
    good = {f"{work}/data/a/good{i}.jpg" for i in range(2)}
    for name, data in specials.items():
        for old in os.listdir(f"{work}/data/a"):
            if old.startswith("fuzz"):
                os.remove(f"{work}/data/a/{old}")
        path = f"{target}-{name}"
        os.mkfifo(path) if data is None else open(path, "wb").write(data)
        log.write(json.dumps({"special": name}) + "\\n"); log.flush()
        for strict in (False, True):
            try:
                loader = ImageLoader(root=f"{work}/data", batch_size=3, size=16, device="cpu", num_threads=1,
                                     train=False, strict=strict)
                for images, labels in loader:
                    assert bool(images.isfinite().all())
                assert not strict and name == "flipped.jpg", name  # only DALI-decodable damage passes, unless strict
            except (DecodeError, DatasetError) as e:
                assert [p for p, _ in getattr(e, "files", [])] in ([path], []) and path in str(e), str(e)
                assert not any(g in str(e) for g in good), str(e)
        import warnings
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            loader = ImageLoader(root=f"{work}/data", batch_size=3, size=16, device="cpu", num_threads=1,
                                 on_error="skip")
            seen = {loader.dataset.paths[i] for _ in loader for i in loader.last_batch.sample_ids}
        assert set(loader.skipped) <= {path} and good <= seen, (name, loader.skipped, seen)
        log.write(json.dumps({"outcome": "special"}) + "\\n"); log.flush()
    print("ok")
    """
)


@pytest.mark.slow
def test_fuzzed_files_give_an_image_or_a_dalimix_error(tmp_path):
    """Random truncations, byte flips and empty files of JPEG/PNG/WebP, then each kind of
    ``tests/badfiles.py`` and a FIFO: every case yields a correct batch or a dalimix error naming
    that file and no other (under "skip": only that file dropped); the process neither crashes nor
    hangs (it runs in a subprocess with a time bound)."""
    script = tmp_path / "fuzz.py"
    script.write_text(FUZZ_SCRIPT)
    env = {**os.environ, "DALI_LOG_LEVEL": "3"}
    try:
        res = subprocess.run(
            [sys.executable, str(script), str(tmp_path), "40", str(Path(__file__).parent)],
            capture_output=True,
            text=True,
            timeout=240,
            env=env,
        )
    except subprocess.TimeoutExpired:
        pytest.fail(f"fuzzing hung; last inputs: {(tmp_path / 'log.jsonl').read_text()[-500:]}")
    log = (tmp_path / "log.jsonl").read_text().splitlines()
    assert res.returncode == 0, (
        f"rc={res.returncode}\n{res.stdout[-2000:]}\n{res.stderr[-3000:]}\nlast input: {log[-1:]}"
    )
    outcomes = [json.loads(line)["outcome"] for line in log if "outcome" in line]
    assert len(outcomes) >= 40 + 9 and {"decoded", "error"} <= set(outcomes) and outcomes.count("special") == 9


# -------------------------------------------------------------- random invalid arguments
junk = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-5, 5),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=6),
    st.tuples(st.integers(-3, 300)),
    st.tuples(st.floats(-2, 2), st.floats(-2, 2)),
    st.lists(st.integers(-2, 3), max_size=3),
)

LOADER_ARGS = [
    "batch_size",
    "size",
    "dtype",
    "channels_last",
    "mean",
    "std",
    "scale",
    "ratio",
    "hflip",
    "crop_pct",
    "interpolation",
    "seed",
    "shard_id",
    "num_shards",
    "last_batch_policy",
    "num_threads",
    "prefetch",
    "device",
]


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
        "Mixup": (
            Mixup,
            [
                "mixup_alpha",
                "cutmix_alpha",
                "cutmix_minmax",
                "prob",
                "switch_prob",
                "mode",
                "correct_lam",
                "label_smoothing",
                "num_classes",
                "pairing",
                "targets",
            ],
        ),
        "MixUp": (MixUp, ["alpha"]),
        "CutMix": (CutMix, ["alpha", "minmax", "correct_lam"]),
        "FMix": (FMix, ["alpha", "decay_power", "mask_size", "mask_scale", "device"]),
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
    full = subprocess.run(
        [sys.executable, str(script), str(small_dataset), str(tmp_path / "full.pt"), "full"],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert full.returncode == 0, full.stderr
    want = [int(i) for i in full.stdout.split()]
    victim = subprocess.Popen(
        [sys.executable, str(script), str(small_dataset), ckpt, "run"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    try:
        assert victim.stdout.readline().strip() == "ready"
    finally:
        victim.kill()  # SIGKILL: no cleanup, no flush beyond what is on disk
        victim.wait(timeout=30)
    assert victim.returncode == -9
    resumed = subprocess.run(
        [sys.executable, str(script), str(small_dataset), ckpt, "resume"],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
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
    loader = ImageLoader(
        root=small_dataset,
        batch_size=2,
        size=12,
        device="cpu",
        mix=Mixer(methods=[LearnedMask()], mode="elem", num_classes=4),
    )
    loader.set_mask_hook(lambda images, lam, partner: _hook_output(state["kind"], None, images.shape[0], 12, 12))
    return loader, state


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    kind=st.sampled_from(
        [
            "good",
            "good_f16",
            "nan",
            "inf",
            "above_one",
            "negative",
            "wrong_n",
            "three_channels",
            "three_dims",
            "too_big",
            "int",
            "float64",
            "numpy",
            "none",
            "raises",
            "empty",
        ]
    )
)
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
            Policy(
                sub_policies=data.draw(
                    st.one_of(
                        junk,
                        st.lists(
                            st.lists(
                                st.tuples(st.sampled_from(["rotate", "flip?", "hflip", "invert", 3]), junk, junk),
                                max_size=2,
                            ),
                            max_size=2,
                        ),
                    )
                ),
                probs=data.draw(junk),
            )
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
            kw = {
                k: data.draw(junk, label=k)
                for k in data.draw(
                    st.lists(
                        st.sampled_from(
                            [
                                "input_size",
                                "alpha",
                                "momentum",
                                "mask_loss_weight",
                                "mixup_margin",
                                "mix_block_loss",
                                "eta",
                            ]
                        ),
                        max_size=2,
                        unique=True,
                    )
                )
            }
            AutoMix(
                model=torchvision.models.resnet18(num_classes=4),
                feature_layer=data.draw(st.sampled_from(["layer3", "layer9", "fc"])),
                **kw,
            )
    except (ValueError, DalimixError):
        pass


# ------------------------------------------- bad files: the right one is named, no good one dropped
import badfiles  # noqa: E402

from dalimix import DatasetError, DecodeError, StateError  # noqa: E402


@pytest.fixture(scope="module")
def corpus():
    return badfiles.corpus()


def mixed_folder(root: Path, bad: dict[str, bytes], n_good=6) -> tuple[Path, set[str], set[str]]:
    """Good photo-like JPEGs in two classes, the bad files among them; (root, good paths, bad paths)."""
    good = set()
    for k in range(n_good):
        cls = "ab"[k % 2]
        p = root / cls / f"good{k}.jpg"
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(badfiles.jpeg_bytes(badfiles.photo(40 + k, 52, seed=k + 10)))
        good.add(str(p))
    bad_paths = set()
    for k, (name, data) in enumerate(bad.items()):
        p = root / "ab"[k % 2] / name
        p.write_bytes(data)
        bad_paths.add(str(p))
    return root, good, bad_paths


def epoch_ids(loader, epoch=0):
    loader.set_epoch(epoch)
    ids = []
    for _ in loader:
        ids += loader.last_batch.sample_ids.tolist()
    return ids


@pytest.mark.parametrize(
    "name", ["dht_zeroed.jpg", "idat_crc.png", "no_iend.png", "truncated.png", "huge_header.jpg", "huge_header.png"]
)
def test_a_file_dali_cannot_decode_is_named_alone(tmp_path, corpus, name):
    """Files PIL reads but DALI does not, and headers claiming 60000x60000: under "raise" the
    DecodeError names that file and no good one; under "skip" only that file is dropped."""
    root, good, bad = mixed_folder(tmp_path / "data", {name: corpus[name][0]})
    with pytest.raises(DecodeError) as e:
        epoch_ids(ImageLoader(root=root, batch_size=4, size=16, device="cpu", train=False))
    assert [p for p, _ in e.value.files] == sorted(bad), e.value.files
    assert not [p for p in good if p in str(e.value)]
    loader = ImageLoader(root=root, batch_size=4, size=16, device="cpu", on_error="skip", seed=3)
    with pytest.warns(Warning, match="dalimix: skipping"):
        ids = epoch_ids(loader) + epoch_ids(loader, 1)
    assert set(loader.skipped) == bad
    delivered = {loader.dataset.paths[i] for i in ids}
    assert delivered == good  # every good photo, in both epochs, and nothing else


@pytest.mark.gpu
def test_a_gpu_loader_names_the_file_nvjpeg_cannot_decode(tmp_path, corpus):
    """The diagnosis uses the pipeline's decoder: nvJPEG ("mixed") on a GPU loader."""
    root, good, bad = mixed_folder(tmp_path / "data", {"dht_zeroed.jpg": corpus["dht_zeroed.jpg"][0]})
    with pytest.raises(DecodeError) as e:
        epoch_ids(ImageLoader(root=root, batch_size=4, size=16, device="cuda", train=False))
    assert [p for p, _ in e.value.files] == sorted(bad)
    loader = ImageLoader(root=root, batch_size=4, size=16, device="cuda", on_error="skip")
    with pytest.warns(Warning, match="dalimix: skipping"):
        ids = epoch_ids(loader)
    assert set(loader.skipped) == bad and {loader.dataset.paths[i] for i in ids} == good


def test_the_per_file_check_uses_dali_and_works(corpus):
    """The fallback check itself: a good file passes, each DALI-undecodable file fails with a reason."""
    from dalimix.diagnose import dali_decode_error

    assert dali_decode_error(badfiles.jpeg_bytes(badfiles.photo())) is None
    assert dali_decode_error(badfiles.png_bytes(badfiles.photo())) is None
    for name, (data, who) in corpus.items():
        reason = dali_decode_error(data)
        assert (reason is None) == (who == "dali"), (name, reason)
    assert "60000x60000" in dali_decode_error(corpus["huge_header.jpg"][0])


# ------------------------------------------------------------------- not regular files
FIFO_SCRIPT = textwrap.dedent(
    """
    import os, sys, warnings
    from dalimix import ImageLoader, DatasetError
    from dalimix.scan import load_samples, scan
    root, fifo = sys.argv[1], sys.argv[2]
    try:
        ImageLoader(root=root, batch_size=2, size=16, device="cpu")
        print("built")
    except DatasetError as e:
        print("refused:", e)
    loader = ImageLoader(root=root, batch_size=2, size=16, device="cpu", on_error="skip")
    n = sum(len(y) for _, y in loader)
    print("skip delivered", n, "skipped", loader.skipped)
    print("scan", scan(load_samples(root)).bad)
    """
)


@pytest.mark.slow  # a subprocess: a few seconds of imports
@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="needs os.mkfifo")
def test_a_fifo_named_like_an_image_is_refused_not_read(tmp_path):
    """A FIFO named x.jpg: refused at construction naming it, skipped under "skip", reported by
    scan as a FIFO; in a subprocess with a time bound, so a regression cannot hang the suite."""
    root, good, _ = mixed_folder(tmp_path / "data", {}, n_good=4)
    fifo = root / "a" / "x.jpg"
    os.mkfifo(fifo)
    script = tmp_path / "fifo.py"
    script.write_text(FIFO_SCRIPT)
    try:
        res = subprocess.run(
            [sys.executable, str(script), str(root), str(fifo)],
            capture_output=True,
            text=True,
            timeout=90,
            env={**os.environ, "DALI_LOG_LEVEL": "3"},
        )
    except subprocess.TimeoutExpired:
        pytest.fail("a FIFO among the samples hangs the loader")
    out = res.stdout
    assert res.returncode == 0, res.stderr[-2000:]
    assert f"refused: {root}: 1 sample(s) are not regular files: {fifo} is a FIFO (named pipe)" in out
    assert "skip delivered 5 skipped {'" + str(fifo) + "': 'is a FIFO (named pipe), not a regular file'}" in out, out
    assert out.splitlines()[-1] == "scan [(2, 'is a FIFO (named pipe), not a regular file')]"


def test_file_kinds_are_told_apart(tmp_path):
    from dalimix.diagnose import check_image_file, file_kind

    (tmp_path / "ok.jpg").write_bytes(badfiles.jpeg_bytes(badfiles.photo()))
    (tmp_path / "dir.jpg").mkdir()
    os.symlink(tmp_path / "ok.jpg", tmp_path / "link.jpg")
    os.symlink(tmp_path / "gone.jpg", tmp_path / "broken.jpg")
    assert file_kind(str(tmp_path / "ok.jpg")) is None and file_kind(str(tmp_path / "link.jpg")) is None
    assert file_kind(str(tmp_path / "dir.jpg")) == "is a folder, not a regular file"
    assert file_kind(str(tmp_path / "broken.jpg")) == "is a broken symbolic link"
    assert file_kind(str(tmp_path / "none.jpg")) == "does not exist"
    if hasattr(os, "mkfifo"):
        os.mkfifo(tmp_path / "p.jpg")
        assert check_image_file(str(tmp_path / "p.jpg")) == "is a FIFO (named pipe), not a regular file"


def test_a_file_list_naming_a_fifo_says_so(tmp_path):
    root, good, _ = mixed_folder(tmp_path / "data", {}, n_good=4)
    if not hasattr(os, "mkfifo"):
        pytest.skip("needs os.mkfifo")
    os.mkfifo(root / "a" / "p.jpg")
    lst = tmp_path / "list.txt"
    lst.write_text("".join(f"{p} 0\n" for p in sorted(good)) + f"{root / 'a' / 'p.jpg'} 1\n")
    with pytest.raises(DatasetError, match="p.jpg is a FIFO"):
        ImageLoader(file_list=lst, batch_size=2, size=16, device="cpu")
    loader = ImageLoader(file_list=lst, batch_size=2, size=16, device="cpu", on_error="skip")
    assert len(loader.skipped) == 1 and sum(len(y) for _, y in loader) == 5  # the FIFO's place filled


# --------------------------------------------------------- strict decoding, scan agreement
def test_strict_refuses_silent_garbage_and_scan_agrees(tmp_path, corpus, monkeypatch, capsys):
    """Byte flips PIL refuses (DALI would deliver them) and truncated JPEGs (a random crop may miss
    the gap in one epoch and meet it in another) are refused by strict=True at construction; `dalimix
    scan` gives each file the verdict the loader gives it, with and without --strict."""
    monkeypatch.setattr("dalimix.scan._cache_dir", lambda: tmp_path / "cache")
    bad = {name: data for name, (data, _) in corpus.items()}
    root, good, bad_paths = mixed_folder(tmp_path / "data", bad, n_good=6)
    dali_ok = {p for p in bad_paths if corpus[Path(p).name][1] == "dali"}
    assert dali_ok == {str(p) for p in root.glob("*/flipped.jpg")}

    # without strict, what the loader finds decoding whole images is what scan reports
    assert main(["scan", str(root), "--quiet"]) == 1
    scanned = {
        line.split(": ", 1)[0]
        for line in capsys.readouterr().out.splitlines()
        if ": " in line and not line.startswith("scanned")
    }
    loader = ImageLoader(root=root, batch_size=4, size=16, device="cpu", train=False, on_error="skip")
    with pytest.warns(Warning):
        ids = epoch_ids(loader)
    assert set(loader.skipped) == scanned == bad_paths - dali_ok
    assert dali_ok <= {loader.dataset.paths[i] for i in ids}  # DALI decodes it: delivered, damage and all

    # strict: refused at construction, named; scan --strict reports the same files
    with pytest.raises(DecodeError) as e:
        ImageLoader(root=root, batch_size=4, size=16, device="cpu", strict=True)
    assert {p for p, _ in e.value.files} == bad_paths and "flipped.jpg" in str(e.value)
    assert main(["scan", str(root), "--strict", "--quiet"]) == 1
    strict_scanned = {
        line.split(": ", 1)[0]
        for line in capsys.readouterr().out.splitlines()
        if ": " in line and not line.startswith("scanned")
    }
    assert strict_scanned == bad_paths
    with pytest.warns(Warning, match="strict check at construction"):
        loader = ImageLoader(root=root, batch_size=4, size=16, device="cpu", strict=True, on_error="skip", seed=1)
    assert set(loader.skipped) == bad_paths
    for epoch in range(3):  # train mode: random crops, nothing bad ever reaches a batch, every good file does
        assert {loader.dataset.paths[i] for i in epoch_ids(loader, epoch)} == good


def test_strict_verdicts_are_cached_by_size_and_mtime(tmp_path, monkeypatch):
    import dalimix.scan as scan_mod

    monkeypatch.setattr("dalimix.scan._cache_dir", lambda: tmp_path / "cache")
    root, good, _ = mixed_folder(tmp_path / "data", {}, n_good=6)
    calls = []
    real = scan_mod.verdicts
    monkeypatch.setattr(scan_mod, "verdicts", lambda s, idx=None, **kw: calls.append(len(idx)) or real(s, idx, **kw))
    ImageLoader(root=root, batch_size=2, size=16, device="cpu", strict=True)
    ImageLoader(root=root, batch_size=2, size=16, device="cpu", strict=True)
    victim = sorted(good)[0]
    data = Path(victim).read_bytes()
    Path(victim).write_bytes(data[: len(data) // 2])  # changed since: checked again
    with pytest.raises(DecodeError, match=Path(victim).name):
        ImageLoader(root=root, batch_size=2, size=16, device="cpu", strict=True)
    assert calls == [6, 0, 1]


# ------------------------------------------------------------- arguments refused up front
class _NotAMixer(torch.nn.Module):
    def forward(self, x):
        return x


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"mix": "mixup"}, "mix='mixup' is not a dalimix mixer"),
        ({"mix": torch.nn.Identity()}, "is not a dalimix mixer"),
        ({"mix": MixUp()}, r"mix=Mixer\(methods=\[MixUp"),
        ({"root": 123}, "root=123: a path"),
        ({"mean": (128, 128, 128)}, "0..255 scale"),
        ({"std": (58.4, 57.1, 57.4)}, "0..255 scale"),
        ({"mean": (0.5, 0.5, 1.5)}, r"each value in \[0, 1\]"),
        ({"classes": ["x", "y"]}, "classes= names the labels of a file_list"),
        ({"keep_unmixed": "no"}, "keep_unmixed='no': True or False"),
        ({"strict": "yes"}, "strict='yes': True or False"),
        ({"prefetch": 10000}, r"prefetch=10000: an int in \[1, 32\]"),
        ({"size": 8192}, "above dalimix's bound of 4096"),
    ],
)
def test_bad_arguments_are_refused_at_construction(small_dataset, kwargs, match):
    kw = {"root": small_dataset, "batch_size": 4, "size": 16, "device": "cpu", **kwargs}
    with pytest.raises(ValueError, match=match):
        ImageLoader(**kw)


def test_more_bad_arguments_are_refused(small_dataset, monkeypatch):
    from dalimix import validate as v
    from dalimix.hook import LearnedMask

    with pytest.raises(ValueError, match=r"methods=\[MixUp"):
        Mixer(methods=MixUp())
    loader = ImageLoader(
        root=small_dataset, batch_size=2, size=12, device="cpu", mix=Mixer(methods=[LearnedMask()], num_classes=4)
    )
    with pytest.raises(ValueError, match="logits='yes': True or False"):
        loader.set_mask_hook(lambda x, lam, partner: torch.rand(2, 1, 4, 4), logits="yes")
    loader.close()
    # the memory estimate, against what this machine has
    monkeypatch.setattr(v, "_available_bytes", lambda device: (2**30, "available host memory"))
    with pytest.raises(ValueError, match=r"needs about 2\.2 GiB .* more than the 1\.0 GiB available host memory"):
        ImageLoader(root=small_dataset, batch_size=64, size=1024, device="cpu")
    ImageLoader(root=small_dataset, batch_size=4, size=256, device="cpu").close()


# --------------------------------------------------------------------- resume validation
def test_resume_refuses_swapped_class_folders(tmp_path):
    root = tmp_path / "data"
    for cls, h in (("a", 30), ("b", 44)):
        for k in range(4):
            write_image(root / cls / f"{k}.jpg", badfiles.photo(h + k, 36, seed=k))
    kw = dict(root=root, batch_size=2, size=16, device="cpu", seed=1)
    loader = ImageLoader(**kw)
    it = iter(loader)
    next(it)
    state = loader.state_dict()
    loader.close()
    os.rename(root / "a", root / "tmp")
    os.rename(root / "b", root / "a")
    os.rename(root / "tmp", root / "b")
    fresh = ImageLoader(**kw)
    assert fresh.dataset.fingerprint == state["dataset"]["fingerprint"]  # the same names and labels
    with pytest.raises(StateError, match=r"other contents: the files of class\(es\) 'a', 'b' differ"):
        fresh.load_state_dict(state)
    # the same files copied elsewhere (new mtimes, same sizes) resume fine
    import shutil

    os.rename(root / "a", root / "tmp")
    os.rename(root / "b", root / "a")
    os.rename(root / "tmp", root / "b")
    shutil.copytree(root, tmp_path / "copy")
    ImageLoader(**{**kw, "root": tmp_path / "copy"}).load_state_dict(state)


@pytest.mark.parametrize(
    "edit, match",
    [
        (lambda s: s.pop("seed"), "the state has no 'seed' entry"),
        (lambda s: s.update(step=-1), r"state\['step'\]=-1: a non-negative int"),
        (lambda s: s.update(epoch="1"), r"state\['epoch'\]='1': a non-negative int"),
        (lambda s: s.update(shuffle="yes"), r"state\['shuffle'\]='yes': True or False"),
        (lambda s: s.update(dali_checkpoint=b"garbage"), r"state\['dali_checkpoint'\]=b'garbage': None or the bytes"),
        (lambda s: s.update(dali_checkpoint=s["dali_checkpoint"][:-7]), r"state\['dali_checkpoint'\]"),
        (lambda s: s.update(dali_checkpoint="text"), r"state\['dali_checkpoint'\]='text'"),
        (lambda s: s["dataset"].pop("fingerprint"), r"state\['dataset'\] has no 'fingerprint'"),
        (lambda s: s.update(dataset=[1]), r"state\['dataset'\]=\[1\]: a dict"),
    ],
)
def test_hand_made_states_are_refused_by_name(small_dataset, edit, match):
    import copy

    # a preset keeps its draws in DALI, so its state carries DALI's checkpoint to tamper with
    kw = dict(root=small_dataset, batch_size=4, size=16, device="cpu", seed=2, auto_augment="original")
    loader = ImageLoader(**kw)
    it = iter(loader)
    next(it)
    state = copy.deepcopy(loader.state_dict())
    loader.close()
    assert state["dali_checkpoint"]
    edit(state)
    fresh = ImageLoader(**kw)
    with pytest.raises(StateError, match=match):
        fresh.load_state_dict(state)
    fresh.close()
