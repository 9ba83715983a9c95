"""Diffusers pipelines as generators: find a pipeline folder (local or from the Hugging Face
Hub), tell which kind it is, check its weight files and load it.

Supported folders:

* unconditional pixel-space ``UNet2DModel`` pipelines (DDPMPipeline / DDIMPipeline folders, a
  folder with ``unet/`` and ``scheduler/``, or a flat folder with the UNet's ``config.json`` and
  a ``scheduler_config.json``, which is how the builtin generators are stored);
* Stable Diffusion (``StableDiffusionPipeline`` folders).

A Hub id (``owner/name``) goes through huggingface_hub's cache and respects ``HF_HUB_OFFLINE``.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import torch

from generators.base import GeneratorError
from generators.device import resolve_device, resolve_dtype
from generators.diffusion import (
    DEFAULT_NUM_INFERENCE_STEPS,
    DEFAULT_PROMPT,
    GENERATOR_CONFIG_NAME,
    DDIMGenerator,
    PixelDiffusionGenerator,
    StableDiffusionGenerator,
)
from generators.files import first_line, read_json

UNCONDITIONAL_PIPELINES = ("DDPMPipeline", "DDIMPipeline")
STABLE_DIFFUSION_PIPELINES = ("StableDiffusionPipeline",)
_SD_COMPONENTS = ("unet", "vae", "text_encoder", "tokenizer", "scheduler")
_MODEL_COMPONENTS = ("unet", "vae", "text_encoder")

# What a hub download fetches: configs, tokenizer files and the main safetensors weights of each
# component, not the multi-GB single-file checkpoints, fp16 variants or safety checker.
_HUB_ALLOW_PATTERNS = [
    "*.json",
    "*.txt",
    "*diffusion_pytorch_model.safetensors",
    "*model.safetensors",
]
_HUB_IGNORE_PATTERNS = ["safety_checker/*", "*.fp16.*", "*non_ema*", "*.ckpt"]
_HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*$")

# The sampling options a generator_config.json may hold (see the generators' save_pretrained).
_SHARED_OPTIONS = ("num_inference_steps", "batch_size")
_SD_OPTIONS = ("prompt", "negative_prompt", "guidance_scale", "resolution")


def load_diffusers(
    source: str | Path,
    device: torch.device | str | None = None,
    dtype: torch.dtype | str | None = None,
    *,
    num_inference_steps: int | None = None,
    batch_size: int | None = None,
    prompt: str | None = None,
    negative_prompt: str | None = None,
    guidance_scale: float | None = None,
    resolution: int | None = None,
    revision: str | None = None,
    cache_dir: str | Path | None = None,
    name: str | None = None,
) -> DDIMGenerator:
    """Load a diffusers pipeline folder or Hub id as a generator.

    Options left as None come from the folder's ``generator_config.json`` when it has one
    (written by ``save_pretrained``), else the defaults: 50 DDIM steps, prompt "a photo",
    guidance 1.0 (off). ``revision`` and ``cache_dir`` only matter for Hub ids.
    """
    device = resolve_device(device)
    dtype = resolve_dtype(dtype)
    directory = resolve_pipeline_directory(str(source), revision=revision, cache_dir=cache_dir)
    kind = pipeline_kind(directory)
    check_weight_files(directory)
    given = {
        "num_inference_steps": num_inference_steps,
        "batch_size": batch_size,
        "prompt": prompt,
        "negative_prompt": negative_prompt,
        "guidance_scale": guidance_scale,
        "resolution": resolution,
    }
    options = {
        **_read_generator_config(directory),
        **{k: v for k, v in given.items() if v is not None},
    }
    name = name or f"diffusers:{source}"

    if kind == "stable-diffusion":
        return _load_stable_diffusion(directory, device, dtype, options, name)
    misplaced = sorted(k for k in _SD_OPTIONS if given[k] is not None)
    if misplaced:
        raise GeneratorError(
            f"option(s) {', '.join(misplaced)} only apply to Stable Diffusion pipelines; "
            f"{directory} holds an unconditional UNet2DModel pipeline"
        )
    options = {k: v for k, v in options.items() if k in _SHARED_OPTIONS}
    return load_pixel_diffusion(directory, device, dtype, name=name, flat=kind == "flat", **options)


def load_pixel_diffusion(
    directory: Path,
    device: torch.device,
    dtype: torch.dtype,
    *,
    name: str,
    flat: bool,
    num_inference_steps: int | None = None,
    batch_size: int | None = None,
) -> PixelDiffusionGenerator:
    """Load an unconditional UNet2DModel + scheduler config from a pipeline or flat folder."""
    from diffusers import UNet2DModel

    subfolder = None if flat else "unet"
    unet_dir = directory if flat else directory / "unet"
    class_name = read_json(unet_dir / "config.json").get("_class_name", "UNet2DModel")
    if class_name != "UNet2DModel":
        raise GeneratorError(
            f"{unet_dir / 'config.json'} describes a {class_name}; an unconditional pipeline "
            "needs a UNet2DModel"
        )
    unet = _place(_from_pretrained(UNet2DModel, directory, subfolder), device, dtype)
    scheduler_file = (
        directory / "scheduler_config.json"
        if flat
        else directory / "scheduler" / "scheduler_config.json"
    )
    return PixelDiffusionGenerator(
        unet,
        read_json(scheduler_file),
        num_inference_steps=(
            DEFAULT_NUM_INFERENCE_STEPS if num_inference_steps is None else num_inference_steps
        ),
        batch_size=batch_size,
        name=name,
    )


def _load_stable_diffusion(
    directory: Path, device: torch.device, dtype: torch.dtype, options: dict[str, Any], name: str
) -> StableDiffusionGenerator:
    from diffusers import StableDiffusionPipeline

    try:
        pipeline = StableDiffusionPipeline.from_pretrained(
            directory,
            safety_checker=None,
            feature_extractor=None,
            requires_safety_checker=False,
        )
    except Exception as exc:  # diffusers/transformers raise many kinds; report them as one
        raise GeneratorError(
            f"could not load the Stable Diffusion pipeline in {directory}: {first_line(exc)}"
        ) from exc
    for module in (pipeline.unet, pipeline.vae, pipeline.text_encoder):
        _place(module, device, dtype)
    return StableDiffusionGenerator(
        pipeline.unet,
        pipeline.vae,
        pipeline.text_encoder,
        pipeline.tokenizer,
        dict(pipeline.scheduler.config),
        prompt=options.get("prompt", DEFAULT_PROMPT),
        negative_prompt=options.get("negative_prompt", ""),
        guidance_scale=options.get("guidance_scale", 1.0),
        resolution=options.get("resolution"),
        num_inference_steps=options.get("num_inference_steps", DEFAULT_NUM_INFERENCE_STEPS),
        batch_size=options.get("batch_size"),
        name=name,
    )


def resolve_pipeline_directory(
    source: str, *, revision: str | None = None, cache_dir: str | Path | None = None
) -> Path:
    """A local directory as is; an ``owner/name`` Hub id through huggingface_hub's cache."""
    path = Path(source).expanduser()
    if path.exists():
        if not path.is_dir():
            raise GeneratorError(
                f"{path} is a file; diffusers: needs a pipeline directory (with model_index.json, "
                "or unet/ and scheduler/ folders)"
            )
        return path
    if source.startswith((".", "/", "~")) or not _HUB_ID.match(source):
        raise GeneratorError(
            f"pipeline directory not found: {path} does not exist (nor is it a Hugging Face Hub "
            "id of the form 'owner/name')"
        )
    return _snapshot_download(source, revision=revision, cache_dir=cache_dir)


