"""StyleGAN3 generator network: mapping (z -> w) and alias-free synthesis (w -> image).

Written from the paper "Alias-Free Generative Adversarial Networks" (Karras et al., 2021).  The
module tree, parameter and buffer names and shapes follow the published checkpoints, so that a
converted ``G_ema`` state dict loads with ``load_state_dict(strict=True)``:

``mapping.fc{i}``, ``mapping.embed`` (conditional models), ``mapping.w_avg``,
``synthesis.input`` (``weight``, ``affine``, ``transform``, ``freqs``, ``phases``) and one
``synthesis.L{idx}_{size}_{channels}`` per layer (``weight``, ``bias``, ``affine``,
``magnitude_ema``, ``up_filter``, ``down_filter``), the last one being the ToRGB layer.

Both published configurations are covered: StyleGAN3-T (translation equivariant, 3x3
convolutions) and StyleGAN3-R (rotation equivariant: ``conv_kernel=1``,
``use_radial_filters=True``, twice the channels).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, fields
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .ops import design_lowpass_filter, filtered_lrelu, modulated_conv2d


def _normalize_2nd_moment(x: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    return x * (x.square().mean(dim=1, keepdim=True) + eps).rsqrt()


# --------------------------------------------------------------------------------------------
# Configuration.


@dataclass
class MappingConfig:
    """Options of the mapping network (the official ``mapping_kwargs``)."""

    num_layers: int = 2
    lr_multiplier: float = 0.01
    w_avg_beta: float = 0.998


@dataclass
class SynthesisConfig:
    """Options of the synthesis network and its layers (the official synthesis kwargs)."""

    channel_base: int = 32768
    channel_max: int = 512
    num_layers: int = 14
    num_critical: int = 2
    first_cutoff: float = 2.0
    first_stopband: float = 2**2.1
    last_stopband_rel: float = 2**0.3
    margin_size: int = 10
    output_scale: float = 0.25
    num_fp16_res: int = 4
    conv_kernel: int = 3
    filter_size: int = 6
    lrelu_upsampling: int = 2
    use_radial_filters: bool = False
    conv_clamp: float | None = 256
    magnitude_ema_beta: float = 0.999


@dataclass
class StyleGAN3Config:
    """Complete architecture description of a StyleGAN3 generator (what ``config.json`` holds)."""

    z_dim: int = 512
    c_dim: int = 0
    w_dim: int = 512
    img_resolution: int = 1024
    img_channels: int = 3
    mapping_kwargs: MappingConfig = field(default_factory=MappingConfig)
    synthesis_kwargs: SynthesisConfig = field(default_factory=SynthesisConfig)

    @classmethod
    def from_init_kwargs(cls, kwargs: Mapping[str, Any]) -> StyleGAN3Config:
        """From the keyword arguments the official ``Generator`` was built with (top-level
        ``z_dim``, ``c_dim``, ``w_dim``, ``img_resolution``, ``img_channels``,
        ``mapping_kwargs`` and every synthesis/layer option flat beside them).  Unknown
        options raise ``ValueError`` naming them."""
        kwargs = dict(kwargs)
        top = {f.name for f in fields(cls)} - {"mapping_kwargs", "synthesis_kwargs"}
        missing = sorted(top - set(kwargs))
        if missing:
            raise ValueError(f"missing generator options: {', '.join(missing)}")
        mapping = dict(kwargs.pop("mapping_kwargs", None) or {})
        synthesis = dict(kwargs.pop("synthesis_kwargs", None) or {})
        for name in list(kwargs):
            if name not in top:
                synthesis[name] = kwargs.pop(name)
        return cls(
            **{k: _plain(v) for k, v in kwargs.items()},
            mapping_kwargs=_make(MappingConfig, mapping, "mapping_kwargs"),
            synthesis_kwargs=_make(SynthesisConfig, synthesis, "synthesis options"),
        )

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> StyleGAN3Config:
        """From the nested form written by :meth:`to_dict` (extra keys starting with ``ktl_``
        or ``source`` are ignored)."""
        data = {k: v for k, v in data.items() if not k.startswith(("ktl_", "source"))}
        return cls.from_init_kwargs(data)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @property
    def architecture(self) -> str:
        """``"stylegan3-r"`` for the rotation-equivariant configuration, else ``"stylegan3-t"``."""
        s = self.synthesis_kwargs
        return "stylegan3-r" if s.conv_kernel == 1 and s.use_radial_filters else "stylegan3-t"


def _make(kind: type, values: dict[str, Any], what: str) -> Any:
    known = {f.name for f in fields(kind)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ValueError(
            f"unknown {what}: {', '.join(unknown)} (known: {', '.join(sorted(known))})"
        )
    return kind(**{k: _plain(v) for k, v in values.items()})


def _plain(v: Any) -> Any:
    """NumPy scalars -> Python scalars (JSON-friendly)."""
    if isinstance(v, np.generic):
        return v.item()
    return v


# --------------------------------------------------------------------------------------------
# Layers.


class FullyConnectedLayer(nn.Module):
    """Dense layer with equalised learning rate: the stored weight is scaled by
    ``lr_multiplier / sqrt(in_features)`` and the bias by ``lr_multiplier`` at run time."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        activation: str = "linear",
        lr_multiplier: float = 1.0,
        weight_init: float = 1.0,
        bias_init: float | list[float] = 0.0,
    ) -> None:
        super().__init__()
        if activation not in ("linear", "lrelu"):
            raise ValueError(f"unsupported activation {activation!r}")
        self.in_features = in_features
        self.out_features = out_features
        self.activation = activation
        self.weight = nn.Parameter(
            torch.randn([out_features, in_features]) * (weight_init / lr_multiplier)
        )
        b = np.broadcast_to(np.asarray(bias_init, dtype=np.float32), [out_features]).copy()
        self.bias = nn.Parameter(torch.from_numpy(b) / lr_multiplier)
        self.weight_gain = lr_multiplier / math.sqrt(in_features)
        self.bias_gain = lr_multiplier

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight.to(x.dtype) * self.weight_gain
        b = self.bias.to(x.dtype)
        if self.bias_gain != 1:
            b = b * self.bias_gain
        if self.activation == "linear":
            return torch.addmm(b.unsqueeze(0), x, w.t())
        x = x.matmul(w.t()) + b.unsqueeze(0)
        return F.leaky_relu(x, 0.2) * math.sqrt(2)

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, activation={self.activation}"


