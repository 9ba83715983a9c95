"""``ktl transfer``: cloud-edge knowledge transfer to one edge client, with and without it."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Annotated

import typer


def transfer(
    config: Annotated[Path, typer.Argument(help="YAML config (dataset, model, FedKTL settings)")],
    shots: Annotated[
        list[int] | None, typer.Option("--shots", help="shots per class (repeatable)")
    ] = None,
    seeds: Annotated[int, typer.Option("--seeds", min=1, help="seeds 0..N-1 per shot count")] = 3,
    ways: Annotated[
        int | None, typer.Option("--ways", help="classes drawn per seed (default: all)")
    ] = None,
    generator: Annotated[
        str | None, typer.Option("--generator", help="generator spec (ktl generators list)")
    ] = None,
    set_: Annotated[
        list[str] | None,
        typer.Option("--set", "-s", help="override a config key, e.g. --set federation.rounds=5"),
    ] = None,
    out: Annotated[Path | None, typer.Option("--out", "-o", help="output folder")] = None,
) -> None:
    """Train one edge client on an N-way k-shot subset twice — client data only (mu = 0) and
    with knowledge transferred from the generator — for each shot count and seed; print and
    write the table (accuracy mean ± std, gain, relative gain). Finished runs in --out are kept:
    running the same command again continues."""
    from ktl.cli import _load, _user_errors, console, fail
    from ktl.transfer import format_table, run_transfer, summarize

    overrides = list(set_ or [])
    if generator is not None:
        overrides.append(f"algorithm.generator={generator}")
    try:
        cfg = _load(config, ["algorithm.name=fedktl", *overrides])
        if cfg.data.num_clients != 1:
            cfg = cfg.model_copy(update={"data": cfg.data.model_copy(update={"num_clients": 1})})
        shot_list = shots or [2, 9, 23]
        if any(k < 1 for k in shot_list):
            fail(f"--shots must be >= 1, got {shot_list}")
        if out is None:
            out = Path("runs") / f"{time.strftime('%Y%m%d-%H%M%S')}-transfer"
        console.print(
            f"[bold]ktl transfer[/] {cfg.data.dataset}, {ways or 'all'}-way, shots {shot_list}, "
            f"{seeds} seeds, model {cfg.model.name}, generator {cfg.algorithm_hparams().generator}"
            f" -> {out}",
            highlight=False,
        )

        def on_row(row) -> None:
            what = "with KTL" if row.mu > 0 else "client only"
            console.print(
                f"  {row.shots}-shot seed {row.seed} {what}: best {100 * row.best_acc:.2f}% "
                f"({row.seconds:.0f} s)",
                highlight=False,
            )

        rows = run_transfer(
            cfg, shot_list, list(range(seeds)), ways, out / "transfer_rows.json", on_row
        )
    except (*_user_errors(), ValueError) as e:
        fail(str(e))
    table = format_table(summarize([r for r in rows if r.shots in shot_list]))
    console.print(table, highlight=False)
    tmp = out / ".transfer.md.tmp"
    tmp.write_text(table + "\n")
    tmp.replace(out / "transfer.md")
    console.print(f"wrote {out / 'transfer.md'}", highlight=False)
