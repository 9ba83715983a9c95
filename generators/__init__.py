"""Pre-trained image generators behind one interface.

    gen = load_generator("builtin:animal-ddim")     # or "diffusers:<dir or hub id>",
                                                    #    "stylegan3:<file.pkl or dir>"
    z = gen.sample_latents(n, torch.Generator().manual_seed(0))
    images = gen.synthesize(z)                      # float in [0, 1], (n, C, H, W)

The libraries a backend needs (diffusers, huggingface_hub, safetensors, the StyleGAN3 package)
are imported only when a generator of that kind is loaded.
"""

from generators.base import Generator, GeneratorError, Variation
from generators.device import resolve_device, resolve_dtype
from generators.images import make_grid, save_image_grid
from generators.loading import GeneratorInfo, list_generators, load_generator, parse_spec

__all__ = [
    "Generator",
    "GeneratorError",
    "GeneratorInfo",
    "list_generators",
    "load_generator",
    "make_grid",
    "parse_spec",
    "resolve_device",
    "resolve_dtype",
    "save_image_grid",
    "Variation",
]
