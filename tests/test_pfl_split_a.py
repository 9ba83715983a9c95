"""Defining behaviour of the model-splitting pFL algorithms FedPer, FedBABU, FedRoD, FedCP and
FedGC, and their hyperparameter errors."""

from __future__ import annotations

import pytest
import torch
from helpers import tiny_config
from torch import nn

from fl_core.algorithms import PartError
from fl_core.algorithms.losses import balanced_softmax_loss
from fl_core.config import ConfigError, build_config
from fl_core.engine import Federation, run


def config(algorithm: str, model: str = "mlp", **hparams) -> dict:
    return tiny_config(algorithm, model=model, image_size=12, **hparams)


def federation(algorithm: str, model: str = "mlp", **hparams) -> Federation:
    return Federation(build_config(config(algorithm, model, **hparams)))


def one_round(fed: Federation, rnd: int = 1) -> dict:
    """Train round ``rnd``; returns the replies (the server has not aggregated them yet)."""
    fed.train_round(rnd)
    return dict(fed.pending_replies)


def initial(fed: Federation, prefix: str) -> dict[str, torch.Tensor]:
    """The federation's initial tensors of the model under ``prefix`` ("head", "body")."""
    state = fed.runtime.initial_state(fed.architectures[0])
    return {k: v for k, v in state.items() if k.startswith(prefix + ".")}


def same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def sub(module: nn.Module, prefix: str) -> dict[str, torch.Tensor]:
    return {f"{prefix}.{k}": v.detach().clone() for k, v in module.state_dict().items()}


# -- FedPer -------------------------------------------------------------------------------------
def test_fedper_heads_differ_and_bodies_are_equal_after_aggregation():
    fed = federation("fedper")
    replies = one_round(fed)
    for reply in replies.values():
        assert reply.message and all(k.startswith("model/body.") for k in reply.message)
    # body and head trained together, as many steps as FedAvg takes (no separate head epochs)
    fedavg = federation("fedavg")
    steps = {cid: r.metrics["steps"] for cid, r in one_round(fedavg).items()}
    fedavg.close()
    assert {cid: r.metrics["steps"] for cid, r in replies.items()} == steps
    fed.aggregate(1)
    heads = [fed.store.get(cid) for cid in range(4)]
    assert all(set(h) == {"model/head.weight", "model/head.bias"} for h in heads)
    start = initial(fed, "head")["head.weight"]
    for i in range(4):
        assert not torch.equal(heads[i]["model/head.weight"], start)  # every head trained
        for j in range(i):
            assert not torch.equal(heads[i]["model/head.weight"], heads[j]["model/head.weight"])
    bodies = []
    for cid in range(4):
        client = fed.runtime.client(cid, 2, "train", fed.store.get(cid))
        client.receive(fed.server.broadcast(2))
        bodies.append(sub(client.model.body, "body"))
        assert torch.equal(client.model.head.weight.detach(), heads[cid]["model/head.weight"])
        with pytest.raises(PartError, match="model/head.weight"):
            client.receive({"model/head.weight": torch.zeros_like(client.model.head.weight)})
    assert all(same(b, bodies[0]) for b in bodies)
    assert not same(bodies[0], initial(fed, "body"))
    fed.close()


# -- FedBABU ------------------------------------------------------------------------------------
def test_fedbabu_head_stays_at_its_initial_value_while_the_body_trains():
    fed = federation("fedbabu")
    head0 = initial(fed, "head")
    for rnd in (1, 2):
        broadcast = fed.server.broadcast(rnd)
        assert all(k.startswith("model/body.") for k in broadcast)
        for cid in fed.select(rnd):
            client = fed.runtime.client(cid, rnd, "train", fed.store.get(cid))
            client.receive(broadcast)
            before = sub(client.model.body, "body")
            reply = client.fit()
            assert same(sub(client.model.head, "head"), head0)  # frozen while training
            assert not same(sub(client.model.body, "body"), before)
            assert all(k.startswith("model/body.") for k in reply.message)
            assert client.state_dict() == {}  # nothing personal persists
        one_round(fed, rnd)
        fed.aggregate(rnd)
    fed.close()


