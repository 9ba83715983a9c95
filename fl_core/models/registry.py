"""The model registry: build any registered architecture by name, split into body and head.

Every model is a `SplitModel`: `body` maps an image batch to flat features of size
`feature_dim`, `head` maps those features to logits. pFL/HtFL algorithms address the two parts
as named submodules (`model.body`, `model.head`); nothing here or there finds a layer by guessing
its attribute name.

An *architecture* string names what `build_model` builds: a registered model ("resnet34"), or a
registered model with another classifier head, "<model>+<head>" ("resnet34+head_256"). The head
spec is `head`, then the widths of its hidden layers, then optionally `_relu`:

- "head": Linear(feature_dim, K), the same head (and state-dict keys) as most models' default;
- "head_256": Linear(feature_dim, 256), ReLU, Linear(256, K); "head_512_128" has two hidden
  layers;
- "..._relu": a ReLU after the logits as well, as HtFLlib's `Head` has (see `HeadSpec`).

HtFLlib's `Head(hidden_dims=[512, 256])` is "head_256" here: the first entry of its list is the
feature size (it must equal feature_dim), so it is left out and a spec works for any feature_dim.
The body is the registered model's body, untouched; only the head is replaced, so `body`/`head`
stay the split that algorithms exchange. Heterogeneous-classifier (HtC) groups are lists of such
strings (`fl_core.models.groups`).
"""

from __future__ import annotations

import inspect
import numbers
import re
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import torch
import torch.nn.functional as F
from torch import nn

DEFAULT_FEATURE_DIM = 512
FEATURE_ALIGN_MODES = ("pool", "linear")

InputShape = tuple[int, int, int]


class ModelError(ValueError):
    """Bad input to the model registry: an unknown name, an unusable shape or option."""


class SplitModel(nn.Module):
    """A classifier split into `body` (input -> (n, feature_dim)) and `head` (features -> logits).

    `body` and `head` are the only child modules, so their parameters partition
    `model.parameters()` and `model.body.state_dict()` / `model.head.state_dict()` are the
    shared/personal pieces that algorithms exchange.
    """

    def __init__(
        self,
        body: nn.Module,
        feature_dim: int,
        num_classes: int,
        head: nn.Module | None = None,
        arch: str = "custom",
        input_shape: InputShape | None = None,
        head_spec: HeadSpec | None = None,
    ) -> None:
        super().__init__()
        self.feature_dim = int(feature_dim)
        self.num_classes = int(num_classes)
        self.arch = arch
        self.input_shape = input_shape
        self.head_spec = head_spec
        self.body = body
        self.head = head if head is not None else self.make_head(self.feature_dim, self.num_classes)

    def make_head(self, feature_dim: int, num_classes: int) -> nn.Module:
        """A fresh head for this architecture (its `head_spec` if it has one); `reset_head` calls
        it too."""
        if self.head_spec is not None:
            return self.head_spec.build(feature_dim, num_classes)
        return nn.Linear(feature_dim, num_classes)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)

    def forward_head(self, features: torch.Tensor) -> torch.Tensor:
        return self.head(features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x))

    def reset_head(self, num_classes: int) -> None:
        """Replace the head by a freshly initialised one with `num_classes` outputs."""
        num_classes = _check_positive_int("num_classes", num_classes)
        old = next(self.head.parameters(), None)
        head = self.make_head(self.feature_dim, num_classes)
        if old is not None:
            head = head.to(device=old.device, dtype=old.dtype)
        self.head = head
        self.num_classes = num_classes

    def extra_repr(self) -> str:
        return f"arch={self.arch!r}, feature_dim={self.feature_dim}, num_classes={self.num_classes}"


