"""The one interface every generator backend implements."""

from __future__ import annotations

from abc import ABC, abstractmethod

import torch


class GeneratorError(ValueError):
    """A generator could not be loaded or used; the message says what to change."""


class Generator(ABC):
    """A pre-trained image generator seen as a map from its latent space to images.

    Subclasses set ``latent_shape`` (shape of one latent, without the batch dimension),
    ``resolution`` (image height = width) and ``channels``.
    """

    name: str = "generator"
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

    def describe(self) -> dict:
        return {
            "name": self.name,
            "latent_shape": list(self.latent_shape),
            "resolution": self.resolution,
            "channels": self.channels,
            "device": str(self.device),
            "dtype": str(self.dtype).replace("torch.", ""),
        }
