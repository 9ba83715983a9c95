"""The federated dataset: per-client train/test tensors built once, held in memory, saved once."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field, field_validator
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from fl_core.data.partition import (
    default_min_samples,
    partition_labels,
    resolve_scenario,
    scenario_parameters,
    train_test_split,
)
from fl_core.data.sources import DataError, load_source, normalize
from fl_core.seeding import numpy_rng

__all__ = ["ClientData", "DataSpec", "FederatedDataset", "build_federated_dataset"]

FORMAT_VERSION = 1
MANIFEST = "manifest.json"
TENSORS = "clients.safetensors"


class DataSpec(BaseModel):
    """What data to federate and how (the ``data:`` section of an experiment config)."""

    model_config = ConfigDict(extra="forbid")

    dataset: str = Field(
        "fashion_mnist", description="Source name; see fl_core.data.list_sources()."
    )
    root: str | None = Field(None, description="Folder holding the dataset files (else defaults).")
    download: bool = Field(False, description="Allow a network download when files are missing.")
    partition: str = Field(
        "dir", description="Scenario: iid, pat (pathological), dir (Dirichlet), exdir (extended)."
    )
    num_clients: int = Field(20, description="Number of clients (>= 1).")
    alpha: float = Field(
        0.1, description="Dirichlet concentration for dir/exdir; smaller = more skew."
    )
    classes_per_client: int = Field(2, description="Classes per client for pat/exdir.")
    shuffle_classes: bool = Field(
        False,
        description="pat: give clients classes in a seeded random order instead of label order "
        "(PFLlib's), which decides which classes share a client.",
    )
    balance: bool = Field(
        False, description="Equal shares per class (iid/pat); else random shares."
    )
    train_ratio: float = Field(
        0.75, description="Fraction of each client's samples used for training."
    )
    min_samples: int | None = Field(
        None, description="Minimum samples per client; None = PFLlib's least_samples rule."
    )
    max_samples: int | None = Field(
        None,
        ge=1,
        description="Use a seeded random subset of this many source samples (quick experiments).",
    )
    source_options: dict[str, Any] = Field(
        default_factory=dict, description="Extra keyword options for the source loader."
    )

    @field_validator("num_clients")
    @classmethod
    def _clients(cls, v: int) -> int:
        if v < 1:
            raise ValueError(f"num_clients must be >= 1, got {v}")
        return v

    @field_validator("alpha")
    @classmethod
    def _alpha(cls, v: float) -> float:
        if not (v > 0 and np.isfinite(v)):
            raise ValueError(f"alpha must be a finite number > 0, got {v}")
        return v

    @field_validator("classes_per_client")
    @classmethod
    def _positive(cls, v: int, info: Any) -> int:
        if v < 1:
            raise ValueError(f"{info.field_name} must be >= 1, got {v}")
        return v

    @field_validator("train_ratio")
    @classmethod
    def _ratio(cls, v: float) -> float:
        if not 0.0 < v < 1.0:
            raise ValueError(f"train_ratio must be strictly between 0 and 1, got {v}")
        return v

    @field_validator("min_samples")
    @classmethod
    def _min_samples(cls, v: int | None) -> int | None:
        if v is not None and v < 0:
            raise ValueError(f"min_samples must be >= 0 (or null for the default), got {v}")
        return v

    @field_validator("partition")
    @classmethod
    def _partition(cls, v: str) -> str:
        try:
            return resolve_scenario(v)  # store the canonical name
        except DataError as e:
            raise ValueError(str(e)) from None

    def partition_params(self, num_samples: int, batch_size: int = 10) -> dict[str, Any]:
        """The keyword parameters the chosen partitioner takes, min_samples resolved.

        ``batch_size`` is the federation's local batch size (``federation.batch_size``): the
        default min_samples rule gives every client at least one test batch of it.
        """
        min_samples = self.min_samples
        if min_samples is None:
            min_samples = default_min_samples(
                num_samples, self.num_clients, batch_size, self.train_ratio
            )
        values = {
            "alpha": self.alpha,
            "classes_per_client": self.classes_per_client,
            "balance": self.balance,
            "shuffle_classes": self.shuffle_classes,
            "min_samples": min_samples,
        }
        return {k: values[k] for k in scenario_parameters(self.partition) if k in values}


@dataclass
class ClientData:
    """One client's tensors: float32 (n, C, H, W) images, int64 labels; source indices kept."""

    train_x: torch.Tensor
    train_y: torch.Tensor
    test_x: torch.Tensor
    test_y: torch.Tensor
    train_indices: torch.Tensor = field(default_factory=lambda: torch.empty(0, dtype=torch.int64))
    test_indices: torch.Tensor = field(default_factory=lambda: torch.empty(0, dtype=torch.int64))

    @property
    def num_train(self) -> int:
        return int(self.train_y.shape[0])

    @property
    def num_test(self) -> int:
        return int(self.test_y.shape[0])


