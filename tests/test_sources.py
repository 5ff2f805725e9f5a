"""Data sources: ImageFolder scanning (torchvision's order) and file lists, with clear errors."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import write_image

from dalimix.errors import DatasetError
from dalimix.sources import read_file_list, scan_image_folder


def make_tree(root, layout):
    arr = np.full((8, 8, 3), 128, np.uint8)
    for rel in layout:
        p = root / rel
        if rel.endswith("/"):
            p.mkdir(parents=True, exist_ok=True)
        elif rel.endswith((".txt", ".json")):
            p.parent.mkdir(parents=True, exist_ok=True)
            p.write_text("not an image")
        else:
            write_image(p, arr)
    return root


def test_image_folder_matches_torchvision(tmp_path):
    from torchvision.datasets import ImageFolder

    make_tree(tmp_path, ["b/2.jpg", "b/10.PNG", "a/z.jpg", "a/sub/y.jpeg", "C/x.bmp", "a/notes.txt", "d/e.webp"])
    ours = scan_image_folder(tmp_path)
    theirs = ImageFolder(str(tmp_path))
    assert ours.classes == theirs.classes
    assert ours.class_to_idx == theirs.class_to_idx
    assert list(zip(ours.paths, ours.labels.tolist())) == [(p, l) for p, l in theirs.samples]


@pytest.mark.parametrize(
    "layout, message",
    [
        (None, "does not exist"),
        ([], "has no class folders"),
        (["a/x.jpg", "b/notes.txt"], "holds no image files"),
        (["a/x.jpg", "empty/"], "holds no image files"),
    ],
)
def test_image_folder_errors_name_the_folder(tmp_path, layout, message):
    root = tmp_path / "data"
    if layout is not None:
        root.mkdir()
        make_tree(root, layout)
    with pytest.raises(DatasetError, match=message) as e:
        scan_image_folder(root)
    assert str(root) in str(e.value)


def test_root_that_is_a_file(tmp_path):
    f = tmp_path / "x.jpg"
    f.write_bytes(b"1")
    with pytest.raises(DatasetError, match="is not a folder"):
        scan_image_folder(f)


def test_file_list_paths_labels_comments_and_spaces(tmp_path):
    make_tree(tmp_path, ["imgs/a b.jpg", "imgs/c.jpg"])
    lst = tmp_path / "list.txt"
    lst.write_text(f"# a comment\nimgs/a b.jpg 2\n\n{tmp_path}/imgs/c.jpg 0\n")
    s = read_file_list(lst)
    assert s.paths == [str(tmp_path / "imgs/a b.jpg"), str(tmp_path / "imgs/c.jpg")]
    assert s.labels.tolist() == [2, 0]
    assert s.classes == ["0", "1", "2"]
    named = read_file_list(lst, classes=["cat", "dog", "fox"])
    assert named.class_to_idx == {"cat": 0, "dog": 1, "fox": 2}
    # relative paths from root= when given
    lst2 = tmp_path / "elsewhere" / "l.txt"
    lst2.parent.mkdir()
    lst2.write_text("c.jpg 1\n")
    assert read_file_list(lst2, root=tmp_path / "imgs").paths == [str(tmp_path / "imgs/c.jpg")]


@pytest.mark.parametrize(
    "content, message",
    [
        ("missing.jpg 0\n", "names 1 missing file"),
        ("ok.jpg\n", "expected 'path label'"),
        ("ok.jpg cat\n", "is not an integer"),
        ("ok.jpg -1\n", "is negative"),
        ("# nothing\n", "names no files"),
    ],
)
def test_file_list_errors(tmp_path, content, message):
    make_tree(tmp_path, ["ok.jpg"])
    lst = tmp_path / "list.txt"
    lst.write_text(content)
    with pytest.raises(DatasetError, match=message) as e:
        read_file_list(lst)
    assert str(lst) in str(e.value)


def test_missing_file_list(tmp_path):
    with pytest.raises(DatasetError, match="does not exist"):
        read_file_list(tmp_path / "nope.txt")


def test_fingerprint_tracks_content(tmp_path):
    make_tree(tmp_path, ["a/1.jpg", "b/1.jpg"])
    f1 = scan_image_folder(tmp_path).fingerprint
    make_tree(tmp_path, ["b/2.jpg"])
    assert scan_image_folder(tmp_path).fingerprint != f1


def test_file_list_fingerprint_survives_moving_the_data(tmp_path):
    import shutil

    make_tree(tmp_path / "a", ["imgs/x.jpg", "imgs/y.jpg"])
    (tmp_path / "a" / "list.txt").write_text("imgs/x.jpg 0\nimgs/y.jpg 1\n")
    before = read_file_list(tmp_path / "a" / "list.txt").fingerprint
    shutil.move(tmp_path / "a", tmp_path / "b")
    assert read_file_list(tmp_path / "b" / "list.txt").fingerprint == before


def test_read_batch_into_a_reused_buffer(tmp_path):
    """Bytes read into a ReadBuffer equal a plain read, survive the buffer growing, follow a file that
    changed size since the last batch, and a missing file still raises OSError."""
    from dalimix.sources import ReadBuffer

    rng = np.random.default_rng(0)
    for i, n in enumerate([0, 1, 5000, 3 << 20]):  # the last one outgrows the first allocation
        (tmp_path / f"f{i}.bin").write_bytes(rng.integers(0, 256, n, dtype=np.uint8).tobytes())
    samples = read_file_list_of(tmp_path, 4)
    buffer = ReadBuffer()
    got = samples.read_batch([3, 2, 1, 0, 2], buffer=buffer)
    want = samples.read_batch([3, 2, 1, 0, 2])
    assert [len(g) for g in got] == [3 << 20, 5000, 1, 0, 5000]
    assert all(np.array_equal(g, w) for g, w in zip(got, want))
    buffer.clear()
    (tmp_path / "f1.bin").write_bytes(b"grown" * 1000)
    again = samples.read_batch([1, 2], buffer=buffer)
    assert again[0].tobytes() == b"grown" * 1000 and np.array_equal(again[1], want[1])
    (tmp_path / "f0.bin").unlink()
    with pytest.raises(OSError):
        samples.read_batch([0], buffer=buffer)


def read_file_list_of(folder, n):
    lst = folder / "list.txt"
    lst.write_text("".join(f"f{i}.bin 0\n" for i in range(n)))
    return read_file_list(lst)
