"""Quieter DALI: its warnings about its own deprecated aliases, and nvImageCodec's decoder log lines.

- DALI's ``auto_aug`` augmentations call ``fn.experimental.filter`` / ``fn.experimental.equalize``,
  aliases DALI itself deprecates, and DALI forces that ``DeprecationWarning`` to show (it sets the
  "default" filter in front of the user's), so every pipeline with a preset prints 12 lines the
  user can do nothing about. ``dali_alias_warnings_silenced()`` drops exactly those messages while
  a pipeline is defined; every other warning passes.
- nvImageCodec prints ``[ERROR] [libjpeg_turbo_decoder] ...`` to file descriptor 2 from C++ for each
  file it cannot decode, although dalimix reports those files itself (``DecodeError``, or the
  ``on_error="skip"`` warning); its format parsers print ``[ERROR] [jpeg_parser] ...`` lines the
  same way. ``DecoderLogFilter`` (used by the ``dalimix`` command) drops those lines from fd 2 and
  counts them. No setting does it: DALI clamps ``DALI_NVIMGCODEC_LOG_LEVEL`` to 1..5 and level 1 is
  "fatal and error", and nvImageCodec itself reads no log-level variable.
"""

from __future__ import annotations

import contextlib
import os
import re
import sys
import threading
import warnings
from collections.abc import Iterator

_ALIAS = re.compile(r"WARNING: `nvidia\.dali\.fn\.experimental\.\w+` is now deprecated")


@contextlib.contextmanager
def dali_alias_warnings_silenced() -> Iterator[None]:
    """Drop DALI's DeprecationWarnings about ``fn.experimental.*`` aliases raised inside the block."""
    shown = warnings.showwarning

    def show(message, category, filename, lineno, file=None, line=None):
        if issubclass(category, DeprecationWarning) and _ALIAS.match(str(message)):
            return
        shown(message, category, filename, lineno, file, line)

    warnings.showwarning = show
    try:
        yield
    finally:
        if warnings.showwarning is show:
            warnings.showwarning = shown


# nvImageCodec's own log lines about one file: its decoders' ("\x1b[0;31m[ERROR] \x1b[0m[libjpeg_turbo_decoder]
# Could not decode ...\n") and its format parsers' ("[ERROR] [jpeg_parser] Invalid marker", three per
# damaged JPEG), which read a file's header before any decoder sees it
_MARKERS = (b"\x1b[0;31m[ERROR] ", b"[ERROR] ")
_DECODER_LINE = re.compile(
    rb"^(?:\x1b\[[0-9;]*m)?\[ERROR\] (?:\x1b\[[0-9;]*m)?\[[A-Za-z0-9_]*(?:decoder|_parser)[A-Za-z0-9_]*\]"
)


def split_decoder_lines(buf: bytes) -> tuple[bytes, bytes, int]:
    """``(text to write now, text to hold until more arrives, decoder lines dropped)`` for ``buf``.

    Drops each complete nvImageCodec decoder ``[ERROR]`` line (it may start mid-line, after a
    progress bar); holds an incomplete one, or a possible start of one at the end of ``buf``.
    """
    out, i, dropped = bytearray(), 0, 0
    while True:
        starts = [j for j in (buf.find(m, i) for m in _MARKERS) if j >= 0]
        if not starts:
            break
        j = min(starts)
        end = buf.find(b"\n", j)
        if end < 0:
            out += buf[i:j]
            return bytes(out), buf[j:], dropped
        if _DECODER_LINE.match(buf[j:end]):
            out += buf[i:j]
            dropped += 1
        else:
            out += buf[i : end + 1]
        i = end + 1
    tail = buf[i:]
    hold = max((k for m in _MARKERS for k in range(1, len(m)) if tail.endswith(m[:k])), default=0)
    return bytes(out) + tail[: len(tail) - hold], tail[len(tail) - hold :], dropped


class DecoderLogFilter:
    """While active, file descriptor 2 goes through a pipe that drops nvImageCodec's decoder lines.

    ``with DecoderLogFilter() as f: ...``; ``f.dropped`` counts the lines dropped. Everything else
    written to fd 2 (Python's stderr, progress bars, other native messages) passes unchanged.
    """

    def __init__(self) -> None:
        self.dropped = 0
        self._saved: int | None = None
        self._thread: threading.Thread | None = None

    def __enter__(self) -> DecoderLogFilter:
        sys.stderr.flush()
        self._saved = os.dup(2)
        read_end, write_end = os.pipe()
        os.dup2(write_end, 2)
        os.close(write_end)
        self._thread = threading.Thread(
            target=self._pump, args=(read_end, self._saved), daemon=True, name="dalimix-stderr-filter"
        )
        self._thread.start()
        return self

    def _pump(self, read_end: int, dest: int) -> None:
        held = b""
        try:
            while chunk := os.read(read_end, 65536):
                now, held, dropped = split_decoder_lines(held + chunk)
                self.dropped += dropped
                if now:
                    os.write(dest, now)
            if held:
                os.write(dest, held)
        finally:
            os.close(read_end)

    def __exit__(self, *exc) -> None:
        assert self._saved is not None and self._thread is not None
        sys.stderr.flush()
        os.dup2(self._saved, 2)  # closes the pipe's last write end: the pump reads EOF and ends
        self._thread.join(timeout=5)
        os.close(self._saved)
