"""Run PFLlib's own code on exactly our partition, to tell an algorithm's behaviour from a bug of ours.

Where a row of ``benchmarks/reproduce_pfllib.py`` is far from PFLlib's published figure, the
question is whether PFLlib's implementation, on the same clients and the same rounds, does any
better. This script answers it with PFLlib's code, unchanged, from a checkout you name:

1. it builds the protocol's partition exactly as ``reproduce_pfllib.py`` does (same config, same
   seed) and writes it in PFLlib's layout (``dataset/<name>/{train,test}/<client>.npz`` holding
   ``{"x": float32 images, "y": int64 labels}``; the images already normalised as ours are);
2. it copies the checkout's ``system/`` folder beside that dataset (the checkout is not touched)
   and runs its ``main.py`` in a subprocess with the protocol's flags (``-m CNN -nc 20 -jr 1
   -lbs 10 -ls 1 -lr 0.005 -eg 1 -dev cpu``) plus any you add;
3. it reads the per-round "Averaged Test Accuracy" lines (PFLlib evaluates before each round's
   training; the first is the initial model) and writes a row to
   ``benchmarks/results/pfllib_crosscheck.json`` and the table beside it, next to our row of the
   same algorithm, scenario and rounds where ``pfllib_fmnist.json`` has one.

Three things are changed around PFLlib's code, none of which changes what it computes:

- ``h5py``, ``cvxpy`` and ``calmsize`` are replaced by empty stand-ins when they are not
  installed (``main.py`` imports every algorithm's server; they serve the results file, FedPAC
  and the memory report), and the results file, the summary PFLlib computes from it and the
  memory report are skipped: the accuracies are read from the output instead;
- a client's *test* loader uses batches of 1,000 instead of the training batch size. Evaluation
  is under ``torch.no_grad`` in eval mode, so the accuracy does not depend on the batch size; it
  only makes evaluation about 7x faster on a CPU.

PFLlib seeds torch once (``torch.manual_seed(0)``) and each client again; its data order then
comes from torch's global generator, so two runs with the same flags give the same numbers on
one machine. There is no checkpoint: an interrupted run starts over (finished rows are kept).

Where PFLlib's defaults differ from our paper defaults, ``--ours-set KEY=VALUE`` names our row
with PFLlib's settings to compare with. ``--legacy`` runs a checkout from before May 2023 (its
class-count flag and model name differ; its pFedMe evaluated after each round's training), and
``--from-log`` reads a run's printed output instead of running it again.

    python benchmarks/pfllib_crosscheck.py --pfllib ~/src/PFLlib --algorithm GPFL \\
        --scenario pat --rounds 20 --flags="-lam 0.01 -mu 0.1"
    python benchmarks/pfllib_crosscheck.py --table
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
ROWS = RESULTS / "pfllib_crosscheck.json"
OURS = RESULTS / "pfllib_fmnist.json"
LOGS = ROOT / "runs" / "pfllib_crosscheck"  # PFLlib's output while it runs (kept if it fails)

# the protocol of reproduce_pfllib.py in PFLlib's flags
PROTOCOL_FLAGS = [
    "-m", "CNN", "-ncl", "10", "-nc", "20", "-jr", "1", "-lbs", "10", "-ls", "1",
    "-lr", "0.005", "-eg", "1", "-t", "1",
]  # fmt: skip
# most servers print "Averaged …"; pFedMe's evaluation of personal models prints "Average …";
# checkouts before mid-2023 spell it "Accurancy"
ACCURACY = re.compile(r"Averaged? (?:Personalized )?Test Accur(?:an|a)cy: ([0-9.]+)")
ROUND_TIME = re.compile(r"-+ time cost -+ ([0-9.]+)")  # printed after each round's training

# run inside the copied system/ folder, before PFLlib's main.py
BOOTSTRAP = r"""
import importlib.util, runpy, sys, types
import torch
torch.set_num_threads(int(sys.argv[1]))
class NoFile:  # h5py.File for servers that write their own results (pFedMe)
    def __init__(self, *args, **kwargs): pass
    def __enter__(self): return self
    def __exit__(self, *exc): return False
    def create_dataset(self, *args, **kwargs): pass
