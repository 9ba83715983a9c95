"""Read official StyleGAN3 network pickles safely, and convert them to safetensors + config.

An official snapshot (``network-snapshot-*.pkl``) is a pickled dict with ``G``, ``D``, ``G_ema``,
``augment_pipe`` and ``training_set_kwargs``.  Each network is saved by NVIDIA's persistence
mechanism: the pickle calls ``torch_utils.persistence._reconstruct_persistent_obj(meta)`` where
``meta`` carries the Python source of the defining module, the class name and the object's
state (parameters, buffers, submodules, constructor arguments).  Loading such a file with the
ordinary :mod:`pickle` would execute that embedded source.

:class:`RestrictedUnpickler` never does: it resolves only a fixed list of globals, each to a
stand-in of our own (the persistent-object reconstructor becomes a record of ``meta``; tensor
and storage rebuild functions become lazy records whose bytes are decoded later by
``torch.load(weights_only=True)``), and refuses every other global (``os.system``,
``builtins.eval``, ``subprocess.*``, arbitrary classes ...) with a :class:`GeneratorError` naming
it.  The generator is then rebuilt from our own network definition (:mod:`.network`) and the
recovered ``G_ema`` state dict.
"""

from __future__ import annotations

import collections
import io
import json
import os
import pickle
import shutil
import tempfile
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..base import GeneratorError
from .network import StyleGAN3Config, StyleGAN3Network

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
FORMAT_NAME = "stylegan3"
FORMAT_VERSION = 1

# --------------------------------------------------------------------------------------------
# Stand-ins for the objects a network pickle reconstructs.


class PersistentObject:
    """What ``_reconstruct_persistent_obj(meta)`` stands for: the class name and the pickled
    state of one module.  The embedded module source is kept as text and never executed."""

    def __init__(self, class_name: str, state: dict[str, Any], module_src: str) -> None:
        self.class_name = class_name
        self.state = state
        self.module_src = module_src

    def __repr__(self) -> str:
        return f"PersistentObject({self.class_name!r})"

    @property
    def init_kwargs(self) -> dict[str, Any]:
        kwargs = self.state.get("_init_kwargs") or {}
        if not isinstance(kwargs, Mapping):
            raise GeneratorError(f"{self.class_name}: _init_kwargs is not a dict")
        return _to_plain(kwargs)

    @property
    def init_args(self) -> tuple[Any, ...]:
        args = self.state.get("_init_args") or ()
        if not isinstance(args, tuple | list):
            raise GeneratorError(f"{self.class_name}: _init_args is not a tuple")
        return tuple(_to_plain(a) for a in args)


def _reconstruct_persistent_obj(meta: Any) -> PersistentObject:
    if not isinstance(meta, Mapping):
        raise GeneratorError("persistent object metadata is not a dict")
    if meta.get("type", "class") != "class":
        raise GeneratorError(f"unsupported persistent object type {meta.get('type')!r}")
    class_name = meta.get("class_name")
    state = meta.get("state")
    if not isinstance(class_name, str) or not isinstance(state, Mapping):
        raise GeneratorError("persistent object metadata lacks class_name or state")
    src = meta.get("module_src")
    return PersistentObject(class_name, dict(state), src if isinstance(src, str) else "")


class _EasyDict(dict):
    """Stand-in for ``dnnlib.util.EasyDict`` (a plain dict subclass)."""


class LazyStorage:
    """A pickled torch storage (``torch.storage._load_from_bytes(b)``), decoded on demand
    with ``torch.load(weights_only=True)``: no code in it can run."""

    def __init__(self, data: Any) -> None:
        if not isinstance(data, bytes | bytearray):
            raise GeneratorError("a pickled torch storage is not a bytes object")
        self._data: bytes | None = bytes(data)
        self._flat: torch.Tensor | None = None

    def flat(self) -> torch.Tensor:
        """The storage as a 1D CPU tensor of its element type."""
        if self._flat is None:
            assert self._data is not None
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # TypedStorage deprecation notices
                storage = torch.load(io.BytesIO(self._data), map_location="cpu", weights_only=True)
            if not isinstance(storage, torch.storage.TypedStorage):
                raise GeneratorError(
                    f"a pickled storage decoded to {type(storage).__name__}, not a typed storage"
                )
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                self._flat = torch.empty(0, dtype=storage.dtype).set_(storage)
            self._data = None
        return self._flat


