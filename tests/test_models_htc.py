"""Heterogeneous classifier heads: "<model>+<head spec>" architectures and the HtC groups."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from fl_core.algorithms import AlgorithmError
from fl_core.config import build_config
from fl_core.engine import run
from fl_core.models import (
    HTC_IMG_4_HEADS,
    HeadSpec,
    ModelError,
    SplitModel,
    build_model,
    canonical_arch,
    get_group,
    group_global_model,
    is_group,
    list_groups,
    model_for_client,
    parse_arch,
    register_group,
)
from fl_core.models.groups import with_heads

HTFE_IMG_8 = get_group("HtFE-img-8")
# (head spec, (in, out) of its Linear layers for feature_dim 512 and 10 classes)
HTC_HEADS = [
    ("head", [(512, 10)]),
    ("head_512", [(512, 512), (512, 10)]),
    ("head_256", [(512, 256), (256, 10)]),
    ("head_128", [(512, 128), (128, 10)]),
]


@pytest.fixture(autouse=True, scope="module")
def single_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def n_params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def linear_shapes(head: nn.Module) -> list[tuple[int, int]]:
    return [(m.in_features, m.out_features) for m in head.modules() if isinstance(m, nn.Linear)]


# -- architecture strings ----------------------------------------------------------------------
def test_arch_strings_parse_to_one_spelling() -> None:
    assert parse_arch("resnet34") == ("resnet34", None)
    assert parse_arch("ResNet34 + Head_512_128") == ("resnet34", HeadSpec((512, 128)))
    assert parse_arch("cnn4+head_relu") == ("cnn4", HeadSpec((), final_relu=True))
    assert canonical_arch(" CNN4+HEAD_256_RELU ") == "cnn4+head_256_relu"
    assert HeadSpec([64, 32], final_relu=True).name == "head_64_32_relu"
    assert model_for_client("MLP + head_8", 3) == "mlp+head_8"
    assert build_model("MLP+Head_8", (1, 12, 12), 4, feature_dim=16).arch == "mlp+head_8"


@pytest.mark.parametrize(
    ("arch", "message"),
    [
        ("resnet34+mlp_256", "head spec is 'head'"),
        ("resnet34+head_", "head spec is 'head'"),
        ("resnet34+head_256+head", "head spec is 'head'"),
        ("resnet34+head_0", "positive integers"),
        ("resnet999+head_256", "unknown model 'resnet999'.*resnet34"),
    ],
)
def test_bad_arch_strings_are_clear_errors(arch: str, message: str) -> None:
    with pytest.raises(ModelError, match=message):
        build_model(arch, (1, 28, 28), 10)
    with pytest.raises(ModelError, match=message):
        model_for_client(arch, 0)
    with pytest.raises(ModelError, match=f"model group 'bad-htc'.*{message}"):
        register_group("bad-htc", ("mlp", arch))


# -- the heads ---------------------------------------------------------------------------------
@pytest.mark.parametrize(("spec", "linears"), HTC_HEADS, ids=[s for s, _ in HTC_HEADS])
def test_htc_heads_shapes(spec: str, linears: list[tuple[int, int]]) -> None:
    with torch.device("meta"):
        model = build_model(f"resnet34+{spec}", (3, 32, 32), 10, feature_dim=512)
        plain = build_model("resnet34", (3, 32, 32), 10, feature_dim=512)
    assert linear_shapes(model.head) == linears
    # a ReLU between Linear layers, none after the logits
    layers = list(model.head.children()) or [model.head]
    assert [type(m) for m in layers] == [nn.Linear, nn.ReLU] * (len(linears) - 1) + [nn.Linear]
    # the body is resnet34's, untouched; only the head differs
    assert [name for name, _ in model.named_children()] == ["body", "head"]
    assert {k: v.shape for k, v in model.body.state_dict().items()} == {
        k: v.shape for k, v in plain.body.state_dict().items()
    }
    assert model.forward_features(torch.empty(2, 3, 32, 32, device="meta")).shape == (2, 512)
    assert model(torch.empty(2, 3, 32, 32, device="meta")).shape == (2, 10)


def test_plain_head_spec_is_the_default_linear_head() -> None:
    torch.manual_seed(0)
    plain = build_model("cnn4", (1, 28, 28), 10)
    torch.manual_seed(0)
    spec = build_model("cnn4+head", (1, 28, 28), 10)
    assert isinstance(spec.head, nn.Linear)
    assert plain.state_dict().keys() == spec.state_dict().keys()


def test_head_parameter_counts_by_hand() -> None:
    # head_256 on 512 features, 10 classes: Linear(512, 256) + Linear(256, 10)
    by_hand = 512 * 256 + 256 + 256 * 10 + 10
    assert by_hand == 133_898
    assert HeadSpec((256,)).num_parameters(512, 10) == by_hand
    with torch.device("meta"):
        model = build_model("resnet34+head_256", (3, 32, 32), 10)
        plain = build_model("resnet34", (3, 32, 32), 10)
    assert n_params(model.head) == by_hand
    assert n_params(model) == n_params(plain) - (512 * 10 + 10) + by_hand
    # cnn4 on 1x28x28 with head_128_relu, feature_dim 64, 7 classes: the ReLU adds nothing
    by_hand = (64 * 128 + 128) + (128 * 7 + 7)
    model = build_model("cnn4+head_128_relu", (1, 28, 28), 7, feature_dim=64)
    assert n_params(model.head) == by_hand == HeadSpec((128,), True).num_parameters(64, 7)
    # the spec's count equals the built head's for every HtC head and feature size
    for spec, _ in HTC_HEADS:
        for fd, k in ((512, 10), (16, 3)):
            head = HeadSpec.parse(spec).build(fd, k)
            assert n_params(head) == HeadSpec.parse(spec).num_parameters(fd, k)


def test_reset_head_keeps_the_head_spec() -> None:
    model = build_model("mlp+head_8_relu", (1, 12, 12), 4, feature_dim=16)
    model.reset_head(6)
    assert linear_shapes(model.head) == [(16, 8), (8, 6)]
    assert isinstance(list(model.head.children())[-1], nn.ReLU)


# -- the final-ReLU option ---------------------------------------------------------------------
def test_final_relu_option_clamps_the_logits_and_nothing_else() -> None:
    torch.manual_seed(0)
    plain = build_model("mlp+head_8", (1, 12, 12), 4, feature_dim=16).eval()
    relu = build_model("mlp+head_8_relu", (1, 12, 12), 4, feature_dim=16).eval()
    # the ReLU has no parameters: the same state dict loads into both
    assert plain.state_dict().keys() == relu.state_dict().keys()
    relu.load_state_dict(plain.state_dict())
    x = torch.randn(32, 1, 12, 12)
    with torch.no_grad():
        logits, clamped = plain(x), relu(x)
    assert (logits < 0).any()  # without the option, logits take negative values
    assert (clamped >= 0).all()
    assert torch.equal(clamped, logits.clamp(min=0))
    # a class whose pre-activation is negative gets no gradient through the clamped logit
    # a class whose pre-activation is negative gets no gradient through its clamped logit
    torch.manual_seed(0)
    head = build_model("mlp+head_relu", (1, 12, 12), 4, feature_dim=16).head
    features = torch.randn(64, 16, requires_grad=True)
    pre = head.logits(features)
    head(features)[:, 0].sum().backward()
    dead = pre[:, 0] < 0
    assert dead.any() and not dead.all()
    assert torch.equal(features.grad[dead], torch.zeros_like(features.grad[dead]))
    assert (features.grad[~dead] != 0).all()


def test_relu_groups_are_the_htc_groups_with_the_final_relu() -> None:
    for name in ("HtFE-img-8-HtC-img-4", "Res34-HtC-img-4"):
        base, relu = get_group(name), get_group(f"{name}-ReLU")
        assert relu == tuple(f"{a}_relu" for a in base)
        assert all(not parse_arch(a)[1].final_relu for a in base)
        assert all(parse_arch(a)[1].final_relu for a in relu)


# -- the groups --------------------------------------------------------------------------------
def test_htc_groups_assign_body_and_head_as_htfllib() -> None:
    groups = list_groups()
    assert HTC_IMG_4_HEADS == ("head", "head_512", "head_256", "head_128")
    assert groups["Res34-HtC-img-4"] == tuple(f"resnet34+{h}" for h in HTC_IMG_4_HEADS)
    assert len(groups["HtFE-img-8-HtC-img-4"]) == 8
    # HtFLlib: client i gets extractor i mod 8 and head i mod 4, from two separate lists
    for i in range(20):
        body, head = parse_arch(model_for_client("HtFE-img-8-HtC-img-4", i))
        assert body == HTFE_IMG_8[i % 8] and head == HeadSpec.parse(HTC_IMG_4_HEADS[i % 4])
        body, head = parse_arch(model_for_client("res34-htc-img-4", i))
        assert body == "resnet34" and head == HeadSpec.parse(HTC_IMG_4_HEADS[i % 4])
    assert with_heads(("a", "b", "c"), ("head", "head_8")) == (
        "a+head",
        "b+head_8",
        "c+head",
        "a+head_8",
        "b+head",
        "c+head_8",
    )
    assert group_global_model("HtFE-img-8-HtC-img-4") == "cnn4"
    assert group_global_model("Res34-HtC-img-4-relu") == "cnn4"
    assert group_global_model("HtFE-img-8") is None


@pytest.mark.parametrize("group", ["Res34-HtC-img-4", "HtFE-img-8-HtC-img-4"])
def test_htc_group_gives_different_heads_on_equal_features(group: str) -> None:
    # On the meta device: shapes only, no memory or arithmetic.
    x = torch.empty(2, 3, 32, 32, device="meta")
    heads: dict[str, list[tuple[int, int]]] = {}
    for arch in dict.fromkeys(model_for_client(group, cid) for cid in range(8)):
        with torch.device("meta"):
            model = build_model(arch, (3, 32, 32), 10, feature_dim=512)
        assert isinstance(model, SplitModel)
        features = model.forward_features(x)
        assert features.shape == (2, 512)
        assert model.head(features).shape == (2, 10)
        heads[arch] = linear_shapes(model.head)
    heads = [heads[model_for_client(group, cid)] for cid in range(8)]
    assert heads[:4] == [linears for _, linears in HTC_HEADS]
    assert heads[4:] == heads[:4]


# -- in a federation ---------------------------------------------------------------------------
MLP_HTC = "test-htc-mlp"
if not is_group(MLP_HTC):
    register_group(MLP_HTC, ("mlp+head", "mlp+head_8", "mlp+head_12_relu"))


def tiny_config(algorithm: str, model: str) -> dict:
    return {
        "seed": 3,
        "data": {
            "dataset": "synthetic",
            "partition": "dir",
            "alpha": 0.5,
            "num_clients": 3,
            "source_options": {"num_samples": 300, "num_classes": 4, "image_size": 12},
        },
        "model": {"name": model, "feature_dim": 16},
        "algorithm": {"name": algorithm},
        "federation": {
            "rounds": 2,
            "batch_size": 16,
            "lr": 0.05,
            "executor": "sequential",
            "checkpoint_every": None,
        },
    }


def test_htc_group_runs_when_heads_stay_local_and_is_refused_when_shared(tmp_path) -> None:
    # FedRep shares the body (all "mlp") and keeps heads personal: heterogeneous heads are fine.
    result = run(build_config(tiny_config("fedrep", MLP_HTC)), out_dir=tmp_path / "fedrep")
    assert result.summary()["rounds"] == 2
    # FedAvg averages whole models: the heads disagree in shape, refused before training.
    with pytest.raises(AlgorithmError, match="head"):
        run(build_config(tiny_config("fedavg", MLP_HTC)), out_dir=tmp_path / "fedavg")
    # A single "+head" architecture is a model name like any other.
    result = run(build_config(tiny_config("fedavg", "mlp+head_8")), out_dir=tmp_path / "one")
    assert result.summary()["rounds"] == 2


def test_ktl_list_groups_shows_parameter_counts() -> None:
    from typer.testing import CliRunner

    from ktl.cli import app

    result = CliRunner().invoke(
        app, ["list", "groups", "--input-shape", "1x28x28"], env={"COLUMNS": "200"}
    )
    assert result.exit_code == 0, result.output
    assert "input 1x28x28, 10 classes, feature_dim 512" in result.output
    rows = {
        tuple(cell.strip() for cell in line.split("│")[2:6])
        for line in result.output.splitlines()
        if line.count("│") >= 6
    }
    # cnn4 as in PFLlib; resnet34 + head_256: its body plus the hand-computed head.
    assert ("0", "cnn4", "582,026", "5,130") in rows
    resnet34 = 21_280_970
    assert ("2", "resnet34+head_256", f"{resnet34 - 5_130 + 133_898:,}", "133,898") in rows
    for name in list_groups():
        assert name in result.output
