"""WebDataset tar shards: packing, indexing, and reading them in dalimix's exact order."""

from __future__ import annotations

import io
import os
import tarfile

import numpy as np
import pytest
import torch

from dalimix import DatasetError, DecodeError, ImageLoader
from dalimix.cli import main as cli_main
from dalimix.mix import Mixup
from dalimix.sources import scan_image_folder
from dalimix.webdataset import index_webdataset, pack_image_folder, split_member_name


@pytest.fixture(scope="module")
def shards(small_dataset, tmp_path_factory):
    out = tmp_path_factory.mktemp("shards")
    tars = pack_image_folder(small_dataset, out, shard_size=6)
    assert [t.name for t in tars] == [f"shard-{i:06d}.tar" for i in range(4)]  # 20 samples: 6 + 6 + 6 + 2
    return out


def test_pack_keeps_bytes_labels_and_classes(small_dataset, shards):
    folder = scan_image_folder(small_dataset)
    wds = index_webdataset(shards)
    assert len(wds) == len(folder) == 20
    assert wds.classes == folder.classes
    np.testing.assert_array_equal(wds.labels, folder.labels)
    for i in range(len(folder)):
        assert wds.read(i).tobytes() == open(folder.paths[i], "rb").read()
    with tarfile.open(shards / "shard-000001.tar") as tf:
        names = tf.getnames()
    assert names[:4] == ["00000006.jpg", "00000006.cls", "00000007.jpg", "00000007.cls"]


def test_packing_is_reproducible_and_shuffle_seed_reorders(small_dataset, shards, tmp_path):
    again = pack_image_folder(small_dataset, tmp_path / "a", shard_size=6)
    for t in again:
        assert t.read_bytes() == (shards / t.name).read_bytes()
        assert t.with_suffix(".idx").read_text() == (shards / t.name).with_suffix(".idx").read_text()
    pack_image_folder(small_dataset, tmp_path / "s", shard_size=6, shuffle_seed=1)
    shuffled = index_webdataset(tmp_path / "s")
    assert sorted(shuffled.labels.tolist()) == sorted(index_webdataset(shards).labels.tolist())
    assert shuffled.labels.tolist() != index_webdataset(shards).labels.tolist()


def test_index_from_tar_headers_equals_index_from_idx_files(shards, tmp_path):
    bare = tmp_path / "bare"
    bare.mkdir()
    for t in shards.glob("*.tar"):
        (bare / t.name).write_bytes(t.read_bytes())
    (bare / "classes.txt").write_text((shards / "classes.txt").read_text())
    a, b = index_webdataset(shards), index_webdataset(bare)
    assert a.fingerprint == b.fingerprint
    for name in ("tar_index", "offsets", "sizes", "labels"):
        np.testing.assert_array_equal(getattr(a, name), getattr(b, name))


def test_dali_webdataset_reader_reads_the_packed_shards(shards, small_dataset):
    """The .idx files follow DALI's format: fn.readers.webdataset reads the shards as they are."""
    from nvidia.dali import fn, pipeline_def

    tars = sorted(str(t) for t in shards.glob("*.tar"))

    @pipeline_def(batch_size=20, num_threads=1, device_id=None)
    def pipe():
        images, labels = fn.readers.webdataset(
            paths=tars, index_paths=[t[:-4] + ".idx" for t in tars], ext=["jpg", "cls"]
        )
        return images, labels

    p = pipe()
    p.build()
    images, labels = p.run()
    folder = scan_image_folder(small_dataset)
    for i in range(20):
        assert np.asarray(images[i]).tobytes() == open(folder.paths[i], "rb").read()
        assert int(np.asarray(labels[i]).tobytes().decode()) == folder.labels[i]


@pytest.mark.parametrize("policy", ["partial", "drop", "fill"])
@pytest.mark.parametrize("shard_id, num_shards", [(0, 1), (1, 3)])
def test_shards_give_the_folder_loaders_batches_bit_for_bit(small_dataset, shards, policy, shard_id, num_shards):
    """Same seed, same order, shards, crops, flips, mixing: packing a folder changes nothing."""
    kw = dict(
        batch_size=3,
        size=24,
        device="cpu",
        seed=5,
        num_threads=1,
        last_batch_policy=policy,
        shard_id=shard_id,
        num_shards=num_shards,
    )
    for epoch in range(2):
        folder = ImageLoader(root=small_dataset, mix=Mixup(cutmix_alpha=1.0), **kw)
        wds = ImageLoader(webdataset=shards, mix=Mixup(cutmix_alpha=1.0), **kw)
        folder.set_epoch(epoch)
        wds.set_epoch(epoch)
        n = 0
        for (x, y), (u, v) in zip(folder, wds):
            np.testing.assert_array_equal(folder.last_batch.sample_ids, wds.last_batch.sample_ids)
            assert torch.equal(x, u) and torch.equal(y, v)
            n += 1
        assert n == len(folder) == len(wds)
        folder.close()
        wds.close()


def test_eval_over_shards(small_dataset, shards):
    folder = ImageLoader(root=small_dataset, batch_size=8, size=24, device="cpu", train=False)
    wds = ImageLoader(webdataset=str(shards / "shard-*.tar"), batch_size=8, size=24, device="cpu", train=False)
    assert repr(wds).startswith("ImageLoader(")
    for (x, y), (u, v) in zip(folder, wds):
        assert torch.equal(x, u) and torch.equal(y, v)