@dataclass(frozen=True)
class HeadSpec:
    """A classifier head: Linear layers from features to logits with a ReLU after each hidden one.

    hidden: the hidden layers' widths, from the features to the logits; () is one Linear layer.
    final_relu: also a ReLU after the logits. HtFLlib's `Head` has one (it appends a ReLU after
    every Linear, the last included), which clamps logits at 0: a class whose pre-activation is
    negative gets logit 0 and no gradient through it. Off by default, as a classifier's logits
    are unconstrained; on (the "_relu" suffix) to reproduce HtFLlib.
    """

    hidden: tuple[int, ...] = ()
    final_relu: bool = False

    def __post_init__(self) -> None:
        widths = tuple(self.hidden) if isinstance(self.hidden, (tuple, list)) else None
        if widths is None or not all(_is_positive_int(w) for w in widths):
            raise ModelError(f"head hidden widths must be positive integers, got {self.hidden!r}")
        object.__setattr__(self, "hidden", tuple(int(w) for w in widths))
        object.__setattr__(self, "final_relu", bool(self.final_relu))

    @property
    def name(self) -> str:
        """The spec as written in an architecture string: "head_512_128", "head_relu"."""
        widths = "".join(f"_{w}" for w in self.hidden)
        return f"head{widths}{'_relu' if self.final_relu else ''}"

    @classmethod
    def parse(cls, text: str) -> HeadSpec:
        """A spec from its name: "head", "head_256", "head_512_128", "head_256_relu"."""
        match = _HEAD_RE.match(text.strip().lower()) if isinstance(text, str) else None
        if match is None:
            raise ModelError(
                f"a head spec is 'head', then optional hidden widths, then optional '_relu' "
                f"(e.g. 'head', 'head_256', 'head_512_128', 'head_256_relu'); got {text!r}"
            )
        widths = tuple(int(w) for w in (match.group("hidden") or "").split("_") if w)
        return cls(widths, final_relu=match.group("relu") is not None)

    def build(self, feature_dim: int, num_classes: int) -> nn.Module:
        """The head module. Without hidden layers or final ReLU it is a bare `nn.Linear`, the
        same module (and state-dict keys) as the default head."""
        if not self.hidden and not self.final_relu:
            return nn.Linear(feature_dim, num_classes)
        layers: list[tuple[str, nn.Module]] = []
        width = feature_dim
        for i, size in enumerate(self.hidden, start=1):
            layers += [(f"fc{i}", nn.Linear(width, size)), (f"relu{i}", nn.ReLU())]
            width = size
        layers.append(("logits", nn.Linear(width, num_classes)))
        if self.final_relu:
            layers.append(("logits_relu", nn.ReLU()))
        return nn.Sequential(OrderedDict(layers))

    def num_parameters(self, feature_dim: int, num_classes: int) -> int:
        """Weights and biases of the head: sum over its Linear layers of (in + 1) * out."""
        sizes = [feature_dim, *self.hidden, num_classes]
        return sum((a + 1) * b for a, b in zip(sizes, sizes[1:], strict=False))


_HEAD_RE = re.compile(r"^head(?P<hidden>(?:_[0-9]+)*)(?P<relu>_relu)?$")
ARCH_HEAD_SEPARATOR = "+"


class FeaturePool(nn.Module):
    """(n, in_dim) -> (n, out_dim) by 1-D adaptive average pooling over the feature axis.

    This is HtFLlib's rule for giving heterogeneous backbones one feature size: wider features
    are averaged down (2048 -> 512), narrower ones are stretched by repeating values (64 -> 512).
    It has no parameters, so parameter counts match HtFLlib's.
    """

    def __init__(self, in_dim: int, out_dim: int) -> None:
        super().__init__()
        self.in_dim = in_dim
        self.out_dim = out_dim

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.adaptive_avg_pool1d(x.unsqueeze(1), self.out_dim).squeeze(1)

    def extra_repr(self) -> str:
        return f"in_dim={self.in_dim}, out_dim={self.out_dim}"


def feature_aligner(in_dim: int, out_dim: int, mode: str = "pool") -> nn.Module:
    """The layer that maps a backbone's native feature size to `feature_dim`.

    mode "pool" (default, as HtFLlib): parameter-free `FeaturePool`; "linear": a learned
    `nn.Linear(in_dim, out_dim)`. Identity when the sizes already agree.
    """
    if mode not in FEATURE_ALIGN_MODES:
        raise ModelError(f"feature_align must be one of {list(FEATURE_ALIGN_MODES)}, got {mode!r}")
    if in_dim == out_dim:
        return nn.Identity()
    if mode == "linear":
        return nn.Linear(in_dim, out_dim)
    return FeaturePool(in_dim, out_dim)


def aligned_body(
    backbone: nn.Module, native_dim: int, feature_dim: int, mode: str = "pool"
) -> nn.Sequential:
    """`backbone` ((n, native_dim) features) followed by the aligner to `feature_dim`."""
    return nn.Sequential(
        OrderedDict(
            [("backbone", backbone), ("align", feature_aligner(native_dim, feature_dim, mode))]
        )
    )


def use_small_stem(input_shape: InputShape, stem: str) -> bool:
    """Whether a CNN should use its small-input stem (3x3, stride 1, no max-pool).

    stem "auto" picks it for inputs of at most 64 px, "small" / "imagenet" force a choice.
    """
    if stem == "auto":
        return max(input_shape[1], input_shape[2]) <= 64
    if stem in ("small", "imagenet"):
        return stem == "small"
    raise ModelError(f"stem must be one of ['auto', 'small', 'imagenet'], got {stem!r}")


class ModelBuilder(Protocol):
    def __call__(
        self, input_shape: InputShape, num_classes: int, feature_dim: int, **options: Any
    ) -> SplitModel: ...


@dataclass(frozen=True)
class ModelSpec:
    name: str
    description: str
    builder: ModelBuilder
    min_input_size: int
    options: tuple[str, ...]


_REGISTRY: dict[str, ModelSpec] = {}
_NAME_RE = re.compile(r"^[a-z][a-z0-9_]*$")
_BUILDER_ARGS = ("input_shape", "num_classes", "feature_dim")


