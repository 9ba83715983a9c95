"""The benchmark scripts' own logic: what they hand to other code and what they read back."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parent.parent
FMNIST = Path("/usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz")

# A stand-in for a PFLlib checkout: the modules pfllib_crosscheck's bootstrap patches, and a
# main.py that reads the exported clients as PFLlib's data utilities do and prints one
# "Average(d) Test Accuracy" line per evaluation (before each round and after the last): the
# share of test samples whose label is the client's most common training label.
FAKE_MAIN = r"""
import sys
from pathlib import Path
import numpy as np

args = dict(zip(sys.argv[1::2], sys.argv[2::2]))
expected = {"-m": "CNN", "-nc": "20", "-lbs": "10", "-lr": "0.005", "-algo": "FedAvg"}
for flag, value in expected.items():
    assert args[flag] == value, (flag, args.get(flag))
root = Path("..") / "dataset" / args["-data"]
correct = total = 0
for i in range(int(args["-nc"])):
    train = np.load(root / "train" / f"{i}.npz", allow_pickle=True)["data"].tolist()
    test = np.load(root / "test" / f"{i}.npz", allow_pickle=True)["data"].tolist()
    assert train["x"].shape[1:] == (1, 28, 28) and train["x"].dtype == np.float32
    majority = np.bincount(train["y"]).argmax()
    correct += int((test["y"] == majority).sum())
    total += len(test["y"])
for r in range(int(args["-gr"]) + 1):
    # pFedMe's server says "Average" where the others say "Averaged"
    print(f"Average{'d' if r % 2 else ''} Test Accuracy: {correct / total:.4f}", flush=True)
try:
    import h5py  # as pFedMe's server writes its own results
except ImportError:
    h5py = None
if h5py is not None:
    with h5py.File("results.h5", "w") as hf:
        hf.create_dataset("rs_test_acc", data=[correct / total])
