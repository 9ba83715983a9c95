"""Heterogeneous model groups (HtFLlib's `-m` lists): client i gets entry i mod len(group).

An entry is an architecture string (`fl_core.models.registry`): a registered model, or a model
with another classifier head, "<model>+head_<hidden widths>".

Heterogeneous-classifier (HtC) groups give clients different heads on one feature size:
HtFLlib's HtFE-img-8-HtC-img-4 (the HtFE-img-8 extractors) and Res34-HtC-img-4 (ResNet-34 only),
each with the heads `Head(hidden_dims=...)` [512], [512, 512], [512, 256], [512, 128], i.e.
"head", "head_512", "head_256", "head_128" here. HtFLlib gives client i extractor i mod 8 (or 1)
and head i mod 4 from two lists; here a group is one list of lcm(8, 4) = 8 (or 4) "body+head"
entries, which gives every client the same pair.

HtFE-img-cpu-4 is ours, not HtFLlib's: HtFE-img-4 with its two costliest members replaced by
cheap ones of other families, ("cnn4", "googlenet", "mlp", "resnet4") (plain CNN, Inception, MLP,
ResNet), so that a 20-client Fashion-MNIST round trains on two CPU cores (about 3x the cost of a
cnn4 round, against about 17x for HtFE-img-4; throughputs in benchmarks/reproduce_htfl.py).

Differences from HtFLlib's HtC groups:
- HtFLlib's `Head` puts a ReLU after the logits too. Here the heads end in the logit Linear (a
  classifier's logits are not clamped at 0, which would leave a class with a negative
  pre-activation at logit 0 without a gradient through it). The groups "<name>-ReLU"
  (HtFE-img-8-HtC-img-4-ReLU, Res34-HtC-img-4-ReLU) have the final ReLU, to reproduce HtFLlib.
- HtFLlib also names a `global_model` (FedAvgCNN) for these groups, the shared model of FML,
  FedKD and FedMRL; `group_global_model` returns it ("cnn4"), None for the other groups.
"""

from __future__ import annotations

import math

from fl_core.models.registry import ARCH_HEAD_SEPARATOR, ModelError, canonical_arch, list_models

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
    # ours: cheap members of four families, cnn4 first (client 0, as in HtFE-img-4/8)
    "HtFE-img-cpu-4": ("cnn4", "googlenet", "mlp", "resnet4"),
}

HTC_IMG_4_HEADS = ("head", "head_512", "head_256", "head_128")
"""HtFLlib's four heterogeneous heads, `Head(hidden_dims=[512] | [512, 512] | [512, 256] |
[512, 128])`: hidden widths after the (512-d) features."""


def with_heads(bodies: tuple[str, ...], heads: tuple[str, ...]) -> tuple[str, ...]:
    """Entries "body+head" giving client i body i mod len(bodies) and head i mod len(heads), as
    HtFLlib's separate `models` and `heads` lists do: lcm(len(bodies), len(heads)) entries."""
    n = math.lcm(len(bodies), len(heads))
    return tuple(f"{bodies[i % len(bodies)]}+{heads[i % len(heads)]}" for i in range(n))


_HTC_GROUPS = {
    "HtFE-img-8-HtC-img-4": with_heads(_HTFE_IMG_8, HTC_IMG_4_HEADS),
    "Res34-HtC-img-4": with_heads(("resnet34",), HTC_IMG_4_HEADS),
}
for _name, _archs in _HTC_GROUPS.items():
    _CANONICAL_GROUPS[_name] = _archs
    # HtFLlib's heads exactly: a ReLU after the logits as well.
    _CANONICAL_GROUPS[f"{_name}-ReLU"] = tuple(f"{a}_relu" for a in _archs)

_GLOBAL_MODELS: dict[str, str] = {
    name: "cnn4" for base in _HTC_GROUPS for name in (base, f"{base}-ReLU")
}
"""HtFLlib's `global_model` (FedAvgCNN) of the HtC groups."""

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

    Every entry must be an architecture: a registered model, or "<model>+<head spec>" (e.g.
    "resnet18+head_256"); the name must not collide with a model or group.
    """
    if isinstance(architectures, str) or not architectures:
        raise ModelError(f"model group {name!r} needs a non-empty list of architectures")
    archs = []
    for arch in architectures:
        try:
            archs.append(canonical_arch(arch))
        except ModelError as e:
            raise ModelError(f"model group {name!r}: {e}") from None
    archs = tuple(archs)
    models = list_models()
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


def group_global_model(name: str) -> str | None:
    """HtFLlib's `global_model` of group `name` (the shared model of FML, FedKD, FedMRL): "cnn4"
    for the HtC groups; None for the others (HtFLlib then uses client 0's architecture)."""
    return _GLOBAL_MODELS.get(_BY_LOWER[name.lower()]) if is_group(name) else None


def model_for_client(group_or_model_name: str, client_id: int) -> str:
    """The architecture of client `client_id`: entry (client_id mod len(group)) of a group, or
    the architecture itself (in its canonical spelling) when one is given, e.g. "resnet8" or
    "resnet8+head_256"."""
    if isinstance(client_id, bool) or not isinstance(client_id, int) or client_id < 0:
        raise ModelError(f"client_id must be a non-negative integer, got {client_id!r}")
    if is_group(group_or_model_name):
        group = get_group(group_or_model_name)
        return group[client_id % len(group)]
    try:
        return canonical_arch(group_or_model_name)
    except ModelError as e:
        if isinstance(group_or_model_name, str) and ARCH_HEAD_SEPARATOR in group_or_model_name:
            raise  # a "<model>+<head>" string: its error names the part that is wrong
        raise ModelError(
            f"{group_or_model_name!r} is neither a model group nor a model; "
            f"groups: {', '.join(MODEL_GROUPS)}; models: {', '.join(list_models())}"
        ) from e
