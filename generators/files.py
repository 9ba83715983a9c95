"""Small file helpers of the diffusion backend: JSON configs, safetensors weights, error text.

Every read failure becomes a :class:`~generators.base.GeneratorError` that names the file.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from generators.base import GeneratorError


def read_json(file: Path) -> dict[str, Any]:
    """The JSON object in ``file``; a clear error when it is missing, unreadable or not an object."""
    try:
        data = json.loads(file.read_text(encoding="utf-8"))
    except FileNotFoundError as exc:
        raise GeneratorError(f"missing file: {file}") from exc
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise GeneratorError(f"{file} is not valid JSON ({exc})") from exc
    if not isinstance(data, dict):
        raise GeneratorError(f"{file} must hold a JSON object, got {type(data).__name__}")
    return data


def write_json(file: Path, data: dict[str, Any]) -> None:
    """Write ``data`` as indented, key-sorted JSON, creating the parent folder."""
    file.parent.mkdir(parents=True, exist_ok=True)
    file.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def save_model(model: Any, directory: Path, weights_dtype: torch.dtype | None) -> None:
    """Write a diffusers model's config and its weights as one safetensors file, optionally
    cast to ``weights_dtype``."""
    from safetensors.torch import save_file

    directory.mkdir(parents=True, exist_ok=True)
    model.save_config(directory)
    state = {
        key: (value.to(weights_dtype) if weights_dtype is not None else value).contiguous().cpu()
        for key, value in model.state_dict().items()
    }
    weights = directory / "diffusion_pytorch_model.safetensors"
    save_file(state, str(weights), metadata={"format": "pt"})
    weights.chmod(0o644)  # safetensors creates files readable by the owner only


def diffusers_version() -> str:
    """The installed diffusers version, as written into a saved ``model_index.json``."""
    import diffusers

    return str(diffusers.__version__)


def first_line(exc: BaseException) -> str:
    """The first line of an exception's message (or its type name), for one-line errors."""
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
