"""Datasets shipped inside installed packages: Animal-MNIST (the ``animal-mnist`` pip package,
read with a numpy-only unpickler) and scikit-learn's 8x8 digits."""

from __future__ import annotations

import gzip
import importlib.util
import io
import pickle
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fl_core.data.sources.base import (
    DataError,
    ImageSource,
    as_nchw,
    not_found_error,
    pfl_stats,
    search_roots,
)
from fl_core.data.sources.registry import register_source

ANIMAL_CLASSES = [
    "bear", "bird", "cat", "cow", "dog", "elephant", "giraffe", "horse", "sheep", "zebra",
]  # fmt: skip


class _NumpyOnlyUnpickler(pickle.Unpickler):
    """Unpickles plain numpy arrays only; any other global is refused (no code execution)."""

    _reconstruct = np.ndarray.__reduce__(np.zeros(1))[0]  # numpy's array-rebuild function
    _allowed: dict[tuple[str, str], Any] = {
        ("numpy.core.multiarray", "_reconstruct"): _reconstruct,
        ("numpy._core.multiarray", "_reconstruct"): _reconstruct,
        ("numpy", "ndarray"): np.ndarray,
        ("numpy", "dtype"): np.dtype,
    }

    def find_class(self, module: str, name: str) -> Any:
        try:
            return self._allowed[(module, name)]
        except KeyError:
            raise pickle.UnpicklingError(f"refusing to load {module}.{name}") from None


def _load_numpy_pickle(path: Path) -> np.ndarray:
    with gzip.open(path, "rb") as f:
        obj = _NumpyOnlyUnpickler(io.BytesIO(f.read())).load()
    if not isinstance(obj, np.ndarray):
        raise DataError(f"{path} does not hold a numpy array")
    return obj


@register_source("animal_mnist", "animal")
def _animal_mnist(root: Path | None, download: bool) -> ImageSource:
    """Animal silhouettes (10k, 28x28) shipped by the ``animal-mnist`` pip package."""
    folders = [r / "Animal_MNIST" for r in search_roots(root)] + search_roots(root)
    # find_spec locates the package without importing it (its loader module imports tensorflow)
    spec = importlib.util.find_spec("animal_mnist")
    if spec is not None and spec.submodule_search_locations:
        folders += [Path(p) / "data" / "Animal_MNIST" for p in spec.submodule_search_locations]
    stems = ("animal_data_version_3.gz", "animal_label_version_3.gz")
    for folder in folders:
        data, label = folder / stems[0], folder / stems[1]
        if data.is_file() and label.is_file():
            x, y = _load_numpy_pickle(data), _load_numpy_pickle(label).astype(np.int64)
            return ImageSource(
                name="animal_mnist",
                images=as_nchw(x.astype(np.uint8)),
                labels=torch.from_numpy(y),
                num_classes=len(ANIMAL_CLASSES),
                class_names=list(ANIMAL_CLASSES),
                details={"files": [str(data), str(label)]},
                **pfl_stats(1),
            )
    raise not_found_error(
        "animal_mnist",
        folders,
        "`pip install --no-deps animal-mnist==0.4` (no-deps: its loader pulls in tensorflow).",
    )


@register_source("digits", "sklearn_digits")
def _digits(root: Path | None, download: bool) -> ImageSource:
    """scikit-learn's bundled 8x8 digits (1,797 images), 0..16 grey levels scaled to 0..255."""
    from sklearn.datasets import load_digits

    d = load_digits()
    x = np.rint(d.images * (255.0 / 16.0)).astype(np.uint8)
    return ImageSource(
        name="digits",
        images=as_nchw(x),
        labels=torch.from_numpy(d.target.astype(np.int64)),
        num_classes=10,
        class_names=[str(i) for i in range(10)],
        details={"origin": "sklearn.datasets.load_digits", "scaled": "round(x * 255 / 16)"},
        **pfl_stats(1),
    )