def _evaluated_head(fed: Federation, cid: int, rnd: int) -> tuple[dict, float]:
    client = fed.runtime.client(cid, rnd, "eval", fed.store.get(cid))
    client.receive(fed.server.evaluation_broadcast(rnd))
    report = client.evaluate()
    return sub(client.model.head, "head"), report.test_correct / report.test_num


def test_fedbabu_evaluates_the_model_fine_tuned_for_finetune_epochs():
    fed = federation("fedbabu", finetune_epochs=3)
    plain = federation("fedbabu", finetune_epochs=0)
    for f in (fed, plain):
        one_round(f)
        f.aggregate(1)
    head0 = initial(fed, "head")
    # fine-tuned: the evaluated head moved, exactly as fine-tuning the whole model does
    head, _ = _evaluated_head(fed, 0, 1)
    assert not same(head, head0)
    manual = fed.runtime.client(0, 1, "eval", {})
    manual.receive(fed.server.evaluation_broadcast(1))
    manual.train(epochs=3)
    assert same(head, sub(manual.model.head, "head"))
    # finetune_epochs=0: the global body with the initial head (PFLlib's per-round numbers)
    head, _ = _evaluated_head(plain, 0, 1)
    assert same(head, head0)
    # a new client fine-tunes once, for the federation's new-client epochs
    calls = []
    client = fed.runtime.client(0, 1, "eval", {})
    real = client.train
    client.train = lambda **kw: (calls.append(kw.get("epochs")), real(**kw))[1]
    client.receive(fed.server.evaluation_broadcast(1))
    client.finetune(1)
    client.evaluate()
    assert calls == [1]
    fed.close()
    plain.close()


def test_fedbabu_fine_tuning_personalises():
    runs = {e: run(build_config(config("fedbabu", rounds=3, finetune_epochs=e))) for e in (0, 5)}
    assert runs[5].best_test_acc > runs[0].best_test_acc + 0.05


# -- FedRoD -------------------------------------------------------------------------------------
def test_fedrod_personal_head_never_travels():
    fed = federation("fedrod")
    replies = one_round(fed)
    model_keys = {f"model/{k}" for k in fed.runtime.initial_state(fed.architectures[0])}
    for reply in replies.values():
        assert set(reply.message) == model_keys  # body and generic head, nothing else
    fed.aggregate(1)
    assert all(k.startswith("model/") for k in fed.server.broadcast(2))
    states = [fed.store.get(cid) for cid in range(4)]
    assert all(set(s) == {"personal/weight", "personal/bias"} for s in states)
    start = initial(fed, "head")["head.weight"]
    assert all(not torch.equal(s["personal/weight"], start) for s in states)
    assert not torch.equal(states[0]["personal/weight"], states[1]["personal/weight"])
    client = fed.runtime.client(0, 2, "train", states[0])
    with pytest.raises(PartError, match="personal/weight"):
        client.receive({"personal/weight": states[1]["personal/weight"]})
    fed.close()


