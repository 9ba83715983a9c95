"""The ``ktl`` command line: run federations, build partitions, list what exists."""

from __future__ import annotations

import sys
import textwrap
import time
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer
from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TaskID,
    TextColumn,
    TimeElapsedColumn,
)
from rich.table import Table

if TYPE_CHECKING:
    from fl_core.algorithms import Algorithm

app = typer.Typer(
    help="ktl: federated learning across heterogeneous data and models.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
console = Console()
err_console = Console(stderr=True)


def _user_errors() -> tuple[type[BaseException], ...]:
    from fl_core.algorithms import AlgorithmError, PartError
    from fl_core.config import ConfigError
    from fl_core.data import DataError
    from fl_core.device import DeviceError
    from fl_core.engine import TrainingDiverged
    from fl_core.models import ModelError

    errors: list[type[BaseException]] = [
        ConfigError,
        DataError,
        ModelError,
        AlgorithmError,
        PartError,
        DeviceError,
        TrainingDiverged,
    ]
    try:
        from generators.base import GeneratorError

        errors.append(GeneratorError)
    except ImportError:  # pragma: no cover
        pass
    from fl_core.flower import FlowerError  # no Flower import: the error type only

    errors.append(FlowerError)
    return tuple(errors)


def fail(message: str, code: int = 2) -> None:
    """Print one clear paragraph to stderr and exit, no traceback."""
    text = textwrap.fill(str(message), width=100, break_long_words=False, break_on_hyphens=False)
    err_console.print(f"[bold red]error:[/] {text}", highlight=False, soft_wrap=True)
    raise typer.Exit(code)


def _load(config: Path | None, overrides: list[str] | None):
    """The config file with overrides; with no file, the built-in defaults (the same run as
    configs/default.yaml, so an installed ktl needs no file)."""
    from fl_core.config import load_config

    return load_config(config, overrides or [])


class RoundProgress:
    """The progress display of a command that works in rounds (``ktl run``, ``ktl synthesize``):
    "round", a bar, rounds done of the total, a status text and the elapsed time; with
    ``quiet``, nothing. Use it as a context manager and call `update` after each round."""

    def __init__(self, console: Console, total: int, status: str, quiet: bool = False) -> None:
        self._progress = Progress(
            TextColumn("[bold blue]round"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.fields[status]}"),
            TimeElapsedColumn(),
            console=console,
            disable=quiet,
        )
        self._total = total
        self._status = status
        self._task: TaskID | None = None

    def __enter__(self) -> RoundProgress:
        self._progress.__enter__()
        self._task = self._progress.add_task("rounds", total=self._total, status=self._status)
        return self

    def __exit__(self, *exc_info) -> None:
        self._progress.__exit__(*exc_info)

    def update(self, completed: int, status: str | None = None) -> None:
        """``completed`` rounds done; ``status`` replaces the status text (None keeps it)."""
        fields = {} if status is None else {"status": status}
        self._progress.update(self._task, completed=completed, **fields)


SetOption = Annotated[
    list[str] | None,
    typer.Option("--set", "-s", help="override a config key, e.g. --set federation.rounds=5"),
]


@app.command()
def run(
    config: Annotated[
        Path | None,
        typer.Argument(help="YAML config (default: the built-in default, configs/default.yaml)"),
    ] = None,
    set_: SetOption = None,
    out: Annotated[Path | None, typer.Option("--out", "-o", help="output folder")] = None,
    resume: Annotated[
        Path | None,
        typer.Option(
            "--resume",
            help="continue the run in this output folder from its latest checkpoint "
            "(its config.yaml is used; --set may change federation.rounds)",
        ),
    ] = None,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="no progress bar")] = False,
) -> None:
    """Run a federated experiment and write config, metrics, summary and curves to --out."""
    from fl_core.engine import run as run_federation

    try:
        if resume is not None:
            if config is not None or out is not None:
                fail("--resume DIR takes the config and output folder from DIR; drop CONFIG/--out")
            cfg = _load(resume / "config.yaml", set_)
            out = resume
        else:
            cfg = _load(config, set_)
        if out is None:
            stamp = time.strftime("%Y%m%d-%H%M%S")
            out = Path("runs") / f"{stamp}-{cfg.algorithm.name}"
        console.print(
            f"[bold]ktl run[/] {cfg.algorithm.name} on {cfg.data.dataset} "
            f"({cfg.data.partition}, {cfg.data.num_clients} clients), model {cfg.model.name}, "
            f"{cfg.federation.rounds} rounds -> {out}",
            highlight=False,
        )
        with RoundProgress(console, cfg.federation.rounds, "loading data", quiet) as progress:

            def on_round(rnd: int, rec) -> None:
                status = None  # a round without evaluation keeps the last status
                if rec is not None:
                    m = rec.metrics
                    status = f"acc {m['test_acc']:.4f}"
                    if "train_loss" in m:  # absent with federation.eval_train_loss=false
                        status += f"  loss {m['train_loss']:.4f}"
                progress.update(rnd, status)

            result = run_federation(cfg, out_dir=out, on_round=on_round, resume=resume is not None)
    except _user_errors() as e:
        fail(str(e))
    s = result.summary()
    console.print(
        f"best test acc {s['best_test_acc']:.4f}, final {s['final_test_acc']:.4f}, "
        f"{s['rounds']} rounds, {s['seconds_per_round']:.2f} s/round; wrote {out}",
        highlight=False,
    )


