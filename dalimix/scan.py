"""Check the files of a data set before a long run meets them: ``dalimix scan`` and the loader's
construction-time checks.

Every verdict is ``dalimix.diagnose.file_verdict``: the one rule that ``dalimix scan`` (default:
DALI's decoder; ``--strict``: DALI and PIL) and ``ImageLoader(strict=...)`` share, so the scan and
the loader agree file by file. Files are checked in a pool of worker processes when there are many
(a crash in a decoder stays in its worker); the result is a report of unusable files and,
optionally, a clean file list that ``ImageLoader(file_list=...)`` reads, with the class names kept.

At construction the loader also stats every file once (``check_loader_files``): only regular
files (and symlinks to them) are samples, and the sizes give the data set's content digest that
``state_dict`` carries (``content_digest``), so a resume notices files swapped under the same names.
"""

from __future__ import annotations

import hashlib
import json
import os
import warnings
from concurrent.futures import Executor, ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .diagnose import bytes_verdict, file_kind, file_verdict, in_tar_shards
from .errors import DalimixWarning, DatasetError, DecodeError
from .sources import Samples, resolve_source

CLASSES_HEADER = "# classes: "
POOL_MIN_FILES = 1000  # fewer files are checked in this process: starting workers costs more than they save
_VERDICT_VERSION = 1  # bump when file_verdict changes meaning: old cached verdicts are then ignored


@dataclass
class ScanResult:
    samples: Samples
    bad: list[tuple[int, str]]  # (sample index, reason)
    strict: bool = False

    @property
    def good_indices(self) -> list[int]:
        bad = {i for i, _ in self.bad}
        return [i for i in range(len(self.samples)) if i not in bad]


# ------------------------------------------------------------------------------ verdicts
def _jobs(samples, indices) -> list:
    """Picklable descriptions of the files: a path, or (tar, offset, size) of a shard member."""
    if not in_tar_shards(samples):
        return [samples.paths[i] for i in indices]
    return [(samples.tars[int(samples.tar_index[i])], int(samples.offsets[i]), int(samples.sizes[i])) for i in indices]


def _verdict(job, strict: bool) -> str | None:
    if isinstance(job, str):
        return file_verdict(job, strict=strict)
    tar, offset, size = job
    try:
        with open(tar, "rb") as f:
            data = os.pread(f.fileno(), size, offset)
    except OSError as e:
        return f"cannot be read from {tar} ({e.strerror})"
    return bytes_verdict(data, strict=strict)


def _check_chunk(jobs: list, strict: bool = False) -> list[str | None]:
    return [_verdict(j, strict) for j in jobs]


def verdicts(
    samples: Samples,
    indices=None,
    *,
    strict: bool = False,
    workers: int | None = None,
    processes: bool = True,
    progress: bool = False,
    chunk: int = 64,
) -> dict[int, str]:
    """``file_verdict`` of each sample in ``indices`` (default all): {index: reason} for the unusable ones.

    ``processes``: check in worker processes (``dalimix scan``: a decoder that crashes takes only its
    worker down; "forkserver" workers, never a fork of a process whose DALI threads may hold locks),
    else in threads of this process (the loader's ``strict`` check: PIL and DALI release the GIL
    while they decode, and a training script without a ``__main__`` guard is not re-run).
    """
    from tqdm import tqdm

    indices = list(range(len(samples))) if indices is None else [int(i) for i in indices]
    workers = workers or max(1, len(os.sched_getaffinity(0)))
    jobs = _jobs(samples, indices)
    bad: dict[int, str] = {}
    bar = tqdm(total=len(jobs), unit="file", desc="scan", disable=not progress)
    chunks = [jobs[k : k + chunk] for k in range(0, len(jobs), chunk)]
    if workers > 1 and len(jobs) >= POOL_MIN_FILES:
        if processes:
            import multiprocessing as mp

            pool: Executor = ProcessPoolExecutor(max_workers=workers, mp_context=mp.get_context("forkserver"))
        else:
            from concurrent.futures import ThreadPoolExecutor

            pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="dalimix-check")
        with pool:
            results = pool.map(_check_chunk, chunks, [strict] * len(chunks))
            for ci, reasons in enumerate(results):
                for j, reason in enumerate(reasons):
                    if reason is not None:
                        bad[indices[ci * chunk + j]] = reason
                bar.update(len(reasons))
    else:
        for ci, part in enumerate(chunks):
            for j, reason in enumerate(_check_chunk(part, strict)):
                if reason is not None:
                    bad[indices[ci * chunk + j]] = reason
            bar.update(len(part))
    bar.close()
    return bad


