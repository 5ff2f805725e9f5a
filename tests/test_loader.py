"""ImageLoader on DALI's CPU-only mode: contract, order, sharding, seeds, decoding, errors."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from conftest import write_image

from dalimix import DatasetError, DecodeError, ImageLoader, LastBatchPolicy, plan_epoch


def collect(loader, epochs=1):
    out = []
    for _ in range(epochs):
        ids, batches = [], []
        for images, labels in loader:
            ids.append(loader.last_batch.sample_ids.copy())
            batches.append((images.clone(), labels.clone()))
        out.append((ids, batches))
    return out


# ------------------------------------------------------------------------ planning (pure)
@pytest.mark.parametrize("n, b, w", [(20, 3, 1), (20, 3, 3), (17, 4, 2), (5, 8, 2), (100, 7, 8), (3, 1, 4)])
def test_plan_epoch_policies(n, b, w):
    plans = {
        p: [
            plan_epoch(n, batch_size=b, epoch=3, seed=5, shuffle=True, shard_id=r, num_shards=w, policy=p)
            for r in range(w)
        ]
        for p in LastBatchPolicy
    }
    # PARTIAL: every sample exactly once over all ranks
    partial = plans[LastBatchPolicy.PARTIAL]
    seen = np.concatenate(
        [np.concatenate([p.order[i * b : i * b + v] for i, v in enumerate(p.valid)]) for p in partial if len(p.valid)]
        or [np.array([], int)]
    )
    assert sorted(seen.tolist()) == list(range(n))
    for p in partial:
        assert all(1 <= v <= b for v in p.valid)
    # DROP: every rank the same number of full batches, no sample twice
    drop = plans[LastBatchPolicy.DROP]
    assert len({p.num_batches for p in drop}) == 1
    assert drop[0].num_batches == (n // w) // b
    ids = np.concatenate([p.order for p in drop])
    assert len(ids) == len(set(ids.tolist()))
    # FILL: every rank the same number of full batches; each real sample at least once
    fill = plans[LastBatchPolicy.FILL]
    assert len({p.num_batches for p in fill}) == 1
    assert fill[0].num_batches == -(-(-(-n // w)) // b)
    assert set(np.concatenate([p.order for p in fill]).tolist()) == set(range(n))
    assert all((p.valid == b).all() for p in fill)


def test_plan_epoch_is_a_function_of_seed_and_epoch():
    kw = dict(batch_size=4, shuffle=True, shard_id=0, num_shards=1, policy=LastBatchPolicy.PARTIAL)
    a = plan_epoch(50, epoch=2, seed=1, **kw).order
    assert np.array_equal(a, plan_epoch(50, epoch=2, seed=1, **kw).order)
    assert not np.array_equal(a, plan_epoch(50, epoch=3, seed=1, **kw).order)
    assert not np.array_equal(a, plan_epoch(50, epoch=2, seed=2, **kw).order)
    kw["shuffle"] = False
    assert np.array_equal(plan_epoch(10, epoch=7, seed=1, **kw).order[:10], np.arange(10))


# ------------------------------------------------------------------------- the contract
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("channels_last", [False, True])
def test_shapes_dtypes_layouts(small_dataset, dtype, channels_last):
    loader = ImageLoader(
        root=small_dataset, batch_size=6, size=(40, 56), device="cpu", dtype=dtype, channels_last=channels_last
    )
    assert len(loader) == 4  # 20 samples, PARTIAL
    sizes = []
    for images, labels in loader:
        assert images.dtype == dtype and images.shape[1:] == (3, 40, 56)
        fmt = torch.channels_last if channels_last else torch.contiguous_format
        assert images.is_contiguous(memory_format=fmt)
        assert labels.dtype == torch.int64 and labels.shape == (images.shape[0],)
        assert torch.isfinite(images.float()).all()
        sizes.append(images.shape[0])
    assert sizes == [6, 6, 6, 2]


def test_values_are_normalised(tmp_path):
    """Eval pipeline on solid-colour images: every output pixel is (c - 255 mean) / (255 std)."""
    colours = {"a": (200, 30, 90), "b": (10, 250, 128)}
    for cls, c in colours.items():
        for i in range(2):
            write_image(tmp_path / cls / f"{i}.png", np.full((50 + 10 * i, 70, 3), c, np.uint8))
    mean, std = (0.5, 0.4, 0.3), (0.2, 0.25, 0.3)
    loader = ImageLoader(root=tmp_path, batch_size=4, size=32, train=False, device="cpu", mean=mean, std=std)
    images, labels = next(iter(loader))
    for img, lab in zip(images, labels):
        c = np.array(colours[loader.classes[lab]], np.float64)
        want = (c / 255 - np.array(mean)) / np.array(std)
        np.testing.assert_allclose(img.numpy(), np.broadcast_to(want[:, None, None], img.shape), atol=1e-5)


def test_flip_and_whole_image_crop(tmp_path):
    """scale=(1, 1), ratio=(1, 1) on square images makes the random crop the whole image: with
    hflip=0 the output is the image, with hflip=1 its mirror."""
    x = np.arange(32, dtype=np.uint8)[None, :, None] * 7
    img = np.broadcast_to(x, (32, 32, 3)).copy()
    img[..., 1] = 255 - img[..., 1]
    write_image(tmp_path / "a" / "0.png", img)
    norm = dict(mean=(0, 0, 0), std=(1 / 255, 1 / 255, 1 / 255))  # output = pixel values
    kw = dict(root=tmp_path, batch_size=1, size=32, device="cpu", scale=(1, 1), ratio=(1, 1), **norm)
    plain = next(iter(ImageLoader(hflip=0.0, **kw)))[0][0].permute(1, 2, 0).numpy()
    flipped = next(iter(ImageLoader(hflip=1.0, **kw)))[0][0].permute(1, 2, 0).numpy()
    np.testing.assert_allclose(plain, img, atol=1e-3)
    np.testing.assert_allclose(flipped, img[:, ::-1], atol=1e-3)


def test_the_kernel_flips_what_the_hook_the_unmixed_and_the_mixed_batch_see(small_dataset):
    """hflip=1 against hflip=0, same seed (same crops): the unmixed batch, the images a mask hook
    receives and the MixUp-mixed batch are the mirrors of the unflipped ones; no DALI flip pass."""
    from dalimix.hook import LearnedMask
    from dalimix.mix import Mixer, MixUp

    def run(hflip, methods):
        loader = ImageLoader(
            root=small_dataset,
            batch_size=4,
            size=24,
            device="cpu",
            seed=5,
            num_threads=1,
            hflip=hflip,
            keep_unmixed=True,
            mix=Mixer(methods=methods, prob=1.0),
        )
        seen = []
        if any(isinstance(m, LearnedMask) for m in methods):

            def hook(images, lam, partner):
                seen.append(images.clone())
                return torch.full((images.shape[0], 1, 3, 3), 0.25)

            loader.set_mask_hook(hook)
        images, _ = next(iter(loader))
        assert loader.last_batch.flips.all() == bool(hflip)
        return images, loader.last_batch.unmixed.clone(), seen

    for methods in ([MixUp(alpha=1.0)], [LearnedMask(alpha=2.0)]):
        a_mixed, a_unmixed, a_seen = run(0.0, methods)
        b_mixed, b_unmixed, b_seen = run(1.0, methods)
        assert torch.equal(b_unmixed, a_unmixed.flip(-1))
        torch.testing.assert_close(b_mixed, a_mixed.flip(-1), atol=1e-5, rtol=0)
        if a_seen:
            assert torch.equal(b_seen[0], a_seen[0].flip(-1))


def test_labels_follow_the_files(small_dataset):
    loader = ImageLoader(root=small_dataset, batch_size=7, size=32, device="cpu")
    for _, labels in loader:
        ids = loader.last_batch.sample_ids
        assert labels.tolist() == loader.dataset.labels[ids].tolist()
        for i, lab in zip(ids, labels.tolist()):
            assert f"/{loader.classes[lab]}/" in loader.dataset.paths[i]


def test_every_file_once_per_epoch_and_reshuffled(small_dataset):
    loader = ImageLoader(root=small_dataset, batch_size=6, size=32, device="cpu", seed=3)
    epochs = collect(loader, epochs=3)
    orders = []
    for ids, _ in epochs:
        flat = np.concatenate(ids)
        assert sorted(flat.tolist()) == list(range(20))
        orders.append(flat.tolist())
    assert orders[0] != orders[1] != orders[2]
    assert loader.epoch == 2


@pytest.mark.parametrize("policy, lengths", [("drop", [6, 6, 6]), ("partial", [6, 6, 6, 2]), ("fill", [6, 6, 6, 6])])
def test_last_batch_policies(small_dataset, policy, lengths):
    loader = ImageLoader(root=small_dataset, batch_size=6, size=32, device="cpu", last_batch_policy=policy)
    assert len(loader) == len(lengths)
    ((ids, batches),) = collect(loader)
    assert [len(b[1]) for b in batches] == lengths
    flat = np.concatenate(ids).tolist()
    if policy == "fill":
        assert set(flat) == set(range(20))
    else:
        assert len(set(flat)) == len(flat)


def test_same_seed_same_batches_and_set_epoch(small_dataset):
    kw = dict(root=small_dataset, batch_size=5, size=32, device="cpu", seed=11)
    a = collect(ImageLoader(**kw), epochs=2)
    b = collect(ImageLoader(**kw), epochs=2)
    for (ia, ba), (ib, bb) in zip(a, b):
        assert all(np.array_equal(x, y) for x, y in zip(ia, ib))
        assert all(torch.equal(x[0], y[0]) and torch.equal(x[1], y[1]) for x, y in zip(ba, bb))
    # epoch 1 straight away (set_epoch) gives epoch 1 of the run above
    c = ImageLoader(**kw)
    c.set_epoch(1)
    ((ic, bc),) = collect(c)
    assert all(np.array_equal(x, y) for x, y in zip(ic, a[1][0]))
    assert all(torch.equal(x[0], y[0]) for x, y in zip(bc, a[1][1]))
    # the timm / DistributedSampler idiom
    d = ImageLoader(**kw)
    d.sampler.set_epoch(1)
    assert d.epoch == 1
    other = collect(ImageLoader(**{**kw, "seed": 12}))
    assert not all(torch.equal(x[0], y[0]) for x, y in zip(other[0][1], a[0][1]))


def test_shards_split_an_epoch(small_dataset):
    got = []
    for r in range(3):
        loader = ImageLoader(root=small_dataset, batch_size=4, size=32, device="cpu", shard_id=r, num_shards=3)
        ((ids, _),) = collect(loader)
        got.append(np.concatenate(ids))
    flat = np.concatenate(got).tolist()
    assert sorted(flat) == list(range(20))
    # per-rank augmentation streams differ (rank enters DALI's seed)
    assert ImageLoader(root=small_dataset, batch_size=4, size=32, device="cpu").shard_id == 0


def test_loader_attributes(small_dataset):
    loader = ImageLoader(root=small_dataset, batch_size=8, size=32, device="cpu")
    assert loader.batch_size == 8
    assert len(loader.dataset) == 20 and loader.dataset.classes == loader.classes == ["bar", "disc", "ring", "star"]
    assert loader.class_to_idx == {"bar": 0, "disc": 1, "ring": 2, "star": 3}
    assert loader.batch_sampler is None and hasattr(loader.sampler, "set_epoch")
    assert loader.mixup_enabled is False
    assert loader.device == torch.device("cpu")
    assert "ImageLoader(" in repr(loader)
    it = iter(loader)
    next(it)
    # a new iteration abandons the old one cleanly and starts the next epoch
    assert sum(1 for _ in loader) == 3


def test_file_list_source(small_dataset, tmp_path):
    paths = sorted(small_dataset.rglob("*.jpg"))[:7]
    lst = tmp_path / "list.txt"
    lst.write_text("".join(f"{p} {i % 3}\n" for i, p in enumerate(paths)))
    loader = ImageLoader(file_list=lst, batch_size=3, size=32, device="cpu", train=False, classes=["x", "y", "z"])
    ((ids, batches),) = collect(loader)
    assert sorted(np.concatenate(ids).tolist()) == list(range(7))
    assert torch.cat([b[1] for b in batches]).tolist() == [i % 3 for i in range(7)]  # eval: no shuffle
    assert loader.classes == ["x", "y", "z"]


FORMATS = [
    ("gray.jpg", "JPEG", "L", {}, 4),
    ("prog.jpg", "JPEG", None, {"progressive": True, "quality": 95}, 4),
    ("cmyk.jpg", "JPEG", "CMYK", {"quality": 95}, 6),
    ("rgba.png", "PNG", "RGBA", {}, 0),
    ("pal.png", "PNG", "P", {}, 0),
    ("gray.png", "PNG", "L", {}, 0),
    ("img.bmp", "BMP", None, {}, 0),
    ("img.webp", "WEBP", None, {"quality": 95}, 6),
    ("img.tiff", "TIFF", None, {}, 0),
]


def test_formats_decode_to_rgb(tmp_path):
    """Each format's decoded mean colour equals PIL's convert('RGB') (lossy formats within a few levels)."""
    from PIL import Image

    rng = np.random.default_rng(0)
    base = np.zeros((48, 48, 3), np.uint8)
    base[:24] = (220, 40, 90)
    base[24:] = (30, 160, 240)
    base[:, :8] = rng.integers(0, 255, 3)
    for name, fmt, mode, kw, _ in FORMATS:
        write_image(tmp_path / "c" / name, base, fmt=fmt, mode=mode, **kw)
    loader = ImageLoader(
        root=tmp_path,
        batch_size=len(FORMATS),
        size=48,
        train=False,
        crop_pct=1.0,
        device="cpu",
        mean=(0, 0, 0),
        std=(1 / 255, 1 / 255, 1 / 255),
    )
    images, _ = next(iter(loader))
    tol = {name: t for name, _, _, _, t in FORMATS}
    for img, i in zip(images, loader.last_batch.sample_ids):
        path = loader.dataset.paths[i]
        want = np.asarray(Image.open(path).convert("RGB"), np.float64).mean(axis=(0, 1))
        got = img.numpy().mean(axis=(1, 2))
        name = path.rsplit("/", 1)[1]
        assert np.abs(got - want).max() <= tol[name] + 1.0, (name, got, want)


@pytest.mark.parametrize("bad", ["zero", "truncated", "text"])
def test_bad_files_raise_decode_error_naming_the_file(tmp_path, bad):
    for i in range(3):
        write_image(tmp_path / "a" / f"{i}.jpg", np.full((20, 20, 3), 90 * i, np.uint8))
    target = tmp_path / "a" / "1.jpg"
    if bad == "zero":
        target.write_bytes(b"")
    elif bad == "truncated":
        target.write_bytes(target.read_bytes()[:60])
    else:
        target.write_text("this is not a JPEG")
    loader = ImageLoader(root=tmp_path, batch_size=3, size=16, device="cpu")
    with pytest.raises(DecodeError) as e:
        list(loader)
    assert str(target) in str(e.value)
    assert e.value.files and e.value.files[0][0] == str(target)
    assert e.value.epoch == 0 and e.value.step == 0
    reason = {"zero": "empty", "truncated": "truncated|does not decode", "text": "not an image"}[bad]
    assert any(r in str(e.value) for r in reason.split("|"))


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(), "give the data"),
        (dict(batch_size=0), "batch_size=0"),
        (dict(size=-3), "size=-3"),
        (dict(size=(32,)), "size="),
        (dict(dtype="int8"), "dtype='int8'"),
        (dict(scale=(0.5, 0.2)), "scale="),
        (dict(ratio=(0, 1)), "ratio="),
        (dict(hflip=2), "hflip=2"),
        (dict(crop_pct=0), "crop_pct=0"),
        (dict(interpolation="lanczos"), "interpolation='lanczos'"),
        (dict(seed=-1), "seed=-1"),
        (dict(shard_id=1), "give both shard_id and num_shards"),
        (dict(shard_id=3, num_shards=3), "shard_id=3"),
        (dict(last_batch_policy="sometimes"), "last_batch_policy='sometimes'"),
        (dict(device="tpu"), "device='tpu'"),
        (dict(device="cuda"), "torch sees no CUDA GPU"),
        (dict(num_threads=0), "num_threads=0"),
    ],
)
def test_arguments_are_validated(small_dataset, kwargs, message):
    if torch.cuda.is_available() and kwargs.get("device") == "cuda":
        pytest.skip("a GPU is present")
    base = dict(root=small_dataset, batch_size=4)
    if "batch_size" in kwargs or kwargs == {}:
        base = {"root": small_dataset} if kwargs else {"batch_size": 4}
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        ImageLoader(**{**base, **kwargs})


def test_too_few_samples_for_a_dropped_batch(small_dataset):
    with pytest.raises(DatasetError, match="make no batch of 64"):
        ImageLoader(root=small_dataset, batch_size=64, last_batch_policy="drop", device="cpu")


def test_accepts_dali_last_batch_policy(small_dataset):
    from nvidia.dali.plugin.base_iterator import LastBatchPolicy as DaliPolicy

    loader = ImageLoader(root=small_dataset, batch_size=6, device="cpu", last_batch_policy=DaliPolicy.FILL)
    assert loader.last_batch_policy is LastBatchPolicy.FILL


def _count_builds(monkeypatch):
    from nvidia.dali.pipeline import Pipeline

    builds = []
    real = Pipeline.build

    def counting(self, *a, **kw):
        if not getattr(self, "_built", False):  # DALI's build() returns at once when built already
            builds.append(self)
        return real(self, *a, **kw)

    monkeypatch.setattr(Pipeline, "build", counting)
    return builds


@pytest.mark.parametrize("set_epoch", [True, False])
def test_one_dali_pipeline_for_the_loaders_life(small_dataset, monkeypatch, set_epoch):
    """4 epochs (with or without set_epoch), an epoch read twice, a state loaded: one Pipeline.build."""
    from dalimix.mix import Mixup

    builds = _count_builds(monkeypatch)
    loader = ImageLoader(root=small_dataset, batch_size=6, size=32, device="cpu", seed=3, num_threads=1, mix=Mixup())
    for epoch in range(4):
        if set_epoch:
            loader.set_epoch(epoch)
        assert len(list(loader)) == 4
    state = loader.state_dict()
    loader.set_epoch(1)
    next(iter(loader))
    loader.load_state_dict(state)
    next(iter(loader))
    assert len(builds) == 1 and loader.pipelines_built == 1


def test_an_epoch_is_the_same_whatever_ran_before_it(small_dataset):
    """Epoch 2 of a fresh loader equals epoch 2 read after epochs 0 and 1 (crops, flips, mixing)."""
    from dalimix.mix import Mixup

    kw = dict(root=small_dataset, batch_size=6, size=32, device="cpu", seed=3, num_threads=1)
    loader = ImageLoader(mix=Mixup(mixup_alpha=0.8, cutmix_alpha=1.0, mode="elem"), **kw)
    after = collect(loader, epochs=3)[2]
    fresh = ImageLoader(mix=Mixup(mixup_alpha=0.8, cutmix_alpha=1.0, mode="elem"), **kw)
    fresh.set_epoch(2)
    alone = collect(fresh)[0]
    assert all(np.array_equal(x, y) for x, y in zip(after[0], alone[0]))
    assert all(torch.equal(x[0], y[0]) and torch.equal(x[1], y[1]) for x, y in zip(after[1], alone[1]))
    assert len(alone[1]) == len(fresh)


def test_the_next_epoch_is_read_while_the_current_one_ends(small_dataset):
    """When an epoch's last batch is handed out, DALI already works on the next epoch's first batches
    (prefetch - 1 of them: the one handed out was the prefetch-th)."""
    loader = ImageLoader(root=small_dataset, batch_size=6, size=32, device="cpu", seed=3, num_threads=1, prefetch=3)
    it = iter(loader)
    for _ in range(len(loader)):
        next(it)
    queued = [entry[0].key for entry in loader._feed._pending]
    assert queued == [(1, 0), (1, 1)]
    list(loader)
    assert loader.last_batch.epoch == 1 and loader.pipelines_built == 1


def test_overlap_epochs_is_deprecated_and_changes_nothing(small_dataset):
    kw = dict(root=small_dataset, batch_size=6, size=32, device="cpu", seed=3, num_threads=1, last_batch_policy="drop")
    plain = collect(ImageLoader(**kw), epochs=2)
    with pytest.warns(DeprecationWarning, match="always"):
        loader = ImageLoader(overlap_epochs=True, **kw)
    again = collect(loader, epochs=2)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ImageLoader(overlap_epochs=False, **kw).close()  # False: what a drop-in passes by default, quietly
    for (ia, ba), (ib, bb) in zip(plain, again):
        assert all(np.array_equal(x, y) for x, y in zip(ia, ib))
        assert all(torch.equal(x[0], y[0]) for x, y in zip(ba, bb))


# ------------------------------------------------------------------------ stale iterators
def test_an_iterator_of_a_closed_loader_raises_instead_of_replaying(small_dataset):
    from dalimix.loader import StaleIteratorError

    loader = ImageLoader(root=small_dataset, batch_size=6, size=32, device="cpu", seed=3, num_threads=1)
    it = iter(loader)
    next(it)
    loader.close()
    with pytest.raises(StaleIteratorError, match="close"):
        next(it)
    with pytest.raises(StaleIteratorError):
        next(it)


def test_a_replaced_iterator_raises_and_the_new_one_reads_on(small_dataset):
    """A second iter(loader) while the first is alive: the first is dead (never yields again); the
    second reads the next epoch from its start, every sample once."""
    from dalimix.loader import StaleIteratorError

    loader = ImageLoader(root=small_dataset, batch_size=6, size=32, device="cpu", seed=3, num_threads=1)
    first = iter(loader)
    next(first)
    second = iter(loader)
    with pytest.raises(StaleIteratorError, match="newer iter"):
        next(first)
    seen = []
    for _ in second:
        info = loader.last_batch
        assert info.epoch == 1
        seen += info.sample_ids.tolist()
    assert sorted(seen) == list(range(len(loader.dataset)))
    with pytest.raises(StopIteration):  # a finished iterator stays finished
        next(second)


def test_a_finished_iterator_stays_finished_after_a_new_one(small_dataset):
    loader = ImageLoader(root=small_dataset, batch_size=6, size=32, device="cpu", seed=3, num_threads=1)
    first = iter(loader)
    list(first)
    second = iter(loader)
    next(second)
    with pytest.raises(StopIteration):
        next(first)


# ------------------------------------------------------------------------ output buffers
def test_cpu_outputs_are_recycled_only_when_nobody_holds_them(small_dataset):
    loader = ImageLoader(
        root=small_dataset, batch_size=4, size=32, device="cpu", seed=3, num_threads=1, last_batch_policy="drop"
    )
    kept = []
    ptrs = []
    for i, (images, _) in enumerate(loader):
        ptrs.append(images.data_ptr())
        if i == 0:
            kept.append((images, images.clone()))  # the training loop holds batch 0
    assert ptrs[0] not in ptrs[1:]  # held: never written again
    assert torch.equal(kept[0][0], kept[0][1])
    assert len(set(ptrs[1:])) < len(ptrs) - 1  # the others are recycled
    fresh = ImageLoader(
        root=small_dataset,
        batch_size=4,
        size=32,
        device="cpu",
        seed=3,
        num_threads=1,
        last_batch_policy="drop",
        reuse_outputs=False,
    )
    got = [x.clone() for x, _ in fresh]
    again = [
        x.clone()
        for x, _ in ImageLoader(
            root=small_dataset, batch_size=4, size=32, device="cpu", seed=3, num_threads=1, last_batch_policy="drop"
        )
    ]
    assert all(torch.equal(a, b) for a, b in zip(got, again))


@pytest.mark.gpu
def test_cuda_loader_never_waits_for_the_gpu_in_next(small_dataset):
    """On CUDA, DALI's outputs are shared on the consumer's stream and given back in stream order:
    after the first batch, next() makes no host synchronisation, across an epoch boundary too, and
    the batches equal those of a run without the sync check."""
    from dalimix.mix import Mixup

    def make():
        return ImageLoader(
            root=small_dataset,
            batch_size=6,
            size=32,
            device="cuda",
            seed=3,
            num_threads=1,
            mix=Mixup(mixup_alpha=0.8, cutmix_alpha=1.0, mode="elem"),
            last_batch_policy="drop",
        )

    plain = make()
    want = [(x.clone(), y.clone()) for _ in range(3) for x, y in plain]
    loader = make()
    got = []
    it = iter(loader)
    x, y = next(it)
    got.append((x.clone(), y.clone()))
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for epoch in range(3):
            for x, y in it:
                got.append((x.clone(), y.clone()))
            if epoch < 2:
                it = iter(loader)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    torch.cuda.synchronize()
    assert len(got) == len(want) and loader.pipelines_built == 1
    assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(got, want))


def test_a_skipped_file_costs_one_rebuild_for_the_whole_run(tmp_path):
    """DALI cannot go on after a failed batch: the pipeline is rebuilt once when the unreadable file
    is met, and never again in later epochs (the file is replaced before DALI sees it)."""
    rng = np.random.default_rng(0)
    for i in range(9):
        write_image(tmp_path / "a" / f"{i}.jpg", rng.integers(0, 256, (20, 20, 3), dtype=np.uint8))
    (tmp_path / "a" / "3.jpg").write_bytes(b"")
    loader = ImageLoader(root=tmp_path, batch_size=3, size=16, device="cpu", seed=2, num_threads=1, on_error="skip")
    with pytest.warns(Warning, match="skipping"):
        for _ in range(3):
            assert sum(len(x) for x, _ in loader) == 9
    assert loader.pipelines_built == 2 and loader.skip_count == 3


def test_cpu_kernel_threads_are_the_cores_dali_leaves_free(monkeypatch):
    """The CPU kernel runs on the loop's thread plus the cores DALI's threads leave free, never more
    than torch's thread count: with DALI on every core one thread (no hand-offs), else more."""
    import dalimix.loader.core as core

    monkeypatch.setattr(core, "default_num_threads", lambda: 8)
    monkeypatch.setattr(torch, "get_num_threads", lambda: 6)
    assert [core._kernel_threads(t) for t in (8, 16, 7, 4, 1)] == [1, 1, 2, 5, 6]
