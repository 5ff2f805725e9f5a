"""dalimix's exceptions. Each message names the file, folder, argument or tensor and what to do."""

from __future__ import annotations


class DalimixError(Exception):
    """Base class of every error dalimix raises on purpose."""


class DatasetError(DalimixError, ValueError):
    """The data set cannot be used as given: a missing or empty root, an empty class folder, a bad file list."""


class DecodeError(DalimixError):
    """A file could not be read or decoded as an image.

    Attributes:
        files: the paths that failed, each with the reason found.
        epoch, step: where in the run it happened (None when not known).
    """

    def __init__(self, message: str, files: list[tuple[str, str]] | None = None, epoch=None, step=None):
        super().__init__(message)
        self.files = files or []
        self.epoch = epoch
        self.step = step


class DalimixWarning(UserWarning):
    """Something dalimix worked around and wants you to know (e.g. an unreadable file it skipped)."""


class StateError(DalimixError, ValueError):
    """A loader state given to ``load_state_dict`` is malformed, or does not belong to this loader's data."""
