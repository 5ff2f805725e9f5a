"""Per-file verdicts: is a sample a regular file, does it decode, and why not.

One home for the question "is this file usable", asked in three places that must agree:
the loader's diagnosis after DALI failed on a batch (``find_unreadable``), ``dalimix scan`` and the
loader's up-front ``strict`` check (``file_verdict``). The decoder that decides is DALI's own, with
the decoder settings of the pipeline (``DecodeCheck``); PIL only words the reason. Two levels:

- ``strict=False``: the file is a non-empty regular file that DALI's decoder decodes in full.
  This is what the loader meets when it decodes the whole image (``train=False``); a random crop
  decodes part of it, so a file damaged outside the crop may pass one epoch and fail another.
- ``strict=True``: in addition PIL decodes it in full without an error. PIL stops at damage that
  libjpeg-turbo conceals (a truncated or broken entropy stream: "image file is truncated",
  "broken data stream") where DALI hands out grey or shifted blocks, so byte-flipped and truncated
  files are refused before they are delivered.
"""

from __future__ import annotations

import io
import os
import stat
import threading
from typing import TYPE_CHECKING, TypeGuard

if TYPE_CHECKING:
    from .webdataset import TarSamples

REGULAR = None  # file_kind's answer for a usable file


def file_kind(path: str) -> str | None:
    """None for a regular file (or a symlink to one), else what it is, as a reason.

    Never opens the file: a FIFO or a device named ``x.jpg`` would block a reader forever.
    """
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return "is a broken symbolic link" if os.path.islink(path) else "does not exist"
    except OSError as e:
        return f"cannot be read ({e.strerror})"
    mode = st.st_mode
    if stat.S_ISREG(mode):
        return REGULAR
    for test, what in (
        (stat.S_ISFIFO, "a FIFO (named pipe)"),
        (stat.S_ISSOCK, "a socket"),
        (stat.S_ISCHR, "a character device"),
        (stat.S_ISBLK, "a block device"),
        (stat.S_ISDIR, "a folder"),
    ):
        if test(mode):
            return f"is {what}, not a regular file"
    return "is not a regular file"


def pil_problem(data: bytes) -> str | None:
    """None if PIL decodes ``data`` in full, else a short reason (truncated, not an image, ...)."""
    from PIL import Image, UnidentifiedImageError

    if len(data) == 0:
        return "is empty (0 bytes)"
    try:
        with Image.open(io.BytesIO(data)) as im:
            im.load()
    except Image.DecompressionBombError as e:
        return f"claims a huge image ({e})"
    except UnidentifiedImageError:
        return "is not an image file PIL or DALI can read"
    except Exception as e:  # PIL raises many types (OSError, SyntaxError, ValueError, struct.error, ...) on bad data
        msg = str(e) or type(e).__name__
        if "truncated" in msg.lower():
            return f"is truncated ({msg})"
        return f"does not decode ({msg})"
    return None


def _header_size(data: bytes):
    """(width, height) the header claims, read by PIL's format plugins without its size limit
    (``Image.open`` would refuse a huge claim; its global limit is not touched, threads check too)."""
    from PIL import Image

    Image.init()
    prefix = data[:16]
    for fmt in Image.ID:
        factory, accept = Image.OPEN[fmt]
        try:
            if accept is not None and not accept(prefix):
                continue
            im = factory(io.BytesIO(data), None)
            return im.size
        except Exception:
            continue
    return None


def check_image_file(path: str) -> str | None:
    """None if ``path`` is a regular file PIL decodes in full, else a short reason (PIL's opinion only)."""
    kind = file_kind(path)
    if kind is not None:
        return kind
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as e:
        return f"cannot be read ({e.strerror})"
    problem = pil_problem(data)
    if problem and problem.startswith("claims a huge image"):
        return None  # PIL's bomb limit is not a defect; DALI decides (file_verdict)
    return problem


