"""Downstream accuracy of `ktl synthesize` against epsilon, for both mechanisms, beside the
classifier trained on the private few shots alone; seconds per selection round.

Settings: the builtin generator (Animal-MNIST train split), 5 private shots per class from
Animal-MNIST's test split (in-domain) and from Fashion-MNIST's test split (cross-domain: the
same animal generator), the offline default embedding (the generator's denoiser features),
``configs/synthesize_animal.yaml`` scaled down by the options below. Every row is one run of
``ktl.synthesize.synthesize(..., evaluate=True)``; the held-out set is the rest of the split.

    python benchmarks/synthesize.py [--epsilons 1 5 10 inf] [--mechanisms pcevolve pe]
        [--settings animal fashion] [--iterations 2] [--population 12] [--select 4]
        [--per-class 30] [--steps 400] [--threads 1] [--fresh]

Resumable: finished rows are kept in benchmarks/results/synthesize.json and skipped on the next
run (``--fresh`` starts over); the table benchmarks/results/synthesize.md is rewritten after
every row (temporary file, then rename).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

RESULTS = REPO_ROOT / "benchmarks" / "results"
SETTINGS = {
    "animal": {"dataset": "animal_mnist", "split": "test", "label": "Animal-MNIST (in-domain)"},
    "fashion": {
        "dataset": "fashion_mnist",
        "split": "test",
        "label": "Fashion-MNIST (cross-domain)",
    },
}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--epsilons", nargs="+", default=["1", "5", "10", "inf"])
    p.add_argument(
        "--mechanisms", nargs="+", default=["pcevolve", "pe"], choices=["pcevolve", "pe"]
    )
    p.add_argument("--settings", nargs="+", default=["animal", "fashion"], choices=list(SETTINGS))
    p.add_argument("--iterations", type=int, default=2)
    p.add_argument("--population", type=int, default=12)
    p.add_argument("--select", type=int, default=4)
    p.add_argument("--per-class", type=int, default=30)
    p.add_argument("--shots", type=int, default=5)
    p.add_argument("--inference-steps", type=int, default=10)
    p.add_argument("--steps", type=int, default=400, help="classifier Adam steps")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--fresh", action="store_true", help="forget finished rows")
    return p.parse_args(argv)


def row_key(setting: str, mechanism: str, epsilon: float, args) -> str:
    return (
        f"{setting}|{mechanism}|{epsilon}|T{args.iterations}|N{args.population}|k{args.select}|"
        f"n{args.per_class}|shots{args.shots}|ddim{args.inference_steps}|steps{args.steps}|seed{args.seed}"
    )


def _fmt(x: float) -> str:
    return "∞" if isinstance(x, float) and math.isinf(x) else f"{x:g}"


def write_table(rows: list[dict], args, path: Path) -> None:
    lines = [
        "# `ktl synthesize`: downstream accuracy against epsilon",
        "",
        "Written by `python benchmarks/synthesize.py` (resumable; finished rows are kept). Each row: "
        "one run with the builtin generator (trained on Animal-MNIST's train split), "
        f"{args.shots} private images per class, the offline default embedding (the generator's "
        f"denoiser features), {args.iterations} selection rounds of {args.population} candidates "
        f"and {args.select} selections per class, {args.per_class} exported images per class, "
        f"DDIM {args.inference_steps} steps, delta = 1e-5. *synthetic*: a cnn4 classifier trained "
        f"({args.steps} Adam steps) on the exported set, tested on the real held-out rest of the "
        "split; *few-shot only*: the same classifier trained on the private shots alone. "
        "s/round: wall seconds per selection round (candidates embedded, selected, varied), on "
        "a 2-core CPU shared with other jobs, so treat the timings as rough.",
        "",
        "| setting | mechanism | ε | synthetic acc | few-shot only acc | synthetic − few-shot | s/round | per-step parameter |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    order = {s: i for i, s in enumerate(SETTINGS)}
    for r in sorted(rows, key=lambda r: (order[r["setting"]], r["mechanism"], r["epsilon"])):
        param = (
            f"ε/draw {r['epsilon_per_draw']}"
            if r["mechanism"] == "pcevolve"
            else f"σ {r['noise_multiplier']}"
        )
        lines.append(
            f"| {SETTINGS[r['setting']]['label']} | {r['mechanism']} | {_fmt(r['epsilon'])} | "
            f"{r['synthetic_accuracy']:.4f} | {r['few_shot_accuracy']:.4f} | "
            f"{r['synthetic_accuracy'] - r['few_shot_accuracy']:+.4f} | {r['seconds_per_iteration']:.1f} | {param} |"
        )
    lines += [
        "",
        f"Machine: {platform.processor() or platform.machine()}, torch {torch.__version__}, {args.threads} thread(s).",
    ]
    tmp = path.with_suffix(".md.tmp")
    tmp.write_text("\n".join(lines) + "\n", encoding="utf-8")
    tmp.replace(path)


def main(argv=None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    from generators import load_generator
    from ktl.synthesize import build_config, synthesize

    RESULTS.mkdir(parents=True, exist_ok=True)
    store = RESULTS / "synthesize.json"
    done: dict[str, dict] = {}
    if store.is_file() and not args.fresh:
        done = json.loads(store.read_text(encoding="utf-8"))
    gen = load_generator("builtin", num_inference_steps=args.inference_steps, batch_size=128)
    for setting in args.settings:
        for mechanism in args.mechanisms:
            for eps_text in args.epsilons:
                epsilon = float(eps_text)
                key = row_key(setting, mechanism, epsilon, args)
                if key in done:
                    print(f"kept   {key}", flush=True)
                    continue
                cfg = build_config(
                    {
                        "seed": args.seed,
                        "private": {
                            **{k: v for k, v in SETTINGS[setting].items() if k != "label"},
                            "shots_per_class": args.shots,
                        },
                        "mechanism": {
                            "name": mechanism,
                            "iterations": args.iterations,
                            "population": args.population,
                            "select": args.select,
                        },
                        "privacy": {"epsilon": epsilon, "delta": 1e-5},
                        "export": {"per_class": args.per_class},
                        "evaluate": {"steps": args.steps},
                    }
                )
                start = time.perf_counter()
                result = synthesize(cfg, generator=gen, evaluate=True)
                ev, plan = result.manifest["evaluation"], result.plan
                row = {
                    "setting": setting,
                    "mechanism": mechanism,
                    "epsilon": epsilon,
                    "epsilon_spent": plan.epsilon_spent,
                    "synthetic_accuracy": ev["synthetic_accuracy"],
                    "few_shot_accuracy": ev["few_shot_accuracy"],
                    "heldout_images": ev["heldout_images"],
                    "seconds_per_iteration": result.manifest["seconds_per_iteration"],
                    "seconds": round(time.perf_counter() - start, 1),
                    "epsilon_per_draw": None
                    if plan.epsilon_per_draw is None
                    else _fmt(round(plan.epsilon_per_draw, 4)),
                    "noise_multiplier": None
                    if plan.noise_multiplier is None
                    else round(plan.noise_multiplier, 4),
                }
                done[key] = row
                tmp = store.with_suffix(".json.tmp")
                tmp.write_text(json.dumps(done, indent=1, default=str) + "\n", encoding="utf-8")
                tmp.replace(store)
                write_table(list(done.values()), args, RESULTS / "synthesize.md")
                print(
                    f"done   {key}: synthetic {row['synthetic_accuracy']:.4f}, few-shot {row['few_shot_accuracy']:.4f}, {row['seconds']} s",
                    flush=True,
                )


if __name__ == "__main__":
    main()