for name in ("h5py", "cvxpy", "calmsize"):
    if importlib.util.find_spec(name) is None:
        stand_in = sys.modules[name] = types.ModuleType(name)
        stand_in.size = str
        stand_in.File = NoFile
import utils.result_utils, utils.mem_utils
from flcore.servers.serverbase import Server
from flcore.clients.clientbase import Client
utils.result_utils.average_data = lambda **kwargs: None
utils.mem_utils.MemReporter.report = lambda self, *args, **kwargs: None
Server.save_results = lambda self: None
_test_loader = Client.load_test_data
Client.load_test_data = lambda self, batch_size=None: _test_loader(self, 1000)
sys.argv = ["main.py", *sys.argv[2:]]
runpy.run_path("main.py", run_name="__main__")
"""


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--pfllib", type=Path, help="a PFLlib checkout (holds system/main.py)")
    p.add_argument("--algorithm", help="PFLlib's name of the algorithm (-algo), e.g. GPFL")
    p.add_argument("--ours", help="our algorithm's name (default: the lower-cased PFLlib name)")
    p.add_argument(
        "--ours-set", action="append", default=[], metavar="KEY=VALUE",
        help="compare with our row run with this override (repeatable; in the order of that "
        "row's overrides), e.g. PFLlib's settings where they differ from the paper's",
    )  # fmt: skip
    p.add_argument("--scenario", choices=["pat", "dir"], default="pat")
    p.add_argument("--rounds", type=int, default=20)
    p.add_argument("--flags", default="", help='extra PFLlib flags, e.g. "-lam 0.01 -mu 0.1"')
    p.add_argument(
        "--legacy", action="store_true",
        help="a checkout from before May 2023: class count as -nb, model 'cnn', and pFedMe's "
        "server evaluating after each round's training (index i = after round i+1)",
    )  # fmt: skip
    p.add_argument(
        "--from-log", type=Path,
        help="read the accuracies from the output of a run already made with these arguments "
        "(a log a failed or interrupted run left in runs/pfllib_crosscheck/) instead of running; "
        "the row records this machine and today's date",
    )  # fmt: skip
    p.add_argument("--revision", default="", help="the checkout's PFLlib commit, for the table")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu", help="PFLlib's -dev")
    p.add_argument("--table", action="store_true", help="only rewrite the markdown table")
    return p.parse_args(argv)


def load_rows(path: Path | None = None) -> list[dict]:
    path = ROWS if path is None else path
    return json.loads(path.read_text()) if path.exists() else []


def export_partition(scenario: str, dataset_dir: Path) -> dict:
    """Our protocol partition of ``scenario`` in PFLlib's layout under ``dataset_dir``."""
    from reproduce_pfllib import SCENARIOS

    from fl_core.config import load_config
    from fl_core.data.federated import build_federated_dataset

    overrides = [f"{k}={v}" for k, v in SCENARIOS[scenario].items()]
    cfg = load_config(ROOT / "configs" / "default.yaml", overrides)
    fds = build_federated_dataset(cfg.data, seed=cfg.seed, batch_size=cfg.federation.batch_size)
    for split in ("train", "test"):
        (dataset_dir / split).mkdir(parents=True, exist_ok=True)
    for i in range(fds.num_clients):
        c = fds.client(i)
        for split, x, y in (("train", c.train_x, c.train_y), ("test", c.test_x, c.test_y)):
            with open(dataset_dir / split / f"{i}.npz", "wb") as f:
                np.savez_compressed(f, data={"x": x.numpy(), "y": y.numpy()})
    return {"clients": fds.num_clients, "train": fds.total_train, "test": fds.total_test}


def first_round(args: argparse.Namespace) -> int:
    """The round after which PFLlib's first evaluation comes: 0 (the initial model) or, for a
    ``--legacy`` checkout that evaluates after each round's training, 1."""
    return int(args.legacy)


def evaluations(args: argparse.Namespace) -> int:
    """How many evaluations ``--rounds`` rounds print (more: FedBABU's after training)."""
    return args.rounds + 1 - first_round(args)


