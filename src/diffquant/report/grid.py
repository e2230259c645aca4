"""Sample grids as PNG."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch

from diffquant.data.fashion_mnist import to_uint8


def to_grid(images: torch.Tensor, ncol: int = 10, pad: int = 2, upscale: int = 2) -> np.ndarray:
    """Tile ``(N, C, H, W)`` images in ``[-1, 1]`` into one ``uint8`` array (H', W') or (H', W', 3)."""
    if images.ndim != 4:
        raise ValueError(f"expected (N, C, H, W) images, got shape {tuple(images.shape)}")
    n, c, h, w = images.shape
    ncol = max(1, min(ncol, n))
    nrow = (n + ncol - 1) // ncol
    arr = to_uint8(images).permute(0, 2, 3, 1).numpy()
    if upscale > 1:
        arr = arr.repeat(upscale, 1).repeat(upscale, 2)
        h, w = h * upscale, w * upscale
    grid = np.full((nrow * (h + pad) + pad, ncol * (w + pad) + pad, c), 255, np.uint8)
    for i in range(n):
        r, col = divmod(i, ncol)
        grid[pad + r * (h + pad) : pad + r * (h + pad) + h, pad + col * (w + pad) : pad + col * (w + pad) + w] = arr[i]
    return grid[..., 0] if c == 1 else grid


def save_grid(images: torch.Tensor, path: str | os.PathLike, ncol: int = 10, upscale: int = 2) -> Path:
    """Write a PNG grid of images (atomically: temporary file, then rename)."""
    from PIL import Image

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    Image.fromarray(to_grid(images, ncol=ncol, upscale=upscale)).save(tmp, format="PNG")
    os.replace(tmp, path)
    return path
