"""MNIST-style datasets stored as IDX files (gzipped or not): the IDX reader, Fashion-MNIST
(Debian's ``dataset-fashion-mnist``, a folder, a torchvision root or a download) and MNIST."""

from __future__ import annotations

import gzip
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from fl_core.data.sources.base import (
    DataError,
    ImageSource,
    as_nchw,
    default_data_root,
    merged_splits,
    not_found_error,
    pfl_stats,
    search_roots,
)
from fl_core.data.sources.registry import register_source
from fl_core.data.sources.torchvision_sets import torchvision_dataset

DEBIAN_FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")
FASHION_CLASSES = [
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
    "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
]  # fmt: skip

_IDX_DTYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


def read_idx(path: str | Path) -> np.ndarray:
    """Parse an IDX file (MNIST's format), gzipped or not, into a numpy array."""
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        data = f.read()
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] not in _IDX_DTYPES:
        raise DataError(f"{path} is not an IDX file (bad magic number)")
    ndim = data[3]
    dims = np.frombuffer(data, dtype=">u4", count=ndim, offset=4).astype(np.int64)
    dtype = np.dtype(_IDX_DTYPES[data[2]])
    offset = 4 + 4 * ndim
    expected = int(np.prod(dims)) * dtype.itemsize
    if len(data) - offset != expected:
        raise DataError(
            f"{path} is truncated or corrupt: {len(data) - offset} bytes of data, expected {expected}"
        )
    arr = np.frombuffer(data, dtype=dtype, offset=offset).reshape(tuple(int(d) for d in dims))
    return arr.astype(dtype.newbyteorder("=")) if dtype.byteorder == ">" else arr.copy()


def _find_idx_file(folder: Path, stem: str) -> Path | None:
    for candidate in (folder / stem, folder / f"{stem}.gz"):
        if candidate.is_file():
            return candidate
    return None


def _find_idx_set(folders: Sequence[Path], stems: Sequence[str]) -> list[Path] | None:
    """The first folder that holds every stem (plain or .gz)."""
    for folder in folders:
        found = [_find_idx_file(folder, s) for s in stems]
        if all(p is not None for p in found):
            return [p for p in found if p is not None]
    return None


_MNIST_STEMS = (
    "train-images-idx3-ubyte",
    "train-labels-idx1-ubyte",
    "t10k-images-idx3-ubyte",
    "t10k-labels-idx1-ubyte",
)


def _load_idx_dataset(
    name: str,
    tv_folder: str,
    tv_class: str,
    root: Path | None,
    download: bool,
    extra_dirs: Sequence[Path],
    how: str,
    class_names: list[str],
) -> ImageSource:
    folders: list[Path] = []
    for r in search_roots(root):
        folders += [r / tv_folder / "raw", r, r / tv_folder, r / name]
    folders += list(extra_dirs)
    files = _find_idx_set(folders, _MNIST_STEMS)
    if files is None and download:
        target = root or default_data_root()
        torchvision_dataset(tv_class, target, True, name)  # downloads into target/<tv_folder>/raw
        files = _find_idx_set([target / tv_folder / "raw"], _MNIST_STEMS)
    if files is None:
        raise not_found_error(name, folders, how)
    tx, ty, vx, vy = (read_idx(p) for p in files)
    images = np.concatenate([tx, vx])
    labels = np.concatenate([ty, vy]).astype(np.int64)
    details = merged_splits(len(ty), len(vy)) | {"files": [str(p) for p in files]}
    return ImageSource(
        name=name,
        images=as_nchw(images),
        labels=torch.from_numpy(labels),
        num_classes=len(class_names),
        class_names=class_names,
        details=details,
        **pfl_stats(1),
    )


@register_source("fashion_mnist", "fmnist", "fashionmnist")
def _fashion_mnist(root: Path | None, download: bool) -> ImageSource:
    return _load_idx_dataset(
        "fashion_mnist",
        "FashionMNIST",
        "FashionMNIST",
        root,
        download,
        [DEBIAN_FASHION_MNIST],
        "install Debian's copy with `apt-get install dataset-fashion-mnist` (files land in "
        f"{DEBIAN_FASHION_MNIST}), or put the four IDX files (gzipped or not) in a folder.",
        FASHION_CLASSES,
    )


@register_source("mnist")
def _mnist(root: Path | None, download: bool) -> ImageSource:
    return _load_idx_dataset(
        "mnist",
        "MNIST",
        "MNIST",
        root,
        download,
        [],
        "put the four MNIST IDX files (gzipped or not) in a folder, or a torchvision-style "
        "root/MNIST/raw/.",
        [str(i) for i in range(10)],
    )
