"""Heterogeneous model groups (HtFLlib's `-m` lists): client i gets entry i mod len(group)."""

from __future__ import annotations

from fl_core.models.registry import ModelError, list_models

_HTFE_IMG_8 = (
    "cnn4",
    "googlenet",
    "mobilenet_v2",
    "resnet18",
    "resnet34",
    "resnet50",
    "resnet101",
    "resnet152",
)

_CANONICAL_GROUPS: dict[str, tuple[str, ...]] = {
    "HtFE-img-2": ("cnn4", "resnet18"),
    "HtFE-img-3": ("resnet10", "resnet18", "resnet34"),
    "HtFE-img-4": ("cnn4", "googlenet", "mobilenet_v2", "resnet18"),
    "HtFE-img-5": ("googlenet", "mobilenet_v2", "resnet18", "resnet34", "resnet50"),
    "HtFE-img-8": _HTFE_IMG_8,
    "HtFE-img-9": (
        "resnet4",
        "resnet6",
        "resnet8",
        "resnet10",
        "resnet18",
        "resnet34",
        "resnet50",
        "resnet101",
        "resnet152",
    ),
    "HtM-img-10": (*_HTFE_IMG_8, "vit_b_16", "vit_b_32"),
}

GROUP_ALIASES: dict[str, str] = {
    "HtFE2": "HtFE-img-2",
    "HtFE3": "HtFE-img-3",
    "HtFE4": "HtFE-img-4",
    "HtFE8": "HtFE-img-8",
    "HtFE9": "HtFE-img-9",
    "HtM10": "HtM-img-10",
}
"""Older names used by the FedKTL and FedTGP repositories for the same lists."""

MODEL_GROUPS: dict[str, tuple[str, ...]] = {
    **_CANONICAL_GROUPS,
    **{alias: _CANONICAL_GROUPS[name] for alias, name in GROUP_ALIASES.items()},
}
"""Every group name (canonical and alias) -> its architectures, in client order."""

_BY_LOWER = {name.lower(): name for name in MODEL_GROUPS}


def list_groups() -> dict[str, tuple[str, ...]]:
    """The canonical groups and their architectures (aliases are in `GROUP_ALIASES`)."""
    return dict(_CANONICAL_GROUPS)


def register_group(name: str, architectures: tuple[str, ...] | list[str]) -> None:
    """Add a model group (client i gets entry i mod its length), e.g. for a custom experiment.

    Every entry must be a registered model; the name must not collide with a model or group.
    """
    archs = tuple(str(a).lower() for a in architectures)
    if not archs:
        raise ModelError(f"model group {name!r} needs at least one architecture")
    models = list_models()
    unknown = [a for a in archs if a not in models]
    if unknown:
        raise ModelError(
            f"model group {name!r}: unknown model(s) {unknown}; valid: {', '.join(models)}"
        )
    if name.lower() in _BY_LOWER or name.lower() in models:
        raise ModelError(f"{name!r} is already a model or model group")
    _CANONICAL_GROUPS[name] = archs
    MODEL_GROUPS[name] = archs
    _BY_LOWER[name.lower()] = name


def is_group(name: str) -> bool:
    return isinstance(name, str) and name.lower() in _BY_LOWER


def get_group(name: str) -> tuple[str, ...]:
    """The architectures of group `name` (case-insensitive; aliases accepted)."""
    if not is_group(name):
        raise ModelError(f"unknown model group {name!r}; valid groups: {', '.join(MODEL_GROUPS)}")
    return MODEL_GROUPS[_BY_LOWER[name.lower()]]


def model_for_client(group_or_model_name: str, client_id: int) -> str:
    """The architecture of client `client_id`: entry (client_id mod len(group)) of a group, or
    the model itself when a plain registered model name is given."""
    if isinstance(client_id, bool) or not isinstance(client_id, int) or client_id < 0:
        raise ModelError(f"client_id must be a non-negative integer, got {client_id!r}")
    if is_group(group_or_model_name):
        group = get_group(group_or_model_name)
        return group[client_id % len(group)]
    models = list_models()
    if isinstance(group_or_model_name, str) and group_or_model_name.lower() in models:
        return group_or_model_name.lower()
    raise ModelError(
        f"{group_or_model_name!r} is neither a model group nor a model; "
        f"groups: {', '.join(MODEL_GROUPS)}; models: {', '.join(models)}"
    )