"""
STUBS = {
    "utils/__init__.py": "",
    "utils/result_utils.py": "def average_data(**kwargs):\n    raise SystemExit('not skipped')\n",
    "utils/mem_utils.py": "class MemReporter:\n    def report(self):\n        pass\n",
    "flcore/__init__.py": "",
    "flcore/servers/__init__.py": "",
    "flcore/servers/serverbase.py": "class Server:\n    def save_results(self):\n        pass\n",
    "flcore/clients/__init__.py": "",
    "flcore/clients/clientbase.py": (
        "class Client:\n    def load_test_data(self, batch_size=None):\n        pass\n"
    ),
}


@pytest.mark.skipif(not FMNIST.exists(), reason="needs Debian's dataset-fashion-mnist")
def test_crosscheck_hands_pfllib_our_exact_clients_and_reads_its_accuracies(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    import pfllib_crosscheck as cc
    from reproduce_pfllib import SCENARIOS

    from fl_core.config import load_config
    from fl_core.data.federated import build_federated_dataset

    checkout = tmp_path / "PFLlib"
    (checkout / "system").mkdir(parents=True)
    (checkout / "system" / "main.py").write_text(FAKE_MAIN)
    for rel, text in STUBS.items():
        (checkout / "system" / rel).parent.mkdir(parents=True, exist_ok=True)
        (checkout / "system" / rel).write_text(text)
    monkeypatch.setattr(cc, "ROWS", tmp_path / "results" / "cc.json")
    monkeypatch.setattr(cc, "RESULTS", tmp_path / "results")
    monkeypatch.setattr(cc, "LOGS", tmp_path / "logs")

    cc.main(["--pfllib", str(checkout), "--algorithm", "FedAvg", "--scenario", "dir"])
    # the answer the stand-in must print if it read exactly our partition
    overrides = [f"{k}={v}" for k, v in SCENARIOS["dir"].items()]
    cfg = load_config(ROOT / "configs" / "default.yaml", overrides)
    fds = build_federated_dataset(cfg.data, seed=cfg.seed, batch_size=cfg.federation.batch_size)
    correct = total = 0
    for i in range(fds.num_clients):
        c = fds.client(i)
        majority = np.bincount(c.train_y.numpy()).argmax()
        correct += int((c.test_y.numpy() == majority).sum())
        total += len(c.test_y)
    (row,) = json.loads((tmp_path / "results" / "cc.json").read_text())
    assert row["test_acc"] == [round(correct / total, 4)] * 21
    assert row["partition"] == {"clients": 20, "train": fds.total_train, "test": fds.total_test}
    assert row["ours"] == "fedavg" and row["after_training"] == []
    table = (tmp_path / "results" / "cc.md").read_text()
    assert f"| FedAvg | dir | `(defaults)` | 20 | {100 * correct / total:.2f} (0) |" in table
    assert not (tmp_path / "logs" / "FedAvg-dir.log").exists()  # removed once it succeeded

    # a second call with the same key keeps the row instead of running again
    (checkout / "system" / "main.py").write_text("raise SystemExit(3)")
    cc.main(["--pfllib", str(checkout), "--algorithm", "FedAvg", "--scenario", "dir"])
    assert len(json.loads((tmp_path / "results" / "cc.json").read_text())) == 1
    # a failing run names its log and writes no row
    with pytest.raises(SystemExit, match="exited with 3 after 0 evaluations"):
        cc.main(["--pfllib", str(checkout), "--algorithm", "FedAvg", "--scenario", "pat"])
    assert len(json.loads((tmp_path / "results" / "cc.json").read_text())) == 1


@pytest.mark.skipif(not FMNIST.exists(), reason="needs Debian's dataset-fashion-mnist")
def test_crosscheck_reads_a_legacy_log_with_its_round_offset(tmp_path, monkeypatch):
    """A checkout from before May 2023 prints "Accurancy" and evaluates after each round's
    training: --from-log --legacy reads its output, index i being round i + 1."""
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    import pfllib_crosscheck as cc

    monkeypatch.setattr(cc, "ROWS", tmp_path / "results" / "cc.json")
    monkeypatch.setattr(cc, "RESULTS", tmp_path / "results")
    monkeypatch.setattr(cc, "LOGS", tmp_path / "logs")
    accs = [0.5 + 0.02 * r for r in range(20)]
    accs[7] = 0.99  # the best, after round 8
    lines = []
    for r, acc in enumerate(accs):
        lines += [f"-------------Round number: {r}-------------", "Evaluate personalized model"]
        lines += [f"Average Test Accurancy: {acc:.4f}", f"{'-' * 25} time cost {'-' * 25} {r + 1}"]
    log = tmp_path / "pFedMe-dir.log"
    log.write_text("\n".join(lines) + "\n")
    args = ["--algorithm", "pFedMe", "--scenario", "dir", "--rounds", "20", "--legacy"]
    cc.main([*args, "--from-log", str(log), "--revision", "abc1234", "--flags=-bt 1"])
    (row,) = json.loads((tmp_path / "results" / "cc.json").read_text())
    assert row["test_acc"] == [round(a, 4) for a in accs] and row["first_round"] == 1
    assert row["legacy"] and row["seconds_per_round"] == pytest.approx(10.5)
    table = (tmp_path / "results" / "cc.md").read_text()
    assert "| pFedMe @ abc1234 | dir | `-bt 1` | 20 | 99.00 (8) | 88.00 | (protocol) |" in table
    # too few evaluations for the rounds asked: an error, no row
    with pytest.raises(SystemExit, match="fewer than the rounds"):
        cc.main([*args, "--from-log", str(log), "--rounds", "30"])

    # run against a legacy checkout: its flags, and -gr one less (it evaluates after training)
    checkout = tmp_path / "PFLlib-2023"
    (checkout / "system").mkdir(parents=True)
    (checkout / "system" / "main.py").write_text(LEGACY_MAIN)
    for rel, text in STUBS.items():
        (checkout / "system" / rel).parent.mkdir(parents=True, exist_ok=True)
        (checkout / "system" / rel).write_text(text)
    cc.main([*args, "--pfllib", str(checkout), "--rounds", "5", "--revision", "old"])
    row = json.loads((tmp_path / "results" / "cc.json").read_text())[-1]
    assert row["test_acc"] == [0.1, 0.2, 0.3, 0.4, 0.5] and row["first_round"] == 1
    assert row["after_training"] == []  # -gr 4: five rounds, not six
    assert (
        "| pFedMe @ old | dir | `(defaults)` | 5 | 50.00 (5) | 50.00 |"
        in (tmp_path / "results" / "cc.md").read_text()
    )


# a checkout from before May 2023: "-nb" for the class count, model "cnn", "mnist" looked up
# in the dataset name, and pFedMe's evaluations after each of its -gr + 1 rounds
LEGACY_MAIN = r"""
import sys
args = dict(zip(sys.argv[1::2], sys.argv[2::2]))
assert args["-nb"] == "10" and args["-m"] == "cnn" and "mnist" in args["-data"], args
assert "-ncl" not in args
for r in range(int(args["-gr"]) + 1):
    print(f"Average Test Accurancy: {(r + 1) / 10:.4f}", flush=True)