class MappingNetwork(nn.Module):
    """z (and optional class label c) -> w, broadcast to ``num_ws`` copies, with truncation
    towards the tracked average ``w_avg``."""

    def __init__(
        self,
        z_dim: int,
        c_dim: int,
        w_dim: int,
        num_ws: int,
        num_layers: int = 2,
        lr_multiplier: float = 0.01,
        w_avg_beta: float = 0.998,
    ) -> None:
        super().__init__()
        self.z_dim = z_dim
        self.c_dim = c_dim
        self.w_dim = w_dim
        self.num_ws = num_ws
        self.num_layers = num_layers
        self.w_avg_beta = w_avg_beta
        self.embed = FullyConnectedLayer(c_dim, w_dim) if c_dim > 0 else None
        features = [z_dim + (w_dim if c_dim > 0 else 0)] + [w_dim] * num_layers
        for idx in range(num_layers):
            layer = FullyConnectedLayer(
                features[idx], features[idx + 1], activation="lrelu", lr_multiplier=lr_multiplier
            )
            setattr(self, f"fc{idx}", layer)
        self.register_buffer("w_avg", torch.zeros([w_dim]))

    def forward(
        self,
        z: torch.Tensor,
        c: torch.Tensor | None = None,
        truncation_psi: float = 1.0,
        truncation_cutoff: int | None = None,
    ) -> torch.Tensor:
        """Returns ``[N, num_ws, w_dim]``."""
        if z.ndim != 2 or z.shape[1] != self.z_dim:
            raise ValueError(f"z must have shape (n, {self.z_dim}), got {tuple(z.shape)}")
        x = _normalize_2nd_moment(z.to(torch.float32))
        if self.embed is not None:
            if c is None or c.shape != (z.shape[0], self.c_dim):
                got = None if c is None else tuple(c.shape)
                raise ValueError(f"c must have shape (n, {self.c_dim}), got {got}")
            y = _normalize_2nd_moment(self.embed(c.to(torch.float32)))
            x = torch.cat([x, y], dim=1)
        for idx in range(self.num_layers):
            x = getattr(self, f"fc{idx}")(x)
        ws = x.unsqueeze(1).repeat([1, self.num_ws, 1])
        if truncation_psi != 1:
            cutoff = self.num_ws if truncation_cutoff is None else truncation_cutoff
            ws[:, :cutoff] = self.w_avg.lerp(ws[:, :cutoff], truncation_psi)
        return ws

    def extra_repr(self) -> str:
        return f"z_dim={self.z_dim}, c_dim={self.c_dim}, w_dim={self.w_dim}, num_ws={self.num_ws}"


