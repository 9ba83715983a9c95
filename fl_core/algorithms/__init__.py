"""FL algorithms: a Client/Server pair plus typed hyperparameters each, registered by name.

Importing this package registers every built-in algorithm; plug-ins come through the
``fl_core.algorithms`` entry-point group (see `registry`).
"""

from .base import (
    FAMILIES,
    Algorithm,
    Client,
    ClientContext,
    EvalReport,
    HParams,
    Message,
    Reply,
    Server,
    ServerContext,
    TrainResult,
)
from .parts import PartError, Select, is_batchnorm, tensor_nbytes
from .registry import (
    ENTRY_POINT_GROUP,
    AlgorithmError,
    get_algorithm,
    list_algorithms,
    register_algorithm,
    registered_algorithms,
)

__all__ = [
    "ENTRY_POINT_GROUP",
    "FAMILIES",
    "Algorithm",
    "AlgorithmError",
    "Client",
    "ClientContext",
    "EvalReport",
    "HParams",
    "Message",
    "PartError",
    "Reply",
    "Select",
    "Server",
    "ServerContext",
    "TrainResult",
    "get_algorithm",
    "is_batchnorm",
    "list_algorithms",
    "register_algorithm",
    "registered_algorithms",
    "tensor_nbytes",
]


def _import_builtin_algorithms() -> None:
    """Import every module of this package: each algorithm module registers itself, so adding
    an algorithm is adding its file."""
    import importlib
    import pkgutil

    for info in sorted(pkgutil.iter_modules(__path__), key=lambda m: m.name):
        importlib.import_module(f"{__name__}.{info.name}")


_import_builtin_algorithms()
