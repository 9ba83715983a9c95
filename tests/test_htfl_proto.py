"""The defining behaviour of FedTGP, FedMRL and FedL2G (heterogeneous-model FL)."""

from __future__ import annotations

import math

import pytest
import torch
from helpers import tiny_config
from torch.func import functional_call, jvp

from fl_core.algorithms import Reply
from fl_core.algorithms.fedl2g import FedL2GClient
from fl_core.algorithms.fedtgp import adaptive_margin
from fl_core.config import build_config
from fl_core.engine import Federation, run
from fl_core.models import build_model, register_group
from fl_core.models.groups import is_group

MIXED = "htfl-proto-mlp-cnn4"
if not is_group(MIXED):
    register_group(MIXED, ("mlp", "cnn4"))

CLASSES, FEATURES, LR, BATCH = 4, 16, 0.05, 16


def config(algorithm: str, model: str = MIXED, rounds: int = 3, **hparams) -> dict:
    return tiny_config(
        algorithm,
        model,
        rounds,
        classes=CLASSES,
        feature_dim=FEATURES,
        batch_size=BATCH,
        lr=LR,
        **hparams,
    )


def federation(algorithm: str, model: str = MIXED, **hparams) -> Federation:
    return Federation(build_config(config(algorithm, model, **hparams)))


@pytest.mark.parametrize(
    "algorithm, hparams",
    [("fedtgp", {}), ("fedmrl", {}), ("fedl2g", {"warm_up_rounds": 1})],
)
def test_learns_on_a_mixed_model_group(algorithm, hparams):
    cfg = config(algorithm, rounds=5, **hparams)
    cfg["federation"]["eval_every"] = 5
    result = run(build_config(cfg))
    assert result.final_test_acc > 0.5  # 4 classes: chance is 0.25


# -- FedTGP -------------------------------------------------------------------------------------
def test_fedtgp_sends_exactly_classes_by_feature_size_each_way():
    fed = federation("fedtgp")
    per_client = CLASSES * FEATURES * 4 + CLASSES * 8  # float32 prototypes + int64 counts
    up, down = fed.train_round(1)
    assert up == 4 * per_client and down == 4 * per_client
    assert all(
        r.message["proto/local"].shape == (CLASSES, FEATURES) for r in fed.pending_replies.values()
    )
    fed.aggregate(1)
    assert fed.train_round(2) == (4 * per_client, 4 * per_client)
    fed.close()


def test_fedtgp_margin_is_min_of_the_largest_class_gap_and_tau():
    # class centres are unweighted means over clients: class 0 from (0,0) and (2,0) is (1,0)
    protos = torch.tensor([[0.0, 0.0], [2.0, 0.0], [4.0, 4.0], [1.0, 10.0]])
    labels = torch.tensor([0, 0, 1, 2])
    # centres (1,0), (4,4), (1,10): gaps 5, 5, sqrt(45); the largest is sqrt(45)
    assert adaptive_margin(protos, labels, 3, tau=100.0) == pytest.approx(math.sqrt(45))
    assert adaptive_margin(protos, labels, 3, tau=2.0) == 2.0
    assert adaptive_margin(protos[:2], labels[:2], 3, tau=7.0) == 7.0  # one class: no gap

    # the server computes it from the round's uploads
    for tau in (100.0, 0.01):
        fed = federation("fedtgp", margin_threshold=tau, server_epochs=1)
        fed.train_round(1)
        replies = fed.pending_replies
        fed.aggregate(1)
        centres = []
        for c in range(CLASSES):
            held = [
                r.message["proto/local"][c]
                for r in replies.values()
                if r.message["proto/local_count"][c] > 0
            ]
            centres.append(torch.stack(held).double().mean(0))  # unweighted over clients
        centres = torch.stack(centres)
        gaps = torch.cdist(centres, centres) + torch.diag(torch.full((CLASSES,), math.inf))
        expected = min(float(gaps.min(1).values.max()), tau)
        assert float(fed.server.margin) == pytest.approx(expected, rel=1e-6)
        fed.close()


