"""Server-step and training seconds of one FedKTL round, by CPU thread setting, idle and crowded.

torch's CPU thread pool is an OpenMP team. By default its threads spin for a while at the end of
each parallel region before they sleep. When other processes share the cores, a region then waits
for whichever member the scheduler has put aside, and the spinning members take the time that
member needs: many small regions (FedKTL's server step: sampling the generator and training the
feature transformer on a few hundred points) slow down by an order of magnitude. With
``OMP_WAIT_POLICY=PASSIVE`` members sleep at once: far better on a crowded machine, about half as
fast on an idle one, so ``ktl`` leaves the choice to the user (README).

For each condition (``idle``; ``crowded``: as many busy-looping processes as there are cores run
beside) and each setting (``spin``: OpenMP's default wait; ``spin 10k``: GNU OpenMP's spin cut
to 10,000 iterations; ``passive``; ``1 thread``: one torch thread, default wait) this runs ``configs/fedktl_fmnist.yaml`` for one round on a subset of the
data in a fresh process, in the main process (sequential executor, so the server's threads are
the run's only torch threads), and prints the round's seconds (table also written to ``--out``).
The wait policy changes no number (the script checks that settings of one thread count agree on
the accuracy); one thread sums in another order than two.

    python benchmarks/omp_wait_policy.py --samples 3000 --repeats 2
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

ONE_RUN = """
import json, sys
from fl_core.config import load_config
from fl_core.engine import run
cfg = load_config(sys.argv[1], sys.argv[3:])
rec = run(cfg, out_dir=sys.argv[2]).history[-1]
print(json.dumps({"acc": rec.metrics["test_acc"], "server": rec.aggregate_seconds,
                  "train": rec.train_seconds}))
"""

SETTINGS = {  # name -> (OpenMP environment, torch threads or None for all cores)
    "spin (OpenMP default)": ({}, None),
    "spin 10k": ({"GOMP_SPINCOUNT": "10000"}, None),
    "passive": ({"OMP_WAIT_POLICY": "PASSIVE"}, None),
    "1 thread": ({}, 1),
}


def burn() -> None:  # a busy loop standing for another job on the machine
    while True:
        pass


def one_round(omp: dict, threads: int | None, samples: int, work: Path) -> dict:
    drop = ("OMP_WAIT_POLICY", "OMP_NUM_THREADS", "GOMP_SPINCOUNT")
    env = {k: v for k, v in os.environ.items() if k not in drop}
    env.update(omp)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH", "")) if p)
    overrides = [
        "federation.rounds=1",
        f"data.max_samples={samples}",
        "federation.executor=sequential",
    ]
    if threads:
        overrides.append(f"threads={threads}")
    out = tempfile.mkdtemp(dir=work)
    cmd = [sys.executable, "-c", ONE_RUN, str(ROOT / "configs" / "fedktl_fmnist.yaml"), out]
    done = subprocess.run(cmd + overrides, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"run failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--samples", type=int, default=3000, help="data.max_samples of each run")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--burners", type=int, default=os.cpu_count() or 1, help="crowded: processes")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks/results/omp_wait_policy.md")
    args = ap.parse_args()
    rows, accs = [], set()
    with tempfile.TemporaryDirectory() as tmp:
        for condition in ("idle", "crowded"):
            burners = []
            if condition == "crowded":
                burners = [
                    multiprocessing.Process(target=burn, daemon=True) for _ in range(args.burners)
                ]
                for b in burners:
                    b.start()
                time.sleep(1)
            try:
                for name, (omp, threads) in SETTINGS.items():
                    runs = [
                        one_round(omp, threads, args.samples, Path(tmp))
                        for _ in range(args.repeats)
                    ]
                    accs.update((threads, round(r["acc"], 6)) for r in runs)
                    server = statistics.median(r["server"] for r in runs)
                    train = statistics.median(r["train"] for r in runs)
                    rows.append((condition, name, server, train))
                    print(
                        f"{condition:8s} {name:22s} server {server:7.2f} s  train {train:7.2f} s",
                        flush=True,
                    )
            finally:
                for b in burners:
                    b.terminate()
    # the wait policy changes no number; the thread count changes the order of float sums
    if len({t for t, _ in accs}) != len(accs):
        raise SystemExit(f"settings of one thread count disagree on the accuracy: {sorted(accs)}")
    base = {c: s for c, n, s, _ in rows if n.startswith("spin (")}
    lines = [
        "# FedKTL's round on the CPU by OpenMP wait policy and torch threads",
        "",
        f"`benchmarks/omp_wait_policy.py --samples {args.samples} --repeats {args.repeats}` on "
        f"{os.cpu_count()} cores ({time.strftime('%Y-%m-%d')}): one round of "
        "`configs/fedktl_fmnist.yaml`, sequential executor, median of the repeats; `crowded` = "
        f"{args.burners} busy-looping processes beside it. Settings of one thread count gave "
        "the same accuracy. Compare rows within one condition only.",
        "",
        "| condition | setting | server step s | x spin | local training s |",
        "|---|---|---|---|---|",
    ]
    for condition, name, server, train in rows:
        lines.append(
            f"| {condition} | {name} | {server:.2f} | {server / base[condition]:.2f} | {train:.2f} |"
        )
    tmp_out = args.out.with_suffix(".tmp")
    tmp_out.write_text("\n".join(lines) + "\n")
    tmp_out.replace(args.out)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