def test_fedrod_generic_head_learns_by_balanced_softmax_and_personal_head_on_the_sum():
    fed = federation("fedrod")
    one_round(fed)
    fed.aggregate(1)
    cid = 0
    client = fed.runtime.client(cid, 2, "train", fed.store.get(cid))
    client.receive(fed.server.broadcast(2))
    data = fed.dataset.clients[cid]
    x, y = data.train_x[:32], data.train_y[:32]
    counts = torch.bincount(data.train_y, minlength=4)
    assert len(set(counts.tolist())) > 1  # skewed, so balanced softmax is not cross-entropy
    model, personal = client.model, client.personal

    def grads(loss):
        params = [*model.parameters(), *personal.parameters()]
        got = torch.autograd.grad(loss, params, allow_unused=True)
        return [torch.zeros_like(p) if g is None else g for p, g in zip(params, got, strict=True)]

    features = model.body(x)
    generic = model.head(features)
    bsm = balanced_softmax_loss(generic, y, counts)
    pers = nn.functional.cross_entropy(generic.detach() + personal(features.detach()), y)
    got = grads(client.loss(model, x, y))
    want = grads(bsm + pers)
    n_model = len(list(model.parameters()))
    for g, w in zip(got, want, strict=True):
        assert torch.allclose(g, w, atol=1e-6)
    # the body and generic head see the balanced loss only; the personal head its own loss only
    only_bsm = grads(balanced_softmax_loss(model.head(model.body(x)), y, counts))
    for g, w in zip(got[:n_model], only_bsm[:n_model], strict=True):
        assert torch.allclose(g, w, atol=1e-6)
    plain_ce = grads(nn.functional.cross_entropy(model(x), y))
    head_w = n_model - 2  # head.weight among the model's parameters
    assert not torch.allclose(got[head_w], plain_ce[head_w], atol=1e-4)
    # prediction: the sum of both heads
    with torch.no_grad():
        assert torch.allclose(client.predict(model, x), generic + personal(features), atol=1e-6)
    fed.close()


# -- FedCP --------------------------------------------------------------------------------------
def test_fedcp_shares_body_global_head_and_policy_and_keeps_the_personal_head():
    fed = federation("fedcp", head_mix=0.25)
    broadcast = fed.server.broadcast(1)
    prefixes = {k.split("/")[0] + "/" + k.split("/")[1].split(".")[0] for k in broadcast}
    assert prefixes == {"model/body", "ghead/weight", "ghead/bias", "cpn/fc", "cpn/norm"}
    assert torch.equal(broadcast["ghead/weight"], initial(fed, "head")["head.weight"])
    replies = one_round(fed)
    for cid, reply in replies.items():
        assert not any(k.startswith("model/head") for k in reply.message)
        assert set(reply.message) == set(broadcast)
        personal = fed.store.get(cid)["model/head.weight"]
        expected = 0.25 * personal + 0.75 * broadcast["ghead/weight"]
        assert torch.allclose(reply.message["ghead/weight"], expected, atol=1e-6)
    fed.aggregate(1)
    total = sum(r.num_samples for r in replies.values())
    for key in ("ghead/weight", "cpn/fc.weight"):
        avg = sum(r.message[key].double() * r.num_samples for r in replies.values()) / total
        assert torch.allclose(fed.server.global_state[key].double(), avg, atol=1e-6)
    assert all(set(fed.store.get(c)) == {"model/head.weight", "model/head.bias"} for c in replies)
    fed.close()


