"""Embeddings the selection mechanisms measure distances in: a spec string names one.

* ``denoiser`` / ``denoiser:<t>`` (the offline default for pixel-diffusion generators, such as
  the builtin one) — the generator's own denoising UNet as a feature extractor: the image is
  noised to timestep ``t`` (default 100) with a fixed noise draw, passed through the UNet's
  down blocks and mid block, and the mid-block activations are averaged over space. No extra
  weights, no download; the features know what the generator was trained on (and little else).
* ``pixels`` / ``pixels:<side>`` (the fallback for other generators) — the image itself, area-resized to
  ``side x side`` (default 16) and flattened: no weights, no download, but distances are about
  pixel overlap, not content (a shifted copy of the same animal is far away).
* ``torchvision:<arch>`` — an ImageNet-style torchvision backbone (resnet18, resnet50, …) with
  its classifier removed; ``weights`` (config ``embedding.weights``) is a local state-dict file
  (.pt/.pth/.safetensors). Without weights the backbone is randomly initialised, which is
  refused: a random network's features are not a meaningful embedding.
* ``clip:<directory or hub id>`` — CLIP image embeddings through transformers
  (``CLIPVisionModelWithProjection``); a hub id needs the Hugging Face cache offline.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


class EmbeddingError(ValueError):
    """An embedding spec or its weights cannot be used; says what would be valid."""


class Embedding:
    """Maps images (float [0, 1], (N, C, H, W)) to feature vectors (N, D), batch by batch."""

    name = "embedding"
    batch_size = 256

    def _embed(self, images: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    @torch.no_grad()
    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        if images.shape[0] == 0:
            return torch.zeros(0, 1)
        return torch.cat([self._embed(c).float().flatten(1) for c in images.split(self.batch_size)])

    def describe(self) -> dict:
        return {"name": self.name}


class PixelEmbedding(Embedding):
    def __init__(self, side: int = 16) -> None:
        if side < 1:
            raise EmbeddingError(f"pixels:<side> needs a positive side, got {side}")
        self.side = side
        self.name = f"pixels:{side}"

    def _embed(self, images: torch.Tensor) -> torch.Tensor:
        if images.shape[-1] != self.side:
            images = F.interpolate(images.float(), size=(self.side, self.side), mode="area")
        return images

    def describe(self) -> dict:
        return {"name": self.name, "kind": "raw pixels", "dimensions": None}


def _to_rgb(images: torch.Tensor, size: int, mean, std) -> torch.Tensor:
    x = images.float()
    if x.shape[1] == 1:
        x = x.expand(-1, 3, -1, -1)
    x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
    m = torch.tensor(mean).view(1, 3, 1, 1)
    s = torch.tensor(std).view(1, 3, 1, 1)
    return (x - m) / s


class TorchvisionEmbedding(Embedding):
    def __init__(self, arch: str, weights: str | None, image_size: int = 224) -> None:
        import torchvision

        if arch not in torchvision.models.list_models(module=torchvision.models):
            raise EmbeddingError(
                f"unknown torchvision architecture {arch!r}; e.g. resnet18, resnet50, "
                "efficientnet_b0 (torchvision.models.list_models())"
            )
        if weights is None:
            raise EmbeddingError(
                f"embedding torchvision:{arch} needs embedding.weights, a local state-dict file "
                "(.pt/.pth/.safetensors) of pre-trained weights; nothing is downloaded. Without "
                "one, use the offline default embedding 'pixels'."
            )
        path = Path(weights).expanduser()
        if not path.is_file():
            raise EmbeddingError(f"embedding.weights: {path} is not a file")
        model = torchvision.models.get_model(arch, weights=None)
        try:
            if path.suffix == ".safetensors":
                from safetensors.torch import load_file

                state = load_file(str(path))
            else:
                state = torch.load(path, map_location="cpu", weights_only=True)
            model.load_state_dict(state)
        except Exception as exc:  # wrong file, wrong architecture, truncated download
            raise EmbeddingError(
                f"embedding.weights: cannot load {path} into {arch}: {exc}"
            ) from None
        for attr in ("fc", "classifier", "heads", "head"):
            if hasattr(model, attr):
                setattr(model, attr, torch.nn.Identity())
                break
        self.model = model.eval().requires_grad_(False)
        self.image_size = image_size
        self.name = f"torchvision:{arch}"
        self.weights = str(path)

    def _embed(self, images: torch.Tensor) -> torch.Tensor:
        return self.model(_to_rgb(images, self.image_size, IMAGENET_MEAN, IMAGENET_STD))

    def describe(self) -> dict:
        return {"name": self.name, "weights": self.weights, "image_size": self.image_size}


class ClipEmbedding(Embedding):
    def __init__(self, source: str) -> None:
        from transformers import CLIPVisionModelWithProjection

        try:
            self.model = CLIPVisionModelWithProjection.from_pretrained(source).eval()
        except Exception as exc:  # missing folder, not cached offline, not a CLIP model
            raise EmbeddingError(
                f"embedding clip:{source} cannot be loaded ({type(exc).__name__}: "
                f"{str(exc).splitlines()[0] if str(exc) else ''}); give a local folder with a "
                "CLIP model (config.json + weights) or a hub id already in the Hugging Face cache"
            ) from None
        self.model.requires_grad_(False)
        self.image_size = int(self.model.config.image_size)
        self.name = f"clip:{source}"

    def _embed(self, images: torch.Tensor) -> torch.Tensor:
        x = _to_rgb(images, self.image_size, CLIP_MEAN, CLIP_STD)
        return self.model(pixel_values=x).image_embeds

    def describe(self) -> dict:
        return {"name": self.name, "image_size": self.image_size}


class DenoiserEmbedding(Embedding):
    """Mid-block features of a pixel-diffusion generator's UNet at timestep ``t``."""

    batch_size = 128

    def __init__(self, generator, t: int = 100, seed: int = 0) -> None:
        unet = getattr(generator, "unet", None)
        if (
            unet is None
            or not hasattr(unet, "mid_block")
            or not hasattr(unet, "time_proj")
            or getattr(generator, "vae", None) is not None
        ):
            raise EmbeddingError(
                f"embedding 'denoiser' needs a pixel-space diffusion generator (a UNet2DModel, "
                f"like the builtin one); {getattr(generator, 'name', generator)} is not one. "
                "Use pixels, torchvision:<arch> or clip:<dir>"
            )
        train_steps = int(generator.scheduler.config.num_train_timesteps)
        if not 0 <= t < train_steps:
            raise EmbeddingError(f"denoiser:<t> needs 0 <= t < {train_steps}, got {t}")
        self.unet = unet
        self.t = t
        self.alpha = float(generator.scheduler.alphas_cumprod[t])
        self.seed = seed
        self.name = f"denoiser:{t}"
        self.generator_name = generator.name

    def _embed(self, images: torch.Tensor) -> torch.Tensor:
        unet = self.unet
        x0 = images.to(device=unet.device, dtype=unet.dtype) * 2 - 1
        # one fixed noise image for every input, so that the embedding is a function
        g = torch.Generator().manual_seed(self.seed)
        noise = torch.randn(x0.shape[1:], generator=g).to(x0)
        x = self.alpha**0.5 * x0 + (1 - self.alpha) ** 0.5 * noise
        t = torch.full((x.shape[0],), self.t, device=x.device, dtype=torch.long)
        emb = unet.time_embedding(unet.time_proj(t).to(dtype=x.dtype))
        h = unet.conv_in(x)
        for block in unet.down_blocks:
            h, _ = block(hidden_states=h, temb=emb)
        h = unet.mid_block(h, emb)
        return h.float().mean(dim=(2, 3))

    def describe(self) -> dict:
        return {
            "name": self.name,
            "kind": "mid-block features of the generator's UNet",
            "generator": self.generator_name,
        }


