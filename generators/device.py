"""Where a generator runs: the one meaning of a ``device`` and a ``dtype`` argument.

Every backend and :func:`~generators.loading.load_generator` resolve their arguments here, so
``device="auto"`` means the same thing whichever generator is loaded.
"""

from __future__ import annotations

import torch

from generators.base import GeneratorError

_DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "float": torch.float32,
    "float16": torch.float16,
    "fp16": torch.float16,
    "half": torch.float16,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
}


def resolve_device(device: str | torch.device | None = None) -> torch.device:
    """The device a generator runs on.

    ``None`` -> CPU; ``"auto"`` -> the accelerator accelerate finds (CUDA, then XPU, then MPS),
    else CPU; anything else (``"cpu"``, ``"cuda"``, ``"cuda:1"``, a ``torch.device``) is taken
    as given after checking that it names a device that exists here, with a
    :class:`~generators.base.GeneratorError` saying what to use instead when it does not.
    """
    if device is None:
        return torch.device("cpu")
    if isinstance(device, str) and device.strip().lower() == "auto":
        from accelerate.utils import is_cuda_available, is_mps_available, is_xpu_available

        if is_cuda_available():
            return torch.device("cuda")
        if is_xpu_available():
            return torch.device("xpu")
        if is_mps_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        resolved = torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise GeneratorError(
            f"device {device!r} is not a device name; use 'cpu', 'cuda', 'cuda:<index>', "
            "'mps' or 'auto'"
        ) from exc
    if resolved.type != "cpu":
        from accelerate.utils import is_cuda_available, is_mps_available, is_xpu_available

        available = {
            "cuda": is_cuda_available,
            "xpu": is_xpu_available,
            "mps": is_mps_available,
        }.get(resolved.type)
        if available is not None and not available():
            raise GeneratorError(
                f"device {str(resolved)!r} was requested but no {resolved.type} device is "
                "available here; use device='cpu' or device='auto'"
            )
        if resolved.type == "cuda" and resolved.index is not None:
            count = torch.cuda.device_count()
            if resolved.index >= count:
                raise GeneratorError(
                    f"device {str(resolved)!r} does not exist: this machine has {count} CUDA "
                    f"device(s) (cuda:0 … cuda:{count - 1})"
                )
    return resolved


def resolve_dtype(dtype: str | torch.dtype | None = None) -> torch.dtype:
    """``None`` -> float32; accepts a floating torch dtype or a name such as 'fp16', 'bf16'."""
    if dtype is None:
        return torch.float32
    if isinstance(dtype, torch.dtype):
        if not dtype.is_floating_point:
            raise GeneratorError(f"dtype must be a floating-point type, got {dtype}")
        return dtype
    key = str(dtype).strip().lower().removeprefix("torch.")
    if key not in _DTYPES:
        raise GeneratorError(
            f"dtype {dtype!r} is not supported; use one of {', '.join(sorted(_DTYPES))}"
        )
    return _DTYPES[key]
