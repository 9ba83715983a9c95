"""Test utilities: randomly initialised diffusers pipelines, saved the way real checkpoints are.

Tests and benchmarks build these to exercise exactly the ``diffusers:<dir>`` loading path without
any download. Weights are random: images are noise-like, shapes and code paths are real.
"""

from __future__ import annotations

import json
import string
from pathlib import Path

import torch


def write_char_tokenizer(directory: Path) -> Path:
    """A CLIP BPE vocabulary of single characters (no merges): enough to tokenise prompts."""
    directory.mkdir(parents=True, exist_ok=True)
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for suffix in ("", "</w>"):
        for letter in string.ascii_lowercase:
            vocab[letter + suffix] = len(vocab)
    (directory / "vocab.json").write_text(json.dumps(vocab), encoding="utf-8")
    (directory / "merges.txt").write_text("#version: 0.2\n", encoding="utf-8")
    return directory


def build_pixel_pipeline(
    directory: Path,
    *,
    channels: int = 3,
    image_size: int = 16,
    block_out_channels: tuple[int, ...] = (8, 16),
    layers_per_block: int = 1,
    norm_num_groups: int = 4,
    kind: str = "ddpm",
    seed: int = 0,
) -> Path:
    """An unconditional UNet2DModel pipeline (DDPM or DDIM) saved with ``save_pretrained``."""
    from diffusers import DDIMPipeline, DDIMScheduler, DDPMPipeline, DDPMScheduler, UNet2DModel

    levels = len(block_out_channels)
    # attention in the coarsest level only, as small pixel-diffusion UNets do
    down = ("DownBlock2D",) * (levels - 1) + ("AttnDownBlock2D",)
    up = ("AttnUpBlock2D",) + ("UpBlock2D",) * (levels - 1)
    torch.manual_seed(seed)
    unet = UNet2DModel(
        sample_size=image_size,
        in_channels=channels,
        out_channels=channels,
        layers_per_block=layers_per_block,
        block_out_channels=block_out_channels,
        down_block_types=down,
        up_block_types=up,
        norm_num_groups=norm_num_groups,
        attention_head_dim=8,
    )
    if kind == "ddim":
        DDIMPipeline(unet=unet, scheduler=DDIMScheduler()).save_pretrained(directory)
    else:
        scheduler = DDPMScheduler(num_train_timesteps=1000, beta_schedule="linear")
        DDPMPipeline(unet=unet, scheduler=scheduler).save_pretrained(directory)
    return directory


def build_stable_diffusion_pipeline(
    directory: Path,
    *,
    image_size: int = 16,
    text_width: int = 16,
    text_layers: int = 1,
    max_tokens: int = 12,
    unet_channels: tuple[int, int] = (8, 16),
    vae_channels: tuple[int, ...] = (8, 16),
    norm_num_groups: int = 4,
    seed: int = 0,
) -> Path:
    """A StableDiffusionPipeline (CLIP text encoder, conditional UNet, VAE, PNDM scheduler as
    SD v1.5 ships) with latents of 4 x (image_size / 2^(len(vae_channels)-1))²."""
    from diffusers import (
        AutoencoderKL,
        PNDMScheduler,
        StableDiffusionPipeline,
        UNet2DConditionModel,
    )
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    directory = Path(directory)
    tok_dir = write_char_tokenizer(directory.parent / f"{directory.name}-tokenizer-source")
    tokenizer = CLIPTokenizer.from_pretrained(tok_dir, model_max_length=max_tokens)
    torch.manual_seed(seed)
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=len(tokenizer),
            hidden_size=text_width,
            intermediate_size=2 * text_width,
            num_hidden_layers=text_layers,
            num_attention_heads=max(1, text_width // 8),
            max_position_embeddings=max_tokens,
            bos_token_id=0,
            eos_token_id=1,
            pad_token_id=1,
        )
    )
    latent_size = image_size // 2 ** (len(vae_channels) - 1)
    unet = UNet2DConditionModel(
        sample_size=latent_size,
        in_channels=4,
        out_channels=4,
        layers_per_block=1,
        block_out_channels=unet_channels,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=text_width,
        attention_head_dim=max(1, text_width // 4),
        norm_num_groups=norm_num_groups,
    )
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * len(vae_channels),
        up_block_types=("UpDecoderBlock2D",) * len(vae_channels),
        block_out_channels=vae_channels,
        latent_channels=4,
        norm_num_groups=norm_num_groups,
        sample_size=image_size,
    )
    scheduler = PNDMScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        skip_prk_steps=True,
        steps_offset=1,
    )
    StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    ).save_pretrained(directory)
    return directory
