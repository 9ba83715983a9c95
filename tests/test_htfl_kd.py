"""The defining behaviour of the knowledge-distillation HtFL algorithms: FD, FML, FedKD."""

from __future__ import annotations

import pytest
import torch
from helpers import tiny_config
from torch import nn

from fl_core.algorithms import get_algorithm
from fl_core.algorithms.fedkd import (
    FedKDHParams,
    apply_update,
    energy_threshold,
    message_space,
    svd_decode,
    svd_encode,
    svd_factors,
)
from fl_core.algorithms.parts import tensor_nbytes
from fl_core.config import ConfigError, build_config, load_config
from fl_core.engine import Federation, run
from fl_core.models import register_group
from fl_core.models.groups import is_group

MIXED = "kd-test-mlp-cnn4"
if not is_group(MIXED):
    register_group(MIXED, ("mlp", "cnn4"))

C, D = 4, 16  # classes and feature size of the test federation


@pytest.fixture(autouse=True)
def _keep_torch_threads():
    # the configs below ask for one torch thread (fast on a shared, busy machine); restore after
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def config(algorithm: str, model: str = "mlp", rounds: int = 3, **hparams) -> dict:
    return tiny_config(algorithm, model, rounds, classes=C, feature_dim=D, **hparams)


def histories_equal(a, b) -> bool:
    return [h.metrics for h in a.history] == [h.metrics for h in b.history]


def state_nbytes(module: nn.Module) -> int:
    return tensor_nbytes(module.state_dict())


# -- FD -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("model", ["mlp", MIXED])
def test_fd_sends_exactly_classes_by_classes_logits_plus_counts(model):
    fed = Federation(build_config(config("fd", model)))
    per_client = C * C * 4 + C * 8  # float32 logits + int64 counts, whatever the architecture
    up, down = fed.train_round(1)
    assert up == 4 * per_client and down == 4 * per_client
    assert all(
        set(r.message) == {"logits/local", "logits/local_count"}
        and r.message["logits/local"].shape == (C, C)
        for r in fed.pending_replies.values()
    )
    fed.close()


def test_fd_uploads_mean_training_logits_and_server_averages_over_clients_holding_a_class():
    cfg = config("fd")
    cfg["federation"]["lr"] = 1e-12  # the model does not move: the logits are its initial ones
    cfg["federation"]["drop_last"] = False  # every training sample's logits are in the means
    fed = Federation(build_config(cfg))
    fed.train_round(1)
    replies = fed.pending_replies
    model = fed.runtime.new_model("mlp")
    for cid, reply in replies.items():
        data = fed.dataset.clients[cid]
        with torch.no_grad():
            out = model(data.train_x)
        counts = torch.bincount(data.train_y, minlength=C)
        expected = torch.zeros(C, C).index_add_(0, data.train_y, out) / counts.clamp(min=1)[:, None]
        assert torch.equal(reply.message["logits/local_count"], counts)
        assert torch.allclose(reply.message["logits/local"], expected, atol=1e-5)
    fed.aggregate(1)
    logits = torch.stack([r.message["logits/local"] for r in replies.values()]).double()
    holds = torch.stack([r.message["logits/local_count"] > 0 for r in replies.values()]).double()
    mean = (logits * holds[:, :, None]).sum(0) / holds.sum(0).clamp(min=1)[:, None]
    seen = holds.sum(0) > 0
    assert torch.allclose(fed.server.global_logits[seen].double(), mean[seen], atol=1e-6)
    fed.close()


