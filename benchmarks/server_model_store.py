"""Server peak memory of the algorithms that keep every client's model on the server.

FedFomo, FedAMP and APPLE keep each client's latest model in a `ModelStore` (memory up to
``federation.state_memory_mb``, then safetensors on disk) instead of one live module per client.
This runs each of them, and FedAvg as the baseline, on 100 clients (synthetic 28×28 images,
cnn4 with 512 features, about 2.2 MB of float32 per model). In round 1 every client trains, so
from then on the server holds all 100 models; rounds 2 to ``--rounds`` are the steady state,
``--join-ratio`` of the clients per round (default 10%). The peak RSS of round 1 and that of the
steady state are reported separately (the high-water mark is reset through
/proc/self/clear_refs after round 1, and big tensors are allocated with mmap so that freed
memory leaves the RSS). Each algorithm runs once with the default budget
(2048 MB: every model stays in memory) and once with a small one (models beyond it go to disk);
``state_memory_mb`` bounds the engine's client state store as well.

Clients run one at a time in the same process (the sequential executor), so a peak is the
server's state and messages plus the engine, the dataset and one client's work; FedAvg's row
is that baseline. Each configuration runs in its own process, so each peak is its own. Training
only; no evaluation.

    python benchmarks/server_model_store.py               # 100 clients, 4 rounds (a few minutes)
    python benchmarks/server_model_store.py --clients 20  # a quicker look

Writes benchmarks/results/server_model_store.md.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"
ALGORITHMS = ["fedavg", "fedfomo", "fedamp", "apple"]


def peak_rss_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def reset_peak_rss() -> bool:
    """Give freed heap back to the OS (glibc), then restart the high-water mark from now."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:
        pass
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def config(algorithm: str, clients: int, rounds: int, budget_mb: float, join: float) -> dict:
    return {
        "seed": 0,
        "data": {
            "dataset": "synthetic",
            "partition": "dir",
            "alpha": 0.5,
            "num_clients": clients,
            "source_options": {"num_samples": 40 * clients, "num_classes": 10, "image_size": 28},
        },
        "model": {"name": "cnn4", "feature_dim": 512},
        "algorithm": {"name": algorithm},
        "federation": {
            "rounds": rounds,
            "join_ratio": join,
            "local_epochs": 1,
            "batch_size": 10,
            "lr": 0.005,
            "executor": "sequential",
            "state_memory_mb": budget_mb,
            "checkpoint_every": None,
        },
    }


def run_one(algorithm: str, clients: int, rounds: int, budget_mb: float, join: float) -> dict:
    """Child process: one federation; its peaks and the server store's numbers."""
    import torch

    from fl_core.config import build_config
    from fl_core.engine import Federation

    torch.set_num_threads(1)
    start_rss = peak_rss_mb()
    fed = Federation(build_config(config(algorithm, clients, rounds, budget_mb, join)))
    sampled = fed.select
    fed.select = lambda rnd: list(range(fed.num_clients)) if rnd == 1 else sampled(rnd)
    t0 = time.perf_counter()
    try:
        fed.train_round(1)
        fed.aggregate(1)
        first_peak = peak_rss_mb()
        t1 = time.perf_counter()
        reset = reset_peak_rss()
        for rnd in range(2, rounds + 1):
            fed.train_round(rnd)
            fed.aggregate(rnd)
        steady_peak = peak_rss_mb() if reset else float("nan")
    finally:
        fed.close()
    store = getattr(fed.server, "store", None)
    model = sum(v.numel() * v.element_size() for v in fed.runtime.initial_state("cnn4").values())
    return {
        "algorithm": algorithm,
        "budget_mb": budget_mb,
        "round1_peak_mb": first_peak,
        "steady_peak_mb": steady_peak,
        "rss_after_import_mb": start_rss,
        "round1_seconds": t1 - t0,
        "steady_seconds_per_round": (time.perf_counter() - t1) / max(rounds - 1, 1),
        "model_mb": model / 2**20,
        "stored_models": len(store) if store is not None else 0,
        "store_memory_mb": store.memory_bytes / 2**20 if store is not None else 0.0,
        "spills": store.spills if store is not None else 0,
    }