def _snapshot_download(repo_id: str, *, revision: str | None, cache_dir: str | Path | None) -> Path:
    from huggingface_hub import constants, snapshot_download

    try:
        folder = snapshot_download(
            repo_id,
            revision=revision,
            cache_dir=cache_dir,
            allow_patterns=_HUB_ALLOW_PATTERNS,
            ignore_patterns=_HUB_IGNORE_PATTERNS,
        )
    except Exception as exc:  # offline, no network, unknown repo, gated repo, …
        offline = bool(getattr(constants, "HF_HUB_OFFLINE", False))
        why = (
            "HF_HUB_OFFLINE is set, so only the local cache is used, and it does not hold it"
            if offline
            else "it could not be downloaded and the local cache does not hold it"
        )
        raise GeneratorError(
            f"could not get the pipeline {repo_id!r} from the Hugging Face Hub: {why} "
            f"({type(exc).__name__}: {first_line(exc)}). There is no local directory "
            f"{repo_id!r} either. To use it, either run `hf download {repo_id}` (older "
            f"huggingface_hub: `huggingface-cli download {repo_id}`) on a machine with network "
            "access and make that Hugging Face cache available here (HF_HOME / HF_HUB_CACHE), "
            "or unset HF_HUB_OFFLINE and retry with network access; or download the pipeline "
            "folder (model_index.json, unet/, scheduler/, …) and pass it as "
            "'diffusers:/path/to/folder'."
        ) from exc
    return Path(folder)


