"""Flower adapter: records round-trip exactly, client data and state are keyed by partition id,
and `ktl run --set federation.executor=flower-sim` writes the in-process engine's metrics."""

from __future__ import annotations

import json
import math
import tomllib
from pathlib import Path

import pytest
import torch

pytest.importorskip("flwr", reason="Flower is optional: pip install 'ktl[flower]'")

from helpers import tiny_config  # noqa: E402
from typer.testing import CliRunner  # noqa: E402

from fl_core.config import ConfigError, build_config, dump_config  # noqa: E402
from fl_core.data.federated import build_federated_dataset  # noqa: E402
from fl_core.engine.runtime import Task, TaskResult  # noqa: E402
from fl_core.flower.client import PartitionData, PartitionStateStore  # noqa: E402
from fl_core.flower.codec import (  # noqa: E402
    CodecError,
    decode_result,
    decode_task,
    encode_result,
    encode_task,
)
from fl_core.flower.deploy import split_partition, write_app  # noqa: E402


def _message() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {
        "model/body.0.weight": torch.randn(5, 3, generator=g),
        "proto/counts": torch.tensor([3, 0, 7], dtype=torch.int64),
        "proto/present": torch.tensor([True, False, True]),
        "half/x": torch.randn(2, 2, generator=g).half(),
        "empty/x": torch.empty(0, 4),
        "scalar/x": torch.tensor(2.5),
    }


def _same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert list(a) == list(b)
    for k in a:
        assert a[k].dtype == b[k].dtype and a[k].shape == b[k].shape, k
        assert torch.equal(a[k], b[k]), k


def test_task_and_result_round_trip_bit_exactly():
    task = Task("fit", 7, 3, _message(), "b1", {}, finetune_epochs=2, train_loss=False)
    broadcast = {"model/head.weight": torch.randn(4, 5)}
    back, bcast, digest = decode_task(encode_task(task, broadcast, "abc"))
    assert (back.kind, back.client_id, back.round, back.finetune_epochs, back.train_loss) == (
        "fit",
        7,
        3,
        2,
        False,
    )
    assert digest == "abc"
    _same(back.message, task.message)
    _same(bcast, broadcast)
    back.message["model/body.0.weight"] += 1  # decoded tensors are writable, not views

    fit = TaskResult(7, message=_message(), num_samples=42, metrics={"train_loss": 0.25})
    got = decode_result(encode_result(fit))
    assert (got.client_id, got.num_samples, got.metrics, got.report) == (7, 42, fit.metrics, None)
    _same(got.message, fit.message)

    report = {
        "test_correct": 3,
        "test_num": 5,
        "test_probs": torch.softmax(torch.randn(5, 4), 1),
        "test_labels": torch.tensor([0, 1, 2, 3, 0]),
        "train_loss_sum": 1.0 / 3.0,
        "train_num": 9,
    }
    got = decode_result(encode_result(TaskResult(2, report=report)))
    assert got.report is not None
    assert got.report["train_loss_sum"] == 1.0 / 3.0  # doubles, not float32
    assert torch.equal(got.report["test_probs"], report["test_probs"])
    assert torch.equal(got.report["test_labels"], report["test_labels"])


def test_unsupported_dtype_is_refused_by_name():
    task = Task("fit", 0, 1, {"model/w": torch.ones(2, dtype=torch.bfloat16)}, "", {})
    with pytest.raises(CodecError, match="model/w.*bfloat16"):
        encode_task(task, {}, "d")


def test_partition_data_and_split_folders_give_the_saved_tensors(tmp_path):
    cfg = build_config(tiny_config("fedavg"))
    ds = build_federated_dataset(cfg.data, seed=cfg.seed)
    ds.save(tmp_path / "part")
    whole = PartitionData(tmp_path / "part")
    folders = split_partition(tmp_path / "part", tmp_path / "split")
    assert [f.name for f in folders] == [f"client_{i}" for i in range(ds.num_clients)]
    for i in range(ds.num_clients):
        for data in (whole, PartitionData(folders[i])):
            c = data.client(i)
            for name in ("train_x", "train_y", "test_x", "test_y"):
                assert torch.equal(getattr(c, name), getattr(ds.client(i), name)), (i, name)
    with pytest.raises(Exception, match="holds no client 2"):
        PartitionData(folders[1]).client(2)


