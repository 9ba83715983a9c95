"""StyleGAN3 backend: our own network definition (T and R configurations), a safe converter
for official network pickles, and the :class:`StyleGAN3Generator` that exposes W space."""

from .convert import (
    RestrictedUnpickler,
    convert_stylegan3_pickle,
    network_from_state,
    read_converted_dir,
    read_stylegan3_pickle,
)
from .generator import StyleGAN3Generator, load_stylegan3
from .network import (
    MappingConfig,
    StyleGAN3Config,
    StyleGAN3Network,
    SynthesisConfig,
    layer_schedule,
)

__all__ = [
    "MappingConfig",
    "RestrictedUnpickler",
    "StyleGAN3Config",
    "StyleGAN3Generator",
    "StyleGAN3Network",
    "SynthesisConfig",
    "convert_stylegan3_pickle",
    "layer_schedule",
    "load_stylegan3",
    "network_from_state",
    "read_converted_dir",
    "read_stylegan3_pickle",
]
