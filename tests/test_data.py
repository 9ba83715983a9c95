"""Tests for fl_core.data: sources, partitioners, the federated dataset, the report."""

from __future__ import annotations

import gzip
import json
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
from pydantic import ValidationError
from rich.console import Console

from fl_core.data import (
    DataError,
    DataSpec,
    FederatedDataset,
    build_federated_dataset,
    client_table,
    default_min_samples,
    list_sources,
    load_source,
    normalize,
    partition_labels,
    train_test_split,
)
from fl_core.data.sources import idx as idx_sources
from fl_core.seeding import numpy_rng

DEBIAN_FMNIST = Path("/usr/share/datasets/fashion-mnist")
SCENARIO_PARAMS = {
    "iid": {"balance": True},
    "pat": {"classes_per_client": 2},
    "dir": {"alpha": 0.1},
    "exdir": {"classes_per_client": 3, "alpha": 0.5},
}


@pytest.fixture(scope="module")
def labels() -> np.ndarray:
    """3,000 labels over 10 classes with unequal class sizes."""
    rng = np.random.default_rng(0)
    return rng.choice(10, size=3000, p=np.linspace(1, 2, 10) / np.linspace(1, 2, 10).sum())


@pytest.fixture(scope="module")
def fmnist_labels() -> np.ndarray:
    if not (DEBIAN_FMNIST / "train-labels-idx1-ubyte.gz").is_file():
        pytest.skip("Debian dataset-fashion-mnist is not installed")
    files = ["train-labels-idx1-ubyte.gz", "t10k-labels-idx1-ubyte.gz"]
    return np.concatenate([idx_sources.read_idx(DEBIAN_FMNIST / f) for f in files]).astype(np.int64)


@pytest.fixture(scope="module")
def small_spec() -> DataSpec:
    return DataSpec(
        dataset="synthetic",
        partition="dir",
        num_clients=6,
        alpha=0.5,
        source_options={"num_samples": 600, "image_size": 12, "num_classes": 5},
    )


@pytest.fixture(scope="module")
def small_ds(small_spec: DataSpec) -> FederatedDataset:
    return build_federated_dataset(small_spec, seed=3)


# ----------------------------------------------------------------------------- partitions


def _assert_valid_partition(parts: list[np.ndarray], n: int, num_clients: int) -> None:
    assert len(parts) == num_clients
    for p in parts:
        assert p.dtype == np.int64
        assert np.all(np.diff(p) > 0), "each client's indices are sorted and unique"
    everything = np.concatenate(parts)
    assert len(everything) == n, "disjoint: no index given twice"
    assert np.array_equal(np.sort(everything), np.arange(n)), "complete: every index given"


@pytest.mark.parametrize("scenario", list(SCENARIO_PARAMS))
@pytest.mark.parametrize("num_clients", [1, 7, 40])
def test_partition_disjoint_complete(labels: np.ndarray, scenario: str, num_clients: int) -> None:
    params = dict(SCENARIO_PARAMS[scenario])
    if scenario in ("pat", "exdir") and num_clients * params["classes_per_client"] < 10:
        params["classes_per_client"] = 10
    parts = partition_labels(labels, scenario, num_clients, seed=1, min_samples=5, **params)
    _assert_valid_partition(parts, len(labels), num_clients)
    assert min(len(p) for p in parts) >= 5


@pytest.mark.parametrize("scenario", list(SCENARIO_PARAMS))
def test_partition_deterministic(labels: np.ndarray, scenario: str) -> None:
    params = SCENARIO_PARAMS[scenario]
    a = partition_labels(labels, scenario, 12, seed=5, **params)
    b = partition_labels(labels, scenario, 12, seed=5, **params)
    c = partition_labels(labels, scenario, 12, seed=6, **params)
    assert all(np.array_equal(x, y) for x, y in zip(a, b, strict=True))
    assert not all(np.array_equal(x, y) for x, y in zip(a, c, strict=True))


