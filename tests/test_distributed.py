"""torch.distributed: two gloo processes on the CPU under torchrun split every epoch exactly."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import write_image

from dalimix import LastBatchPolicy, plan_epoch

ROOT = Path(__file__).resolve().parents[1]
D, W, B = 19, 2, 3  # 19 samples, 2 ranks, batch 3: shares of 10 and 9, neither a multiple of 3


def torchrun(args, timeout=300):
    env = dict(os.environ, PYTHONPATH=str(ROOT), DALI_LOG_LEVEL="3", OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={W}", *map(str, args)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return proc.stdout


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    data = tmp_path_factory.mktemp("ddp-data")
    rng = np.random.default_rng(0)
    for i in range(D):
        write_image(data / f"c{i % 3}" / f"{i:02d}.jpg", rng.integers(0, 255, (20 + i, 24, 3), dtype=np.uint8))
    out = tmp_path_factory.mktemp("ddp-out")
    torchrun([ROOT / "tests" / "ddp_worker.py", data, out])
    return [json.loads((out / f"rank{r}.json").read_text()) for r in range(W)]


def plan(policy, epoch, rank):
    return plan_epoch(
        D,
        batch_size=B,
        epoch=epoch,
        seed=7,
        shuffle=True,
        shard_id=rank,
        num_shards=W,
        policy=LastBatchPolicy.parse(policy),
    )


def ids_of(ranks, policy, epoch):
    """Each rank's sample ids of one epoch, batches concatenated."""
    return [np.concatenate([b["ids"] for b in result[policy]["epochs"][epoch]]) for result in ranks]


def test_rank_and_world_come_from_torch_distributed(ranks):
    for rank, result in enumerate(ranks):
        assert result["rank"] == rank and result["world"] == W
        for policy in ("partial", "drop", "fill"):
            assert result[policy]["shard"] == [rank, W]
        # torchrun's LOCAL_WORLD_SIZE=2 processes share this machine's cores
        assert result["default_threads"] == max(1, len(os.sched_getaffinity(0)) // W)


def test_partial_every_sample_exactly_once_per_epoch(ranks):
    orders = []
    for epoch in range(2):
        per_rank = ids_of(ranks, "partial", epoch)
        union = np.concatenate(per_rank)
        assert sorted(union.tolist()) == list(range(D))  # the data set, each sample once
        assert [len(x) for x in per_rank] == [10, 9]
        assert [len(r["partial"]["epochs"][epoch]) for r in ranks] == [4, 3]  # ranks differ by one batch
        assert [len(b["ids"]) for b in ranks[0]["partial"]["epochs"][epoch]] == [3, 3, 3, 1]
        for rank in range(W):  # the order plan_epoch promises: one permutation, strided shards
            p = plan("partial", epoch, rank)
            want = np.concatenate([p.order[i * B : i * B + v] for i, v in enumerate(p.valid)])
            np.testing.assert_array_equal(per_rank[rank], want)
        orders.append(np.concatenate(per_rank))
    assert not np.array_equal(orders[0], orders[1])  # set_epoch reshuffled, the same way on both ranks
    assert ranks[0]["gathered_first_batches"] == [r["partial"]["epochs"][0][0]["ids"] for r in ranks]


def test_drop_and_fill(ranks):
    for epoch in range(2):
        drop = ids_of(ranks, "drop", epoch)
        assert [len(r["drop"]["epochs"][epoch]) for r in ranks] == [3, 3]  # floor(9 / 3) on both ranks
        assert all(len(b["ids"]) == B for r in ranks for b in r["drop"]["epochs"][epoch])
        union = np.concatenate(drop)
        assert len(set(union.tolist())) == len(union) == 18  # no sample twice; one waits for another epoch
        fill = ids_of(ranks, "fill", epoch)
        assert [len(r["fill"]["epochs"][epoch]) for r in ranks] == [4, 4]  # ceil(10 / 3) on both ranks
        assert set(np.concatenate(fill).tolist()) == set(range(D))
        for rank in range(W):
            share = plan("partial", epoch, rank).order[: [10, 9][rank]]
            # filled by wrapping around to the start of the rank's own share
            np.testing.assert_array_equal(fill[rank], np.concatenate([share, share])[:12])
    assert [r["drop"]["len"] for r in ranks] == [3, 3] and [r["fill"]["len"] for r in ranks] == [4, 4]


def test_labels_and_per_rank_random_streams(ranks):
    for r in ranks:
        for b in r["partial"]["epochs"][0]:
            assert b["labels"] != [] and all(0 <= y < 3 for y in b["labels"])
    lam0 = [r["drop"]["epochs"][0][0]["lam"] for r in ranks]
    assert lam0[0] != lam0[1]  # the mixing streams differ per rank


def test_crop_and_flip_streams_differ_per_rank_and_epoch(small_dataset):
    """Each rank's (and each epoch's) crops and flips come from (seed, rank, epoch, step): the first
    batch's unmixed images differ across ranks and epochs for the same samples' positions."""
    from dalimix import ImageLoader
    from dalimix.loader.plan import Ticket, draw_augment

    loader = ImageLoader(root=small_dataset, batch_size=4, size=16, device="cpu", seed=7, num_threads=1)
    sizes = np.full((4, 2), 100)
    ids = np.arange(4)
    draws = {}
    for rank in range(2):
        for epoch in range(2):
            t = Ticket(epoch=epoch, step=0, ids=ids, planned=ids, valid=4)
            draws[rank, epoch] = draw_augment(loader.spec, loader.seed, rank, t, sizes)[0]
    assert len({w.tobytes() for w in draws.values()}) == 4
    loader.close()


def test_default_cuda_index_follows_local_rank(monkeypatch):
    from dalimix import distributed

    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    assert distributed.default_cuda_index() == 0
    monkeypatch.setenv("LOCAL_RANK", "3")
    assert distributed.default_cuda_index() == 3
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)  # one GPU per process (CUDA_VISIBLE_DEVICES)
    assert distributed.default_cuda_index() == 0
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 2)  # the script called torch.cuda.set_device(2)
    assert distributed.default_cuda_index() == 2
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(16)))
    from dalimix.pipeline import default_num_threads

    assert default_num_threads() == 4


