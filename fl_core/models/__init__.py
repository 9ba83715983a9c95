"""Model registry: `build_model(name, input_shape, num_classes, feature_dim)` -> `SplitModel`.

Every model exposes `body` (input -> (n, feature_dim) features) and `head` (features -> logits).
Importing this package registers all built-in architectures; `list_models()` lists them and
`MODEL_GROUPS` holds the heterogeneous groups (HtFE-img-2 ... HtM-img-10, and the
heterogeneous-classifier groups HtFE-img-8-HtC-img-4, Res34-HtC-img-4). An architecture string is
a model name, or "<model>+<head spec>" for that model with another head ("resnet34+head_256").
"""

from fl_core.models import cnn, mobilenet, resnet, torchvision_models  # noqa: F401  (registers)
from fl_core.models.groups import (
    GROUP_ALIASES,
    HTC_IMG_4_HEADS,
    MODEL_GROUPS,
    get_group,
    group_global_model,
    is_group,
    list_groups,
    model_for_client,
    register_group,
)
from fl_core.models.registry import (
    DEFAULT_FEATURE_DIM,
    FeaturePool,
    HeadSpec,
    ModelError,
    SplitModel,
    build_model,
    canonical_arch,
    feature_aligner,
    get_model_spec,
    list_models,
    parse_arch,
    register_model,
)

__all__ = [
    "DEFAULT_FEATURE_DIM",
    "GROUP_ALIASES",
    "HTC_IMG_4_HEADS",
    "MODEL_GROUPS",
    "FeaturePool",
    "HeadSpec",
    "ModelError",
    "SplitModel",
    "build_model",
    "canonical_arch",
    "feature_aligner",
    "get_group",
    "group_global_model",
    "get_model_spec",
    "is_group",
    "list_groups",
    "register_group",
    "list_models",
    "model_for_client",
    "parse_arch",
    "register_model",
]
