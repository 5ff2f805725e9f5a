"""Drop-in use: dalimix.create_loader with timm's names, eval-loader semantics, the example scripts."""

from __future__ import annotations

import difflib
import os
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

import dalimix
from dalimix import ImageLoader, LastBatchPolicy, create_loader
from dalimix.mix import Mixup

ROOT = Path(__file__).resolve().parents[1]


# ------------------------------------------------------------------- create_loader: arguments
def _timm_transform_parts(transform):
    return {type(t).__name__: t for t in transform.transforms}


@pytest.mark.parametrize("crop_pct, interpolation", [(0.875, "bilinear"), (0.95, "bicubic"), (1.0, "nearest")])
def test_eval_settings_match_timms_eval_transform(small_dataset, crop_pct, interpolation):
    from timm.data import create_transform

    loader = create_loader(small_dataset, input_size=(3, 48, 48), batch_size=4, crop_pct=crop_pct,
                           interpolation=interpolation, device="cpu")
    parts = _timm_transform_parts(create_transform((3, 48, 48), crop_pct=crop_pct, interpolation=interpolation))
    spec = loader.spec
    assert not spec.train and not loader.shuffle and loader.last_batch_policy is LastBatchPolicy.PARTIAL
    assert parts["Resize"].size == spec.resize_shorter  # timm's floor(size / crop_pct)
    assert tuple(parts["CenterCrop"].size) == (spec.height, spec.width)
    assert parts["Resize"].interpolation.value == interpolation == spec.interpolation
    assert loader.mix is None


def test_train_settings_match_timms_train_transform(small_dataset):
    from timm.data import create_transform

    kw = dict(scale=(0.2, 0.9), ratio=(0.5, 2.0), hflip=0.3, interpolation="bicubic")
    loader = create_loader(small_dataset, input_size=40, batch_size=4, is_training=True, color_jitter=0,
                           mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25), num_workers=1, img_dtype=torch.bfloat16,
                           device="cpu", **kw)
    parts = _timm_transform_parts(create_transform(40, is_training=True, color_jitter=0, **kw))
    rrc, flip = parts["RandomResizedCropAndInterpolation"], parts["RandomHorizontalFlip"]
    spec = loader.spec
    assert spec.train and loader.shuffle and loader.last_batch_policy is LastBatchPolicy.DROP  # drop_last=is_training
    assert (tuple(rrc.size), tuple(rrc.scale), tuple(rrc.ratio)) == ((spec.height, spec.width), spec.scale, spec.ratio)
    assert flip.p == spec.hflip
    assert loader.num_threads == 1 and loader.dtype == torch.bfloat16
    images, _ = next(iter(loader))
    assert images.shape == (4, 3, 40, 40) and images.dtype == torch.bfloat16
    assert loader.norm.mean == (0.5, 0.5, 0.5) and loader.norm.std == (0.25, 0.25, 0.25)
    assert create_loader(small_dataset, 40, 4, fp16=True, device="cpu").dtype == torch.float16
    assert create_loader(small_dataset, 40, 4, is_training=True, no_aug=True, color_jitter=0, device="cpu").spec.train is False


def test_datasets_from_timm_torchvision_paths_and_shards(small_dataset, tmp_path):
    import torchvision
    from timm.data import create_dataset

    from dalimix.webdataset import pack_image_folder

    reference = ImageLoader(root=small_dataset, batch_size=4).samples
    timm_ds = create_dataset("", root=str(small_dataset), split="train")
    tv_ds = torchvision.datasets.ImageFolder(str(small_dataset))
    for ds in (timm_ds, tv_ds, str(small_dataset), small_dataset, reference):
        s = create_loader(ds, 32, 4, device="cpu").samples
        assert s.paths == reference.paths and s.labels.tolist() == reference.labels.tolist()
        assert s.classes == reference.classes and s.fingerprint == reference.fingerprint
    listing = tmp_path / "train.txt"
    listing.write_text("".join(f"{p} {y}\n" for p, y in zip(reference.paths, reference.labels)))
    assert create_loader(listing, 32, 4, device="cpu").samples.paths == reference.paths
    pack_image_folder(small_dataset, tmp_path / "shards", shard_size=8)
    for ds in (tmp_path / "shards", str(tmp_path / "shards" / "*.tar"), tmp_path / "shards" / "shard-000000.tar"):
        s = create_loader(ds, 32, 4, device="cpu").samples
        assert type(s).__name__ == "TarSamples"
    assert len(create_loader(tmp_path / "shards", 32, 4, device="cpu").samples) == 20
    with pytest.raises(ValueError, match="give a path"):
        create_loader(object(), 32, 4, device="cpu")


