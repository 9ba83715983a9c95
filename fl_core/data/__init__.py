"""Data layer: image sources, label partitioners and the in-memory federated dataset."""

from fl_core.data.federated import ClientData, DataSpec, FederatedDataset, build_federated_dataset
from fl_core.data.partition import (
    SCENARIOS,
    default_min_samples,
    dirichlet_partition,
    extended_dirichlet_partition,
    iid_partition,
    partition_labels,
    pathological_partition,
    resolve_scenario,
    train_test_split,
)
from fl_core.data.report import client_table, format_label_counts
from fl_core.data.sources import (
    DataError,
    ImageSource,
    default_data_root,
    list_sources,
    load_source,
    normalize,
    register_source,
)

__all__ = [
    "SCENARIOS",
    "ClientData",
    "DataError",
    "DataSpec",
    "FederatedDataset",
    "ImageSource",
    "build_federated_dataset",
    "client_table",
    "default_data_root",
    "default_min_samples",
    "dirichlet_partition",
    "extended_dirichlet_partition",
    "format_label_counts",
    "iid_partition",
    "list_sources",
    "load_source",
    "normalize",
    "partition_labels",
    "pathological_partition",
    "register_source",
    "resolve_scenario",
    "train_test_split",
]