class SynthesisInput(nn.Module):
    """Fourier-feature input: sinusoids with fixed frequencies and phases, rotated and
    translated per sample by an affine map of w, then mixed by a learned channel matrix."""

    def __init__(
        self, w_dim: int, channels: int, size: int, sampling_rate: float, bandwidth: float
    ) -> None:
        super().__init__()
        self.w_dim = w_dim
        self.channels = channels
        self.size = int(size)
        self.sampling_rate = float(sampling_rate)
        self.bandwidth = float(bandwidth)
        # Frequencies drawn inside a disc of radius `bandwidth`, phases uniform in [-0.5, 0.5).
        freqs = torch.randn([channels, 2])
        radii = freqs.square().sum(dim=1, keepdim=True).sqrt()
        freqs = freqs / (radii * radii.square().exp().pow(0.25)) * bandwidth
        phases = torch.rand([channels]) - 0.5
        self.weight = nn.Parameter(torch.randn([channels, channels]))
        self.affine = FullyConnectedLayer(w_dim, 4, weight_init=0.0, bias_init=[1.0, 0.0, 0.0, 0.0])
        self.register_buffer("transform", torch.eye(3, 3))  # user inverse transform of the image
        self.register_buffer("freqs", freqs)
        self.register_buffer("phases", phases)

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        n, dev = w.shape[0], w.device
        # Per-sample rotation (unit complex number) and translation from w.
        t = self.affine(w)
        t = t / t[:, :2].norm(dim=1, keepdim=True)
        rot = torch.eye(3, device=dev).unsqueeze(0).repeat([n, 1, 1])
        rot[:, 0, 0] = t[:, 0]
        rot[:, 0, 1] = -t[:, 1]
        rot[:, 1, 0] = t[:, 1]
        rot[:, 1, 1] = t[:, 0]
        shift = torch.eye(3, device=dev).unsqueeze(0).repeat([n, 1, 1])
        shift[:, 0, 2] = -t[:, 2]
        shift[:, 1, 2] = -t[:, 3]
        transforms = rot @ shift @ self.transform.unsqueeze(0)

        freqs = self.freqs.unsqueeze(0)
        phases = self.phases.unsqueeze(0) + (freqs @ transforms[:, :2, 2:]).squeeze(2)
        freqs = freqs @ transforms[:, :2, :2]
        # Fade out frequencies pushed beyond the band by the user transform.
        amplitudes = (
            1 - (freqs.norm(dim=2) - self.bandwidth) / (self.sampling_rate / 2 - self.bandwidth)
        ).clamp(0, 1)

        # Pixel-centre sampling grid covering `size` samples at `sampling_rate`.
        theta = torch.eye(2, 3, device=dev)
        theta[0, 0] = 0.5 * self.size / self.sampling_rate
        theta[1, 1] = 0.5 * self.size / self.sampling_rate
        grid = F.affine_grid(
            theta.unsqueeze(0), [1, 1, self.size, self.size], align_corners=False
        )  # [1, H, W, 2]
        x = (grid.unsqueeze(3) @ freqs.permute(0, 2, 1).unsqueeze(1).unsqueeze(2)).squeeze(3)
        x = x + phases.unsqueeze(1).unsqueeze(2)  # [N, H, W, C]
        x = torch.sin(x * (2 * math.pi)) * amplitudes.unsqueeze(1).unsqueeze(2)
        x = x @ (self.weight / math.sqrt(self.channels)).t()
        return x.permute(0, 3, 1, 2)

    def extra_repr(self) -> str:
        return (
            f"channels={self.channels}, size={self.size}, "
            f"sampling_rate={self.sampling_rate:g}, bandwidth={self.bandwidth:g}"
        )


