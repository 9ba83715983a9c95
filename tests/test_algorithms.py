"""The defining behaviour of each algorithm, and the contract's parts and registry."""

from __future__ import annotations

import sys
import textwrap

import pytest
import torch
from helpers import tiny_config
from torch import nn

from fl_core.algorithms import (
    AlgorithmError,
    PartError,
    Select,
    ServerContext,
    get_algorithm,
    is_batchnorm,
    registry,
)
from fl_core.algorithms.common import shared_model_state
from fl_core.algorithms.parts import load_flat, select_state
from fl_core.config import build_config
from fl_core.engine import Federation, run
from fl_core.models import build_model


def config(algorithm: str, **hparams) -> dict:
    return tiny_config(algorithm, image_size=12, **hparams)


def flat_distance(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    return float(sum(((a[k].double() - b[k].double()) ** 2).sum() for k in a) ** 0.5)


# -- parts and selections ----------------------------------------------------------------------
def test_selections_by_prefix_and_by_module_predicate():
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Linear(4, 2))
    parts = {"model": model, "cv": {"w": torch.zeros(2)}}
    bn = select_state(parts, [Select("model", modules=is_batchnorm)])
    assert set(bn) == {
        "model/1.weight",
        "model/1.bias",
        "model/1.running_mean",
        "model/1.running_var",
        "model/1.num_batches_tracked",
    }
    rest = select_state(parts, [Select("model", modules=is_batchnorm, invert=True)])
    assert set(rest) == {"model/0.weight", "model/0.bias", "model/2.weight", "model/2.bias"}
    assert set(select_state(parts, ["model/2"])) == {"model/2.weight", "model/2.bias"}
    assert set(select_state(parts, ["cv"])) == {"cv/w"}


def test_loading_a_key_that_matches_nothing_is_an_error_naming_it():
    parts = {"model": nn.Linear(2, 2), "cv": {"w": torch.zeros(2)}}
    with pytest.raises(PartError, match="'model/nope'"):
        load_flat(parts, {"model/nope": torch.zeros(1)}, "message")
    with pytest.raises(PartError, match="'proto/x'"):
        load_flat(parts, {"proto/x": torch.zeros(1)}, "message")
    with pytest.raises(PartError, match="shape"):
        load_flat(parts, {"model/weight": torch.zeros(3, 3)}, "message")
    # a key outside what the client accepts (FedRep's head is never received)
    with pytest.raises(PartError, match="model/bias"):
        load_flat(parts, {"model/bias": torch.zeros(2)}, "message", allowed={"model/weight"})
    load_flat(parts, {"model/bias": torch.ones(2), "cv/w": torch.ones(2)}, "message")
    assert torch.equal(parts["model"].bias.detach(), torch.ones(2))
    assert torch.equal(parts["cv"]["w"], torch.ones(2))


def test_fedrep_client_refuses_a_head_in_its_message():
    fed = Federation(build_config(config("fedrep")))
    client = fed.runtime.client(0, 1, "train", {})
    with pytest.raises(PartError, match="model/head.weight"):
        client.receive({"model/head.weight": torch.zeros(4, 16)})
    fed.close()


def _server_context(archs: list[str]) -> ServerContext:
    from fl_core.config import FederationSpec

    return ServerContext(
        algorithm="test",
        device=torch.device("cpu"),
        seed=0,
        num_clients=len(archs),
        num_classes=5,
        input_shape=(1, 28, 28),
        feature_dim=32,
        architectures=dict(enumerate(archs)),
        settings=FederationSpec(),
        client_shared=("model",),
        model_builder=lambda arch: build_model(arch, (1, 28, 28), 5, 32),
    )


def test_shared_heads_pass_across_architectures_and_bodies_are_refused():
    ctx = _server_context(["mlp", "cnn4"])
    heads = shared_model_state(ctx, ("model/head",))
    assert set(heads) == {"model/head.weight", "model/head.bias"}
    with pytest.raises(AlgorithmError, match="'mlp' and 'cnn4'"):
        shared_model_state(ctx, ("model/body",))


