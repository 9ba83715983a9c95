"""Model registry: shapes, the body/head split, parameter counts, determinism, groups, errors."""

from __future__ import annotations

import pytest
import torch
import torchvision
from torch import nn

from fl_core.models import (
    GROUP_ALIASES,
    MODEL_GROUPS,
    ModelError,
    SplitModel,
    build_model,
    canonical_arch,
    get_group,
    list_groups,
    list_models,
    model_for_client,
    parse_arch,
)
from fl_core.models.cnn import cnn4_flat_dim
from fl_core.models.registry import FeaturePool, get_model_spec
from fl_core.models.torchvision_models import ViTSplitModel

# Real forward/backward passes of these are too slow for the default suite; they are checked on
# the meta device (shapes and parameter counts, no compute) by default and for real under -m slow.
LARGE_MODELS = {"resnet50", "resnet101", "resnet152", "vit_b_16", "vit_b_32"}
ALL_MODELS = list(list_models())
FAST_MODELS = [name for name in ALL_MODELS if name not in LARGE_MODELS]
SHAPES = [(1, 28, 28), (3, 32, 32)]
# (input shape, feature_dim): both inputs at the default 512, and a narrower 64 on grey 28x28.
CASES = [((1, 28, 28), 512), ((3, 32, 32), 512), ((1, 28, 28), 64)]
CASE_IDS = ["1x28x28-fd512", "3x32x32-fd512", "1x28x28-fd64"]
BATCH = 2


