"""In-process engine vs Flower's simulation runtime: seconds per round and peak memory.

One config for both: FedAvg, Fashion-MNIST (20,000 samples) Dir(0.5), the ``mlp`` model, batch
10, 1 local epoch, every client training and evaluated every round, 20 and 200 clients, two
workers (the in-process engine's process pool vs two Ray actors). Each run is its own process;
peak memory is the largest sum of RSS over that process and all its descendants (Ray's GCS,
raylet and actors included), sampled every 0.2 s.

    python benchmarks/flower.py                  # 20 and 200 clients, 3 rounds (about 10 min)
    python benchmarks/flower.py --clients 20 --rounds 2
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil

RESULTS = Path(__file__).resolve().parent / "results"
BASE = {
    "algorithm.name": "fedavg",
    "data.dataset": "fashion_mnist",
    "data.max_samples": 20000,
    "data.partition": "dir",
    "data.alpha": 0.5,
    "model.name": "mlp",
    "federation.batch_size": 10,
    "federation.local_epochs": 1,
    "federation.eval_every": 1,
    "federation.workers": 2,
    "federation.checkpoint_every": None,
}
OVERHEAD = """Where Flower's overhead comes from (by construction of the adapter and of Flower 1.42's
simulation runtime):

- **Start-up**: Ray starts its GCS and raylet, then one actor per worker, and each actor imports
  torch, flwr and ktl before the first message; the dataset is saved once to a temporary
  partition folder that the actors read (each client once per actor).
- **Per message**: the task is encoded into Flower records (every tensor through
  `numpy.save` into bytes), stored in the in-memory link state, picked up by a dispatcher thread
  that polls every node's queue every 0.1 s, sent to a Ray actor together with that node's
  `Context` (pickled both ways), decoded, run, and the reply travels back the same way. The
  in-process pool sends one pickled task per client and the round's broadcast once per worker;
  Flower has no broadcast, so the global model is serialised once per client.
- **Client state**: read from and written to one safetensors file per client each time it
  trains (the in-process engine keeps it in memory up to `federation.state_memory_mb`).
