"""Load any generator from one string spec, and choose its device and dtype.

Specs::

    builtin:<name>                      a small generator shipped with the package
    diffusers:<directory or hub id>     an unconditional UNet2DModel pipeline or Stable Diffusion
    stylegan3:<file.pkl or directory>   an official StyleGAN3 pickle or a converted directory

``None``, an empty string, ``builtin`` and ``builtin:`` mean the default builtin generator.
Device and dtype arguments are resolved by :mod:`generators.device`.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from generators.base import Generator, GeneratorError
from generators.builtin import BUILTINS, DEFAULT_BUILTIN, load_builtin
from generators.device import resolve_device, resolve_dtype
from generators.pipelines import load_diffusers

# backend -> (spec form, what it loads)
BACKEND_FORMS: dict[str, tuple[str, str]] = {
    "builtin": ("builtin:<name>", "a generator shipped with ktl (see the builtin names)"),
    "diffusers": (
        "diffusers:<directory or hub id>",
        "an unconditional UNet2DModel pipeline (DDPM/DDIM) or a Stable Diffusion pipeline, "
        "sampled with deterministic DDIM",
    ),
    "stylegan3": (
        "stylegan3:<file.pkl or directory>",
        "an official StyleGAN3 pickle, or a directory made by `ktl generators convert-stylegan3`",
    ),
}


@dataclass(frozen=True)
class GeneratorInfo:
    """One entry of :func:`list_generators`."""

    spec: str
    description: str
    kind: str  # "builtin" (a ready-to-use generator) or "backend" (a form to fill in)
    default: bool = False


def parse_spec(spec: str | None) -> tuple[str, str]:
    """Split a spec into (backend, target); ``None``, ``""``, ``"builtin"`` and ``"builtin:"``
    give the default builtin."""
    if spec is None or not str(spec).strip():
        return "builtin", DEFAULT_BUILTIN
    spec = str(spec).strip()
    backend, sep, target = spec.partition(":")
    backend = backend.strip().lower()
    if backend == "builtin" and not target.strip():
        return "builtin", DEFAULT_BUILTIN
    if not sep or backend not in BACKEND_FORMS:
        forms = "\n  ".join(f"{form}  {what}" for form, what in BACKEND_FORMS.values())
        raise GeneratorError(
            f"unknown generator spec {spec!r}. A spec is one of:\n  {forms}\n"
            "or nothing at all for the default builtin generator."
        )
    target = target.strip()
    if not target:
        raise GeneratorError(
            f"generator spec {spec!r} names no target; the form is {BACKEND_FORMS[backend][0]}"
        )
    return backend, target


def _call_with_options(
    backend: str, loader: Callable[..., Generator], *args: Any, **kwargs: Any
) -> Generator:
    """Call ``loader(*args, **kwargs)``, where ``kwargs`` mixes fixed arguments (device, dtype)
    and user options; an option the loader does not take becomes a GeneratorError listing the
    valid ones, instead of a TypeError from deep inside."""
    signature = inspect.signature(loader)
    if not any(p.kind is inspect.Parameter.VAR_KEYWORD for p in signature.parameters.values()):
        positional = list(signature.parameters)[: len(args)]
        valid = [
            name
            for name, p in signature.parameters.items()
            if name not in positional
            and name not in {"device", "dtype"}
            and p.kind in (inspect.Parameter.KEYWORD_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
        ]
        unknown = sorted(set(kwargs) - set(valid) - {"device", "dtype"})
        if unknown:
            raise GeneratorError(
                f"option(s) {', '.join(unknown)} not accepted by the {backend} backend; "
                f"valid options: {', '.join(valid) if valid else 'none'}"
            )
    return loader(*args, **kwargs)


def load_generator(
    spec: str | None = None,
    device: str | torch.device | None = None,
    dtype: str | torch.dtype | None = None,
    **options: Any,
) -> Generator:
    """Load a generator from a spec (see the module docstring); ``None`` -> the default builtin.

    ``device``: None (CPU), "auto" (the accelerator accelerate finds, else CPU) or a device
    name, see :func:`~generators.device.resolve_device`. ``dtype``: None (float32) or a
    floating dtype. ``options`` go to the backend, for example
    ``num_inference_steps`` for diffusion models or ``prompt`` for Stable Diffusion.
    """
    backend, target = parse_spec(spec)
    resolved_device = resolve_device(device)
    resolved_dtype = resolve_dtype(dtype)
    if backend == "builtin":
        return _call_with_options(
            backend, load_builtin, target, device=resolved_device, dtype=resolved_dtype, **options
        )
    if backend == "diffusers":
        return _call_with_options(
            backend, load_diffusers, target, device=resolved_device, dtype=resolved_dtype, **options
        )
    return _load_stylegan3(target, resolved_device, resolved_dtype, **options)


def _import_stylegan3() -> Any:
    try:
        import generators.stylegan3 as stylegan3
    except ModuleNotFoundError as exc:
        if exc.name in {"generators.stylegan3"}:
            raise GeneratorError(
                "the StyleGAN3 backend (generators.stylegan3) is not installed in this copy of ktl"
            ) from exc
        raise GeneratorError(
            f"the StyleGAN3 backend could not be imported: module {exc.name!r} is missing"
        ) from exc
    return stylegan3


def _load_stylegan3(
    target: str, device: torch.device, dtype: torch.dtype, **options: Any
) -> Generator:
    path = Path(target).expanduser()
    if not path.exists():
        raise GeneratorError(
            f"StyleGAN3 weights not found: {path} does not exist. Pass an official .pkl file or "
            "a directory written by `ktl generators convert-stylegan3 IN.pkl OUT_DIR`."
        )
    stylegan3 = _import_stylegan3()
    return _call_with_options(
        "stylegan3", stylegan3.load_stylegan3, str(path), device=device, dtype=dtype, **options
    )


def convert_stylegan3(in_pkl: str | Path, out_dir: str | Path, overwrite: bool = False) -> Any:
    """Convert an official StyleGAN3 pickle to a safetensors + config directory."""
    in_path = Path(in_pkl).expanduser()
    if not in_path.is_file():
        raise GeneratorError(f"StyleGAN3 pickle not found: {in_path} is not a file")
    return _import_stylegan3().convert_stylegan3_pickle(
        in_path, Path(out_dir).expanduser(), overwrite=overwrite
    )


def list_generators() -> list[GeneratorInfo]:
    """The builtin generators (ready to use) followed by the backend spec forms."""
    entries = [
        GeneratorInfo(
            spec=f"builtin:{name}",
            description=info.description,
            kind="builtin",
            default=name == DEFAULT_BUILTIN,
        )
        for name, info in BUILTINS.items()
    ]
    entries += [
        GeneratorInfo(spec=form, description=what, kind="backend")
        for form, what in BACKEND_FORMS.values()
    ]
    return entries
