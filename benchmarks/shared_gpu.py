"""Training time per round on one device shared by several runs, for two checkouts side by side.

A GPU benchmark table (``benchmarks/device_*.sh``) runs one process per row on one GPU. Without
MPS, a GPU time-slices between processes, so anything that makes a training step wait for the
device (reading a loss, copying a batch from pageable host memory) costs up to a time slice per
step. This script measures that: for each checkout (``--roots``; this one by default) it runs
the given algorithms at once, ``--copies`` processes each, ``--rounds`` rounds (1 by default)
of PFLlib's protocol on a subset of Fashion-MNIST, then the same algorithms one process at a
time, and prints the median training seconds of the last round (table also written to
``--out``).

    python benchmarks/shared_gpu.py --roots /path/to/old . --algorithms fedavg fedrep --copies 4
"""

from __future__ import annotations

import argparse
import json
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
res = run(cfg, out_dir=sys.argv[2])
print(json.dumps({"train_seconds": res.train_seconds[-1:]}))  # the last round's
"""


def launch(root: Path, algorithm: str, overrides: list[str], work: Path) -> subprocess.Popen:
    out = Path(tempfile.mkdtemp(dir=work))
    path = os.pathsep.join(p for p in (str(root), os.environ.get("PYTHONPATH", "")) if p)
    env = {**os.environ, "PYTHONPATH": path, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-c", ONE_RUN, str(root / "configs" / "default.yaml"), str(out)]
    cmd += [f"algorithm.name={algorithm}", *overrides]
    return subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def collect(procs: list[tuple[str, subprocess.Popen]], timeout: float) -> dict[str, list[float]]:
    times: dict[str, list[float]] = {}
    end = time.monotonic() + timeout
    for name, p in procs:
        try:
            stdout, stderr = p.communicate(timeout=max(1.0, end - time.monotonic()))
        except subprocess.TimeoutExpired:
            p.kill()
            times.setdefault(name, [])
            continue
        if p.returncode != 0:
            raise SystemExit(f"{name} failed:\n{stderr[-3000:]}")
        times.setdefault(name, []).extend(json.loads(stdout.splitlines()[-1])["train_seconds"])
    return times


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--roots", nargs="+", type=Path, default=[ROOT])
    ap.add_argument("--algorithms", nargs="+", default=["fedavg", "fedrep"])
    ap.add_argument("--copies", type=int, default=4, help="processes per algorithm at once")
    ap.add_argument("--samples", type=int, default=8000, help="data.max_samples")
    ap.add_argument(
        "--rounds",
        type=int,
        default=1,
        help="rounds per run; the last one is timed (2 for algorithms whose first round differs, "
        "such as FedPCL, which trains nothing before global prototypes exist)",
    )
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--timeout", type=float, default=120.0, help="seconds per phase")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "shared_gpu.md")
    args = ap.parse_args()
    overrides = [
        "data.partition=dir",
        "data.alpha=0.1",
        f"data.max_samples={args.samples}",
        f"federation.rounds={args.rounds}",
        "federation.executor=sequential",
        "federation.checkpoint_every=null",
        f"device={args.device}",
        "threads=1",
    ]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        for root in args.roots:
            procs = [
                (a, launch(root.resolve(), a, overrides, work))
                for a in args.algorithms
                for _ in range(args.copies)
            ]
            shared = collect(procs, args.timeout)
            for a in args.algorithms:
                alone = collect([(a, launch(root.resolve(), a, overrides, work))], args.timeout)
                rows.append((str(root), a, shared[a], alone[a]))

    def med(xs: list[float]) -> str:
        return f"{statistics.median(xs):.1f}" if xs else "timed out"

    n = args.copies * len(args.algorithms)
    lines = [
        f"# Training seconds per round: {n} runs sharing one device vs one run alone",
        "",
        f"Device {args.device}; round {args.rounds} of PFLlib's protocol (Dir(0.1), 20 clients, "
        f"batch 10, cnn4) on {args.samples} Fashion-MNIST samples; {args.copies} processes per algorithm "
        "at once. Written by `benchmarks/shared_gpu.py`.",
        "",
        "| checkout | algorithm | shared (median s) | alone (s) |",
        "|---|---|---|---|",
    ]
    lines += [f"| {r} | {a} | {med(s)} | {med(al)} |" for r, a, s, al in rows]
    text = "\n".join(lines) + "\n"
    print(text)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    tmp_out = args.out.with_suffix(".tmp")
    tmp_out.write_text(text)
    os.replace(tmp_out, args.out)


if __name__ == "__main__":
    main()
