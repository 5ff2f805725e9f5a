"""Bad image files of the kinds a real data set holds, built from a good photo-like image.

``KINDS`` maps a file name to (bytes maker, who reads it): "pil" files PIL decodes in full and DALI
does not (the wrong-blame cases), "neither" files nobody decodes, "dali" files DALI decodes while
PIL refuses them (silent garbage without ``strict``).
"""

from __future__ import annotations

import io
import struct
import zlib

import numpy as np


def photo(h: int = 64, w: int = 80, seed: int = 0) -> np.ndarray:
    """Gradients plus noise: compresses like a photo (several PNG rows per IDAT, real entropy data)."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:h, 0:w]
    a = np.stack([(x * 4) % 256, (y * 5) % 256, ((x + y) * 3) % 256], -1)
    return np.clip(a + rng.integers(-20, 20, a.shape), 0, 255).astype(np.uint8)


def jpeg_bytes(a: np.ndarray) -> bytes:
    from PIL import Image

    b = io.BytesIO()
    Image.fromarray(a).save(b, "JPEG", quality=90)
    return b.getvalue()


def png_bytes(a: np.ndarray) -> bytes:
    from PIL import Image

    b = io.BytesIO()
    Image.fromarray(a).save(b, "PNG")
    return b.getvalue()


def zeroed_dht(jpg: bytes) -> bytes:
    """Every DHT marker (FF C4) zeroed: PIL falls back to the standard tables, DALI's parser stops."""
    return jpg.replace(b"\xff\xc4", b"\x00\x00")


def bad_idat_crc(png: bytes) -> bytes:
    d = bytearray(png)
    i = d.find(b"IDAT")
    length = struct.unpack(">I", d[i - 4 : i])[0]
    d[i + 4 + length] ^= 0xFF  # first byte of the chunk's CRC
    return bytes(d)


def no_iend(png: bytes) -> bytes:
    return png[: png.rfind(b"IEND") - 4]


def truncated(data: bytes, frac: float = 0.6) -> bytes:
    return data[: int(len(data) * frac)]


def huge_jpeg_header(jpg: bytes, side: int = 60000) -> bytes:
    d = bytearray(jpg)
    i = d.find(b"\xff\xc0")
    d[i + 5 : i + 9] = struct.pack(">HH", side, side)
    return bytes(d)


def huge_png_header(png: bytes, side: int = 60000) -> bytes:
    d = bytearray(png)
    d[16:24] = struct.pack(">II", side, side)
    d[29:33] = struct.pack(">I", zlib.crc32(bytes(d[12:29])))  # a valid IHDR CRC: only the size is absurd
    return bytes(d)


def pil_decodes(data: bytes) -> bool:
    from PIL import Image

    try:
        with Image.open(io.BytesIO(data)) as im:
            im.load()
        return True
    except Exception:
        return False


def dali_decodes(data: bytes) -> bool:
    """DALI's CPU decoder on ``data`` alone (independent of dalimix's own check, which tests test)."""
    from nvidia.dali import fn, pipeline_def, types

    @pipeline_def(batch_size=1, num_threads=1, device_id=None, prefetch_queue_depth=1)
    def one():
        return fn.decoders.image(fn.external_source(name="x", dtype=types.UINT8), device="cpu", output_type=types.RGB)

    pipe = one()
    pipe.build()
    try:
        pipe.feed_input("x", [np.frombuffer(data, dtype=np.uint8)])
        pipe.run()
        return True
    except RuntimeError:
        return False


def flipped_pil_rejects(jpg: bytes, seed: int = 0) -> bytes:
    """Two bytes of the entropy-coded data changed so that PIL refuses the file ("broken data
    stream") while DALI's decoder hands out an image (found by a seeded search, so deterministic)."""
    rng = np.random.default_rng(seed)
    sos = jpg.find(b"\xff\xda") + 20
    for _ in range(2000):
        d = bytearray(jpg)
        for _ in range(2):
            d[int(rng.integers(sos, len(jpg) - 2))] = int(rng.integers(0, 256))
        d = bytes(d)
        if not pil_decodes(d) and dali_decodes(d):
            return d
    raise AssertionError("no byte flip that PIL refuses and DALI decodes")


def corpus(seed: int = 0) -> dict[str, tuple[bytes, str]]:
    """{file name: (bytes, who decodes it: "pil" | "dali" | "neither")}."""
    a = photo(seed=seed)
    jpg, png = jpeg_bytes(a), png_bytes(a)
    return {
        "dht_zeroed.jpg": (zeroed_dht(jpg), "pil"),
        "idat_crc.png": (bad_idat_crc(png), "pil"),
        "no_iend.png": (no_iend(png), "pil"),
        "truncated.png": (truncated(png), "neither"),
        "huge_header.jpg": (huge_jpeg_header(jpg), "neither"),
        "huge_header.png": (huge_png_header(png), "neither"),
        "truncated.jpg": (truncated(jpg, 0.7), "neither"),
        "flipped.jpg": (flipped_pil_rejects(jpg, seed), "dali"),
    }
