"""Image sources: whole labelled datasets loaded into memory as tensors, found by name.

Every source returns an :class:`ImageSource` holding all images (original train and test splits
merged, as PFLlib does, so the federated split is made by us) with contiguous integer labels.
Images are kept as stored (usually uint8); :func:`normalize` turns them into float32 once.
"""

from __future__ import annotations

import gzip
import importlib.util
import inspect
import io
import os
import pickle
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

__all__ = [
    "DEBIAN_FASHION_MNIST",
    "DataError",
    "ImageSource",
    "default_data_root",
    "list_sources",
    "load_source",
    "normalize",
    "read_idx",
    "register_source",
]

DEBIAN_FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")
PFL_MEAN = 0.5  # PFLlib's convention: (x/255 - 0.5)/0.5 maps pixels to [-1, 1]
PFL_STD = 0.5

FASHION_CLASSES = [
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
    "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
]  # fmt: skip
ANIMAL_CLASSES = [
    "bear", "bird", "cat", "cow", "dog", "elephant", "giraffe", "horse", "sheep", "zebra",
]  # fmt: skip
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp")


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


# ----------------------------------------------------------------------------- registry

Loader = Callable[..., ImageSource]
_REGISTRY: dict[str, Loader] = {}
_ALIASES: dict[str, str] = {}


def _canon(name: str) -> str:
    return name.strip().lower().replace("-", "_")


def register_source(name: str, *aliases: str) -> Callable[[Loader], Loader]:
    """Register ``fn(root, download, **options) -> ImageSource`` under a name (and aliases)."""

    def deco(fn: Loader) -> Loader:
        _REGISTRY[_canon(name)] = fn
        for a in aliases:
            _ALIASES[_canon(a)] = _canon(name)
        return fn

    return deco


def list_sources() -> list[str]:
    """Canonical names of every registered source."""
    return sorted(_REGISTRY)


def load_source(
    name: str, root: str | Path | None = None, download: bool = False, **options: Any
) -> ImageSource:
    """Load a registered source by name; options are the loader's keyword arguments."""
    key = _canon(name)
    key = _ALIASES.get(key, key)
    if key not in _REGISTRY:
        aliases = ", ".join(f"{a}->{c}" for a, c in sorted(_ALIASES.items()))
        raise DataError(
            f"unknown dataset {name!r}; valid names: {', '.join(list_sources())} "
            f"(aliases: {aliases})"
        )
    fn = _REGISTRY[key]
    accepted = [p for p in inspect.signature(fn).parameters if p not in ("root", "download")]
    unknown = sorted(set(options) - set(accepted))
    if unknown:
        raise DataError(
            f"dataset {key!r} does not take option(s) {', '.join(unknown)}; "
            f"accepted options: {', '.join(accepted) or 'none'}"
        )
    return fn(
        root=Path(root).expanduser() if root is not None else None, download=download, **options
    )


def _missing(dataset: str, looked: Sequence[Path | str], how: str) -> DataError:
    where = "; ".join(str(p) for p in looked) or "(nowhere: no root given)"
    return DataError(
        f"dataset {dataset!r} was not found. Looked in: {where}. To provide it: {how} "
        f"Point ktl at a folder with --set data.root=/path (or the KTL_DATA_ROOT environment "
        f"variable), or allow a download with --set data.download=true (needs network access)."
    )


def _search_roots(root: Path | None) -> list[Path]:
    roots = [root] if root is not None else []
    env = os.environ.get("KTL_DATA_ROOT")
    if env:
        roots.append(Path(env).expanduser())
    return roots


def _merged(train_size: int, test_size: int) -> dict[str, Any]:
    return {
        "merged_splits": ["train", "test"],  # PFLlib merges them; the federated split is ours
        "original_train_size": int(train_size),
        "original_test_size": int(test_size),
    }


def _as_nchw(x: np.ndarray) -> torch.Tensor:
    """(N,H,W) -> (N,1,H,W); (N,H,W,C) -> (N,C,H,W); always a contiguous tensor."""
    if x.ndim == 3:
        x = x[:, None]
    elif x.ndim == 4 and x.shape[-1] in (1, 3, 4) and x.shape[1] not in (1, 3, 4):
        x = x.transpose(0, 3, 1, 2)
    return torch.from_numpy(np.ascontiguousarray(x))


def _pfl_stats(channels: int) -> dict[str, tuple[float, ...]]:
    return {"mean": (PFL_MEAN,) * channels, "std": (PFL_STD,) * channels}


# ----------------------------------------------------------------------------- IDX files

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
    for r in _search_roots(root):
        folders += [r / tv_folder / "raw", r, r / tv_folder, r / name]
    folders += list(extra_dirs)
    files = _find_idx_set(folders, _MNIST_STEMS)
    if files is None and download:
        target = root or default_data_root()
        _torchvision_dataset(tv_class, target, True, name)  # downloads into target/<tv_folder>/raw
        files = _find_idx_set([target / tv_folder / "raw"], _MNIST_STEMS)
    if files is None:
        raise _missing(name, folders, how)
    tx, ty, vx, vy = (read_idx(p) for p in files)
    images = np.concatenate([tx, vx])
    labels = np.concatenate([ty, vy]).astype(np.int64)
    details = _merged(len(ty), len(vy)) | {"files": [str(p) for p in files]}
    return ImageSource(
        name=name,
        images=_as_nchw(images),
        labels=torch.from_numpy(labels),
        num_classes=len(class_names),
        class_names=class_names,
        details=details,
        **_pfl_stats(1),
    )