def pipeline_kind(directory: Path) -> str:
    """'unconditional', 'flat' (an unconditional UNet stored flat) or 'stable-diffusion'."""
    index_file = directory / "model_index.json"
    if index_file.is_file():
        index = read_json(index_file)
        class_name = index.get("_class_name")
        if class_name in STABLE_DIFFUSION_PIPELINES:
            kind, required = "stable-diffusion", _SD_COMPONENTS
        elif class_name in UNCONDITIONAL_PIPELINES or (
            set(index) >= {"unet", "scheduler"}
            and list(index.get("unet", [])[-1:]) == ["UNet2DModel"]
        ):
            kind, required = "unconditional", ("unet", "scheduler")
        else:
            raise GeneratorError(
                f"{index_file} describes a {class_name}; supported pipelines are "
                f"{', '.join(UNCONDITIONAL_PIPELINES)} (unconditional UNet2DModel) and "
                f"{', '.join(STABLE_DIFFUSION_PIPELINES)}"
            )
        for component in required:
            if not (directory / component).is_dir():
                raise GeneratorError(
                    f"pipeline {directory} is incomplete: its {class_name} needs the component "
                    f"folder {component}/, which is missing"
                )
        return kind
    if (directory / "unet").is_dir() and (directory / "scheduler").is_dir():
        if all((directory / c).is_dir() for c in _SD_COMPONENTS):
            return "stable-diffusion"
        return "unconditional"
    if (directory / "config.json").is_file() and (directory / "scheduler_config.json").is_file():
        return "flat"
    raise GeneratorError(
        f"{directory} is not a diffusers pipeline: expected a model_index.json "
        f"({', '.join(UNCONDITIONAL_PIPELINES + STABLE_DIFFUSION_PIPELINES)}), or unet/ and "
        "scheduler/ folders, or a UNet2DModel config.json next to a scheduler_config.json"
    )


def check_weight_files(directory: Path) -> None:
    """Fail early, naming the file, when a model folder has no weights or a safetensors file
    cannot be read (truncated download, not a safetensors file)."""
    from safetensors import safe_open

    for component in _MODEL_COMPONENTS:
        folder = directory / component
        if folder.is_dir() and not any(
            f.suffix in (".safetensors", ".bin") for f in folder.iterdir() if f.is_file()
        ):
            raise GeneratorError(f"no weights file (*.safetensors or *.bin) in {folder}")
    for file in sorted(directory.rglob("*.safetensors")):
        try:
            with safe_open(str(file), framework="pt") as handle:
                handle.keys()
        except Exception as exc:
            raise GeneratorError(
                f"weights file {file} cannot be read ({first_line(exc)}); it is truncated or "
                "not a safetensors file, so download or copy it again"
            ) from exc


# ----------------------------------------------------------------------------- helpers


def _from_pretrained(cls: Any, directory: Path, subfolder: str | None) -> Any:
    """Load in float32 (float16 weights are upcast); the caller moves it to device and dtype."""
    where = directory / subfolder if subfolder else directory
    try:
        return cls.from_pretrained(directory, subfolder=subfolder)
    except Exception as exc:  # diffusers raises OSError, ValueError, EnvironmentError, …
        raise GeneratorError(
            f"could not load the {cls.__name__} in {where}: {first_line(exc)}"
        ) from exc


def _place(module: Any, device: torch.device, dtype: torch.dtype) -> Any:
    """Move a module loaded in float32 to ``device`` and ``dtype``. Loading in float32 and then
    casting works the same across diffusers versions (whose dtype argument was renamed)."""
    module.to(device)
    if dtype != torch.float32:
        module.to(dtype)
    return module


def _read_generator_config(directory: Path) -> dict[str, Any]:
    file = directory / GENERATOR_CONFIG_NAME
    if not file.is_file():
        return {}
    config = read_json(file)
    unknown = sorted(set(config) - set(_SHARED_OPTIONS) - set(_SD_OPTIONS))
    if unknown:
        raise GeneratorError(
            f"{file} has unknown key(s) {', '.join(unknown)}; valid keys: "
            f"{', '.join(_SHARED_OPTIONS + _SD_OPTIONS)}"
        )
    return config