@pytest.mark.parametrize("scenario", ["iid", "pat", "dir", "exdir"])
@pytest.mark.parametrize("balance", [True, False])
def test_min_samples_respected(labels: np.ndarray, scenario: str, balance: bool) -> None:
    params = dict(SCENARIO_PARAMS[scenario])
    if scenario in ("iid", "pat"):
        params["balance"] = balance
    if "alpha" in params:
        params["alpha"] = 0.05  # strong skew makes the repair step do real work
    parts = partition_labels(labels, scenario, 50, seed=2, min_samples=30, **params)
    _assert_valid_partition(parts, len(labels), 50)
    assert min(len(p) for p in parts) >= 30


def test_aliases_match_canonical(labels: np.ndarray) -> None:
    for alias, canon in [
        ("dirichlet", "dir"),
        ("pathological", "pat"),
        ("Extended-Dirichlet", "exdir"),
    ]:
        params = SCENARIO_PARAMS[canon]
        a = partition_labels(labels, alias, 8, seed=0, **params)
        b = partition_labels(labels, canon, 8, seed=0, **params)
        assert all(np.array_equal(x, y) for x, y in zip(a, b, strict=True))


def test_iid_balanced_is_even_and_stratified(labels: np.ndarray) -> None:
    parts = partition_labels(labels, "iid", 10, seed=0, balance=True)
    sizes = [len(p) for p in parts]
    assert max(sizes) - min(sizes) <= 1
    counts = np.stack([np.bincount(labels[p], minlength=10) for p in parts])
    assert (counts.max(axis=0) - counts.min(axis=0)).max() <= 1


def test_pathological_classes_per_client(labels: np.ndarray) -> None:
    for cpc in (1, 2, 3):
        parts = partition_labels(labels, "pat", 20, seed=4, classes_per_client=cpc, min_samples=10)
        held = [set(np.unique(labels[p]).tolist()) for p in parts]
        assert all(len(h) <= cpc for h in held)
        assert set().union(*held) == set(range(10)), "every class has a holder"


def test_pathological_pairs_follow_label_order_unless_shuffled(labels: np.ndarray) -> None:
    """PFLlib's quota walk gives clients classes in label order: with 2 classes per client,
    20 clients hold the pairs (0, 1), (2, 3), … (4 clients each); shuffle_classes draws the
    order from the seed instead."""
    parts = partition_labels(labels, "pat", 20, seed=4, classes_per_client=2, min_samples=10)
    held = [tuple(np.unique(labels[p]).tolist()) for p in parts]
    assert held == [(2 * (k % 5), 2 * (k % 5) + 1) for k in range(20)]
    pairs = {
        frozenset(np.unique(labels[p]).tolist())
        for seed in range(3)
        for p in partition_labels(
            labels,
            "pat",
            20,
            seed=seed,
            classes_per_client=2,
            min_samples=10,
            shuffle_classes=True,
        )
    }
    assert pairs - {frozenset((2 * i, 2 * i + 1)) for i in range(5)}, "some other pairing"


def test_extended_dirichlet_classes_per_client(labels: np.ndarray) -> None:
    for cpc, alpha in [(1, 0.1), (2, 0.1), (4, 100.0)]:
        parts = partition_labels(
            labels, "exdir", 30, seed=7, classes_per_client=cpc, alpha=alpha, min_samples=10
        )
        _assert_valid_partition(parts, len(labels), 30)
        assert all(len(np.unique(labels[p])) <= cpc for p in parts)
        assert min(len(p) for p in parts) >= 10