def load_embedding(spec: str | None, weights: str | None = None, generator=None) -> Embedding:
    """An :class:`Embedding` from a spec (see the module docstring); None -> ``denoiser`` for a
    pixel-diffusion ``generator``, else ``pixels``."""
    if spec is None or not str(spec).strip():
        pixel_diffusion = hasattr(generator, "unet") and getattr(generator, "vae", None) is None
        spec = "denoiser" if pixel_diffusion else "pixels"
    spec = str(spec).strip()
    kind, _, target = spec.partition(":")
    if kind == "denoiser":
        if generator is None:
            raise EmbeddingError("embedding 'denoiser' needs the generator")
        try:
            t = int(target) if target else 100
        except ValueError:
            raise EmbeddingError(f"embedding {spec!r}: the timestep must be an integer") from None
        return DenoiserEmbedding(generator, t)
    if kind == "pixels":
        try:
            side = int(target) if target else 16
        except ValueError:
            raise EmbeddingError(f"embedding {spec!r}: the side must be an integer") from None
        return PixelEmbedding(side)
    if kind == "torchvision" and target:
        return TorchvisionEmbedding(target, weights)
    if kind == "clip" and target:
        return ClipEmbedding(target)
    raise EmbeddingError(
        f"unknown embedding {spec!r}; valid: denoiser, denoiser:<t>, pixels, pixels:<side>, torchvision:<arch> (with "
        "embedding.weights), clip:<directory or hub id>"
    )
