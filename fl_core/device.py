"""Where models run: the one device-resolution rule of fl_core."""

from __future__ import annotations

import torch


class DeviceError(ValueError):
    """A device name that is unknown or not available on this machine."""


def resolve_device(name: str | torch.device | None) -> torch.device:
    """``None`` or ``"cpu"`` -> CPU; ``"auto"`` -> the first CUDA device when one is available,
    else CPU; ``"cuda"`` / ``"cuda:<i>"`` -> that device, which must exist."""
    if name is None:
        return torch.device("cpu")
    if isinstance(name, torch.device):
        name = str(name)
    text = str(name).strip().lower()
    if text == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(text)
    except RuntimeError:
        raise DeviceError(
            f"device {name!r} is not a device name; use cpu, cuda, cuda:<i> or auto"
        ) from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise DeviceError(
                f"device is {name!r} but no CUDA device is available; use device=cpu or device=auto"
            )
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise DeviceError(
                f"device {name!r} does not exist: this machine has {torch.cuda.device_count()} "
                "CUDA device(s)"
            )
    elif device.type != "cpu":
        raise DeviceError(f"device {name!r} is not supported; use cpu, cuda, cuda:<i> or auto")
    return device
