"""Drop-in use: dalimix.create_loader with timm's names, eval-loader semantics, the example scripts."""

from __future__ import annotations

import difflib
import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch

from dalimix import ImageLoader, LastBatchPolicy, create_loader
from dalimix.mix import Mixup

ROOT = Path(__file__).resolve().parents[1]


# ------------------------------------------------------------------- create_loader: arguments
def _timm_transform_parts(transform):
    return {type(t).__name__: t for t in transform.transforms}


@pytest.mark.parametrize("crop_pct, interpolation", [(0.875, "bilinear"), (0.95, "bicubic"), (1.0, "nearest")])
def test_eval_settings_match_timms_eval_transform(small_dataset, crop_pct, interpolation):
    from timm.data import create_transform

    loader = create_loader(
        small_dataset,
        input_size=(3, 48, 48),
        batch_size=4,
        crop_pct=crop_pct,
        interpolation=interpolation,
        device="cpu",
    )
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
    loader = create_loader(
        small_dataset,
        input_size=40,
        batch_size=4,
        is_training=True,
        color_jitter=0,
        mean=(0.5, 0.5, 0.5),
        std=(0.25, 0.25, 0.25),
        num_workers=1,
        img_dtype=torch.bfloat16,
        device="cpu",
        **kw,
    )
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
    assert (
        create_loader(small_dataset, 40, 4, is_training=True, no_aug=True, color_jitter=0, device="cpu").spec.train
        is False
    )


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
    train = create_loader(**kw, is_training=True, auto_augment="rand-m9-mstd0.5-inc1")
    assert train.spec.auto_augment == "rand-m9-n2-p0.5-mstd0.5-mmax10-inc1"  # its canonical string
    images, _ = next(iter(train))
    assert images.shape == (4, 3, 32, 32)
    assert (
        create_loader(**kw, is_training=False, auto_augment="rand-m9-n2").spec.auto_augment is None
    )  # timm: eval ignores it
    assert (
        create_loader(**kw, is_training=True, auto_augment="augmix-m5-w4-d2").spec.auto_augment
        == "augmix-m5-w4-d2-a1-mstd101"
    )
    with pytest.raises(ValueError, match="v0"):
        create_loader(**kw, is_training=True, auto_augment="v0")