"""


CUT_OFF_CHILD = r"""
import json, sys
sys.path.insert(0, sys.argv[1])  # benchmarks/
sys.path.insert(0, sys.argv[2])  # tests/
from pathlib import Path
from helpers import tiny_config
from reproduce_htfl import run_or_cut_off, stop_on_sigterm
from fl_core.config import build_config
from fl_core.engine import run

out = Path(sys.argv[3])
raw = tiny_config("fedavg", rounds=10000)
stop_on_sigterm()
summary, cut = run_or_cut_off(lambda: run(build_config(raw), out_dir=out), out)
print(json.dumps({"summary": summary, "cut": cut}), flush=True)
"""


def test_a_budgeted_run_killed_by_sigterm_still_gives_the_row_of_its_finished_rounds(tmp_path):
    """The device scripts kill a run that overruns its budget (``timeout``, SIGTERM): the run
    ends cleanly with the summary of the rounds in its metrics, so its row is not lost."""
    import os
    import signal
    import subprocess
    import sys
    import time

    out = tmp_path / "run"
    child = subprocess.Popen(
        [sys.executable, "-c", CUT_OFF_CHILD, str(ROOT / "benchmarks"), str(ROOT / "tests"), out],
        stdout=subprocess.PIPE,
        text=True,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    metrics = out / "metrics.jsonl"
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline and child.poll() is None:
        if metrics.exists() and len(metrics.read_text().splitlines()) >= 4:
            break
        time.sleep(0.2)
    child.send_signal(signal.SIGTERM)
    stdout, _ = child.communicate(timeout=120)
    assert child.returncode == 0, stdout
    result = json.loads(stdout.strip().splitlines()[-1])
    records = [json.loads(line) for line in metrics.read_text().splitlines()]
    summary = result["summary"]
    assert result["cut"] is True and summary["stop_requested"] is True
    assert summary["rounds"] == records[-1]["round"] >= 3
    assert summary["best_test_acc"] == max(r["test_acc"] for r in records)
    assert summary["bytes_up"] == records[-1]["bytes_up"] > 0


def test_summary_from_metrics_skips_a_line_cut_off_mid_write(tmp_path):
    import sys

    sys.path.insert(0, str(ROOT / "benchmarks"))
    from reproduce_htfl import summary_from_metrics

    lines = [
        {
            "round": r,
            "test_acc": acc,
            "bytes_up": 100 * r,
            "bytes_down": 200 * r,
            "seconds": 10.0 * r,
            "train_seconds": 8.0 * (r > 0),
            "aggregate_seconds": 0.5 * (r > 0),
            "eval_seconds": 1.0 + r,
        }
        for r, acc in [(0, None), (1, 0.5), (2, 0.7), (3, 0.6)]
    ]  # round 0's accuracy is written as null, as NaN is
    text = "\n".join(json.dumps(x) for x in lines) + '\n{"round": 4, "test_a'
    (tmp_path / "metrics.jsonl").write_text(text)
    s = summary_from_metrics(tmp_path)
    assert (s["rounds"], s["best_test_acc"], s["best_round"], s["final_test_acc"]) == (
        3,
        0.7,
        2,
        0.6,
    )
    # seconds per round: training + aggregation + evaluation of rounds 1-3, not round 0's eval
    assert (s["bytes_up"], s["bytes_down"], s["seconds_per_round"]) == (300, 600, 11.5)
    assert (s["median_train_seconds"], s["median_eval_seconds"]) == (8.0, 3.0)


def test_summary_from_metrics_of_a_finished_run_is_the_runs_own_summary(tmp_path):
    """Rebuilt from ``metrics.jsonl`` alone, a run's summary has the figures the run returned
    (seconds aside: the run's own also count checkpoint writes)."""
    import sys

    sys.path.insert(0, str(ROOT / "benchmarks"))
    from helpers import tiny_config
    from reproduce_htfl import summary_from_metrics

    from fl_core.config import build_config
    from fl_core.engine import run

    raw = tiny_config("fedavg", rounds=3)
    own = run(build_config(raw), out_dir=tmp_path).summary()
    rebuilt = summary_from_metrics(tmp_path, own["algorithm"])
    for key in (
        "best_test_acc",
        "best_round",
        "final_test_acc",
        "rounds",
        "bytes_up",
        "bytes_down",
        "final_metrics",
        "median_train_seconds",
        "median_eval_seconds",
    ):
        assert rebuilt[key] == own[key], key
    assert rebuilt["stop_requested"] is True


def test_a_rows_server_share_is_measured_from_its_run_folder_once_and_then_kept(tmp_path):
    """FedKTL's goal (the server's step under 10% of a round) is read from the run's records;
    run folders stay on the machine that ran them, so the share is kept in the row."""
    import shutil
    import sys

    sys.path.insert(0, str(ROOT / "benchmarks"))
    import reproduce_htfl as htfl
    from reproduce_fedktl import record_server_shares

    store = htfl.Store(tmp_path / "rows.json", tmp_path / "runs")
    folder = htfl.run_folder(store, "fedktl", "HtFE-img-cpu-4", [])
    folder.mkdir(parents=True)
    # rounds take 10, 20 and 40 s, of which the server's aggregation 1, 1 and 1 s
    recs = [(0, 0.1, 5.0, 0.0), (1, 0.5, 15.0, 1.0), (2, 0.7, 35.0, 1.0), (3, 0.6, 75.0, 1.0)]
    (folder / "metrics.jsonl").write_text(
        "".join(
            json.dumps({"round": r, "test_acc": acc, "bytes_up": 0, "bytes_down": 0,
                        "seconds": t, "train_seconds": 0.0, "aggregate_seconds": agg,
                        "eval_seconds": 0.0}) + "\n"
            for r, acc, t, agg in recs
        )
    )  # fmt: skip
    row = {"algorithm": "fedktl", "group": "HtFE-img-cpu-4", "rounds": 3, "rounds_run": 3,
           "overrides": [], "best_test_acc": 0.7}  # fmt: skip
    other = {**row, "algorithm": "local", "best_test_acc": 0.9}  # no run folder here
    store.save([row, other])
    rows = record_server_shares(store)
    assert rows[0]["server_share"] == 1 / 20  # median of 1/10, 1/20, 1/40
    assert "server_share" not in rows[1]
    metrics = (folder / "metrics.jsonl").read_text()
    shutil.rmtree(folder)  # the rows travel, the folder does not
    assert record_server_shares(store)[0]["server_share"] == 1 / 20
    # a folder holding another run (its best differs from the row's) is not read
    folder.mkdir()
    (folder / "metrics.jsonl").write_text(metrics)
    store.save([{**row, "best_test_acc": 0.99}])
    assert "server_share" not in record_server_shares(store)[0]


@pytest.mark.skipif(not FMNIST.exists(), reason="needs Debian's dataset-fashion-mnist")
def test_device_script_gives_each_job_its_overrides_and_continues_checkpointed_rows(tmp_path):
    """``device_pfllib.sh``: an item ``algorithm/scenario:key=value`` runs with its own override
    (part of its row), and with CHECKPOINT_EVERY a second call on the same WORK continues each
    row from its checkpoint instead of starting it again."""
    import os
    import subprocess

    work, out = tmp_path / "work", tmp_path / "out"
    env = {
        **os.environ,
        "KTL_DATA_ROOT": str(FMNIST.parent),
        "OUT": str(out),
        "WORK": str(work),
        "DEVICE": "cpu",
        "PARALLEL": "2",
        "BUDGET": "600",
        "MIN_START": "10",
        "CHECKPOINT_EVERY": "1",
        "EXTRA": "data.max_samples=600",
        "JOBS": "fedavg/pat fedavg/pat:algorithm.name=fedprox,algorithm.mu=0.01",
    }

    def call(rounds: int) -> list[dict]:
        done = subprocess.run(
            ["bash", "benchmarks/device_pfllib.sh"],
            cwd=ROOT,
            env={**env, "ROUNDS": str(rounds)},
            capture_output=True,
            text=True,
            timeout=600,
        )
        assert done.returncode == 0, done.stdout + done.stderr
        return json.loads((out / "rows.json").read_text())

    first = call(1)
    assert sorted(tuple(r["overrides"]) for r in first) == [
        ("data.max_samples=600",),
        ("data.max_samples=600", "algorithm.name=fedprox", "algorithm.mu=0.01"),
    ]
    rows = {tuple(r["overrides"]): r for r in call(2) if r["rounds"] == 2}
    assert len(rows) == 2 and all(r["resumed"] for r in rows.values())
    # the override reached the run it belongs to, and only that one
    import yaml

    configs = {
        d.name: yaml.safe_load((d / "config.yaml").read_text())["algorithm"]
        for d in (work / "runs").iterdir()
    }
    assert sorted(c["name"] for c in configs.values()) == ["fedavg", "fedprox"]
    assert [c["mu"] for c in configs.values() if c["name"] == "fedprox"] == [0.01]