class SynthesisLayer(nn.Module):
    """Modulated convolution followed by the filtered (alias-suppressed) leaky ReLU; with
    ``is_torgb`` a 1x1 non-demodulated convolution to image channels without activation."""

    up_filter: torch.Tensor | None
    down_filter: torch.Tensor | None

    def __init__(
        self,
        w_dim: int,
        is_torgb: bool,
        is_critically_sampled: bool,
        use_fp16: bool,
        in_channels: int,
        out_channels: int,
        in_size: int,
        out_size: int,
        in_sampling_rate: int,
        out_sampling_rate: int,
        in_cutoff: float,
        out_cutoff: float,
        in_half_width: float,
        out_half_width: float,
        conv_kernel: int = 3,
        filter_size: int = 6,
        lrelu_upsampling: int = 2,
        use_radial_filters: bool = False,
        conv_clamp: float | None = 256,
        magnitude_ema_beta: float = 0.999,
    ) -> None:
        super().__init__()
        self.w_dim = w_dim
        self.is_torgb = is_torgb
        self.is_critically_sampled = is_critically_sampled
        self.use_fp16 = use_fp16
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.in_size = in_size
        self.out_size = out_size
        self.in_sampling_rate = in_sampling_rate
        self.out_sampling_rate = out_sampling_rate
        self.tmp_sampling_rate = max(in_sampling_rate, out_sampling_rate) * (
            1 if is_torgb else lrelu_upsampling
        )
        self.in_cutoff = float(in_cutoff)
        self.out_cutoff = float(out_cutoff)
        self.in_half_width = float(in_half_width)
        self.out_half_width = float(out_half_width)
        self.conv_kernel = 1 if is_torgb else conv_kernel
        self.conv_clamp = conv_clamp
        self.magnitude_ema_beta = magnitude_ema_beta

        self.affine = FullyConnectedLayer(w_dim, in_channels, bias_init=1.0)
        k = self.conv_kernel
        self.weight = nn.Parameter(torch.randn([out_channels, in_channels, k, k]))
        self.bias = nn.Parameter(torch.zeros([out_channels]))
        self.register_buffer("magnitude_ema", torch.ones([]))

        # Upsampling filter: interpolate to the temporary (higher) rate with the input cutoff.
        self.up_factor = int(round(self.tmp_sampling_rate / in_sampling_rate))
        if in_sampling_rate * self.up_factor != self.tmp_sampling_rate:
            raise ValueError("temporary sampling rate must be a multiple of the input rate")
        self.up_taps = filter_size * self.up_factor if self.up_factor > 1 and not is_torgb else 1
        self.register_buffer(
            "up_filter",
            design_lowpass_filter(
                self.up_taps, self.in_cutoff, self.in_half_width * 2, self.tmp_sampling_rate
            ),
        )
        # Downsampling filter: band-limit to the output cutoff (radial for -R, except in the
        # critically sampled layers).
        self.down_factor = int(round(self.tmp_sampling_rate / out_sampling_rate))
        if out_sampling_rate * self.down_factor != self.tmp_sampling_rate:
            raise ValueError("temporary sampling rate must be a multiple of the output rate")
        self.down_taps = (
            filter_size * self.down_factor if self.down_factor > 1 and not is_torgb else 1
        )
        self.down_radial = use_radial_filters and not is_critically_sampled
        self.register_buffer(
            "down_filter",
            design_lowpass_filter(
                self.down_taps,
                self.out_cutoff,
                self.out_half_width * 2,
                self.tmp_sampling_rate,
                radial=self.down_radial,
            ),
        )

        # Padding (w.r.t. the upsampled signal) so that the output has `out_size` samples,
        # placed by the symmetric (pixel-centre) interpretation of sample locations.
        needed = (out_size - 1) * self.down_factor + 1 + (self.up_taps - 1) + (self.down_taps - 1)
        have = (in_size + self.conv_kernel - 1) * self.up_factor
        before = (needed - have + self.up_factor) // 2
        after = needed - have - before
        self.padding = (int(before), int(after), int(before), int(after))

    def forward(
        self, x: torch.Tensor, w: torch.Tensor, compute_dtype: torch.dtype = torch.float32
    ) -> torch.Tensor:
        """``compute_dtype`` is used for the convolution and activation when this layer is
        flagged ``use_fp16``; float32 otherwise."""
        input_gain = self.magnitude_ema.rsqrt()
        styles = self.affine(w)
        if self.is_torgb:
            styles = styles * (1 / math.sqrt(self.in_channels * self.conv_kernel**2))
        dtype = compute_dtype if self.use_fp16 else torch.float32
        x = modulated_conv2d(
            x.to(dtype),
            self.weight,
            styles,
            demodulate=not self.is_torgb,
            padding=self.conv_kernel - 1,
            input_gain=input_gain,
        )
        return filtered_lrelu(
            x,
            self.up_filter,
            self.down_filter,
            self.bias,
            up=self.up_factor,
            down=self.down_factor,
            padding=self.padding,
            gain=1.0 if self.is_torgb else math.sqrt(2),
            slope=1.0 if self.is_torgb else 0.2,
            clamp=self.conv_clamp,
        )

    def extra_repr(self) -> str:
        return (
            f"torgb={self.is_torgb}, critical={self.is_critically_sampled}, "
            f"channels={self.in_channels}->{self.out_channels}, "
            f"size={self.in_size}->{self.out_size}, "
            f"rate={self.in_sampling_rate}->{self.out_sampling_rate} (x{self.up_factor}/"
            f"{self.down_factor}), cutoff={self.in_cutoff:g}->{self.out_cutoff:g}"
        )