def _bincount(y: torch.Tensor, num_classes: int) -> list[int]:
    return torch.bincount(y, minlength=num_classes).tolist()


@dataclass
class FederatedDataset:
    """Per-client splits in memory plus a JSON-able manifest describing how they were made."""

    clients: list[ClientData]
    num_classes: int
    input_shape: tuple[int, int, int]
    manifest: dict[str, Any]

    @property
    def num_clients(self) -> int:
        return len(self.clients)

    def client(self, i: int) -> ClientData:
        return self.clients[i]

    @property
    def total_train(self) -> int:
        return sum(c.num_train for c in self.clients)

    @property
    def total_test(self) -> int:
        return sum(c.num_test for c in self.clients)

    @property
    def class_names(self) -> list[str] | None:
        return self.manifest.get("class_names")

    def label_counts(self, split: Literal["train", "test", "all"] = "train") -> np.ndarray:
        """(num_clients, num_classes) int64 matrix of label counts for a split."""
        if split not in ("train", "test", "all"):
            raise ValueError(f"split must be 'train', 'test' or 'all', got {split!r}")
        rows = []
        for c in self.clients:
            ys = {"train": [c.train_y], "test": [c.test_y], "all": [c.train_y, c.test_y]}[split]
            rows.append(sum(np.asarray(_bincount(y, self.num_classes)) for y in ys))
        return np.asarray(rows, dtype=np.int64).reshape(self.num_clients, self.num_classes)

    # ------------------------------------------------------------------------- persistence

    def save(self, path: str | Path, overwrite: bool = False) -> Path:
        """Write ``manifest.json`` + ``clients.safetensors`` into a temporary sibling folder, then
        rename it into place, so a reader never sees a half-written dataset."""
        path = Path(path)
        if path.exists() and not overwrite:
            raise FileExistsError(f"{path} exists; pass overwrite=True to replace it")
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.parent / f".{path.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        tmp.mkdir()
        try:
            tensors: dict[str, torch.Tensor] = {}
            stored = "uint8"
            packed = [self._pack(c) for c in self.clients]
            if any(p is None for p in packed):
                stored = "float32"  # not exactly representable as uint8: keep the floats
            for i, c in enumerate(self.clients):
                pre = f"client{i:06d}."
                for split in ("train", "test"):
                    x = getattr(c, f"{split}_x")
                    p = packed[i]
                    tensors[pre + f"{split}_x"] = p[split] if stored == "uint8" and p else x
                    tensors[pre + f"{split}_y"] = getattr(c, f"{split}_y")
                    tensors[pre + f"{split}_indices"] = getattr(c, f"{split}_indices")
            save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp / TENSORS))
            manifest = dict(self.manifest)
            manifest["storage"] = {
                "format_version": FORMAT_VERSION,
                "images": stored,
                "file": TENSORS,
            }
            (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1))
            if path.exists():
                old = path.parent / f".{path.name}.old-{uuid.uuid4().hex[:8]}"
                path.rename(old)
                tmp.rename(path)
                shutil.rmtree(old)
            else:
                tmp.rename(path)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        return path

    def _pack(self, c: ClientData) -> dict[str, torch.Tensor] | None:
        """uint8 images whose normalisation reproduces ``c``'s floats bit for bit, else None."""
        norm = self.manifest.get("normalization", {})
        if norm.get("input_dtype") != "uint8":
            return None
        mean, std = norm["mean"], norm["std"]
        out = {}
        for split in ("train", "test"):
            x = getattr(c, f"{split}_x")
            m = torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1)
            s = torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1)
            raw = ((x * s + m) * 255.0).round().clamp(0, 255).to(torch.uint8)
            if not torch.equal(normalize(raw, mean, std), x):
                return None
            out[split] = raw
        return out

    @classmethod
    def load(cls, path: str | Path) -> FederatedDataset:
        """Read a folder written by :meth:`save`; missing or corrupt files raise DataError."""
        path = Path(path)
        if not path.is_dir():
            raise DataError(f"no saved federated dataset at {path} (folder does not exist)")
        mpath, tpath = path / MANIFEST, path / TENSORS
        for p in (mpath, tpath):
            if not p.is_file():
                raise DataError(
                    f"saved federated dataset at {path} is incomplete: {p.name} is missing"
                )
        try:
            manifest = json.loads(mpath.read_text())
            storage = manifest["storage"]
            num_clients = int(manifest["num_clients"])
            num_classes = int(manifest["num_classes"])
            input_shape = tuple(int(v) for v in manifest["input_shape"])
            norm = manifest["normalization"]
        except (json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
            raise DataError(f"{mpath} is corrupt or not a ktl manifest ({e!r})") from e
        if storage.get("format_version") != FORMAT_VERSION:
            raise DataError(
                f"{mpath} has format_version {storage.get('format_version')}, this ktl reads {FORMAT_VERSION}"
            )
        try:
            tensors = load_file(str(tpath))
        except (SafetensorError, OSError, ValueError) as e:
            raise DataError(f"{tpath} is corrupt or truncated ({e})") from e
        clients = []
        try:
            for i in range(num_clients):
                pre = f"client{i:06d}."
                parts: dict[str, torch.Tensor] = {}
                for split in ("train", "test"):
                    x = tensors[pre + f"{split}_x"]
                    if storage["images"] == "uint8":
                        x = normalize(x, norm["mean"], norm["std"])
                    parts[f"{split}_x"] = x
                    parts[f"{split}_y"] = tensors[pre + f"{split}_y"]
                    parts[f"{split}_indices"] = tensors[pre + f"{split}_indices"]
                clients.append(ClientData(**parts))
        except KeyError as e:
            raise DataError(f"{tpath} does not match its manifest: tensor {e} is missing") from e
        ds = cls(clients, num_classes, input_shape, manifest)  # type: ignore[arg-type]
        _check_against_manifest(ds, tpath)
        return ds


def _check_against_manifest(ds: FederatedDataset, tpath: Path) -> None:
    entries = ds.manifest.get("clients")
    if not isinstance(entries, list) or len(entries) != ds.num_clients:
        raise DataError(f"{tpath}: manifest.json does not list one entry per client")
    for i, (c, entry) in enumerate(zip(ds.clients, entries, strict=True)):
        for split in ("train", "test"):
            x, y = getattr(c, f"{split}_x"), getattr(c, f"{split}_y")
            if tuple(x.shape[1:]) != ds.input_shape or x.shape[0] != y.shape[0]:
                raise DataError(f"{tpath}: client {i} {split} tensors have inconsistent shapes")
            if _bincount(y, ds.num_classes) != entry.get(f"{split}_label_counts"):
                raise DataError(f"{tpath}: client {i} {split} labels disagree with manifest.json")


def build_federated_dataset(spec: DataSpec, seed: int, batch_size: int = 10) -> FederatedDataset:
    """Load the source, normalise it once, partition its labels, split each client, index.

    ``batch_size`` is the federation's local batch size, used only by the default
    ``min_samples`` rule (PFLlib's least_samples).
    """
    source = load_source(
        spec.dataset, root=spec.root, download=spec.download, **spec.source_options
    )
    subset = None
    if spec.max_samples is not None and spec.max_samples < len(source):
        rng = numpy_rng(seed, "subsample")
        subset = np.sort(rng.choice(len(source), size=spec.max_samples, replace=False))
        keep = torch.from_numpy(subset)
        source = dataclasses.replace(
            source,
            images=source.images.index_select(0, keep),
            labels=source.labels.index_select(0, keep),
        )
    labels_np = source.labels.numpy()
    params = spec.partition_params(len(source), batch_size)
    parts = partition_labels(labels_np, spec.partition, spec.num_clients, seed, **params)

    # normalise per client from the (usually uint8) source: no full float copy of the dataset
    def norm(idx: torch.Tensor) -> torch.Tensor:
        return normalize(source.images.index_select(0, idx), source.mean, source.std)

    labels = source.labels
    clients: list[ClientData] = []
    for i, idx in enumerate(parts):
        tr, te = train_test_split(idx, spec.train_ratio, numpy_rng(seed, "split", i))
        tr_t, te_t = torch.from_numpy(tr), torch.from_numpy(te)
        clients.append(
            ClientData(
                train_x=norm(tr_t),
                train_y=labels.index_select(0, tr_t),
                test_x=norm(te_t),
                test_y=labels.index_select(0, te_t),
                train_indices=tr_t,
                test_indices=te_t,
            )
        )
    nc = source.num_classes
    manifest: dict[str, Any] = {
        "source": {
            "name": source.name,
            "num_samples": len(source),
            "details": source.details,
            # indices below refer to this subset's positions when it is set
            "subset_of_source_indices": None if subset is None else subset.tolist(),
        },
        "scenario": spec.partition,
        "parameters": {
            **params,
            "num_clients": spec.num_clients,
            "train_ratio": spec.train_ratio,
        },
        "spec": spec.model_dump(),
        "seed": seed,
        "num_clients": spec.num_clients,
        "num_classes": nc,
        "input_shape": list(source.input_shape),
        "class_names": source.class_names,
        "normalization": {
            "formula": "(x/255 - mean)/std"
            if source.images.dtype == torch.uint8
            else "(x - mean)/std",
            "mean": list(source.mean),
            "std": list(source.std),
            "input_dtype": str(source.images.dtype).removeprefix("torch."),
        },
        "clients": [
            {
                "id": i,
                "train_samples": c.num_train,
                "test_samples": c.num_test,
                "train_label_counts": _bincount(c.train_y, nc),
                "test_label_counts": _bincount(c.test_y, nc),
            }
            for i, c in enumerate(clients)
        ],
    }
    return FederatedDataset(clients, nc, source.input_shape, manifest)
