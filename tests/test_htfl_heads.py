"""HtFL algorithms that share a head: LG-FedAvg, FedGH, FedGen.

Each test asserts the algorithm's defining behaviour on a tiny synthetic federation, with one
architecture and with a mixed group (mlp + cnn4, one feature size): what crosses the wire, to
the byte; that bodies stay local; the server's computation against a hand computation; that
FedGen's generator reaches the clients only through its regulariser.
"""

from __future__ import annotations

import pytest
import torch
from helpers import tiny_config
from torch import nn

from fl_core.algorithms import tensor_nbytes
from fl_core.config import build_config
from fl_core.engine import Federation, run
from fl_core.models import register_group
from fl_core.models.groups import is_group

MIXED = "htfl-heads-mlp-cnn4"
if not is_group(MIXED):
    register_group(MIXED, ("mlp", "cnn4"))

C, D = 4, 16  # classes, feature size
HEAD_BYTES = (D * C + C) * 4  # float32 weight and bias


def config(algorithm: str, model: str = "mlp", rounds: int = 3, **hparams) -> dict:
    return tiny_config(algorithm, model, rounds, classes=C, feature_dim=D, **hparams)


# small generator and few server steps keep FedGen's tests fast
FAST_GEN = {"noise_dim": 8, "hidden_dim": 32, "server_epochs": 5}


def head_of(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v for k, v in state.items() if k.startswith("model/head.")}


def assert_bodies_stay_local(fed: Federation) -> None:
    """Stored client states hold bodies only, and clients of one architecture differ."""
    states = {cid: fed.store.get(cid) for cid in range(fed.num_clients)}
    for state in states.values():
        assert state and all(k.startswith("model/body.") for k in state)
    assert not any(k.startswith("model/body") for k in fed.server.state_dict())
    by_arch: dict[str, list[int]] = {}
    for cid in states:
        by_arch.setdefault(fed.architectures[cid], []).append(cid)
    for ids in by_arch.values():
        a, b = states[ids[0]], states[ids[1]]
        assert any(not torch.equal(a[k], b[k]) for k in a)


# -- LG-FedAvg --------------------------------------------------------------------------------
@pytest.mark.parametrize("model", ["mlp", MIXED])
def test_lgfedavg_sends_heads_only_averages_them_by_samples_and_keeps_bodies(model):
    fed = Federation(build_config(config("lg-fedavg", model)))
    up, down = fed.train_round(1)
    replies = fed.pending_replies
    assert len(replies) == 4
    assert up == down == 4 * HEAD_BYTES
    for reply in replies.values():
        assert set(reply.message) == {"model/head.weight", "model/head.bias"}
    total = sum(r.num_samples for r in replies.values())
    expected = {
        k: sum(r.message[k].double() * r.num_samples for r in replies.values()) / total
        for k in ("model/head.weight", "model/head.bias")
    }
    fed.aggregate(1)
    for k, v in expected.items():
        assert torch.allclose(fed.server.global_state[k].double(), v, atol=1e-6)
    assert_bodies_stay_local(fed)
    # next round every client holds the global head on its own, stored body
    for cid in range(4):
        stored = fed.store.get(cid)
        client = fed.runtime.client(cid, 2, "train", stored)
        client.receive(fed.server.broadcast(2))
        state = {f"model/{k}": v for k, v in client.model.state_dict().items()}
        for k, v in fed.server.global_state.items():
            assert torch.equal(state[k], v)
        for k, v in stored.items():
            assert torch.equal(state[k], v)
    fed.close()