def test_fedcp_policy_splits_features_between_the_heads_and_mmd_pulls_to_the_received_body():
    from fl_core.algorithms.fedcp import fedcp_mmd

    fed = federation("fedcp", lam=2.0)
    one_round(fed)
    fed.aggregate(1)
    client = fed.runtime.client(0, 2, "train", fed.store.get(0))
    client.receive(fed.server.broadcast(2))
    x, y = fed.dataset.clients[0].train_x[:16], fed.dataset.clients[0].train_y[:16]
    model = client.model
    head = model.head.weight.detach()
    v = head.sum(0, keepdim=True) / head.sum(0).norm()
    assert torch.allclose(client.vector(), v, atol=1e-6)
    state = client.ctx.rng.get_state()
    with torch.no_grad():
        features = model.body(x)
        r, s = client.cpn(features * v, 1.0, client.ctx.rng)
        assert torch.allclose(r + s, torch.ones_like(r)) and bool((r > 0).all() & (s > 0).all())
        expected = model.head(features * r) + client.ghead(features * s)
        client.ctx.rng.set_state(state)
        assert torch.allclose(client.predict(model, x), expected, atol=1e-6)
    # the MMD term is zero at receipt and lam·MMD(features, received features) once they differ
    client.ctx.rng.set_state(state)
    ce = nn.functional.cross_entropy(expected, y)
    assert torch.allclose(client.loss(model, x, y), ce, atol=1e-5)
    with torch.no_grad():
        for p in model.body.parameters():
            p.add_(0.05 * torch.randn_like(p))
        features = model.body(x)
        target = client.received_body(x)
        client.ctx.rng.set_state(state)
        r, s = client.cpn(features * v, 1.0, client.ctx.rng)
        ce = nn.functional.cross_entropy(model.head(features * r) + client.ghead(features * s), y)
        term = fedcp_mmd(features, target, (20.0, 30.0, 40.0, 100.0))
    assert float(term) > 0
    client.ctx.rng.set_state(state)
    loss = client.loss(model, x, y)
    assert torch.allclose(loss, ce + 2.0 * term, atol=1e-5)
    # trained: body, personal head, policy; frozen: the global head and the received body
    loss.backward()
    assert all(p.grad is not None for p in [*model.body.parameters(), *client.cpn.parameters()])
    assert all(p.grad is not None for p in model.head.parameters())
    assert all(p.grad is None for p in client.ghead.parameters())
    assert all(p.grad is None for p in client.received_body.parameters())
    fed.close()


def test_fedcp_mmd_is_pfllibs_rbf_mmd():
    from fl_core.algorithms.fedcp import fedcp_mmd

    g = torch.Generator().manual_seed(3)
    x, y = torch.randn(12, 7, generator=g) * 3, torch.randn(12, 7, generator=g) * 3 + 1

    def pfllib_rbf(a, b):  # sum over widths 10, 15, 20, 50 of exp(-0.5·d²/w), mean of XX+YY-2XY
        d = lambda p, q: ((p[:, None] - q[None]) ** 2).sum(-1)  # noqa: E731
        k = lambda dd: sum(torch.exp(-0.5 * dd / w) for w in (10, 15, 20, 50))  # noqa: E731
        return (k(d(a, a)) + k(d(b, b)) - 2 * k(d(a, b))).mean()

    got = fedcp_mmd(x, y, (20.0, 30.0, 40.0, 100.0))
    assert torch.allclose(got, pfllib_rbf(x, y), atol=1e-5)


# -- FedGC --------------------------------------------------------------------------------------
def _brute_force_reg(embeddings: dict, classes: dict, num_classes: int) -> torch.Tensor:
    """PFLlib's loop: for every client's every class row, -log(e^{a·a} / (e^{a·a} + Σ e^{a·w}))
    over the rows w of the clients that lack the class; the anchor a is the class mean, fixed."""
    anchors = {}
    for c in range(num_classes):
        rows = [embeddings[k][list(classes[k]).index(c)] for k in embeddings if c in classes[k]]
        if rows:
            anchors[c] = (sum(r.detach() for r in rows) / len(rows)).double()
    reg = torch.zeros((), dtype=torch.float64)
    for k in embeddings:
        for c in classes[k]:
            a = anchors[c]
            pos = torch.exp(a @ a)
            neg = sum(
                torch.exp(embeddings[j].double() @ a).sum()
                for j in embeddings
                if c not in classes[j]
            )
            reg = reg - torch.log(pos / (pos + neg))
    return reg