class DecodeCheck:
    """DALI's decoder, one encoded file at a time, with the pipeline's decoder settings.

    ``decoder`` is the pipeline's decoder device ("cpu", or "mixed" for nvJPEG on ``device_id``);
    the output type is RGB, as in ``dalimix.pipeline``. One small pipeline, rebuilt after a
    failure (a build costs ~15 ms), so checking ``n`` files costs ``n`` decodes.
    """

    def __init__(self, decoder: str = "cpu", device_id: int | None = None):
        self.decoder = decoder
        self.device_id = device_id
        self._pipe = None

    def _build(self):
        from nvidia.dali import fn, pipeline_def, types

        @pipeline_def(batch_size=1, num_threads=1, device_id=self.device_id, prefetch_queue_depth=1)
        def one():
            encoded = fn.external_source(name="encoded", dtype=types.UINT8, device="cpu")
            return fn.decoders.image(encoded, device=self.decoder, output_type=types.RGB)

        pipe = one()
        pipe.build()
        return pipe

    def __call__(self, data: bytes) -> str | None:
        """None if DALI decodes ``data`` in full, else why not (PIL's wording where it has one)."""
        import numpy as np

        if len(data) == 0:
            return "is empty (0 bytes)"
        try:
            pipe = self._pipe if self._pipe is not None else self._build()
            self._pipe = pipe
            pipe.feed_input("encoded", [np.frombuffer(data, dtype=np.uint8)])
            pipe.run()
        except Exception as e:  # DALI reports decoder failures as RuntimeError with a long trace
            self._pipe = None  # start clean for the next file
            return self._reason(data, e)
        return None

    def _reason(self, data: bytes, exc: Exception) -> str:
        which = "DALI's GPU decoder" if self.decoder == "mixed" else "DALI's decoder"
        size = _header_size(data)
        if size is not None and size[0] * size[1] > 2**28:
            return f"claims {size[0]}x{size[1]} pixels in its header; {which} refuses an image that large"
        problem = pil_problem(data)
        if problem is not None:
            return f"{problem}; {which} fails on it"
        lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
        detail = next((line for line in lines if "rror:" in line), "")
        detail = f": {detail[:160]}" if detail else ""
        return f"does not decode with {which} (PIL reads it: a damaged or non-standard stream){detail}"


_CHECKS = threading.local()


def decode_check(decoder: str = "cpu", device_id: int | None = None) -> DecodeCheck:
    """This thread's ``DecodeCheck`` for (decoder, device_id), made on first use."""
    checks = _CHECKS.__dict__.setdefault("by_key", {})
    key = (decoder, device_id)
    if key not in checks:
        checks[key] = DecodeCheck(decoder, device_id)
    return checks[key]


def dali_decode_error(data: bytes, *, decoder: str = "cpu", device_id: int | None = None) -> str | None:
    """None if DALI decodes ``data`` (encoded image bytes) in full with that decoder, else the reason."""
    return decode_check(decoder, device_id)(data)


def file_verdict(path: str, *, strict: bool = False) -> str | None:
    """The verdict ``dalimix scan`` and ``ImageLoader(strict=...)`` give a file (see the module docstring):
    None if it is usable, else the reason. DALI's CPU decoder decides; ``strict`` adds PIL."""
    kind = file_kind(path)
    if kind is not None:
        return kind
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as e:
        return f"cannot be read ({e.strerror})"
    return bytes_verdict(data, strict=strict)


def bytes_verdict(data: bytes, *, strict: bool = False) -> str | None:
    """``file_verdict`` for encoded bytes already read (tar members)."""
    reason = dali_decode_error(data)
    if reason is None and strict:
        problem = pil_problem(data)
        if problem is not None and not problem.startswith("claims a huge image"):
            reason = f"{problem} (DALI's decoder conceals the damage; refused by strict=True)"
    return reason


def in_tar_shards(samples) -> TypeGuard[TarSamples]:
    """Whether ``samples`` live in tar shards (read by offset) rather than as files (read by path)."""
    from .webdataset import TarSamples

    return isinstance(samples, TarSamples)


def find_unreadable(samples, ids, *, decoder: str = "cpu", device_id: int | None = None) -> list[tuple[int, str]]:
    """The samples among ``ids`` that the pipeline's decoder cannot decode, each with the reason.

    Each file is decided alone, with the decoder the pipeline uses, so a good file is never named
    for a bad one beside it. Files read by path are checked to be regular files before opening.
    """
    by_path = not in_tar_shards(samples)
    check = decode_check(decoder, device_id)
    found = []
    for i in ids:
        if by_path:
            kind = file_kind(samples.paths[i])
            if kind is not None:
                found.append((i, kind))
                continue
        try:
            data = samples.read_bytes(i)
        except Exception as e:  # OSError, or a shard error naming the tar
            found.append((i, f"cannot be read ({e})"))
            continue
        reason = check(data)
        if reason is not None:
            found.append((i, reason))
    return found
