"""The defining behaviour of FedFomo, FedAMP, APPLE, FedPCL and FedPAC (personalised aggregation
and prototype algorithms), and the server-side model store they rely on."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from helpers import tiny_config
from torch import nn

from fl_core.algorithms._model_store import ModelStore, pack_models, unpack_models
from fl_core.algorithms.parts import PartError
from fl_core.config import ConfigError, build_config
from fl_core.engine import Federation, run


def config(algorithm: str, rounds: int = 3, **hparams) -> dict:
    return tiny_config(algorithm, rounds=rounds, image_size=12, **hparams)


def federation(algorithm: str, **hparams) -> Federation:
    return Federation(build_config(config(algorithm, **hparams)))


def train_rounds(fed: Federation, rounds: int) -> None:
    for rnd in range(1, rounds + 1):
        fed.train_round(rnd)
        fed.aggregate(rnd)


def histories(result) -> list[dict]:
    return [h.metrics for h in result.history]


# -- the server's model store ---------------------------------------------------------------
def test_model_store_spills_past_its_budget_and_reads_back_exactly():
    default = {"w": torch.zeros(3, 4), "n": torch.zeros((), dtype=torch.int64)}
    store = ModelStore(memory_budget=2 * (12 * 4 + 8), default=default)
    states = {c: {"w": torch.randn(3, 4), "n": torch.tensor(c)} for c in range(6)}
    for c, s in states.items():
        store.put(c, s)
    assert store.spills == 4 and store.memory_bytes <= store.memory_budget
    assert store.ids() == list(range(6))
    for c, s in states.items():
        assert all(torch.equal(store.get(c)[k], s[k]) for k in s)
    assert store.get(99) is store.default  # a client that never uploaded
    flat = store.state_dict("m/")
    again = ModelStore(10**9, default)
    again.load_state_dict(flat, "m/")
    assert all(torch.equal(again.get(c)["w"], states[c]["w"]) for c in states)
    with pytest.raises(PartError, match="unexpected"):
        store.put(0, {"w": torch.zeros(3, 4), "n": torch.tensor(0), "x": torch.zeros(1)})


def test_packed_models_unpack_and_a_stray_key_is_refused():
    template = {"a": torch.zeros(2), "b": torch.zeros(1, 3)}
    models = [{"a": torch.ones(2), "b": torch.full((1, 3), 2.0)}, template]
    msg = {**pack_models("peers", models), "other/x": torch.ones(1)}
    rest, back = unpack_models(msg, "peers", template)
    assert set(rest) == {"other/x"} and torch.equal(back[0]["b"], models[0]["b"])
    with pytest.raises(PartError, match="peers/0.c"):
        unpack_models({"peers/0.c": torch.zeros(1)}, "peers", template)
    with pytest.raises(PartError, match="shape"):
        unpack_models({"peers/0.a": torch.zeros(3)}, "peers", template)


# -- FedAMP ---------------------------------------------------------------------------------
def test_fedamp_attraction_has_the_gradient_of_the_squared_distance_to_the_cloud_model():
    lam, alpha_k = 4.0, 2.0
    fed = federation("fedamp", lam=lam, alpha_k=alpha_k, sigma=50.0)
    train_rounds(fed, 1)
    cid = 0
    message = fed.server.configure(2, [cid])[cid]
    client = fed.runtime.client(cid, 2, "train", fed.store.get(cid))
    client.receive(message)
    cloud = {k.removeprefix("cloud/"): v for k, v in message.items()}
    before = {n: p.detach().clone() for n, p in client.model.named_parameters()}
    assert sum(float((before[n] - cloud[n]).abs().sum()) for n in before) > 1e-3

    x, y = fed.dataset.clients[cid].train_x[:16], fed.dataset.clients[cid].train_y[:16]
    reference = fed.runtime.new_model(client.ctx.arch)
    reference.load_state_dict(client.model.state_dict())
    reg = sum(((p - cloud[n]) ** 2).sum() for n, p in reference.named_parameters())
    loss = nn.functional.cross_entropy(reference(x), y) + lam / (2 * alpha_k) * reg
    loss.backward()
    lr = fed.config.federation.lr
    expected = {n: p.detach() - lr * p.grad for n, p in reference.named_parameters()}

    client.batches = lambda epochs=None: iter([(x, y)])
    client.train()
    for n, p in client.model.named_parameters():
        assert torch.allclose(p.detach(), expected[n], atol=1e-6), n
    fed.close()


def test_fedamp_cloud_model_is_the_attention_weighted_mix_of_every_stored_model():
    fed = federation("fedamp", alpha_k=0.05, sigma=2.0)
    train_rounds(fed, 1)
    server = fed.server
    vec = {j: server._vector(server.store.get(j)) for j in range(4)}
    for i in range(4):
        xi = torch.tensor(
            [
                0.0 if j == i else 0.05 * math.exp(-float(((vec[i] - vec[j]) ** 2).sum()) / 2) / 2
                for j in range(4)
            ]
        )
        assert 0 < float(xi.sum()) < 1  # a convex combination: no rescaling here
        expected = (1 - xi.sum()) * vec[i] + sum(xi[j] * vec[j] for j in range(4))
        got = server.cloud_models([i])[i]
        assert torch.allclose(got, expected, atol=1e-5)
    # under a tiny memory budget the clients are taken one block at a time: same cloud models
    together = server.cloud_models([0, 1, 2, 3])
    server.store.memory_budget = 1
    blocked = server.cloud_models([0, 1, 2, 3])
    assert all(torch.allclose(together[i], blocked[i], rtol=0, atol=1e-7) for i in together)
    # configure computes the messages lazily, one block at a time, with the same values
    calls = []
    real_block = server._cloud_block
    server._cloud_block = lambda ids, size: calls.append(list(ids)) or real_block(ids, size)
    messages = server.configure(2, [0, 1, 2, 3])
    assert calls == [] and len(messages) == 4
    first = messages.get(0)
    assert calls == [[0]]  # one client per block under this budget: only its own computed
    for i in (1, 2, 3):
        msg = messages.get(i)
        flat = torch.cat(
            [msg["cloud/" + k.removeprefix("model/")].reshape(-1) for k in server.param_shapes]
        )
        assert torch.equal(flat, blocked[i])
    assert calls == [[0], [1], [2], [3]] and first.keys() == msg.keys()
    fed.close()


def test_fedamp_distances_by_matrix_products_equal_the_pairwise_ones(monkeypatch):
    from fl_core.algorithms import fedamp

    fed = federation("fedamp", alpha_k=0.05, sigma=2.0)
    server = fed.server
    g = torch.Generator().manual_seed(3)
    for cid in (0, 2, 3):  # client 1 never uploads: it counts with the initial model
        noisy = {
            k: v + 3.0 + 0.002 * torch.randn(v.shape, generator=g)
            for k, v in server.store.default.items()
        }  # far from 0: the cancellation a Gram risks
        server.store.put(cid, noisy)
    vec = {j: server._vector(server.store.get(j)).double() for j in range(4)}
    brute = torch.tensor(
        [[float(((vec[i] - vec[j]) ** 2).sum()) for j in range(4)] for i in range(4)],
        dtype=torch.float64,
    )
    assert float(brute[0, 2]) > 0.1 and float(brute[0, 1]) > 1e4
    assert torch.allclose(server.distances([0, 1, 2, 3]), brute, rtol=1e-9, atol=1e-7)
    # and in single-client groups, with the store on disk and the vectors cut in many slices
    server_models = {cid: dict(server.store.get(cid)) for cid in (0, 2, 3)}
    server.store.memory_budget = 1
    for cid, state in server_models.items():
        server.store.put(cid, state)
    assert server.store.spills > 0
    monkeypatch.setattr(fedamp, "_SLICE_BYTES", 8 * 4096)
    assert torch.allclose(server.distances([3, 0]), brute[[3, 0]], rtol=1e-9, atol=1e-7)
    for i, got in server.cloud_models([0, 2, 3]).items():
        xi = torch.tensor(
            [0.0 if j == i else 0.05 * math.exp(-float(brute[i, j]) / 2) / 2 for j in range(4)],
            dtype=torch.float64,
        )
        expected = (1 - xi.sum()) * vec[i] + sum(xi[j] * vec[j] for j in range(4))
        assert torch.allclose(got.double(), expected, rtol=0, atol=1e-6)
    fed.close()


def test_fedamp_without_attraction_trains_like_local_and_with_it_does_not():
    local = histories(run(build_config(config("local"))))
    assert histories(run(build_config(config("fedamp", lam=0.0)))) == local
    assert histories(run(build_config(config("fedamp", sigma=50.0)))) != local


# -- FedFomo --------------------------------------------------------------------------------
def test_fedfomo_mixes_in_only_models_that_lower_the_validation_loss():
    fed = federation("fedfomo")
    train_rounds(fed, 2)
    cid = 0
    # a better model (the own one trained further on the same data) and a worse one (noise);
    # clients share one pooled model instance, so the better one is built first
    better = fed.runtime.client(cid, 3, "train", fed.store.get(cid))
    better.train(epochs=20)
    good = {k: v.clone() for k, v in better.model.state_dict().items()}
    client = fed.runtime.client(cid, 3, "train", fed.store.get(cid))
    own = {k: v.clone() for k, v in client.model.state_dict().items()}
    bad = {k: v + 3 * torch.randn_like(v) if v.is_floating_point() else v for k, v in own.items()}
    client.receive({**pack_models("peers", [bad, good]), "fomo/ids": torch.tensor([1, 2])})
    own_loss = client.validation_loss(client.model)
    raw = client.weigh_and_mix()
    assert raw[0] < 0 < raw[1]
    # the only positive weight normalises to 1: the client's model becomes the better model
    assert all(torch.allclose(client.model.state_dict()[k].float(), good[k].float()) for k in good)
    assert client.validation_loss(client.model) < own_loss

    # every received model is worse: the client keeps its own model
    client = fed.runtime.client(cid, 3, "train", fed.store.get(cid))
    client.receive({**pack_models("peers", [bad]), "fomo/ids": torch.tensor([1])})
    assert client.weigh_and_mix()[0] < 0
    assert all(torch.equal(client.model.state_dict()[k], own[k]) for k in own)
    fed.close()


def test_fedfomo_server_sends_top_affinity_models_and_adds_the_weights_to_affinity():
    fed = federation("fedfomo", num_models=2, epsilon=0.0)
    fed.train_round(1)
    assert all(len(r.message["fomo/ids"]) == 0 for r in fed.pending_replies.values())
    fed.aggregate(1)
    fed.server.affinity[0] = torch.tensor([1.0, 0.1, 0.7, 0.3], dtype=torch.float64)
    chosen = fed.server.choose(2, [0, 1])
    assert chosen[0] == [2, 3] and 1 not in chosen[1] and len(chosen[1]) == 2
    before = fed.server.affinity.clone()
    fed.train_round(2)
    replies = fed.pending_replies
    fed.aggregate(2)
    for cid, reply in replies.items():
        ids, w = reply.message["fomo/ids"], reply.message["fomo/weights"]
        assert len(ids) == 2 and cid not in ids.tolist()
        assert torch.allclose(fed.server.affinity[cid, ids], before[cid, ids] + w)
    fed.close()


def test_fedfomo_validation_split_is_spread_and_held_out_of_training():
    from fl_core.algorithms.fedfomo import validation_positions

    mask = validation_positions(10, 0.2)
    assert mask.tolist() == [False, False, False, False, True] * 2
    fed = federation("fedfomo")
    client = fed.runtime.client(0, 1, "train", {})
    seen = torch.cat([x for x, _ in client.batches(1)])
    n = fed.dataset.clients[0].num_train
    assert seen.shape[0] == n - int(n * 0.2)
    fed.close()


# -- APPLE ----------------------------------------------------------------------------------
def test_apple_dr_weights_start_at_the_sample_shares_which_sum_to_one():
    fed = federation("apple", dr_lr=0.0)
    p0 = fed.server.broadcast(1)["dr/p0"]
    assert torch.allclose(p0, torch.full((4,), 0.25))  # no sample count known before round 1
    fed.train_round(1)
    replies = fed.pending_replies
    fed.aggregate(1)
    counts = torch.tensor([float(fed.dataset.clients[c].num_train) for c in range(4)])
    p0 = fed.server.broadcast(2)["dr/p0"]
    assert torch.allclose(p0, counts / counts.sum()) and math.isclose(float(p0.sum()), 1.0)
    # with frozen DR weights the personalized model is exactly Σ_j p_j·w_j of this round's cores
    init = fed.runtime.new_model(fed.architectures[0]).state_dict()
    for cid, reply in replies.items():
        state = fed.store.get(cid)
        p = state["dr/p"]
        assert torch.allclose(p, torch.full((4,), 0.25)) and math.isclose(float(p.sum()), 1.0)
        for name, _ in fed.runtime.new_model(fed.architectures[0]).named_parameters():
            own = reply.message[f"model/{name}"]
            expected = sum(p[j] * (own if j == cid else init[name]) for j in range(4))
            assert torch.allclose(state[f"personal/{name}"], expected, atol=1e-6)
    fed.close()


def test_apple_one_step_follows_the_exact_gradients_of_core_and_dr_weights():
    fed = federation("apple", dr_lr=0.01, mu=0.5, anneal_fraction=1.0)
    train_rounds(fed, 1)
    cid, lr, pull = 1, fed.config.federation.lr, 0.5 * (math.cos(math.pi / 3) + 1) / 2
    broadcast = fed.server.broadcast(2)
    client = fed.runtime.client(cid, 2, "train", fed.store.get(cid))
    client.receive(broadcast)
    p, p0, cores = client.dr["p"].clone(), client.p0.float(), client.cores
    names = [n for n, _ in client.model.named_parameters()]
    mixed = fed.runtime.new_model(client.ctx.arch)
    with torch.no_grad():
        for n, param in mixed.named_parameters():
            param.copy_(sum(p[j] * cores[j][n] for j in range(4)))
    x, y = fed.dataset.clients[cid].train_x[:16], fed.dataset.clients[cid].train_y[:16]
    nn.functional.cross_entropy(mixed(x), y).backward()
    g = {n: param.grad for n, param in mixed.named_parameters()}
    dot = torch.tensor([sum(float((g[n] * cores[j][n]).sum()) for n in names) for j in range(4)])
    expected_p = p - 0.01 * (dot + 2 * pull * (p - p0))
    expected_core = {n: cores[cid][n] - lr * p[cid] * g[n] for n in names}

    client.batches = lambda epochs=None: iter([(x, y)])
    client.train_apple()
    assert torch.allclose(client.dr["p"], expected_p, atol=1e-5)
    for n, param in client.model.named_parameters():
        assert torch.allclose(param.detach(), expected_core[n], atol=1e-6), n
    assert not torch.allclose(client.dr["p"], p)  # the weights move and are not projected
    fed.close()


# -- FedPAC ---------------------------------------------------------------------------------
def test_fedpac_qp_solver_matches_a_closed_form():
    from fl_core.algorithms.fedpac import mixture_weights

    # diag(a, b): minimising a·α₁² + b·α₂² on the simplex gives α ∝ (1/a, 1/b)
    alpha = mixture_weights(np.diag([1.0, 3.0]))
    assert np.allclose(alpha, [0.75, 0.25], atol=1e-6)
    assert np.allclose(mixture_weights(np.ones((1, 1))), [1.0])


def test_fedpac_qp_weights_are_a_valid_mixture_that_minimises_the_objective_and_mix_heads():
    from fl_core.algorithms.fedpac import qp_matrix

    fed = federation("fedpac")
    fed.train_round(1)
    replies = fed.pending_replies
    fed.aggregate(1)
    ids = sorted(replies)
    v = torch.cat([replies[c].message["stats/v"].double() for c in ids])
    h = torch.stack([replies[c].message["stats/h"].double().flatten() for c in ids])
    rng = np.random.default_rng(0)
    candidates = np.vstack([np.eye(len(ids)), rng.dirichlet(np.ones(len(ids)), 500)])
    mixed_any = False
    for a, cid in enumerate(ids):
        alpha = fed.server.last_weights[cid]
        assert (alpha >= 0).all() and math.isclose(alpha.sum(), 1.0, abs_tol=1e-9)
        p = qp_matrix(v, h, a)
        best = float(alpha @ p @ alpha)
        assert best <= min(float(c @ p @ c) for c in candidates) + 1e-9 * max(1.0, best)
        mixed_any |= bool((alpha < 1 - 1e-6).all())
        head = fed.server.heads[cid]
        for key, value in head.items():
            expected = sum(
                w * replies[j].message[key].double() for w, j in zip(alpha, ids, strict=True)
            )
            assert torch.allclose(value.double(), expected, atol=1e-6)
    assert mixed_any  # some client draws on other clients' heads
    # the personalized head is what the client trains from and is evaluated with
    assert fed.server.configure(2, [0])[0].keys() == fed.server.heads[0].keys()
    assert fed.server.configure_evaluation(2, [0])[0].keys() == fed.server.heads[0].keys()
    fed.close()


def test_fedpac_statistics_are_the_variance_of_the_class_mean_estimate():
    fed = federation("fedpac")
    client = fed.runtime.client(2, 1, "train", {})
    v, h = client.feature_statistics()
    data = fed.dataset.clients[2]
    with torch.no_grad():
        f = client.model.body(data.train_x).double()
    n, expected_v = f.shape[0], 0.0
    for k in range(4):
        z = f * (data.train_y == k).double().unsqueeze(1)  # f·1[y = k]
        assert torch.allclose(h[k].double(), z.mean(0), atol=1e-5)
        expected_v += float((z**2).sum(1).mean() - (z.mean(0) ** 2).sum())
    assert math.isclose(float(v), expected_v / n, rel_tol=1e-4)
    fed.close()


# -- FedPCL ---------------------------------------------------------------------------------
def test_fedpcl_sends_only_prototypes_and_does_not_train_before_global_ones_exist():
    fed = federation("fedpcl")
    up, down = fed.train_round(1)
    classes, feature, n = 4, 16, 4
    assert up == n * (classes * feature * 4 + classes * 8)
    assert down == n * ((n + 1) * classes * feature * 4 + classes * 8)
    init = fed.runtime.new_model(fed.architectures[0]).body.state_dict()
    for cid in range(n):
        body = {k.removeprefix("model/body."): v for k, v in fed.store.get(cid).items()}
        assert all(torch.equal(body[k], init[k]) for k in init)
    fed.aggregate(1)
    # global prototypes: per class, the mean over the clients holding it; the clients' sets
    # are padded with them where a client lacks the class
    msg = fed.server.broadcast(2)
    has = fed.server.client_has.bool()
    for k in range(classes):
        holders = [fed.server.client_protos[j, k] for j in range(n) if has[j, k]]
        assert torch.allclose(msg["proto/global"][k], sum(holders) / len(holders), atol=1e-6)
        for j in range(n):
            expected = fed.server.client_protos[j, k] if has[j, k] else msg["proto/global"][k]
            assert torch.equal(msg["proto/clients"][j, k], expected)
    fed.close()


def test_fedpcl_predicts_the_nearest_local_prototype():
    from fl_core.algorithms.fedpcl import normalized_features

    fed = federation("fedpcl")
    train_rounds(fed, 3)
    cid = next(c for c in range(4) if int((fed.store.get(c)["local/count"] > 0).sum()) >= 2)
    client = fed.runtime.client(cid, 3, "eval", fed.store.get(cid))
    local, count = client.local["proto"].clone(), client.local["count"].clone()
    x = fed.dataset.clients[cid].test_x
    with torch.no_grad():
        z = normalized_features(client.model, x)
        scores = z @ local.T
        scores[:, count == 0] = float("-inf")
        assert torch.equal(client.predict(client.model, x).argmax(1), scores.argmax(1))
        assert set(client.predict(client.model, x).argmax(1).tolist()) <= set(
            torch.nonzero(count).flatten().tolist()
        )
        # swapping two local prototypes swaps the predictions; the global ones play no part
        a, b = torch.nonzero(count).flatten()[:2].tolist()
        client.local["proto"][[a, b]] = local[[b, a]]
        client.proto["global"].normal_()
        swapped = client.predict(client.model, x).argmax(1)
        before = scores.argmax(1)
        assert torch.equal(swapped[before == a], torch.full_like(swapped[before == a], b))
        assert torch.equal(swapped[before == b], torch.full_like(swapped[before == b], a))
    fed.close()


def test_fedpcl_loss_is_the_papers_global_plus_mean_client_contrastive_terms():
    from fl_core.algorithms.fedpcl import normalized_features

    fed = federation("fedpcl")
    train_rounds(fed, 2)
    cid = 0
    client = fed.runtime.client(cid, 3, "fit", fed.store.get(cid))
    client.receive(fed.server.configure(3, [cid]).get(cid, {}) | fed.server.broadcast(3))
    # one class nobody holds: masked out of every softmax, its samples add nothing
    gone = 1
    client.proto["known"][gone] = 0
    x, y = fed.dataset.clients[cid].train_x[:24], fed.dataset.clients[cid].train_y[:24].clone()
    y[:3] = gone
    known = client.proto["known"] > 0
    tau = client.hp.tau
    with torch.no_grad():
        z = normalized_features(client.model, x)
        keep = known[y]
        zk, yk = z[keep], y[keep]

        def ce(protos):
            logits = (zk @ protos.T / tau).masked_fill(~known, float("-inf"))
            return nn.functional.cross_entropy(logits, yk)

        expected = ce(client.proto["global"]) + sum(ce(p) for p in client.client_protos) / len(
            client.client_protos
        )
        got = client.loss(client.model, x, y)
    assert len(client.client_protos) == 4
    assert torch.isclose(got, expected, rtol=1e-5), (float(got), float(expected))
    # a batch with no sample of a known class gives a zero loss and zero (finite) gradients
    client.model.zero_grad()
    zero = client.loss(client.model, x[:3], y[:3])
    zero.backward()
    assert float(zero.detach()) == 0.0
    assert all(torch.isfinite(p.grad).all() for p in client.model.body.parameters())
    fed.close()


# -- learning -------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "algorithm, overrides",
    [
        ("fedfomo", []),
        ("fedamp", []),
        ("apple", ["algorithm.scale_core_lr=true"]),
        ("fedpcl", []),
        ("fedpac", []),
    ],
)
def test_learns_on_digits(algorithm, overrides):
    from fl_core.config import load_config

    over = ["federation.executor=sequential", "federation.rounds=5", "federation.eval_every=5"]
    cfg = load_config(
        "configs/quick_digits.yaml", [*over, f"algorithm.name={algorithm}", *overrides]
    )
    assert run(cfg).best_test_acc > 0.5  # 10 classes: chance is 0.1


# -- bad hyperparameters --------------------------------------------------------------------
@pytest.mark.parametrize(
    "algorithm, field, value",
    [
        ("fedamp", "sigma", 0.0),
        ("fedamp", "lam", -1.0),
        ("fedfomo", "num_models", 0),
        ("fedfomo", "val_ratio", 1.0),
        ("fedfomo", "epsilon", 1.5),
        ("apple", "dr_lr", -0.1),
        ("apple", "schedule", "linear"),
        ("fedpac", "lam", -1.0),
        ("fedpac", "aggregate_by", "median"),
        ("fedpcl", "tau", 0.0),
        ("fedpcl", "max_grad_norm", -1.0),
    ],
)
def test_a_bad_hyperparameter_is_a_config_error_naming_it(algorithm, field, value):
    with pytest.raises(ConfigError, match=f"algorithm.{field}"):
        build_config(config(algorithm, **{field: value}))
    with pytest.raises(ConfigError, match="algorithm.nonsense"):
        build_config(config(algorithm, nonsense=1))