# -- FedGH ------------------------------------------------------------------------------------
@pytest.mark.parametrize("model", ["mlp", MIXED])
def test_fedgh_uploads_class_means_of_held_classes_only(model):
    fed = Federation(build_config(config("fedgh", model)))
    up, down = fed.train_round(1)
    replies = fed.pending_replies
    held = {
        cid: torch.nonzero(torch.bincount(fed.dataset.clients[cid].train_y, minlength=C))
        .flatten()
        .tolist()
        for cid in replies
    }
    assert any(len(h) < C for h in held.values())  # the test covers a client lacking classes
    assert up == sum(len(h) * (D * 4 + 8) for h in held.values())  # float32 means, int64 labels
    assert down == 4 * HEAD_BYTES
    for cid, reply in replies.items():
        assert reply.message["proto/labels"].tolist() == held[cid]
        # the means of the trained body's features (eval mode) over each held class
        client = fed.runtime.client(cid, 1, "eval", fed.store.get(cid))
        data = fed.dataset.clients[cid]
        with torch.no_grad():
            client.model.eval()
            feats = client.model.body(data.train_x)
        for row, c in enumerate(held[cid]):
            mean = feats[data.train_y == c].mean(0)
            assert torch.allclose(reply.message["proto/local"][row], mean, atol=1e-5)
    fed.aggregate(1)
    assert_bodies_stay_local(fed)
    fed.close()


def test_fedgh_server_trains_the_head_with_cross_entropy_on_the_prototypes():
    # every (prototype, label) pair fits in one batch of 16: one epoch is one full-batch SGD step
    lr = 0.5
    fed = Federation(build_config(config("fedgh", MIXED, server_lr=lr, server_epochs=1)))
    old = {k: v.clone() for k, v in fed.server.global_state.items()}
    fed.train_round(1)
    replies = fed.pending_replies
    x = torch.cat([r.message["proto/local"] for r in replies.values()]).double()
    y = torch.cat([r.message["proto/labels"] for r in replies.values()])
    assert 0 < x.shape[0] <= 16
    w, b = old["model/head.weight"].double(), old["model/head.bias"].double()
    # d mean-CE / d logits = (softmax - onehot) / n
    delta = (torch.softmax(x @ w.T + b, dim=1) - nn.functional.one_hot(y, C)) / x.shape[0]
    fed.aggregate(1)
    new = fed.server.global_state
    assert torch.allclose(new["model/head.weight"].double(), w - lr * delta.T @ x, atol=1e-5)
    assert torch.allclose(new["model/head.bias"].double(), b - lr * delta.sum(0), atol=1e-5)
    assert not torch.allclose(new["model/head.weight"], old["model/head.weight"], atol=1e-3)
    fed.close()


# -- FedGen -----------------------------------------------------------------------------------
def _trace(result) -> list:
    """The clients' metrics of each round (FedGen's server also reports its generator loss)."""
    return [
        (h.round, {k: v for k, v in h.metrics.items() if not k.startswith("server_")})
        for h in result.history
    ]


def test_fedgen_changes_training_only_through_its_regulariser(model=MIXED):
    """With the regulariser off, FedGen is LG-FedAvg exactly, whatever its generator does; with
    it on (default weight), the trained generator changes the clients' training."""
    lg = _trace(run(build_config(config("lg-fedavg", model, rounds=2))))
    off = _trace(run(build_config(config("fedgen", model, 2, gen_weight=0.0, **FAST_GEN))))
    assert off == lg
    on = _trace(run(build_config(config("fedgen", model, 2, **FAST_GEN))))
    # round 1 trains before anything is pooled: no regulariser yet
    for (r_on, m_on), (r_lg, m_lg) in zip(on[:2], lg[:2], strict=True):
        assert r_on == r_lg and m_on == pytest.approx(m_lg, rel=1e-6)
    assert on[2:] != lg[2:]


