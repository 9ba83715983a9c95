"""Image grids: tile generated images and write them as PNG files."""

from __future__ import annotations

import math
import os
import tempfile
from pathlib import Path

import numpy as np
import torch

from generators.base import GeneratorError


def grid_shape(n: int, nrow: int | None = None) -> tuple[int, int]:
    """(rows, columns) of the grid for ``n`` images; ``nrow`` images per row (default ~sqrt(n))."""
    if n < 1:
        raise GeneratorError(f"an image grid needs at least one image, got n={n}")
    columns = nrow if nrow is not None else math.ceil(math.sqrt(n))
    if columns < 1:
        raise GeneratorError(f"nrow must be >= 1, got {nrow}")
    columns = min(columns, n)
    return math.ceil(n / columns), columns


def make_grid(
    images: torch.Tensor, nrow: int | None = None, padding: int = 2, pad_value: float = 1.0
) -> torch.Tensor:
    """Tile ``images`` (n, C, H, W) in [0, 1] into one (C, H', W') image.

    ``padding`` pixels of ``pad_value`` surround every tile, so with ``r`` rows the grid is
    ``r * H + (r + 1) * padding`` pixels high.
    """
    if images.dim() != 4:
        raise GeneratorError(f"images must have shape (n, C, H, W), got {tuple(images.shape)}")
    n, c, h, w = images.shape
    rows, columns = grid_shape(n, nrow)
    grid = torch.full(
        (c, rows * h + (rows + 1) * padding, columns * w + (columns + 1) * padding),
        float(pad_value),
        dtype=torch.float32,
    )
    for i in range(n):
        r, col = divmod(i, columns)
        top = padding + r * (h + padding)
        left = padding + col * (w + padding)
        grid[:, top : top + h, left : left + w] = images[i].detach().float().cpu()
    return grid


def to_uint8(image: torch.Tensor) -> np.ndarray:
    """(C, H, W) float in [0, 1] -> (H, W) or (H, W, C) uint8 array."""
    array = (image.detach().float().cpu().clamp(0.0, 1.0) * 255.0).round().to(torch.uint8)
    array = array.permute(1, 2, 0).numpy()
    return array[:, :, 0] if array.shape[2] == 1 else array


def save_image_grid(
    images: torch.Tensor, path: str | os.PathLike, nrow: int | None = None, padding: int = 2
) -> Path:
    """Write ``images`` as one PNG grid, atomically (a temporary file in the same folder, then
    a rename), so a reader never sees a half-written file. Returns the path written."""
    from PIL import Image

    path = Path(path)
    grid = make_grid(images, nrow=nrow, padding=padding)
    if grid.shape[0] not in (1, 3):
        raise GeneratorError(f"a PNG grid needs 1 or 3 channels, the images have {grid.shape[0]}")
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            Image.fromarray(to_uint8(grid)).save(handle, format="PNG")
        os.chmod(tmp_name, 0o644)  # mkstemp creates 0600; a grid is meant to be shared
        os.replace(tmp_name, path)
    except BaseException:
        Path(tmp_name).unlink(missing_ok=True)
        raise
    return path
