"""Defining behaviour of Per-FedAvg, pFedMe, APFL, FedPHP, FedALA and FedMTL."""

from __future__ import annotations

import copy
import statistics

import pytest
import torch
from helpers import tiny_config
from torch import nn

from fl_core.config import ConfigError, build_config
from fl_core.engine import Federation, run


def config(algorithm: str, **hparams) -> dict:
    return tiny_config(algorithm, image_size=12, **hparams)


def metrics(result) -> list[dict]:
    return [h.metrics for h in result.history]


def strip(state: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    return {k.removeprefix(prefix): v for k, v in state.items() if k.startswith(prefix)}


def accuracy(model: nn.Module, data) -> tuple[int, int]:
    model.eval()
    with torch.no_grad():
        pred = model(data.test_x).argmax(1)
    return int((pred == data.test_y).sum()), int(data.test_y.shape[0])


# -- bad hyperparameters ------------------------------------------------------------------------
@pytest.mark.parametrize(
    "algorithm, bad, field",
    [
        ("perfedavg", {"alpha": -0.1}, "alpha"),
        ("perfedavg", {"variant": "second"}, "variant"),
        ("pfedme", {"lam": -1.0}, "lam"),
        ("pfedme", {"inner_steps": 0}, "inner_steps"),
        ("apfl", {"alpha": 1.5}, "alpha"),
        ("fedphp", {"mu": 2.0}, "mu"),
        ("fedala", {"eta": 0.0}, "eta"),
        ("fedmtl", {"lam_mean": -1.0}, "lam_mean"),
        ("fedmtl", {"lambda": 1.0}, "lambda"),
    ],
)
def test_bad_hyperparameters_get_a_config_error_naming_the_field(algorithm, bad, field):
    with pytest.raises(ConfigError, match=f"algorithm.{field}"):
        build_config(config(algorithm, **bad))


def test_fedala_refuses_more_top_tensors_than_the_model_has():
    from fl_core.algorithms import AlgorithmError

    with pytest.raises(AlgorithmError, match="top_tensors=99"):
        Federation(build_config(config("fedala", top_tensors=99)))


# -- Per-FedAvg ---------------------------------------------------------------------------------
def _loss_grad(model: nn.Module, x, y) -> list[torch.Tensor]:
    loss = nn.functional.cross_entropy(model(x), y)
    return list(torch.autograd.grad(loss, list(model.parameters())))


def _perfedavg_expected(fed, cid: int, variant: str, alpha: float, lr: float):
    """Per-FedAvg's update computed by hand from the batches the client will draw."""
    client = fed.runtime.client(cid, 1, "train", {})
    client.receive(fed.server.broadcast(1))
    rng_state = client.ctx.rng.get_state()
    batches = list(client.batches())
    client.ctx.rng.set_state(rng_state)
    w = copy.deepcopy(client.model)
    group = 3 if variant == "hf" else 2
    groups = [batches[i : i + group] for i in range(0, len(batches) - group + 1, group)]
    tail = batches[len(groups) * group :]
    if tail and sum(len(b[1]) for b in tail) >= 2 * group:  # a short tail is split evenly
        x, y = torch.cat([b[0] for b in tail]), torch.cat([b[1] for b in tail])
        groups.append(list(zip(x.tensor_split(group), y.tensor_split(group), strict=True)))
    for d1, d2, *rest in groups:
        tmp = copy.deepcopy(w)
        inner = _loss_grad(tmp, *d1)
        with torch.no_grad():
            for p, g in zip(tmp.parameters(), inner, strict=True):
                p -= alpha * g
        direction = _loss_grad(tmp, *d2)
        if variant == "hf":  # the paper's finite-difference Hessian-vector product, in float64
            delta = 1e-6
            plus, minus = copy.deepcopy(w).double(), copy.deepcopy(w).double()
            with torch.no_grad():
                for pp, pm, d in zip(plus.parameters(), minus.parameters(), direction, strict=True):
                    pp += delta * d.double()
                    pm -= delta * d.double()
            x3, y3 = rest[0][0].double(), rest[0][1]
            g_plus, g_minus = _loss_grad(plus, x3, y3), _loss_grad(minus, x3, y3)
            direction = [
                d - alpha * ((a - b) / (2 * delta)).float()
                for d, a, b in zip(direction, g_plus, g_minus, strict=True)
            ]
        with torch.no_grad():
            for p, d in zip(w.parameters(), direction, strict=True):
                p -= lr * d
    return client, w


@pytest.mark.parametrize("variant", ["fo", "hf"])
def test_perfedavg_step_is_the_maml_meta_gradient_step(variant):
    alpha = 0.2  # large enough that the second-order term matters
    fed = Federation(build_config(config("perfedavg", variant=variant, alpha=alpha)))
    client, expected = _perfedavg_expected(fed, 0, variant, alpha, lr=0.05)
    reply = client.fit()
    got = strip(reply.message, "model/")
    for name, p in expected.state_dict().items():
        assert torch.allclose(got[name], p, atol=2e-5), name
    fed.close()
    # the Hessian term changes the step: FO and HF do not agree
    if variant == "hf":
        fo = Federation(build_config(config("perfedavg", variant="fo", alpha=alpha)))
        _, fo_w = _perfedavg_expected(fo, 0, "fo", alpha, lr=0.05)
        assert any(not torch.allclose(got[n], p, atol=1e-5) for n, p in fo_w.state_dict().items())
        fo.close()


def test_perfedavg_evaluates_after_one_personalisation_step_and_passes_doubles_training():
    fed = Federation(build_config(config("perfedavg", alpha=0.5)))
    client = fed.runtime.client(1, 0, "eval", {})
    client.receive(fed.server.evaluation_broadcast(0))
    rng_state = client.ctx.rng.get_state()
    x, y = next(iter(client.batches(1)))
    client.ctx.rng.set_state(rng_state)
    adapted = copy.deepcopy(client.model)
    grads = _loss_grad(adapted, x, y)
    with torch.no_grad():
        for p, g in zip(adapted.parameters(), grads, strict=True):
            p -= 0.5 * g
    report = client.evaluate()
    data = fed.dataset.clients[1]
    assert (report.test_correct, report.test_num) == accuracy(adapted, data)
    with torch.no_grad():
        adapted_probs = torch.softmax(adapted(data.test_x), 1)
        global_probs = torch.softmax(client.model(data.test_x), 1)
    assert torch.allclose(report.test_probs, adapted_probs, atol=1e-6)
    assert not torch.allclose(report.test_probs, global_probs, atol=1e-3)
    one = fed.runtime.client(1, 1, "train", {})
    one.receive(fed.server.broadcast(1))
    two_cfg = build_config(config("perfedavg", alpha=0.5, passes=2))
    fed2 = Federation(two_cfg)
    two = fed2.runtime.client(1, 1, "train", {})
    two.receive(fed2.server.broadcast(1))
    assert two.fit().metrics["steps"] == 2 * one.fit().metrics["steps"]
    fed.close()
    fed2.close()


# -- pFedMe -------------------------------------------------------------------------------------
def test_pfedme_reports_its_personalised_models_accuracy():
    fed = Federation(build_config(config("pfedme")))
    fed.train_round(1)
    fed.aggregate(1)
    reported = fed.evaluate(list(range(4)), 1)["test_acc"]
    model = fed.runtime.new_model("mlp")
    personal = global_ = total = 0
    for cid in range(4):
        data = fed.dataset.clients[cid]
        model.load_state_dict(strip(fed.store.get(cid), "personal/"))
        personal += accuracy(model, data)[0]
        model.load_state_dict(strip(fed.server.global_state, "model/"))
        correct, n = accuracy(model, data)
        global_ += correct
        total += n
    assert reported == pytest.approx(personal / total)
    assert personal != global_  # θ is not the global model
    fed.close()


def test_pfedme_defaults_train_a_cnn_at_the_protocols_lr_without_diverging():
    """The paper's inner step 0.1 sends cnn4's loss to NaN in round 1 (PFLlib's protocol: lr
    0.005, batch 10); the default 0.01 trains it."""
    from helpers import tiny_config

    from fl_core.engine import TrainingDiverged, run

    cfg = tiny_config("pfedme", "cnn4", 2, classes=10, image_size=28, batch_size=10, lr=0.005)
    cfg["data"]["source_options"]["num_samples"] = 800
    result = run(build_config(cfg))
    assert all(h.metrics["train_loss"] < 2.3 for h in result.history[1:])
    assert result.best_test_acc > 0.15  # chance 0.1
    cfg["algorithm"]["personal_lr"] = 0.1
    with pytest.raises(TrainingDiverged, match="pfedme diverged"):
        run(build_config(cfg))


@pytest.mark.parametrize("beta", [0.0, 1.0, 2.0])
def test_pfedme_server_mixes_the_uniform_mean_with_the_old_global_by_beta(beta):
    fed = Federation(build_config(config("pfedme", beta=beta)))
    old = dict(fed.server.global_state)
    fed.train_round(1)
    uploads = [r.message for r in fed.pending_replies.values()]
    fed.aggregate(1)
    for key, value in old.items():
        mean = sum(u[key].double() for u in uploads) / len(uploads)
        expected = (1 - beta) * value.double() + beta * mean
        assert torch.allclose(fed.server.global_state[key].double(), expected, atol=1e-6)
    if beta == 0.0:  # PFLlib's default: the global model never moves
        assert all(torch.equal(fed.server.global_state[k], v) for k, v in old.items())
    fed.close()


# -- APFL ---------------------------------------------------------------------------------------
def test_apfl_alpha_moves_and_the_personal_model_is_the_mix():
    fed = Federation(build_config(config("apfl")))
    for rnd in (1, 2):
        fed.train_round(rnd)
        alphas = [r.metrics["alpha"] for r in fed.pending_replies.values()]
        fed.aggregate(rnd)
    assert all(0.0 <= a <= 1.0 for a in alphas)
    assert all(abs(a - 0.5) > 1e-4 for a in alphas)  # learned, not the initial value
    assert len(set(alphas)) == len(alphas)  # one per client
    broadcast = fed.server.evaluation_broadcast(2)
    glob = strip(broadcast, "model/")
    for cid in range(4):
        state = fed.store.get(cid)
        a = float(state["apfl/alpha"])
        v = strip(state, "personal/")
        client = fed.runtime.client(cid, 2, "eval", state)
        client.receive(broadcast)
        mixed = client.evaluation_model().state_dict()
        for name in glob:
            assert torch.allclose(mixed[name], a * v[name] + (1 - a) * glob[name], atol=1e-6)
    fed.close()


def test_apfl_with_alpha_fixed_at_its_ends_is_fedavg_and_local():
    # alpha = 0: the personal model is the global one; alpha = 1: v alone, trained as Local
    fedavg = run(build_config(config("fedavg")))
    local = run(build_config(config("local")))
    at_zero = run(build_config(config("apfl", alpha=0.0, adaptive=False)))
    at_one = run(build_config(config("apfl", alpha=1.0, adaptive=False)))
    assert metrics(at_zero) == metrics(fedavg)
    assert metrics(at_one) == metrics(local)
    assert metrics(at_zero) != metrics(at_one)


# -- FedPHP -------------------------------------------------------------------------------------
def test_fedphp_hpm_is_the_moving_average_of_local_models_and_is_evaluated():
    cfg = config("fedphp")
    cfg["federation"]["rounds"] = 4
    fed = Federation(build_config(cfg))
    hpm_before = {}
    for rnd in (1, 2, 3):
        fed.train_round(rnd)
        for cid, reply in fed.pending_replies.items():
            state = fed.store.get(cid)
            k = int(state["php/participations"]) - 1  # earlier participations
            mu = min(0.9 * k / 4, 0.9)
            hpm = strip(state, "hpm/")
            local = strip(reply.message, "model/")
            for name, h in hpm.items():
                prev = hpm_before.get(cid, local)[name]  # first time: mu = 0
                assert torch.allclose(h, mu * prev + (1 - mu) * local[name], atol=1e-6)
            hpm_before[cid] = hpm
        fed.aggregate(rnd)
    reported = fed.evaluate(list(range(4)), 3)["test_acc"]
    model = fed.runtime.new_model("mlp")
    correct = total = 0
    for cid in range(4):
        model.load_state_dict(hpm_before[cid])
        c, n = accuracy(model, fed.dataset.clients[cid])
        correct, total = correct + c, total + n
    assert reported == pytest.approx(correct / total)
    fed.close()


def test_fedphp_mmd_term_changes_training_and_lam_zero_trains_plain_ce():
    fedavg_like = run(build_config(config("fedphp", lam=0.0, mu=0.0)))
    with_mmd = run(build_config(config("fedphp", lam=0.5, mu=0.0)))
    assert metrics(fedavg_like) != metrics(with_mmd)


# -- FedALA -------------------------------------------------------------------------------------
def test_fedala_weights_stay_in_unit_interval_and_first_aggregation_trains_to_convergence():
    cfg = config("fedala", eta=5.0)  # a large rate pushes weights onto the clamp
    fed = Federation(build_config(cfg))
    fed.train_round(1)
    assert all(r.metrics["ala_epochs"] == 0 for r in fed.pending_replies.values())
    fed.aggregate(1)
    threshold, window = 0.1, 10
    for rnd in (2, 3):
        broadcast = fed.server.broadcast(rnd)
        for cid in range(4):
            state = fed.store.get(cid)
            client = fed.runtime.client(cid, rnd, "train", state)
            client.receive(broadcast)
            losses = client.ala_losses
            if rnd == 2:  # the client's first local aggregation: until the losses settle
                assert len(losses) > window
                assert statistics.pstdev(losses[-window:]) < threshold
                assert (
                    statistics.pstdev(losses[-window - 1 : -1]) >= threshold
                    or len(losses) == window + 1
                )
            else:  # afterwards: one epoch
                assert len(losses) == 1
            weights = strip(client.state_dict(), "ala/w.")
            assert set(weights) == {"head.weight", "head.bias"}
            for w in weights.values():
                assert float(w.min()) >= 0.0 and float(w.max()) <= 1.0
            assert any(float(w.min()) < 1.0 for w in weights.values())  # they learned
            # the top tensors are the local model mixed by the weights, the rest global
            glob = strip(broadcast, "model/")
            local = strip(state, "model/")
            model = client.model.state_dict()
            for name in glob:
                if name in weights:
                    mixed = local[name] + (glob[name] - local[name]) * weights[name]
                    assert torch.allclose(model[name], mixed, atol=1e-6)
                else:
                    assert torch.equal(model[name], glob[name])
            fed.store.put(cid, client.state_dict())
    fed.close()


def test_fedala_first_aggregation_on_cached_features_learns_what_the_full_model_learns(
    monkeypatch,
):
    """With only head tensors learned, the first (convergence) aggregation runs the body once
    and learns on its features: the same epochs, losses and weights as running the whole
    model every epoch."""
    from fl_core.algorithms.fedala import FedALAClient

    fed = Federation(build_config(config("fedala")))
    fed.train_round(1)
    fed.aggregate(1)
    broadcast = fed.server.broadcast(2)
    probe = fed.runtime.client(0, 2, "train", fed.store.get(0))
    assert probe._head_only(probe._temp)  # the default takes the cached path on this model

    def aggregate(cid: int, cached: bool):
        monkeypatch.setattr(FedALAClient, "_head_only", lambda self, model: cached)
        client = fed.runtime.client(cid, 2, "train", fed.store.get(cid))
        client.receive(broadcast)
        return client.ala_losses, strip(client.state_dict(), "ala/w.")

    for cid in range(2):
        losses, weights = aggregate(cid, cached=True)
        full_losses, full_weights = aggregate(cid, cached=False)
        assert len(losses) > 10 and losses == pytest.approx(full_losses, abs=1e-6)
        assert weights.keys() == full_weights.keys() == {"head.weight", "head.bias"}
        for name, w in weights.items():
            assert torch.allclose(w, full_weights[name], atol=1e-6)
    fed.close()


def test_fedala_beats_chance_on_digits():
    from fl_core.config import load_config

    over = [
        "federation.executor=sequential",
        "federation.rounds=4",
        "federation.eval_every=4",
        "algorithm.name=fedala",
    ]
    assert run(load_config("configs/quick_digits.yaml", over)).best_test_acc > 0.4  # chance 0.1


# -- FedMTL -------------------------------------------------------------------------------------
def test_fedmtl_with_zero_regulariser_is_local_training():
    local = run(build_config(config("local")))
    mtl = run(build_config(config("fedmtl", lam_mean=0.0, lam_norm=0.0)))
    assert metrics(mtl) == metrics(local)
    pulled = run(build_config(config("fedmtl", lam_mean=5.0)))
    assert metrics(pulled) != metrics(local)


def _spread(lam_mean: float) -> tuple[float, Federation]:
    fed = Federation(build_config(config("fedmtl", lam_mean=lam_mean)))
    for rnd in (1, 2):
        fed.train_round(rnd)
        fed.aggregate(rnd)
    models = [strip(fed.store.get(c), "model/") for c in range(4)]
    names = list(strip(fed.server.total, "mtl/"))
    mean = {n: sum(m[n] for m in models) / 4 for n in names}
    spread = sum(float(((m[n] - mean[n]) ** 2).sum()) for m in models for n in names)
    return spread, fed


def test_fedmtl_server_holds_the_sum_of_the_latest_models_and_the_penalty_pulls_them_together():
    loose, fed = _spread(0.0)
    models = [strip(fed.store.get(c), "model/") for c in range(4)]
    for name, total in strip(fed.server.total, "mtl/").items():
        assert torch.allclose(total.float(), sum(m[name] for m in models), atol=1e-4)
    fed.close()
    tight, fed = _spread(5.0)
    fed.close()
    assert tight < 0.5 * loose


# -- learning -----------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "algorithm, rounds",
    # Per-FedAvg takes one outer step per two batches: it needs twice the rounds
    [("perfedavg", 8), ("pfedme", 4), ("apfl", 4), ("fedphp", 4), ("fedmtl", 4)],
)
def test_personalised_models_beat_chance_on_digits(algorithm, rounds):
    from fl_core.config import load_config

    over = [
        "federation.executor=sequential",
        f"federation.rounds={rounds}",
        f"federation.eval_every={rounds}",
        f"algorithm.name={algorithm}",
    ]
    assert run(load_config("configs/quick_digits.yaml", over)).best_test_acc > 0.3  # chance 0.1