def test_fedgen_wire_label_counts_and_a_broadcast_generator():
    fed = Federation(build_config(config("fedgen", MIXED, **FAST_GEN)))
    server = fed.server
    gen_bytes = tensor_nbytes(server._generator_message())
    h = FAST_GEN["hidden_dim"]
    # Linear (no bias: BatchNorm follows), BatchNorm weight, bias and statistics, Linear
    floats = (FAST_GEN["noise_dim"] + C) * h + 4 * h + h * D + D
    assert gen_bytes == floats * 4 + 8  # float32, and BatchNorm's int64 step counter
    initial_gen = server._generator_message()

    up, down = fed.train_round(1)
    replies = fed.pending_replies
    assert up == 4 * (HEAD_BYTES + C * 8)  # the head and int64 label counts
    assert down == 4 * (HEAD_BYTES + gen_bytes + C * 8)  # one broadcast, counted per client
    for cid, reply in replies.items():
        expected = torch.bincount(fed.dataset.clients[cid].train_y, minlength=C)
        assert torch.equal(reply.message["labels/local_count"], expected)
    fed.aggregate(1)
    pooled = sum(torch.bincount(fed.dataset.clients[c].train_y, minlength=C) for c in replies)
    broadcast = server.broadcast(2)
    assert torch.equal(broadcast["labels/count"], pooled)
    assert any(not torch.equal(broadcast[k], v) for k, v in initial_gen.items())  # trained

    # a client's training leaves the received generator untouched (no gradient reaches it)
    client = fed.runtime.client(0, 2, "train", fed.store.get(0))
    client.receive(broadcast)
    client.fit()
    for k, v in client.generator.state_dict().items():
        assert torch.equal(v, broadcast[f"generator/{k}"])
    fed.close()


def _teacher_loss(server, heads: list[dict], gen_state: dict, pooled: torch.Tensor) -> float:
    """CE of the uniform ensemble of ``heads`` on features generated from a fixed sample."""
    from fl_core.algorithms.fedgen import build_generator, sample_labels, sample_noise

    gen = build_generator(server.hp, C, D)
    gen.load_state_dict({k.removeprefix("generator/"): v for k, v in gen_state.items()})
    gen.eval()
    g = torch.Generator().manual_seed(0)
    labels = sample_labels(pooled, 256, g)
    noise = sample_noise(256, server.hp.noise_dim, server.hp.noise, g)
    with torch.no_grad():
        feats = gen(labels, noise)
        logits = sum(feats @ h["model/head.weight"].T + h["model/head.bias"] for h in heads)
        return float(nn.functional.cross_entropy(logits / len(heads), labels))


@pytest.mark.parametrize("ensemble", ["uniform", "samples", "label"])
def test_fedgen_server_generator_learns_what_the_clients_heads_agree_on(ensemble):
    hp = {**FAST_GEN, "server_epochs": 60, "ensemble": ensemble}
    fed = Federation(build_config(config("fedgen", MIXED, **hp)))
    before = fed.server._generator_message()
    fed.train_round(1)
    replies = fed.pending_replies
    heads = [head_of(r.message) for r in replies.values()]
    reported = fed.aggregate(1)
    pooled = fed.server.pooled_label_counts()
    untrained = _teacher_loss(fed.server, heads, before, pooled)
    trained = _teacher_loss(fed.server, heads, fed.server._generator_message(), pooled)
    assert trained < 0.5 * untrained
    # the reported loss is the last training step's: teacher CE plus the diversity term
    assert set(reported) == {"server_generator_loss"}
    assert reported["server_generator_loss"] < untrained
    fed.close()


def test_fedgen_without_server_epochs_keeps_the_untrained_generator():
    # HtFLlib's effective behaviour: its trained generator is never saved
    fed = Federation(build_config(config("fedgen", **{**FAST_GEN, "server_epochs": 0})))
    before = fed.server._generator_message()
    fed.train_round(1)
    assert fed.aggregate(1) == {}  # no generator step, nothing to report
    after = fed.server._generator_message()
    assert all(torch.equal(before[k], after[k]) for k in before)
    fed.close()


# -- all three learn on a mixed group ---------------------------------------------------------
@pytest.mark.parametrize(
    "algorithm, hparams", [("lg-fedavg", {}), ("fedgh", {}), ("fedgen", FAST_GEN)]
)
def test_learns_on_a_mixed_model_group(algorithm, hparams):
    result = run(build_config(config(algorithm, MIXED, rounds=5, **hparams)))
    assert result.best_test_acc > 0.45  # 4 classes: chance is 0.25
