"""Find out why a file does not decode, with PIL, so errors can name the file and the reason."""

from __future__ import annotations

import os


def check_image_file(path: str) -> str | None:
    """None if ``path`` reads and decodes as an image, else a short reason (missing, empty, truncated, ...)."""
    from PIL import Image, UnidentifiedImageError

    try:
        size = os.path.getsize(path)
    except OSError as e:
        return f"cannot be read ({e.strerror})"
    if size == 0:
        return "is empty (0 bytes)"
    try:
        with Image.open(path) as im:
            im.load()
    except Image.DecompressionBombError:
        return None  # a very large image, not a broken one (DALI has no such limit)
    except UnidentifiedImageError:
        return "is not an image file PIL or DALI can read"
    except (OSError, SyntaxError, ValueError) as e:
        msg = str(e)
        if "truncated" in msg.lower():
            return f"is truncated ({msg})"
        return f"does not decode ({msg})"
    return None


def dali_decode_error(data: bytes) -> str | None:
    """None if DALI's CPU decoder decodes ``data`` (encoded image bytes), else its error's first line.

    The fallback when PIL reads every file of a batch DALI failed on: one tiny CPU-only pipeline
    per file, so it costs milliseconds a file and runs only on that error path.
    """
    import numpy as np
    from nvidia.dali import fn, pipeline_def, types

    @pipeline_def(batch_size=1, num_threads=1, device_id=None, prefetch_queue_depth=1)
    def one():
        encoded = fn.external_source(source=lambda: [np.frombuffer(data, dtype=np.uint8)], batch=True, cycle=False,
                                     dtype=types.UINT8)
        return fn.decoders.image(encoded, device="cpu", output_type=types.RGB)

    if len(data) == 0:
        return "is empty (0 bytes)"
    try:
        pipe = one()
        pipe.build()
        pipe.run()
    except Exception as e:  # DALI reports decoder failures as RuntimeError with a long trace
        lines = [line.strip() for line in str(e).splitlines() if line.strip()]
        detail = next((line for line in lines if "rror" in line and "Critical" not in line), lines[0] if lines else "")
        return f"does not decode with DALI ({detail[:200]})"
    return None
