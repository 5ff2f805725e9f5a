"""WebDataset tar shards as a data source, read in dalimix's exact per-epoch order.

A WebDataset shard is a plain (uncompressed) tar whose members are grouped into samples by key:
``000123.jpg`` and ``000123.cls`` are the image and the label of sample ``000123`` (key = member path
up to the first dot of its file name, extension = the rest). ``dalimix pack`` writes such shards.

Why dalimix does not stream the tars with ``fn.readers.webdataset``: that reader walks the archives
in sequence and shuffles within a buffer of ``initial_fill`` samples, and shards by contiguous runs
of samples, so it cannot read the one global permutation per epoch that ``plan_epoch`` draws and
that the image-folder and file-list sources follow (same order on every rank, strided shards,
DROP/PARTIAL/FILL, exact resume). Instead the tars are indexed once, at construction, into samples
``(tar, byte offset, size, label)`` — tar members are stored uncompressed and contiguous, so each
image is one ``pread`` — and the loader feeds their bytes to its one DALI pipeline in the planned
order, exactly as it feeds image files (``Samples.read_batch``). The shards ``dalimix pack`` writes also carry DALI's ``.idx`` index files, so
``fn.readers.webdataset`` reads them too, and indexing reads those instead of walking the tar.
"""

from __future__ import annotations

import glob
import io
import os
import tarfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .errors import DatasetError
from .sources import IMAGE_EXTENSIONS, ReadBuffer, Samples, _fingerprint, scan_image_folder

# every extension torchvision's ImageFolder (and dalimix's scan) accepts, and the class index
DEFAULT_KEYS = (";".join(e.lstrip(".") for e in IMAGE_EXTENSIONS), "cls")
CLASSES_FILE = "classes.txt"
_IDX_VERSION = "v1.2"


@dataclass(frozen=True)
class TarSamples(Samples):
    """Samples stored in tar shards: sample ``i``'s encoded image is ``sizes[i]`` bytes at
    ``offsets[i]`` of ``tars[tar_index[i]]``; ``paths[i]`` is ``"<tar>::<member>"`` for messages."""

    tars: tuple = ()
    tar_index: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64), compare=False)
    offsets: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64), compare=False)
    sizes: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64), compare=False)

    def read(self, index: int) -> np.ndarray:
        """The encoded bytes of sample ``index`` (uint8, 1-D)."""
        return self.read_batch([index])[0]

    def read_bytes(self, index: int) -> bytes:
        return self.read(index).tobytes()

    def read_batch(self, ids, *, buffer: ReadBuffer | None = None) -> list[np.ndarray]:
        """The encoded bytes of samples ``ids``: one ``pread`` each, one open per tar (what the loader
        feeds DALI, the same feed as for image files); ``buffer`` as in ``Samples.read_batch``."""
        ids = np.asarray(ids, dtype=np.int64)
        images: list = [None] * len(ids)
        tar_of = self.tar_index[ids]
        for t in np.unique(tar_of):
            path = self.tars[t]
            fd = os.open(path, os.O_RDONLY)
            try:
                for k in np.flatnonzero(tar_of == t):
                    i = int(ids[k])
                    size = int(self.sizes[i])
                    if buffer is None:
                        buf: np.ndarray = np.empty(size, dtype=np.uint8)
                        got = os.preadv(fd, [buf.data], int(self.offsets[i])) if size else 0
                    else:
                        buf = buffer.read(fd, size, int(self.offsets[i]))
                        got = len(buf)
                    if got != size:
                        raise DatasetError(
                            f"{self.paths[i]}: read {got} of {size} bytes; the tar {path} is shorter "
                            "than when it was indexed (truncated or rewritten); index it again"
                        )
                    images[k] = buf
            finally:
                os.close(fd)
        return images


