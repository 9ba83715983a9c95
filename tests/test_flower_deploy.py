"""A real Flower deployment on loopback: one SuperLink (TLS, SuperNode authentication) and two
SuperNodes as subprocesses, each holding one partition of a saved `ktl partition` folder.

FedAvg and FedProto (HtFL) run 2 rounds each and write the in-process engine's metrics; a
SuperNode killed mid-round is a dropped client: the round and the run complete with the other,
whose state is intact. Every process is killed as a process group at the end, pass or fail.
Slow (each Flower message starts a ClientApp process that imports torch): run with -m slow.
"""

from __future__ import annotations

import json
import math
import time

import pytest

pytest.importorskip("flwr", reason="Flower is optional: pip install 'ktl[flower]'")

import psutil  # noqa: E402
from flower_deployment import BIN, LoopbackDeployment  # noqa: E402
from helpers import tiny_config  # noqa: E402

from fl_core.config import build_config  # noqa: E402
from fl_core.data.federated import build_federated_dataset  # noqa: E402
from fl_core.engine import run  # noqa: E402
from fl_core.flower.client import PartitionStateStore  # noqa: E402
from fl_core.flower.deploy import split_partition, write_app  # noqa: E402

pytestmark = pytest.mark.slow


def _config(algorithm: str, rounds: int):
    raw = tiny_config(algorithm, rounds=rounds)
    raw["data"]["num_clients"] = 2
    return build_config(raw)


def _records(path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def _runs_a_client_app(supernode: psutil.Process) -> bool:
    for child in supernode.children(recursive=True):
        try:
            if "flwr-clientapp" in " ".join(child.cmdline()):
                return True
        except psutil.Error:  # gone, or a zombie between tasks
            continue
    return False


@pytest.fixture
def deployment(tmp_path):
    """Partition + split folders, and a started SuperLink with two SuperNodes."""
    cfg = _config("fedavg", 2)
    ds = build_federated_dataset(cfg.data, seed=cfg.seed, batch_size=cfg.federation.batch_size)
    ds.save(tmp_path / "partition")
    folders = split_partition(tmp_path / "partition", tmp_path / "split")
    dep = LoopbackDeployment(tmp_path)
    try:
        dep.start_superlink()
        for i, folder in enumerate(folders):
            dep.start_supernode(i, folder)
        dep.folders = folders
        yield dep
    finally:
        dep.close()
        leftovers = [
            p
            for p in psutil.process_iter(["cmdline"])
            if str(tmp_path) in " ".join(p.info["cmdline"] or [])
        ]
        assert not leftovers, f"processes left running: {leftovers}"


@pytest.mark.parametrize("algorithm", ["fedavg", "fedproto"])
def test_two_rounds_over_tls_match_the_in_process_engine(deployment, tmp_path, algorithm):
    cfg = _config(algorithm, 2)
    app = write_app(tmp_path / "app", cfg, tmp_path / "partition", tmp_path / "out")
    done = deployment.run_app(app, timeout=500)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "https" in deployment.logs["superlink"].read_text()  # TLS was on
    flower = _records(tmp_path / "out" / "metrics.jsonl")
    local = run(cfg, out_dir=tmp_path / "inproc")
    assert [r["round"] for r in flower] == [0, 1, 2]
    for rec, ref in zip(flower, local.history, strict=True):
        assert (rec["bytes_up"], rec["bytes_down"]) == (ref.bytes_up, ref.bytes_down)
        for k, v in ref.metrics.items():
            if not math.isnan(v):
                assert rec[k] == pytest.approx(v, rel=1e-6, abs=1e-9), (rec["round"], k)
    states = PartitionStateStore  # every SuperNode kept its own state next to its data
    for i, folder in enumerate(deployment.folders):
        (state_dir,) = (folder / "ktl-state").iterdir()
        assert states(state_dir).round_of(i) == 2


def test_a_supernode_killed_mid_round_is_a_dropped_client(deployment, tmp_path):
    cfg = _config("fedproto", 3)
    app = write_app(
        tmp_path / "app", cfg, tmp_path / "partition", tmp_path / "out", round_timeout=150
    )
    flwr_run = deployment._start(
        "flwr-run", [str(BIN / "flwr"), "run", str(app), "loopback", "--stream"]
    )
    metrics = tmp_path / "out" / "metrics.jsonl"
    victim = psutil.Process(deployment.procs["supernode1"].pid)
    # wait for round 1 to be evaluated, then for supernode 1's round-2 ClientApp process
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        if metrics.exists() and any(r["round"] == 1 for r in _records(metrics)):
            break
        if flwr_run.poll() is not None:
            pytest.fail("the run ended early: " + deployment.logs["flwr-run"].read_text()[-3000:])
        time.sleep(0.2)
    else:
        pytest.fail("round 1 never finished: " + deployment.logs["superlink"].read_text()[-2000:])
    while time.monotonic() < deadline:
        if _runs_a_client_app(victim):
            break
        time.sleep(0.05)
    else:
        pytest.fail("supernode 1 never started its round-2 task")
    deployment.kill("supernode1")  # mid-round: its ClientApp is running the round-2 task

    assert flwr_run.wait(timeout=400) == 0, deployment.logs["flwr-run"].read_text()[-3000:]
    recs = _records(metrics)
    assert [r["round"] for r in recs] == [0, 1, 2, 3]  # the run went on to the end
    up = [r["bytes_up"] for r in recs]
    per_client = (up[1] - up[0]) / 2  # both clients uploaded in round 1
    assert per_client > 0
    assert up[2] - up[1] == per_client and up[3] - up[2] == per_client  # then only client 0
    log = deployment.logs["flwr-run"].read_text()
    assert "round 2: client 1 dropped" in log and "client 0 dropped" not in log
    assert all(not math.isnan(r["test_acc"]) for r in recs)
    survivor = PartitionStateStore(next((deployment.folders[0] / "ktl-state").iterdir()))
    dead = PartitionStateStore(next((deployment.folders[1] / "ktl-state").iterdir()))
    assert survivor.round_of(0) == 3 and survivor.get(0)  # trained every round, state whole
    assert dead.round_of(1) == 1 and dead.get(1)  # the killed client kept its round-1 state
    assert recs[3]["test_acc"] >= recs[0]["test_acc"]
