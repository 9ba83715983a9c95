"""Low-level operations of the alias-free (StyleGAN3) generator, in plain PyTorch.

Written from the paper "Alias-Free Generative Adversarial Networks" (Karras et al., 2021):

* windowed-sinc low-pass filter design (Kaiser window, separable) and its radially symmetric
  jinc counterpart used by the rotation-equivariant configuration;
* ``upfirdn2d``: upsample by zero insertion, pad or crop, convolve with an FIR filter, and keep
  every ``down``-th sample;
* ``filtered_lrelu``: bias, upsampling filter, leaky ReLU with gain and clamp, downsampling filter;
* ``modulated_conv2d``: style modulation, optional weight demodulation and per-input-channel gain,
  executed as one grouped convolution.

Every operation works on CPU and CUDA for float32 (and float16/bfloat16 where PyTorch supports
the underlying convolutions).
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

Padding = tuple[int, int, int, int]

# --------------------------------------------------------------------------------------------
# Filter design.


def kaiser_attenuation(numtaps: int, width: float) -> float:
    """Stop-band attenuation (dB) of a Kaiser-window FIR filter with ``numtaps`` taps whose
    transition width is ``width`` (a fraction of the Nyquist frequency)."""
    return 2.285 * (numtaps - 1) * math.pi * width + 7.95


def kaiser_beta(attenuation: float) -> float:
    """Kaiser window shape parameter for the requested attenuation (Kaiser's empirical formula)."""
    if attenuation > 50:
        return 0.1102 * (attenuation - 8.7)
    if attenuation > 21:
        return 0.5842 * (attenuation - 21) ** 0.4 + 0.07886 * (attenuation - 21)
    return 0.0


def _kaiser_window(numtaps: int, width: float, fs: float) -> np.ndarray:
    beta = kaiser_beta(kaiser_attenuation(numtaps, width / (fs / 2)))
    return np.kaiser(numtaps, beta)


def lowpass_sinc_filter(numtaps: int, cutoff: float, width: float, fs: float) -> np.ndarray:
    """Separable windowed-sinc low-pass filter (float64), normalised to unit DC gain.

    ``cutoff`` and ``width`` (the full transition band) are in the same units as the sampling
    rate ``fs``.
    """
    nyquist = fs / 2
    c = cutoff / nyquist
    m = np.arange(numtaps, dtype=np.float64) - (numtaps - 1) / 2
    h = c * np.sinc(c * m)
    h = h * _kaiser_window(numtaps, width, fs)
    return h / h.sum()


def bessel_j1(x: np.ndarray, num_points: int = 1024) -> np.ndarray:
    """Bessel function of the first kind of order 1 (float64) from Bessel's integral
    ``J1(x) = 1/(2 pi) * integral_0^{2 pi} cos(t - x sin t) dt``; the trapezoidal rule on this
    periodic integrand converges exponentially, to double precision for ``|x|`` up to a few
    hundred (filter arguments stay below about 100)."""
    x = np.asarray(x, dtype=np.float64)
    t = np.arange(num_points, dtype=np.float64) * (2 * np.pi / num_points)
    return np.cos(t - x[..., None] * np.sin(t)).mean(axis=-1)


def lowpass_jinc_filter(numtaps: int, cutoff: float, width: float, fs: float) -> np.ndarray:
    """Radially symmetric (jinc-based) 2D low-pass filter (float64), normalised to unit DC gain."""
    x = (np.arange(numtaps, dtype=np.float64) - (numtaps - 1) / 2) / fs
    r = np.hypot(*np.meshgrid(x, x))
    # numtaps is even for every filter the network designs, so r is never zero.
    h = bessel_j1(2 * cutoff * np.pi * r) / (np.pi * r)
    window = _kaiser_window(numtaps, width, fs)
    h = h * np.outer(window, window)
    return h / h.sum()


def design_lowpass_filter(
    numtaps: int, cutoff: float, width: float, fs: float, radial: bool = False
) -> torch.Tensor | None:
    """The float32 low-pass filter of one layer; ``None`` stands for the identity (one tap)."""
    if numtaps < 1:
        raise ValueError(f"numtaps must be >= 1, got {numtaps}")
    if numtaps == 1:
        return None
    if radial:
        h = lowpass_jinc_filter(numtaps, cutoff, width, fs)
    else:
        h = lowpass_sinc_filter(numtaps, cutoff, width, fs)
    return torch.as_tensor(h, dtype=torch.float32)


# --------------------------------------------------------------------------------------------
# Resampling.


def _filter_taps(f: torch.Tensor | None) -> tuple[int, int]:
    """(width, height) of a filter; a 1D filter is separable and used along both axes."""
    if f is None:
        return 1, 1
    if f.ndim == 1:
        return int(f.shape[0]), int(f.shape[0])
    if f.ndim == 2:
        return int(f.shape[1]), int(f.shape[0])
    raise ValueError(f"FIR filter must be 1D (separable) or 2D, got shape {tuple(f.shape)}")


def _crop_or_pad(y: torch.Tensor, lo: int, hi: int, axis: int) -> torch.Tensor:
    """Extend (positive) or crop (negative) ``y`` along ``axis`` (3 = width, 2 = height)."""
    if lo < 0 or hi < 0:  # crop by slicing (a view, no copy)
        size = y.shape[axis]
        y = y.narrow(axis, max(-lo, 0), size - max(-lo, 0) - max(-hi, 0))
        lo, hi = max(lo, 0), max(hi, 0)
    if lo == 0 and hi == 0:
        return y
    return F.pad(y, [lo, hi, 0, 0] if axis == 3 else [0, 0, lo, hi])


def _depthwise(f: torch.Tensor, channels: int, shape: tuple[int, int], dtype: torch.dtype):
    """One copy of the filter ``f`` per channel, as a depthwise convolution weight."""
    return f.to(dtype).reshape(1, 1, *shape).expand(channels, 1, *shape).contiguous()


def _upsample_axis(x: torch.Tensor, f: torch.Tensor, up: int, pad: tuple[int, int], axis: int):
    """Zero-insertion upsampling by ``up``, padding by ``pad`` and true convolution with the 1D
    filter ``f`` along one axis (3 = width, 2 = height) of ``[N, C, H, W]``."""
    taps, n, c = int(f.shape[0]), x.shape[axis], x.shape[1]
    shape = (1, taps) if axis == 3 else (taps, 1)
    # The transposed convolution with stride `up` is the full convolution of the zero-inserted
    # signal (without its trailing zeros) with the filter: (n - 1) * up + taps samples, of
    # which the padded result keeps [start, start + out).
    full = (n - 1) * up + taps
    out = n * up + pad[0] + pad[1] - taps + 1
    start = taps - 1 - pad[0]
    lo, hi = -start, out - (full - start)
    crop = max(0, min(-lo, -hi))  # symmetric part of the crop, done by the convolution itself
    y = F.conv_transpose2d(
        x,
        _depthwise(f, c, shape, x.dtype),
        stride=(1, up) if axis == 3 else (up, 1),
        padding=(0, crop) if axis == 3 else (crop, 0),
        groups=c,
    )
    return _crop_or_pad(y, lo + crop, hi + crop, axis)


def upfirdn2d(
    x: torch.Tensor,
    f: torch.Tensor | None,
    up: int = 1,
    down: int = 1,
    padding: Padding = (0, 0, 0, 0),
    gain: float = 1.0,
) -> torch.Tensor:
    """Upsample by ``up`` (zero insertion), pad (negative values crop) by
    ``padding = (x_before, x_after, y_before, y_after)``, convolve with the FIR filter ``f``
    (1D = separable, 2D, or ``None`` for identity) scaled by ``gain``, then keep every
    ``down``-th sample.  Input and output are ``[N, C, H, W]``; each channel is filtered
    independently.
    """
    if x.ndim != 4:
        raise ValueError(f"upfirdn2d expects [N, C, H, W], got shape {tuple(x.shape)}")
    if up < 1 or down < 1:
        raise ValueError(f"up and down must be >= 1, got up={up}, down={down}")
    _, c, h, w = x.shape
    px0, px1, py0, py1 = padding
    fw, fh = _filter_taps(f)
    if w * up + px0 + px1 < fw or h * up + py0 + py1 < fh:
        raise ValueError("upfirdn2d: the padded signal is smaller than the filter")
    if f is None and up == 1:  # identity filter: pad, scale, subsample
        y = F.pad(x, [px0, px1, py0, py1]) if any(padding) else x
        y = y * gain if gain != 1 else y
        return y[:, :, ::down, ::down] if down > 1 else y
    if f is None:
        f = torch.ones([1], dtype=torch.float32, device=x.device)
    f = f.to(device=x.device, dtype=torch.float32)
    if gain != 1:
        f = f * (gain ** (f.ndim / 2))

    if up > 1:
        if f.ndim == 1:
            y = _upsample_axis(x, f, up, (px0, px1), axis=3)
            y = _upsample_axis(y, f, up, (py0, py1), axis=2)
        else:
            full_w, full_h = (w - 1) * up + fw, (h - 1) * up + fh
            sx, sy = fw - 1 - px0, fh - 1 - py0
            y = F.conv_transpose2d(x, _depthwise(f, c, (fh, fw), x.dtype), stride=up, groups=c)
            y = _crop_or_pad(y, -sx, w * up + px0 + px1 - fw + 1 - (full_w - sx), axis=3)
            y = _crop_or_pad(y, -sy, h * up + py0 + py1 - fh + 1 - (full_h - sy), axis=2)
        return y[:, :, ::down, ::down] if down > 1 else y

    # No upsampling: pad, then a strided correlation with the flipped filter.
    y = F.pad(x, [px0, px1, py0, py1]) if any(padding) else x
    if f.ndim == 1:
        k = f.flip(0)
        y = F.conv2d(y, _depthwise(k, c, (1, fw), y.dtype), stride=(1, down), groups=c)
        return F.conv2d(y, _depthwise(k, c, (fh, 1), y.dtype), stride=(down, 1), groups=c)
    k = f.flip([0, 1])
    return F.conv2d(y, _depthwise(k, c, (fh, fw), y.dtype), stride=down, groups=c)


def filtered_lrelu(
    x: torch.Tensor,
    fu: torch.Tensor | None,
    fd: torch.Tensor | None,
    bias: torch.Tensor | None,
    up: int = 1,
    down: int = 1,
    padding: Padding = (0, 0, 0, 0),
    gain: float = math.sqrt(2),
    slope: float = 0.2,
    clamp: float | None = None,
) -> torch.Tensor:
    """Alias-suppressed nonlinearity: add ``bias``, upsample by ``up`` with filter ``fu``
    (``padding`` refers to the upsampled signal), apply leaky ReLU (negative slope ``slope``)
    times ``gain`` and clamp to ``[-clamp, clamp]``, then low-pass with ``fd`` and downsample by
    ``down``."""
    if gain <= 0:
        raise ValueError(f"gain must be positive, got {gain}")
    original = x
    if bias is not None:
        x = x + bias.to(x.dtype).reshape(1, -1, 1, 1)
    # A positive gain commutes with leaky ReLU, so it rides along with the upsampling filter.
    x = upfirdn2d(x, fu, up=up, padding=padding, gain=up**2 * gain)
    # In place when nothing needs the intermediate (inference): the upsampled tensor is the
    # largest one in the network.
    inplace = x is not original and not (torch.is_grad_enabled() and x.requires_grad)
    if slope != 1:
        x = F.leaky_relu(x, slope, inplace=inplace)
    if clamp is not None:
        x = x.clamp_(-clamp, clamp) if inplace else x.clamp(-clamp, clamp)
    return upfirdn2d(x, fd, down=down)


# --------------------------------------------------------------------------------------------
# Modulated convolution.


def modulated_conv2d(
    x: torch.Tensor,
    weight: torch.Tensor,
    styles: torch.Tensor,
    demodulate: bool = True,
    padding: int = 0,
    input_gain: torch.Tensor | None = None,
) -> torch.Tensor:
    """Convolve each sample of ``x`` ``[N, I, H, W]`` with ``weight`` ``[O, I, k, k]`` scaled per
    input channel by its styles ``[N, I]``; with ``demodulate`` every output channel's kernel is
    normalised to unit L2 norm.  ``input_gain`` (scalar, ``[I]`` or ``[N, I]``) scales the input
    channels after demodulation.  The weights are formed in float32 and cast to ``x.dtype``.
    """
    n, in_ch = x.shape[0], x.shape[1]
    out_ch, w_in, kh, kw = weight.shape
    if w_in != in_ch or styles.shape != (n, in_ch):
        raise ValueError(
            f"modulated_conv2d: x {tuple(x.shape)}, weight {tuple(weight.shape)} and "
            f"styles {tuple(styles.shape)} do not agree"
        )
    weight = weight.float()
    styles = styles.float()
    if demodulate:
        # Pre-normalise (helps reduced precision); the demodulation below cancels these
        # scales exactly, so the result does not depend on them (done per sample).
        weight = weight * weight.square().mean(dim=[1, 2, 3], keepdim=True).rsqrt()
        styles = styles * styles.square().mean(dim=1, keepdim=True).rsqrt()
    w = weight.unsqueeze(0) * styles.reshape(n, 1, in_ch, 1, 1)  # [N, O, I, k, k]
    if demodulate:
        d = (w.square().sum(dim=[2, 3, 4]) + 1e-8).rsqrt()  # [N, O]
        w = w * d.reshape(n, out_ch, 1, 1, 1)
    if input_gain is not None:
        g = input_gain.float().expand(n, in_ch)
        w = w * g.reshape(n, 1, in_ch, 1, 1)
    y = F.conv2d(
        x.reshape(1, n * in_ch, x.shape[2], x.shape[3]),
        w.reshape(n * out_ch, in_ch, kh, kw).to(x.dtype),
        padding=padding,
        groups=n,
    )
    return y.reshape(n, out_ch, y.shape[2], y.shape[3])
