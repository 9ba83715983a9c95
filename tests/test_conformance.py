"""Conformance: every registered algorithm, now and future, honours the engine contract.

For each algorithm on a tiny federation: two runs with one seed are equal; the process executor
gives the sequential executor's results; forcing every client state to spill to disk changes
nothing; the engine's byte counts equal the sizes of the messages clients actually received and
sent; a client's upload is not an echo of what it received; a run interrupted after a
checkpoint and resumed ends with exactly the uninterrupted run's metrics. Algorithms that declare themselves heterogeneous-capable go through the same
checks on a mixed-architecture group; the others must refuse that group before training.
"""

from __future__ import annotations

import math
import os

import pytest
import torch

from fl_core.algorithms import AlgorithmError, registered_algorithms, tensor_nbytes
from fl_core.config import build_config
from fl_core.engine import ClientStateStore, Federation, run
from fl_core.engine import state_store as state_store_module
from fl_core.models import register_group
from fl_core.models.groups import is_group

ALGORITHMS = sorted(registered_algorithms())
HETERO_GROUP = "conformance-mlp-cnn4"
if not is_group(HETERO_GROUP):
    register_group(HETERO_GROUP, ("mlp", "cnn4"))


# Hyperparameters that keep an algorithm's conformance runs to seconds (the behaviour tested is
# the same): FedKTL's server samples its diffusion generator in 2 steps and trains 5 epochs.
CONFORMANCE_HPARAMS: dict[str, dict] = {"fedktl": {"generator_steps": 2, "server_epochs": 5}}


def tiny_config(algorithm: str, model: str = "mlp", **federation) -> dict:
    fed = {
        "rounds": 3,
        "join_ratio": 0.75,  # 3 of 4 clients: unselected clients keep their state
        "local_epochs": 1,
        "batch_size": 16,
        "lr": 0.05,
        "eval_every": 1,
        "executor": "sequential",
        "checkpoint_every": None,
        "num_new_clients": 1,
        "new_client_finetune_epochs": 1,
    }
    fed.update(federation)
    return {
        "seed": 5,
        "data": {
            "dataset": "synthetic",
            "partition": "dir",
            "alpha": 0.5,
            "num_clients": 4,
            "source_options": {"num_samples": 500, "num_classes": 4, "image_size": 16},
        },
        "model": {"name": model, "feature_dim": 16},
        "algorithm": {"name": algorithm, **CONFORMANCE_HPARAMS.get(algorithm, {})},
        "federation": fed,
    }


def setups(algorithm: str) -> list[str]:
    info = registered_algorithms()[algorithm]
    return ["mlp", HETERO_GROUP] if info.heterogeneous else ["mlp"]


CASES = [(a, m) for a in ALGORITHMS for m in setups(a)]


def trace(result) -> list[tuple]:
    """Everything a run reports except wall-clock times."""
    rows = [(r.round, r.metrics, r.bytes_up, r.bytes_down) for r in result.history]
    return [*rows, ("new clients", result.new_client_metrics)]


def assert_close(a: list[tuple], b: list[tuple], rel: float = 1e-5) -> None:
    assert len(a) == len(b)
    for ra, rb in zip(a, b, strict=True):
        assert ra[0] == rb[0] and ra[2:] == rb[2:]
        ma, mb = ra[1], rb[1]
        assert ma.keys() == mb.keys()
        for k in ma:
            if math.isnan(ma[k]):
                assert math.isnan(mb[k]), k
            else:
                assert ma[k] == pytest.approx(mb[k], rel=rel, abs=1e-6), (ra[0], k)


@pytest.mark.parametrize("algorithm, model", CASES)
def test_same_seed_same_results_and_spilling_changes_nothing(algorithm, model, monkeypatch):
    cfg = tiny_config(algorithm, model)
    first = trace(run(build_config(cfg)))
    assert first == trace(run(build_config(cfg)))

    spills, stored = [], []
    real_save, real_put = state_store_module.save_file, ClientStateStore.put
    monkeypatch.setattr(
        state_store_module, "save_file", lambda *a, **k: (spills.append(1), real_save(*a, **k))
    )
    monkeypatch.setattr(
        ClientStateStore, "put", lambda self, c, s: (stored.append(bool(s)), real_put(self, c, s))
    )
    spilled_cfg = tiny_config(algorithm, model, state_memory_mb=1e-6)
    assert trace(run(build_config(spilled_cfg))) == first
    if any(stored):
        assert spills, "state was never spilled: the test did not exercise the disk path"


@pytest.mark.parametrize("algorithm, model", CASES)
def test_process_executor_matches_sequential(algorithm, model):
    seq = run(build_config(tiny_config(algorithm, model)))
    par = run(build_config(tiny_config(algorithm, model, executor="process", workers=2)))
    assert_close(trace(seq), trace(par))


@pytest.mark.parametrize("algorithm, model", CASES)
def test_byte_counts_equal_the_messages_sent(algorithm, model):
    fed = Federation(build_config(tiny_config(algorithm, model)))
    runtime = fed.runtime
    received, sent = [], []
    real = runtime.run_task

    def recording(task):
        received.append(
            tensor_nbytes(runtime.broadcast(task.broadcast)) + tensor_nbytes(task.message)
        )
        result = real(task)
        sent.append(tensor_nbytes(result.message))
        return result

    runtime.run_task = recording
    try:
        for rnd in (1, 2):
            received.clear()
            sent.clear()
            up, down = fed.train_round(rnd)
            fed.aggregate(rnd)
            assert down == sum(received)
            assert up == sum(sent)
            assert len(received) == len(fed.select(rnd))
    finally:
        fed.close()