@dataclass(frozen=True)
class LayerSpec:
    """Schedule entry of one synthesis layer (index 0 = the Fourier input)."""

    cutoff: float
    stopband: float
    sampling_rate: float
    half_width: float
    size: int
    channels: int


def layer_schedule(img_resolution: int, img_channels: int, cfg: SynthesisConfig) -> list[LayerSpec]:
    """Per-layer cutoffs, minimum stopbands, sampling rates, transition half-widths, sizes and
    channel counts (``num_layers + 1`` entries; the last is the ToRGB layer).

    Cutoffs and stopbands follow geometric progressions from the first layer to the last
    non-critical one, then stay at the image's Nyquist rate (stopband ``last_stopband_rel``
    above it) for the ``num_critical`` critically sampled layers.
    """
    n = cfg.num_layers
    last_cutoff = img_resolution / 2
    last_stopband = last_cutoff * cfg.last_stopband_rel
    exponents = np.minimum(np.arange(n + 1) / (n - cfg.num_critical), 1)
    cutoffs = cfg.first_cutoff * (last_cutoff / cfg.first_cutoff) ** exponents
    stopbands = cfg.first_stopband * (last_stopband / cfg.first_stopband) ** exponents
    sampling_rates = np.exp2(np.ceil(np.log2(np.minimum(stopbands * 2, img_resolution))))
    half_widths = np.maximum(stopbands, sampling_rates / 2) - cutoffs
    sizes = sampling_rates + cfg.margin_size * 2
    sizes[-2:] = img_resolution
    channels = np.rint(np.minimum((cfg.channel_base / 2) / cutoffs, cfg.channel_max))
    channels[-1] = img_channels
    return [
        LayerSpec(
            cutoff=float(cutoffs[i]),
            stopband=float(stopbands[i]),
            sampling_rate=float(sampling_rates[i]),
            half_width=float(half_widths[i]),
            size=int(sizes[i]),
            channels=int(channels[i]),
        )
        for i in range(n + 1)
    ]


