"""The registry of image sources: loaders register under a name (and aliases) and
:func:`load_source` finds them by that name."""

from __future__ import annotations

import inspect
from collections.abc import Callable
from pathlib import Path
from typing import Any

from fl_core.data.sources.base import DataError, ImageSource

Loader = Callable[..., ImageSource]
_REGISTRY: dict[str, Loader] = {}
_ALIASES: dict[str, str] = {}


def _canon(name: str) -> str:
    return name.strip().lower().replace("-", "_")


def register_source(name: str, *aliases: str) -> Callable[[Loader], Loader]:
    """Register ``fn(root, download, **options) -> ImageSource`` under a name (and aliases)."""

    def deco(fn: Loader) -> Loader:
        _REGISTRY[_canon(name)] = fn
        for a in aliases:
            _ALIASES[_canon(a)] = _canon(name)
        return fn

    return deco


def list_sources() -> list[str]:
    """Canonical names of every registered source."""
    return sorted(_REGISTRY)


def load_source(
    name: str, root: str | Path | None = None, download: bool = False, **options: Any
) -> ImageSource:
    """Load a registered source by name; options are the loader's keyword arguments."""
    key = _canon(name)
    key = _ALIASES.get(key, key)
    if key not in _REGISTRY:
        aliases = ", ".join(f"{a}->{c}" for a, c in sorted(_ALIASES.items()))
        raise DataError(
            f"unknown dataset {name!r}; valid names: {', '.join(list_sources())} "
            f"(aliases: {aliases})"
        )
    fn = _REGISTRY[key]
    accepted = [p for p in inspect.signature(fn).parameters if p not in ("root", "download")]
    unknown = sorted(set(options) - set(accepted))
    if unknown:
        raise DataError(
            f"dataset {key!r} does not take option(s) {', '.join(unknown)}; "
            f"accepted options: {', '.join(accepted) or 'none'}"
        )
    return fn(
        root=Path(root).expanduser() if root is not None else None, download=download, **options
    )
