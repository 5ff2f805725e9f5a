"""Exact resume: a run stopped after step k and resumed yields the uninterrupted run's batches, bit for bit."""

from __future__ import annotations

import os
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from dalimix import ImageLoader
from dalimix.mix import Mixup

EPOCHS = 2
ROOT = Path(__file__).resolve().parents[1]


def make_loader(source, **kw):
    args = dict(
        batch_size=3,
        size=24,
        device="cpu",
        seed=13,
        num_threads=1,
        mix=Mixup(mixup_alpha=0.8, cutmix_alpha=1.0, mode="elem", label_smoothing=0.1),
    )
    args.update(source)
    args.update(kw)
    return ImageLoader(**args)


def record(loader, images, targets):
    info = loader.last_batch
    return (
        info.epoch,
        info.step,
        info.sample_ids.copy(),
        images.clone(),
        targets.clone(),
        info.params.lam.copy(),
        info.params.partner.copy(),
    )


def run(loader, stop_after=None, start_epoch=0, set_epoch=True):
    """The training loop: ``EPOCHS`` epochs, or stop after ``stop_after`` batches in all."""
    out = []
    for epoch in range(start_epoch, EPOCHS):
        if set_epoch:
            loader.set_epoch(epoch)
        for images, targets in loader:
            out.append(record(loader, images, targets))
            if stop_after is not None and len(out) == stop_after:
                return out
    return out


def assert_same(got, want):
    assert len(got) == len(want) and len(want) > 0
    for g, w in zip(got, want):
        assert g[:2] == w[:2]
        np.testing.assert_array_equal(g[2], w[2])
        assert torch.equal(g[3], w[3]), f"images differ at epoch {w[0]} step {w[1]}"
        assert torch.equal(g[4], w[4]), f"targets differ at epoch {w[0]} step {w[1]}"
        np.testing.assert_array_equal(g[5], w[5])
        np.testing.assert_array_equal(g[6], w[6])


@pytest.fixture(scope="module")
def sources(small_dataset, tmp_path_factory):
    from dalimix.webdataset import pack_image_folder

    shards = tmp_path_factory.mktemp("resume-shards")
    pack_image_folder(small_dataset, shards, shard_size=6)
    return {"folder": {"root": small_dataset}, "webdataset": {"webdataset": shards}}


@pytest.fixture(scope="module")
def reference(sources):
    return {name: run(make_loader(src)) for name, src in sources.items()}


@pytest.mark.parametrize("source", ["folder", "webdataset"])
@pytest.mark.parametrize("k", [1, 4, 7, 10])  # 7 batches an epoch: 7 is the epoch's end
def test_stop_after_k_and_resume_is_bit_exact(sources, reference, source, k):
    want = reference[source]
    assert len(want) == 14
    first = make_loader(sources[source])
    run(first, stop_after=k)
    state = first.state_dict()
    first.close()
    resumed = make_loader(sources[source])
    resumed.load_state_dict(state)
    assert_same(run(resumed, start_epoch=state["epoch"]), want[k:])
    assert state["epoch"] == want[k][0] and state["step"] == want[k][1]


def test_resume_without_set_epoch_calls(sources):
    """A loop that never calls set_epoch (each iteration reads the next epoch) resumes the same way."""
    want = run(make_loader(sources["folder"]), set_epoch=False)
    first = make_loader(sources["folder"])
    run(first, stop_after=9, set_epoch=False)
    resumed = make_loader(sources["folder"])
    resumed.load_state_dict(first.state_dict())
    assert_same(run(resumed, start_epoch=1, set_epoch=False), want[9:])


def test_state_mid_iteration_and_at_start(sources, reference):
    """state_dict() before any batch is epoch 0 step 0; a state taken right after loading is the loaded one."""
    loader = make_loader(sources["folder"])
    assert (loader.state_dict()["epoch"], loader.state_dict()["step"]) == (0, 0)
    first = make_loader(sources["folder"])
    run(first, stop_after=3)
    state = first.state_dict()
    again = make_loader(sources["folder"])
    again.load_state_dict(state)
    assert again.state_dict() == state
    assert_same(run(again), reference["folder"][3:])


def test_a_state_needs_no_dali_checkpoint(sources, reference):
    """Crops, flips and mixing are dalimix's draws from (seed, rank, epoch, step): a state holds no
    DALI checkpoint, so one written under another DALI version resumes exactly, without a warning."""
    first = make_loader(sources["folder"])
    run(first, stop_after=5)
    state = first.state_dict()
    assert state["dali_checkpoint"] is None
    state["dali_version"] = "0.0.0"
    resumed = make_loader(sources["folder"])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        resumed.load_state_dict(state)
    assert_same(run(resumed), reference["folder"][5:])


def test_seek_into_a_running_loader_keeps_its_pipeline(sources, reference):
    """Moving a loader that has been reading (another epoch queued in DALI) to a saved position
    throws the queued batches away and reads the right ones, with the same pipeline."""
    loader = make_loader(sources["folder"])
    run(loader, stop_after=9)
    loader.load_state_dict(_state_after(sources, 3))
    assert_same(run(loader), reference["folder"][3:])
    assert loader.pipelines_built == 1


