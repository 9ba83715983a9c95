"""`ktl generators …`: list generators, sample an image grid, convert StyleGAN3 pickles."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Annotated, NoReturn

import typer

from generators import GeneratorError, list_generators, load_generator, save_image_grid
from generators.images import grid_shape

app = typer.Typer(
    name="generators",
    help="Pre-trained image generators: list them, sample image grids, convert StyleGAN3 pickles.",
    no_args_is_help=True,
    add_completion=False,
)


def _fail(exc: Exception) -> NoReturn:
    """One readable paragraph on stderr, exit code 2, no traceback."""
    typer.echo(f"Error: {exc}", err=True)
    raise typer.Exit(code=2)


@app.command("list")
def list_command() -> None:
    """Show the builtin generators and the spec forms of every backend."""
    entries = list_generators()
    typer.echo("Builtin generators (ready to use, no download):")
    for info in (e for e in entries if e.kind == "builtin"):
        marker = "  (default)" if info.default else ""
        typer.echo(f"  {info.spec}{marker}\n      {info.description}")
    typer.echo("\nBackends (fill in the part in <>):")
    for info in (e for e in entries if e.kind == "backend"):
        typer.echo(f"  {info.spec}\n      {info.description}")


@app.command("sample")
def sample_command(
    spec: Annotated[
        str | None,
        typer.Argument(
            help="builtin:<name>, diffusers:<dir or hub id> or stylegan3:<file>; "
            "omitted: the default builtin generator",
            show_default=False,
        ),
    ] = None,
    n: Annotated[int, typer.Option("--n", "-n", min=1, help="number of images")] = 16,
    seed: Annotated[int, typer.Option(help="seed of the latents")] = 0,
    out: Annotated[Path, typer.Option(help="PNG file to write (atomically)")] = Path("grid.png"),
    steps: Annotated[
        int | None,
        typer.Option(help="DDIM steps for diffusion generators (default: the model's own)"),
    ] = None,
    device: Annotated[str, typer.Option(help="cpu, cuda, cuda:<i> or auto")] = "auto",
    nrow: Annotated[
        int | None, typer.Option(min=1, help="images per row (default ~sqrt(n))")
    ] = None,
) -> None:
    """Sample N images from a generator and write them as one PNG grid."""
    import torch

    options = {} if steps is None else {"num_inference_steps": steps}
    try:
        start = time.perf_counter()
        generator = load_generator(spec, device=device, **options)
        loaded = time.perf_counter() - start
        latents = generator.sample_latents(n, torch.Generator().manual_seed(seed))
        images = generator.synthesize(latents)
        path = save_image_grid(images, out, nrow=nrow)
    except GeneratorError as exc:
        _fail(exc)
    rows, columns = grid_shape(n, nrow)
    typer.echo(
        f"{generator.name}: {n} images of {generator.channels}x{generator.resolution}x"
        f"{generator.resolution} on {generator.device} (load {loaded:.1f}s, total "
        f"{time.perf_counter() - start:.1f}s) -> {path} ({rows}x{columns} grid)"
    )


@app.command("convert-stylegan3")
def convert_stylegan3_command(
    in_pkl: Annotated[Path, typer.Argument(help="official StyleGAN3 .pkl file")],
    out_dir: Annotated[Path, typer.Argument(help="directory to write safetensors + config")],
    overwrite: Annotated[bool, typer.Option(help="replace OUT_DIR if it exists")] = False,
) -> None:
    """Convert an official StyleGAN3 pickle (read without executing its code) to safetensors."""
    from generators.loading import convert_stylegan3

    try:
        result = convert_stylegan3(in_pkl, out_dir, overwrite=overwrite)
    except GeneratorError as exc:
        _fail(exc)
    typer.echo(f"converted {in_pkl} -> {result if result is not None else out_dir}")
    typer.echo(f"load it with: ktl generators sample stylegan3:{out_dir}")