# -- registry -----------------------------------------------------------------------------------
def test_a_third_party_algorithm_registers_through_an_entry_point(tmp_path, monkeypatch):
    pkg = tmp_path / "site"
    (pkg / "thirdparty_algo").mkdir(parents=True)
    (pkg / "thirdparty_algo" / "__init__.py").write_text(
        textwrap.dedent(
            """
            from fl_core.algorithms import register_algorithm
            from fl_core.algorithms.fedavg import FedAvgClient, FedAvgHParams, FedAvgServer

            class EchoClient(FedAvgClient):
                pass

            register_algorithm("echo-avg", EchoClient, FedAvgServer, FedAvgHParams,
                               "FedAvg under another name", family="tFL", paper="test")
            """
        )
    )
    dist = pkg / "thirdparty_algo-1.0.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: thirdparty-algo\nVersion: 1.0\n")
    (dist / "entry_points.txt").write_text(
        f"[{registry.ENTRY_POINT_GROUP}]\necho-avg = thirdparty_algo\n"
        "broken-algo = thirdparty_module_that_does_not_exist\n"
    )
    monkeypatch.syspath_prepend(str(pkg))
    monkeypatch.setattr(registry, "_entry_points_loaded", False)
    monkeypatch.setattr(registry, "_plugin_errors", {})
    try:
        assert "thirdparty_algo" not in sys.modules
        cfg = build_config(config("echo-avg"))  # names it without importing its package first
        assert get_algorithm("echo-avg").family == "tFL"
        assert run(cfg).best_test_acc > 0.25
        # a broken plug-in hides nothing else, and asking for it says why it is missing
        assert {"echo-avg", "fedavg"} <= set(registry.registered_algorithms())
        with pytest.raises(AlgorithmError, match="broken-algo.*failed to load"):
            get_algorithm("broken-algo")
    finally:
        registry._ALGORITHMS.pop("echo-avg", None)
        sys.modules.pop("thirdparty_algo", None)


def test_cli_lists_algorithms_by_family():
    from typer.testing import CliRunner

    from ktl.cli import app

    out = CliRunner().invoke(app, ["list", "algorithms"]).output
    assert out.index("traditional FL") < out.index("scaffold") < out.index("personalized FL")
    assert out.index("personalized FL") < out.index("ditto") < out.index("heterogeneous-model")
    assert out.index("heterogeneous-model") < out.index("fedproto")


# -- Ditto --------------------------------------------------------------------------------------
def _ditto_distance(mu: float) -> float:
    fed = Federation(build_config(config("ditto", mu=mu)))
    for rnd in (1, 2):
        fed.train_round(rnd)
        fed.aggregate(rnd)
    glob = {k.removeprefix("model/"): v for k, v in fed.server.global_state.items()}
    dists = []
    for cid in range(4):
        personal = {k.removeprefix("personal/"): v for k, v in fed.store.get(cid).items()}
        dists.append(flat_distance(personal, glob))
    fed.close()
    return sum(dists) / len(dists)


def test_ditto_personal_and_global_differ_and_move_closer_as_mu_grows():
    d = [_ditto_distance(mu) for mu in (0.0, 0.5, 5.0)]
    assert d[0] > 0.05
    assert d[0] > d[1] > d[2]


def test_ditto_evaluates_the_personal_model_only():
    # with mu = 0 the personal model is trained exactly like Local's model (same batches)
    ditto = run(build_config(config("ditto", mu=0.0, personal_epochs=1)))
    local = run(build_config(config("local")))
    assert [h.metrics for h in ditto.history] == [h.metrics for h in local.history]
    fedavg = run(build_config(config("fedavg")))
    assert [h.metrics for h in ditto.history] != [h.metrics for h in fedavg.history]


