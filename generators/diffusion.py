"""Diffusion models as generators: deterministic DDIM from the initial noise.

The latent is the initial noise ``x_T``; deterministic DDIM sampling (eta = 0) maps it to an
image, so the same latent always gives the same image. Two kinds of generator are defined here:

* :class:`PixelDiffusionGenerator`, an unconditional pixel-space ``UNet2DModel``;
* :class:`StableDiffusionGenerator`, Stable Diffusion: the latent is the initial noise in the
  VAE latent space, conditioned on one fixed prompt embedding computed at load time.

Whatever scheduler a pipeline was saved with, sampling uses a ``DDIMScheduler`` built from that
scheduler's config (same noise schedule, deterministic steps). Loading these generators from
diffusers pipeline folders or the Hub lives in :mod:`generators.pipelines`.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from generators.base import Generator, GeneratorError
from generators.files import diffusers_version, save_model, write_json

DEFAULT_NUM_INFERENCE_STEPS = 50
DEFAULT_PROMPT = "a photo"
GENERATOR_CONFIG_NAME = "generator_config.json"


class DDIMGenerator(Generator):
    """Shared part of the diffusion generators: DDIM settings, latent prior, chunked synthesis,
    and the image-space variation (noise an image part of the way, denoise it with DDIM)."""

    variation_modes = ("image", "latent")

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

    def _ddim(
        self, x: torch.Tensor, predict_noise: Callable[..., torch.Tensor], start: int = 0
    ) -> torch.Tensor:
        """Run deterministic DDIM with ``predict_noise(model_input, t)`` from ``x``, the state at
        the ``start``-th of the ``num_inference_steps`` timesteps (0: ``x = x_T``)."""
        self.scheduler.set_timesteps(self.num_inference_steps, device=x.device)
        for t in self.scheduler.timesteps[start:]:
            model_output = predict_noise(self.scheduler.scale_model_input(x, t), t)
            x = self.scheduler.step(model_output, t, x, eta=0.0).prev_sample
        return x

    def _synthesize_batch(self, latents: torch.Tensor, start: int = 0) -> torch.Tensor:
        raise NotImplementedError

    def _images_to_x0(self, images: torch.Tensor) -> torch.Tensor:
        """Images in [0, 1] -> the clean sample x_0 of the diffusion process."""
        raise NotImplementedError

    def _vary_images(
        self, images: torch.Tensor, strength: float, generator: torch.Generator | None
    ) -> torch.Tensor:
        """SDEdit-style variation: noise ``x_0`` to the timestep ``strength`` of the way along the
        sampling schedule (``round(strength * num_inference_steps)`` steps from the end), then
        run the remaining DDIM steps (eta = 0). Strength 1 starts from (almost) pure noise."""
        shape = (self.channels, self.resolution, self.resolution)
        if not isinstance(images, torch.Tensor) or tuple(images.shape[1:]) != shape:
            got = tuple(images.shape) if isinstance(images, torch.Tensor) else type(images)
            raise GeneratorError(
                f"images must have shape (n, {', '.join(map(str, shape))}), got {got}"
            )
        steps = round(strength * self.num_inference_steps)
        images = images.to(device=self.device, dtype=self.dtype)
        if steps == 0 or images.shape[0] == 0:
            return images.float().clone()
        start = self.num_inference_steps - steps
        self.scheduler.set_timesteps(self.num_inference_steps)
        t = self.scheduler.timesteps[start]
        size = self.batch_size or images.shape[0]
        device = generator.device if generator is not None else torch.device("cpu")
        out = []
        for chunk in images.split(size):
            x0 = self._images_to_x0(chunk)
            noise = torch.randn(x0.shape, generator=generator, device=device, dtype=torch.float32)
            noise = noise.to(device=self.device, dtype=self.dtype)
            x_t = self.scheduler.add_noise(x0, noise, t.reshape(1))
            out.append(self._synthesize_batch(x_t, start))
        return torch.cat(out).float().clamp_(0.0, 1.0)

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

    def _synthesize_batch(self, latents: torch.Tensor, start: int = 0) -> torch.Tensor:
        channels = self.channels

        def predict_noise(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
            # UNets with learned variance return [noise, variance]; DDIM uses the noise part only
            return self.unet(x, t).sample[:, :channels]

        x = self._ddim(latents, predict_noise, start)
        return x / 2 + 0.5

    def _images_to_x0(self, images: torch.Tensor) -> torch.Tensor:
        return images * 2 - 1

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
        save_model(self.unet, unet_dir, weights_dtype)
        self.scheduler.save_pretrained(scheduler_dir)
        if layout == "pipeline":
            write_json(
                directory / "model_index.json",
                {
                    "_class_name": "DDIMPipeline",
                    "_diffusers_version": diffusers_version(),
                    "scheduler": ["diffusers", "DDIMScheduler"],
                    "unet": ["diffusers", "UNet2DModel"],
                },
            )
        write_json(directory / GENERATOR_CONFIG_NAME, self._options())
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

    def set_prompt(self, prompt: str, negative_prompt: str | None = None) -> None:
        """Condition on another prompt from now on (a per-class prompt, for example)."""
        if not isinstance(prompt, str) or not isinstance(negative_prompt, str | None):
            raise GeneratorError("prompt and negative_prompt must be strings")
        if negative_prompt is not None:
            self.negative_prompt = negative_prompt
        self.prompt = prompt
        self.prompt_embeds = self._encode(prompt)
        if self._guided:
            self.negative_prompt_embeds = self._encode(self.negative_prompt)

    @torch.no_grad()
    def _images_to_x0(self, images: torch.Tensor) -> torch.Tensor:
        x = self.vae.encode(images * 2 - 1).latent_dist.mean
        if getattr(self.vae.config, "shift_factor", None) is not None:
            x = x - self.vae.config.shift_factor
        return x * self.vae.config.scaling_factor

    def _synthesize_batch(self, latents: torch.Tensor, start: int = 0) -> torch.Tensor:
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

        x = self._ddim(latents, predict_noise, start)
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
        write_json(directory / GENERATOR_CONFIG_NAME, self._options())
        return directory