RESUME_SCRIPT = r"""
import sys, torch
from dalimix import ImageLoader
from dalimix.mix import Mixup
state = torch.load(sys.argv[2], weights_only=True)
loader = ImageLoader(root=sys.argv[1], batch_size=3, size=24, device="cpu", seed=13, num_threads=1,
                     mix=Mixup(mixup_alpha=0.8, cutmix_alpha=1.0, mode="elem", label_smoothing=0.1))
loader.load_state_dict(state)
out = []
for epoch in range(state["epoch"], 2):
    loader.set_epoch(epoch)
    for images, targets in loader:
        i = loader.last_batch
        out.append((i.epoch, i.step, torch.from_numpy(i.sample_ids), images, targets, torch.from_numpy(i.params.lam)))
torch.save(out, sys.argv[3])
"""


def test_resume_in_a_fresh_process(sources, reference, tmp_path):
    first = make_loader(sources["folder"])
    run(first, stop_after=4)
    torch.save({"loader": first.state_dict()}, tmp_path / "ckpt.pt")
    state = torch.load(tmp_path / "ckpt.pt", weights_only=True)["loader"]
    torch.save(state, tmp_path / "state.pt")
    env = dict(os.environ, PYTHONPATH=str(ROOT), DALI_LOG_LEVEL="3")
    proc = subprocess.run(
        [
            sys.executable,
            "-c",
            RESUME_SCRIPT,
            str(sources["folder"]["root"]),
            str(tmp_path / "state.pt"),
            str(tmp_path / "out.pt"),
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = torch.load(tmp_path / "out.pt", weights_only=True)
    want = reference["folder"][4:]
    assert len(got) == len(want)
    for g, w in zip(got, want):
        assert (g[0], g[1]) == w[:2]
        assert g[2].tolist() == w[2].tolist()
        assert torch.equal(g[3], w[3]) and torch.equal(g[4], w[4])
        np.testing.assert_array_equal(g[5].numpy(), w[5])


@pytest.mark.parametrize(
    "change, message",
    [
        ({"batch_size": 4}, "batch_size=3"),
        ({"seed": 14}, "seed=13"),
        ({"size": 32}, "augment="),
        ({"shard_id": 1, "num_shards": 2}, "num_shards=1"),
        ({"last_batch_policy": "drop"}, "last_batch_policy='PARTIAL'"),
    ],
)
def test_refuses_a_state_from_other_settings(sources, change, message):
    first = make_loader(sources["folder"])
    run(first, stop_after=2)
    state = first.state_dict()
    other = make_loader(sources["folder"], **change)
    with pytest.raises(ValueError, match=message):
        other.load_state_dict(state)


def test_refuses_a_state_from_another_data_set(sources, tmp_path):
    from dalimix.demo_data import generate

    generate(tmp_path, per_class=2, classes=("disc", "ring"))
    first = make_loader(sources["folder"])
    run(first, stop_after=2)
    other = make_loader({"root": tmp_path})
    with pytest.raises(ValueError, match="another data set"):
        other.load_state_dict(first.state_dict())
    with pytest.raises(ValueError, match="not a dalimix loader state"):
        other.load_state_dict({"epoch": 0})


def test_list_of_rank_states_and_set_epoch_to_another_epoch(sources, reference):
    states = []
    for rank in range(2):
        loader = make_loader(sources["folder"], shard_id=rank, num_shards=2)
        run(loader, stop_after=2)
        states.append(loader.state_dict())
    mine = make_loader(sources["folder"], shard_id=1, num_shards=2)
    mine.load_state_dict(states)
    assert mine.state_dict() == states[1]
    # set_epoch to another epoch than the resumed one starts that epoch from its first batch
    fresh = make_loader(sources["folder"])
    fresh.load_state_dict(_state_after(sources, 3))
    fresh.set_epoch(1)
    images, _ = next(iter(fresh))
    assert (fresh.last_batch.epoch, fresh.last_batch.step) == (1, 0)
    assert torch.equal(images, reference["folder"][7][3])
    with pytest.raises(ValueError, match="shard_id=0"):
        make_loader(sources["folder"]).load_state_dict(states[1:])


def _state_after(sources, k):
    loader = make_loader(sources["folder"])
    run(loader, stop_after=k)
    return loader.state_dict()


def test_mixup_enabled_is_restored(sources):
    loader = make_loader(sources["folder"])
    run(loader, stop_after=2)
    loader.mixup_enabled = False
    state = loader.state_dict()
    resumed = make_loader(sources["folder"])
    resumed.load_state_dict(state)
    assert resumed.mixup_enabled is False
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _, targets = next(iter(resumed))
    assert (resumed.last_batch.params.lam == 1).all()


@pytest.mark.gpu
def test_resume_on_the_gpu_is_bit_exact(sources):
    """nvJPEG decoding with a random crop, GPU resize and flip: DALI's checkpoint covers them too."""
    src = sources["folder"]
    want = run(make_loader(src, device="cuda"))
    first = make_loader(src, device="cuda")
    run(first, stop_after=4)
    resumed = make_loader(src, device="cuda")
    resumed.load_state_dict(first.state_dict())
    assert_same(run(resumed), want[4:])