@pytest.mark.gpu
def test_cuda_loader_under_local_rank_uses_that_gpu(small_dataset, monkeypatch):
    if torch.cuda.device_count() < 2:
        pytest.skip("needs two GPUs")
    from dalimix import ImageLoader

    monkeypatch.setenv("LOCAL_RANK", "1")
    loader = ImageLoader(root=small_dataset, batch_size=4, size=32, device="cuda")
    images, labels = next(iter(loader))
    assert loader.device == torch.device("cuda", 1) and images.device == loader.device == labels.device


@pytest.mark.slow
def test_ddp_example_resumes_exactly(small_dataset, tmp_path):
    """examples/train_ddp.py: a run that saves at step 4 and goes on, and a run resumed from that
    checkpoint, train on the same batches with the same losses from step 5 on, on every rank."""
    common = [
        ROOT / "examples" / "train_ddp.py",
        "--data",
        small_dataset,
        "--device",
        "cpu",
        "--size",
        "16",
        "--batch-size",
        "2",
        "--epochs",
        "2",
        "--checkpoint",
        tmp_path / "ckpt.pt",
    ]
    torchrun([*common, "--save-at", 4, "--trace", tmp_path / "full"])
    out = torchrun([*common, "--resume", "--trace", tmp_path / "resumed"])
    assert "resumed at epoch 0, step 4" in out
    for rank in range(W):
        full = (tmp_path / f"full.rank{rank}").read_text().splitlines()
        resumed = (tmp_path / f"resumed.rank{rank}").read_text().splitlines()
        assert len(full) == 10  # 20 samples / 2 ranks / batch 2: 5 steps an epoch, 2 epochs
        assert resumed == full[4:]  # epoch, step, sample ids and loss of every step
