"""Small generators shipped inside the package, usable offline with no download.

Each lives in ``weights/<name>/`` as a diffusers UNet2DModel stored flat: ``config.json``,
``diffusion_pytorch_model.safetensors``, ``scheduler_config.json``, ``generator_config.json``
(default sampling options) and ``training.json`` (how it was trained, and its quality figures).
They are trained by ``scripts/train_builtin_generator.py``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from importlib.resources import files
from pathlib import Path
from typing import Any

import torch

from generators.base import Generator, GeneratorError
from generators.pipelines import load_diffusers


@dataclass(frozen=True)
class BuiltinGenerator:
    """A builtin generator: its name, what it makes, and where its weights are."""

    name: str
    description: str
    dataset: str

    @property
    def directory(self) -> Path:
        return Path(str(files("generators.builtin") / "weights" / self.name))


BUILTINS: dict[str, BuiltinGenerator] = {
    "animal-ddim": BuiltinGenerator(
        name="animal-ddim",
        description=(
            "28x28 greyscale animal silhouettes (Animal-MNIST, 10 classes), unconditional "
            "UNet2DModel sampled with deterministic DDIM; latent = initial noise (1, 28, 28)"
        ),
        dataset="Animal-MNIST",
    ),
}
DEFAULT_BUILTIN = "animal-ddim"


def builtin_directory(name: str) -> Path:
    """The weights folder of builtin generator ``name``; a clear error if unknown or missing."""
    if name not in BUILTINS:
        raise GeneratorError(
            f"unknown builtin generator {name!r}; builtin generators: "
            f"{', '.join(f'builtin:{n}' for n in BUILTINS)}"
        )
    directory = BUILTINS[name].directory
    if not (directory / "diffusion_pytorch_model.safetensors").is_file():
        raise GeneratorError(
            f"the weights of builtin:{name} are missing from {directory}; reinstall ktl, or train "
            f"them with `python scripts/train_builtin_generator.py --out {directory}`"
        )
    return directory


def training_record(name: str) -> dict[str, Any]:
    """The ``training.json`` of a builtin generator (settings and quality figures), or {}."""
    file = builtin_directory(name) / "training.json"
    if not file.is_file():
        return {}
    return json.loads(file.read_text(encoding="utf-8"))


def load_builtin(
    name: str,
    device: torch.device | str | None = None,
    dtype: torch.dtype | str | None = None,
    *,
    num_inference_steps: int | None = None,
    batch_size: int | None = None,
) -> Generator:
    """Load builtin generator ``name`` (weights may be stored in float16; loaded as ``dtype``)."""
    return load_diffusers(
        str(builtin_directory(name)),
        device,
        dtype,
        num_inference_steps=num_inference_steps,
        batch_size=batch_size,
        name=f"builtin:{name}",
    )
