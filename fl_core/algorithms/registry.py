"""Algorithms registered by name; third-party packages register theirs the same way."""

from __future__ import annotations

from .base import Algorithm, Client, HParams, Server

_ALGORITHMS: dict[str, Algorithm] = {}


class AlgorithmError(ValueError):
    """Unknown algorithm or invalid hyperparameters."""


def register_algorithm(
    name: str,
    client_cls: type[Client],
    server_cls: type[Server],
    hparams_cls: type[HParams],
    description: str,
) -> Algorithm:
    key = name.lower()
    if key in _ALGORITHMS and _ALGORITHMS[key].client_cls is not client_cls:
        raise AlgorithmError(f"algorithm {name!r} is already registered")
    algo = Algorithm(key, client_cls, server_cls, hparams_cls, description)
    _ALGORITHMS[key] = algo
    return algo


def _load_builtin() -> None:
    from . import fedavg, fedprox, local  # noqa: F401  (registration side effects)


def get_algorithm(name: str) -> Algorithm:
    _load_builtin()
    key = str(name).lower()
    if key not in _ALGORITHMS:
        raise AlgorithmError(
            f"unknown algorithm {name!r} (field algorithm.name); valid choices: "
            f"{', '.join(sorted(_ALGORITHMS))}"
        )
    return _ALGORITHMS[key]


def list_algorithms() -> dict[str, str]:
    _load_builtin()
    return {k: a.description for k, a in sorted(_ALGORITHMS.items())}