def test_fd_distils_toward_the_softmax_of_the_global_logits_of_the_label():
    fed = Federation(build_config(config("fd", lam=0.7)))
    client = fed.runtime.client(0, 1, "train", {})
    glob = torch.randn(C, C)
    count = torch.tensor([5, 0, 3, 2])  # class 1 has no global logits
    client.receive({"logits/global": glob, "logits/count": count})
    x, y = fed.dataset.clients[0].train_x[:32], torch.arange(32) % C
    with torch.no_grad():
        out = client.model(x)
        ce = nn.functional.cross_entropy(out, y)
        soft = torch.softmax(glob[y], dim=1)
        kd = -(soft * torch.log_softmax(out, 1)).sum(1) * (count[y] > 0)
        assert client.loss(client.model, x, y) == pytest.approx(float(ce + 0.7 * kd.mean()))
    fed.close()
    # HtFLlib's raw logits as "probabilities" (a sample without a global logit is its own target)
    fed = Federation(build_config(config("fd", lam=0.7, soft_target="raw")))
    client = fed.runtime.client(0, 1, "train", {})
    client.receive({"logits/global": glob, "logits/count": count})
    with torch.no_grad():
        target = torch.where((count[y] > 0)[:, None], glob[y], out)
        kd = -(target * torch.log_softmax(out, 1)).sum(1)
        assert client.loss(client.model, x, y) == pytest.approx(float(ce + 0.7 * kd.mean()))
    fed.close()


def test_fd_without_distillation_is_local_training():
    fd = run(build_config(config("fd", lam=0.0)))
    assert histories_equal(fd, run(build_config(config("local"))))
    assert not histories_equal(run(build_config(config("fd"))), fd)


# -- FML ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("model", ["mlp", MIXED])
def test_fml_sends_only_the_meme_and_averages_it_by_sample_count(model):
    fed = Federation(build_config(config("fml", model)))
    meme_bytes = state_nbytes(fed.runtime.new_model("cnn4"))  # shared_model, not the clients'
    old = dict(fed.server.global_state)
    up, down = fed.train_round(1)
    assert up == down == 4 * meme_bytes
    replies = fed.pending_replies
    assert all(set(r.message) == set(old) for r in replies.values())
    fed.aggregate(1)
    total = sum(r.num_samples for r in replies.values())
    for key in old:
        mean = sum(r.message[key].double() * r.num_samples / total for r in replies.values())
        assert torch.allclose(fed.server.global_state[key].double(), mean, atol=1e-6)
    fed.close()


def test_fml_without_mutual_terms_or_clipping_trains_the_local_model_as_local_does():
    plain = dict(alpha=1.0, beta=1.0, max_grad_norm=0.0)
    assert histories_equal(
        run(build_config(config("fml", **plain))), run(build_config(config("local")))
    )
    assert not histories_equal(
        run(build_config(config("fml", max_grad_norm=0.0))), run(build_config(config("local")))
    )


def _meme_gradient(alpha: float, htfllib: bool) -> torch.Tensor:
    cfg = config("fml", alpha=alpha, beta=0.5, max_grad_norm=0.0, htfllib_gradients=htfllib)
    fed = Federation(build_config(cfg))
    client = fed.runtime.client(0, 1, "train", {})
    with torch.no_grad():  # make the local model and the meme disagree
        for p in client.model.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=torch.Generator().manual_seed(0)))
    data = fed.dataset.clients[0]
    client.pair.zero_grad()
    client.loss(client.pair, data.train_x[:32], data.train_y[:32]).backward()
    grad = torch.cat([p.grad.flatten() for p in client.meme.parameters()])
    fed.close()
    return grad


def test_fml_each_model_treats_the_others_prediction_as_a_fixed_target():
    # alpha weighs only the local model's loss, whose target (the meme's output) is held fixed:
    # the meme's gradient does not depend on it, unless HtFLlib's gradients are asked for
    assert torch.equal(_meme_gradient(0.2, False), _meme_gradient(0.8, False))
    assert not torch.allclose(_meme_gradient(0.2, True), _meme_gradient(0.8, True))


def test_fml_refuses_an_unknown_or_unfit_shared_model_naming_the_field():
    with pytest.raises(ConfigError, match="shared_model"):
        build_config(config("fml", shared_model="no-such-net"))
    over = ["algorithm.name=fml", "federation.executor=sequential"]  # digits are 8x8 < 16
    with pytest.raises(ValueError, match="algorithm.shared_model='cnn4'"):
        Federation(load_config("configs/quick_digits.yaml", over))


