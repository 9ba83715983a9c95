"""Downstream accuracy of `ktl synthesize` against epsilon, for the ready configs, over seeds,
beside the classifier trained on the private few shots alone; seconds per selection round.

Each run is ``ktl.synthesize.synthesize(load_config(CONFIG, overrides), evaluate=True)`` with the
overrides ``privacy.epsilon``, ``seed`` and, for the cross-domain setting,
``private.dataset=fashion_mnist`` (Fashion-MNIST few shots steering the same Animal-MNIST
generator). The seed decides the private shots, so *synthetic − few-shot* is a paired
difference; the table gives its mean and standard deviation over the seeds run.

    python benchmarks/synthesize.py [--configs configs/synthesize_animal_pe.yaml ...]
        [--epsilons 1 5 10 inf] [--seeds 0 1 2] [--settings animal fashion] [--threads 1]

Resumable: finished runs are kept in benchmarks/results/synthesize.json (keyed by the config
file's content, the setting, epsilon and seed) and skipped; ``--fresh`` starts over. The table
benchmarks/results/synthesize.md is rewritten after every run (temporary file, then rename).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import platform
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

RESULTS = REPO_ROOT / "benchmarks" / "results"
STORE = RESULTS / "synthesize.json"
TABLE = RESULTS / "synthesize.md"
CONFIGS = [
    "configs/synthesize_animal_pool.yaml",
    "configs/synthesize_animal_laplace.yaml",
    "configs/synthesize_animal_pe.yaml",
    "configs/synthesize_animal.yaml",
]
SETTINGS = {
    "animal": ([], "Animal-MNIST (in-domain)"),
    "fashion": (["private.dataset=fashion_mnist"], "Fashion-MNIST (cross-domain)"),
    "animal3": (["private.shots_per_class=3"], "Animal-MNIST, 3 shots (in-domain)"),
}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--configs", nargs="+", default=CONFIGS)
    p.add_argument("--epsilons", nargs="+", default=["1", "5", "10", "inf"])
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    p.add_argument("--settings", nargs="+", default=["animal"], choices=list(SETTINGS))
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--fresh", action="store_true", help="forget finished runs")
    return p.parse_args(argv)


def config_id(path: Path) -> str:
    """``<stem>@<digest of the file>``: an edited config gets new rows."""
    return f"{path.stem}@{hashlib.sha256(path.read_bytes()).hexdigest()[:10]}"


def fmt_eps(x: float) -> str:
    return "∞" if math.isinf(x) else f"{x:g}"


def write_table(rows: list[dict]) -> None:
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        groups.setdefault((r["config"], r["setting"], r["mechanism"], r["epsilon"]), []).append(r)
    lines = [
        "# `ktl synthesize`: downstream accuracy against epsilon",
        "",
        "Written by `python benchmarks/synthesize.py` (resumable). Each run: a ready config "
        "(its name and the digest of its content in the first column), its privacy.epsilon set "
        "to ε (δ = 1e-5), one seed (which also draws the 5 private shots per class); Fashion-MNIST "
        "rows swap in Fashion-MNIST shots with the same Animal-MNIST generator. *synthetic*: the "
        "config's classifier trained on the exported set, tested on the real held-out rest of "
        "the split; *few-shot*: the same classifier trained on the private shots alone; *diff*: "
        "their paired difference, mean ± standard deviation over the seeds. s/round: wall "
        "seconds per selection round on a 2-core CPU shared with other jobs (rough).",
        "",
        "| config | setting | mechanism | ε | seeds | synthetic | few-shot | diff | s/round "
        "| per-step parameter |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    order = {s: i for i, s in enumerate(SETTINGS)}
    for key in sorted(groups, key=lambda k: (k[0], order[k[1]], k[2], k[3])):
        g = sorted(groups[key], key=lambda r: r["seed"])
        syn = [r["synthetic_accuracy"] for r in g]
        few = [r["few_shot_accuracy"] for r in g]
        diff = [s - f for s, f in zip(syn, few, strict=True)]
        spread = f" ± {statistics.stdev(diff):.3f}" if len(diff) > 1 else ""
        r0 = g[0]
        if r0["epsilon_per_draw"] is not None:
            param = f"ε/draw {r0['epsilon_per_draw']:.4g}"
        elif r0.get("noise") == "laplace":
            param = f"Laplace b {r0['noise_multiplier']:.4g}"
        else:
            param = f"σ {r0['noise_multiplier']:.4g}"
        lines.append(
            f"| {key[0]} | {SETTINGS[key[1]][1]} | {key[2]} | {fmt_eps(key[3])} | "
            f"{','.join(str(r['seed']) for r in g)} | {statistics.mean(syn):.3f} | "
            f"{statistics.mean(few):.3f} | {statistics.mean(diff):+.3f}{spread} | "
            f"{statistics.mean(r['seconds_per_iteration'] for r in g):.1f} | {param} |"
        )
    machines = sorted({r["machine"] for r in rows})
    lines += ["", f"Machines: {'; '.join(machines)}."]
    tmp = TABLE.with_suffix(".md.tmp")
    tmp.write_text("\n".join(lines) + "\n", encoding="utf-8")
    tmp.replace(TABLE)


def load_rows() -> dict[str, dict]:
    """The stored rows; rows of the older format (no ``config``) are left out."""
    if not STORE.is_file():
        return {}
    return {k: v for k, v in json.loads(STORE.read_text()).items() if "config" in v}


def main(argv=None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    from ktl.synthesize import synthesize
    from ktl.synthesize.config import load_config

    RESULTS.mkdir(parents=True, exist_ok=True)
    done: dict[str, dict] = {} if args.fresh else load_rows()
    machine = f"{platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}"
    for config_path in map(Path, args.configs):
        cid = config_id(config_path)
        for setting in args.settings:
            for eps_text in args.epsilons:
                epsilon = float(eps_text)
                for seed in args.seeds:
                    key = f"{cid}|{setting}|{epsilon}|seed{seed}"
                    if key in done:
                        print(f"kept   {key}", flush=True)
                        continue
                    overrides = [f"privacy.epsilon={epsilon}", f"seed={seed}"]
                    cfg = load_config(config_path, overrides + SETTINGS[setting][0])
                    start = time.perf_counter()
                    result = synthesize(cfg, evaluate=True)
                    ev, plan = result.manifest["evaluation"], result.plan
                    done[key] = {
                        "config": cid,
                        "setting": setting,
                        "mechanism": cfg.mechanism.name,
                        "epsilon": epsilon,
                        "seed": seed,
                        "epsilon_spent": plan.epsilon_spent,
                        "synthetic_accuracy": ev["synthetic_accuracy"],
                        "few_shot_accuracy": ev["few_shot_accuracy"],
                        "heldout_images": ev["heldout_images"],
                        "seconds_per_iteration": result.manifest["seconds_per_iteration"],
                        "seconds": round(time.perf_counter() - start, 1),
                        "epsilon_per_draw": plan.epsilon_per_draw,
                        "noise_multiplier": plan.noise_multiplier,
                        "noise": plan.noise,
                        "machine": machine,
                        "date": time.strftime("%Y-%m-%d"),
                    }
                    # merge with rows another process may have written meanwhile
                    done = {**load_rows(), key: done[key]}
                    tmp = STORE.with_suffix(f".json.{os.getpid()}.tmp")
                    tmp.write_text(json.dumps(done, indent=1, default=str) + "\n")
                    tmp.replace(STORE)
                    write_table(list(done.values()))
                    row = done[key]
                    print(
                        f"done   {key}: synthetic {row['synthetic_accuracy']:.4f}, few-shot "
                        f"{row['few_shot_accuracy']:.4f}, {row['seconds']} s",
                        flush=True,
                    )
    if done:
        write_table(list(done.values()))


if __name__ == "__main__":
    main()