def train_two_rounds_and_close(fed: Federation) -> None:
    try:
        for rnd in (1, 2):
            fed.train_round(rnd)
            fed.aggregate(rnd)
    finally:
        fed.close()


@pytest.mark.parametrize("algorithm, model", CASES)
def test_an_upload_is_what_the_client_trained_not_what_it_received(algorithm, model):
    """Where a client uploads tensors under the names it received them by (a model part it
    trains and sends back), the upload differs from what it received: it carries the round's
    training. An upload built before training passes every other check here."""
    import torch

    fed = Federation(build_config(tiny_config(algorithm, model)))
    runtime = fed.runtime
    echoed: list[tuple[int, list[str]]] = []
    real = runtime.run_task

    def recording(task):
        got = {**runtime.broadcast(task.broadcast), **task.message}
        result = real(task)
        # floating-point tensors only: integer ones are ids and counts, not trained values
        same = [k for k in result.message if k in got and result.message[k].is_floating_point()]
        if same and all(torch.equal(result.message[k], got[k]) for k in same):
            echoed.append((task.client_id, same))
        return result

    runtime.run_task = recording
    train_two_rounds_and_close(fed)
    assert not echoed, f"uploaded exactly what was received: {echoed[:2]}"


class _Interrupt(Exception):
    pass


@pytest.mark.parametrize("algorithm, model", CASES)
def test_resume_equals_an_uninterrupted_run(algorithm, model, tmp_path):
    cfg = build_config(tiny_config(algorithm, model, checkpoint_every=1))
    full = run(cfg, out_dir=tmp_path / "full")

    def stop_at_two(rnd, rec):
        if rnd == 2:
            raise _Interrupt

    with pytest.raises(_Interrupt):
        run(cfg, out_dir=tmp_path / "cut", on_round=stop_at_two)
    resumed = run(cfg, out_dir=tmp_path / "cut", resume=True)
    assert trace(resumed) == trace(full)
    lines = lambda d: [  # noqa: E731
        {k: v for k, v in __import__("json").loads(x).items() if not k.endswith("seconds")}
        for x in (d / "metrics.jsonl").read_text().splitlines()
    ]
    assert lines(tmp_path / "cut") == lines(tmp_path / "full")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("algorithm, model", CASES)
def test_on_cuda_a_run_tracks_the_cpu_run(algorithm, model):
    """Messages arrive on the CPU while a client's model is on the GPU: a tensor left on the
    wrong device fails here (FedFomo's peer models once did, only on CUDA). The run's rounds,
    bytes and accuracies track the CPU run's (float rounding differs between devices)."""
    cpu = trace(run(build_config(tiny_config(algorithm, model))))
    gpu = trace(run(build_config({**tiny_config(algorithm, model), "device": "cuda"})))
    assert len(gpu) == len(cpu)
    for rg, rc in zip(gpu[:-1], cpu[:-1], strict=True):
        assert rg[0] == rc[0] and rg[2:] == rc[2:]
        assert math.isfinite(rg[1]["train_loss"]), rg[0]
        assert rg[1]["test_acc"] == pytest.approx(rc[1]["test_acc"], abs=0.1), rg[0]
    assert gpu[-1][1]["test_acc"] == pytest.approx(cpu[-1][1]["test_acc"], abs=0.1)


@pytest.mark.parametrize(
    "algorithm", [a for a in ALGORITHMS if not registered_algorithms()[a].heterogeneous]
)
def test_homogeneous_algorithms_refuse_a_mixed_group_before_training(algorithm):
    with pytest.raises(AlgorithmError) as err:
        Federation(build_config(tiny_config(algorithm, HETERO_GROUP)))
    assert "mlp" in str(err.value) and "cnn4" in str(err.value)


def test_every_algorithm_has_metadata():
    from fl_core.algorithms import FAMILIES

    for name, algo in registered_algorithms().items():
        assert algo.family in FAMILIES, name
        assert algo.paper, f"{name} names no paper"
        assert algo.client_cls.__module__ == algo.hparams_cls.__module__, name


def test_a_broadcast_reaches_each_worker_once_per_round(tmp_path, monkeypatch):
    from fl_core.engine import executors

    log = tmp_path / "reads.log"
    real = executors._read_broadcast

    def counting(key):
        with open(log, "a") as f:  # appended from the forked workers
            f.write(f"{os.getpid()} {key}\n")
        return real(key)

    monkeypatch.setattr(executors, "_read_broadcast", counting)
    cfg = tiny_config("fedavg", executor="process", workers=2, join_ratio=1.0)
    cfg["data"]["num_clients"] = 8
    fed = Federation(build_config(cfg))
    train_two_rounds_and_close(fed)
    reads = [line.split() for line in log.read_text().splitlines()]
    keys = {key for _, key in reads}
    assert len(keys) == 2  # one broadcast per round
    for key in keys:
        pids = [pid for pid, k in reads if k == key]
        assert len(pids) == len(set(pids)) <= 2  # 8 tasks, at most one read per worker