def test_dirichlet_500_clients_terminates(fmnist_labels: np.ndarray) -> None:
    # PFLlib's redraw loop hangs here (#130); ours redraws a bounded number of times, then repairs
    min_samples = default_min_samples(len(fmnist_labels), 500)
    assert min_samples == 40
    parts = partition_labels(fmnist_labels, "dir", 500, seed=0, alpha=0.1, min_samples=min_samples)
    _assert_valid_partition(parts, 70000, 500)
    assert min(len(p) for p in parts) >= min_samples
    skew = [len(np.unique(fmnist_labels[p])) for p in parts]
    assert np.median(skew) < 10, "Dir(0.1) stays non-IID after the repair"


def test_exdir_500_clients_terminates(fmnist_labels: np.ndarray) -> None:
    parts = partition_labels(
        fmnist_labels, "exdir", 500, seed=0, classes_per_client=2, alpha=0.1, min_samples=40
    )
    _assert_valid_partition(parts, 70000, 500)
    assert min(len(p) for p in parts) >= 40
    assert all(len(np.unique(fmnist_labels[p])) <= 2 for p in parts)


@pytest.mark.parametrize(
    ("scenario", "params", "field"),
    [
        ("pat", {"classes_per_client": 11}, "classes_per_client"),
        ("pat", {"classes_per_client": 0}, "classes_per_client"),
        ("exdir", {"classes_per_client": 11}, "classes_per_client"),
        ("dir", {"alpha": 0.0}, "alpha"),
        ("exdir", {"alpha": -1.0}, "alpha"),
        ("dir", {"min_samples": 1000}, "min_samples"),
        ("iid", {"min_samples": 301}, "min_samples"),
        ("iid", {"alpha": 0.1}, "alpha"),  # a parameter the scenario does not take
    ],
)
def test_impossible_configs_name_the_field(
    labels: np.ndarray, scenario: str, params: dict, field: str
) -> None:
    with pytest.raises(DataError, match=field):
        partition_labels(labels, scenario, 10, seed=0, **params)


def test_too_few_clients_for_pathological(labels: np.ndarray) -> None:
    with pytest.raises(DataError, match="classes_per_client"):
        partition_labels(labels, "pat", 3, seed=0, classes_per_client=2)


def test_unknown_scenario_lists_choices(labels: np.ndarray) -> None:
    with pytest.raises(DataError, match="iid.*pat.*dir.*exdir"):
        partition_labels(labels, "shards", 10, seed=0)


def test_train_test_split() -> None:
    rng = numpy_rng(0, "split")
    for n in (2, 3, 4, 10, 101):
        idx = np.arange(1000, 1000 + n)
        tr, te = train_test_split(idx, 0.75, rng)
        assert len(tr) >= 1 and len(te) >= 1
        assert np.array_equal(np.sort(np.concatenate([tr, te])), idx)
    tr, te = train_test_split(np.arange(100), 0.75, rng)
    assert (len(tr), len(te)) == (75, 25)
    tr, te = train_test_split(np.array([5]), 0.75, rng)
    assert tr.tolist() == [5] and te.size == 0
    with pytest.raises(DataError, match="train_ratio"):
        train_test_split(np.arange(10), 1.0, rng)


# ----------------------------------------------------------------------------- sources


def test_unknown_source_lists_names() -> None:
    with pytest.raises(DataError) as e:
        load_source("imagenet-21k")
    for name in ("fashion_mnist", "synthetic", "digits", "cifar10"):
        assert name in str(e.value)
    assert set(list_sources()) >= {
        "fashion_mnist", "animal_mnist", "digits", "mnist", "emnist",
        "cifar10", "cifar100", "image_folder", "synthetic",
    }  # fmt: skip


def test_unknown_option_is_an_error() -> None:
    with pytest.raises(DataError, match="num_samples"):
        load_source("synthetic", bogus=1)


