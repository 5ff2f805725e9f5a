"""The embedded default data set: generated photo-like JPEGs, cached under the user's cache folder.

Eight classes of objects (disc, square, triangle, ring, cross, star, bar, blob) with random colour,
size, position, rotation, shading and shadow, on textured two-tone backgrounds lit by a gradient,
48 images per class at ImageNet-like sizes (300..640 px a side, landscape and portrait), saved as
baseline and progressive JPEGs (a few grayscale). The class is the object's shape, so a small CNN
learns it in a few hundred steps. Generation is seeded: the same files on every machine.
"""

from __future__ import annotations

import io
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np

CLASSES = ("bar", "blob", "cross", "disc", "ring", "square", "star", "triangle")
PER_CLASS = 48
VERSION = 1


def cache_root() -> Path:
    """``$DALIMIX_CACHE``, else ``$XDG_CACHE_HOME/dalimix``, else ``~/.cache/dalimix``."""
    if os.environ.get("DALIMIX_CACHE"):
        return Path(os.environ["DALIMIX_CACHE"]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "dalimix"


def _smooth_noise(rng: np.random.Generator, h: int, w: int, cells: int) -> np.ndarray:
    """Low-frequency noise in [0, 1], h x w: a random cells x cells grid upsampled bicubically."""
    from PIL import Image

    grid = rng.random((cells, cells)).astype(np.float32)
    img = Image.fromarray(grid, mode="F").resize((w, h), Image.BICUBIC)
    return np.clip(np.asarray(img), 0, 1)


def _shape_field(name: str, u: np.ndarray, v: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Signed 'inside-ness' of a unit-sized shape at rotated, centred coordinates (u, v): > 0 inside."""
    r = np.sqrt(u * u + v * v)
    theta = np.arctan2(v, u)
    if name == "disc":
        return 1 - r
    if name == "square":
        return 1 - np.maximum(np.abs(u), np.abs(v)) * 1.15
    if name == "triangle":
        k = np.sqrt(3)
        return -np.maximum.reduce([-v * 2 - 1, (k * u + v) - 1, (-k * u + v) - 1]) * 0.8
    if name == "ring":
        return 0.28 - np.abs(r - 0.72)
    if name == "cross":
        arm = 0.32
        return np.maximum(np.minimum(arm - np.abs(u), 1 - np.abs(v)), np.minimum(arm - np.abs(v), 1 - np.abs(u)))
    if name == "star":
        points = 5
        spikes = 0.55 + 0.45 * np.cos(points * theta)
        return spikes - r
    if name == "bar":
        return np.minimum(0.3 - np.abs(v), 1 - np.abs(u))
    if name == "blob":
        phase = rng.random(3) * 2 * np.pi
        wobble = (
            0.75
            + 0.12 * np.sin(2 * theta + phase[0])
            + 0.1 * np.sin(3 * theta + phase[1])
            + 0.06 * np.sin(5 * theta + phase[2])
        )
        return wobble - r
    raise ValueError(name)


def render_image(cls: str, rng: np.random.Generator) -> np.ndarray:
    """One h x w x 3 uint8 image of class ``cls``."""
    if rng.random() < 0.7:
        w, h = int(rng.integers(400, 641)), int(rng.integers(300, 481))
    else:
        w, h = int(rng.integers(300, 481)), int(rng.integers(400, 641))
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    # background: two-tone textured "ground and sky" with a lighting gradient
    top, bottom = rng.random(3) * 0.8 + 0.1, rng.random(3) * 0.8 + 0.1
    horizon = rng.uniform(0.3, 0.7) * h + _smooth_noise(rng, h, w, 4) * h * 0.15
    blend = 1 / (1 + np.exp(-(yy - horizon) / (h * 0.02)))
    bg = top[None, None] * (1 - blend[..., None]) + bottom[None, None] * blend[..., None]
    texture = _smooth_noise(rng, h, w, int(rng.integers(8, 40)))
    bg *= (0.8 + 0.4 * texture)[..., None]
    # the object
    size = rng.uniform(0.18, 0.38) * min(h, w)
    cy, cx = rng.uniform(size, h - size), rng.uniform(size, w - size)
    angle = rng.uniform(0, 2 * np.pi)
    ca, sa = np.cos(angle), np.sin(angle)
    du, dv = (xx - cx) / size, (yy - cy) / size
    u, v = ca * du + sa * dv, -sa * du + ca * dv
    field = _shape_field(cls, u, v, rng)
    edge = 1.5 / size
    inside = np.clip(field / edge * 0.5 + 0.5, 0, 1)
    # shadow: the same shape offset and softened
    off = size * 0.12
    su, sv = ca * (du - off / size) + sa * (dv - off / size), -sa * (du - off / size) + ca * (dv - off / size)
    shadow = np.clip(_shape_field(cls, su, sv, np.random.default_rng(0)) / 0.15 * 0.5 + 0.5, 0, 1) * 0.45
    img = bg * (1 - shadow[..., None])
    colour = rng.random(3) * 0.9 + 0.05
    shade = 0.75 + 0.25 * (ca * du - sa * dv) / (np.abs(du) + np.abs(dv) + 1)
    obj = colour[None, None] * shade[..., None] * (0.9 + 0.2 * _smooth_noise(rng, h, w, 16))[..., None]
    img = img * (1 - inside[..., None]) + obj * inside[..., None]
    # light falloff, sensor noise
    light = 1.05 - 0.25 * (((xx - rng.uniform(0, w)) / w) ** 2 + ((yy - rng.uniform(0, h)) / h) ** 2)
    img = img * light[..., None] + rng.normal(0, 0.015, img.shape)
    return (np.clip(img, 0, 1) * 255 + 0.5).astype(np.uint8)


def _encode(img: np.ndarray, rng: np.random.Generator) -> bytes:
    from PIL import Image

    pil = Image.fromarray(img)
    if rng.random() < 0.06:
        pil = pil.convert("L")
    buf = io.BytesIO()
    pil.save(buf, format="JPEG", quality=int(rng.integers(80, 96)), progressive=bool(rng.random() < 0.3))
    return buf.getvalue()


def generate(
    dest: str | os.PathLike, *, per_class: int = PER_CLASS, seed: int = 0, classes=CLASSES, progress: bool = False
) -> Path:
    """Write ``dest/<class>/<class>_<i>.jpg`` (an ImageFolder tree) and return ``dest``.

    ``progress``: show a progress bar (tqdm, on stderr) while the images are drawn.
    """
    dest = Path(dest)
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=len(classes) * per_class, desc="demo data", unit="image", leave=False)
    try:
        for ci, cls in enumerate(classes):
            (dest / cls).mkdir(parents=True, exist_ok=True)
            for i in range(per_class):
                rng = np.random.default_rng([seed, ci, i])
                (dest / cls / f"{cls}_{i:03d}.jpg").write_bytes(_encode(render_image(cls, rng), rng))
                if bar is not None:
                    bar.update()
    finally:
        if bar is not None:
            bar.close()
    return dest


def demo_dataset(progress: bool = False) -> Path:
    """The cached demo data set, generated on first use. Returns its ImageFolder root.

    Generating takes 20 s to a couple of minutes on a CPU; ``progress=True`` prints where it goes
    and shows a progress bar meanwhile.
    """
    root = cache_root() / f"demo-v{VERSION}"
    if (root / ".complete").exists():
        return root
    root.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".demo-", dir=root.parent))
    try:
        if progress:
            print(
                f"dalimix: generating the demo data set ({len(CLASSES)} classes x {PER_CLASS} JPEGs) in {root} ...",
                flush=True,
            )
        generate(tmp, progress=progress)
        (tmp / ".complete").write_text(f"dalimix demo data v{VERSION}\n")
        try:
            os.rename(tmp, root)
        except OSError:  # another process finished first
            if not (root / ".complete").exists():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return root
