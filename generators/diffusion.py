"""Diffusion generators through diffusers.

The latent is the initial noise ``x_T``; deterministic DDIM sampling (eta = 0) maps it to an
image, so the same latent always gives the same image. Two kinds of pipeline are supported:

* unconditional pixel-space ``UNet2DModel`` pipelines (DDPMPipeline / DDIMPipeline folders, a
  folder with ``unet/`` and ``scheduler/``, or a flat folder with the UNet's ``config.json`` and
  a ``scheduler_config.json``, which is how the builtin generators are stored);
* Stable Diffusion (``StableDiffusionPipeline`` folders): the latent is the initial noise in the
  VAE latent space, conditioned on one fixed prompt embedding computed at load time.

Whatever scheduler a pipeline was saved with, sampling uses a ``DDIMScheduler`` built from that
scheduler's config (same noise schedule, deterministic steps).
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from generators.base import Generator, GeneratorError

DEFAULT_NUM_INFERENCE_STEPS = 50
DEFAULT_PROMPT = "a photo"
GENERATOR_CONFIG_NAME = "generator_config.json"

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

_SHARED_OPTIONS = ("num_inference_steps", "batch_size")
_SD_OPTIONS = ("prompt", "negative_prompt", "guidance_scale", "resolution")


# ----------------------------------------------------------------------------- generators


class DDIMGenerator(Generator):
    """Shared part of the diffusion generators: DDIM settings, latent prior, chunked synthesis."""

    def __init__(
        self,
        scheduler_config: dict[str, Any],
        *,
        num_inference_steps: int = DEFAULT_NUM_INFERENCE_STEPS,
        batch_size: int | None = None,
        name: str = "diffusers",
    ) -> None:
        super().__init__()
        from diffusers import DDIMScheduler

        try:
            self.scheduler = DDIMScheduler.from_config(scheduler_config)
        except Exception as exc:  # a config diffusers cannot read: say so, not a deep trace
            raise GeneratorError(f"cannot build a DDIM scheduler from the config: {exc}") from exc
        train_steps = int(self.scheduler.config.num_train_timesteps)
        if not isinstance(num_inference_steps, int) or not 1 <= num_inference_steps <= train_steps:
            raise GeneratorError(
                f"num_inference_steps must be an integer in 1..{train_steps}, "
                f"got {num_inference_steps!r}"
            )
        if batch_size is not None and (not isinstance(batch_size, int) or batch_size < 1):
            raise GeneratorError(f"batch_size must be a positive integer, got {batch_size!r}")
        self.num_inference_steps = num_inference_steps
        self.batch_size = batch_size
        self.name = name

    @property
    def init_noise_sigma(self) -> float:
        return float(self.scheduler.init_noise_sigma)

    def sample_latents(self, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """Initial noise ``x_T``: standard normal times the scheduler's ``init_noise_sigma``.

        Drawn on the generator's device (CPU by default) so a seed gives the same latents on
        every machine, then moved to this generator's device and dtype.
        """
        if not isinstance(n, int) or n < 0:
            raise GeneratorError(f"n must be a non-negative integer, got {n!r}")
        device = generator.device if generator is not None else torch.device("cpu")
        noise = torch.randn(
            (n, *self.latent_shape), generator=generator, device=device, dtype=torch.float32
        )
        return (noise * self.init_noise_sigma).to(device=self.device, dtype=self.dtype)

    def _ddim(self, x: torch.Tensor, predict_noise: Callable[..., torch.Tensor]) -> torch.Tensor:
        """Run deterministic DDIM from ``x = x_T`` with ``predict_noise(model_input, t)``."""
        self.scheduler.set_timesteps(self.num_inference_steps, device=x.device)
        for t in self.scheduler.timesteps:
            model_output = predict_noise(self.scheduler.scale_model_input(x, t), t)
            x = self.scheduler.step(model_output, t, x, eta=0.0).prev_sample
        return x

    def _synthesize_batch(self, latents: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def _synthesize(self, latents: torch.Tensor) -> torch.Tensor:
        if latents.shape[0] == 0:
            shape = (0, self.channels, self.resolution, self.resolution)
            return torch.zeros(shape, device=self.device)
        size = self.batch_size or latents.shape[0]
        return torch.cat([self._synthesize_batch(chunk) for chunk in latents.split(size)])

    def _options(self) -> dict[str, Any]:
        options: dict[str, Any] = {"num_inference_steps": self.num_inference_steps}
        if self.batch_size is not None:
            options["batch_size"] = self.batch_size
        return options

    def describe(self) -> dict:
        return {**super().describe(), "sampler": "DDIM (eta=0)", **self._options()}


class PixelDiffusionGenerator(DDIMGenerator):
    """An unconditional pixel-space ``UNet2DModel``: latent = x_T of shape (C, H, W)."""

    def __init__(
        self,
        unet: Any,
        scheduler_config: dict[str, Any],
        *,
        num_inference_steps: int = DEFAULT_NUM_INFERENCE_STEPS,
        batch_size: int | None = None,
        name: str = "diffusers",
    ) -> None:
        super().__init__(
            scheduler_config,
            num_inference_steps=num_inference_steps,
            batch_size=batch_size,
            name=name,
        )
        self.unet = unet.eval().requires_grad_(False)
        self.device = unet.device
        self.dtype = unet.dtype
        size = unet.config.sample_size
        height, width = (size, size) if isinstance(size, int) else tuple(size)
        if height != width:
            raise GeneratorError(
                f"only square images are supported, the UNet makes {height}x{width}"
            )
        in_channels = int(unet.config.in_channels)
        out_channels = int(unet.config.out_channels)
        if out_channels not in (in_channels, 2 * in_channels):
            raise GeneratorError(
                f"the UNet maps {in_channels} to {out_channels} channels; a noise-predicting UNet "
                "has out_channels equal to in_channels (or twice that, with learned variance)"
            )
        self.latent_shape = (in_channels, int(height), int(width))
        self.resolution = int(height)
        self.channels = in_channels

    def _synthesize_batch(self, latents: torch.Tensor) -> torch.Tensor:
        channels = self.channels

        def predict_noise(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
            # UNets with learned variance return [noise, variance]; DDIM uses the noise part only
            return self.unet(x, t).sample[:, :channels]

        x = self._ddim(latents, predict_noise)
        return x / 2 + 0.5

    def save_pretrained(
        self,
        directory: str | Path,
        *,
        layout: str = "pipeline",
        weights_dtype: torch.dtype | None = None,
    ) -> Path:
        """Save so that ``diffusers:<directory>`` loads the same generator back.

        ``layout="pipeline"`` writes a DDIMPipeline folder (model_index.json, unet/, scheduler/)
        that diffusers' own ``DDIMPipeline.from_pretrained`` also reads; ``layout="flat"`` writes
        config.json, diffusion_pytorch_model.safetensors and scheduler_config.json side by side
        (the builtin layout). ``weights_dtype`` (e.g. float16) only changes the stored weights.
        """
        directory = Path(directory)
        if layout not in ("pipeline", "flat"):
            raise GeneratorError(f"layout must be 'pipeline' or 'flat', got {layout!r}")
        unet_dir = directory / "unet" if layout == "pipeline" else directory
        scheduler_dir = directory / "scheduler" if layout == "pipeline" else directory
        _save_model(self.unet, unet_dir, weights_dtype)
        self.scheduler.save_pretrained(scheduler_dir)
        if layout == "pipeline":
            _write_json(
                directory / "model_index.json",
                {
                    "_class_name": "DDIMPipeline",
                    "_diffusers_version": _diffusers_version(),
                    "scheduler": ["diffusers", "DDIMScheduler"],
                    "unet": ["diffusers", "UNet2DModel"],
                },
            )
        _write_json(directory / GENERATOR_CONFIG_NAME, self._options())
        return directory


class StableDiffusionGenerator(DDIMGenerator):
    """Stable Diffusion with one fixed prompt: latent = x_T in the VAE latent space."""

    def __init__(
        self,
        unet: Any,
        vae: Any,
        text_encoder: Any,
        tokenizer: Any,
        scheduler_config: dict[str, Any],
        *,
        prompt: str = DEFAULT_PROMPT,
        negative_prompt: str = "",
        guidance_scale: float = 1.0,
        resolution: int | None = None,
        num_inference_steps: int = DEFAULT_NUM_INFERENCE_STEPS,
        batch_size: int | None = None,
        name: str = "diffusers",
    ) -> None:
        # VAE latents are not confined to [-1, 1]: never clip predicted x_0 (diffusers' own
        # StableDiffusionPipeline turns clip_sample off for the same reason).
        super().__init__(
            {**scheduler_config, "clip_sample": False},
            num_inference_steps=num_inference_steps,
            batch_size=batch_size,
            name=name,
        )
        self.unet = unet.eval().requires_grad_(False)
        self.vae = vae.eval().requires_grad_(False)
        self.text_encoder = text_encoder.eval().requires_grad_(False)
        self.tokenizer = tokenizer
        self.device = unet.device
        self.dtype = unet.dtype
        if not isinstance(prompt, str) or not isinstance(negative_prompt, str):
            raise GeneratorError("prompt and negative_prompt must be strings")
        if not isinstance(guidance_scale, int | float) or guidance_scale < 0:
            raise GeneratorError(f"guidance_scale must be a number >= 0, got {guidance_scale!r}")
        self.prompt = prompt
        self.negative_prompt = negative_prompt
        self.guidance_scale = float(guidance_scale)

        self.vae_scale_factor = 2 ** (len(vae.config.block_out_channels) - 1)
        size = unet.config.sample_size
        default_resolution = (size if isinstance(size, int) else size[0]) * self.vae_scale_factor
        resolution = default_resolution if resolution is None else resolution
        if not isinstance(resolution, int) or resolution < 1 or resolution % self.vae_scale_factor:
            raise GeneratorError(
                f"resolution must be a positive multiple of {self.vae_scale_factor} (the VAE's "
                f"downsampling factor), got {resolution!r}"
            )
        self.resolution = resolution
        self.channels = int(vae.config.out_channels)
        side = resolution // self.vae_scale_factor
        self.latent_shape = (int(unet.config.in_channels), side, side)

        # One fixed prompt embedding, computed once; with guidance also the negative one.
        self.prompt_embeds = self._encode(prompt)
        self.negative_prompt_embeds = self._encode(negative_prompt) if self._guided else None

    @property
    def _guided(self) -> bool:
        return self.guidance_scale != 1.0

    @torch.no_grad()
    def _encode(self, text: str) -> torch.Tensor:
        limit = int(self.text_encoder.config.max_position_embeddings)
        max_length = min(int(self.tokenizer.model_max_length), limit)
        tokens = self.tokenizer(
            text, padding="max_length", max_length=max_length, truncation=True, return_tensors="pt"
        )
        mask = None
        if getattr(self.text_encoder.config, "use_attention_mask", False):
            mask = tokens.attention_mask.to(self.text_encoder.device)
        ids = tokens.input_ids.to(self.text_encoder.device)
        embeds = self.text_encoder(ids, attention_mask=mask)[0]
        return embeds.to(device=self.device, dtype=self.dtype)

    def _synthesize_batch(self, latents: torch.Tensor) -> torch.Tensor:
        n = latents.shape[0]
        cond = self.prompt_embeds.expand(n, -1, -1)
        if self._guided:
            assert self.negative_prompt_embeds is not None
            context = torch.cat([self.negative_prompt_embeds.expand(n, -1, -1), cond])
        else:
            context = cond

        def predict_noise(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
            if not self._guided:
                return self.unet(x, t, encoder_hidden_states=context).sample
            noise_uncond, noise_cond = self.unet(
                torch.cat([x, x]), t, encoder_hidden_states=context
            ).sample.chunk(2)
            return noise_uncond + self.guidance_scale * (noise_cond - noise_uncond)

        x = self._ddim(latents, predict_noise)
        x = x / self.vae.config.scaling_factor
        if getattr(self.vae.config, "shift_factor", None) is not None:
            x = x + self.vae.config.shift_factor
        return self.vae.decode(x).sample / 2 + 0.5

    def _options(self) -> dict[str, Any]:
        return {
            **super()._options(),
            "prompt": self.prompt,
            "negative_prompt": self.negative_prompt,
            "guidance_scale": self.guidance_scale,
            "resolution": self.resolution,
        }

    def save_pretrained(self, directory: str | Path) -> Path:
        """Save a StableDiffusionPipeline folder (with a DDIM scheduler) plus the prompt and
        sampling options, so that ``diffusers:<directory>`` loads the same generator back."""
        from diffusers import StableDiffusionPipeline

        directory = Path(directory)
        pipeline = StableDiffusionPipeline(
            vae=self.vae,
            text_encoder=self.text_encoder,
            tokenizer=self.tokenizer,
            unet=self.unet,
            scheduler=self.scheduler,
            safety_checker=None,
            feature_extractor=None,
            requires_safety_checker=False,
        )
        pipeline.save_pretrained(directory)
        _write_json(directory / GENERATOR_CONFIG_NAME, self._options())
        return directory


# ----------------------------------------------------------------------------- loading


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
    from generators.loading import resolve_device, resolve_dtype

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
    class_name = _read_json(unet_dir / "config.json").get("_class_name", "UNet2DModel")
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
        _read_json(scheduler_file),
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
            f"could not load the Stable Diffusion pipeline in {directory}: {_first_line(exc)}"
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
            f"({type(exc).__name__}: {_first_line(exc)}). There is no local directory "
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
        index = _read_json(index_file)
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
                f"weights file {file} cannot be read ({_first_line(exc)}); it is truncated or "
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
            f"could not load the {cls.__name__} in {where}: {_first_line(exc)}"
        ) from exc


def _place(module: Any, device: torch.device, dtype: torch.dtype) -> Any:
    """Move a module loaded in float32 to ``device`` and ``dtype``. Loading in float32 and then
    casting works the same across diffusers versions (whose dtype argument was renamed)."""
    module.to(device)
    if dtype != torch.float32:
        module.to(dtype)
    return module


def _save_model(model: Any, directory: Path, weights_dtype: torch.dtype | None) -> None:
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


def _read_generator_config(directory: Path) -> dict[str, Any]:
    file = directory / GENERATOR_CONFIG_NAME
    if not file.is_file():
        return {}
    config = _read_json(file)
    unknown = sorted(set(config) - set(_SHARED_OPTIONS) - set(_SD_OPTIONS))
    if unknown:
        raise GeneratorError(
            f"{file} has unknown key(s) {', '.join(unknown)}; valid keys: "
            f"{', '.join(_SHARED_OPTIONS + _SD_OPTIONS)}"
        )
    return config


def _read_json(file: Path) -> dict[str, Any]:
    try:
        data = json.loads(file.read_text(encoding="utf-8"))
    except FileNotFoundError as exc:
        raise GeneratorError(f"missing file: {file}") from exc
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise GeneratorError(f"{file} is not valid JSON ({exc})") from exc
    if not isinstance(data, dict):
        raise GeneratorError(f"{file} must hold a JSON object, got {type(data).__name__}")
    return data


def _write_json(file: Path, data: dict[str, Any]) -> None:
    file.parent.mkdir(parents=True, exist_ok=True)
    file.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def _diffusers_version() -> str:
    import diffusers

    return str(diffusers.__version__)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
