"""The one interface every generator backend implements."""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from dataclasses import dataclass

import torch


class GeneratorError(ValueError):
    """A generator could not be loaded or used; the message says what to change."""


@dataclass
class Variation:
    """What :meth:`Generator.vary` returns: the new images and, where the variation happened in
    latent space, the latents that synthesize to them (None after an image-space variation)."""

    images: torch.Tensor
    latents: torch.Tensor | None


def check_strength(strength: float) -> float:
    """A variation strength is a number in [0, 1]: 0 keeps the input, 1 is a fresh sample."""
    if isinstance(strength, bool) or not isinstance(strength, int | float):
        raise GeneratorError(f"strength must be a number in [0, 1], got {strength!r}")
    if not 0.0 <= float(strength) <= 1.0:
        raise GeneratorError(f"strength must be in [0, 1], got {strength!r}")
    return float(strength)


class Generator(ABC):
    """A pre-trained image generator seen as a map from its latent space to images.

    Subclasses set ``latent_shape`` (shape of one latent, without the batch dimension),
    ``resolution`` (image height = width) and ``channels``.
    """

    name: str = "generator"
    # How vary() can perturb a sample; the first is the default. "latent": in the latent space
    # (needs the sample's latents); "image": noise the image and denoise it (needs its images).
    variation_modes: tuple[str, ...] = ("latent",)
    latent_shape: tuple[int, ...]
    resolution: int
    channels: int

    def __init__(self) -> None:
        self.device = torch.device("cpu")
        self.dtype = torch.float32

    @property
    def latent_dim(self) -> int:
        """Number of scalars in one flattened latent."""
        n = 1
        for s in self.latent_shape:
            n *= int(s)
        return n

    @abstractmethod
    def sample_latents(self, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """Draw ``n`` latents from the generator's own latent prior, shape ``(n, *latent_shape)``."""

    @abstractmethod
    def _synthesize(self, latents: torch.Tensor) -> torch.Tensor:
        """Backend-specific synthesis; latents are already validated and placed."""

    def check_latents(self, latents: torch.Tensor) -> torch.Tensor:
        if not isinstance(latents, torch.Tensor):
            raise GeneratorError(
                f"latents must be a torch.Tensor of shape (n, {', '.join(map(str, self.latent_shape))}), "
                f"got {type(latents).__name__}"
            )
        if latents.dim() < 1 or tuple(latents.shape[1:]) != tuple(self.latent_shape):
            raise GeneratorError(
                f"latents have shape {tuple(latents.shape)}; {self.name} expects "
                f"(n, {', '.join(map(str, self.latent_shape))})"
            )
        return latents.to(device=self.device, dtype=self.dtype)

    @torch.no_grad()
    def synthesize(self, latents: torch.Tensor) -> torch.Tensor:
        """Map latents to images: float in [0, 1], shape ``(n, channels, resolution, resolution)``.

        Deterministic: the same latents give the same images.
        """
        latents = self.check_latents(latents)
        images = self._synthesize(latents)
        return images.float().clamp_(0.0, 1.0)

    @torch.no_grad()
    def perturb_latents(
        self, latents: torch.Tensor, strength: float, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        """Variance-preserving perturbation ``sqrt(1 - s^2) * z + s * z'`` with ``z'`` a fresh
        draw from the prior: for a zero-mean Gaussian prior the result has the prior's
        distribution again, whatever ``s``; ``s = 0`` returns ``z``, ``s = 1`` a new sample."""
        s = check_strength(strength)
        latents = self.check_latents(latents)
        fresh = self.sample_latents(latents.shape[0], generator)
        return math.sqrt(1.0 - s * s) * latents + s * fresh

    @torch.no_grad()
    def vary(
        self,
        strength: float,
        *,
        latents: torch.Tensor | None = None,
        images: torch.Tensor | None = None,
        generator: torch.Generator | None = None,
        mode: str | None = None,
    ) -> Variation:
        """Variations of samples: strength 0 keeps them, 1 gives unrelated new samples.

        ``mode`` is one of ``variation_modes`` (default: the first). ``"latent"`` perturbs
        ``latents`` with :meth:`perturb_latents` and synthesizes them; ``"image"`` (diffusion
        backends) noises ``images`` to the strength and denoises them deterministically.
        """
        mode = self.variation_modes[0] if mode is None else mode
        if mode not in self.variation_modes:
            raise GeneratorError(
                f"variation mode {mode!r} is not available for {self.name}; valid modes: "
                f"{', '.join(self.variation_modes)}"
            )
        if mode == "latent":
            if latents is None:
                raise GeneratorError("a latent-space variation needs the samples' latents")
            new = self.perturb_latents(latents, strength, generator)
            return Variation(images=self.synthesize(new), latents=new)
        if images is None:
            raise GeneratorError("an image-space variation needs the samples' images")
        return Variation(
            images=self._vary_images(images, check_strength(strength), generator), latents=None
        )

    def _vary_images(
        self, images: torch.Tensor, strength: float, generator: torch.Generator | None
    ) -> torch.Tensor:
        raise GeneratorError(f"{self.name} has no image-space variation")

    def describe(self) -> dict:
        return {
            "name": self.name,
            "latent_shape": list(self.latent_shape),
            "resolution": self.resolution,
            "channels": self.channels,
            "device": str(self.device),
            "dtype": str(self.dtype).replace("torch.", ""),
        }