class SynthesisNetwork(nn.Module):
    """w (one per layer: ``num_layers + 2``) -> image ``[N, img_channels, R, R]``."""

    def __init__(self, w_dim: int, img_resolution: int, img_channels: int, cfg: SynthesisConfig):
        super().__init__()
        self.w_dim = w_dim
        self.num_ws = cfg.num_layers + 2
        self.img_resolution = img_resolution
        self.img_channels = img_channels
        self.num_layers = cfg.num_layers
        self.output_scale = cfg.output_scale
        specs = layer_schedule(img_resolution, img_channels, cfg)
        self.input = SynthesisInput(
            w_dim=w_dim,
            channels=specs[0].channels,
            size=specs[0].size,
            sampling_rate=specs[0].sampling_rate,
            bandwidth=specs[0].cutoff,
        )
        self.layer_names: list[str] = []
        for idx in range(cfg.num_layers + 1):
            prev, cur = specs[max(idx - 1, 0)], specs[idx]
            layer = SynthesisLayer(
                w_dim=w_dim,
                is_torgb=idx == cfg.num_layers,
                is_critically_sampled=idx >= cfg.num_layers - cfg.num_critical,
                use_fp16=cur.sampling_rate * 2**cfg.num_fp16_res > img_resolution,
                in_channels=prev.channels,
                out_channels=cur.channels,
                in_size=prev.size,
                out_size=cur.size,
                in_sampling_rate=int(prev.sampling_rate),
                out_sampling_rate=int(cur.sampling_rate),
                in_cutoff=prev.cutoff,
                out_cutoff=cur.cutoff,
                in_half_width=prev.half_width,
                out_half_width=cur.half_width,
                conv_kernel=cfg.conv_kernel,
                filter_size=cfg.filter_size,
                lrelu_upsampling=cfg.lrelu_upsampling,
                use_radial_filters=cfg.use_radial_filters,
                conv_clamp=cfg.conv_clamp,
                magnitude_ema_beta=cfg.magnitude_ema_beta,
            )
            name = f"L{idx}_{cur.size}_{cur.channels}"
            setattr(self, name, layer)
            self.layer_names.append(name)

    def forward(self, ws: torch.Tensor, compute_dtype: torch.dtype = torch.float32) -> torch.Tensor:
        if ws.ndim != 3 or ws.shape[1:] != (self.num_ws, self.w_dim):
            raise ValueError(
                f"ws must have shape (n, {self.num_ws}, {self.w_dim}), got {tuple(ws.shape)}"
            )
        w_list = ws.to(torch.float32).unbind(dim=1)
        x = self.input(w_list[0])
        for name, w in zip(self.layer_names, w_list[1:], strict=True):
            x = getattr(self, name)(x, w, compute_dtype=compute_dtype)
        if self.output_scale != 1:
            x = x * self.output_scale
        return x.to(torch.float32)


class StyleGAN3Network(nn.Module):
    """The whole generator (``G_ema`` of a checkpoint): ``synthesis`` and ``mapping``."""

    def __init__(self, config: StyleGAN3Config) -> None:
        super().__init__()
        self.config = config
        self.z_dim = config.z_dim
        self.c_dim = config.c_dim
        self.w_dim = config.w_dim
        self.img_resolution = config.img_resolution
        self.img_channels = config.img_channels
        self.synthesis = SynthesisNetwork(
            config.w_dim, config.img_resolution, config.img_channels, config.synthesis_kwargs
        )
        self.num_ws = self.synthesis.num_ws
        m = config.mapping_kwargs
        self.mapping = MappingNetwork(
            config.z_dim,
            config.c_dim,
            config.w_dim,
            self.num_ws,
            num_layers=m.num_layers,
            lr_multiplier=m.lr_multiplier,
            w_avg_beta=m.w_avg_beta,
        )

    def forward(
        self,
        z: torch.Tensor,
        c: torch.Tensor | None = None,
        truncation_psi: float = 1.0,
        truncation_cutoff: int | None = None,
        compute_dtype: torch.dtype = torch.float32,
    ) -> torch.Tensor:
        """Image in roughly ``[-1, 1]``, shape ``[N, img_channels, R, R]``."""
        ws = self.mapping(z, c, truncation_psi=truncation_psi, truncation_cutoff=truncation_cutoff)
        return self.synthesis(ws, compute_dtype=compute_dtype)