def test_missing_dataset_message(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("KTL_DATA_ROOT", raising=False)
    monkeypatch.setattr(idx_sources, "DEBIAN_FASHION_MNIST", tmp_path / "no-debian")
    with pytest.raises(DataError) as e:
        load_source("fmnist", root=tmp_path)
    msg = str(e.value)
    assert "fashion_mnist" in msg and str(tmp_path) in msg
    assert "apt-get install dataset-fashion-mnist" in msg
    assert "data.root" in msg and "download" in msg
    with pytest.raises(DataError, match="cifar10.*data.root"):
        load_source("cifar10")


def _write_idx(path: Path, arr: np.ndarray, gz: bool) -> None:
    header = struct.pack(">BBBB", 0, 0, 0x08, arr.ndim) + struct.pack(f">{arr.ndim}I", *arr.shape)
    data = header + arr.astype(np.uint8).tobytes()
    if gz:
        path = path.with_name(path.name + ".gz")
        path.write_bytes(gzip.compress(data))
    else:
        path.write_bytes(data)


@pytest.mark.parametrize("layout", ["torchvision", "flat"])
def test_idx_files_from_root(tmp_path: Path, layout: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("KTL_DATA_ROOT", raising=False)
    folder = tmp_path / "FashionMNIST" / "raw" if layout == "torchvision" else tmp_path
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    tx, vx = rng.integers(0, 256, (6, 28, 28)), rng.integers(0, 256, (4, 28, 28))
    ty, vy = np.arange(6) % 10, np.arange(4) % 10
    gz = layout == "flat"  # one layout gzipped, one not
    _write_idx(folder / "train-images-idx3-ubyte", tx, gz)
    _write_idx(folder / "train-labels-idx1-ubyte", ty, gz)
    _write_idx(folder / "t10k-images-idx3-ubyte", vx, gz)
    _write_idx(folder / "t10k-labels-idx1-ubyte", vy, gz)
    src = load_source("fashion-mnist", root=tmp_path)
    assert src.images.shape == (10, 1, 28, 28) and src.images.dtype == torch.uint8
    assert np.array_equal(src.images[:6, 0].numpy(), tx)
    assert src.labels.tolist() == ty.tolist() + vy.tolist()
    assert src.details["merged_splits"] == ["train", "test"]


def test_corrupt_idx(tmp_path: Path) -> None:
    p = tmp_path / "x-idx3-ubyte"
    _write_idx(p, np.zeros((3, 4, 4)), gz=False)
    p.write_bytes(p.read_bytes()[:-5])
    with pytest.raises(DataError, match="truncated"):
        idx_sources.read_idx(p)


def test_fashion_mnist_real() -> None:
    if not (DEBIAN_FMNIST / "train-images-idx3-ubyte.gz").is_file():
        pytest.skip("Debian dataset-fashion-mnist is not installed")
    src = load_source("fashion_mnist")
    assert len(src) == 70000 and src.num_classes == 10
    assert src.images.shape == (70000, 1, 28, 28)
    assert np.bincount(src.labels.numpy()).tolist() == [7000] * 10
    assert abs(src.images.float().mean().item() / 255 - 0.286) < 0.002
    assert src.class_names is not None and src.class_names[9] == "Ankle boot"


def test_digits_source() -> None:
    src = load_source("digits")
    assert src.images.shape == (1797, 1, 8, 8) and src.images.dtype == torch.uint8
    assert int(src.images.max()) == 255 and src.num_classes == 10


def test_animal_mnist_source() -> None:
    try:
        src = load_source("animal_mnist")
    except DataError:
        pytest.skip("animal-mnist is not installed")
    assert src.images.shape == (10000, 1, 28, 28)
    assert np.bincount(src.labels.numpy()).tolist() == [1000] * 10
    assert src.class_names is not None and src.class_names[-1] == "zebra"


def test_image_folder_source(tmp_path: Path) -> None:
    from PIL import Image

    for cls, colour in (("cat", (255, 0, 0)), ("dog", (0, 0, 255))):
        (tmp_path / cls).mkdir()
        for i in range(3):
            Image.new("RGB", (20, 10), colour).save(tmp_path / cls / f"{i}.png")
    src = load_source("image_folder", root=tmp_path, image_size=8)
    assert src.images.shape == (6, 3, 8, 8) and src.class_names == ["cat", "dog"]
    assert src.labels.tolist() == [0, 0, 0, 1, 1, 1]
    assert int(src.images[0, 0, 0, 0]) == 255 and int(src.images[3, 2, 0, 0]) == 255
    grey = load_source("image_folder", root=tmp_path, image_size=8, channels=1)
    assert grey.images.shape == (6, 1, 8, 8)


def test_synthetic_deterministic_and_learnable() -> None:
    a = load_source("synthetic", num_samples=1000, image_size=16, channels=3, seed=1)
    b = load_source("synthetic", num_samples=1000, image_size=16, channels=3, seed=1)
    c = load_source("synthetic", num_samples=1000, image_size=16, channels=3, seed=2)
    assert torch.equal(a.images, b.images) and torch.equal(a.labels, b.labels)
    assert not torch.equal(a.images, c.images)
    x = normalize(a.images, a.mean, a.std).flatten(1)
    y = a.labels
    # nearest class mean, fitted on 800 and tested on 200: far above the 10% of chance
    means = torch.stack([x[:800][y[:800] == k].mean(0) for k in range(10)])
    pred = torch.cdist(x[800:], means).argmin(1)
    assert (pred == y[800:]).float().mean().item() > 0.8


def test_normalize_range() -> None:
    x = torch.tensor([0, 255, 51], dtype=torch.uint8).view(1, 1, 1, 3)
    out = normalize(x, (0.5,), (0.5,))
    assert out.dtype == torch.float32
    assert torch.allclose(out.flatten(), torch.tensor([-1.0, 1.0, -0.6]))


# ----------------------------------------------------------------------------- federated dataset


def test_dataspec_validation() -> None:
    for bad, field in [
        ({"num_clients": 0}, "num_clients"),
        ({"train_ratio": 1.0}, "train_ratio"),
        ({"alpha": 0}, "alpha"),
        ({"partition": "shards"}, "partition"),
        ({"classes_per_client": 0}, "classes_per_client"),
        ({"typo_field": 1}, "typo_field"),
    ]:
        with pytest.raises(ValidationError, match=field):
            DataSpec(**bad)
    assert DataSpec(partition="Dirichlet").partition == "dir"


def test_federated_dataset_manifest(small_ds: FederatedDataset, small_spec: DataSpec) -> None:
    ds = small_ds
    assert ds.num_clients == 6 and ds.num_classes == 5 and ds.input_shape == (1, 12, 12)
    assert ds.total_train + ds.total_test == 600
    m = ds.manifest
    assert m["scenario"] == "dir" and m["seed"] == 3 and m["parameters"]["alpha"] == 0.5
    assert m["parameters"]["min_samples"] == default_min_samples(600, 6)
    assert m["normalization"]["mean"] == [0.5] and m["class_names"][0] == "blob0"
    json.dumps(m)  # the manifest is JSON-able
    for i, c in enumerate(ds.clients):
        assert c.train_x.dtype == torch.float32 and c.train_y.dtype == torch.int64
        assert c.train_x.is_contiguous() and c.test_x.is_contiguous()
        assert c.num_test >= 1 and c.num_train >= 1
        entry = m["clients"][i]
        assert entry["train_label_counts"] == np.bincount(c.train_y, minlength=5).tolist()
        assert entry["test_label_counts"] == np.bincount(c.test_y, minlength=5).tolist()
        assert entry["train_samples"] == c.num_train
    assert ds.label_counts("all").sum() == 600
    assert np.array_equal(
        ds.label_counts("train") + ds.label_counts("test"), ds.label_counts("all")
    )
    # the split indices point at the source rows the tensors came from
    src = load_source("synthetic", **small_spec.source_options)
    c0 = ds.client(0)
    assert torch.equal(src.labels[c0.train_indices], c0.train_y)
    assert torch.equal(normalize(src.images[c0.test_indices], src.mean, src.std), c0.test_x)
    again = build_federated_dataset(small_spec, seed=3)
    assert all(
        torch.equal(a.train_x, b.train_x) for a, b in zip(ds.clients, again.clients, strict=True)
    )


def _assert_same(a: FederatedDataset, b: FederatedDataset) -> None:
    assert a.num_clients == b.num_clients and a.input_shape == b.input_shape
    assert a.num_classes == b.num_classes
    for x, y in zip(a.clients, b.clients, strict=True):
        for name in ("train_x", "train_y", "test_x", "test_y", "train_indices", "test_indices"):
            tx, ty = getattr(x, name), getattr(y, name)
            assert tx.dtype == ty.dtype and torch.equal(tx, ty), name


def test_save_load_round_trip(small_ds: FederatedDataset, tmp_path: Path) -> None:
    out = small_ds.save(tmp_path / "fed")
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["storage"]["images"] == "uint8"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["fed"], "no temporary folders left"
    loaded = FederatedDataset.load(out)
    _assert_same(small_ds, loaded)
    assert loaded.manifest["clients"] == small_ds.manifest["clients"]
    with pytest.raises(FileExistsError):
        small_ds.save(out)
    small_ds.save(out, overwrite=True)
    _assert_same(small_ds, FederatedDataset.load(out))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["fed"]


def test_save_float_images_round_trip(small_ds: FederatedDataset, tmp_path: Path) -> None:
    # floats that are not a normalised uint8 image are stored as float32
    c = small_ds.client(0)
    shifted = FederatedDataset(
        [type(c)(c.train_x + 1e-3, c.train_y, c.test_x, c.test_y, c.train_indices, c.test_indices)],
        small_ds.num_classes,
        small_ds.input_shape,
        dict(small_ds.manifest, num_clients=1, clients=small_ds.manifest["clients"][:1]),
    )
    out = shifted.save(tmp_path / "f")
    assert json.loads((out / "manifest.json").read_text())["storage"]["images"] == "float32"
    _assert_same(shifted, FederatedDataset.load(out))


def test_load_errors(small_ds: FederatedDataset, tmp_path: Path) -> None:
    with pytest.raises(DataError, match="does not exist"):
        FederatedDataset.load(tmp_path / "nothing")
    out = small_ds.save(tmp_path / "fed")
    tensors = out / "clients.safetensors"
    tensors.write_bytes(tensors.read_bytes()[:100])
    with pytest.raises(DataError, match="corrupt"):
        FederatedDataset.load(out)
    (out / "manifest.json").write_text("{not json")
    with pytest.raises(DataError, match="corrupt"):
        FederatedDataset.load(out)
    (out / "manifest.json").unlink()
    with pytest.raises(DataError, match="manifest.json is missing"):
        FederatedDataset.load(out)


def test_build_pathological_and_iid(small_spec: DataSpec) -> None:
    pat = build_federated_dataset(
        small_spec.model_copy(update={"partition": "pat", "classes_per_client": 2}), seed=0
    )
    assert (pat.label_counts("all") > 0).sum(axis=1).max() <= 2
    iid = build_federated_dataset(
        small_spec.model_copy(update={"partition": "iid", "balance": True}), seed=0
    )
    sizes = [c.num_train + c.num_test for c in iid.clients]
    assert max(sizes) - min(sizes) <= 1
    assert "alpha" not in iid.manifest["parameters"]


def test_client_table(small_ds: FederatedDataset) -> None:
    table = client_table(small_ds)
    assert table.row_count == small_ds.num_clients
    console = Console(width=200, record=True)
    console.print(table)
    text = console.export_text()
    counts = small_ds.label_counts("all")[0]
    first = " ".join(f"{k}:{n}" for k, n in enumerate(counts) if n)
    assert first in text
    assert client_table(small_ds, max_rows=2).row_count == 2