@app.command()
def partition(
    config: Annotated[
        Path | None, typer.Argument(help="YAML config (its data section is used)")
    ] = None,
    set_: SetOption = None,
    out: Annotated[
        Path | None, typer.Option("--out", "-o", help="folder to write the dataset to")
    ] = None,
) -> None:
    """Partition a dataset into clients, print a per-client table, and save it with a manifest."""
    from fl_core.data.federated import build_federated_dataset
    from fl_core.data.report import client_table

    try:
        cfg = _load(config, set_)
        ds = build_federated_dataset(cfg.data, seed=cfg.seed, batch_size=cfg.federation.batch_size)
        if out is None:
            out = (
                Path("runs")
                / "partitions"
                / (
                    f"{cfg.data.dataset}-{cfg.data.partition}-{cfg.data.num_clients}c-seed{cfg.seed}"
                )
            )
        console.print(client_table(ds))
        ds.save(out)
    except _user_errors() as e:
        fail(str(e))
    console.print(f"wrote {out} (manifest.json + tensors)", highlight=False)


list_app = typer.Typer(help="List registered algorithms, models, model groups, datasets.")
app.add_typer(list_app, name="list")


def _print_mapping(title: str, mapping: dict[str, str]) -> None:
    table = Table(title=title, show_lines=False)
    table.add_column("name", style="bold")
    table.add_column("description")
    for k, v in mapping.items():
        table.add_row(k, v)
    console.print(table)


def algorithms_by_family() -> list[tuple[str, str, list[Algorithm]]]:
    """Every registered algorithm, built-in and plug-in, as (family, title, algorithms by name)
    in the order of ``FAMILIES``, families without an algorithm left out: what ``ktl list
    algorithms`` shows and docs/algorithms.md's table lists (scripts/algorithm_table.py)."""
    from fl_core.algorithms import FAMILIES, registered_algorithms

    algos = registered_algorithms()
    groups = [
        (family, title, [a for a in algos.values() if a.family == family])
        for family, title in FAMILIES.items()
    ]
    return [group for group in groups if group[2]]


@list_app.command("algorithms")
def list_algorithms_cmd() -> None:
    """Registered FL algorithms, by family."""
    for family, title, members in algorithms_by_family():
        table = Table(title=f"{title} ({family})", title_justify="left")
        table.add_column("name", style="bold")
        table.add_column("hetero models")
        table.add_column("description")
        table.add_column("paper")
        for a in members:
            table.add_row(a.name, "yes" if a.heterogeneous else "no", a.description, a.paper)
        console.print(table)


@list_app.command("models")
def list_models_cmd() -> None:
    """Registered model architectures."""
    from fl_core.models import list_models

    _print_mapping("models", list_models())