def test_fedgc_server_corrects_embeddings_by_one_step_on_the_cross_client_regulariser():
    fed = federation("fedgc", lam=2.0)
    replies = one_round(fed)
    fed.aggregate(1)
    uploads = {c: r.message["emb/weight"] for c, r in replies.items()}
    classes = {c: r.message["emb/classes"].tolist() for c, r in replies.items()}
    assert any(len(cl) < 4 for cl in classes.values())  # some client lacks a class
    for c, r in replies.items():
        assert r.message["emb/weight"].shape == (len(classes[c]), 16)
    weights = {c: w.clone().double().requires_grad_(True) for c, w in uploads.items()}
    _brute_force_reg(weights, classes, 4).backward()
    for c in uploads:
        grad = weights[c].grad if weights[c].grad is not None else 0.0  # holds every class
        expected = uploads[c].double() - 2.0 * 0.05 * grad
        assert torch.allclose(fed.server.embeddings[c].double(), expected, atol=1e-5)
    # a client lacking a class moves its embeddings away from that class's anchor
    lacker = next(c for c, cl in classes.items() if len(cl) < 4)
    missing = next(k for k in range(4) if k not in classes[lacker])
    holders = [uploads[c][classes[c].index(missing)] for c in uploads if missing in classes[c]]
    anchor = sum(holders) / len(holders)
    assert (fed.server.embeddings[lacker] @ anchor < uploads[lacker] @ anchor).all()
    # each client gets its own corrected embeddings back; an unseen client the initial table
    messages = fed.server.configure(2, [0, 1, 2, 3, 4])
    for c in uploads:
        assert torch.equal(messages[c]["emb/weight"], fed.server.embeddings[c])
    assert set(messages[4]) == {"init/weight"} and messages[4]["init/weight"].shape == (4, 16)
    fed.close()


def test_fedgc_without_correction_keeps_the_uploads_and_predicts_only_local_classes():
    fed = federation("fedgc", lam=0.0)
    replies = one_round(fed)
    fed.aggregate(1)
    for c, r in replies.items():
        assert torch.equal(fed.server.embeddings[c], r.message["emb/weight"])
    cid = next(c for c, r in replies.items() if len(r.message["emb/classes"]) < 4)
    client = fed.runtime.client(cid, 1, "eval", {})
    messages = fed.server.configure_evaluation(1, [cid])
    client.receive({**fed.server.evaluation_broadcast(1), **messages[cid]})
    assert torch.equal(client.emb.weight.detach(), fed.server.embeddings[cid])
    x = torch.cat([fed.dataset.clients[k].test_x for k in range(4)])
    with torch.no_grad():
        predicted = set(client.predict(client.model, x).argmax(1).tolist())
    assert predicted <= set(replies[cid].message["emb/classes"].tolist())
    fed.close()


# -- all of them --------------------------------------------------------------------------------
@pytest.mark.parametrize("algorithm", ["fedper", "fedbabu", "fedrod", "fedcp", "fedgc"])
def test_learns_on_digits(algorithm):
    from fl_core.config import load_config

    over = [
        "federation.executor=sequential",
        "federation.rounds=6",
        "federation.eval_every=6",
        "federation.eval_train_loss=false",
        "model.feature_dim=64",
        f"algorithm.name={algorithm}",
    ]
    result = run(load_config("configs/quick_digits.yaml", over))
    assert result.best_test_acc > 0.4  # 10 classes: chance is 0.1


@pytest.mark.parametrize(
    "algorithm, hparams, field",
    [
        ("fedper", {"head_epochs": 1}, "algorithm.head_epochs: unknown key"),
        ("fedbabu", {"finetune_epochs": -1}, "algorithm.finetune_epochs"),
        ("fedrod", {"lam": 1.0}, "algorithm.lam: unknown key"),
        ("fedcp", {"lam": -1.0}, "algorithm.lam"),
        ("fedcp", {"head_mix": 1.5}, "algorithm.head_mix"),
        ("fedcp", {"tau": 0.0}, "algorithm.tau"),
        ("fedgc", {"lam": -0.5}, "algorithm.lam"),
    ],
)
def test_bad_hyperparameters_get_a_clear_config_error(algorithm, hparams, field):
    with pytest.raises(ConfigError, match=field):
        build_config(config(algorithm, **hparams))
