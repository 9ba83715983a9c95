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
# "Averaged Test Accuracy" line per evaluation (before each round and after the last): the
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
for _ in range(int(args["-gr"]) + 1):
    print(f"Averaged Test Accuracy: {correct / total:.4f}", flush=True)
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
