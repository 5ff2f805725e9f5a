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
