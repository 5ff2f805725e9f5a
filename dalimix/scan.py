"""``dalimix scan``: find the files of a data set that will not decode, before a long run meets them.

Every file is opened and fully decoded with PIL in a pool of worker processes (a crash or hang in a
decoder stays in its worker); the result is a report of unreadable files and, optionally, a clean
file list that ``ImageLoader(file_list=...)`` reads, with the class names kept.
"""

from __future__ import annotations

import json
import os
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from .diagnose import check_image_file
from .sources import Samples, resolve_source

CLASSES_HEADER = "# classes: "


@dataclass
class ScanResult:
    samples: Samples
    bad: list[tuple[int, str]]  # (sample index, reason)

    @property
    def good_indices(self) -> list[int]:
        bad = {i for i, _ in self.bad}
        return [i for i in range(len(self.samples)) if i not in bad]


def _check_chunk(paths: list[str]) -> list[str | None]:
    return [check_image_file(p) for p in paths]


def scan(samples: Samples, *, workers: int | None = None, progress: bool = False, chunk: int = 64) -> ScanResult:
    """Decode every file of ``samples``; return the unreadable ones with the reason."""
    from tqdm import tqdm

    workers = workers or max(1, len(os.sched_getaffinity(0)))
    chunks = [samples.paths[i:i + chunk] for i in range(0, len(samples.paths), chunk)]
    bad: list[tuple[int, str]] = []
    bar = tqdm(total=len(samples.paths), unit="file", desc="scan", disable=not progress)
    with ProcessPoolExecutor(max_workers=workers) as pool:
        for ci, reasons in enumerate(pool.map(_check_chunk, chunks)):
            for j, reason in enumerate(reasons):
                if reason is not None:
                    bad.append((ci * chunk + j, reason))
            bar.update(len(reasons))
    bar.close()
    return ScanResult(samples=samples, bad=bad)


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
