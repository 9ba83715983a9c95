"""`ktl synthesize CONFIG --out DIR`: a labelled synthetic dataset from a few private images,
with a stated (epsilon, delta) guarantee (docs/synthesize.md)."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Annotated, NoReturn

import typer


def _fail(exc: Exception) -> NoReturn:
    """One readable paragraph on stderr, exit code 2, no traceback."""
    typer.echo(f"Error: {exc}", err=True)
    raise typer.Exit(code=2)


def _eps(x: float) -> str:
    return "inf" if math.isinf(x) else f"{x:.3f}"


def synthesize_command(
    config: Annotated[
        Path, typer.Argument(help="YAML config, e.g. configs/synthesize_animal.yaml")
    ],
    out: Annotated[
        Path, typer.Option("--out", "-o", help="folder to write the dataset to (must not exist)")
    ],
    set_: Annotated[
        list[str] | None,
        typer.Option("--set", "-s", help="override a config key, e.g. --set privacy.epsilon=2"),
    ] = None,
    evaluate: Annotated[
        bool,
        typer.Option(
            "--evaluate",
            help="train a classifier on the synthetic set and on the private few shots, test both on real held-out images",
        ),
    ] = False,
    overwrite: Annotated[
        bool, typer.Option("--overwrite", help="replace --out if it exists")
    ] = False,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="no progress display")] = False,
) -> None:
    """Differentially private selection over a pre-trained generator (pcevolve or pe); writes
    images/<class>/<n>.png, labels.csv and manifest.json (with the privacy actually spent)."""
    from generators import GeneratorError
    from ktl.synthesize import USER_ERRORS, load_config, synthesize

    try:
        cfg = load_config(config, set_ or [])
    except USER_ERRORS as exc:
        _fail(exc)
    from rich.console import Console

    from ktl.cli import RoundProgress

    console = Console(stderr=True)
    m = cfg.mechanism
    per_round = f"{m.population} candidates and {m.select} selections per class per round"
    if cfg.export.source == "pool":
        per_round = (
            f"{m.population} candidates per class per round, the last round's pool labelled by "
            "the votes"
        )
    console.print(
        f"[bold]ktl synthesize[/] {m.name}: {m.iterations} rounds, {per_round}, budget epsilon "
        f"{_eps(cfg.privacy.epsilon)}, delta {cfg.privacy.delta:g} -> {out}",
        highlight=False,
    )
    try:
        first = "generating the first candidates"
        with RoundProgress(console, m.iterations, first, quiet) as progress:

            def on_progress(info: dict) -> None:
                status = (
                    f"epsilon spent {_eps(info['epsilon_spent'])} of {_eps(info['epsilon'])}, "
                    f"about {info['eta']:.0f} s left"
                )
                progress.update(info["iteration"], status)

            result = synthesize(
                cfg, out, evaluate=evaluate, overwrite=overwrite, on_progress=on_progress
            )
    except (*USER_ERRORS, GeneratorError) as exc:
        _fail(exc)
    plan = result.plan
    typer.echo(
        f"wrote {len(result.labels)} images in {len(result.class_names)} classes to {out}; "
        f"privacy spent: epsilon {_eps(plan.epsilon_spent)}, delta "
        f"{plan.delta if plan.delta_spent is None else plan.delta_spent:g} ({plan.accountant})"
    )
    evaluation = result.manifest.get("evaluation")
    if evaluation:
        typer.echo(
            f"held-out accuracy ({evaluation['heldout_images']} real images): synthetic "
            f"{evaluation['synthetic_accuracy']:.4f}, private few shots only "
            f"{evaluation['few_shot_accuracy']:.4f}"
        )