def test_fedtgp_server_training_pulls_prototypes_to_their_own_class():
    fed = federation("fedtgp")  # default server hyperparameters
    g = torch.Generator().manual_seed(0)
    centres = 2 * torch.randn(CLASSES, FEATURES, generator=g)
    labels = torch.arange(CLASSES).repeat(3)  # three clients holding every class
    protos = centres[labels] + 0.3 * torch.randn(len(labels), FEATURES, generator=g)
    with torch.no_grad():
        untrained = fed.server.tgp().clone()
    assert not torch.equal(torch.cdist(protos, untrained).argmin(1), labels)
    margin = adaptive_margin(protos, labels, CLASSES, tau=100.0)
    losses = fed.server.train_prototypes(1, protos, labels, margin)
    assert len(losses) == 100 and losses[-1] < 0.5 * losses[0]
    with torch.no_grad():
        trained = fed.server.tgp()
    # every uploaded prototype is now nearest to its own class's global prototype
    assert torch.equal(torch.cdist(protos, trained).argmin(1), labels)
    fed.close()


def test_fedtgp_aggregation_trains_the_network_and_broadcasts_its_output():
    fed = federation("fedtgp")
    fed.train_round(1)
    replies = fed.pending_replies
    pairs = [
        (r.message["proto/local"][c], c)
        for cid, r in sorted(replies.items())
        for c in range(CLASSES)
        if r.message["proto/local_count"][c] > 0
    ]
    protos = torch.stack([p for p, _ in pairs])
    labels = torch.tensor([c for _, c in pairs])
    margin = adaptive_margin(protos, labels, CLASSES, tau=100.0)
    initial = {k: v.clone() for k, v in fed.server.tgp.state_dict().items()}
    losses = fed.server.train_prototypes(1, protos, labels, margin)
    with torch.no_grad():
        trained = fed.server.tgp().clone()
    fed.server.tgp.load_state_dict(initial)
    reported = fed.aggregate(1)
    assert float(fed.server.margin) == pytest.approx(margin)
    # what the server reports of its step: the last epoch's mean loss and the margin
    assert reported == pytest.approx({"server_loss": losses[-1], "server_margin": margin})
    assert losses[-1] < losses[0]
    message = fed.server.broadcast(2)
    assert torch.allclose(message["proto/global"], trained)
    assert torch.equal(
        message["proto/count"], sum(r.message["proto/local_count"] for r in replies.values())
    )
    fed.close()


def test_a_servers_report_is_recorded_beside_the_clients_metrics_of_its_round(tmp_path):
    """Numbers a server returns from ``aggregate`` reach the round's record and metrics.jsonl as
    ``server_<name>``; round 0 (no aggregation yet) and servers that report nothing have none."""
    from fl_core.engine.outputs import read_metrics

    result = run(build_config(config("fedtgp", rounds=2)), out_dir=tmp_path)
    for rec in [*result.history, *read_metrics(tmp_path / "metrics.jsonl")]:
        server = {k for k in rec.metrics if k.startswith("server_")}
        assert server == (set() if rec.round == 0 else {"server_loss", "server_margin"})
        if rec.round > 0:
            assert math.isfinite(rec.metrics["server_loss"]) and rec.metrics["server_margin"] > 0
    local = run(build_config(config("local", rounds=1)))
    assert not any(k.startswith("server_") for r in local.history for k in r.metrics)


def test_fedtgp_client_regulariser_is_the_euclidean_distance_or_fedprotos_mse():
    for distance, lam in (("euclidean", 0.1), ("mse", 10.0)):
        fed = federation("fedtgp", client_distance=distance, lam=lam)
        fed.train_round(1)
        fed.aggregate(1)
        client = fed.runtime.client(0, 2, "train", fed.store.get(0))
        message = fed.server.broadcast(2)
        client.receive(message)
        x = fed.dataset.clients[0].train_x[:BATCH]
        y = fed.dataset.clients[0].train_y[:BATCH]
        with torch.no_grad():
            feats = client.model.body(x)
            ce = torch.nn.functional.cross_entropy(client.model.head(feats), y)
            target = message["proto/global"][y]
            if distance == "euclidean":
                term = (feats - target).norm(dim=1).mean()
            else:
                term = ((feats - target) ** 2).mean()
            assert float(client.loss(client.model, x, y)) == pytest.approx(
                float(ce + lam * term), rel=1e-5
            )
        fed.close()


# -- FedMRL -------------------------------------------------------------------------------------
def test_fedmrl_uploads_exactly_the_small_shared_model():
    fed = federation("fedmrl", shared_model="cnn4")
    d1 = FEATURES // 4  # default sub_feature_dim
    small = build_model("cnn4", fed.dataset.input_shape, CLASSES, d1)
    expected = {f"global/{k}": v.shape for k, v in small.state_dict().items()}
    size = sum(v.numel() * v.element_size() for v in small.state_dict().values())
    assert small.head.in_features == d1
    up, down = fed.train_round(1)
    assert up == 4 * size and down == 4 * size
    for reply in fed.pending_replies.values():
        assert {k: v.shape for k, v in reply.message.items()} == expected
    # the clients' own models and projectors stay home, in their state
    state = fed.store.get(1)  # a cnn4 client
    assert {k.split("/")[0] for k in state} == {"model", "proj"}
    assert state["proj/weight"].shape == (FEATURES, d1 + FEATURES)
    fed.close()


