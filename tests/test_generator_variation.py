"""The variation step every generator gains (`Generator.vary`): image-space noising and DDIM
denoising for diffusion backends, a variance-preserving latent perturbation for Gaussian
latents, a perturbation in W for StyleGAN3."""

from __future__ import annotations

import math
import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

from generators import GeneratorError, load_generator  # noqa: E402
from generators.testing import build_pixel_pipeline, build_stable_diffusion_pipeline  # noqa: E402


@pytest.fixture(scope="module")
def builtin():
    return load_generator("builtin", num_inference_steps=4)


@pytest.fixture(scope="module")
def images(builtin) -> torch.Tensor:
    return builtin.synthesize(builtin.sample_latents(6, torch.Generator().manual_seed(0)))


def test_image_variation_strength_zero_keeps_and_grows_with_strength(builtin, images) -> None:
    kept = builtin.vary(0.0, images=images, generator=torch.Generator().manual_seed(1))
    assert torch.equal(kept.images, images) and kept.latents is None
    distances = []
    for s in (0.25, 0.5, 1.0):
        out = builtin.vary(s, images=images, generator=torch.Generator().manual_seed(1)).images
        assert out.shape == images.shape and 0 <= out.min() and out.max() <= 1
        distances.append(float((out - images).abs().mean()))
    assert distances[0] < distances[1] < distances[2], distances
    assert distances[0] > 0


def test_image_variation_is_deterministic_under_a_seed(builtin, images) -> None:
    a = builtin.vary(0.5, images=images, generator=torch.Generator().manual_seed(3)).images
    b = builtin.vary(0.5, images=images, generator=torch.Generator().manual_seed(3)).images
    c = builtin.vary(0.5, images=images, generator=torch.Generator().manual_seed(4)).images
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_image_variation_matches_noising_then_ddim_by_hand(builtin, images) -> None:
    """Strength 0.5 of 4 steps: noise x_0 to the 3rd timestep, then 2 DDIM steps (eta 0, x_0
    clipped to [-1, 1], the predicted noise kept as predicted, as diffusers' DDIM does)."""
    from diffusers import DDIMScheduler

    out = builtin.vary(0.5, images=images, generator=torch.Generator().manual_seed(5)).images
    sched = DDIMScheduler.from_config(builtin.scheduler.config)
    sched.set_timesteps(4)
    timesteps = sched.timesteps[2:]
    noise = torch.randn(images.shape, generator=torch.Generator().manual_seed(5))
    abar = sched.alphas_cumprod
    t0 = int(timesteps[0])
    x = abar[t0].sqrt() * (images * 2 - 1) + (1 - abar[t0]).sqrt() * noise
    with torch.no_grad():
        for i, t in enumerate(timesteps.tolist()):
            eps = builtin.unet(x, t).sample
            x0 = ((x - (1 - abar[t]).sqrt() * eps) / abar[t].sqrt()).clamp(-1, 1)
            prev = abar[timesteps[i + 1]] if i + 1 < len(timesteps) else torch.tensor(1.0)
            x = prev.sqrt() * x0 + (1 - prev).sqrt() * eps
    assert torch.allclose(out, (x / 2 + 0.5).clamp(0, 1), atol=1e-4)


def test_latent_variation_is_variance_preserving(builtin) -> None:
    z = builtin.sample_latents(400, torch.Generator().manual_seed(0))
    s = 0.6
    new = builtin.perturb_latents(z, s, torch.Generator().manual_seed(1))
    assert abs(float(new.std()) - float(z.std())) < 0.02
    corr = float((z * new).mean() / (z.std() * new.std()))
    assert abs(corr - math.sqrt(1 - s * s)) < 0.02
    assert torch.equal(builtin.perturb_latents(z, 0.0, torch.Generator()), z)
    v = builtin.vary(0.3, latents=z[:2], generator=torch.Generator().manual_seed(2), mode="latent")
    assert v.latents is not None and torch.allclose(v.images, builtin.synthesize(v.latents))


def test_bad_strength_mode_and_missing_input(builtin, images) -> None:
    for bad in (-0.1, 1.5, "half", True):
        with pytest.raises(GeneratorError, match="strength"):
            builtin.vary(bad, images=images)
    with pytest.raises(GeneratorError, match="valid modes: image, latent"):
        builtin.vary(0.5, images=images, mode="w")
    with pytest.raises(GeneratorError, match="latents"):
        builtin.vary(0.5, images=images, mode="latent")
    with pytest.raises(GeneratorError, match="shape"):
        builtin.vary(0.5, images=images[:, :, :10])


def test_pixel_pipeline_and_stable_diffusion_vary(tmp_path: Path) -> None:
    pixel = load_generator(
        f"diffusers:{build_pixel_pipeline(tmp_path / 'pixel')}", num_inference_steps=3
    )
    x = pixel.synthesize(pixel.sample_latents(2, torch.Generator().manual_seed(0)))
    assert pixel.vary(1.0, images=x, generator=torch.Generator()).images.shape == x.shape
    sd = load_generator(
        f"diffusers:{build_stable_diffusion_pipeline(tmp_path / 'sd')}", num_inference_steps=3
    )
    y = sd.synthesize(sd.sample_latents(2, torch.Generator().manual_seed(0)))
    a = sd.vary(0.7, images=y, generator=torch.Generator().manual_seed(1)).images
    assert a.shape == y.shape
    sd.set_prompt("a zebra")
    b = sd.vary(0.7, images=y, generator=torch.Generator().manual_seed(1)).images
    assert not torch.allclose(a, b)  # the prompt conditions the denoising


def test_stylegan3_w_perturbation() -> None:
    from test_stylegan3 import TINY_KWARGS, _make_network

    from generators.stylegan3 import StyleGAN3Generator

    gen = StyleGAN3Generator(_make_network(TINY_KWARGS))
    w = gen.sample_latents(3, torch.Generator().manual_seed(0))
    assert gen.variation_modes == ("latent",)
    assert torch.allclose(gen.perturb_latents(w, 0.0, torch.Generator()), w)
    fresh = gen.sample_latents(3, torch.Generator().manual_seed(7))
    assert torch.allclose(gen.perturb_latents(w, 1.0, torch.Generator().manual_seed(7)), fresh)
    avg = gen.network.mapping.w_avg
    half = gen.perturb_latents(w, 0.5, torch.Generator().manual_seed(7))
    assert torch.allclose(half, avg + math.sqrt(0.75) * (w - avg) + 0.5 * (fresh - avg), atol=1e-5)
    v = gen.vary(0.5, latents=w, generator=torch.Generator().manual_seed(7))
    assert v.images.shape == (3, 3, 32, 32) and torch.allclose(v.latents, half, atol=1e-5)