@pytest.fixture(autouse=True, scope="module")
def single_thread():
    """One intra-op thread: on a shared, oversubscribed CPU, OpenMP threads waiting on each other
    make these small forward passes 10-50x slower than a single thread."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def n_params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def check_split(model: SplitModel, shape: tuple[int, int, int], num_classes: int, fd: int) -> None:
    assert isinstance(model, SplitModel)
    assert model.feature_dim == fd and model.num_classes == num_classes
    assert model.input_shape == shape
    # body and head are the only children, and their parameters partition the model's.
    assert [name for name, _ in model.named_children()] == ["body", "head"]
    body_ids = {id(p) for p in model.body.parameters()}
    head_ids = {id(p) for p in model.head.parameters()}
    assert body_ids and head_ids and not body_ids & head_ids
    assert body_ids | head_ids == {id(p) for p in model.parameters()}
    assert all(k.startswith(("body.", "head.")) for k in model.state_dict())

    x = torch.randn(BATCH, *shape, device=next(model.parameters()).device)
    features = model.forward_features(x)
    assert features.shape == (BATCH, fd)  # flat features, whatever the backbone
    assert model.head(features).shape == (BATCH, num_classes)
    assert model(x).shape == (BATCH, num_classes)


@pytest.mark.parametrize(("shape", "fd"), CASES, ids=CASE_IDS)
@pytest.mark.parametrize("name", FAST_MODELS)
def test_shapes_and_split(name: str, shape: tuple[int, int, int], fd: int) -> None:
    model = build_model(name, shape, num_classes=7, feature_dim=fd)
    assert model.arch == name
    check_split(model, shape, 7, fd)
    model.eval()
    x = torch.randn(BATCH, *shape)
    with torch.no_grad():
        logits = model(x)
        assert torch.isfinite(logits).all()
        assert torch.equal(logits, model.head(model.body(x)))


@pytest.mark.parametrize(("shape", "fd"), CASES[1:], ids=CASE_IDS[1:])
@pytest.mark.parametrize("name", sorted(LARGE_MODELS))
def test_large_model_shapes_on_meta_device(name: str, shape: tuple[int, int, int], fd: int) -> None:
    with torch.device("meta"):
        model = build_model(name, shape, num_classes=7, feature_dim=fd)
        check_split(model, shape, 7, fd)


@pytest.mark.slow
@pytest.mark.parametrize("shape", SHAPES, ids=["1x28x28", "3x32x32"])
@pytest.mark.parametrize("name", sorted(LARGE_MODELS))
def test_large_model_shapes(name: str, shape: tuple[int, int, int]) -> None:
    for fd in (512, 64):
        check_split(build_model(name, shape, num_classes=7, feature_dim=fd), shape, 7, fd)


def test_default_feature_dim_is_512() -> None:
    model = build_model("resnet4", (1, 28, 28), 10)
    assert model.feature_dim == 512
    assert model.body(torch.randn(BATCH, 1, 28, 28)).shape == (BATCH, 512)


def test_cnn4_matches_fedavgcnn() -> None:
    assert cnn4_flat_dim((1, 28, 28)) == 1024
    assert cnn4_flat_dim((3, 32, 32)) == 1600
    assert n_params(build_model("cnn4", (1, 28, 28), 10)) == 582_026
    # PFLlib's Cifar100 figure: 2,432 + 51,264 + 819,712 + 51,300.
    assert n_params(build_model("cnn4", (3, 32, 32), 100)) == 924_708


def _torchvision_body_params(constructor) -> int:
    with torch.device("meta"):
        net = constructor(weights=None)
    classifier = net.classifier if hasattr(net, "classifier") else net.fc
    return n_params(net) - n_params(classifier)


@pytest.mark.parametrize(
    "name",
    [
        "resnet18",
        "resnet34",
        "resnet50",
        "mobilenet_v2",
        pytest.param("resnet101", marks=pytest.mark.slow),
        pytest.param("resnet152", marks=pytest.mark.slow),
    ],
)
def test_imagenet_stem_matches_torchvision_parameter_count(name: str) -> None:
    with torch.device("meta"):
        model = build_model(name, (3, 32, 32), 10, stem="imagenet")
    expected = _torchvision_body_params(getattr(torchvision.models, name))
    # FeaturePool has no parameters, so the body equals torchvision's network minus classifier.
    assert n_params(model.body) == expected
    assert n_params(model.head) == 512 * 10 + 10


def test_small_stem_is_default_for_small_inputs() -> None:
    with torch.device("meta"):
        small = build_model("resnet18", (3, 32, 32), 10)
        big = build_model("resnet18", (3, 96, 96), 10)
    # 7x7x3x64 stem weights replaced by 3x3x3x64.
    assert n_params(big) - n_params(small) == (49 - 9) * 3 * 64
    assert not any(isinstance(m, nn.MaxPool2d) for m in small.modules())
    assert any(isinstance(m, nn.MaxPool2d) for m in big.modules())


@pytest.mark.parametrize(
    ("name", "native"), [("resnet4", 64), ("resnet6", 128), ("resnet8", 256), ("resnet10", 512)]
)
def test_htfllib_small_resnet_widths(name: str, native: int) -> None:
    model = build_model(name, (3, 32, 32), 10, feature_dim=native)
    backbone = model.body.backbone
    assert backbone.out_dim == native
    assert isinstance(model.body.align, nn.Identity)


def test_feature_pool_stretches_and_averages_like_htfllib() -> None:
    x = torch.randn(3, 64)
    stretched = FeaturePool(64, 512)(x)
    assert torch.equal(stretched, x.repeat_interleave(8, dim=1))
    wide = torch.randn(3, 2048)
    pooled = FeaturePool(2048, 512)(wide)
    assert torch.allclose(pooled, wide.view(3, 512, 4).mean(-1))
    # resnet4's 64-d features reach the head stretched to 512 by repetition.
    model = build_model("resnet4", (1, 28, 28), 10).eval()
    with torch.no_grad():
        features = model.body(torch.randn(BATCH, 1, 28, 28))
    assert torch.equal(features, features[:, ::8].repeat_interleave(8, dim=1))


def test_linear_feature_align_option() -> None:
    model = build_model("resnet4", (1, 28, 28), 10, feature_dim=32, feature_align="linear")
    assert isinstance(model.body.align, nn.Linear)
    assert model.body(torch.randn(BATCH, 1, 28, 28)).shape == (BATCH, 32)
    with pytest.raises(ModelError, match="feature_align"):
        build_model("resnet4", (1, 28, 28), 10, feature_align="conv")


def _state(name: str, seed: int) -> dict[str, torch.Tensor]:
    torch.manual_seed(seed)
    return build_model(name, (1, 28, 28), 10, feature_dim=64).state_dict()


@pytest.mark.parametrize("name", FAST_MODELS)
def test_construction_is_deterministic_under_seed(name: str) -> None:
    a, b, c = _state(name, 0), _state(name, 0), _state(name, 1)
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert any(not torch.equal(a[k], c[k]) for k in a if a[k].is_floating_point())


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(LARGE_MODELS))
def test_large_construction_is_deterministic_under_seed(name: str) -> None:
    a, b = _state(name, 0), _state(name, 0)
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("name", ["cnn4", "resnet8"])
def test_training_step_reduces_loss(name: str) -> None:
    torch.manual_seed(0)
    model = build_model(name, (1, 28, 28), 10)
    x = torch.randn(8, 1, 28, 28)
    y = torch.arange(8) % 10
    optimizer = torch.optim.SGD(model.parameters(), lr=0.02, momentum=0.9)
    loss_fn = nn.CrossEntropyLoss()
    losses = []
    for _ in range(10):
        optimizer.zero_grad()
        loss = loss_fn(model(x), y)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.7 * losses[0]


def test_reset_head_replaces_only_the_head() -> None:
    model = build_model("cnn4", (1, 28, 28), 10)
    body_before = {k: v.clone() for k, v in model.body.state_dict().items()}
    model.reset_head(3)
    assert model.num_classes == 3
    assert model(torch.randn(BATCH, 1, 28, 28)).shape == (BATCH, 3)
    assert all(torch.equal(body_before[k], v) for k, v in model.body.state_dict().items())
    with pytest.raises(ModelError, match="num_classes"):
        model.reset_head(0)
    # The new head follows the model's device and dtype.
    model.to(device="meta", dtype=torch.float64)
    model.reset_head(5)
    assert all(
        p.device.type == "meta" and p.dtype == torch.float64 for p in model.head.parameters()
    )


def test_vit_head_shape_survives_reset() -> None:
    model = ViTSplitModel(nn.Flatten(1), feature_dim=16, num_classes=4)
    model.reset_head(6)
    assert [type(m) for m in model.head] == [nn.Linear, nn.Tanh, nn.Linear]
    assert model.head[0].in_features == 16 and model.head[0].out_features == 768
    assert model.head[2].out_features == 6


def test_unknown_model_lists_valid_names() -> None:
    with pytest.raises(ModelError, match="unknown model 'resnet999'") as info:
        build_model("resnet999", (3, 32, 32), 10)
    assert all(name in str(info.value) for name in ALL_MODELS)
    assert isinstance(info.value, ValueError)


def test_model_names_are_lowercase_and_lookup_ignores_case() -> None:
    assert all(name == name.lower() for name in ALL_MODELS)
    assert build_model("CNN4", (1, 28, 28), 10).arch == "cnn4"


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"input_shape": (28, 28)}, "input_shape"),
        ({"input_shape": (1, 0, 28)}, "input_shape"),
        ({"num_classes": 0}, "num_classes"),
        ({"feature_dim": -1}, "feature_dim"),
        ({"hidden": (200,)}, "option"),
    ],
)
def test_bad_arguments_name_the_field(kwargs: dict, field: str) -> None:
    args = {"input_shape": (1, 28, 28), "num_classes": 10, **kwargs}
    with pytest.raises(ModelError, match=field):
        build_model("cnn4", **args)


@pytest.mark.parametrize("name", ["cnn4", "googlenet"])
def test_too_small_input_is_a_clear_error(name: str) -> None:
    size = get_model_spec(name).min_input_size
    model = build_model(name, (1, size, size), 10)  # the smallest accepted size works
    assert model(torch.randn(BATCH, 1, size, size)).shape == (BATCH, 10)
    with pytest.raises(ModelError, match=f"too small for {name}.*at least {size}"):
        build_model(name, (1, size - 1, size), 10)


def test_mlp_hidden_option() -> None:
    model = build_model("mlp", (1, 28, 28), 10, feature_dim=32, hidden=(64,))
    linears = [m for m in model.body if isinstance(m, nn.Linear)]
    assert [(m.in_features, m.out_features) for m in linears] == [(784, 64), (64, 32)]
    with pytest.raises(ModelError, match="hidden"):
        build_model("mlp", (1, 28, 28), 10, hidden=(0,))


def test_groups_match_htfllib() -> None:
    groups = list_groups()
    assert groups["HtFE-img-2"] == ("cnn4", "resnet18")
    assert groups["HtFE-img-3"] == ("resnet10", "resnet18", "resnet34")
    assert groups["HtFE-img-4"] == ("cnn4", "googlenet", "mobilenet_v2", "resnet18")
    assert len(groups["HtFE-img-5"]) == 5 and len(groups["HtFE-img-8"]) == 8
    assert groups["HtFE-img-9"][:4] == ("resnet4", "resnet6", "resnet8", "resnet10")
    assert groups["HtM-img-10"] == (*groups["HtFE-img-8"], "vit_b_16", "vit_b_32")
    assert not set(GROUP_ALIASES) & set(groups)
    for alias, name in GROUP_ALIASES.items():
        assert MODEL_GROUPS[alias] == groups[name]
    # Every entry is an architecture in its canonical spelling whose model is registered
    # (HtC groups' entries are "<model>+<head spec>": tests/test_models_htc.py).
    for members in MODEL_GROUPS.values():
        for arch in members:
            assert canonical_arch(arch) == arch and parse_arch(arch)[0] in ALL_MODELS


def test_model_for_client() -> None:
    group = get_group("HtFE-img-8")
    assert [model_for_client("HtFE-img-8", i) for i in range(10)] == [*group, *group[:2]]
    assert model_for_client("HtFE8", 9) == "googlenet"
    assert model_for_client("htfe-img-2", 3) == "resnet18"
    assert [model_for_client("resnet8", i) for i in range(3)] == ["resnet8"] * 3
    with pytest.raises(ModelError, match="HtFE-img-2"):
        model_for_client("HtFE-img-99", 0)
    with pytest.raises(ModelError, match="client_id"):
        model_for_client("HtFE-img-2", -1)