# -- SCAFFOLD -----------------------------------------------------------------------------------
@pytest.mark.parametrize("server_lr", [1.0, 0.5])
def test_scaffold_variates_follow_the_paper_update(server_lr):
    cfg = config("scaffold", server_lr=server_lr)
    cfg["federation"]["join_ratio"] = 0.75
    fed = Federation(build_config(cfg))
    lr, n = 0.05, 4
    for rnd in (1, 2, 3):
        x = {k.removeprefix("model/"): v.clone() for k, v in fed.server.x.items()}
        c = {k.removeprefix("c/"): v.clone() for k, v in fed.server.c.items()}
        ci_before = {cid: dict(fed.store.get(cid)) for cid in range(n)}
        fed.train_round(rnd)
        replies = fed.pending_replies
        assert len(replies) == 3
        for cid, reply in replies.items():
            steps = reply.metrics["steps"]
            num_train = fed.dataset.clients[cid].num_train
            assert steps == (num_train // 16 if num_train >= 16 else 1)  # drop_last
            after = fed.store.get(cid)
            for name in c:
                y = reply.message[f"model/{name}"]
                old = ci_before[cid].get(f"ci/{name}", torch.zeros_like(c[name]))
                expected = old - c[name] + (x[name] - y) / (steps * lr)
                assert torch.allclose(after[f"ci/{name}"], expected, atol=1e-5)
                assert torch.allclose(reply.message[f"dc/{name}"], expected - old, atol=1e-5)
        fed.aggregate(rnd)
        for name in c:
            dc_sum = sum(r.message[f"dc/{name}"] for r in replies.values())
            assert torch.allclose(fed.server.c[f"c/{name}"], c[name] + dc_sum / n, atol=1e-6)
            mean_y = sum(r.message[f"model/{name}"] for r in replies.values()) / len(replies)
            expected_x = x[name] + server_lr * (mean_y - x[name])
            assert torch.allclose(fed.server.x[f"model/{name}"], expected_x, atol=1e-6)
    fed.close()


def test_scaffold_learns_on_digits():
    from fl_core.config import load_config

    over = ["federation.executor=sequential", "federation.rounds=8", "federation.eval_every=4"]
    scaffold = run(load_config("configs/quick_digits.yaml", [*over, "algorithm.name=scaffold"]))
    assert scaffold.best_test_acc > 0.5  # 10 classes: chance is 0.1


# -- FedRep -------------------------------------------------------------------------------------
def test_fedrep_heads_differ_and_bodies_are_equal_after_aggregation():
    fed = Federation(build_config(config("fedrep")))
    fed.train_round(1)
    uploads = [r.message for r in fed.pending_replies.values()]
    assert all(set(m) == {k for k in uploads[0]} for m in uploads)
    assert all(k.startswith("model/body.") for k in uploads[0])
    fed.aggregate(1)
    heads = [fed.store.get(cid) for cid in range(4)]
    assert all(set(h) == {"model/head.weight", "model/head.bias"} for h in heads)
    assert not torch.equal(heads[0]["model/head.weight"], heads[1]["model/head.weight"])
    # every client trains next round from the same aggregated body, with its own head
    bodies = []
    for cid in range(4):
        client = fed.runtime.client(cid, 2, "train", fed.store.get(cid))
        client.receive(fed.server.broadcast(2))
        bodies.append({k: v.clone() for k, v in client.model.body.state_dict().items()})
        assert torch.equal(client.model.head.weight.detach(), heads[cid]["model/head.weight"])
    assert all(flat_distance(b, bodies[0]) == 0 for b in bodies)
    fed.close()


def test_fedrep_head_training_on_cached_features_equals_the_generic_path(monkeypatch):
    from fl_core.algorithms import fedrep

    fast = run(build_config(config("fedrep", head_epochs=3)))
    monkeypatch.setattr(fedrep, "train_mode_matters", lambda module: True)
    slow = run(build_config(config("fedrep", head_epochs=3)))
    for a, b in zip(fast.history, slow.history, strict=True):
        assert a.metrics["test_acc"] == pytest.approx(b.metrics["test_acc"], abs=0.01)
        assert a.metrics["train_loss"] == pytest.approx(b.metrics["train_loss"], rel=1e-3)


# -- FedProto -----------------------------------------------------------------------------------
def test_fedproto_uploads_exactly_classes_by_feature_size_plus_counts():
    fed = Federation(build_config(config("fedproto")))
    up, down = fed.train_round(1)
    classes, feature = 4, 16
    per_client = classes * feature * 4 + classes * 8  # float32 prototypes + int64 counts
    assert up == 4 * per_client
    fed.aggregate(1)
    up2, down2 = fed.train_round(2)
    assert up2 == 4 * per_client and down2 == 4 * per_client
    fed.close()


def test_fedproto_averages_by_count_and_predicts_the_nearest_global_prototype():
    fed = Federation(build_config(config("fedproto")))
    fed.train_round(1)
    replies = fed.pending_replies
    fed.aggregate(1)
    means = torch.stack([r.message["proto/local"] for r in replies.values()]).double()
    counts = torch.stack([r.message["proto/local_count"] for r in replies.values()]).double()
    expected = (means * counts.unsqueeze(2)).sum(0) / counts.sum(0).clamp(min=1).unsqueeze(1)
    seen = counts.sum(0) > 0
    assert torch.allclose(fed.server.global_proto[seen].double(), expected[seen], atol=1e-5)

    client = fed.runtime.client(0, 1, "eval", fed.store.get(0))
    client.receive(fed.server.broadcast(1))
    x = fed.dataset.clients[0].test_x
    with torch.no_grad():
        feats = client.model.body(x)
        dist = torch.cdist(feats, fed.server.global_proto)
        dist[:, ~seen] = float("inf")
        nearest = dist.argmin(1)
        before = client.predict(client.model, x).argmax(1)
        assert torch.equal(before, nearest)
        # swap two classes' global prototypes: the predictions swap with them (not the head's)
        a, b = [int(c) for c in torch.nonzero(seen).flatten()[:2]]
        swapped = dict(fed.server.broadcast(1))
        protos = swapped["proto/global"].clone()
        protos[[a, b]] = protos[[b, a]]
        client.receive({**swapped, "proto/global": protos})
        after = client.predict(client.model, x).argmax(1)
        mapping = {a: b, b: a}
        assert torch.equal(after, before.apply_(lambda c: mapping.get(c, c)))
    fed.close()