@pytest.mark.parametrize("aggregate_by", ["samples", "clients"])
def test_fedmrl_server_averages_the_shared_model(aggregate_by):
    fed = federation("fedmrl", aggregate_by=aggregate_by)
    fed.train_round(1)
    replies = fed.pending_replies
    fed.aggregate(1)
    w = {c: (r.num_samples if aggregate_by == "samples" else 1.0) for c, r in replies.items()}
    for key, value in fed.server.global_state.items():
        if not value.is_floating_point():
            continue
        expected = sum(r.message[key].double() * w[c] for c, r in replies.items()) / sum(w.values())
        assert torch.allclose(value.double(), expected, atol=1e-6), key
    fed.close()


def test_fedmrl_heads_read_nested_slices_and_the_projector_persists():
    fed = federation("fedmrl")
    fed.train_round(1)
    fed.aggregate(1)
    stored = fed.store.get(0)
    client = fed.runtime.client(0, 2, "train", stored)
    client.receive(fed.server.broadcast(2))
    # the projector learned in round 1 is the one the client starts round 2 with
    assert torch.equal(client.proj.weight.detach(), stored["proj/weight"])
    fresh = fed.runtime.client(0, 1, "train", {})
    assert not torch.allclose(fresh.proj.weight, stored["proj/weight"])

    d1 = client.d1
    x = fed.dataset.clients[0].train_x[:BATCH]
    y = fed.dataset.clients[0].train_y[:BATCH]
    with torch.no_grad():
        fused = client.proj(torch.cat([client.global_model.body(x), client.model.body(x)], 1))
        assert fused.shape == (BATCH, FEATURES)
        local = torch.nn.functional.cross_entropy(client.model.head(fused), y)
        coarse = torch.nn.functional.cross_entropy(client.global_model.head(fused[:, :d1]), y)
        assert float(client.loss(client.model, x, y)) == pytest.approx(float(local + coarse))
        assert torch.equal(client.predict(client.model, x), client.model.head(fused))
    fed.close()


def test_fedmrl_rejects_an_unknown_architecture_and_a_too_large_slice():
    from pydantic import ValidationError

    from fl_core.algorithms import AlgorithmError
    from fl_core.config import ConfigError

    with pytest.raises((ValidationError, ConfigError), match="shared_model"):
        build_config(config("fedmrl", shared_model="no-such-model"))
    with pytest.raises(AlgorithmError, match="sub_feature_dim"):
        federation("fedmrl", sub_feature_dim=FEATURES + 1)