- **Memory** (RSS summed over processes, so pages a forked worker shares with its parent are
  counted twice: an upper bound for the in-process pool): Ray's own processes (GCS, raylet and their helpers) and the actors'
  separate copies of torch, on top of the driver; the in-process pool forks and shares pages
  with its parent."""
EXECUTORS = {"in-process (process pool)": "process", "Flower simulation (Ray)": "flower-sim"}


def child(clients: int, executor: str, rounds: int, out: str) -> None:
    """One run; prints its timings as JSON on the last line."""
    from fl_core.config import apply_overrides, build_config
    from fl_core.engine import run

    overrides = {**BASE, "data.num_clients": clients, "federation.rounds": rounds}
    overrides["federation.executor"] = executor
    raw = apply_overrides({}, [f"{k}={'null' if v is None else v}" for k, v in overrides.items()])
    config = build_config(raw)
    t0 = time.perf_counter()
    result = run(config, out_dir=out)
    total = time.perf_counter() - t0
    s = result.summary()
    print(
        json.dumps(
            {
                "total_s": total,
                "seconds_per_round": s["seconds_per_round"],
                "median_round_s": s["median_seconds_per_round"],
                "median_train_s": s["median_train_seconds"],
                "median_eval_s": s["median_eval_seconds"],
                "round0_eval_s": result.history[0].eval_seconds,
                "final_test_acc": s["final_test_acc"],
            }
        )
    )


def tree_rss(proc: psutil.Process) -> int:
    total = 0
    for p in [proc, *proc.children(recursive=True)]:
        try:
            total += p.memory_info().rss
        except psutil.NoSuchProcess:
            pass
    return total


def measure(clients: int, executor: str, rounds: int) -> dict:
    with tempfile.TemporaryDirectory(prefix="ktl-bench-flower-") as out:
        cmd = [sys.executable, __file__, "--child", str(clients), executor, str(rounds), out]
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True, start_new_session=True)
        ps = psutil.Process(proc.pid)
        peak = 0
        while proc.poll() is None:
            try:
                peak = max(peak, tree_rss(ps))
            except psutil.NoSuchProcess:
                break
            time.sleep(0.2)
        stdout = proc.stdout.read() if proc.stdout else ""
        if proc.returncode != 0:
            raise RuntimeError(f"{executor} with {clients} clients failed:\n{stdout[-3000:]}")
        row = json.loads(stdout.strip().splitlines()[-1])
        row["peak_rss_mb"] = peak / 2**20
        return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--clients", type=int, nargs="+", default=[20, 200])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--child", nargs=4, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        clients, executor, rounds, out = args.child
        child(int(clients), executor, int(rounds), out)
        return
    rows = []
    for clients in args.clients:
        for label, executor in EXECUTORS.items():
            r = measure(clients, executor, args.rounds)
            r.update(clients=clients, executor=label)
            rows.append(r)
            print(
                f"{clients:4d} clients  {label:28s} {r['median_round_s']:7.2f} s/round  "
                f"start+round0 {r['total_s'] - args.rounds * r['seconds_per_round']:6.1f} s  "
                f"peak RSS {r['peak_rss_mb']:7.0f} MB  acc {r['final_test_acc']:.4f}",
                flush=True,
            )
    import flwr
    import torch

    load = os.getloadavg()[0]
    lines = [
        "# Flower simulation vs the in-process engine",
        "",
        f"FedAvg, Fashion-MNIST (20,000 samples) Dir(0.5), `mlp`, batch 10, 1 local epoch, every "
        f"client trains and is evaluated every round, {args.rounds} rounds, 2 workers. "
        f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch "
        f"{torch.__version__}, flwr {flwr.__version__}; load average {load:.1f} at the end "
        "(the cores were shared).",
        "",
        "Seconds per round, training and evaluation are medians over the rounds; start-up is the "
        "run's wall time minus its rounds (Ray, workers, data, and the round-0 evaluation).",
        "",
        "| clients | executor | s/round | train s | eval s | start-up + round 0 s | peak RSS MB | final acc |",
        "|---:|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        startup = r["total_s"] - args.rounds * r["seconds_per_round"]
        lines.append(
            f"| {r['clients']} | {r['executor']} | {r['median_round_s']:.2f} | "
            f"{r['median_train_s']:.2f} | {r['median_eval_s']:.2f} | {startup:.1f} | "
            f"{r['peak_rss_mb']:.0f} | {r['final_test_acc']:.4f} |"
        )
    lines += [
        "",
        "Flower's extra cost per client message, from the table: (Flower s/round - in-process "
        "s/round) / (2 messages per client per round: train and evaluate):",
        "",
    ]
    for clients in args.clients:
        pair = {r["executor"]: r for r in rows if r["clients"] == clients}
        a, b = (pair[k]["median_round_s"] for k in EXECUTORS)
        if b > a:
            lines.append(
                f"- {clients} clients: {1000 * (b - a) / (2 * clients):.1f} ms per message"
            )
        else:
            lines.append(
                f"- {clients} clients: none measurable at this load (Flower's median round was "
                f"{a - b:.2f} s shorter; the machine's other work moves rounds by more than that)"
            )
    lines += ["", OVERHEAD, ""]
    RESULTS.mkdir(exist_ok=True)
    tmp_json = RESULTS / "flower.json.tmp"
    tmp_json.write_text(json.dumps(rows, indent=1))
    os.replace(tmp_json, RESULTS / "flower.json")
    tmp = RESULTS / "flower.md.tmp"
    tmp.write_text("\n".join(lines))
    os.replace(tmp, RESULTS / "flower.md")
    print(f"wrote {RESULTS / 'flower.md'}")


if __name__ == "__main__":
    main()