# ----------------------------------------------------------------------------------- indexing
def shard_paths(shards) -> list[str]:
    """The tar files named by ``shards``: a folder (its ``*.tar``, sorted), a glob, one path, or a list."""
    if isinstance(shards, (str, os.PathLike)):
        text = os.fspath(shards)
        path = Path(text).expanduser()
        if path.is_dir():
            found = sorted(str(p) for p in path.glob("*.tar"))
            if not found:
                raise DatasetError(
                    f"webdataset folder {path} holds no .tar shards; pack an image folder with "
                    "`dalimix pack DIR OUT` or point at the shards"
                )
            return found
        if any(c in text for c in "*?["):
            found = sorted(glob.glob(os.path.expanduser(text)))
            if not found:
                raise DatasetError(f"webdataset glob {text!r} matches no files")
            return found
        items = [text]
    else:
        try:
            items = [os.fspath(p) for p in shards]
        except TypeError:
            raise ValueError(f"webdataset={shards!r}: a folder, a glob, a .tar path or a list of them") from None
        if not items:
            raise ValueError("webdataset=[]: name at least one .tar shard")
    missing = [p for p in items if not Path(p).expanduser().is_file()]
    if missing:
        raise DatasetError(
            f"webdataset shard(s) not found: {', '.join(missing[:5])}"
            f"{' ...' if len(missing) > 5 else ''}; check the paths"
        )
    return [str(Path(p).expanduser()) for p in items]


def _parse_keys(keys) -> tuple[tuple[str, ...], str]:
    try:
        image_key, label_key = keys
    except (TypeError, ValueError):
        raise ValueError(
            f"webdataset_keys={keys!r}: (image extensions, label extension), e.g. ('jpg;png', 'cls')"
        ) from None
    image_exts = tuple(e.strip().lstrip(".") for e in str(image_key).split(";") if e.strip())
    label_ext = str(label_key).strip().lstrip(".")
    if not image_exts or not label_ext or label_ext in image_exts:
        raise ValueError(
            f"webdataset_keys={keys!r}: non-empty image extensions (';'-separated) and a different "
            "label extension, e.g. ('jpg;png', 'cls')"
        )
    return image_exts, label_ext


def split_member_name(name: str) -> tuple[str, str] | None:
    """WebDataset's rule: key = path up to the first dot of the file name, extension = the rest.
    None for names that belong to no sample (hidden files, no extension)."""
    slash = name.rfind("/") + 1
    if name[slash:].startswith("."):
        return None
    dot = name.find(".", slash)
    if dot <= slash:
        return None
    return name[:dot], name[dot + 1 :]


def _members_from_tar(path: str):
    """(name, data offset, size) of each regular file in the tar, in archive order."""
    try:
        with tarfile.open(path, "r:") as tf:
            for m in tf:
                if m.isreg():
                    yield m.name, m.offset_data, m.size
    except tarfile.ReadError as e:
        raise DatasetError(
            f"webdataset shard {path} is not an uncompressed tar ({e}); shards must be plain .tar "
            "files (members are read in place)"
        ) from None


def _members_from_index(path: str, index: Path) -> list | None:
    """The same from DALI's ``.idx`` index file (``wds2idx`` / ``dalimix pack``), checked against the
    tar's size; None when the file is not in the v1.2 format (names with spaces, older versions)."""
    size = os.path.getsize(path)
    members = []
    with open(index, encoding="utf-8") as f:
        head = f.readline().split()
        if len(head) != 2 or head[0] != _IDX_VERSION:
            return None
        for line in f:
            parts = line.split()
            if len(parts) % 4:
                return None
            for j in range(0, len(parts), 4):
                _, off_text, n_text, name = parts[j : j + 4]
                off, n = int(off_text), int(n_text)
                if off < 0 or n < 0 or off + n > size:
                    raise DatasetError(
                        f"index {index} names bytes past the end of {path}; the tar changed since "
                        "it was indexed: delete the .idx file or pack again"
                    )
                members.append((name, off, n))
    return members


def _index_path(tar: str) -> Path:
    return Path(tar).with_suffix(".idx")


def _read_label(fd: int, offset: int, size: int, where: str) -> int:
    text = os.pread(fd, size, offset).decode("utf-8", "replace").strip()
    try:
        label = int(text)
    except ValueError:
        raise DatasetError(f"{where}: label {text[:40]!r} is not an integer class index") from None
    if label < 0:
        raise DatasetError(f"{where}: label {label} is negative; labels are class indices 0..C-1")
    return label