def test_timm_options_without_equivalent_are_refused_not_dropped(small_dataset):
    kw = dict(dataset=small_dataset, input_size=32, batch_size=4, device="cpu")
    for name, value in [
        ("num_aug_repeats", 3),
        ("num_aug_splits", 2),
        ("train_crop_mode", "rkrc"),
        ("crop_mode", "squash"),
        ("input_size", (1, 32, 32)),
        ("tf_preprocessing", True),
        ("input_size_choices", [32, 48]),
        ("num_batches", 10),
        ("crop_border_pixels", 2),
    ]:
        with pytest.raises(ValueError, match=name if name != "input_size" else "3-channel"):
            create_loader(**{**kw, name: value})
    with pytest.raises(TypeError, match="unexpected keyword argument 'num_worker'"):
        create_loader(**kw, num_worker=2)
    with pytest.raises(ValueError, match="for training loaders"):
        create_loader(**kw, interpolation="random")
    with pytest.raises(ValueError, match="only timm's Mixup"):
        create_loader(**kw, is_training=True, collate_fn=lambda batch: batch)
    # timm's "off" values and worker-only options pass; an eval loader ignores train augmentations (timm too)
    loader = create_loader(
        **kw,
        re_prob=0.25,
        re_mode="pixel",
        vflip=0.5,
        grayscale_prob=None,
        auto_augment=None,
        persistent_workers=False,
        worker_seeding="all",
        train_crop_mode="rrc",
        num_aug_splits=1,
    )
    assert len(loader) == 5 and loader.erasing is None and loader.spec.extra is None
    with pytest.warns(UserWarning, match="use_prefetcher=False changes nothing"):
        create_loader(**kw, use_prefetcher=False)
    with pytest.warns(UserWarning, match="pin_memory=True changes nothing"):
        create_loader(**kw, pin_memory=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        create_loader(**kw, is_training=True)  # timm's defaults: colour jitter 0.4 is applied, no warning
    with pytest.raises(ValueError, match="never mixes"):
        create_loader(**kw, mix=Mixup())


def test_every_timm_create_loader_argument_is_accounted_for():
    """Each name of timm's create_loader (the installed timm) is a parameter of ours, in timm's order, and
    either honoured or listed with what becomes of it: none falls through."""
    import inspect

    from timm.data import create_loader as timm_create_loader

    from dalimix import compat

    theirs = inspect.signature(timm_create_loader).parameters
    ours = inspect.signature(create_loader).parameters
    positional = [n for n, p in ours.items() if p.kind is p.POSITIONAL_OR_KEYWORD]
    assert positional == list(theirs)
    listed = set(compat.HONOURED) | set(compat.NO_WORKERS) | set(compat.OFF_ONLY) | set(compat.SCHEDULE_ONLY)
    assert set(theirs) == listed, set(theirs) ^ listed
    # the same defaults, except where dalimix's default means "timm's behaviour here": the device (CUDA if
    # present), the worker count (this process's cores) and the seed source (None: the script's seed)
    differ = {n for n in theirs if theirs[n].default != ours[n].default}
    assert differ <= {"device", "num_workers", "batch_choice_seed"}, differ


def test_distributed_flag(small_dataset):
    kw = dict(dataset=small_dataset, input_size=32, batch_size=4, device="cpu")
    with pytest.raises(ValueError, match="init_process_group"):
        create_loader(**kw, distributed=True)
    loader = create_loader(**kw, distributed=False)
    assert (loader.shard_id, loader.num_shards) == (0, 1)


def test_timm_mixup_object_is_converted(small_dataset):
    """Handing timm's Mixup to create_loader mixes as dalimix's Mixup with the same arguments."""
    from timm.data import Mixup as TimmMixup

    args = dict(
        mixup_alpha=0.4, cutmix_alpha=1.0, prob=0.9, switch_prob=0.3, mode="elem", label_smoothing=0.2, num_classes=4
    )
    timm_mix = TimmMixup(**args)
    timm_mix.mixup_enabled = False
    common = dict(input_size=32, batch_size=4, is_training=True, color_jitter=0, device="cpu", seed=3)
    loader = create_loader(small_dataset, mix=timm_mix, **common)
    assert isinstance(loader.mix, Mixup) and loader.mixup_enabled is False
    m = loader.mix
    assert (m.mixup_alpha, m.cutmix_alpha, m.prob, m.switch_prob, m.mode, m.label_smoothing) == (
        0.4,
        1.0,
        0.9,
        0.3,
        "elem",
        0.2,
    )
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
        loader = ImageLoader(
            root=small_dataset, batch_size=batch, size=24, device="cpu", train=False, shard_id=rank, num_shards=world
        )
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
    proc = subprocess.run(
        [sys.executable, *map(str, args)], env=env, capture_output=True, text=True, timeout=timeout, cwd=ROOT
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return proc.stdout


@pytest.mark.slow
@pytest.mark.parametrize("script", ["train_plain.py", "train_plain_torchvision.py"])
def test_plain_examples_run(small_dataset, script):
    out = run_example(
        ROOT / "examples" / script,
        "--data",
        small_dataset,
        "--size",
        "16",
        "--steps",
        "2",
        "--batch-size",
        "4",
        "--workers",
        "1",
        "--device",
        "cpu",
    )
    assert "epoch 0: 8 images" in out


@pytest.mark.slow
def test_timm_example_runs_and_switches_mixing_off(small_dataset):
    out = run_example(
        ROOT / "examples" / "train_timm.py",
        "--data-dir",
        small_dataset,
        "--img-size",
        "16",
        "-b",
        "4",
        "--epochs",
        "2",
        "--steps",
        "1",
        "--mixup-off-epoch",
        "1",
        "-j",
        "1",
        "--device",
        "cpu",
    )
    lines = [line for line in out.splitlines() if line.startswith("epoch")]
    assert "mixing on" in lines[0] and "mixing off" in lines[1]
    assert "eval top-1" in lines[1]


def test_readme_shows_the_plain_example_diff():
    a = (ROOT / "examples" / "train_plain_torchvision.py").read_text().splitlines()
    b = (ROOT / "examples" / "train_plain.py").read_text().splitlines()
    hunks = [
        line
        for line in difflib.unified_diff(a, b, lineterm="", n=0)
        if line[:1] in "+-" and line[:3] not in ("+++", "---")
    ]
    readme = (ROOT / "docs" / "drop-in.md").read_text()  # the README's drop-in section lives there now
    block = readme.split("```diff\n", 1)[1].split("```", 1)[0].splitlines()
    assert [line for line in block if line[:1] in "+-"] == hunks
    assert len(hunks) <= 20  # "a few lines"


# ------------------------------------------------------------ timm train.py, re-created
# timm's train.py (huggingface/pytorch-image-models main, 2026-08; timm 1.0.x) as far as its loaders go:
# the argparse defaults of every flag that reaches create_loader, and its create_dataset / Mixup /
# FastCollateMixup / create_loader calls with their arguments, in its words.
TRAIN_PY_DEFAULTS = dict(
    reprob=0.0,
    remode="pixel",
    recount=1,
    resplit=False,
    train_crop_mode=None,
    scale=[0.08, 1.0],
    ratio=[3.0 / 4.0, 4.0 / 3.0],
    hflip=0.5,
    vflip=0.0,
    color_jitter=0.4,
    color_jitter_prob=None,
    grayscale_prob=None,
    gaussian_blur_prob=None,
    aa=None,
    aug_repeats=0,
    aug_splits=0,
    train_interpolation="random",
    workers=4,
    worker_seeding="all",
    pin_mem=False,
    no_prefetcher=False,
    use_multi_epochs_loader=False,
    mixup=0.0,
    cutmix=0.0,
    cutmix_minmax=None,
    mixup_prob=1.0,
    mixup_switch_prob=0.5,
    mixup_mode="batch",
    smoothing=0.1,
    num_classes=None,
    seed=42,
    train_img_sizes=None,
    train_batch_sizes=None,
    train_size_probs=None,
    train_size_schedule="constant",
    train_size_schedule_spread=0.65,
    train_size_random_mix=0.1,
    train_batches_per_epoch=None,
    epochs=300,
    no_aug=False,
    model_dtype=None,
    distributed=False,
    batch_size=4,
    validation_batch_size=None,
    train_split="train",
    val_split="validation",
)
MODEL_NUM_CLASSES = 1000  # train.py takes args.num_classes from the model when --num-classes is not given


def train_py_loaders(data_dir, create_loader_fn, device="cpu", **flags):
    """train.py's dataset, mixup and loader construction with ``flags`` over its defaults."""
    from types import SimpleNamespace

    from timm.data import FastCollateMixup, create_dataset
    from timm.data import Mixup as TimmMixup

    args = SimpleNamespace(**{**TRAIN_PY_DEFAULTS, **flags})
    args.prefetcher = not args.no_prefetcher
    if args.num_classes is None:
        args.num_classes = MODEL_NUM_CLASSES
    data_config = dict(
        input_size=(3, 32, 32),
        interpolation="bicubic",
        mean=(0.485, 0.456, 0.406),
        std=(0.229, 0.224, 0.225),
        crop_pct=0.95,
    )  # resolve_data_config of a small model
    num_aug_splits = args.aug_splits if args.aug_splits > 0 else 0
    dataset_train = create_dataset(
        "",
        root=str(data_dir),
        split=args.train_split,
        is_training=True,
        batch_size=args.batch_size,
        seed=args.seed,
        repeats=0,
        input_img_mode="RGB",
    )
    dataset_eval = create_dataset(
        "",
        root=str(data_dir),
        split=args.train_split,
        is_training=False,
        batch_size=args.batch_size,
        input_img_mode="RGB",
    )
    train_interpolation = args.train_interpolation
    if args.no_aug or not train_interpolation:
        train_interpolation = data_config["interpolation"]
    common_loader_kwargs = dict(
        mean=data_config["mean"],
        std=data_config["std"],
        pin_memory=args.pin_mem,
        img_dtype=torch.float32,
        device=torch.device(device),
        distributed=args.distributed,
        use_prefetcher=args.prefetcher,
    )
    train_loader_kwargs = dict(
        batch_size=args.batch_size,
        is_training=True,
        no_aug=args.no_aug,
        re_prob=args.reprob,
        re_mode=args.remode,
        re_count=args.recount,
        re_split=args.resplit,
        train_crop_mode=args.train_crop_mode,
        scale=args.scale,
        ratio=args.ratio,
        hflip=args.hflip,
        vflip=args.vflip,
        color_jitter=args.color_jitter,
        color_jitter_prob=args.color_jitter_prob,
        grayscale_prob=args.grayscale_prob,
        gaussian_blur_prob=args.gaussian_blur_prob,
        auto_augment=args.aa,
        num_aug_repeats=args.aug_repeats,
        num_aug_splits=num_aug_splits,
        interpolation=train_interpolation,
        num_workers=args.workers,
        worker_seeding=args.worker_seeding,
    )
    mixup_fn = collate_fn = None
    mixup_active = args.mixup > 0 or args.cutmix > 0.0 or args.cutmix_minmax is not None
    if mixup_active:
        mixup_args = dict(
            mixup_alpha=args.mixup,
            cutmix_alpha=args.cutmix,
            cutmix_minmax=args.cutmix_minmax,
            prob=args.mixup_prob,
            switch_prob=args.mixup_switch_prob,
            mode=args.mixup_mode,
            label_smoothing=args.smoothing,
            num_classes=args.num_classes,
        )
        if args.prefetcher:
            collate_fn = FastCollateMixup(**mixup_args)
        else:
            mixup_fn = TimmMixup(**mixup_args)
    loader_train = create_loader_fn(
        dataset_train,
        input_size=data_config["input_size"],
        input_size_choices=args.train_img_sizes,
        batch_size_choices=args.train_batch_sizes,
        batch_choice_weights=args.train_size_probs,
        batch_choice_seed=args.seed,
        batch_choice_schedule=args.train_size_schedule,
        batch_schedule_epochs=args.epochs if args.train_size_schedule == "progressive" else None,
        batch_schedule_spread=args.train_size_schedule_spread,
        batch_schedule_random_mix=args.train_size_random_mix,
        num_batches=args.train_batches_per_epoch,
        collate_fn=collate_fn,
        use_multi_epochs_loader=args.use_multi_epochs_loader,
        **common_loader_kwargs,
        **train_loader_kwargs,
    )
    eval_loader_kwargs = dict(
        batch_size=args.validation_batch_size or args.batch_size,
        is_training=False,
        interpolation=data_config["interpolation"],
        num_workers=args.workers,
        crop_pct=data_config["crop_pct"],
    )
    loader_eval = create_loader_fn(
        dataset_eval, input_size=data_config["input_size"], **common_loader_kwargs, **eval_loader_kwargs
    )
    return loader_train, loader_eval, mixup_fn, args


@pytest.mark.slow
def test_train_py_loaders_at_its_defaults(small_dataset):
    """train.py's own calls, unchanged, at its defaults: colour jitter 0.4 and random interpolation run
    in DALI, the seed is train.py's --seed, one epoch each of train and eval."""
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        train, val, mixup_fn, args = train_py_loaders(small_dataset, create_loader)
    assert mixup_fn is None and train.mix is None and train.erasing is None
    assert train.seed == 42 and train.spec.extra.color_jitter == (0.4, 0.4, 0.4, 0.0)
    assert train.spec.extra.random_interpolation and train.spec.hflip == 0.5
    assert train.num_threads == 4 and train.last_batch_policy is LastBatchPolicy.DROP
    seen = 0
    for images, labels in train:
        assert images.shape == (4, 3, 32, 32) and images.dtype == torch.float32 and labels.dtype == torch.int64
        seen += len(labels)
    assert seen == 20
    assert sum(len(y) for _, y in val) == 20 and val.spec.interpolation == "bicubic" and val.spec.crop_pct == 0.95
    # colour jitter and random interpolation are DALI's draws, whose streams run on over the
    # loader's one pipeline: compare first batches of fresh loaders
    again, _, _, _ = train_py_loaders(small_dataset, create_loader)
    twice, _, _, _ = train_py_loaders(small_dataset, create_loader)
    other, _, _, _ = train_py_loaders(small_dataset, create_loader, seed=1)
    first = next(iter(again))[0]
    assert torch.equal(first, next(iter(twice))[0])  # --seed 42 twice: the same stream
    assert not torch.equal(first, next(iter(other))[0])  # --seed 1: another one


@pytest.mark.slow
def test_train_py_loaders_with_mixing_randaugment_and_erasing(small_dataset):
    """--mixup 0.8 --cutmix 1.0 --aa rand-m9-mstd0.5-inc1 --reprob 0.25: the FastCollateMixup train.py
    builds becomes the loader's mixer (same arguments, the model's 1000 classes), RandAugment runs as
    timm's, colour jitter is off under it (timm's rule), erasing is timm's pixel mode at 0.25."""
    train, _, mixup_fn, _ = train_py_loaders(
        small_dataset, create_loader, mixup=0.8, cutmix=1.0, aa="rand-m9-mstd0.5-inc1", reprob=0.25
    )
    m = train.mix
    assert mixup_fn is None and isinstance(m, Mixup) and m.num_classes == MODEL_NUM_CLASSES
    assert (m.mixup_alpha, m.cutmix_alpha, m.switch_prob, m.label_smoothing, m.mode) == (0.8, 1.0, 0.5, 0.1, "batch")
    assert train.spec.auto_augment == "rand-m9-n2-p0.5-mstd0.5-mmax10-inc1" and train.spec.extra.color_jitter is None
    e = train.erasing
    assert (e.probability, e.mode, e.min_count, e.max_count, e.num_splits) == (0.25, "pixel", 1, 1, 0)
    batches = 0
    for images, targets in train:
        assert images.shape == (4, 3, 32, 32) and targets.shape == (4, MODEL_NUM_CLASSES)
        torch.testing.assert_close(targets.sum(1), torch.ones(4))
        assert targets[:, 4:].max() <= 0.1 / MODEL_NUM_CLASSES + 1e-7  # only the 4 real classes carry mass
        batches += 1
    assert batches == 5
    # --no-prefetcher: train.py keeps Mixup for its loop; the loader yields plain labels
    plain, _, mixup_fn, _ = train_py_loaders(small_dataset, create_loader, mixup=0.8, cutmix=1.0, no_prefetcher=True)
    assert mixup_fn is not None and plain.mix is None


# ------------------------------------------------------------------------------ seed rule
def test_seed_follows_the_script(small_dataset):
    """No seed given: the script's torch seed (torch.manual_seed); an explicit seed wins."""

    def first(**kw):
        loader = ImageLoader(root=small_dataset, batch_size=4, size=24, device="cpu", num_threads=1, **kw)
        return loader.seed, next(iter(loader))[0]

    state = torch.random.get_rng_state()
    try:
        torch.manual_seed(7)
        s7, x7 = first()
        torch.manual_seed(7)
        s7b, x7b = first()
        torch.manual_seed(8)
        s8, x8 = first()
    finally:
        torch.random.set_rng_state(state)
    assert (s7, s7b, s8) == (7, 7, 8)
    assert torch.equal(x7, x7b) and not torch.equal(x7, x8)
    assert first(seed=7)[0] == 7 and torch.equal(first(seed=7)[1], x7)
    loader = create_loader(small_dataset, 24, 4, is_training=True, batch_choice_seed=3, seed=5, device="cpu")
    assert loader.seed == 5  # seed= wins over train.py's batch_choice_seed


# ------------------------------------------------------------------------ num_classes rule
def test_mixer_num_classes_wins_and_too_few_is_refused(small_dataset):
    """Mixup(num_classes=1000) on a 4-class folder gives N x 1000 targets (the model's outputs); fewer
    classes than the data set's is an error at construction naming both numbers."""
    loader = ImageLoader(
        root=small_dataset,
        batch_size=4,
        size=24,
        device="cpu",
        seed=0,
        num_threads=1,
        mix=Mixup(num_classes=1000, label_smoothing=0.0),
    )
    images, targets = next(iter(loader))
    assert targets.shape == (4, 1000) and int(targets.argmax(1).max()) < 4
    with pytest.raises(ValueError, match=r"num_classes=3 but the data set has 4 classes.*num_classes >= 4"):
        ImageLoader(root=small_dataset, batch_size=4, size=24, device="cpu", mix=Mixup(num_classes=3))


# --------------------------------------------------------------------------- Lightning
@pytest.mark.slow
def test_lightning_datamodule_trains_one_epoch_on_cpu(small_dataset):
    pl = pytest.importorskip("lightning.pytorch")
    from dalimix.lightning import DALIMixDataModule

    class Tiny(pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.net = torch.nn.Sequential(
                torch.nn.Conv2d(3, 4, 3, stride=4), torch.nn.Flatten(), torch.nn.LazyLinear(4)
            )
            self.shapes = []

        def training_step(self, batch, _):
            images, targets = batch
            self.shapes.append((tuple(images.shape), tuple(targets.shape)))
            return torch.nn.functional.cross_entropy(self.net(images), targets)

        def validation_step(self, batch, _):
            images, labels = batch
            self.log("val_loss", torch.nn.functional.cross_entropy(self.net(images), labels))

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    pl.seed_everything(11)
    dm = DALIMixDataModule(
        train=dict(
            root=small_dataset,
            batch_size=4,
            size=24,
            num_threads=1,
            mix=Mixup(cutmix_alpha=1.0),
            last_batch_policy="drop",
        ),
        val=dict(root=small_dataset, batch_size=5, size=24, num_threads=1),
    )
    model = Tiny()
    trainer = pl.Trainer(
        max_epochs=1,
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
    )
    trainer.fit(model, datamodule=dm)
    assert model.shapes == [((4, 3, 24, 24), (4, 4))] * 5
    assert "val_loss" in trainer.callback_metrics

    class FakeTrainer:  # rank 1 of 2 under DDP
        global_rank, world_size = 1, 2
        strategy = type("S", (), {"root_device": torch.device("cpu")})()

    dm2 = DALIMixDataModule(train=dict(root=small_dataset, batch_size=2, size=24, seed=0))
    dm2.trainer = FakeTrainer()
    dm2.setup("fit")
    assert (dm2.train_loader.shard_id, dm2.train_loader.num_shards) == (1, 2) and len(dm2.train_loader) == 5
    with pytest.raises(ValueError, match="come from the trainer"):
        DALIMixDataModule(train=dict(root=small_dataset, batch_size=2, shard_id=0, num_shards=2))


# ---------------------------------------------------------- pytorch/examples imagenet loop
@pytest.mark.slow
def test_pytorch_examples_style_loop_with_mixing(small_dataset):
    """pytorch/examples imagenet/main.py's train() loop, loader swapped and mixing added: the changed
    lines are the loader construction (2: the mixer, the loader) and the target copy dropped (1);
    the criterion (nn.CrossEntropyLoss) takes the soft targets as they are."""
    import torchvision

    torch.manual_seed(0)
    model = torchvision.models.resnet18(num_classes=1000)
    criterion = torch.nn.CrossEntropyLoss()
    optimizer = torch.optim.SGD(model.parameters(), 0.1, momentum=0.9, weight_decay=1e-4)
    mix = Mixup(mixup_alpha=0.2, cutmix_alpha=1.0, num_classes=1000)  # changed line 1
    train_loader = ImageLoader(root=small_dataset, batch_size=4, size=32, device="cpu", num_threads=1, mix=mix)  # 2
    model.train()
    for _epoch in range(1):
        train_loader.sampler.set_epoch(_epoch)  # main.py: train_sampler.set_epoch(epoch) under DDP
        for i, (images, target) in enumerate(train_loader):
            # main.py moves images and target to the device here; dalimix's are there (changed line 3)
            output = model(images)
            loss = criterion(output, target)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            assert torch.isfinite(loss) and target.shape == (4, 1000)
    assert i == 4


SEED_SCRIPT = """
import socket, sys
import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def worker(rank, world, port, out):
    from dalimix.rng import script_seed

    torch.manual_seed(42 + rank)  # timm's utils.random_seed(seed, rank)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        out[rank] = script_seed()
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    with mp.get_context("spawn").Manager() as manager:
        out = manager.dict()
        mp.spawn(worker, args=(2, port, out), nprocs=2, join=True)
        print(sorted(out.items()))
"""


@pytest.mark.slow
def test_script_seed_is_rank_zeros_under_torch_distributed(tmp_path):
    """Ranks seeded seed + rank (timm) share rank 0's seed: one epoch permutation for all shards
    (two gloo processes, in a child process of their own)."""
    script = tmp_path / "seeds.py"
    script.write_text(SEED_SCRIPT)
    out = run_example(script, timeout=300)
    assert out.strip().splitlines()[-1] == "[(0, 42), (1, 42)]"
