"""Model registry: `build_model(name, input_shape, num_classes, feature_dim)` -> `SplitModel`.

Every model exposes `body` (input -> (n, feature_dim) features) and `head` (features -> logits).
Importing this package registers all built-in architectures; `list_models()` lists them and
`MODEL_GROUPS` holds the heterogeneous groups (HtFE-img-2 ... HtM-img-10).
"""

from fl_core.models import cnn, mobilenet, resnet, torchvision_models  # noqa: F401  (registers)
from fl_core.models.groups import (
    GROUP_ALIASES,
    MODEL_GROUPS,
    get_group,
    is_group,
    list_groups,
    model_for_client,
    register_group,
)
from fl_core.models.registry import (
    DEFAULT_FEATURE_DIM,
    FeaturePool,
    ModelError,
    SplitModel,
    build_model,
    feature_aligner,
    get_model_spec,
    list_models,
    register_model,
)

__all__ = [
    "DEFAULT_FEATURE_DIM",
    "GROUP_ALIASES",
    "MODEL_GROUPS",
    "FeaturePool",
    "ModelError",
    "SplitModel",
    "build_model",
    "feature_aligner",
    "get_group",
    "get_model_spec",
    "is_group",
    "list_groups",
    "register_group",
    "list_models",
    "model_for_client",
    "register_model",
]
