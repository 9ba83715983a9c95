"""Algorithms registered by name, with metadata.

Built-in algorithms register when `fl_core.algorithms` is imported. Other packages register
theirs through the entry-point group ``fl_core.algorithms``: each entry point names a module
whose import calls `register_algorithm` (``ktl`` registers ``fedktl`` this way), so a config
that names a third-party algorithm works without importing its package first.
"""

from __future__ import annotations

from importlib.metadata import entry_points

from .base import FAMILIES, Algorithm, Client, Family, HParams, Server

ENTRY_POINT_GROUP = "fl_core.algorithms"

_ALGORITHMS: dict[str, Algorithm] = {}
_entry_points_loaded = False
_plugin_errors: dict[str, str] = {}  # entry-point name -> why it failed to load


class AlgorithmError(ValueError):
    """Unknown algorithm, invalid hyperparameters, or an algorithm that cannot run this setup."""


def register_algorithm(
    name: str,
    client_cls: type[Client],
    server_cls: type[Server],
    hparams_cls: type[HParams],
    description: str,
    *,
    family: Family,
    paper: str = "",
    heterogeneous: bool = False,
) -> Algorithm:
    """Register an algorithm under ``name`` (case-insensitive)."""
    key = name.lower()
    if family not in FAMILIES:
        raise AlgorithmError(f"family of {name!r} must be one of {list(FAMILIES)}, got {family!r}")
    if key in _ALGORITHMS and _ALGORITHMS[key].client_cls is not client_cls:
        raise AlgorithmError(f"algorithm {name!r} is already registered")
    algo = Algorithm(
        key, client_cls, server_cls, hparams_cls, description, family, paper, heterogeneous
    )
    _ALGORITHMS[key] = algo
    return algo


def load_entry_points() -> None:
    """Import every module advertised in the ``fl_core.algorithms`` entry-point group (once)."""
    global _entry_points_loaded
    if _entry_points_loaded:
        return
    _entry_points_loaded = True
    for ep in entry_points(group=ENTRY_POINT_GROUP):
        try:
            ep.load()
        except Exception as e:  # a broken plug-in must not hide the other algorithms
            _plugin_errors[ep.name] = f"{ep.value}: {type(e).__name__}: {e}"


def get_algorithm(name: str) -> Algorithm:
    key = str(name).lower()
    if key not in _ALGORITHMS:
        load_entry_points()
    if key not in _ALGORITHMS:
        broken = "".join(
            f"; the plug-in {ep!r} failed to load ({why})" for ep, why in _plugin_errors.items()
        )
        raise AlgorithmError(
            f"unknown algorithm {name!r} (field algorithm.name); valid choices: "
            f"{', '.join(sorted(_ALGORITHMS))}{broken}"
        )
    return _ALGORITHMS[key]


def registered_algorithms() -> dict[str, Algorithm]:
    """Every algorithm, built-in and plug-in, by name."""
    load_entry_points()
    return dict(sorted(_ALGORITHMS.items()))


def list_algorithms() -> dict[str, str]:
    return {k: a.description for k, a in registered_algorithms().items()}