def table(rows: list[dict], clients: int, rounds: int, join: float) -> str:
    model_mb = rows[0]["model_mb"]
    base = next((r for r in rows if r["algorithm"] == "fedavg"), None)
    lines = [
        "# Server memory of FedFomo, FedAMP and APPLE (every client's model on the server)",
        "",
        f"{clients} clients; round 1 trains all of them, rounds 2-{rounds} {join:.0%} per round. "
        f"cnn4 on synthetic 28×28 images, {model_mb:.2f} MB per model, so {clients} live "
        f"models would take {clients * model_mb:.0f} MB. Sequential executor, so a peak is the "
        "server plus the engine, the dataset and one client's work (FedAvg's row). Machine: "
        f"{platform.machine()}, Python {platform.python_version()}; written by "
        "`benchmarks/server_model_store.py`.",
        "",
        "| algorithm | state_memory_mb | steady peak RSS (MB) | over FedAvg | round-1 peak RSS "
        "(MB) | over FedAvg | models stored | in memory (MB) | spilled writes | s/round |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        over_s = "" if base is None else f"{r['steady_peak_mb'] - base['steady_peak_mb']:+.0f}"
        over_1 = "" if base is None else f"{r['round1_peak_mb'] - base['round1_peak_mb']:+.0f}"
        lines.append(
            f"| {r['algorithm']} | {r['budget_mb']:g} | {r['steady_peak_mb']:.0f} | {over_s} | "
            f"{r['round1_peak_mb']:.0f} | {over_1} | {r['stored_models']} | "
            f"{r['store_memory_mb']:.1f} | {r['spills']} | {r['steady_seconds_per_round']:.1f} |"
        )
    lines += [
        "",
        "The steady state is what the store is for: with the small budget the server keeps a "
        "few models in memory and reads the others from disk when it needs them. The rows over "
        "FedAvg also count the engine's client state store (each FedFomo and FedAMP client "
        "keeps its model, each APPLE client its personalized model), which the same budget "
        "bounds. The engine builds a round's tasks as workers free (a client's stored state "
        "and message are loaded when its task starts, at most two per worker in flight), and "
        "FedAMP computes its cloud models (the messages) one budget-sized block at a time as "
        "the tasks are built. What the budget cannot bound: the round's replies, which the "
        "server aggregates together (one uploaded model per selected client, FedAvg's round-1 "
        "peak over its steady state); FedFomo's distinct models sent in a round (up to M = 5 "
        "per selected client); APPLE's broadcast, every client's core model (the paper's full "
        "download), which its server materialises once per round whatever the budget. "
        "FedAMP's server computes its distances and mixes by matrix products over groups of "
        "stored models sized by the budget: at 2048 MB all of them form one float32 matrix "
        "beside the store (its steady peak at that budget), at 16 MB groups of seven.",
        "",
    ]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=100)
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--join-ratio", type=float, default=0.1)
    parser.add_argument("--small-budget-mb", type=float, default=16.0)
    parser.add_argument("--child", nargs=2, metavar=("ALGORITHM", "BUDGET_MB"))
    args = parser.parse_args()
    if args.child:
        algorithm, budget = args.child[0], float(args.child[1])
        row = run_one(algorithm, args.clients, args.rounds, budget, args.join_ratio)
        print(json.dumps(row))
        return
    rows = []
    for algorithm in ALGORITHMS:
        budgets = [2048.0] if algorithm == "fedavg" else [2048.0, args.small_budget_mb]
        for budget in budgets:
            cmd = [sys.executable, __file__, "--clients", str(args.clients)]
            cmd += ["--rounds", str(args.rounds), "--join-ratio", str(args.join_ratio)]
            cmd += ["--child", algorithm, str(budget)]
            # big tensors always mmapped, so freeing one lowers the RSS (glibc otherwise
            # raises its mmap threshold and keeps freed tensors in the heap)
            env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "131072"}
            proc = subprocess.run(cmd, check=True, capture_output=True, text=True, env=env)
            out = proc.stdout
            rows.append(json.loads(out.strip().splitlines()[-1]))
            print(json.dumps(rows[-1]), flush=True)
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "server_model_store.md").write_text(
        table(rows, args.clients, args.rounds, args.join_ratio)
    )
    print(f"wrote {RESULTS / 'server_model_store.md'}")


if __name__ == "__main__":
    main()
