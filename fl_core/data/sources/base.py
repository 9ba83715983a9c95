"""What every image source shares: :class:`ImageSource`, :class:`DataError`, :func:`normalize`,
and the helpers loaders use to find files and to report a dataset they cannot find."""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

PFL_MEAN = 0.5  # PFLlib's convention: (x/255 - 0.5)/0.5 maps pixels to [-1, 1]
PFL_STD = 0.5


class DataError(ValueError):
    """A dataset or partition cannot be produced; the message says why and how to fix it."""


@dataclass
class ImageSource:
    """A whole labelled image dataset held in memory.

    ``images`` is (N, C, H, W), uint8 in 0..255 or float in 0..1; ``labels`` is int64 (N,) with
    values in ``0..num_classes-1``. ``mean``/``std`` (one value per channel) are applied by
    :func:`normalize`. ``details`` records provenance (files read, merged splits, options).
    """

    name: str
    images: torch.Tensor
    labels: torch.Tensor
    num_classes: int
    class_names: list[str] | None = None
    mean: tuple[float, ...] = (PFL_MEAN,)
    std: tuple[float, ...] = (PFL_STD,)
    details: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.images.ndim != 4:
            raise DataError(
                f"source {self.name!r}: images must be (N, C, H, W), got {tuple(self.images.shape)}"
            )
        if self.labels.ndim != 1 or len(self.labels) != len(self.images):
            raise DataError(f"source {self.name!r}: need one label per image")
        if len(self.mean) != self.channels or len(self.std) != self.channels:
            raise DataError(f"source {self.name!r}: mean/std need one value per channel")
        self.labels = self.labels.to(torch.int64)

    @property
    def channels(self) -> int:
        return int(self.images.shape[1])

    @property
    def input_shape(self) -> tuple[int, int, int]:
        c, h, w = self.images.shape[1:]
        return int(c), int(h), int(w)

    def __len__(self) -> int:
        return int(self.images.shape[0])


def normalize(images: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """float32 ``(x/255 - mean)/std`` per channel for uint8 images (``(x - mean)/std`` for float).

    Elementwise only, so normalising a subset gives bit-identical values to normalising the whole
    (saved datasets rely on this to rebuild tensors exactly from stored uint8).
    """
    x = images.to(torch.float32)
    if images.dtype == torch.uint8:
        x = x / 255.0
    c = images.shape[1]
    m = torch.tensor(mean, dtype=torch.float32).view(1, c, 1, 1)
    s = torch.tensor(std, dtype=torch.float32).view(1, c, 1, 1)
    return ((x - m) / s).contiguous()


def default_data_root() -> Path:
    """Where downloads go when no root is given: ``$KTL_DATA_ROOT`` or ``~/.cache/ktl/data``."""
    env = os.environ.get("KTL_DATA_ROOT")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "ktl" / "data"


# ----------------------------------------------------------------------------- for loaders


def not_found_error(dataset: str, looked: Sequence[Path | str], how: str) -> DataError:
    """The error for a dataset found nowhere: where we looked, how to provide it, which options
    point ktl at it."""
    where = "; ".join(str(p) for p in looked) or "(nowhere: no root given)"
    return DataError(
        f"dataset {dataset!r} was not found. Looked in: {where}. To provide it: {how} "
        f"Point ktl at a folder with --set data.root=/path (or the KTL_DATA_ROOT environment "
        f"variable), or allow a download with --set data.download=true (needs network access)."
    )


def search_roots(root: Path | None) -> list[Path]:
    """The folders to look in: ``root`` when given, then ``$KTL_DATA_ROOT`` when set."""
    roots = [root] if root is not None else []
    env = os.environ.get("KTL_DATA_ROOT")
    if env:
        roots.append(Path(env).expanduser())
    return roots


def merged_splits(train_size: int, test_size: int) -> dict[str, Any]:
    """``details`` entries recording that the original train and test splits were merged."""
    return {
        "merged_splits": ["train", "test"],  # PFLlib merges them; the federated split is ours
        "original_train_size": int(train_size),
        "original_test_size": int(test_size),
    }


def as_nchw(x: np.ndarray) -> torch.Tensor:
    """(N,H,W) -> (N,1,H,W); (N,H,W,C) -> (N,C,H,W); always a contiguous tensor."""
    if x.ndim == 3:
        x = x[:, None]
    elif x.ndim == 4 and x.shape[-1] in (1, 3, 4) and x.shape[1] not in (1, 3, 4):
        x = x.transpose(0, 3, 1, 2)
    return torch.from_numpy(np.ascontiguousarray(x))


def pfl_stats(channels: int) -> dict[str, tuple[float, ...]]:
    """PFLlib's ``mean``/``std`` for ``channels`` channels, as :class:`ImageSource` arguments."""
    return {"mean": (PFL_MEAN,) * channels, "std": (PFL_STD,) * channels}