class LazyTensor:
    """A pickled tensor (``torch._utils._rebuild_tensor_v2``): a strided view of a storage."""

    def __init__(self, storage: Any, offset: Any, size: Any, stride: Any) -> None:
        if not isinstance(storage, LazyStorage):
            raise GeneratorError("a pickled tensor does not refer to a pickled storage")
        try:
            self.offset = int(offset)
            self.size = tuple(int(s) for s in size)
            self.stride = tuple(int(s) for s in stride)
        except (TypeError, ValueError) as exc:
            raise GeneratorError("a pickled tensor has an invalid size or stride") from exc
        if len(self.size) != len(self.stride):
            raise GeneratorError("a pickled tensor has mismatched size and stride")
        self.storage = storage

    def materialize(self) -> torch.Tensor:
        flat = self.storage.flat()
        need = self.offset + sum((s - 1) * st for s, st in zip(self.size, self.stride, strict=True))
        if any(s == 0 for s in self.size):
            return torch.empty(self.size, dtype=flat.dtype)
        if self.offset < 0 or any(st < 0 for st in self.stride) or need >= flat.numel():
            raise GeneratorError("a pickled tensor reaches outside its storage (corrupt file?)")
        return flat.as_strided(self.size, self.stride, self.offset).clone()


def _rebuild_tensor(storage: Any, storage_offset: Any, size: Any, stride: Any) -> LazyTensor:
    return LazyTensor(storage, storage_offset, size, stride)


def _rebuild_tensor_v2(
    storage: Any,
    storage_offset: Any,
    size: Any,
    stride: Any,
    requires_grad: Any = False,
    backward_hooks: Any = None,
    metadata: Any = None,
) -> LazyTensor:
    return LazyTensor(storage, storage_offset, size, stride)


def _rebuild_parameter(data: Any, requires_grad: Any = False, backward_hooks: Any = None) -> Any:
    return data


def _rebuild_parameter_with_state(
    data: Any, requires_grad: Any = False, backward_hooks: Any = None, state: Any = None
) -> Any:
    return data


def _numpy_multiarray(name: str) -> Any:
    try:
        from numpy._core import multiarray  # numpy >= 2
    except ImportError:  # pragma: no cover - numpy 1.x
        from numpy.core import multiarray  # type: ignore[no-redef]
    return getattr(multiarray, name)


# (module, name) -> the object the pickle gets instead.  Nothing else is resolved.
_ALLOWED_GLOBALS: dict[tuple[str, str], Any] = {
    ("torch_utils.persistence", "_reconstruct_persistent_obj"): _reconstruct_persistent_obj,
    ("torch._utils", "_rebuild_tensor"): _rebuild_tensor,
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor_v2,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    ("torch._utils", "_rebuild_parameter_with_state"): _rebuild_parameter_with_state,
    ("torch.storage", "_load_from_bytes"): LazyStorage,
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("builtins", "set"): set,
    ("builtins", "frozenset"): frozenset,
    ("dnnlib.util", "EasyDict"): _EasyDict,
    # NumPy arrays, dtypes and scalars (plain data; e.g. layer sizes and cutoffs).
    ("numpy", "ndarray"): np.ndarray,
    ("numpy", "dtype"): np.dtype,
    ("numpy.core.multiarray", "_reconstruct"): _numpy_multiarray("_reconstruct"),
    ("numpy._core.multiarray", "_reconstruct"): _numpy_multiarray("_reconstruct"),
    ("numpy.core.multiarray", "scalar"): _numpy_multiarray("scalar"),
    ("numpy._core.multiarray", "scalar"): _numpy_multiarray("scalar"),
}


class RestrictedUnpickler(pickle.Unpickler):
    """Unpickler for official network pickles that resolves only :data:`_ALLOWED_GLOBALS`."""

    def find_class(self, module: str, name: str) -> Any:
        try:
            return _ALLOWED_GLOBALS[(module, name)]
        except KeyError:
            raise GeneratorError(
                f"refusing to load global '{module}.{name}' from the pickle: only StyleGAN3 "
                "network data (tensors, NVIDIA persistence records, plain containers) is "
                "allowed; the file is not an official StyleGAN3 pickle or may be malicious"
            ) from None

    def persistent_load(self, pid: Any) -> Any:
        raise GeneratorError("unexpected persistent id in the pickle (not a network pickle)")


