"""Bad-file recovery: which files behind a DALI failure are unreadable, and what replaces them.

``on_error="raise"``: a ``DecodeError`` naming the file(s), the epoch and the step.
``on_error="skip"``: each unreadable file is warned about once, listed in ``skipped`` and replaced
from then on by the next readable sample of the rank's epoch order (wrapping around).
"""

from __future__ import annotations

import warnings

import numpy as np

from ..errors import DalimixWarning, DecodeError


class Recovery:
    """The loader's record of unreadable files and the policy for them."""

    def __init__(self, samples, on_error: str, device=None):
        self.samples = samples
        self.device = device
        self.on_error = on_error
        self.skipped: dict[str, str] = {}  # path -> reason
        self.skip_count = 0  # replaced samples handed out so far
        self._bad: set[int] = set()
        self._bad_arr: np.ndarray = np.zeros(0, dtype=np.int64)

    def substitute(self, order: np.ndarray) -> np.ndarray:
        """``order`` with every known-unreadable sample replaced by the next readable one after it
        (cyclically); unchanged when nothing is known bad."""
        if not self._bad:
            return order
        bad = np.isin(order, self._bad_arr)
        if bad.all():
            raise DecodeError(
                f"every sample of this rank's epoch is unreadable ({len(self.skipped)} files skipped so far); "
                "check the data with `dalimix scan`",
                files=list(self.skipped.items()),
            )
        good_pos = np.flatnonzero(~bad)
        nxt = np.searchsorted(good_pos, np.arange(len(order)))
        nxt = np.where(nxt < len(good_pos), good_pos[nxt % len(good_pos)], good_pos[0])
        return order[nxt]

    def count_replaced(self, planned: np.ndarray) -> None:
        if self._bad:
            self.skip_count += int(np.isin(planned, self._bad_arr).sum())

    def handle(self, exc: Exception, ids: list[int], epoch: int, step: int) -> None:
        """DALI failed on a batch holding ``ids``: under "skip" with unreadable files found, mark them
        (the caller rebuilds and retries); otherwise raise the DecodeError."""
        found = self.find_unreadable(ids)
        if self.on_error != "skip" or not found:
            raise self.decode_error(exc, found, ids, epoch, step) from exc
        self.mark(found, f"epoch {epoch}, step {step}", stacklevel=6)

    def mark(self, found: list[tuple[int, str]], why: str, *, stacklevel: int = 5) -> None:
        """Keep the samples of ``found`` ((index, reason) pairs) out from now on, warning once per
        file; ``why`` says when they were found."""
        for i, reason in found:
            path = self.samples.paths[i]
            self._bad.add(int(i))
            if path not in self.skipped:
                self.skipped[path] = reason
                warnings.warn(
                    f"dalimix: skipping {path}: {reason} ({why}); it is replaced by the next readable "
                    "sample of the epoch from now on",
                    DalimixWarning,
                    stacklevel=stacklevel,
                )
        self._bad_arr = np.fromiter(self._bad, dtype=np.int64)
        if len(self._bad) >= len(self.samples):
            raise DecodeError(
                f"{self.samples.source}: every sample is unusable ({len(self.skipped)} files skipped); "
                "check the data with `dalimix scan`",
                files=list(self.skipped.items()),
            )

    def find_unreadable(self, ids: list[int]) -> list[tuple[int, str]]:
        """The samples among ``ids`` that do not decode: each file alone, with the pipeline's own
        decoder (``dalimix.diagnose.find_unreadable``), so no good file is named for a bad one."""
        from ..diagnose import find_unreadable
        from ..pipeline import device_strings

        dev = device_strings(self.device) if self.device is not None else None
        return find_unreadable(
            self.samples, ids, decoder=dev.decoder if dev else "cpu", device_id=dev.device_id if dev else None
        )

    def decode_error(self, exc: Exception, found, ids: list[int], epoch: int, step: int) -> DecodeError:
        """A DecodeError naming the files behind a DALI failure, the epoch and the step."""
        paths_of = self.samples.paths
        suspects = [(paths_of[i], r) for i, r in found]
        where = f"epoch {epoch}, step {step}"
        if suspects:
            listing = "; ".join(f"{p} {r}" for p, r in suspects[:10])
            more = f" (and {len(suspects) - 10} more)" if len(suspects) > 10 else ""
            msg = (
                f"could not decode {len(suspects)} file(s) at {where}: {listing}{more}. Remove or replace them, "
                "list the good files with `dalimix scan DIR --fix-list OUT`, or pass on_error='skip'"
            )
        else:
            first = str(exc).strip().splitlines()
            detail = next((line for line in first if "rror" in line), first[0] if first else "")
            paths = [paths_of[i] for i in ids[:3]]
            msg = (
                f"DALI failed at {where} on one of the files {paths}{' ...' if len(ids) > 3 else ''} "
                f"({detail.strip()}); the pipeline's decoder reads each of them alone"
            )
        return DecodeError(msg, files=suspects, epoch=epoch, step=step)