# -- FedKD --------------------------------------------------------------------------------------
def test_svd_keeps_the_smallest_rank_holding_the_energy():
    g = torch.Generator().manual_seed(0)
    u, _ = torch.linalg.qr(torch.randn(40, 4, generator=g))
    v, _ = torch.linalg.qr(torch.randn(30, 4, generator=g))
    sigma = torch.tensor([4.0, 3.0, 2.0, 1.0])  # energies 16, 9, 4, 1 of 30
    m = u @ torch.diag(sigma) @ v.T
    for energy, rank in [(0.5, 1), (16 / 30, 1), (0.8, 2), (25 / 30, 2), (0.95, 3), (0.99, 4)]:
        uk, sk, vk = svd_factors(m, energy)
        assert uk.shape == (40, rank) and sk.shape == (rank,) and vk.shape == (rank, 30)
        dropped = float((sigma[rank:] ** 2).sum())
        assert float(((uk * sk) @ vk - m).pow(2).sum()) == pytest.approx(dropped, abs=1e-4)
    assert svd_factors(torch.randn(4, 4), 0.99) is None  # factors would not be smaller
    assert svd_factors(torch.randn(8), 0.5) is None  # a vector travels dense
    conv = torch.randn(8, 3, 5, 5)
    flat = svd_factors(conv, 0.5)
    assert flat[0].shape[0] == 8 and flat[2].shape[1] == 75  # out × in·k·k
    kernel = svd_factors(conv, 0.5, "kernel")
    assert kernel[0].shape[:3] == (8, 3, 5) and kernel[2].shape[-1] == 5  # per 5×5 slice


def test_svd_messages_round_trip_and_refuse_what_does_not_match():
    g = torch.Generator().manual_seed(1)
    low_rank = torch.randn(30, 3, generator=g) @ torch.randn(3, 20, generator=g)
    state = {"w": low_rank, "b": torch.randn(30, generator=g), "n": torch.tensor(3)}
    message = svd_encode(state, 0.9, "flatten", "update")
    assert set(message) == {
        "update.svd/w/u",
        "update.svd/w/s",
        "update.svd/w/v",
        "update/b",
        "update/n",
    }
    assert message_space(message, "m") == "update"
    assert tensor_nbytes(message) < tensor_nbytes(state)
    decoded = svd_decode(message, state, "update", "m")
    assert torch.equal(decoded["b"], state["b"]) and torch.equal(decoded["n"], state["n"])
    exact = svd_decode(svd_encode(state, 1.0, "flatten", "update"), state, "update", "m")
    assert torch.allclose(exact["w"], state["w"], atol=1e-5)
    with pytest.raises(ValueError, match="missing"):
        svd_decode({k: v for k, v in message.items() if k != "update/b"}, state, "update", "m")
    with pytest.raises(ValueError, match="u, s, v"):
        svd_decode(
            {k: v for k, v in message.items() if k != "update.svd/w/s"}, state, "update", "m"
        )
    with pytest.raises(ValueError, match="mixes"):
        message_space({**message, "mentee/b": state["b"]}, "m")


def test_fedkd_energy_rises_linearly_from_t_start_to_t_end():
    hp = FedKDHParams(t_start=0.9, t_end=0.98)
    assert energy_threshold(hp, 0, 5) == energy_threshold(hp, 1, 5) == 0.9
    assert energy_threshold(hp, 3, 5) == pytest.approx(0.94)
    assert energy_threshold(hp, 5, 5) == pytest.approx(0.98)
    fed = Federation(build_config(config("fedkd", rounds=5, t_start=0.9, t_end=0.98)))
    for rnd in (1, 2):
        fed.train_round(rnd)
        energies = [r.metrics["energy"] for r in fed.pending_replies.values()]
        assert energies == pytest.approx([0.9 + 0.02 * (rnd - 1)] * len(energies))
        fed.aggregate(rnd)
    fed.close()


def _round_one_upload(energy: float, **hparams) -> int:
    cfg = config("fedkd", MIXED, t_start=energy, t_end=energy, **hparams)
    fed = Federation(build_config(cfg))
    up, _ = fed.train_round(1)
    fed.close()
    return up


