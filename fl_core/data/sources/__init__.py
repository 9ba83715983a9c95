"""Image sources: whole labelled datasets loaded into memory as tensors, found by name.

Every source returns an :class:`ImageSource` holding all images (original train and test splits
merged, as PFLlib does, so the federated split is made by us) with contiguous integer labels.
Images are kept as stored (usually uint8); :func:`normalize` turns them into float32 once.

Modules: ``base`` (ImageSource, DataError, normalize, helpers for loaders), ``registry``
(register, list and load sources by name), and one module per family of loaders: ``idx``
(Fashion-MNIST, MNIST), ``torchvision_sets`` (EMNIST, CIFAR), ``packaged`` (Animal-MNIST,
scikit-learn digits), ``image_folder`` and ``synthetic``. Importing this package registers them
all.
"""

from fl_core.data.sources import (  # noqa: F401  (importing a loader module registers it)
    image_folder,
    packaged,
    synthetic,
    torchvision_sets,
)
from fl_core.data.sources.base import DataError, ImageSource, default_data_root, normalize
from fl_core.data.sources.idx import DEBIAN_FASHION_MNIST, read_idx
from fl_core.data.sources.registry import (
    _REGISTRY as _REGISTRY,  # the loaders by canonical name; `ktl list datasets` reads their docs
)
from fl_core.data.sources.registry import list_sources, load_source, register_source

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
