"""The private few shots (and the real held-out images ``--evaluate`` tests on).

Sources: ``folder`` (``<path>/<class>/*.png|jpg…``, one sub-folder per class) or a dataset that
installs offline: ``animal_mnist`` (split ``test`` = the 200-per-class held-out split the builtin
generator was *not* trained on; ``train`` = the rest), ``fashion_mnist`` (its own train / test
files) or ``digits``. Images come back as float in [0, 1], (N, C, H, W), resized to the
generator's resolution and channels.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff")
DATASETS = ("animal_mnist", "fashion_mnist", "digits")
# The builtin generator's training script holds out this many images per class of Animal-MNIST
# (stratified, numpy default_rng(seed 0)); that held-out part is our "test" split.
ANIMAL_HELDOUT_PER_CLASS = 200
ANIMAL_SPLIT_SEED = 0


class PrivateDataError(ValueError):
    """The private data cannot be read; the message names the path or field and the fix."""


@dataclass
class LabelledImages:
    images: torch.Tensor  # float [0, 1], (N, C, H, W)
    labels: torch.Tensor  # int64 (N,)
    class_names: list[str]

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def counts(self) -> list[int]:
        return torch.bincount(self.labels, minlength=len(self.class_names)).tolist()


def fit_images(images: torch.Tensor, resolution: int, channels: int) -> torch.Tensor:
    """uint8 or [0, 1] float (N, C, H, W) -> float [0, 1] at ``resolution`` with ``channels``."""
    x = images.float()
    if images.dtype == torch.uint8:
        x = x / 255.0
    if x.shape[1] != channels:
        if x.shape[1] == 1:
            x = x.expand(-1, channels, -1, -1)
        elif channels == 1:
            x = x.mean(dim=1, keepdim=True)
        else:
            raise PrivateDataError(f"cannot map {x.shape[1]}-channel images to {channels} channels")
    if x.shape[-1] != resolution or x.shape[-2] != resolution:
        x = F.interpolate(x, size=(resolution, resolution), mode="bilinear", align_corners=False)
    return x.clamp(0, 1).contiguous()


def read_image_folder(path: Path, resolution: int, channels: int) -> LabelledImages:
    """``path/<class>/*`` -> images and labels (classes = sorted sub-folder names)."""
    from PIL import Image, UnidentifiedImageError

    path = Path(path).expanduser()
    if not path.exists():
        raise PrivateDataError(f"private.path: folder {path} does not exist")
    if not path.is_dir():
        raise PrivateDataError(
            f"private.path: {path} is a file; give a folder of class sub-folders"
        )
    classes = sorted(p.name for p in path.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not classes:
        raise PrivateDataError(
            f"private.path: {path} has no class sub-folders; put the images in "
            f"{path}/<class name>/*.png (or .jpg)"
        )
    images, labels = [], []
    mode = "L" if channels == 1 else "RGB"
    for label, name in enumerate(classes):
        for file in sorted((path / name).iterdir()):
            if file.suffix.lower() not in IMAGE_SUFFIXES or not file.is_file():
                continue
            try:
                with Image.open(file) as im:
                    im = im.convert(mode).resize(
                        (resolution, resolution), Image.Resampling.BILINEAR
                    )
                    array = np.asarray(im, dtype=np.uint8)
            except (UnidentifiedImageError, OSError) as exc:
                raise PrivateDataError(f"private.path: cannot read image {file}: {exc}") from None
            images.append(array.reshape(resolution, resolution, -1).transpose(2, 0, 1))
            labels.append(label)
    if not images:
        raise PrivateDataError(
            f"private.path: no images ({', '.join(IMAGE_SUFFIXES)}) in the class folders of {path}"
        )
    empty = [c for i, c in enumerate(classes) if i not in set(labels)]
    if empty:
        raise PrivateDataError(f"private.path: class folder(s) without images: {', '.join(empty)}")
    x = torch.from_numpy(np.stack(images))
    return LabelledImages(fit_images(x, resolution, channels), torch.tensor(labels), classes)


def animal_split(labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(train, test) indices of Animal-MNIST as the builtin generator's training script splits
    it: ANIMAL_HELDOUT_PER_CLASS per class held out with default_rng(ANIMAL_SPLIT_SEED)."""
    rng = np.random.default_rng(ANIMAL_SPLIT_SEED)
    test = np.concatenate(
        [
            rng.permutation(np.flatnonzero(labels == c))[:ANIMAL_HELDOUT_PER_CLASS]
            for c in range(int(labels.max()) + 1)
        ]
    )
    train = np.setdiff1d(np.arange(len(labels)), test)
    return np.sort(train), np.sort(test)


def load_dataset_split(name: str, split: str) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    """uint8 images (N, C, H, W), labels and class names of one split of an offline dataset."""
    from fl_core.data import DataError
    from fl_core.data.sources import load_source

    if name not in DATASETS:
        raise PrivateDataError(
            f"private.dataset must be one of {', '.join(DATASETS)}, got {name!r}"
        )
    if split not in ("train", "test"):
        raise PrivateDataError(f"private.split must be 'train' or 'test', got {split!r}")
    try:
        source = load_source(name)
    except DataError as exc:
        raise PrivateDataError(str(exc)) from None
    images, labels = source.images, source.labels
    details = source.details
    if name == "animal_mnist":
        train, test = animal_split(labels.numpy())
        index = torch.from_numpy(train if split == "train" else test)
    elif "original_train_size" in details:  # merged train+test: the original order is kept
        n_train = int(details["original_train_size"])
        index = torch.arange(n_train) if split == "train" else torch.arange(n_train, len(labels))
    else:  # digits: no official split; a fixed stratified 80/20
        rng = np.random.default_rng(0)
        perm = rng.permutation(len(labels))
        cut = int(0.8 * len(labels))
        index = torch.from_numpy(np.sort(perm[:cut] if split == "train" else perm[cut:]))
    names = source.class_names or [str(i) for i in range(source.num_classes)]
    return images[index], labels[index], list(names)


def take_shots(
    labels: torch.Tensor, shots: int, seed: int, classes: list[int]
) -> tuple[np.ndarray, np.ndarray]:
    """``shots`` indices per class in ``classes`` (seeded) and the indices left over."""
    rng = np.random.default_rng(seed)
    y = labels.numpy()
    chosen = []
    for c in classes:
        pool = np.flatnonzero(y == c)
        if len(pool) < shots:
            raise PrivateDataError(
                f"private.shots_per_class = {shots} but class {c} has only {len(pool)} images"
            )
        chosen.append(rng.permutation(pool)[:shots])
    picked = np.sort(np.concatenate(chosen))
    rest = np.setdiff1d(np.flatnonzero(np.isin(y, classes)), picked)
    return picked, rest


def select_classes(
    data: LabelledImages, wanted: list[str] | None, where: str = "private.classes"
) -> LabelledImages:
    """Keep the classes named in ``wanted`` (all when None), relabelled 0..K-1 in that order."""
    if wanted is None:
        return data
    unknown = [c for c in wanted if c not in data.class_names]
    if unknown:
        raise PrivateDataError(
            f"{where}: unknown class(es) {', '.join(map(repr, unknown))}; the private data has "
            f"{', '.join(data.class_names)}"
        )
    if len(set(wanted)) != len(wanted) or not wanted:
        raise PrivateDataError(f"{where}: give each class once, at least one")
    old = [data.class_names.index(c) for c in wanted]
    keep = torch.isin(data.labels, torch.tensor(old))
    mapping = torch.full((len(data.class_names),), -1, dtype=torch.int64)
    mapping[torch.tensor(old)] = torch.arange(len(old))
    return LabelledImages(data.images[keep], mapping[data.labels[keep]], list(wanted))
