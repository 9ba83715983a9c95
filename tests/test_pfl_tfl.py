"""The defining behaviour of the traditional-FL algorithms of the PFLlib set: FedDyn, MOON, FedLC,
FedNTD, FedCross, FedBN."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from helpers import tiny_config
from torch import nn

from fl_core.algorithms import is_batchnorm
from fl_core.algorithms.feddyn import FedDynHParams, add_dynamic_gradient
from fl_core.algorithms.fedlc import calibrated_cross_entropy
from fl_core.algorithms.fedntd import not_true_distillation
from fl_core.algorithms.moon import model_contrastive_loss
from fl_core.algorithms.parts import tensor_nbytes
from fl_core.config import ConfigError, build_config, load_config
from fl_core.engine import Federation, run


@pytest.fixture(autouse=True)
def _keep_torch_threads():
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def config(algorithm: str, model: str = "mlp", rounds: int = 3, **hparams) -> dict:
    return tiny_config(algorithm, model, rounds, image_size=12, **hparams)


def metrics(result) -> list[dict]:
    return [h.metrics for h in result.history]


def model_part(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k.removeprefix("model/"): v for k, v in state.items() if k.startswith("model/")}


# -- switching the algorithm's term off is FedAvg, exactly ----------------------------------------
@pytest.mark.parametrize(
    "algorithm, off",
    [
        ("feddyn", {"alpha": 0.0, "aggregate_by": "samples"}),
        ("moon", {"mu": 0.0}),
        ("fedntd", {"beta": 0.0}),
        ("fedlc", {"tau": 0.0}),
    ],
)
def test_the_term_switched_off_is_fedavg_exactly_and_on_it_is_not(algorithm, off):
    fedavg = metrics(run(build_config(config("fedavg"))))
    assert metrics(run(build_config(config(algorithm, **off)))) == fedavg
    assert metrics(run(build_config(config(algorithm)))) != fedavg


def test_fedbn_on_a_model_without_batchnorm_is_fedavg():
    assert metrics(run(build_config(config("fedbn")))) == metrics(
        run(build_config(config("fedavg")))
    )


# -- bad hyperparameters ---------------------------------------------------------------------------
@pytest.mark.parametrize(
    "algorithm, bad, field",
    [
        ("feddyn", {"alpha": -0.1}, "alpha"),
        ("feddyn", {"penalty": "cubic"}, "penalty"),
        ("moon", {"mu": -1.0}, "mu"),
        ("moon", {"tau": 0.0}, "tau"),
        ("fedntd", {"beta": -1.0}, "beta"),
        ("fedntd", {"temperature": 2.0}, "unknown key"),
        ("fedlc", {"tau": -0.5}, "tau"),
        ("fedlc", {"counts": "pooled"}, "counts"),
        ("fedcross", {"alpha": 1.5}, "alpha"),
        ("fedcross", {"select": "random"}, "select"),
        ("fedbn", {"keep": "bn"}, "unknown key"),
    ],
)
def test_a_bad_hyperparameter_is_a_config_error_naming_it(algorithm, bad, field):
    with pytest.raises(ConfigError, match=field):
        build_config(config(algorithm, **bad))


# -- learning ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("algorithm", ["feddyn", "moon", "fedlc", "fedntd", "fedcross", "fedbn"])
def test_learns_on_digits(algorithm):
    over = ["federation.executor=sequential", "federation.rounds=8", "federation.eval_every=4"]
    result = run(load_config("configs/quick_digits.yaml", [*over, f"algorithm.name={algorithm}"]))
    assert result.best_test_acc > 0.45  # 10 classes: chance is 0.1


# -- FedDyn ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("penalty", ["squared", "unsquared"])
def test_feddyn_gradient_is_that_of_the_regularized_objective(penalty):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 4), nn.ReLU(), nn.Linear(4, 3))
    anchor = {n: p.detach() + 0.1 * torch.randn_like(p) for n, p in model.named_parameters()}
    state = {n: torch.randn_like(p) for n, p in model.named_parameters()}
    x, y = torch.randn(8, 5), torch.randint(0, 3, (8,))
    alpha = 0.3
    hp = FedDynHParams(alpha=alpha, penalty=penalty)

    # by hand: autograd of CE - <g, θ> + alpha/2·||θ - θ_g||^(2 or 1)
    params = dict(model.named_parameters())
    dist2 = sum(((params[n] - anchor[n]) ** 2).sum() for n in params)
    reg = dist2 if penalty == "squared" else dist2.sqrt()
    linear = sum((state[n] * params[n]).sum() for n in params)
    full = F.cross_entropy(model(x), y) - linear + alpha / 2 * reg
    expected = torch.autograd.grad(full, list(params.values()))

    model.zero_grad()
    F.cross_entropy(model(x), y).backward()
    add_dynamic_gradient(model, anchor, state, hp)
    for (name, p), e in zip(model.named_parameters(), expected, strict=True):
        assert torch.allclose(p.grad, e, atol=1e-6), name


def test_feddyn_client_and_server_states_follow_the_paper_update():
    alpha, n = 0.1, 4
    cfg = config("feddyn", alpha=alpha)
    cfg["federation"]["join_ratio"] = 0.75
    fed = Federation(build_config(cfg))
    for rnd in (1, 2, 3):
        old = {k: v.clone() for k, v in fed.server.global_state.items()}
        h_old = {k: v.clone() for k, v in fed.server.h.items()}
        g_before = {cid: dict(fed.store.get(cid)) for cid in range(n)}
        fed.train_round(rnd)
        replies = fed.pending_replies
        assert len(replies) == 3
        for cid, reply in replies.items():
            after = fed.store.get(cid)
            for key in h_old:
                name = key.removeprefix("model/")
                g_old = g_before[cid].get(f"grad/{name}", torch.zeros_like(old[key]))
                expected = g_old - alpha * (reply.message[key] - old[key])
                assert torch.allclose(after[f"grad/{name}"], expected, atol=1e-6)
        fed.aggregate(rnd)
        for key in h_old:
            drift = sum(r.message[key] - old[key] for r in replies.values())
            h = h_old[key] - alpha * drift / n
            assert torch.allclose(fed.server.h[key], h, atol=1e-6)
            mean = sum(r.message[key] for r in replies.values()) / len(replies)
            assert torch.allclose(fed.server.global_state[key], mean - h / alpha, atol=1e-5)
        assert any(float(h.abs().max()) > 0 for h in fed.server.h.values())
    fed.close()


def test_feddyn_pfllib_penalty_is_reachable_and_differs():
    paper = metrics(run(build_config(config("feddyn", alpha=0.1))))
    pfllib = metrics(run(build_config(config("feddyn", alpha=0.1, penalty="unsquared"))))
    assert paper != pfllib


# -- MOON ------------------------------------------------------------------------------------------
def test_moon_contrastive_loss_is_the_papers():
    torch.manual_seed(1)
    z, zg, zp = torch.randn(6, 8), torch.randn(6, 8), torch.randn(6, 8)
    tau = 0.5
    sg = F.cosine_similarity(z, zg) / tau
    sp = F.cosine_similarity(z, zp) / tau
    by_hand = (-torch.log(torch.exp(sg) / (torch.exp(sg) + torch.exp(sp)))).mean()
    assert torch.allclose(model_contrastive_loss(z, zg, zp, tau), by_hand, atol=1e-6)
    # the global representation is the positive: moving toward it lowers the loss
    assert model_contrastive_loss(zg, zg, zp, tau) < model_contrastive_loss(zp, zg, zp, tau)


def test_moon_previous_model_is_the_last_uploaded_one_and_starts_at_the_initial_model():
    fed = Federation(build_config(config("moon")))
    initial = fed.runtime.new_model(fed.architectures[0]).state_dict()
    client = fed.runtime.client(0, 1, "train", {})
    assert all(torch.equal(v, initial[k]) for k, v in client.previous.state_dict().items())
    fed.train_round(1)
    for cid, reply in fed.pending_replies.items():
        previous = {
            k.removeprefix("previous/"): v
            for k, v in fed.store.get(cid).items()
            if k.startswith("previous/")
        }
        assert previous.keys() == model_part(reply.message).keys()
        assert all(torch.equal(previous[k], v) for k, v in model_part(reply.message).items())
    fed.aggregate(1)
    # the previous model only persists: it never travels
    up, down = fed.train_round(2)
    model_bytes = tensor_nbytes(fed.server.global_state)
    assert up == down == 4 * model_bytes
    fed.close()


# -- FedNTD ----------------------------------------------------------------------------------------
def test_fedntd_distils_only_the_not_true_classes():
    torch.manual_seed(2)
    logits = torch.randn(5, 4, requires_grad=True)
    teacher = torch.randn(5, 4)
    y = torch.tensor([0, 3, 1, 1, 2])
    tau = 2.0
    loss = not_true_distillation(logits, teacher, y, tau)
    by_hand = 0.0
    for i in range(5):
        keep = [c for c in range(4) if c != int(y[i])]
        p = F.softmax(teacher[i, keep] / tau, dim=0)
        q = F.log_softmax(logits[i, keep] / tau, dim=0)
        by_hand += (p * (p.log() - q)).sum()
    assert torch.allclose(loss, tau**2 * by_hand / 5, atol=1e-6)
    (grad,) = torch.autograd.grad(loss, logits)
    assert torch.all(grad[torch.arange(5), y] == 0)  # the true class is left to CE
    assert grad.abs().sum() > 0
    # changing the teacher's true-class logit changes nothing
    other = teacher.clone()
    other[torch.arange(5), y] += 10.0
    assert torch.allclose(not_true_distillation(logits, other, y, tau), loss)


def test_fedntd_trains_against_the_frozen_received_model():
    fed = Federation(build_config(config("fedntd")))
    broadcast = fed.server.broadcast(1)
    client = fed.runtime.client(0, 1, "train", {})
    client.receive(broadcast)
    client.fit()
    frozen = client.global_model.state_dict()
    assert all(torch.equal(frozen[k], broadcast[f"model/{k}"]) for k in frozen)
    assert any(
        not torch.equal(v, broadcast[f"model/{k}"]) for k, v in client.model.state_dict().items()
    )
    fed.close()


# -- FedLC -----------------------------------------------------------------------------------------
def test_fedlc_calibrates_with_the_clients_own_counts():
    torch.manual_seed(3)
    logits = torch.randn(6, 4)
    y = torch.tensor([0, 0, 1, 2, 0, 1])
    counts = torch.tensor([30, 5, 1, 0])
    tau = 0.7
    shift = tau * torch.tensor([30.0, 5.0, 1.0, 1.0]).pow(-0.25)  # an absent class counts as 1
    expected = F.cross_entropy(logits - shift, y)
    assert torch.allclose(calibrated_cross_entropy(logits, y, counts, tau), expected)
    # min_count=0: an absent class leaves the softmax
    without = F.cross_entropy(logits[:, :3] - tau * counts[:3].float().pow(-0.25), y)
    assert torch.allclose(calibrated_cross_entropy(logits, y, counts, tau, 0.0), without, atol=1e-6)

    fed = Federation(build_config(config("fedlc")))
    for cid in range(4):
        client = fed.runtime.client(cid, 1, "train", {})
        own = torch.bincount(fed.dataset.clients[cid].train_y, minlength=4)
        assert torch.equal(client.calibration_counts(), own)
    # nothing but the model travels
    up, down = fed.train_round(1)
    assert up == down == 4 * tensor_nbytes(fed.server.global_state)
    fed.close()


def test_fedlc_global_counts_are_pfllibs_pooled_counts():
    fed = Federation(build_config(config("fedlc", counts="global")))
    fed.train_round(1)
    fed.aggregate(1)
    total = sum(torch.bincount(fed.dataset.clients[c].train_y, minlength=4) for c in range(4))
    broadcast = fed.server.broadcast(2)
    assert torch.equal(broadcast["lc/counts"], total)
    client = fed.runtime.client(0, 2, "train", {})
    client.receive(broadcast)
    assert torch.equal(client.calibration_counts(), total)
    assert "lc/counts" not in fed.server.evaluation_broadcast(2)
    fed.close()
    assert metrics(run(build_config(config("fedlc", counts="global")))) != metrics(
        run(build_config(config("fedlc")))
    )


# -- FedCross ------------------------------------------------------------------------------------
@pytest.mark.parametrize("select", ["lowest", "highest", "in_order"])
def test_fedcross_cross_aggregates_each_middle_model_with_its_collaborator(select):
    alpha = 0.8
    cfg = config("fedcross", alpha=alpha, select=select)
    fed = Federation(build_config(cfg))
    server = fed.server
    assert server.k == 4
    for rnd in (1, 2):
        server.configure(rnd, fed.select(rnd))
        # each client gets its own middle model; nothing is broadcast in training
        assert server.broadcast(rnd) == {}
        assert sorted(server._assignment.values()) == [0, 1, 2, 3]
        fed.train_round(rnd)
        replies = fed.pending_replies
        trained = [None] * 4
        for cid, m in server._assignment.items():
            trained[m] = replies[cid].message
        keys = server.param_keys
        vec = [torch.cat([t[k].flatten() for k in keys]) for t in trained]
        fed.aggregate(rnd)
        for i in range(4):
            sims = {
                j: float(F.cosine_similarity(vec[i], vec[j], dim=0)) for j in range(4) if j != i
            }
            if select == "lowest":
                co = min(sims, key=sims.get)
            elif select == "highest":
                co = max(sims, key=sims.get)
            else:
                co = (i + rnd % 3 + 1) % 4  # rotates with the round, not a client index
            for k in keys:
                expected = alpha * trained[i][k] + (1 - alpha) * trained[co][k]
                assert torch.allclose(server.middle[i][k], expected, atol=1e-6)
        mean = {k: sum(m[k] for m in server.middle) / 4 for k in keys}
        assert all(torch.allclose(server.global_state[k], mean[k], atol=1e-6) for k in keys)
        assert fed.server.evaluation_broadcast(rnd) is server.global_state
    # after cross-aggregation the middle models differ: clients get different models
    assert not torch.equal(server.middle[0][keys[0]], server.middle[1][keys[0]])
    fed.close()


def test_fedcross_warmup_rounds_are_fedavg():
    warm = metrics(run(build_config(config("fedcross", warmup_rounds=3))))
    assert warm == metrics(run(build_config(config("fedavg"))))


# -- FedBN -------------------------------------------------------------------------------------------
def test_fedbn_keeps_every_batchnorm_layer_local_on_a_resnet():
    cfg = tiny_config("fedbn", "resnet6", rounds=2, image_size=8)
    cfg["data"]["source_options"]["num_samples"] = 240
    fed = Federation(build_config(cfg))
    model = fed.runtime.new_model(fed.architectures[0])
    bn_keys = set()
    for name, module in model.named_modules():
        if is_batchnorm(module):
            bn_keys.update(f"model/{name}.{k}" for k in module.state_dict())
    # BatchNorm layers whose names say nothing of "bn" (stem, shortcut) are among them
    assert any("stem" in k for k in bn_keys) and any("shortcut" in k for k in bn_keys)
    assert any(k.endswith("running_var") for k in bn_keys)
    assert any(k.endswith("num_batches_tracked") for k in bn_keys)

    fed.train_round(1)
    for reply in fed.pending_replies.values():
        assert not set(reply.message) & bn_keys
        assert set(reply.message) | bn_keys == {f"model/{k}" for k in model.state_dict()}
    states = [fed.store.get(cid) for cid in range(4)]
    assert all(set(s) == bn_keys for s in states)
    for key in bn_keys:
        if not key.endswith("num_batches_tracked"):
            assert not torch.equal(states[0][key], states[1][key]), key
    fed.aggregate(1)
    assert not set(fed.server.global_state) & bn_keys
    for cid in range(4):
        client = fed.runtime.client(cid, 2, "train", fed.store.get(cid))
        client.receive(fed.server.broadcast(2))
        state = {f"model/{k}": v for k, v in client.model.state_dict().items()}
        for key, value in state.items():
            expected = states[cid][key] if key in bn_keys else fed.server.global_state[key]
            assert torch.equal(value, expected), key
    fed.close()


def test_fedcross_shares_a_middle_model_among_extra_clients_and_mixes_untrained_ones():
    from fl_core.algorithms.common import weighted_average

    cfg = config("fedcross", alpha=0.9, select="in_order")
    cfg["federation"].update(join_ratio=0.5, random_join_ratio=True)
    fed = Federation(build_config(cfg))
    server = fed.server
    assert server.k == 2
    seen_extra = False
    for rnd in (1, 2, 3, 4):
        before = [dict(m) for m in server.middle]
        fed.train_round(rnd)
        replies = fed.pending_replies
        groups = {m: [c for c, a in server._assignment.items() if a == m] for m in range(2)}
        seen_extra |= any(len(g) > 1 for g in groups.values())
        trained = [
            weighted_average([(replies[c].message, replies[c].num_samples) for c in groups[m]])
            if groups[m]
            else before[m]
            for m in range(2)
        ]
        fed.aggregate(rnd)
        for i in range(2):
            for k in server.param_keys:
                expected = 0.9 * trained[i][k] + 0.1 * trained[1 - i][k]
                assert torch.allclose(server.middle[i][k], expected, atol=1e-6)
    assert seen_extra
    fed.close()
