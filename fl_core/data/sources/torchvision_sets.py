"""Datasets read through ``torchvision.datasets`` (EMNIST, CIFAR-10, CIFAR-100) from a local
root or a download; the IDX datasets use :func:`torchvision_dataset` to download."""

from __future__ import annotations

from pathlib import Path
from typing import Any

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


def torchvision_dataset(cls_name: str, root: Path, download: bool, name: str, **kw: Any) -> Any:
    try:
        import torchvision.datasets as tvd
    except ImportError as e:  # torchvision is a dependency, but say so clearly if it is absent
        raise DataError(f"dataset {name!r} needs torchvision, which is not installed") from e
    cls = getattr(tvd, cls_name)
    try:
        return cls(str(root), download=download, **kw)
    except (RuntimeError, OSError) as e:  # torchvision raises these for missing files / no network
        raise not_found_error(
            name, [root], f"place the torchvision {cls_name} files under that root ({e})."
        ) from e


def _tv_root(name: str, root: Path | None, download: bool) -> Path:
    roots = search_roots(root)
    if roots:
        return roots[0]
    if download:
        return default_data_root()
    raise not_found_error(name, [], "give a torchvision-style root that holds it.")


@register_source("emnist")
def _emnist(
    root: Path | None, download: bool, split: str = "balanced", upright: bool = True
) -> ImageSource:
    """EMNIST through torchvision; ``upright`` transposes the stored (transposed) glyphs."""
    r = _tv_root("emnist", root, download)
    parts = [
        torchvision_dataset("EMNIST", r, download, "emnist", split=split, train=t)
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
        images=as_nchw(x),
        labels=torch.from_numpy(y),
        num_classes=len(names),
        class_names=names,
        details={"root": str(r), "split": split, "upright": upright}
        | merged_splits(len(parts[0]), len(parts[1])),
        **pfl_stats(1),
    )


def _cifar(name: str, cls_name: str, root: Path | None, download: bool) -> ImageSource:
    r = _tv_root(name, root, download)
    parts = [torchvision_dataset(cls_name, r, download, name, train=t) for t in (True, False)]
    x = np.concatenate([p.data for p in parts])
    y = np.concatenate([np.asarray(p.targets) for p in parts]).astype(np.int64)
    names = list(parts[0].classes)
    return ImageSource(
        name=name,
        images=as_nchw(x),
        labels=torch.from_numpy(y),
        num_classes=len(names),
        class_names=names,
        details={"root": str(r)} | merged_splits(len(parts[0]), len(parts[1])),
        **pfl_stats(3),
    )


@register_source("cifar10", "cifar_10")
def _cifar10(root: Path | None, download: bool) -> ImageSource:
    return _cifar("cifar10", "CIFAR10", root, download)


@register_source("cifar100", "cifar_100")
def _cifar100(root: Path | None, download: bool) -> ImageSource:
    return _cifar("cifar100", "CIFAR100", root, download)