def _to_plain(value: Any) -> Any:
    """EasyDicts -> dicts, NumPy scalars -> Python scalars, recursively."""
    if isinstance(value, Mapping):
        return {str(k): _to_plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return type(value)(_to_plain(v) for v in value)
    if isinstance(value, np.generic):
        return value.item()
    return value


# --------------------------------------------------------------------------------------------
# Reading pickles.

_POSITIONAL = ("z_dim", "c_dim", "w_dim", "img_resolution", "img_channels", "mapping_kwargs")


def load_pickle_restricted(path: str | os.PathLike[str]) -> Any:
    """Unpickle ``path`` with :class:`RestrictedUnpickler`; every failure is a
    :class:`GeneratorError`."""
    path = Path(path)
    if not path.is_file():
        raise GeneratorError(f"StyleGAN3 pickle not found: {path}")
    with open(path, "rb") as f:
        head = f.read(4)
        if head.startswith(b"PK"):
            raise GeneratorError(
                f"{path} is a zip archive (torch.save format), not an official StyleGAN3 "
                "network pickle"
            )
        if not head.startswith(b"\x80"):
            raise GeneratorError(f"{path} does not look like a pickle file")
        f.seek(0)
        try:
            return RestrictedUnpickler(f).load()
        except GeneratorError:
            raise
        except Exception as exc:
            raise GeneratorError(
                f"could not read the StyleGAN3 pickle {path}: the file is truncated or corrupt "
                f"({type(exc).__name__}: {exc})"
            ) from exc


def _collect_state(obj: PersistentObject, prefix: str, out: dict[str, torch.Tensor]) -> None:
    state = obj.state
    params = state.get("_parameters") or {}
    buffers = state.get("_buffers") or {}
    modules = state.get("_modules") or {}
    skip = state.get("_non_persistent_buffers_set") or set()
    for kind, entries in (("parameter", params), ("buffer", buffers)):
        if not isinstance(entries, Mapping):
            raise GeneratorError(f"{prefix or 'G_ema'}: malformed {kind} table in the pickle")
        for name, value in entries.items():
            if value is None or (kind == "buffer" and name in skip):
                continue
            if not isinstance(value, LazyTensor):
                raise GeneratorError(
                    f"{prefix}{name}: expected a tensor in the pickle, got {type(value).__name__}"
                )
            out[prefix + str(name)] = value.materialize().to(torch.float32).contiguous()
    if not isinstance(modules, Mapping):
        raise GeneratorError(f"{prefix or 'G_ema'}: malformed submodule table in the pickle")
    for name, child in modules.items():
        if child is None:
            continue
        if not isinstance(child, PersistentObject):
            raise GeneratorError(
                f"{prefix}{name}: submodule of unexpected type {type(child).__name__}"
            )
        _collect_state(child, f"{prefix}{name}.", out)


def _generator_object(data: Any, path: Path) -> PersistentObject:
    if isinstance(data, PersistentObject):
        net = data
    elif isinstance(data, Mapping):
        if "G_ema" not in data:
            raise GeneratorError(
                f"{path}: the pickle has no 'G_ema' entry (keys: {', '.join(map(str, data))})"
            )
        net = data["G_ema"]
    else:
        raise GeneratorError(f"{path}: unexpected pickle content {type(data).__name__}")
    if not isinstance(net, PersistentObject) or net.class_name != "Generator":
        raise GeneratorError(f"{path}: G_ema is not a persistent Generator object")
    synthesis = (net.state.get("_modules") or {}).get("synthesis")
    first = (
        (synthesis.state.get("_modules") or {}).get("input")
        if isinstance(synthesis, PersistentObject)
        else None
    )
    if not isinstance(first, PersistentObject) or first.class_name != "SynthesisInput":
        raise GeneratorError(
            f"{path}: G_ema is not a StyleGAN3 generator (no Fourier-feature synthesis input; "
            "StyleGAN2/StyleGAN2-ADA pickles are not supported by this backend)"
        )
    return net


def read_stylegan3_pickle(
    path: str | os.PathLike[str],
) -> tuple[StyleGAN3Config, dict[str, torch.Tensor]]:
    """Architecture and ``G_ema`` state dict (float32, CPU) of an official network pickle,
    read without executing anything the file contains."""
    path = Path(path)
    data = load_pickle_restricted(path)
    net = _generator_object(data, path)
    kwargs = dict(zip(_POSITIONAL, net.init_args, strict=False))
    kwargs.update(net.init_kwargs)
    try:
        config = StyleGAN3Config.from_init_kwargs(kwargs)
    except (TypeError, ValueError) as exc:
        raise GeneratorError(f"{path}: unsupported generator options: {exc}") from exc
    state: dict[str, torch.Tensor] = {}
    try:
        _collect_state(net, "", state)
    except GeneratorError:
        raise
    except Exception as exc:
        raise GeneratorError(
            f"{path}: could not decode the generator weights; the file is corrupt "
            f"({type(exc).__name__}: {exc})"
        ) from exc
    return config, state


# --------------------------------------------------------------------------------------------
# Building and converted directories.


def network_from_state(
    config: StyleGAN3Config, state: Mapping[str, torch.Tensor], source: str = "weights"
) -> StyleGAN3Network:
    """Our network for ``config`` with ``state`` loaded; a mismatch in names or shapes is a
    :class:`GeneratorError` that lists the missing and unexpected keys and wrong shapes."""
    try:
        net = StyleGAN3Network(config)
    except (TypeError, ValueError) as exc:
        raise GeneratorError(f"invalid StyleGAN3 configuration: {exc}") from exc
    expected = net.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    shapes = [
        f"{k}: {tuple(state[k].shape)} (config expects {tuple(v.shape)})"
        for k, v in expected.items()
        if k in state and tuple(state[k].shape) != tuple(v.shape)
    ]
    if missing or unexpected or shapes:
        parts = []
        if missing:
            parts.append(f"missing keys: {_short(missing)}")
        if unexpected:
            parts.append(f"unexpected keys: {_short(unexpected)}")
        if shapes:
            parts.append(f"shape mismatches: {_short(shapes)}")
        raise GeneratorError(
            f"{source} do not match the StyleGAN3 configuration ({config.architecture}, "
            f"{config.img_resolution}px): " + "; ".join(parts)
        )
    net.load_state_dict({k: v.to(torch.float32) for k, v in state.items()}, strict=True)
    return net.eval().requires_grad_(False)


def _short(items: list[str], limit: int = 8) -> str:
    more = f", ... ({len(items) - limit} more)" if len(items) > limit else ""
    return ", ".join(items[:limit]) + more


def read_converted_dir(
    path: str | os.PathLike[str],
) -> tuple[StyleGAN3Config, dict[str, torch.Tensor]]:
    """Configuration and state dict of a directory written by :func:`convert_stylegan3_pickle`."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = Path(path)
    cfg_path, w_path = path / CONFIG_NAME, path / WEIGHTS_NAME
    for p in (cfg_path, w_path):
        if not p.is_file():
            raise GeneratorError(f"{path} is not a converted StyleGAN3 directory: {p.name} missing")
    try:
        raw = json.loads(cfg_path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise GeneratorError(f"{cfg_path}: unreadable config ({exc})") from exc
    if not isinstance(raw, dict):
        raise GeneratorError(f"{cfg_path}: expected a JSON object")
    fmt = raw.get("ktl_format", FORMAT_NAME)
    if fmt != FORMAT_NAME:
        raise GeneratorError(f"{cfg_path}: ktl_format is {fmt!r}, expected {FORMAT_NAME!r}")
    try:
        config = StyleGAN3Config.from_dict(raw)
    except (TypeError, ValueError) as exc:
        raise GeneratorError(f"{cfg_path}: invalid StyleGAN3 configuration: {exc}") from exc
    try:
        state = load_file(str(w_path), device="cpu")
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        raise GeneratorError(
            f"{w_path}: could not read the weights; the file is truncated or corrupt ({exc})"
        ) from exc
    return config, state


def write_converted_dir(
    config: StyleGAN3Config,
    state: Mapping[str, torch.Tensor],
    out_dir: str | os.PathLike[str],
    source: str | None = None,
    overwrite: bool = False,
) -> Path:
    """Write ``config.json`` + ``model.safetensors`` into a temporary sibling directory and
    rename it to ``out_dir`` once complete (an existing ``out_dir`` is replaced only with
    ``overwrite``)."""
    from safetensors.torch import save_file

    out = Path(out_dir)
    if out.exists() and not overwrite:
        raise GeneratorError(f"{out} already exists (pass overwrite=True to replace it)")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        meta: dict[str, Any] = {
            "ktl_format": FORMAT_NAME,
            "ktl_format_version": FORMAT_VERSION,
            "ktl_architecture": config.architecture,
        }
        if source is not None:
            meta["source"] = source
        payload = {**meta, **config.to_dict()}
        (tmp / CONFIG_NAME).write_text(json.dumps(payload, indent=2) + "\n", encoding="utf-8")
        tensors = {
            k: v.detach().to("cpu", torch.float32).contiguous().clone() for k, v in state.items()
        }
        save_file(tensors, str(tmp / WEIGHTS_NAME), metadata={"format": "pt"})
        if out.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
            os.replace(out, old / out.name)
            os.replace(tmp, out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def convert_stylegan3_pickle(
    in_pkl: str | os.PathLike[str], out_dir: str | os.PathLike[str], overwrite: bool = False
) -> Path:
    """Convert an official StyleGAN3 network pickle to ``out_dir`` (``config.json`` with the
    architecture options + ``model.safetensors`` with the ``G_ema`` state dict).  The pickle is
    read with :class:`RestrictedUnpickler` and the weights are checked against our network
    before anything is written.  Returns ``out_dir``."""
    out = Path(out_dir)
    if out.exists() and not overwrite:
        raise GeneratorError(f"{out} already exists (pass overwrite=True to replace it)")
    config, state = read_stylegan3_pickle(in_pkl)
    network_from_state(config, state, source=f"weights in {in_pkl}")
    return write_converted_dir(config, state, out, source=Path(in_pkl).name, overwrite=overwrite)
