"""A synthetic source for tests and quick runs: class-conditional Gaussian blobs."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from fl_core.data.sources.base import DataError, ImageSource, pfl_stats
from fl_core.data.sources.registry import register_source


@register_source("synthetic")
def _synthetic(
    root: Path | None,
    download: bool,
    num_samples: int = 2000,
    num_classes: int = 10,
    image_size: int = 28,
    channels: int = 1,
    seed: int = 0,
) -> ImageSource:
    """Class-conditional Gaussian blobs: each class has its own blob position (and, with 3
    channels, colour), plus jitter and pixel noise, so a small model beats chance quickly."""
    if num_samples < 1 or num_classes < 1 or image_size < 4 or channels < 1:
        raise DataError(
            "synthetic: need num_samples >= 1, num_classes >= 1, image_size >= 4, channels >= 1"
        )
    rng = np.random.default_rng(seed)
    angles = 2 * np.pi * np.arange(num_classes) / num_classes
    radius = np.where(np.arange(num_classes) % 2 == 0, 0.28, 0.16)  # two rings keep classes apart
    centers = 0.5 + radius[:, None] * np.stack([np.cos(angles), np.sin(angles)], axis=1)
    colours = rng.uniform(0.4, 1.0, size=(num_classes, channels))
    labels = rng.permutation(np.arange(num_samples) % num_classes)
    pos = centers[labels] + rng.normal(0.0, 0.03, size=(num_samples, 2))
    grid = (np.arange(image_size) + 0.5) / image_size
    sigma = 0.09
    gy = np.exp(-((grid[None, :] - pos[:, 1:2]) ** 2) / (2 * sigma**2))  # (N, H)
    gx = np.exp(-((grid[None, :] - pos[:, 0:1]) ** 2) / (2 * sigma**2))  # (N, W)
    blob = gy[:, :, None] * gx[:, None, :]
    x = colours[labels][:, :, None, None] * blob[:, None]
    x = x + rng.normal(0.0, 0.08, size=x.shape)
    images = np.clip(np.rint(x * 255.0), 0, 255).astype(np.uint8)
    return ImageSource(
        name="synthetic",
        images=torch.from_numpy(images),
        labels=torch.from_numpy(labels.astype(np.int64)),
        num_classes=num_classes,
        class_names=[f"blob{i}" for i in range(num_classes)],
        details={
            "num_samples": num_samples,
            "image_size": image_size,
            "channels": channels,
            "seed": seed,
        },
        **pfl_stats(channels),
    )