def test_state_store_is_keyed_by_partition_and_remembers_the_round(tmp_path):
    store = PartitionStateStore(tmp_path / "states")
    assert store.get(3) == {} and store.round_of(3) is None
    store.put(3, {"model/w": torch.arange(4.0)}, round=5)
    store.put(4, {"model/w": torch.zeros(2)}, round=6)
    assert torch.equal(store.get(3)["model/w"], torch.arange(4.0))
    assert (store.round_of(3), store.round_of(4)) == (5, 6)
    assert not list((tmp_path / "states").glob("*.tmp"))


def test_app_folder_carries_the_config_and_checks_the_partition(tmp_path):
    cfg = build_config(tiny_config("fedproto"))
    ds = build_federated_dataset(cfg.data, seed=cfg.seed)
    ds.save(tmp_path / "part")
    app = write_app(tmp_path / "app", cfg, tmp_path / "part", tmp_path / "out", round_timeout=30)
    doc = tomllib.loads((app / "pyproject.toml").read_text())
    rc = doc["tool"]["flwr"]["app"]["config"]
    assert rc["ktl-config"] == dump_config(cfg)
    assert (rc["num-partitions"], rc["num-classes"], rc["input-shape"]) == (4, 4, "1x16x16")
    assert doc["tool"]["flwr"]["app"]["components"]["clientapp"] == "fl_core.flower.client:app"
    bigger = build_config({**tiny_config("fedproto"), "federation": {"num_new_clients": 2}})
    with pytest.raises(ConfigError, match="has 4 clients.*= 6"):
        write_app(tmp_path / "app2", bigger, tmp_path / "part", tmp_path / "out")


def _metrics(path):
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    skip = {"seconds", "train_seconds", "aggregate_seconds", "eval_seconds"}
    return [{k: v for k, v in r.items() if k not in skip} for r in rows]


def test_flower_simulation_writes_the_in_process_metrics(tmp_path):
    """FedProto (HtFL, stateful clients) with 3 of 4 clients per round and a held-out new
    client: the Flower simulation gives the in-process engine's metrics files."""
    import yaml

    from ktl.cli import app

    raw = tiny_config("fedproto", rounds=2)
    raw["federation"].update(join_ratio=0.75, num_new_clients=1, new_client_finetune_epochs=1)
    raw["data"]["num_clients"] = 4
    config = tmp_path / "cfg.yaml"
    config.write_text(yaml.safe_dump(raw))
    runner = CliRunner()
    base = runner.invoke(app, ["run", str(config), "-q", "--out", str(tmp_path / "inproc")])
    assert base.exit_code == 0, base.output
    sim = runner.invoke(
        app,
        [
            "run",
            str(config),
            "-q",
            "--out",
            str(tmp_path / "sim"),
            "--set",
            "federation.executor=flower-sim",
            "--set",
            "federation.workers=2",
        ],
    )
    assert sim.exit_code == 0, sim.output
    a, b = (
        _metrics(tmp_path / "inproc" / "metrics.jsonl"),
        _metrics(tmp_path / "sim" / "metrics.jsonl"),
    )
    assert [r["round"] for r in a] == [0, 1, 2] == [r["round"] for r in b]
    assert a[-1]["test_acc"] > a[0]["test_acc"]  # it learned: the comparison is not trivial
    for ra, rb in zip(a, b, strict=True):
        assert ra.keys() == rb.keys()
        for k in ra:
            if isinstance(ra[k], float) and not math.isnan(ra[k]):
                assert rb[k] == pytest.approx(ra[k], rel=1e-6, abs=1e-9), (ra["round"], k)
            else:
                assert ra[k] == rb[k], (ra["round"], k)
    sa = json.loads((tmp_path / "inproc" / "summary.json").read_text())
    sb = json.loads((tmp_path / "sim" / "summary.json").read_text())
    assert sb["new_clients"] == pytest.approx(sa["new_clients"], rel=1e-6)


def test_flower_executor_without_flower_says_how_to_install(monkeypatch):
    import importlib.util

    from fl_core.engine import Federation

    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "flwr" else real(name, *a)
    )
    raw = tiny_config("fedavg")
    raw["federation"]["executor"] = "flower-sim"
    fed = Federation(build_config(raw))
    try:
        with pytest.raises(ConfigError, match=r"pip install 'ktl\[flower\]'"):
            fed.executor  # noqa: B018
    finally:
        fed.close()


