"""`ktl flower …`: what a Flower deployment needs besides Flower's own commands.

The simulation needs none of this: ``ktl run CONFIG --set federation.executor=flower-sim``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, NoReturn

import typer

app = typer.Typer(
    name="flower",
    help="Run on a Flower deployment: write the app, split a partition per SuperNode, make TLS "
    "certificates and SuperNode keys. Needs Flower installed; see docs/flower.md.",
    no_args_is_help=True,
    add_completion=False,
)


def _fail(exc: BaseException | str) -> NoReturn:
    typer.echo(f"Error: {exc}", err=True)
    raise typer.Exit(code=2)


def _deploy():
    try:
        from fl_core.flower import deploy
    except ImportError as e:
        _fail(f"{e}; install Flower with: pip install 'ktl[flower]'")
    return deploy


def _errors() -> tuple[type[BaseException], ...]:
    from fl_core.config import ConfigError
    from fl_core.data import DataError

    return (ConfigError, DataError, FileExistsError)


@app.command("app")
def app_command(
    config: Annotated[Path | None, typer.Argument(help="YAML config (default: built-in)")] = None,
    partition: Annotated[
        Path, typer.Option("--partition", "-p", help="the saved `ktl partition` folder")
    ] = Path("partition"),
    out: Annotated[
        Path, typer.Option("--out", "-o", help="output folder for metrics (SuperLink's machine)")
    ] = Path("runs/flower"),
    app_dir: Annotated[
        Path, typer.Option("--app", help="folder to write the Flower app (pyproject.toml) to")
    ] = Path("flower-app"),
    set_: Annotated[
        list[str] | None, typer.Option("--set", "-s", help="override a config key")
    ] = None,
    round_timeout: Annotated[
        float,
        typer.Option(help="seconds a round waits for replies; later ones are dropped (0: all)"),
    ] = 0.0,
    node_wait: Annotated[
        float, typer.Option(help="seconds to wait for the SuperNodes at the start")
    ] = 120.0,
) -> None:
    """Write a Flower app folder that runs CONFIG with ktl's ServerApp and ClientApp."""
    deploy = _deploy()
    from fl_core.config import load_config

    try:
        cfg = load_config(config, set_ or [])
        path = deploy.write_app(app_dir, cfg, partition, out, round_timeout, node_wait)
    except _errors() as e:
        _fail(e)
    typer.echo(f"wrote {path / 'pyproject.toml'}; start it with: flwr run {path} <connection>")


@app.command("split")
def split_command(
    partition: Annotated[Path, typer.Argument(help="the saved `ktl partition` folder")],
    out: Annotated[Path, typer.Option("--out", "-o", help="folder for client_<i>/ folders")],
) -> None:
    """One folder per client, each with only its own tensors: what each SuperNode receives."""
    deploy = _deploy()
    try:
        folders = deploy.split_partition(partition, out)
    except _errors() as e:
        _fail(e)
    typer.echo(f"wrote {len(folders)} client folders to {out}")


@app.command("certs")
def certs_command(
    out: Annotated[Path, typer.Argument(help="folder for ca.crt, server.pem, server.key")],
    host: Annotated[
        list[str] | None,
        typer.Option("--host", help="SuperLink address the certificate is valid for (repeat)"),
    ] = None,
    days: Annotated[int, typer.Option(min=1, help="validity in days")] = 365,
) -> None:
    """A private CA and a SuperLink certificate signed by it (tests, private networks)."""
    deploy = _deploy()
    files = deploy.make_tls_certificates(out, tuple(host or ["127.0.0.1", "localhost"]), days)
    typer.echo("wrote " + ", ".join(str(p) for p in files.values()))


@app.command("keys")
def keys_command(
    out: Annotated[Path, typer.Argument(help="folder for the key pair")],
    name: Annotated[str, typer.Argument(help="the SuperNode's name (file name of the keys)")],
) -> None:
    """An EC key pair for SuperNode authentication (register the .pub with the SuperLink)."""
    deploy = _deploy()
    files = deploy.make_supernode_keys(out, name)
    typer.echo(
        f"wrote {files['private']} (SuperNode) and {files['public']} (flwr supernode register)"
    )