def test_auto_augment_passes_through_for_training(small_dataset):
    kw = dict(dataset=small_dataset, input_size=32, batch_size=4, device="cpu", color_jitter=0)
    train = create_loader(**kw, is_training=True, auto_augment="rand-m9-n2")
    assert train.spec.auto_augment.startswith("rand-m9-n2")  # its canonical string
    images, _ = next(iter(train))
    assert images.shape == (4, 3, 32, 32)
    assert create_loader(**kw, is_training=False, auto_augment="rand-m9-n2").spec.auto_augment is None  # timm: eval ignores it
    with pytest.raises(ValueError, match="mstd0.5"):
        create_loader(**kw, is_training=True, auto_augment="rand-m9-mstd0.5")


def test_timm_options_without_equivalent_are_refused_not_dropped(small_dataset):
    kw = dict(dataset=small_dataset, input_size=32, batch_size=4, device="cpu")
    for name, value in [("re_prob", 0.25), ("vflip", 0.5), ("num_aug_splits", 2),
                        ("interpolation", "random"), ("crop_mode", "squash"), ("input_size", (1, 32, 32))]:
        with pytest.raises(ValueError, match=name if name != "input_size" else "3-channel"):
            create_loader(**{**kw, name: value})
    with pytest.raises(TypeError, match="unexpected keyword argument 'num_worker'"):
        create_loader(**kw, num_worker=2)
    # timm's "off" values and DataLoader-only options pass
    loader = create_loader(**kw, re_prob=0.0, re_mode="pixel", vflip=0.0, auto_augment=None, pin_memory=True,
                           persistent_workers=False, use_prefetcher=True, worker_seeding="all", train_crop_mode="rrc")
    assert len(loader) == 5
    with pytest.warns(UserWarning, match="color_jitter=0.4 is not applied"):
        create_loader(**kw, is_training=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        create_loader(**kw, is_training=False)  # eval: no jitter in timm either
    with pytest.raises(ValueError, match="never mixes"):
        create_loader(**kw, mix=Mixup())


def test_distributed_flag(small_dataset):
    kw = dict(dataset=small_dataset, input_size=32, batch_size=4, device="cpu")
    with pytest.raises(ValueError, match="init_process_group"):
        create_loader(**kw, distributed=True)
    loader = create_loader(**kw, distributed=False)
    assert (loader.shard_id, loader.num_shards) == (0, 1)


def test_timm_mixup_object_is_converted(small_dataset):
    """Handing timm's Mixup to create_loader mixes as dalimix's Mixup with the same arguments."""
    from timm.data import Mixup as TimmMixup

    args = dict(mixup_alpha=0.4, cutmix_alpha=1.0, prob=0.9, switch_prob=0.3, mode="elem", label_smoothing=0.2,
                num_classes=4)
    timm_mix = TimmMixup(**args)
    timm_mix.mixup_enabled = False
    common = dict(input_size=32, batch_size=4, is_training=True, color_jitter=0, device="cpu", seed=3)
    loader = create_loader(small_dataset, mix=timm_mix, **common)
    assert isinstance(loader.mix, Mixup) and loader.mixup_enabled is False
    m = loader.mix
    assert (m.mixup_alpha, m.cutmix_alpha, m.prob, m.switch_prob, m.mode, m.label_smoothing) == (0.4, 1.0, 0.9, 0.3, "elem", 0.2)
    loader.mixup_enabled = True
    ours = create_loader(small_dataset, mix=Mixup(**args), **common)
    for (x, y), (u, v) in zip(loader, ours):
        assert torch.equal(x, u) and torch.equal(y, v)
    with pytest.raises(ValueError, match="a dalimix.mix mixer"):
        create_loader(small_dataset, mix="mixup", **common)


def test_mixup_off_switch_gives_the_plain_batches(small_dataset):
    """timm's --mixup-off-epoch: loader.mixup_enabled = False gives the unmixed images and smoothed one-hot targets."""
    kw = dict(root=small_dataset, batch_size=4, size=24, device="cpu", seed=2)
    mixed = ImageLoader(mix=Mixup(mixup_alpha=1.0, cutmix_alpha=1.0, label_smoothing=0.1), **kw)
    plain = ImageLoader(**kw)
    mixed.mixup_enabled = False
    for (x, t), (u, y) in zip(mixed, plain):
        assert torch.equal(x, u)
        want = torch.full((len(y), 4), 0.1 / 4)
        want[torch.arange(len(y)), y] = 1 - 0.1 + 0.1 / 4
        torch.testing.assert_close(t, want)


# ------------------------------------------------------------------------------ eval loader
@pytest.mark.parametrize("world, batch", [(3, 4), (2, 3), (8, 2)])
def test_eval_every_sample_once_over_ranks(small_dataset, world, batch):
    """20 samples over ``world`` ranks in batches of ``batch`` (never a multiple): PARTIAL eval gives
    every sample exactly once, no padding, each image the same as a single-rank eval's."""
    single = {}
    one = create_loader(small_dataset, input_size=24, batch_size=5, device="cpu")  # eval: PARTIAL, no shuffle
    for images, labels in one:
        for i, sid in enumerate(one.last_batch.sample_ids):
            single[int(sid)] = (images[i], int(labels[i]))
    seen = []
    for rank in range(world):
        loader = ImageLoader(root=small_dataset, batch_size=batch, size=24, device="cpu", train=False,
                             shard_id=rank, num_shards=world)
        share = len(range(rank, 20, world))
        assert len(loader) == -(-share // batch)
        for _ in range(2):  # deterministic: a second pass gives the same batches
            passes = []
            for images, labels in loader:
                ids = loader.last_batch.sample_ids
                assert labels.dtype == torch.int64 and len(ids) == len(labels) <= batch
                for i, sid in enumerate(ids):
                    assert torch.equal(images[i], single[int(sid)][0]) and int(labels[i]) == single[int(sid)][1]
                passes.append(ids.tolist())
        seen += sum(passes, [])
    assert sorted(seen) == list(range(20))


# --------------------------------------------------------------------------- example scripts
def run_example(*args, timeout=600):
    env = dict(os.environ, PYTHONPATH=str(ROOT), DALI_LOG_LEVEL="3", OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, *map(str, args)], env=env, capture_output=True, text=True, timeout=timeout,
                          cwd=ROOT)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return proc.stdout


@pytest.mark.slow
@pytest.mark.parametrize("script", ["train_plain.py", "train_plain_torchvision.py"])
def test_plain_examples_run(small_dataset, script):
    out = run_example(ROOT / "examples" / script, "--data", small_dataset, "--size", "16", "--steps", "2",
                      "--batch-size", "4", "--workers", "1", "--device", "cpu")
    assert "epoch 0: 8 images" in out


@pytest.mark.slow
def test_timm_example_runs_and_switches_mixing_off(small_dataset):
    out = run_example(ROOT / "examples" / "train_timm.py", "--data-dir", small_dataset, "--img-size", "16", "-b", "4",
                      "--epochs", "2", "--steps", "1", "--mixup-off-epoch", "1", "-j", "1", "--device", "cpu")
    lines = [line for line in out.splitlines() if line.startswith("epoch")]
    assert "mixing on" in lines[0] and "mixing off" in lines[1]
    assert "eval top-1" in lines[1]


def test_readme_shows_the_plain_example_diff():
    a = (ROOT / "examples" / "train_plain_torchvision.py").read_text().splitlines()
    b = (ROOT / "examples" / "train_plain.py").read_text().splitlines()
    hunks = [line for line in difflib.unified_diff(a, b, lineterm="", n=0) if line[:1] in "+-" and line[:3] not in ("+++", "---")]
    readme = (ROOT / "docs" / "drop-in.md").read_text()  # the README's drop-in section lives there now
    block = readme.split("```diff\n", 1)[1].split("```", 1)[0].splitlines()
    assert [line for line in block if line[:1] in "+-"] == hunks
    assert len(hunks) <= 20  # "a few lines"