def test_flower_deployment_executor_outside_a_server_app_is_refused():
    from fl_core.engine import Federation
    from fl_core.flower.executor import FlowerError

    raw = tiny_config("fedavg")
    raw["federation"]["executor"] = "flower"
    fed = Federation(build_config(raw))
    try:
        with pytest.raises(FlowerError, match="flower-sim"):
            fed.executor  # noqa: B018
    finally:
        fed.close()


def test_simulation_close_shuts_ray_down_when_flower_does_not_stop(monkeypatch, tmp_path):
    """A simulation thread that does not return after the ServerApp is released (seen after a
    failed start) must not leave Ray and its workers running: close shuts Ray down itself,
    and only then; the temporary partition folder goes either way."""
    import sys
    import tempfile
    import threading
    import types

    import fl_core.flower.simulation as sim

    calls = []
    fake_ray = types.SimpleNamespace(is_initialized=lambda: True, shutdown=lambda: calls.append(1))
    monkeypatch.setitem(sys.modules, "ray", fake_ray)
    monkeypatch.setattr(sim, "STOP_TIMEOUT_S", 0.05)

    def executor(stops: bool):
        ex = object.__new__(sim.SimulationExecutor)
        ex._stop, release = threading.Event(), threading.Event()
        ex._thread = threading.Thread(
            target=(ex._stop.wait if stops else release.wait), args=(5.0,), daemon=True
        )
        ex._thread.start()
        ex._tmp = tempfile.TemporaryDirectory(dir=tmp_path)
        return ex, release

    ex, release = executor(stops=True)
    ex.close()
    assert calls == [] and not Path(ex._tmp.name).exists()

    ex, release = executor(stops=False)
    ex.close()
    release.set()
    assert calls == [1] and not Path(ex._tmp.name).exists()


def test_node_discovery_waits_as_long_as_the_executor_says(monkeypatch):
    """The simulation's nodes answer their first query only once Ray has started the workers and
    each imported its app (minutes on a busy machine): its executor waits the whole start
    timeout in one exchange; a deployment's default asks again every minute (nodes join over
    time) until node_wait passes. No answer at all gives the executor's own hint."""
    import types

    import fl_core.flower.executor as executor_mod
    import fl_core.flower.simulation as sim
    from fl_core.flower.executor import FlowerError, GridExecutor

    clock = types.SimpleNamespace(t=0.0)

    def sleep(seconds):
        clock.t += seconds

    monkeypatch.setattr(
        executor_mod, "time", types.SimpleNamespace(monotonic=lambda: clock.t, sleep=sleep)
    )
    # a Flower Message needs a running app; the queries here are never read
    monkeypatch.setattr(executor_mod, "Message", lambda *args, **kwargs: (args, kwargs))

    class SilentGrid:  # two nodes that never answer: each exchange waits out its timeout
        def __init__(self):
            self.timeouts = []

        def get_node_ids(self):
            return [11, 12]

        def send_and_receive(self, messages, timeout=None):
            self.timeouts.append(timeout)
            sleep(timeout)
            return []

    grid = SilentGrid()
    ex = GridExecutor(grid, "digest", 2, **sim.GRID_OPTIONS)  # as SimulationExecutor makes it
    with pytest.raises(FlowerError, match=r"within 300 s; the simulation's Ray workers"):
        ex.map([Task("fit", 0, 1, {}, "", {})])
    assert grid.timeouts == [300.0]

    grid = SilentGrid()
    assert GridExecutor(grid, "digest", 2, node_wait=130.0).discover(wait=130.0) == {}
    assert grid.timeouts == [60.0, 60.0, 60.0]  # at 0, 61 and 122 s


def test_a_flower_error_is_a_one_paragraph_cli_error(tmp_path):
    """`ktl run` with the deployment executor outside a ServerApp: exit 2, one paragraph that
    names the way out (flower-sim), no traceback."""
    import yaml

    from ktl.cli import app

    raw = tiny_config("fedavg")
    raw["federation"]["executor"] = "flower"
    config = tmp_path / "cfg.yaml"
    config.write_text(yaml.safe_dump(raw))
    result = CliRunner().invoke(app, ["run", str(config), "-q", "--out", str(tmp_path / "out")])
    assert result.exit_code == 2, result.output
    assert "flower-sim" in result.output and "Traceback" not in result.output