def index_webdataset(shards, *, keys=DEFAULT_KEYS, classes=None) -> TarSamples:
    """Index WebDataset tar shards into samples (in shard order, then archive order).

    Args:
        shards: a folder (its ``*.tar``), a glob, a ``.tar`` path, or a list of paths.
        keys: (image extensions, label extension): DALI's ``ext`` syntax, alternatives separated by
            ``;`` (default ``("jpg;jpeg;png", "cls")``); the label member holds the class index as text.
        classes: class names (default: ``classes.txt`` beside the first shard, one name a line, else
            ``"0"``, ``"1"``, ...).

    Raises:
        DatasetError: no shards, a compressed or unreadable tar, a sample without an image or
            label member, a label that is not an integer.
    """
    tars = shard_paths(shards)
    image_exts, label_ext = _parse_keys(DEFAULT_KEYS if keys is None else keys)
    paths, rel, labels, tar_index, offsets, sizes = [], [], [], [], [], []
    for t, tar in enumerate(tars):
        idx = _index_path(tar)
        members = _members_from_index(tar, idx) if idx.is_file() else None
        samples: dict[str, dict[str, tuple[int, int, str]]] = {}
        for name, off, n in members if members is not None else _members_from_tar(tar):
            split = split_member_name(name)
            if split is not None:
                samples.setdefault(split[0], {})[split[1]] = (off, n, name)
        fd = os.open(tar, os.O_RDONLY)
        try:
            for key, parts in samples.items():
                image = next((parts[e] for e in image_exts if e in parts), None)
                if image is None or label_ext not in parts:
                    what = (
                        f"no image member ({'/'.join('.' + e for e in image_exts)})"
                        if image is None
                        else f"no .{label_ext} member"
                    )
                    raise DatasetError(
                        f"{tar}: sample {key!r} has {what}; it has {sorted(parts)}. Pass "
                        f"webdataset_keys=(image extensions, label extension) that match the shards"
                    )
                off, n, member = parts[label_ext]
                labels.append(_read_label(fd, off, n, f"{tar}::{member}"))
                off, n, member = image
                paths.append(f"{tar}::{member}")
                rel.append(f"{os.path.basename(tar)}::{member}")
                tar_index.append(t)
                offsets.append(off)
                sizes.append(n)
        finally:
            os.close(fd)
    if not paths:
        raise DatasetError(f"webdataset shards {tars[:3]}{' ...' if len(tars) > 3 else ''} hold no samples")
    labels_arr = np.asarray(labels, dtype=np.int64)
    classes = _classes(tars[0], classes, int(labels_arr.max()) + 1)
    return TarSamples(
        paths=paths,
        labels=labels_arr,
        classes=classes,
        class_to_idx={c: i for i, c in enumerate(classes)},
        source=os.path.commonpath(tars) if len(tars) > 1 else tars[0],
        fingerprint=_fingerprint(rel, labels_arr),
        tars=tuple(tars),
        tar_index=np.asarray(tar_index, dtype=np.int64),
        offsets=np.asarray(offsets, dtype=np.int64),
        sizes=np.asarray(sizes, dtype=np.int64),
    )


def _classes(first_tar: str, classes, needed: int) -> list[str]:
    if classes is None:
        names_file = Path(first_tar).parent / CLASSES_FILE
        if names_file.is_file():
            classes = [line.strip() for line in names_file.read_text(encoding="utf-8").splitlines() if line.strip()]
            where = str(names_file)
        else:
            return [str(i) for i in range(needed)]
    else:
        classes = list(classes)
        where = "classes="
    if len(classes) < needed:
        raise DatasetError(f"the shards use label {needed - 1} but {where} names only {len(classes)} classes")
    return classes


