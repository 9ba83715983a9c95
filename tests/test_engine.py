"""Engine, algorithms, config and CLI: behaviour that could fail."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from fl_core.algorithms import get_algorithm, tensor_nbytes
from fl_core.algorithms.common import weighted_average
from fl_core.config import ConfigError, build_config, load_config
from fl_core.engine import ClientStateStore, Federation, run
from fl_core.engine.metrics import micro_auc

FMNIST = Path("/usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz")


def synthetic_config(**over) -> dict:
    cfg = {
        "seed": 3,
        "data": {
            "dataset": "synthetic",
            "partition": "dir",
            "alpha": 0.5,
            "num_clients": 6,
            "source_options": {"num_samples": 900, "num_classes": 4, "image_size": 12},
        },
        "model": {"name": "mlp", "feature_dim": 32},
        "algorithm": {"name": "fedavg"},
        "federation": {
            "rounds": 4,
            "local_epochs": 5,
            "batch_size": 16,
            "lr": 0.05,
            "eval_every": 1,
        },
    }
    for key, value in over.items():
        section, _, field = key.partition(".")
        if field:
            cfg[section][field] = value
        else:
            cfg[section] = value
    return cfg


def test_weighted_average_matches_hand_computation():
    a = {"w": torch.tensor([1.0, 2.0]), "n": torch.tensor(3)}
    b = {"w": torch.tensor([3.0, 6.0]), "n": torch.tensor(5)}
    avg = weighted_average([(a, 1), (b, 3)])
    assert torch.allclose(avg["w"], torch.tensor([2.5, 5.0]))
    assert int(avg["n"]) == 5  # integer counters take the max


def test_micro_auc_matches_sklearn():
    from sklearn.metrics import roc_auc_score
    from sklearn.preprocessing import label_binarize

    g = torch.Generator().manual_seed(0)
    probs = torch.softmax(torch.randn(50, 4, generator=g), 1)
    probs[:5] = probs[0]  # ties
    labels = torch.randint(0, 4, (50,), generator=g)
    ours = micro_auc(probs, labels, 4)
    ref = roc_auc_score(
        label_binarize(labels.numpy(), classes=range(4)), probs.numpy(), average="micro"
    )
    assert ours == pytest.approx(ref, abs=1e-9)


def test_state_store_spills_to_disk_and_reads_back(tmp_path):
    store = ClientStateStore(memory_budget=3000)
    states = {i: {"w": torch.full((200,), float(i))} for i in range(10)}  # 800 bytes each
    for i, s in states.items():
        store.put(i, s)
    assert store.memory_bytes <= 3000
    assert store.spills > 0 and len(store) == 10
    for i in range(10):
        assert torch.equal(store.get(i)["w"], states[i]["w"])
    assert store.get(99) == {}
    store.close()


def test_fedavg_learns_and_is_deterministic(tmp_path):
    cfg = build_config(synthetic_config())
    r1 = run(cfg, out_dir=tmp_path / "a")
    r2 = run(cfg, out_dir=tmp_path / "b")
    accs1 = [h.metrics["test_acc"] for h in r1.history]
    accs2 = [h.metrics["test_acc"] for h in r2.history]
    assert accs1 == accs2
    assert [h.metrics["train_loss"] for h in r1.history] == [
        h.metrics["train_loss"] for h in r2.history
    ]
    assert r1.best_test_acc > 0.6  # 4 classes: chance is 0.25
    assert accs1[-1] > accs1[0] + 0.3
    # outputs
    lines = (tmp_path / "a" / "metrics.jsonl").read_text().splitlines()
    rows = [json.loads(x) for x in lines]
    assert [r["round"] for r in rows] == [0, 1, 2, 3, 4]
    for key in (
        "test_acc",
        "test_auc",
        "train_loss",
        "test_acc_std",
        "bytes_up",
        "bytes_down",
        "seconds",
    ):
        assert key in rows[-1]
    summary = json.loads((tmp_path / "a" / "summary.json").read_text())
    for key in ("algorithm", "best_test_acc", "final_test_acc", "rounds", "seconds_per_round"):
        assert key in summary
    assert summary["rounds"] == 4
    assert (tmp_path / "a" / "curves.png").stat().st_size > 1000
    assert load_config(tmp_path / "a" / "config.yaml") == cfg


def test_a_stop_request_ends_the_run_and_resuming_continues_it(tmp_path):
    """``on_round`` returning true stops after that round (a time budget, say); the stopped run
    is checkpointed and summarised, and resuming it ends where an uninterrupted run ends."""
    cfg = build_config(synthetic_config(**{"federation.checkpoint_every": 3}))
    full = run(cfg, out_dir=tmp_path / "full")
    seen = []
    cut = run(cfg, out_dir=tmp_path / "cut", on_round=lambda rnd, rec: seen.append(rnd) or rnd == 2)
    assert seen == [0, 1, 2] and cut.rounds_run == 2 and cut.stop_requested
    assert cut.summary()["rounds"] == 2 and not cut.stopped_early
    assert [h.round for h in cut.history] == [0, 1, 2]
    resumed = run(cfg, out_dir=tmp_path / "cut", resume=True)
    assert resumed.rounds_run == 4 and not resumed.stop_requested
    assert [h.metrics for h in resumed.history] == [h.metrics for h in full.history]


def test_a_run_stopped_on_a_round_it_did_not_evaluate_counts_the_bytes_of_every_round():
    """With ``eval_every`` > 1 the last record can be older than the last round: a run stopped
    after round 5 (evaluated at 3) has sent five rounds' bytes, which its summary says."""
    over = {"federation.rounds": 6, "federation.eval_every": 3, "federation.executor": "sequential"}
    cfg = build_config(synthetic_config(**over))
    cut = run(cfg, on_round=lambda rnd, rec: rnd == 5)
    assert cut.rounds_run == 5 and [h.round for h in cut.history] == [0, 3]
    per_round = cut.history[-1].bytes_up // 3  # FedAvg: the same model to every client
    assert per_round > 0
    summary = cut.summary()
    assert summary["rounds"] == 5 and summary["bytes_up"] == 5 * per_round
    assert summary["bytes_down"] == 5 * (cut.history[-1].bytes_down // 3)


def test_a_diverged_run_stops_with_an_error_naming_round_and_clients(tmp_path):
    """A NaN training loss ends the run with `TrainingDiverged` (rounds before it are written);
    ``stop_on_divergence: false`` runs on to the last round at chance."""
    from fl_core.engine import TrainingDiverged

    over = {"federation.lr": 1e6, "federation.rounds": 3, "federation.executor": "sequential"}
    with pytest.raises(TrainingDiverged, match=r"round 1: .*client 0, 1, 2, 3, 4 and 1 more"):
        run(build_config(synthetic_config(**over)), out_dir=tmp_path / "a")
    rows = (tmp_path / "a" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(r)["round"] for r in rows] == [0]
    off = synthetic_config(**over, **{"federation.stop_on_divergence": False})
    result = run(build_config(off))
    assert result.rounds_run == 3
    assert result.history[-1].metrics["train_loss"] != result.history[-1].metrics["train_loss"]


def test_cli_reports_a_diverged_run_in_one_paragraph(tmp_path):
    from ktl.cli import app

    sets = ["data.dataset=synthetic", "data.num_clients=2", "federation.rounds=2"]
    sets += ["federation.lr=1e6", "model.name=mlp", "federation.executor=sequential"]
    args = ["run", *[a for s in sets for a in ("--set", s)], "--out", str(tmp_path / "x")]
    res = CliRunner().invoke(app, args)
    assert res.exit_code == 2 and "Traceback" not in res.output
    assert "diverged" in res.output and "federation.lr" in res.output


def test_byte_counts_equal_model_size_times_clients():
    cfg = build_config(synthetic_config(**{"federation.rounds": 2, "federation.local_epochs": 1}))
    fed = Federation(cfg)
    model = fed.runtime.new_model("mlp")
    model_bytes = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    up, down = fed.train_round(1)
    n = cfg.data.num_clients
    assert up == n * model_bytes
    assert down == n * model_bytes
    assert tensor_nbytes({"a": torch.zeros(3, dtype=torch.float16)}) == 6
    fed.close()


def test_local_sends_nothing_and_keeps_state():
    cfg = build_config(synthetic_config(algorithm={"name": "local"}))
    fed = Federation(cfg)
    up, down = fed.train_round(1)
    assert up == 0 and down == 0
    assert len(fed.store) == cfg.data.num_clients  # every client kept its own model
    s0, s1 = fed.store.get(0), fed.store.get(1)
    assert any(not torch.equal(s0[k], s1[k]) for k in s0)
    fed.close()


def test_fedprox_mu_zero_equals_fedavg_and_mu_changes_result():
    base = synthetic_config(**{"federation.rounds": 2, "federation.local_epochs": 1})
    avg = run(build_config(base))
    prox0 = run(build_config({**base, "algorithm": {"name": "fedprox", "mu": 0.0}}))
    prox = run(build_config({**base, "algorithm": {"name": "fedprox", "mu": 1.0}}))
    losses = lambda r: [h.metrics["train_loss"] for h in r.history]  # noqa: E731
    assert losses(avg) == losses(prox0)
    assert losses(prox) != losses(avg)


def test_selection_join_ratio_and_drop_rate_are_seeded():
    cfg = build_config(
        synthetic_config(**{"federation.join_ratio": 0.5, "federation.client_drop_rate": 0.3})
    )
    fed = Federation(cfg)
    picks = [fed.select(r) for r in range(1, 30)]
    assert all(len(p) <= 3 for p in picks)
    assert any(len(p) < 3 for p in picks)  # some drops happened
    assert picks == [fed.select(r) for r in range(1, 30)]
    assert len({tuple(p) for p in picks}) > 1
    fed.close()


def test_new_clients_are_held_out_and_evaluated():
    cfg = build_config(
        synthetic_config(
            **{"federation.num_new_clients": 2, "federation.new_client_finetune_epochs": 1}
        )
    )
    res = run(cfg)
    assert res.new_client_metrics is not None
    assert 0.0 <= res.new_client_metrics["test_acc"] <= 1.0
    assert res.new_client_metrics["test_acc"] > 0.4


@pytest.mark.parametrize(
    "raw, fragment",
    [
        ({"algorithm": {"name": "fedsgd"}}, "valid choices"),
        ({"algorithm": {"name": "fedprox", "mux": 1}}, "algorithm.mux"),
        ({"federation": {"roundz": 3}}, "federation.roundz: unknown key"),
        ({"federation": {"lr": -1}}, "federation.lr"),
        ({"bogus": 1}, "valid keys here"),
    ],
)
def test_bad_config_errors_name_the_field(raw, fragment):
    with pytest.raises(ConfigError) as e:
        build_config(raw)
    assert fragment in str(e.value)


def test_cli_errors_are_one_paragraph_without_traceback(tmp_path):
    from ktl.cli import app

    runner = CliRunner()
    res = runner.invoke(app, ["run", "--set", "algorithm.name=nope", "--out", str(tmp_path / "x")])
    assert res.exit_code == 2
    assert "Traceback" not in res.output
    assert "valid choices" in res.output
    res = runner.invoke(
        app,
        [
            "run",
            "--set",
            "model.name=nonet",
            "--set",
            "data.dataset=synthetic",
            "--set",
            "data.num_clients=2",
            "--set",
            "federation.rounds=1",
            "--out",
            str(tmp_path / "y"),
        ],
    )
    assert res.exit_code == 2 and "Traceback" not in res.output
    assert "nonet" in res.output


def test_cli_lists_algorithms():
    from ktl.cli import app

    res = CliRunner().invoke(app, ["list", "algorithms"])
    assert res.exit_code == 0
    for name in ("fedavg", "fedprox", "local"):
        assert name in res.output
    assert get_algorithm("FedAvg").name == "fedavg"


@pytest.mark.skipif(not FMNIST.exists(), reason="Debian's dataset-fashion-mnist is not installed")
def test_fedavg_on_fashion_mnist_beats_chance(tmp_path):
    from ktl.cli import app

    res = CliRunner().invoke(
        app,
        [
            "run",
            "--quiet",
            "--out",
            str(tmp_path / "fm"),
            *("--set", "data.num_clients=10", "--set", "data.alpha=1.0"),
            *("--set", "data.max_samples=8000", "--set", "federation.rounds=3"),
            *("--set", "federation.lr=0.05", "--set", "federation.eval_train_loss=false"),
        ],
    )
    assert res.exit_code == 0, res.output
    summary = json.loads((tmp_path / "fm" / "summary.json").read_text())
    assert summary["best_test_acc"] > 0.6  # 10 classes: chance is 0.1


def test_process_executor_matches_sequential():
    base = synthetic_config(
        **{
            "federation.rounds": 2,
            "federation.local_epochs": 1,
            "federation.executor": "sequential",
        }
    )
    seq = run(build_config(base))
    par_cfg = {**base, "federation": {**base["federation"], "executor": "process", "workers": 2}}
    par = run(build_config(par_cfg))
    assert [h.metrics for h in seq.history] == [h.metrics for h in par.history]
    assert seq.history[-1].bytes_up == par.history[-1].bytes_up


@pytest.mark.parametrize("executor", ["sequential", "process"])
def test_executors_draw_tasks_only_as_workers_free(executor):
    """A round's tasks are built lazily: the executor holds at most its in-flight bound of
    them (and so of the clients' states) at once, and the round's replies come back in task
    order whatever order the workers finish in."""
    from fl_core.engine.executors import IN_FLIGHT_PER_WORKER

    cfg = synthetic_config(
        **{
            "data.num_clients": 12,
            "federation.executor": executor,
            "federation.workers": 2,
        }
    )
    fed = Federation(build_config(cfg))
    try:
        bound = 1 if executor == "sequential" else 2 * IN_FLIGHT_PER_WORKER
        drawn, most_ahead, seen = 0, 0, []
        real_get = fed.store.get

        def counting_get(cid):
            nonlocal drawn
            drawn += 1
            return real_get(cid)

        fed.store.get = counting_get
        real_map = fed.executor.map

        def watching_map(tasks):
            nonlocal most_ahead
            for res in real_map(tasks):
                seen.append(res.client_id)
                most_ahead = max(most_ahead, drawn - (len(seen) - 1))
                yield res

        fed.executor.map = watching_map
        fed.train_round(1)
        assert sorted(seen) == list(range(12)) and drawn == 12
        assert most_ahead <= bound  # never every client's state at once
        assert list(fed.pending_replies) == list(range(12))  # task order
    finally:
        fed.close()


def test_cli_partition_writes_manifest_matching_the_table(tmp_path):
    from ktl.cli import app

    out = tmp_path / "part"
    res = CliRunner().invoke(
        app,
        [
            "partition",
            "--out",
            str(out),
            "--set",
            "data.dataset=digits",
            "--set",
            "data.num_clients=5",
            "--set",
            "data.partition=pat",
        ],
    )
    assert res.exit_code == 0, res.output
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["num_clients"] == 5 and manifest["scenario"] == "pat"
    total = sum(c["train_samples"] + c["test_samples"] for c in manifest["clients"])
    assert total == 1797  # every digit image lands in exactly one client
    for c in manifest["clients"]:
        assert str(c["train_samples"]) in res.output
        held = [k for k, n in enumerate(c["train_label_counts"]) if n]
        assert len(held) <= 2


def test_fedavg_refuses_a_heterogeneous_model_group_clearly():
    from ktl.cli import app

    res = CliRunner().invoke(
        app,
        [
            "run",
            "--quiet",
            "--set",
            "model.name=HtFE-img-2",
            "--set",
            "data.dataset=synthetic",
            "--set",
            "data.num_clients=2",
            "--set",
            "federation.rounds=1",
            "--set",
            "data.source_options={image_size: 28, num_samples: 60}",
        ],
    )
    assert res.exit_code == 2 and "Traceback" not in res.output
    assert "heterogeneous" in res.output


def test_an_architecture_too_small_for_the_input_is_refused_before_training():
    # cnn4 needs at least 16 px; Local builds no server model, so the engine must check
    cfg = build_config(
        synthetic_config(algorithm={"name": "local"}, model={"name": "cnn4", "feature_dim": 8})
    )
    from fl_core.models import ModelError

    with pytest.raises(ModelError, match="too small for cnn4"):
        Federation(cfg)


def test_a_client_task_runs_on_a_runtime_built_without_any_server():
    from fl_core.data.federated import build_federated_dataset
    from fl_core.engine import ClientRuntime, Task

    cfg = build_config(synthetic_config())
    dataset = build_federated_dataset(cfg.data, seed=cfg.seed, batch_size=16)
    runtime = ClientRuntime.from_config(cfg, dataset, torch.device("cpu"))
    result = runtime.run_task(Task("fit", 2, 1, {}, "", {}))
    # the reply describes itself: its sample count comes from the client, not from a server
    assert result.num_samples == dataset.clients[2].num_train
    n = dataset.clients[2].num_train
    assert result.metrics["steps"] == 5 * (n // 16 if n >= 16 else 1)  # drop_last
    assert set(result.message) == {f"model/{k}" for k in runtime.new_model("mlp").state_dict()}
    again = runtime.run_task(Task("fit", 2, 1, {}, "", {}))
    assert all(torch.equal(result.message[k], again.message[k]) for k in result.message)


@pytest.mark.parametrize("algorithm", ["fedbabu", "fedala", "perfedavg"])
def test_evaluating_less_often_does_not_change_training(algorithm):
    """Evaluation keeps no state and draws from its own random streams, so a round's metrics
    are the same whether a run evaluates every round or every other one (these
    algorithms compute at evaluation: FedBABU fine-tunes, FedALA mixes, Per-FedAvg adapts).
    A benchmark row with ``federation.eval_every`` > 1 thus reports a lower bound of the best
    over every round."""
    over = {"federation.local_epochs": 1, "federation.executor": "sequential"}
    every = run(build_config(synthetic_config(**over, **{"algorithm.name": algorithm})))
    sparse_over = {**over, "algorithm.name": algorithm, "federation.eval_every": 2}
    sparse = run(build_config(synthetic_config(**sparse_over)))
    assert [h.round for h in sparse.history] == [0, 2, 4]
    by_round = {h.round: h.metrics for h in every.history}
    for h in sparse.history:
        assert h.metrics == by_round[h.round]