def run_pfllib(args: argparse.Namespace, log: Path) -> tuple[list[float], dict]:
    main = args.pfllib / "system" / "main.py"
    if not main.is_file():
        raise SystemExit(f"--pfllib {args.pfllib}: no system/main.py there (a PFLlib checkout)")
    with tempfile.TemporaryDirectory(prefix="pfllib-crosscheck-") as tmp:
        work = Path(tmp)
        # "MNIST" in the name makes PFLlib's CNN take 1x28x28 inputs (dim 1024); older
        # checkouts look for "mnist"
        name = f"ktlFMNIST_mnist_{args.scenario}" if args.legacy else f"ktlFMNIST_{args.scenario}"
        flags = list(PROTOCOL_FLAGS)
        if args.legacy:
            flags[flags.index("-ncl")] = "-nb"
            flags[flags.index("CNN")] = "cnn"
        # a server runs -gr + 1 rounds; a legacy one evaluates after each one's training
        rounds = args.rounds - first_round(args)
        sizes = export_partition(args.scenario, work / "dataset" / name)
        shutil.copytree(args.pfllib / "system", work / "system")
        cmd = [
            sys.executable, "-W", "ignore", "-c", BOOTSTRAP, str(args.threads),
            "-data", name, "-algo", args.algorithm, "-gr", str(rounds),
            *flags, "-dev", args.device, *args.flags.split(),
        ]  # fmt: skip
        accs: list[float] = []
        with open(log, "w") as out:
            # unbuffered: each evaluation shows (and reaches the log) as it happens, so an
            # interrupted run's rounds can still be read
            env = {**os.environ, "PYTHONUNBUFFERED": "1"}
            proc = subprocess.Popen(
                cmd, cwd=work / "system", stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                text=True, env=env,
            )  # fmt: skip
            assert proc.stdout is not None
            for line in proc.stdout:
                out.write(line)
                out.flush()
                m = ACCURACY.search(line)
                if m:
                    accs.append(float(m.group(1)))
                    after = len(accs) - 1 + first_round(args)
                    print(f"  PFLlib {args.algorithm}/{args.scenario} round {after}: "
                          f"{accs[-1]:.4f}", flush=True)  # fmt: skip
            rc = proc.wait()
        if rc != 0 or len(accs) < evaluations(args):
            raise SystemExit(
                f"PFLlib's main.py exited with {rc} after {len(accs)} evaluations; see {log}"
            )
        return accs, sizes


def read_log(args: argparse.Namespace, log: Path) -> tuple[list[float], dict, float | None]:
    """The evaluations and mean seconds per round that PFLlib printed into ``log``."""
    text = log.read_text()
    accs = [float(m.group(1)) for m in ACCURACY.finditer(text)]
    times = [float(m.group(1)) for m in ROUND_TIME.finditer(text)]
    if len(accs) < evaluations(args):
        raise SystemExit(f"--from-log {log}: {len(accs)} evaluations, fewer than the rounds asked")
    with tempfile.TemporaryDirectory(prefix="pfllib-crosscheck-") as tmp:
        sizes = export_partition(args.scenario, Path(tmp))
    return accs, sizes, (sum(times) / len(times) if times else None)


def gpu_name() -> str:
    import torch

    return (
        torch.cuda.get_device_name(0).removeprefix("NVIDIA ")
        if torch.cuda.is_available()
        else "GPU"
    )


def our_row(algorithm: str, scenario: str, rounds: int, overrides=()) -> dict | None:
    """Our row of this algorithm, scenario, rounds and overrides (none: the protocol's)."""
    for r in load_rows(OURS):
        if (r["algorithm"], r["scenario"], r["rounds"], r["overrides"]) == (
            algorithm, scenario, rounds, list(overrides),
        ):  # fmt: skip
            return r
    return None