def scan(
    samples: Samples, *, strict: bool = False, workers: int | None = None, progress: bool = False, chunk: int = 64
) -> ScanResult:
    """Check every file of ``samples`` as ``ImageLoader(strict=strict)`` would; return the unusable ones."""
    bad = verdicts(samples, strict=strict, workers=workers, progress=progress, chunk=chunk)
    return ScanResult(samples=samples, bad=sorted(bad.items()), strict=strict)


def write_file_list(result: ScanResult, out: str | os.PathLike) -> Path:
    """Write the readable samples as ``path label`` lines, class names in a ``# classes:`` header."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    s = result.samples
    with open(out, "w", encoding="utf-8") as f:
        f.write(CLASSES_HEADER + json.dumps(s.classes) + "\n")
        for i in result.good_indices:
            f.write(f"{s.paths[i]} {int(s.labels[i])}\n")
    return out


def load_samples(data: str, file_list: str | None = None) -> Samples:
    if file_list:
        return resolve_source(file_list=file_list, root=data)
    return resolve_source(root=data)


# ---------------------------------------------------------------- facts from one stat pass
@dataclass
class FileFacts:
    """What one ``stat`` per file tells: sizes and mtimes (-1 where unknown) and the samples that
    are not regular files, with what they are."""

    sizes: np.ndarray
    mtimes: np.ndarray
    not_regular: list[tuple[int, str]] = field(default_factory=list)
    digest: dict | None = None  # content_digest of these sizes, once computed


def stat_samples(samples: Samples) -> FileFacts:
    """Stat every sample once (``os.stat`` follows symlinks; nothing is opened)."""
    n = len(samples)
    if in_tar_shards(samples):
        sizes = np.asarray(samples.sizes, dtype=np.int64)
        mt = {t: os.stat(t).st_mtime_ns if os.path.exists(t) else -1 for t in samples.tars}
        mtimes = np.array([mt[samples.tars[int(k)]] for k in samples.tar_index], dtype=np.int64)
        return FileFacts(sizes=sizes, mtimes=mtimes)
    sizes = np.full(n, -1, dtype=np.int64)
    mtimes = np.full(n, -1, dtype=np.int64)
    odd: list[tuple[int, str]] = []
    import stat as stat_mod

    for i, p in enumerate(samples.paths):
        try:
            st = os.stat(p)
        except OSError:
            odd.append((i, file_kind(p) or "cannot be read"))
            continue
        if not stat_mod.S_ISREG(st.st_mode):
            odd.append((i, file_kind(p) or "is not a regular file"))
            continue
        sizes[i] = st.st_size
        mtimes[i] = st.st_mtime_ns
    return FileFacts(sizes=sizes, mtimes=mtimes, not_regular=odd)


MAX_CLASS_DIGESTS = 4096  # above this many classes a state carries the overall digest only


def content_digest(samples: Samples, sizes: np.ndarray) -> dict:
    """A digest of what the files hold, beyond their names: every file's size in sample order,
    overall and per class (so a resume can say which classes changed). Sizes, not mtimes: a copy
    of the data (new mtimes) still resumes; files swapped or re-encoded under the same names do not."""
    sizes = np.asarray(sizes, dtype="<i8")
    labels = np.asarray(samples.labels, dtype=np.int64)
    out: dict[str, object] = {"sizes": hashlib.sha256(sizes.tobytes()).hexdigest()[:16]}
    if len(samples.classes) <= MAX_CLASS_DIGESTS:
        order = np.argsort(labels, kind="stable")  # each class's files, in sample order
        bounds = np.asarray(np.searchsorted(labels[order], np.arange(len(samples.classes) + 1)))
        per = {}
        for c, name in enumerate(samples.classes):
            if bounds[c + 1] > bounds[c]:
                per[str(name)] = hashlib.sha256(sizes[order[bounds[c] : bounds[c + 1]]].tobytes()).hexdigest()[:8]
        out["classes"] = per
    return out


# ------------------------------------------------------------------ the loader's checks
def _cache_dir() -> Path:
    from .demo_data import cache_root  # dalimix's one cache folder ($DALIMIX_CACHE, else ~/.cache/dalimix)

    return cache_root() / "strict"


def _cache_file(samples: Samples) -> Path:
    key = hashlib.sha256(
        f"{_VERDICT_VERSION}\0{samples.source}\0{samples.fingerprint}\0{len(samples)}".encode(
            "utf-8", "surrogateescape"
        )
    ).hexdigest()[:24]
    return _cache_dir() / f"strict-{key}.json"


def strict_verdicts(samples: Samples, facts: FileFacts, *, workers: int | None = None) -> dict[int, str]:
    """``file_verdict(strict=True)`` of every sample, reusing the verdicts cached for files whose
    size and mtime have not changed since (``$DALIMIX_CACHE/strict``, default ``~/.cache/dalimix/strict``)."""
    path = _cache_file(samples)
    cached_sizes = cached_mtimes = None
    cached_bad: dict[int, str] = {}
    try:
        old = json.loads(path.read_text())
        if len(old["sizes"]) == len(samples):
            cached_sizes = np.asarray(old["sizes"], dtype=np.int64)
            cached_mtimes = np.asarray(old["mtimes"], dtype=np.int64)
            cached_bad = {int(k): str(r) for k, r in old["bad"].items()}
    except (OSError, ValueError, KeyError, TypeError):
        pass
    known = facts.sizes >= 0
    if cached_sizes is not None:
        fresh = known & (cached_sizes == facts.sizes) & (cached_mtimes == facts.mtimes)
    else:
        fresh = np.zeros(len(samples), dtype=bool)
    todo = np.flatnonzero(known & ~fresh)
    bad = {i: r for i, r in cached_bad.items() if fresh[i]}
    bad.update(verdicts(samples, todo, strict=True, workers=workers, processes=False))
    if len(todo):
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(f".{os.getpid()}.tmp")
            tmp.write_text(
                json.dumps(
                    {
                        "source": samples.source,
                        "sizes": facts.sizes.tolist(),
                        "mtimes": facts.mtimes.tolist(),
                        "bad": {str(k): r for k, r in bad.items()},
                    }
                )
            )
            os.replace(tmp, path)
        except OSError as e:
            warnings.warn(
                f"dalimix: could not cache the strict check's verdicts in {path.parent} ({e.strerror}); "
                "set $DALIMIX_CACHE to a writable folder",
                DalimixWarning,
                stacklevel=3,
            )
    return bad


def _listing(samples: Samples, found: list[tuple[int, str]], limit: int = 10) -> str:
    text = "; ".join(f"{samples.paths[i]} {r}" for i, r in found[:limit])
    return text + (f" (and {len(found) - limit} more)" if len(found) > limit else "")


def check_loader_files(
    samples: Samples, *, on_error: str, strict: bool = False, workers: int | None = None, mark=None
) -> FileFacts:
    """The loader's construction-time file checks; returns the stat facts (for ``state_dict``).

    Every sample must be a regular file (a FIFO or a device named ``x.jpg`` would block DALI's
    reader forever): others raise ``DatasetError`` naming each path and what it is, or under
    ``on_error="skip"`` are handed to ``mark(found, why)`` (the loader's recovery: warned about
    and kept out). ``strict=True`` then checks every file as ``dalimix scan --strict`` does
    (``strict_verdicts``): bad files raise ``DecodeError`` naming them, or are marked.
    """
    from . import validate as v

    strict = v.flag("strict", strict)
    facts = stat_samples(samples)
    skip = on_error == "skip"
    if facts.not_regular:
        if not skip:
            raise DatasetError(
                f"{samples.source}: {len(facts.not_regular)} sample(s) are not regular files: "
                f"{_listing(samples, facts.not_regular)}. Only regular files (and symlinks to them) are images: "
                "remove or replace them, or pass on_error='skip'"
            )
        mark(facts.not_regular, "not a regular file, found at construction")
    if strict:
        found = sorted(strict_verdicts(samples, facts, workers=workers).items())
        if found:
            if not skip:
                raise DecodeError(
                    f"strict=True: {len(found)} file(s) of {samples.source} do not decode cleanly: "
                    f"{_listing(samples, found)}. Remove or replace them, list the good files with "
                    "`dalimix scan DIR --strict --fix-list OUT`, or pass on_error='skip'",
                    files=[(samples.paths[i], r) for i, r in found],
                )
            mark(found, "strict check at construction")
    return facts


def loader_content(loader) -> dict:
    """``content_digest`` of a loader's data set, from the sizes its construction-time stat found."""
    facts = getattr(loader, "_files", None)
    if facts is None:
        facts = stat_samples(loader.samples)
    digest = getattr(facts, "digest", None)
    if digest is None:
        digest = facts.digest = content_digest(loader.samples, facts.sizes)
    return digest