# -- FedL2G -------------------------------------------------------------------------------------
def test_fedl2g_warm_up_meta_learns_only_and_uploads_the_present_classes_rows():
    fed = federation("fedl2g", warm_up_rounds=1)
    initial = {arch: fed.runtime.initial_state(arch) for arch in ("mlp", "cnn4")}
    up, down = fed.train_round(1)
    assert down == 4 * CLASSES * FEATURES * 4  # the guiding vectors
    sent = 0
    for cid, reply in fed.pending_replies.items():
        classes = reply.message["guide/classes"]
        assert reply.message["guide/grad"].shape == (classes.numel(), FEATURES)
        assert set(classes.tolist()) <= set(fed.dataset.clients[cid].train_y.tolist())
        sent += classes.numel() * (FEATURES * 4 + 8)
        # during the warm-up the model is not trained
        state = fed.store.get(cid)
        arch = fed.architectures[cid]
        for key, value in initial[arch].items():
            assert torch.equal(state[f"model/{key}"], value), key
    assert up == sent
    before = fed.server.guide.clone()
    fed.aggregate(1)
    assert not torch.equal(fed.server.guide, before)

    quiz = {cid: fed.store.get(cid)["quiz/index"] for cid in range(4)}
    fed.train_round(2)  # trained now, on the study set only, with the same quiz set
    for cid in range(4):
        state = fed.store.get(cid)
        assert torch.equal(state["quiz/index"], quiz[cid])
        n = fed.dataset.clients[cid].num_train
        assert quiz[cid].numel() == min(BATCH, n // 2)
        arch = fed.architectures[cid]
        assert any(not torch.equal(state[f"model/{k}"], v) for k, v in initial[arch].items())
        client = fed.runtime.client(cid, 3, "train", state)
        study = set(client.study_index().tolist())
        assert study.isdisjoint(quiz[cid].tolist()) and len(study) + quiz[cid].numel() == n
    fed.close()


def test_fedl2g_meta_gradient_is_the_first_order_formula():
    # d L_quiz / d g_c = (2 lr / (B D)) sum_{i: y_i = c} J_i v   (one study batch of size B)
    fed = federation("fedl2g", model="mlp", warm_up_rounds=0)
    fed.train_round(1)  # gives client 0 a quiz set and a trained model
    fed.aggregate(1)
    state = fed.store.get(0)
    message = fed.server.broadcast(2)
    ours = fed.runtime.client(0, 2, "train", state)
    ours.receive(message)
    grad, classes = ours.meta_gradient()

    hand = fed.runtime.client(0, 2, "train", state)  # same generator: same batches
    hand.receive(message)
    assert isinstance(hand, FedL2GClient)
    (study,) = hand._batches_of(hand.study_index(), 1)
    (quiz,) = hand._batches_of(hand.quiz["index"], 1)
    model = hand.model
    params = {k: v.detach() for k, v in model.named_parameters()}
    guide = message["guide/vectors"]
    xs, ys = hand.gather(study)
    xq, yq = hand.gather(quiz)

    def part(p: dict, prefix: str) -> dict:
        return {k.removeprefix(prefix): t for k, t in p.items() if k.startswith(prefix)}

    def features(p: dict) -> torch.Tensor:
        return functional_call(model.body, part(p, "body."), (xs,))

    def study_loss(p: dict) -> torch.Tensor:
        feats = features(p)
        logits = functional_call(model.head, part(p, "head."), (feats,))
        return hand.guided_loss(feats, logits, ys, guide)

    leaves = {k: v.clone().requires_grad_(True) for k, v in params.items()}
    grads = torch.autograd.grad(study_loss(leaves), list(leaves.values()))
    stepped = {
        k: (v - LR * g).requires_grad_(True)
        for (k, v), g in zip(params.items(), grads, strict=True)
    }
    quiz_loss = torch.nn.functional.cross_entropy(functional_call(model, stepped, (xq,)), yq)
    v = torch.autograd.grad(quiz_loss, list(stepped.values()))
    v = dict(zip(stepped, v, strict=True))  # the quiz gradient at the stepped parameters

    _, jv = jvp(features, (params,), (v,))  # (B, D): J_i v for every study sample
    expected = torch.zeros_like(guide).index_add_(0, ys, jv) * 2 * LR / (ys.numel() * FEATURES)
    assert torch.equal(classes, torch.unique(ys))
    assert torch.allclose(grad, expected, atol=1e-7, rtol=1e-4)
    assert grad[classes].abs().sum() > 0
    fed.close()


def test_fedl2g_server_averages_per_class_clips_and_steps():
    fed = federation("fedl2g", variant="logit", server_lr=0.5, max_grad_norm=3.0)
    server = fed.server
    assert server.guide.shape == (CLASSES, CLASSES)
    g0 = server.guide.clone()
    a = torch.tensor([[1.0, 0, 0, 0], [0, 2.0, 0, 0]])
    b = torch.tensor([[3.0, 0, 0, 0]])
    replies = {
        0: Reply({"guide/grad": a, "guide/classes": torch.tensor([0, 1])}, 10),
        2: Reply({"guide/grad": b, "guide/classes": torch.tensor([0])}, 50),
    }
    server.aggregate(1, replies)
    # class 0: (1 + 3) / 2 clients, whatever their sample counts; class 1: one client, 2;
    # classes 2 and 3: nobody, zero. Norm sqrt(8) < 3: no clipping.
    expected = g0.clone()
    expected[0, 0] -= 0.5 * 2.0
    expected[1, 1] -= 0.5 * 2.0
    assert torch.allclose(server.guide, expected, atol=1e-6)

    big = {
        0: Reply(
            {"guide/grad": torch.full((1, CLASSES), 100.0), "guide/classes": torch.tensor([3])}, 1
        )
    }
    before = server.guide.clone()
    server.aggregate(2, big)
    step = before - server.guide
    assert step[3].norm() == pytest.approx(0.5 * 3.0, rel=1e-5)  # clipped to norm 3
    assert torch.equal(step[:3], torch.zeros(3, CLASSES))
    after = server.guide.clone()
    server.aggregate(3, {})  # nothing received: unchanged
    assert torch.equal(server.guide, after)
    fed.close()