def write_table(rows: list[dict]) -> None:
    lines = [
        "# PFLlib's own code on our partition",
        "",
        "Written by `benchmarks/pfllib_crosscheck.py`: PFLlib's `main.py`, unchanged, run on "
        "exactly the partition of `benchmarks/reproduce_pfllib.py` (Fashion-MNIST, 20 clients, "
        "the protocol's flags) for the same rounds, beside our row. Accuracy in %; best = best "
        "mean test accuracy over the evaluated rounds (round in brackets), as in "
        "`pfllib_fmnist.md`.",
        "",
        "| PFLlib algorithm | scenario | flags | rounds | PFLlib's code: best (round) | final "
        "| ours: overrides | best (round) | final | s/round | on |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in sorted(rows, key=lambda r: (r["algorithm"], r["scenario"], r["flags"])):
        accs = r["test_acc"]
        best = max(range(len(accs)), key=lambda i: accs[i])
        ours = our_row(r["ours"], r["scenario"], r["rounds"], r.get("ours_overrides", []))
        mine = (
            f"{100 * ours['best_test_acc']:.2f} ({ours['best_round']}) | "
            f"{100 * ours['final_test_acc']:.2f}"
            if ours
            else "not measured | "
        )
        lines.append(
            f"| {r['algorithm']}{' @ ' + r['revision'] if r.get('revision') else ''} | "
            f"{r['scenario']} | `{r['flags'] or '(defaults)'}` | "
            f"{r['rounds']} | {100 * accs[best]:.2f} ({best + r.get('first_round', 0)}) | "
            f"{100 * accs[-1]:.2f} | {' '.join(r.get('ours_overrides', [])) or '(protocol)'} | "
            f"{mine} | "
            f"{r['seconds_per_round'] or float('nan'):.1f} | {r['machine']} {r['date']} |"
        )
    lines += ["", "Per-round accuracies of PFLlib's runs are in `pfllib_crosscheck.json`."]
    md = ROWS.with_suffix(".md")
    tmp = md.with_suffix(".md.tmp")
    tmp.write_text("\n".join(lines) + "\n")
    os.replace(tmp, md)


def main(argv=None) -> None:
    args = parse_args(argv)
    rows = load_rows()
    if args.table:
        write_table(rows)
        return
    if args.algorithm is None or (args.pfllib is None and args.from_log is None):
        raise SystemExit("--algorithm and --pfllib (or --from-log) are needed, or --table")
    key = (args.algorithm, args.scenario, args.rounds, args.flags, args.legacy, args.revision)
    if any(
        (r["algorithm"], r["scenario"], r["rounds"], r["flags"], r.get("legacy", False))
        + (r.get("revision", ""),)
        == key
        for r in rows
    ):
        print(f"kept {key}")
        write_table(rows)
        return
    RESULTS.mkdir(parents=True, exist_ok=True)
    LOGS.mkdir(parents=True, exist_ok=True)
    log = LOGS / f"{args.algorithm}-{args.scenario}.log"
    t0 = time.perf_counter()
    if args.from_log is not None:
        found, sizes, per_round = read_log(args, args.from_log)
    else:
        found, sizes = run_pfllib(args, log)
        per_round = (time.perf_counter() - t0) / evaluations(args)
    # test_acc[i] is after round i + first_round (0: the initial model)
    accs, after_training = found[: evaluations(args)], found[evaluations(args) :]
    import torch

    row = {
        "algorithm": args.algorithm,
        "ours": args.ours or args.algorithm.lower(),
        "scenario": args.scenario,
        "rounds": args.rounds,
        "flags": args.flags,
        "ours_overrides": args.ours_set,
        "legacy": args.legacy,
        "revision": args.revision,
        "first_round": first_round(args),
        "test_acc": accs,
        # evaluations after the last round (FedBABU's of its fine-tuned models)
        "after_training": after_training,
        "seconds_per_round": per_round,
        "partition": sizes,
        "threads": args.threads,
        "machine": gpu_name() if args.device == "cuda" else f"CPU ({os.cpu_count()} cores)",
        "torch": torch.__version__,
        "date": time.strftime("%Y-%m-%d"),
    }
    rows = [*load_rows(), row]  # merge with rows another process wrote meanwhile
    tmp = ROWS.with_suffix(f".json.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(rows, indent=2) + "\n")
    os.replace(tmp, ROWS)
    log.unlink(missing_ok=True)
    write_table(rows)
    best = max(accs)
    print(f"PFLlib {args.algorithm}/{args.scenario}: best {best:.4f}, final {accs[-1]:.4f}")


if __name__ == "__main__":
    main()
