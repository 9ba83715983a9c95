"""StyleGAN3 as a :class:`~generators.base.Generator`: latents live in W space."""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any

import torch

from ..base import Generator, GeneratorError, check_strength
from ..device import resolve_device
from .convert import network_from_state, read_converted_dir, read_stylegan3_pickle
from .network import StyleGAN3Network

_DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "float16": torch.float16,
    "fp16": torch.float16,
    "half": torch.float16,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
}


def _resolve_dtype(dtype: torch.dtype | str | None) -> torch.dtype:
    if dtype is None:
        return torch.float32
    if isinstance(dtype, str):
        key = dtype.lower().removeprefix("torch.")
        if key not in _DTYPES:
            raise GeneratorError(f"unknown dtype {dtype!r}; use float32, float16 or bfloat16")
        return _DTYPES[key]
    if dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise GeneratorError(f"unsupported dtype {dtype}; use float32, float16 or bfloat16")
    return dtype


class StyleGAN3Generator(Generator):
    """A StyleGAN3 (T or R) generator whose latents are points of W (shape ``(w_dim,)``).

    ``sample_latents`` draws z ~ N(0, I) with the given ``torch.Generator`` (on CPU unless the
    generator lives elsewhere, so a seed gives the same latents on every device), maps it
    through the mapping network (random classes for conditional models unless ``class_idx``
    is set) and applies truncation ``w_avg + truncation_psi * (w - w_avg)``.  ``synthesize``
    feeds the same w to every layer and maps the output from [-1, 1] to [0, 1].

    ``dtype`` float16/bfloat16 runs the high-resolution layers (those the official networks
    mark for FP16) in that precision; the mapping, the Fourier input and the low-resolution
    layers stay float32, as do latents and images.  ``batch_size`` bounds how many images
    are synthesised at once (results do not depend on it).  ``device`` means what it means for
    every generator; see :func:`generators.device.resolve_device`.
    """

    name = "stylegan3"

    def __init__(
        self,
        network: StyleGAN3Network,
        device: torch.device | str | None = None,
        dtype: torch.dtype | str | None = None,
        truncation_psi: float = 1.0,
        class_idx: int | None = None,
        batch_size: int | None = None,
    ) -> None:
        super().__init__()
        self.device = resolve_device(device)
        self.dtype = torch.float32
        self.compute_dtype = _resolve_dtype(dtype)
        self.network = network.eval().requires_grad_(False).to(self.device)
        self.config = network.config
        self.latent_shape = (network.w_dim,)
        self.resolution = network.img_resolution
        self.channels = network.img_channels
        self.num_ws = network.num_ws
        self.truncation_psi = float(truncation_psi)
        if class_idx is not None:
            if network.c_dim == 0:
                raise GeneratorError("class_idx given but this StyleGAN3 model is unconditional")
            if not 0 <= int(class_idx) < network.c_dim:
                raise GeneratorError(f"class_idx must be in [0, {network.c_dim}), got {class_idx}")
            class_idx = int(class_idx)
        self.class_idx = class_idx
        if batch_size is not None and int(batch_size) < 1:
            raise GeneratorError(f"batch_size must be >= 1, got {batch_size}")
        self.batch_size = None if batch_size is None else int(batch_size)

    @property
    def z_dim(self) -> int:
        return self.network.z_dim

    @property
    def c_dim(self) -> int:
        return self.network.c_dim

    def _labels(
        self, n: int, generator: torch.Generator | None, device: torch.device
    ) -> torch.Tensor | None:
        if self.c_dim == 0:
            return None
        if self.class_idx is not None:
            idx = torch.full([n], self.class_idx, dtype=torch.long)
        else:
            idx = torch.randint(self.c_dim, [n], generator=generator, device=device).cpu()
        return torch.nn.functional.one_hot(idx, self.c_dim).to(self.device, torch.float32)

    @torch.no_grad()
    def z_to_w(self, z: torch.Tensor, c: torch.Tensor | None = None) -> torch.Tensor:
        """Map z ``(n, z_dim)`` (and one-hot labels ``c`` for conditional models) to W with
        this generator's truncation; returns ``(n, w_dim)``."""
        if not isinstance(z, torch.Tensor) or z.ndim != 2 or z.shape[1] != self.z_dim:
            got = tuple(z.shape) if isinstance(z, torch.Tensor) else type(z).__name__
            raise GeneratorError(f"z must have shape (n, {self.z_dim}), got {got}")
        if self.c_dim > 0 and c is None:
            c = self._labels(z.shape[0], None, torch.device("cpu"))
        if c is not None:
            c = c.to(self.device, torch.float32)
        ws = self.network.mapping(
            z.to(self.device, torch.float32), c, truncation_psi=self.truncation_psi
        )
        return ws[:, 0]

    @torch.no_grad()
    def sample_latents(self, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
        if int(n) < 0:
            raise GeneratorError(f"n must be >= 0, got {n}")
        n = int(n)
        device = generator.device if generator is not None else torch.device("cpu")
        z = torch.randn([n, self.z_dim], generator=generator, device=device)
        c = self._labels(n, generator, device)
        return self.z_to_w(z, c)

    @torch.no_grad()
    def perturb_latents(
        self, latents: torch.Tensor, strength: float, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        """A perturbation in W around the average ``w_avg``: ``w_avg + sqrt(1 - s^2) (w - w_avg)
        + s (w' - w_avg)`` with ``w'`` a fresh sample (``s = 0`` keeps ``w``, ``s = 1`` is ``w'``).
        W is not Gaussian, so this keeps the spread around ``w_avg`` only approximately."""
        s = check_strength(strength)
        latents = self.check_latents(latents)
        fresh = self.sample_latents(latents.shape[0], generator)
        w_avg = self.network.mapping.w_avg.to(self.device, torch.float32)
        return w_avg + math.sqrt(1.0 - s * s) * (latents - w_avg) + s * (fresh - w_avg)

    def _synthesize(self, latents: torch.Tensor) -> torch.Tensor:
        n = latents.shape[0]
        step = self.batch_size or max(n, 1)
        out = []
        for start in range(0, n, step):
            w = latents[start : start + step]
            ws = w.unsqueeze(1).expand(-1, self.num_ws, -1)
            img = self.network.synthesis(ws, compute_dtype=self.compute_dtype)
            out.append(img.float().add_(1.0).mul_(0.5))
        if not out:
            return torch.empty(
                [0, self.channels, self.resolution, self.resolution], device=self.device
            )
        return torch.cat(out)

    def describe(self) -> dict[str, Any]:
        info = super().describe()
        info.update(
            architecture=self.config.architecture,
            z_dim=self.z_dim,
            c_dim=self.c_dim,
            num_ws=self.num_ws,
            truncation_psi=self.truncation_psi,
            compute_dtype=str(self.compute_dtype).replace("torch.", ""),
        )
        return info


_OPTIONS = ("truncation_psi", "class_idx", "batch_size")


def load_stylegan3(
    path: str | os.PathLike[str],
    device: torch.device | str | None = None,
    dtype: torch.dtype | str | None = None,
    **options: Any,
) -> StyleGAN3Generator:
    """Load a StyleGAN3 generator from an official network pickle (``.pkl``, read with the
    restricted unpickler and converted in memory) or from a directory written by
    :func:`~generators.stylegan3.convert.convert_stylegan3_pickle`.

    ``options``: ``truncation_psi`` (default 1.0), ``class_idx`` (conditional models) and
    ``batch_size``; see :class:`StyleGAN3Generator`.
    """
    unknown = sorted(set(options) - set(_OPTIONS))
    if unknown:
        raise GeneratorError(
            f"unknown StyleGAN3 option(s): {', '.join(unknown)}; known: {', '.join(_OPTIONS)}"
        )
    p = Path(path).expanduser()
    if not p.exists():
        raise GeneratorError(f"StyleGAN3 weights not found: {p}")
    if p.is_file() and p.name in ("config.json", "model.safetensors"):
        p = p.parent  # a file of a converted directory: load the directory
    if p.is_dir():
        config, state = read_converted_dir(p)
    else:
        config, state = read_stylegan3_pickle(p)
    network = network_from_state(config, state, source=f"weights in {p}")
    return StyleGAN3Generator(network, device=device, dtype=dtype, **options)
