"""PFLlib's benchmark protocol on Fashion-MNIST, our algorithms beside PFLlib's published figures.

Protocol: 20 clients, join ratio 1, 75/25 split, batch 10, 1 local epoch, lr 0.005, cnn4, every
client evaluated every round; the pathological (2 classes per client, ``pat``) and practical
(Dirichlet 0.1, ``dir``) scenarios. The figure is the best mean test accuracy over the
evaluated rounds (PFLlib reports the best over 2,000 rounds; we state the rounds we ran).

Resumable: finished rows are kept in ``benchmarks/results/pfllib_fmnist.json`` and skipped; an
interrupted run continues from its checkpoint, and asking for more rounds continues a finished
one (runs live in ``runs/pfllib_fmnist/``).

    python benchmarks/reproduce_pfllib.py --algorithms ditto fedproto --scenarios dir --rounds 20
    python benchmarks/reproduce_pfllib.py --table      # rewrite the markdown from the JSON
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
ROWS = RESULTS / "pfllib_fmnist.json"
TABLE = RESULTS / "pfllib_fmnist.md"
RUNS = ROOT / "runs" / "pfllib_fmnist"

# PFLlib's published FMNIST figures (docs/benchmark.html): pathological / practical, in %
PUBLISHED: dict[str, tuple[float, float]] = {
    "fedavg": (80.41, 85.85),
    "fedper": (99.47, 97.44),
    "fedrep": (99.56, 97.56),
    "fedbabu": (99.41, 97.46),
    "fedrod": (99.52, 97.52),
    "fedcp": (99.66, 97.89),
    "gpfl": (99.85, 97.81),
    "feddbe": (99.74, 97.69),
    "ditto": (99.44, 97.47),
    "fedproto": (99.49, 97.40),
    "perfedavg": (99.18, 95.10),
    "pfedme": (99.35, 97.25),
    "apfl": (99.41, 97.25),
    "fedfomo": (99.46, 97.21),
    "fedamp": (99.42, 97.20),
    "apple": (99.30, 97.06),
    "fedala": (99.57, 97.66),
}
SCENARIOS = {
    "pat": {"data.partition": "pat", "data.classes_per_client": 2},
    "dir": {"data.partition": "dir", "data.alpha": 0.1},
}


def load_rows() -> list[dict]:
    return json.loads(ROWS.read_text()) if ROWS.exists() else []


def save_rows(rows: list[dict]) -> None:
    RESULTS.mkdir(parents=True, exist_ok=True)
    tmp = ROWS.with_suffix(".tmp")
    tmp.write_text(json.dumps(rows, indent=2))
    os.replace(tmp, ROWS)


def run_row(algorithm: str, scenario: str, rounds: int, extra: list[str]) -> dict:
    from fl_core.config import load_config
    from fl_core.engine import run
    from fl_core.engine.checkpoint import find_checkpoint

    overrides = [f"{k}={v}" for k, v in SCENARIOS[scenario].items()]
    overrides += [
        f"algorithm.name={algorithm}",
        f"federation.rounds={rounds}",
        "federation.checkpoint_every=2",
        *extra,
    ]
    cfg = load_config(ROOT / "configs" / "default.yaml", overrides)
    # one folder per (algorithm, scenario, overrides): a longer run resumes a shorter one
    out = RUNS / f"{algorithm}-{scenario}{'-' + '-'.join(extra) if extra else ''}"
    resume = find_checkpoint(out) is not None
    t0 = time.perf_counter()

    def progress(rnd: int, rec) -> None:
        acc = f" acc {rec.metrics['test_acc']:.4f}" if rec is not None else ""
        print(f"  {algorithm}/{scenario} round {rnd}/{rounds}{acc}", flush=True)

    result = run(cfg, out_dir=out, on_round=progress, resume=resume)
    summary = result.summary()
    per_round = max(result.rounds_run, 1)
    return {
        "algorithm": algorithm,
        "scenario": scenario,
        "rounds": result.rounds_run,
        "overrides": extra,
        "best_test_acc": summary["best_test_acc"],
        "best_round": summary["best_round"],
        "final_test_acc": summary["final_test_acc"],
        "seconds_per_round": summary["seconds_per_round"],
        "bytes_up_per_round": summary["bytes_up"] / per_round,
        "bytes_down_per_round": summary["bytes_down"] / per_round,
        "wall_seconds_this_session": time.perf_counter() - t0,
        "resumed": resume,
        "machine": f"{platform.machine()}, {os.cpu_count()} cores",
        "date": time.strftime("%Y-%m-%d"),
    }


def write_table(rows: list[dict]) -> None:
    lines = [
        "# PFLlib protocol on Fashion-MNIST: our best accuracy beside PFLlib's published figure",
        "",
        "20 clients, join ratio 1, 75/25 split, batch 10, 1 local epoch, lr 0.005, cnn4, every "
        "client evaluated every round. `pat` = pathological (2 classes per client), `dir` = "
        "practical Dirichlet(0.1). Best = best mean test accuracy over the evaluated rounds "
        "(round reached in brackets); PFLlib's figure is its best over 2,000 rounds. Seconds "
        "per round include the evaluation of every client and are those of the machine at "
        "the time, other jobs included (a row extended from a shorter run averages both "
        "sessions): compare them only within one session. Written by "
        "`benchmarks/reproduce_pfllib.py`.",
        "",
        "| algorithm | scenario | rounds run | best (round) | PFLlib | gap | final | s/round "
        "| up MB/round | down MB/round |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in sorted(rows, key=lambda r: (r["scenario"], r["algorithm"])):
        pub = PUBLISHED.get(r["algorithm"])
        ref = pub[0 if r["scenario"] == "pat" else 1] if pub else None
        best = 100 * r["best_test_acc"]
        name = r["algorithm"] + (f" ({', '.join(r['overrides'])})" if r["overrides"] else "")
        lines.append(
            f"| {name} | {r['scenario']} | {r['rounds']} | {best:.2f} ({r['best_round']}) | "
            f"{'' if ref is None else f'{ref:.2f}'} | "
            f"{'' if ref is None else f'{best - ref:+.2f}'} | {100 * r['final_test_acc']:.2f} | "
            f"{r['seconds_per_round']:.1f} | {r['bytes_up_per_round'] / 1e6:.2f} | "
            f"{r['bytes_down_per_round'] / 1e6:.2f} |"
        )
    TABLE.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--algorithms", nargs="+", default=["fedavg", "ditto", "fedrep", "fedproto"])
    ap.add_argument("--scenarios", nargs="+", default=["pat", "dir"], choices=list(SCENARIOS))
    ap.add_argument("--rounds", type=int, default=20)
    ap.add_argument("--set", dest="extra", action="append", default=[], help="extra override")
    ap.add_argument("--table", action="store_true", help="only rewrite the markdown table")
    args = ap.parse_args()
    rows = load_rows()
    if not args.table:
        for scenario in args.scenarios:
            for algorithm in args.algorithms:
                key = (algorithm, scenario, args.rounds, args.extra)
                if any(
                    (r["algorithm"], r["scenario"], r["rounds"], r["overrides"]) == key
                    for r in rows
                ):
                    print(f"kept: {algorithm}/{scenario}/{args.rounds} rounds", flush=True)
                    continue
                row = run_row(algorithm, scenario, args.rounds, args.extra)
                rows = [
                    r
                    for r in load_rows()
                    if (r["algorithm"], r["scenario"], r["rounds"], r["overrides"]) != key
                ] + [row]
                save_rows(rows)
                write_table(rows)
    write_table(rows)


if __name__ == "__main__":
    sys.exit(main())