def _tar(path, members):
    with tarfile.open(path, "w") as tf:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    return path


def _jpeg(seed=0):
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(seed).integers(0, 255, (20, 28, 3), dtype=np.uint8)).save(buf, "JPEG")
    return buf.getvalue()


def test_configurable_keys_and_class_names(tmp_path):
    """Other extensions (DALI's ';' alternatives), sub-folder keys, names with dots after the key."""
    tar = _tar(
        tmp_path / "a.tar",
        [
            ("train/x1.input.png", _jpeg(1)),
            ("train/x1.label", b"1"),
            ("train/x1.meta.json", b"{}"),
            ("train/x2.input.jpeg", _jpeg(2)),
            ("train/x2.label", b" 0\n"),
            ("._hidden.label", b"9"),
        ],
    )
    with pytest.raises(DatasetError, match="no image member"):
        index_webdataset(tar)
    s = index_webdataset(tar, keys=("input.png;input.jpeg", "label"), classes=["neg", "pos"])
    assert s.labels.tolist() == [1, 0] and s.classes == ["neg", "pos"]
    assert s.paths[0].endswith("a.tar::train/x1.input.png")
    loader = ImageLoader(
        webdataset=[tar],
        webdataset_keys=("input.png;input.jpeg", "label"),
        batch_size=2,
        size=16,
        device="cpu",
        train=False,
        classes=["neg", "pos"],
    )
    _, labels = next(iter(loader))
    assert labels.tolist() == [1, 0]
    assert split_member_name("d/k.a.b") == ("d/k", "a.b")
    assert split_member_name("d/.k.a") is None and split_member_name("noext") is None


@pytest.mark.parametrize(
    "members, message",
    [
        ([("k.jpg", b"x")], "no .cls member"),
        ([("k.jpg", b"x"), ("k.cls", b"cat")], "not an integer"),
        ([("k.jpg", b"x"), ("k.cls", b"-1")], "negative"),
        ([("k.jpg", b"x"), ("k.cls", b"3")], "names only 2 classes"),
    ],
)
def test_bad_shards_name_the_tar_and_sample(tmp_path, members, message):
    tar = _tar(tmp_path / "bad.tar", members)
    with pytest.raises(DatasetError, match=message):
        index_webdataset(tar, classes=["a", "b"])


def test_bad_shard_sets(tmp_path):
    with pytest.raises(DatasetError, match="holds no .tar shards"):
        index_webdataset(tmp_path)
    with pytest.raises(DatasetError, match="matches no files"):
        index_webdataset(str(tmp_path / "*.tar"))
    with pytest.raises(DatasetError, match="not found"):
        index_webdataset([tmp_path / "missing.tar"])
    gz = tmp_path / "z.tar"
    with tarfile.open(gz, "w:gz") as tf:
        info = tarfile.TarInfo("k.cls")
        info.size = 1
        tf.addfile(info, io.BytesIO(b"1"))
    with pytest.raises(DatasetError, match="not an uncompressed tar"):
        index_webdataset(gz)
    with pytest.raises(ValueError, match="webdataset_keys"):
        index_webdataset(gz, keys=("jpg",))
    with pytest.raises(ValueError, match="root and webdataset given"):
        ImageLoader(root=tmp_path, webdataset=gz, batch_size=2)


def test_stale_index_file_is_refused(shards, tmp_path):
    tar = tmp_path / "s.tar"
    data = (shards / "shard-000000.tar").read_bytes()
    tar.write_bytes(data[: len(data) // 2])
    (tmp_path / "s.idx").write_text((shards / "shard-000000.idx").read_text())
    with pytest.raises(DatasetError, match="changed since it was indexed"):
        index_webdataset(tar)


def test_a_sample_that_does_not_decode_is_named(tmp_path):
    tar = _tar(tmp_path / "c.tar", [("a.jpg", _jpeg(1)), ("a.cls", b"0"), ("b.jpg", _jpeg(2)[:60]), ("b.cls", b"1")])
    loader = ImageLoader(webdataset=tar, batch_size=2, size=16, device="cpu", train=False)
    with pytest.raises(DecodeError, match=r"c\.tar::b\.jpg"):
        next(iter(loader))


def test_pack_command(small_dataset, tmp_path, capsys):
    assert cli_main(["pack", str(small_dataset), str(tmp_path / "out"), "--shard-size", "8", "--prefix", "train"]) == 0
    assert "3 shard(s)" in capsys.readouterr().out
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [
        "classes.txt",
        "train-000000.idx",
        "train-000000.tar",
        "train-000001.idx",
        "train-000001.tar",
        "train-000002.idx",
        "train-000002.tar",
    ]
    assert cli_main(["pack", str(small_dataset), str(tmp_path / "out")]) == 2
    assert "already holds 3 shard(s)" in capsys.readouterr().err
    assert cli_main(["pack", str(small_dataset), str(tmp_path / "out"), "--overwrite"]) == 2
    assert "other than shard-*.tar" in capsys.readouterr().err
    assert (
        cli_main(
            [
                "pack",
                str(small_dataset),
                str(tmp_path / "out"),
                "--shard-size",
                "10",
                "--prefix",
                "train",
                "--overwrite",
            ]
        )
        == 0
    )
    assert len(list((tmp_path / "out").glob("*.tar"))) == 2
    assert cli_main(["pack", str(small_dataset), str(tmp_path / "x"), "--shard-size", "0"]) == 2
    assert not os.path.exists(tmp_path / "x" / "shard-000000.tar")
