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
