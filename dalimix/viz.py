"""Pictures of batches: de-normalise and tile into a PNG grid with a caption per tile."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch


def denormalize(images: torch.Tensor, norm) -> np.ndarray:
    """N x 3 x H x W normalised tensor (any dtype/layout/device) -> N x H x W x 3 uint8."""
    x = images.detach().to("cpu", torch.float32)
    mean = torch.tensor(norm.mean).view(1, 3, 1, 1)
    std = torch.tensor(norm.std).view(1, 3, 1, 1)
    x = (x * std + mean).clamp(0, 1) * 255 + 0.5
    return x.to(torch.uint8).permute(0, 2, 3, 1).contiguous().numpy()


def save_grid(tiles: np.ndarray, path, captions=None, cols: int | None = None, max_tiles: int = 32) -> Path:
    """Tile N x H x W x 3 uint8 images into one PNG at ``path``; ``captions[i]`` is drawn on tile i."""
    from PIL import Image, ImageDraw

    tiles = tiles[:max_tiles]
    n, h, w, _ = tiles.shape
    cols = cols or int(np.ceil(np.sqrt(n)))
    rows = int(np.ceil(n / cols))
    pad = 2
    grid = Image.new("RGB", (cols * (w + pad) + pad, rows * (h + pad) + pad), (24, 24, 24))
    draw = ImageDraw.Draw(grid)
    for i in range(n):
        x0, y0 = pad + (i % cols) * (w + pad), pad + (i // cols) * (h + pad)
        grid.paste(Image.fromarray(tiles[i]), (x0, y0))
        if captions is not None and captions[i]:
            text = str(captions[i])
            box = draw.textbbox((x0 + 3, y0 + 2), text)
            draw.rectangle((box[0] - 2, box[1] - 1, box[2] + 2, box[3] + 1), fill=(0, 0, 0))
            draw.text((x0 + 3, y0 + 2), text, fill=(255, 255, 255))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    grid.save(path)
    return path


def _font(px: int):
    from PIL import ImageFont

    try:
        return ImageFont.load_default(size=px)  # Pillow's scalable default font (needs FreeType)
    except (TypeError, ValueError, OSError, ImportError):
        return ImageFont.load_default()


def load_tile(path, size: int) -> np.ndarray:
    """One image file -> ``size x size x 3`` uint8: the shorter side resized to ``size``, centre crop."""
    from PIL import Image

    with Image.open(path) as im:
        im = im.convert("RGB")
        w, h = im.size
        s = size / min(w, h)
        im = im.resize((max(size, round(w * s)), max(size, round(h * s))), Image.BILINEAR)
        w, h = im.size
        x0, y0 = (w - size) // 2, (h - size) // 2
        return np.asarray(im.crop((x0, y0, x0 + size, y0 + size)), dtype=np.uint8).copy()


def method_table(
    image_a: np.ndarray,
    image_b: np.ndarray,
    methods,
    lams=(0.8, 0.6, 0.4, 0.2),
    *,
    names=("A", "B"),
    seed: int = 0,
    min_tile: int = 160,
):
    """What each mixing method does at several lam: one row per method, one column per lam.

    ``image_a``, ``image_b``: ``H x W x 3`` uint8 (the pair); ``methods``: ``dalimix.mix`` method
    objects. Each tile is ``image_a`` mixed with ``image_b`` by the fused kernel (CPU backend) with
    explicit parameters, captioned with the lam its target gets. Tiles are shown at least
    ``min_tile`` pixels wide, and the text scales with them, so captions stay readable at any size.
    Returns a ``PIL.Image``.
    """
    from PIL import Image, ImageDraw

    from .mix import Mixer
    from .ops import Normalization

    h, w, _ = image_a.shape
    batch = torch.from_numpy(np.stack([image_a, image_b]))
    labels = torch.tensor([0, 1])
    norm = Normalization(mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0))
    rows = []
    for method in methods:
        tiles, caps = [], []
        for lam in lams:
            p = method.params(2, height=h, width=w, lam=lam, rng=np.random.default_rng(seed))
            mixed, _ = Mixer(methods=[method], num_classes=2)(batch, labels, params=p, norm=norm)
            tiles.append(denormalize(mixed[:1], norm)[0])
            caps.append(f"lam {float(p.target_lam[0]):.2f}")
        rows.append((type(method).__name__, tiles, caps))

    scale = max(1, int(np.ceil(min_tile / max(h, w))))
    tw, th = w * scale, h * scale
    fpx = max(11, tw // 11)
    head_font = _font(int(fpx * 1.15))
    pad, cap_h = max(4, fpx // 3), int(fpx * 1.6)
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    label_w = max(probe.textbbox((0, 0), r[0], font=head_font)[2] for r in rows) + 2 * pad
    ncols = len(lams)
    width = label_w + ncols * (tw + pad) + pad
    top = int(fpx * 2.2)
    height = top + (len(rows) + 1) * (th + cap_h + pad) + pad
    img = Image.new("RGB", (width, height), (250, 250, 250))
    draw = ImageDraw.Draw(img)
    title = f"dalimix: each tile is {names[0]} mixed with {names[1]}; lam = weight of {names[0]} in the target"
    draw.text((pad, pad), title, fill=(0, 0, 0), font=_fit(draw, title, width - 2 * pad, int(fpx * 1.15)))

    def put(tile, col, row, caption):
        x = label_w + col * (tw + pad)
        y = top + row * (th + cap_h + pad)
        img.paste(Image.fromarray(tile).resize((tw, th), Image.NEAREST), (x, y))
        f = _fit(draw, caption, tw, fpx)
        cw = draw.textbbox((0, 0), caption, font=f)[2]
        draw.text((x + (tw - cw) // 2, y + th + pad // 2), caption, fill=(0, 0, 0), font=f)

    draw.text((pad, top + th // 2 - fpx), "inputs", fill=(0, 0, 0), font=head_font)
    put(image_a, 0, 0, f"{names[0]}")
    put(image_b, 1, 0, f"{names[1]}")
    for r, (label, tiles, caps) in enumerate(rows, start=1):
        y = top + r * (th + cap_h + pad)
        draw.text((pad, y + th // 2 - fpx // 2), label, fill=(0, 0, 0), font=head_font)
        for c, (tile, cap) in enumerate(zip(tiles, caps)):
            put(tile, c, r, cap)
    return img


def _fit(draw, text: str, max_width: int, px: int):
    """The largest font of at most ``px`` pixels (down to 8) in which ``text`` fits ``max_width``."""
    while px > 8 and draw.textbbox((0, 0), text, font=_font(px))[2] > max_width:
        px -= 1
    return _font(px)
