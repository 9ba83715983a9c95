"""A folder of images with one sub-folder per class, resized to one square size."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from fl_core.data.sources.base import DataError, ImageSource, as_nchw, not_found_error, pfl_stats
from fl_core.data.sources.registry import register_source

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp")


@register_source("image_folder", "folder")
def _image_folder(
    root: Path | None, download: bool, image_size: int = 32, channels: int = 3
) -> ImageSource:
    """``root/<class>/*.png|jpg``: class names are the sorted sub-folder names."""
    from PIL import Image

    if root is None or not root.is_dir():
        raise not_found_error(
            "image_folder",
            [root] if root else [],
            "give data.root=<folder> holding one sub-folder of images per class.",
        )
    if channels not in (1, 3):
        raise DataError(f"image_folder: channels must be 1 or 3, got {channels}")
    classes = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    images: list[np.ndarray] = []
    labels: list[int] = []
    for label, cls in enumerate(classes):
        for f in sorted((root / cls).iterdir()):
            if f.suffix.lower() not in IMAGE_SUFFIXES:
                continue
            with Image.open(f) as im:
                im = im.convert("L" if channels == 1 else "RGB")
                im = im.resize((image_size, image_size), Image.Resampling.BILINEAR)
                images.append(np.asarray(im, dtype=np.uint8))
            labels.append(label)
    if not images:
        raise not_found_error(
            "image_folder", [root], "put images in root/<class name>/*.png (or .jpg)."
        )
    return ImageSource(
        name="image_folder",
        images=as_nchw(np.stack(images)),
        labels=torch.tensor(labels, dtype=torch.int64),
        num_classes=len(classes),
        class_names=classes,
        details={"root": str(root), "image_size": image_size, "channels": channels},
        **pfl_stats(channels),
    )
