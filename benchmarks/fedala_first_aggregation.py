"""FedALA's first weight learning (to convergence) on cached body features vs the whole model.

FedALA's first local aggregation trains its weights until the loss settles: tens of epochs over
80% of a client's data. When every learned tensor is in the head, the body (the received global
model, in eval mode) gives the same features in every epoch, and `fl_core.algorithms.fedala`
computes them once. This script runs the same short FedALA federation both ways, alternating
(``--repeats`` times each, in one process, one torch thread), and prints the seconds of round 1's
evaluation and round 2's training (where the first learning happens) and whether the metrics
are equal; the table is also written to ``--out``.

    python benchmarks/fedala_first_aggregation.py --samples 3000 --repeats 2
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent


def one_run(samples: int, rounds: int, cached: bool) -> tuple[list[dict], float]:
    from fl_core.algorithms.fedala import FedALAClient
    from fl_core.config import load_config
    from fl_core.engine import run

    real = FedALAClient._head_only
    FedALAClient._head_only = real if cached else (lambda self, model: False)
    try:
        cfg = load_config(
            ROOT / "configs" / "default.yaml",
            [
                "algorithm.name=fedala",
                f"data.max_samples={samples}",
                f"federation.rounds={rounds}",
                "federation.executor=sequential",
                "threads=1",
            ],
        )
        t0 = time.perf_counter()
        with tempfile.TemporaryDirectory() as out:
            result = run(cfg, out_dir=out)
        records = [r.as_json() for r in result.history]
        return records, time.perf_counter() - t0
    finally:
        FedALAClient._head_only = real


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--samples", type=int, default=3000, help="Fashion-MNIST samples in all")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument(
        "--out", type=Path, default=ROOT / "benchmarks" / "results" / "fedala_first_aggregation.md"
    )
    args = ap.parse_args()
    torch.set_num_threads(1)
    runs: dict[bool, list[tuple[list[dict], float]]] = {True: [], False: []}
    for _ in range(args.repeats):
        for cached in (False, True):
            runs[cached].append(one_run(args.samples, args.rounds, cached))

    def median(cached: bool, rnd: int, key: str) -> float:
        return statistics.median(r[rnd][key] for r, _ in runs[cached])

    same = all(
        [(x["test_acc"], x.get("train_loss")) for x in recs]
        == [(x["test_acc"], x.get("train_loss")) for x in runs[False][0][0]]
        for cached in (True, False)
        for recs, _ in runs[cached]
    )
    rows = [
        ("round 1 evaluation (s)", 1, "eval_seconds"),
        ("round 2 training (s)", 2, "train_seconds"),
        ("round 3 training (s)", 3, "train_seconds"),
    ]
    lines = [
        "# FedALA: the first weight learning on cached body features vs the whole model",
        "",
        f"Written by `benchmarks/fedala_first_aggregation.py`: PFLlib's protocol (Dir(0.1), 20 "
        f"clients, cnn4, batch 10) on {args.samples} Fashion-MNIST samples, {args.rounds} rounds, "
        f"both variants alternating in one process, {args.repeats} runs each, medians; one torch "
        f"thread, {platform.machine()} with {len(os.sched_getaffinity(0))} cores shared with "
        "whatever else ran (compare the two columns, not figures of other runs).",
        "",
        "| step | whole model every epoch | cached features | ratio |",
        "|---|---|---|---|",
    ]
    for label, rnd, key in rows:
        full, fast = median(False, rnd, key), median(True, rnd, key)
        lines.append(f"| {label} | {full:.2f} | {fast:.2f} | {full / fast:.2f}x |")
    wall_full = statistics.median(t for _, t in runs[False])
    wall_fast = statistics.median(t for _, t in runs[True])
    lines.append(
        f"| whole run (s) | {wall_full:.2f} | {wall_fast:.2f} | {wall_full / wall_fast:.2f}x |"
    )
    lines += [
        "",
        "Test accuracy and training loss of every round equal in all runs: "
        + ("yes." if same else "**no**."),
        "",
    ]
    text = "\n".join(lines)
    print(text)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    tmp = args.out.with_suffix(".tmp")
    tmp.write_text(text)
    tmp.replace(args.out)


if __name__ == "__main__":
    main()