def _torchvision_dataset(cls_name: str, root: Path, download: bool, name: str, **kw: Any) -> Any:
    try:
        import torchvision.datasets as tvd
    except ImportError as e:  # torchvision is a dependency, but say so clearly if it is absent
        raise DataError(f"dataset {name!r} needs torchvision, which is not installed") from e
    cls = getattr(tvd, cls_name)
    try:
        return cls(str(root), download=download, **kw)
    except (RuntimeError, OSError) as e:  # torchvision raises these for missing files / no network
        raise _missing(
            name, [root], f"place the torchvision {cls_name} files under that root ({e})."
        ) from e


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


# ----------------------------------------------------------------------------- torchvision sets


def _tv_root(name: str, root: Path | None, download: bool) -> Path:
    roots = _search_roots(root)
    if roots:
        return roots[0]
    if download:
        return default_data_root()
    raise _missing(name, [], "give a torchvision-style root that holds it.")


@register_source("emnist")
def _emnist(
    root: Path | None, download: bool, split: str = "balanced", upright: bool = True
) -> ImageSource:
    """EMNIST through torchvision; ``upright`` transposes the stored (transposed) glyphs."""
    r = _tv_root("emnist", root, download)
    parts = [
        _torchvision_dataset("EMNIST", r, download, "emnist", split=split, train=t)
        for t in (True, False)
    ]
    x = torch.cat([p.data for p in parts]).numpy()
    y = torch.cat([p.targets for p in parts]).numpy().astype(np.int64)
    if upright:
        x = x.transpose(0, 2, 1)
    names = list(parts[0].classes)
    if names and names[0] == "N/A" and not (y == 0).any():  # 'letters' labels start at 1
        names, y = names[1:], y - 1
    return ImageSource(
        name=f"emnist_{split}",
        images=_as_nchw(x),
        labels=torch.from_numpy(y),
        num_classes=len(names),
        class_names=names,
        details={"root": str(r), "split": split, "upright": upright}
        | _merged(len(parts[0]), len(parts[1])),
        **_pfl_stats(1),
    )


def _cifar(name: str, cls_name: str, root: Path | None, download: bool) -> ImageSource:
    r = _tv_root(name, root, download)
    parts = [_torchvision_dataset(cls_name, r, download, name, train=t) for t in (True, False)]
    x = np.concatenate([p.data for p in parts])
    y = np.concatenate([np.asarray(p.targets) for p in parts]).astype(np.int64)
    names = list(parts[0].classes)
    return ImageSource(
        name=name,
        images=_as_nchw(x),
        labels=torch.from_numpy(y),
        num_classes=len(names),
        class_names=names,
        details={"root": str(r)} | _merged(len(parts[0]), len(parts[1])),
        **_pfl_stats(3),
    )


@register_source("cifar10", "cifar_10")
def _cifar10(root: Path | None, download: bool) -> ImageSource:
    return _cifar("cifar10", "CIFAR10", root, download)


@register_source("cifar100", "cifar_100")
def _cifar100(root: Path | None, download: bool) -> ImageSource:
    return _cifar("cifar100", "CIFAR100", root, download)


# ----------------------------------------------------------------------------- packaged data


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
    folders = [r / "Animal_MNIST" for r in _search_roots(root)] + _search_roots(root)
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
                images=_as_nchw(x.astype(np.uint8)),
                labels=torch.from_numpy(y),
                num_classes=len(ANIMAL_CLASSES),
                class_names=list(ANIMAL_CLASSES),
                details={"files": [str(data), str(label)]},
                **_pfl_stats(1),
            )
    raise _missing(
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
        images=_as_nchw(x),
        labels=torch.from_numpy(d.target.astype(np.int64)),
        num_classes=10,
        class_names=[str(i) for i in range(10)],
        details={"origin": "sklearn.datasets.load_digits", "scaled": "round(x * 255 / 16)"},
        **_pfl_stats(1),
    )


# ----------------------------------------------------------------------------- folders, synthetic


@register_source("image_folder", "folder")
def _image_folder(
    root: Path | None, download: bool, image_size: int = 32, channels: int = 3
) -> ImageSource:
    """``root/<class>/*.png|jpg``: class names are the sorted sub-folder names."""
    from PIL import Image

    if root is None or not root.is_dir():
        raise _missing(
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
        raise _missing("image_folder", [root], "put images in root/<class name>/*.png (or .jpg).")
    return ImageSource(
        name="image_folder",
        images=_as_nchw(np.stack(images)),
        labels=torch.tensor(labels, dtype=torch.int64),
        num_classes=len(classes),
        class_names=classes,
        details={"root": str(root), "image_size": image_size, "channels": channels},
        **_pfl_stats(channels),
    )


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
        **_pfl_stats(channels),
    )
