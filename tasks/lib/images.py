"""Images between the model's scale and files: [-1, 1] floats <-> uint8, and uint8 images as one picture grid."""

from __future__ import annotations

import math
from typing import Optional

import numpy as np


def to_model_range(images_uint8) -> "torch.Tensor":  # noqa: F821
    """uint8 [N, C, H, W] -> float32 in [-1, 1], the scale the paper trains on (Sec. 4)."""
    import torch

    return torch.as_tensor(images_uint8).float().div(127.5).sub(1.0)


def to_uint8(x) -> np.ndarray:
    """float [-1, 1] [N, C, H, W] tensor -> uint8 array, rounding to the nearest level."""
    import torch

    return ((x.clamp(-1, 1) + 1) * 127.5).round().to(dtype=torch.uint8).cpu().numpy()


def grid_image(images: np.ndarray, min_cell: int = 32, min_side: int = 0, aspect: float = 1.0,
               ncol: Optional[int] = None) -> np.ndarray:
    """uint8 images [N, C, H, W] -> one uint8 [H', W', 3] grid, upscaled by nearest neighbour so that each cell is at
    least ``min_cell`` px and the grid at least ``min_side`` px wide (8x8 digits stay legible; MLflow shows its
    images at their size), with a white gutter that grows with the scale.

    ``aspect`` is the grid's width over its height in cells: 1 is square-ish (ceil(sqrt(N)) columns), 4 a strip
    (16 images: 2 rows of 8), the shape that fits under the run name in MLflow's image cards. ``ncol`` fixes the
    number of columns instead.

    The layout of torchvision's ``make_grid`` (a gutter around every cell, empty cells blank, gray as three equal
    channels, one image alone without a gutter), in numpy: importing torchvision costs ~2 CPU-s (it loads
    torch._dynamo), and the flow's process, which logs the grids and has no torch, would pay ~4 for a picture."""
    x = np.ascontiguousarray(images)
    n, c, h, w = x.shape
    if ncol is not None:
        ncol = max(1, ncol)
    elif aspect == 1.0:
        ncol = max(1, math.ceil(math.sqrt(n)))
    else:
        nrow = max(1, round(math.sqrt(n / aspect)))
        ncol = max(1, math.ceil(n / nrow))
    rows = max(1, math.ceil(n / ncol))
    scale = max(1, math.ceil(min_cell / w), math.ceil(min_side / (ncol * w)) if min_side else 1)
    x = x.repeat(scale, axis=-1).repeat(scale, axis=-2)
    h, w = h * scale, w * scale
    if c == 1:
        x = np.repeat(x, 3, axis=1)
    if n == 1:  # make_grid's one image: no gutter
        return np.ascontiguousarray(x[0].transpose(1, 2, 0))
    pad = max(2, scale // 2) if min_side else 2
    grid = np.full((rows * (h + pad) + pad, ncol * (w + pad) + pad, x.shape[1]), 255, dtype=np.uint8)
    for i, img in enumerate(x):
        top, left = pad + (i // ncol) * (h + pad), pad + (i % ncol) * (w + pad)
        grid[top:top + h, left:left + w] = img.transpose(1, 2, 0)
    return grid