def test_fedkd_upload_shrinks_as_the_energy_threshold_falls():
    dense = 4 * state_nbytes(_fresh_mentee())
    ups = [_round_one_upload(e) for e in (0.9, 0.95, 0.99, 0.999)]
    assert ups == sorted(ups) and len(set(ups)) == len(ups)
    assert ups[-1] < dense / 2  # a round of updates is far from full rank
    weights = [_round_one_upload(e, compress="weights") for e in (0.5, 0.95)]
    assert weights[0] < weights[1] and weights[0] > ups[0]  # weights compress worse


def _fresh_mentee() -> nn.Module:
    fed = Federation(build_config(config("fedkd")))
    model = fed.runtime.new_model("cnn4")
    fed.close()
    return model


def test_fedkd_server_recompresses_the_mean_update_and_clients_in_step_hold_its_mentee():
    cfg = config("fedkd", MIXED, rounds=4)
    cfg["federation"]["join_ratio"] = 0.75
    fed = Federation(build_config(cfg))
    server = fed.server
    initial = dict(server.mentee)
    up, down = fed.train_round(1)
    assert down == 0  # every client starts from the federation's initial mentee
    replies = fed.pending_replies
    updates = [svd_decode(r.message, initial, "update", "up") for r in replies.values()]
    fed.aggregate(1)
    # the server compresses the uniform mean of the updates at T(1) and applies it
    mean = {k: sum(u[k].double() for u in updates) / len(updates) for k in initial}
    mean = {k: v.to(initial[k].dtype) for k, v in mean.items()}
    energy = energy_threshold(server.hp, 1, 4)
    update = svd_encode(mean, energy, "flatten", "update")
    assert set(server.last_update) == set(update)
    expected = apply_update(initial, svd_decode(update, initial, "update", "global"))
    for k in initial:
        assert torch.allclose(server.mentee[k], expected[k], atol=1e-6)
    # round 2: everyone holds the initial mentee, so each selected client gets the update
    round_one_update = server.last_update
    second = fed.select(2)
    assert len(second) == 3
    _, down = fed.train_round(2)
    assert down == 3 * tensor_nbytes(round_one_update)
    fed.aggregate(2)
    # round 3: a client of round 2 gets its update; the one that missed it, the whole mentee
    messages = server.configure(3, list(range(4)))
    for cid in range(4):
        kind = "update" if cid in second else "mentee"
        assert message_space(messages[cid], "m") == kind
        client = fed.runtime.client(cid, 3, "train", fed.store.get(cid))
        client.receive(messages[cid])
        if kind == "update":  # in step: exactly the server's mentee
            for k, v in client.mentee.state_dict().items():
                assert torch.allclose(v, server.mentee[k], atol=1e-6)
    assert tensor_nbytes(server.last_update) < state_nbytes(_fresh_mentee()) / 2
    fed.close()


def test_fedkd_htfllib_variant_averages_compressed_weights():
    hp = dict(compress="weights", conv_layout="kernel", htfllib_gradients=True, kl_reduction="mean")
    fed = Federation(build_config(config("fedkd", MIXED, **hp)))
    fed.train_round(1)
    replies = fed.pending_replies
    assert all(message_space(r.message, "m") == "mentee" for r in replies.values())
    weights = [svd_decode(r.message, fed.server.mentee, "mentee", "up") for r in replies.values()]
    fed.aggregate(1)
    for k, v in fed.server.mentee.items():
        if v.is_floating_point():
            mean = sum(w[k].double() for w in weights) / len(weights)
            assert torch.allclose(v.double(), mean, atol=1e-6)
    assert message_space(fed.server.broadcast(2), "m") == "mentee"
    fed.close()


# -- learning -----------------------------------------------------------------------------------
@pytest.mark.parametrize("algorithm", ["fd", "fml", "fedkd"])
def test_learns_on_a_heterogeneous_group(algorithm):
    cfg = config(algorithm, MIXED, rounds=8)
    cfg["federation"].update(local_epochs=3, eval_every=2)
    result = run(build_config(cfg))
    assert get_algorithm(algorithm).heterogeneous
    # 4 classes: chance is 0.25, and each client's majority class about 0.64
    assert result.best_test_acc > 0.75