def register_model(
    name: str, description: str, min_input_size: int = 1
) -> Callable[[ModelBuilder], ModelBuilder]:
    """Register a builder `fn(input_shape, num_classes, feature_dim, *, <options>) -> SplitModel`.

    `min_input_size` is the smallest height/width the architecture accepts; keyword-only
    parameters of the builder become the options `build_model` accepts.
    """
    if not _NAME_RE.match(name):
        raise ModelError(f"model names are lowercase identifiers ([a-z][a-z0-9_]*), got {name!r}")

    def decorator(builder: ModelBuilder) -> ModelBuilder:
        if name in _REGISTRY:
            raise ModelError(f"model {name!r} is already registered")
        params = inspect.signature(builder).parameters
        options = tuple(p for p in params if p not in _BUILDER_ARGS)
        _REGISTRY[name] = ModelSpec(name, description, builder, min_input_size, options)
        return builder

    return decorator


def list_models() -> dict[str, str]:
    """Registered model names (in registration order) and their one-line descriptions."""
    return {name: spec.description for name, spec in _REGISTRY.items()}


def get_model_spec(name: str) -> ModelSpec:
    if not isinstance(name, str) or name.lower() not in _REGISTRY:
        raise ModelError(
            f"unknown model {name!r}; valid names: {', '.join(_REGISTRY)} (optionally with a "
            f"head: '<model>+head_<hidden widths>', e.g. 'resnet34+head_256')"
        )
    return _REGISTRY[name.lower()]


def parse_arch(arch: str) -> tuple[str, HeadSpec | None]:
    """An architecture string -> (registered model name, head spec or None for its own head).

    "resnet34" -> ("resnet34", None); "ResNet34+head_256" -> ("resnet34", HeadSpec((256,))).
    """
    if not isinstance(arch, str):
        raise ModelError(f"an architecture is a string such as 'resnet34', got {arch!r}")
    model, sep, head = arch.strip().partition(ARCH_HEAD_SEPARATOR)
    spec = get_model_spec(model.strip())
    if not sep:
        return spec.name, None
    return spec.name, HeadSpec.parse(head)


def canonical_arch(arch: str) -> str:
    """The architecture string in its one spelling: "ResNet34 + Head_256" -> "resnet34+head_256"."""
    model, head = parse_arch(arch)
    return model if head is None else f"{model}{ARCH_HEAD_SEPARATOR}{head.name}"


def build_model(
    name: str,
    input_shape: Sequence[int],
    num_classes: int,
    feature_dim: int | None = None,
    **options: Any,
) -> SplitModel:
    """Build the architecture `name` for inputs of `input_shape` = (C, H, W).

    name: a registered model, or "<model>+<head spec>" (see the module docstring) for that
    model's body with another classifier head. feature_dim: size of the body's output (default
    512). options: the model's own keywords (e.g. `stem`, `feature_align`, `hidden`); see each
    builder's docstring.
    """
    model_name, head_spec = parse_arch(name)
    spec = get_model_spec(model_name)
    shape = _check_input_shape(input_shape)
    num_classes = _check_positive_int("num_classes", num_classes)
    feature_dim = _check_positive_int(
        "feature_dim", DEFAULT_FEATURE_DIM if feature_dim is None else feature_dim
    )
    if min(shape[1], shape[2]) < spec.min_input_size:
        size = spec.min_input_size
        raise ModelError(
            f"input_shape {shape} is too small for {spec.name}: it needs height and width of "
            f"at least {size} (e.g. ({shape[0]}, {size}, {size}))"
        )
    unknown = sorted(set(options) - set(spec.options))
    if unknown:
        valid = list(spec.options) or "none"
        raise ModelError(f"unknown option(s) {unknown} for {spec.name}; valid options: {valid}")
    model = spec.builder(shape, num_classes, feature_dim, **options)
    if head_spec is not None:
        # The registered model's body, with the head the spec describes (in place of its own).
        model = SplitModel(model.body, feature_dim, num_classes, head_spec=head_spec)
    model.arch = (
        spec.name if head_spec is None else f"{spec.name}{ARCH_HEAD_SEPARATOR}{head_spec.name}"
    )
    model.input_shape = shape
    return model


def _check_positive_int(field: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
        raise ModelError(f"{field} must be a positive integer, got {value!r}")
    return int(value)


def _check_input_shape(input_shape: Sequence[int]) -> InputShape:
    try:
        dims = tuple(input_shape)
    except TypeError:
        dims = ()
    if len(dims) != 3 or not all(_is_positive_int(d) for d in dims):
        raise ModelError(
            f"input_shape must be (channels, height, width) with positive integers, "
            f"e.g. (1, 28, 28) or (3, 32, 32); got {input_shape!r}"
        )
    return (int(dims[0]), int(dims[1]), int(dims[2]))


def _is_positive_int(value: Any) -> bool:
    return not isinstance(value, bool) and isinstance(value, numbers.Integral) and value >= 1
