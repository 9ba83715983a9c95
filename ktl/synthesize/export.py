"""Write a synthetic dataset that standard loaders read, all at once or not at all.

Layout (``torchvision.datasets.ImageFolder(DIR/"images")`` and Hugging Face
``load_dataset("imagefolder", data_dir=DIR/"images")`` read it as is)::

    DIR/images/<class>/<n>.png
    DIR/labels.csv          file,label,class
    DIR/manifest.json       mechanism, privacy spent, generator, embedding, seed, counts,
                            sha256 of every file, evaluation

Everything is written to a hidden temporary folder beside ``DIR`` and renamed to ``DIR`` when
complete; an interrupted export leaves no ``DIR`` (a crash may leave the temporary folder).
"""

from __future__ import annotations

import csv
import hashlib
import json
import os
import re
import shutil
from pathlib import Path

import numpy as np
import torch


class ExportError(ValueError):
    """The output folder cannot be written; the message says why."""


def folder_name(name: str) -> str:
    """A class name as a safe folder name (``T-shirt/top`` -> ``T-shirt_top``)."""
    safe = re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("._")
    return safe or "class"


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """float [0, 1] (N, C, H, W) -> uint8 (N, H, W, C), exactly what the PNG files hold."""
    x = (images.clamp(0, 1) * 255).round().to(torch.uint8)
    return x.permute(0, 2, 3, 1).numpy()


def check_output(out: Path, overwrite: bool = False) -> Path:
    out = Path(out).expanduser()
    if out.exists() and not overwrite:
        raise ExportError(f"--out {out} already exists; choose a new folder or pass --overwrite")
    if out.exists() and not out.is_dir():
        raise ExportError(f"--out {out} is a file")
    if not out.parent.exists():
        raise ExportError(f"--out {out}: the parent folder {out.parent} does not exist")
    return out


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def write_dataset(
    out: Path,
    images: torch.Tensor,
    labels: torch.Tensor,
    class_names: list[str],
    manifest: dict,
    *,
    overwrite: bool = False,
) -> Path:
    """Write the dataset atomically (see the module docstring); returns ``out``."""
    from PIL import Image

    out = check_output(out, overwrite)
    folders = [folder_name(c) for c in class_names]
    if len(set(folders)) != len(folders):
        raise ExportError(f"class names {class_names} collide as folder names {folders}")
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    try:
        arrays = to_uint8(images)
        rows, checksums = [], {}
        counters = [0] * len(class_names)
        for array, label in zip(arrays, labels.tolist(), strict=True):
            rel = Path("images") / folders[label] / f"{counters[label]:05d}.png"
            counters[label] += 1
            (tmp / rel).parent.mkdir(parents=True, exist_ok=True)
            mode = "L" if array.shape[-1] == 1 else "RGB"
            Image.fromarray(array.squeeze(-1) if mode == "L" else array, mode=mode).save(tmp / rel)
            rows.append((rel.as_posix(), label, class_names[label]))
            checksums[rel.as_posix()] = _sha256(tmp / rel)
        with open(tmp / "labels.csv", "w", newline="", encoding="utf-8") as handle:
            writer = csv.writer(handle)
            writer.writerow(["file", "label", "class"])
            writer.writerows(rows)
        checksums["labels.csv"] = _sha256(tmp / "labels.csv")
        manifest = {
            **manifest,
            "classes": [
                {"label": i, "name": c, "folder": f}
                for i, (c, f) in enumerate(zip(class_names, folders, strict=True))
            ],
            "per_class_counts": dict(zip(class_names, counters, strict=True)),
            "layout": "images/<class>/<n>.png (torchvision ImageFolder / Hugging Face imagefolder on images/); labels.csv",
            "sha256": checksums,
        }
        (tmp / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
        if out.exists():
            shutil.rmtree(out)
        tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def verify_dataset(out: Path) -> list[str]:
    """Files whose sha256 differs from the manifest (or are missing): [] when intact."""
    out = Path(out)
    manifest = json.loads((out / "manifest.json").read_text(encoding="utf-8"))
    bad = []
    for rel, digest in manifest["sha256"].items():
        file = out / rel
        if not file.is_file() or _sha256(file) != digest:
            bad.append(rel)
    return bad
