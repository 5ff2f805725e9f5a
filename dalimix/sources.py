"""Where samples come from: an ImageFolder tree, a ``path label`` file list or WebDataset shards.

Each gives a :class:`Samples`: absolute paths, integer labels, and the class names. Classes of an
ImageFolder tree are its sub-folders sorted by name and numbered from 0, as torchvision does.
``resolve_source`` is the one place that turns ``root`` / ``file_list`` / ``webdataset`` /
``samples`` arguments into a ``Samples`` (the loader, ``create_loader``, the CLI and ``scan`` use it).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .errors import DatasetError

# The extensions torchvision's ImageFolder accepts (its IMG_EXTENSIONS), compared case-insensitively.
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")


@dataclass(frozen=True)
class Samples:
    """The samples of a data set: ``paths[i]`` has class ``labels[i]`` (an index into ``classes``)."""

    paths: list[str]
    labels: np.ndarray
    classes: list[str]
    class_to_idx: dict[str, int]
    source: str
    fingerprint: str = field(default="", compare=False)

    def __len__(self) -> int:
        return len(self.paths)

    def read_bytes(self, index: int) -> bytes:
        """The encoded bytes of sample ``index``."""
        with open(self.paths[index], "rb") as f:
            return f.read()

    def read_batch(self, ids, *, buffer: ReadBuffer | None = None) -> list[np.ndarray]:
        """The encoded bytes of samples ``ids`` (uint8 1-D arrays), what the loader feeds DALI.

        ``buffer``: a ``ReadBuffer`` the bytes are read into (views of it are returned), so a batch
        reuses memory already mapped instead of fresh pages per file."""
        if buffer is None:
            return [np.fromfile(self.paths[int(i)], dtype=np.uint8) for i in ids]
        out = []
        for i in ids:
            path = self.paths[int(i)]
            fd = os.open(path, os.O_RDONLY)
            try:
                size = os.fstat(fd).st_size
                data = buffer.read(fd, size + 1, 0, expect=size)  # one byte more: a file grown since fstat is seen
            finally:
                os.close(fd)
            out.append(data if len(data) <= size else np.fromfile(path, dtype=np.uint8))
        return out


class ReadBuffer:
    """Reused memory that one batch's encoded bytes are read into (``Samples.read_batch(buffer=)``).

    A fresh array per file costs page faults (and the heap's growth) every batch; reading into
    pages already touched does not. ``clear()`` makes the memory reusable: call it only once
    nothing reads the views handed out since the last ``clear()`` (the loader does so after DALI
    has released the batch). Views taken before the buffer grew keep its old memory alive.
    """

    def __init__(self) -> None:
        self._memory: np.ndarray = np.empty(0, dtype=np.uint8)
        self._used = 0

    def clear(self) -> None:
        self._used = 0

    def take(self, nbytes: int) -> np.ndarray:
        """``nbytes`` of the buffer nobody else uses until the next ``clear()`` (contents undefined)."""
        start = -(-self._used // 64) * 64  # each sample's bytes start on a cache line
        if start + nbytes > len(self._memory):
            self._memory = np.empty(max(2 * len(self._memory), nbytes, 1 << 20), dtype=np.uint8)
            start = 0
        self._used = start + nbytes
        return self._memory[start : start + nbytes]

    def read(self, fd: int, nbytes: int, offset: int, *, expect: int | None = None) -> np.ndarray:
        """Up to ``nbytes`` of file ``fd`` from ``offset`` (fewer at its end), read into the buffer;
        once ``expect`` bytes (default ``nbytes``) have come, a short read is taken as the end."""
        view = self.take(nbytes)
        expect = nbytes if expect is None else expect
        got = 0
        while got < expect:
            k = os.preadv(fd, [view[got:].data], offset + got)
            if k <= 0:
                break
            got += k
        self._used -= nbytes - got
        return view[:got]


def source_for_path(path, *, webdataset_keys=None) -> dict:
    """``resolve_source``'s arguments for one path: ``.tar`` shards (a ``.tar`` file, a glob, a
    folder of only ``.tar`` files) -> ``webdataset``, another file -> ``file_list``, else ``root``."""
    text = os.fspath(path)
    p = Path(text).expanduser()
    if (
        (p.is_file() and p.suffix.lower() == ".tar")
        or any(c in text for c in "*?[")
        or (p.is_dir() and any(p.glob("*.tar")) and not any(q.is_dir() for q in p.iterdir()))
    ):
        return {"webdataset": text, "webdataset_keys": webdataset_keys}
    if p.is_file():
        return {"file_list": p}
    return {"root": p}


def resolve_source(
    *, root=None, file_list=None, webdataset=None, webdataset_keys=None, samples=None, classes=None
) -> Samples:
    """The ``Samples`` named by exactly one of ``root`` (ImageFolder tree), ``file_list`` (``path
    label`` lines; relative paths from ``root`` when both are given), ``webdataset`` (tar shards) or
    ``samples`` (a ``Samples`` built elsewhere).

    Raises:
        ValueError: no data, or the data named twice.
        DatasetError: the data itself is wrong (see the readers).
    """
    given = [
        n
        for n, v in (("root", root), ("file_list", file_list), ("webdataset", webdataset), ("samples", samples))
        if v is not None
    ]
    if not given:
        raise ValueError(
            "give the data: root=<ImageFolder folder>, file_list=<'path label' text file> "
            "or webdataset=<folder or glob of .tar shards>"
        )
    if len(given) > 1 and given != ["root", "file_list"]:
        raise ValueError(f"{' and '.join(given)} given: name the data once (root= goes with file_list= only)")
    if samples is not None:
        if not isinstance(samples, Samples):
            raise ValueError(f"samples={type(samples).__name__}: a dalimix.sources.Samples (or pass root=/file_list=)")
        return samples
    if webdataset is not None:
        from .webdataset import index_webdataset

        return index_webdataset(webdataset, keys=webdataset_keys, classes=classes)
    if file_list is not None:
        return read_file_list(file_list, root=root, classes=classes)
    return scan_image_folder(root)


def _fingerprint(paths: list[str], labels: np.ndarray) -> str:
    import hashlib

    h = hashlib.sha256()
    for p, l in zip(paths, labels.tolist()):
        h.update(p.encode("utf-8", "surrogateescape"))
        h.update(b"\0%d\n" % l)
    return h.hexdigest()[:16]


def is_image_file(name: str) -> bool:
    return name.lower().endswith(IMAGE_EXTENSIONS)


def scan_image_folder(root: str | os.PathLike) -> Samples:
    """List ``root/<class>/**/<image>`` like torchvision's ImageFolder (classes sorted, files sorted).

    Raises:
        DatasetError: ``root`` is missing, is not a folder, has no class folders, or a class
            folder holds no image files.
    """
    root = Path(root).expanduser()
    if not root.exists():
        raise DatasetError(f"data root {root} does not exist; pass the folder that holds one sub-folder per class")
    if not root.is_dir():
        raise DatasetError(
            f"data root {root} is not a folder; pass a folder with one sub-folder per class, or use file_list="
        )
    classes = sorted(e.name for e in os.scandir(root) if e.is_dir() and not e.name.startswith("."))
    if not classes:
        raise DatasetError(
            f"data root {root} has no class folders; lay it out as {root}/<class>/<image> (ImageFolder), "
            "or pass file_list= with 'path label' lines"
        )
    paths: list[str] = []
    labels: list[int] = []
    for idx, cls in enumerate(classes):
        found = []
        for dirpath, dirnames, filenames in os.walk(root / cls, followlinks=True):
            dirnames.sort()
            found += [os.path.join(dirpath, f) for f in sorted(filenames) if is_image_file(f)]
        if not found:
            raise DatasetError(
                f"class folder {root / cls} holds no image files (looked for {', '.join(IMAGE_EXTENSIONS)}); "
                "add images or remove the folder"
            )
        paths += found
        labels += [idx] * len(found)
    labels_arr = np.asarray(labels, dtype=np.int64)
    return Samples(
        paths=paths,
        labels=labels_arr,
        classes=classes,
        class_to_idx={c: i for i, c in enumerate(classes)},
        source=str(root),
        fingerprint=_fingerprint([os.path.relpath(p, root) for p in paths], labels_arr),
    )


def read_file_list(file_list: str | os.PathLike, root: str | os.PathLike | None = None, classes=None) -> Samples:
    """Read ``path label`` lines (label an integer, whitespace between, ``#`` comments and blank lines skipped).

    Relative paths are taken relative to ``root`` if given, else to the list file's folder. Paths
    may contain spaces (the label is the last field). A ``# classes: ["a", "b", ...]`` line (JSON,
    as ``dalimix scan --fix-list`` writes it) names the classes unless ``classes`` is given.

    Raises:
        DatasetError: the list is missing or empty, a line is malformed, or a named file is missing.
    """
    file_list = Path(file_list).expanduser()
    if not file_list.is_file():
        raise DatasetError(f"file list {file_list} does not exist; pass a text file of 'path label' lines")
    base = Path(root).expanduser() if root is not None else file_list.parent
    paths: list[str] = []
    labels: list[int] = []
    missing: list[str] = []
    with open(file_list, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            line = line.strip()
            if line.startswith("# classes:") and classes is None:
                try:
                    classes = [str(c) for c in json.loads(line[len("# classes:") :])]
                except ValueError:
                    raise DatasetError(f"{file_list}:{lineno}: the classes line is not a JSON list of names") from None
                continue
            if not line or line.startswith("#"):
                continue
            parts = line.rsplit(None, 1)
            if len(parts) != 2:
                raise DatasetError(f"{file_list}:{lineno}: expected 'path label', got {line!r}")
            try:
                label = int(parts[1])
            except ValueError:
                raise DatasetError(f"{file_list}:{lineno}: label {parts[1]!r} is not an integer") from None
            if label < 0:
                raise DatasetError(f"{file_list}:{lineno}: label {label} is negative; labels are class indices 0..C-1")
            p = Path(parts[0]).expanduser()
            p = p if p.is_absolute() else base / p
            if not p.exists():  # other kinds than regular files are refused by the loader, by name
                missing.append(f"{file_list}:{lineno}: {p}")
            paths.append(str(p))
            labels.append(label)
    if missing:
        more = f" (and {len(missing) - 5} more)" if len(missing) > 5 else ""
        raise DatasetError(
            f"file list {file_list} names {len(missing)} missing file(s): "
            + "; ".join(missing[:5])
            + more
            + ". Fix the paths (relative paths are taken from "
            + str(base)
            + ") or remove those lines"
        )
    if not paths:
        raise DatasetError(f"file list {file_list} names no files; add 'path label' lines")
    labels_arr = np.asarray(labels, dtype=np.int64)
    n_classes = int(labels_arr.max()) + 1
    if classes is None:
        classes = [str(i) for i in range(n_classes)]
    else:
        classes = list(classes)
        if len(classes) < n_classes:
            raise DatasetError(
                f"file list {file_list} uses label {n_classes - 1} but only {len(classes)} class names were given"
            )
    return Samples(
        paths=paths,
        labels=labels_arr,
        classes=classes,
        class_to_idx={c: i for i, c in enumerate(classes)},
        source=str(file_list),
        # relative to the list's base: a data set moved together with its list keeps its fingerprint
        fingerprint=_fingerprint([os.path.relpath(p, base) for p in paths], labels_arr),
    )