@list_app.command("groups")
def list_groups_cmd(
    input_shape: Annotated[
        str, typer.Option("--input-shape", help="CxHxW of the input the counts are for")
    ] = "3x32x32",
    num_classes: Annotated[int, typer.Option("--num-classes", min=1, help="classes K")] = 10,
    feature_dim: Annotated[int, typer.Option("--feature-dim", min=1, help="feature size")] = 512,
) -> None:
    """Heterogeneous model groups (client i gets entry i mod the group's size), each architecture
    with its parameter count (whole model, and the head) for one input shape."""
    import torch

    from fl_core.models import GROUP_ALIASES, ModelError, build_model, list_groups, parse_arch

    try:
        shape = tuple(int(d) for d in input_shape.lower().split("x"))
    except ValueError:
        shape = ()
    if len(shape) != 3 or min(shape) < 1:
        fail(f"--input-shape must be CxHxW with positive integers, e.g. 3x32x32; got {input_shape}")

    # (body, own head) parameters per registered model, built once on the meta device (shapes
    # without memory or initialisation: resnet152 takes a fraction of a second); a "+head..."
    # entry reuses its model's body count and counts its head from the spec.
    bodies: dict[str, tuple[int, int] | str] = {}

    def count(arch: str) -> tuple[int, int] | str:
        name, head_spec = parse_arch(arch)
        if name not in bodies:
            try:
                with torch.device("meta"):
                    model = build_model(name, shape, num_classes, feature_dim)
            except ModelError as e:
                bodies[name] = "input too small" if "too small" in str(e) else str(e)
            else:
                bodies[name] = tuple(
                    sum(p.numel() for p in part.parameters()) for part in (model.body, model.head)
                )
        found = bodies[name]
        if isinstance(found, str):
            return found
        head = found[1] if head_spec is None else head_spec.num_parameters(feature_dim, num_classes)
        return found[0] + head, head

    aliases: dict[str, list[str]] = {}
    for alias, name in GROUP_ALIASES.items():
        aliases.setdefault(name, []).append(alias)
    table = Table(
        title=f"model groups: parameters for input {'x'.join(map(str, shape))}, "
        f"{num_classes} classes, feature_dim {feature_dim}",
        caption="client i gets entry i mod the group's size. 'model+head_256': the model's body "
        "with head Linear(feature_dim, 256), ReLU, Linear(256, K); '+head': Linear(feature_dim, "
        "K); '_relu': a ReLU after the logits too (HtFLlib's Head)",
    )
    table.add_column("group", style="bold", overflow="fold")
    table.add_column("i", justify="right")
    table.add_column("architecture", overflow="fold")
    table.add_column("parameters", justify="right")
    table.add_column("head", justify="right")
    for name, archs in list_groups().items():
        label = name + "".join(f"\n(alias {a})" for a in aliases.get(name, []))
        for i, arch in enumerate(archs):
            n = count(arch)
            total, head = (f"{n[0]:,}", f"{n[1]:,}") if isinstance(n, tuple) else (n, "")
            table.add_row(
                label if i == 0 else "", str(i), arch, total, head, end_section=i == len(archs) - 1
            )
    console.print(table)


@list_app.command("datasets")
def list_datasets_cmd() -> None:
    """Data sources a config's data.dataset may name."""
    import inspect

    from fl_core.data import list_sources
    from fl_core.data.sources import _REGISTRY

    fallback = {
        "fashion_mnist": "Fashion-MNIST, 70k 28x28 grey, 10 classes (Debian dataset-fashion-mnist, "
        "a torchvision root, or a download)",
        "mnist": "MNIST through torchvision (data.root or data.download=true)",
        "cifar10": "CIFAR-10 through torchvision (data.root or data.download=true)",
        "cifar100": "CIFAR-100 through torchvision (data.root or data.download=true)",
    }
    rows = {}
    for name in list_sources():
        doc = inspect.getdoc(_REGISTRY[name]) or fallback.get(name, "")
        rows[name] = doc.split("\n\n")[0].replace("\n", " ")
    _print_mapping("datasets", rows)


def _mount_generators() -> None:
    try:
        from ktl.cli_generators import app as generators_app
    except ImportError:  # pragma: no cover - generators are part of the package
        return
    app.add_typer(generators_app, name="generators")


_mount_generators()


def _mount_transfer() -> None:
    from ktl.cli_transfer import transfer

    app.command("transfer")(transfer)


_mount_transfer()


def _mount_synthesize() -> None:
    try:
        from ktl.cli_synthesize import synthesize_command
    except ImportError:  # pragma: no cover - part of the package
        return
    app.command("synthesize")(synthesize_command)


_mount_synthesize()


def _mount_flower() -> None:
    from ktl.cli_flower import app as flower_app

    app.add_typer(flower_app, name="flower")


_mount_flower()


def main() -> None:
    try:
        app()
    except KeyboardInterrupt:  # pragma: no cover
        err_console.print("interrupted")
        sys.exit(130)


if __name__ == "__main__":  # pragma: no cover
    main()