# ------------------------------------------------------------------------------------ packing
def pack_image_folder(
    root,
    out,
    *,
    shard_size: int = 1000,
    prefix: str = "shard",
    shuffle_seed: int | None = None,
    overwrite: bool = False,
) -> list[Path]:
    """Pack an ImageFolder tree into WebDataset shards ``out/<prefix>-000000.tar``, ...

    Each sample ``k`` (ImageFolder order, or a permutation drawn from ``shuffle_seed`` — handy for
    readers that stream the tars in order) becomes ``{k:08d}.<ext>`` (the image file's bytes, its
    extension lower-cased) and ``{k:08d}.cls`` (the class index as text); ``shard_size`` samples a
    shard. Also writes DALI's ``.idx`` index beside each tar and ``classes.txt`` (class names, one a
    line). Tar headers carry no times or owners, so packing twice gives identical bytes.

    Returns:
        The tar paths written.
    """
    if isinstance(shard_size, bool) or not isinstance(shard_size, (int, np.integer)) or shard_size < 1:
        raise ValueError(f"shard_size={shard_size!r}: a positive int (samples per tar)")
    if not prefix or "/" in prefix or prefix.startswith("."):
        raise ValueError(f"prefix={prefix!r}: a file name prefix without '/' that does not start with '.'")
    samples = scan_image_folder(root)
    out = Path(out).expanduser()
    out.mkdir(parents=True, exist_ok=True)
    old = sorted(out.glob("*.tar"))
    if old and not overwrite:
        raise DatasetError(
            f"{out} already holds {len(old)} shard(s) ({old[0].name}, ...); a loader pointed at the "
            "folder would read them all: pack into an empty folder, or pass overwrite=True (--overwrite)"
        )
    ours = [p for p in old if p.name.startswith(prefix + "-")]
    if len(ours) < len(old):
        raise DatasetError(
            f"{out} holds shards other than {prefix}-*.tar (e.g. {sorted(set(old) - set(ours))[0].name}), "
            "which a loader pointed at the folder would read too; pack into an empty folder"
        )
    for p in ours:
        p.unlink()
        _index_path(str(p)).unlink(missing_ok=True)
    order = np.arange(len(samples))
    if shuffle_seed is not None:
        order = np.random.default_rng(shuffle_seed).permutation(len(samples))
    width = max(8, len(str(len(samples) - 1)))
    written = []
    for s, start in enumerate(range(0, len(order), int(shard_size))):
        tar_path = out / f"{prefix}-{s:06d}.tar"
        index_lines = []
        tmp = tar_path.with_name(tar_path.name + ".partial")
        with tarfile.open(tmp, "w", format=tarfile.USTAR_FORMAT) as tf:
            for i in order[start : start + int(shard_size)]:
                key = f"{int(i):0{width}d}"
                src = samples.paths[i]
                ext = os.path.splitext(src)[1].lower().lstrip(".")
                data = Path(src).read_bytes()
                label = str(int(samples.labels[i])).encode()
                line = []
                for member_ext, payload in ((ext, data), ("cls", label)):
                    info = tarfile.TarInfo(f"{key}.{member_ext}")
                    info.size, info.mode, info.mtime = len(payload), 0o644, 0
                    tf.addfile(info, io.BytesIO(payload))
                    # tf.offset is now the end of the member's data, padded to whole 512-byte blocks
                    line.append(f"{member_ext} {tf.offset - _padded(len(payload))} {len(payload)} {info.name}")
                index_lines.append(" ".join(line))
        os.replace(tmp, tar_path)
        _index_path(str(tar_path)).write_text(
            f"{_IDX_VERSION} {len(index_lines)}\n" + "\n".join(index_lines) + "\n", encoding="utf-8"
        )
        written.append(tar_path)
    (out / CLASSES_FILE).write_text("".join(c + "\n" for c in samples.classes), encoding="utf-8")
    return written


def _padded(n: int) -> int:
    return -(-n // tarfile.BLOCKSIZE) * tarfile.BLOCKSIZE


__all__ = ["DEFAULT_KEYS", "TarSamples", "index_webdataset", "pack_image_folder", "shard_paths", "split_member_name"]
