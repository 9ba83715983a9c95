"""Named client parts and declarative selections of their tensors.

A client holds *parts*: modules (the model, a personal model, a projection head) or tensor dicts
(control variates, received prototypes). A flat state or message addresses one tensor of one
part as ``"<part>/<key>"``: ``model/body.0.weight``, ``cv/head.bias``, ``proto/global``.

A `Select` names which of those tensors travel or persist: a whole part, the keys under a prefix
("model/body"), or the tensors owned by modules that satisfy a predicate (every BatchNorm layer,
or everything except them). Loading a flat dict whose key matches nothing raises `PartError`
naming the key: nothing is dropped silently.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass

import torch
from torch import Tensor, nn

Part = nn.Module | dict[str, Tensor]
Parts = Mapping[str, Part]


class PartError(KeyError):
    """A key that names no part or no tensor of a part, or a tensor of the wrong shape."""

    def __str__(self) -> str:  # KeyError would print the repr of the message
        return str(self.args[0]) if self.args else ""


def tensor_nbytes(tensors: Mapping[str, Tensor]) -> int:
    """Exact payload size of a tensor dict (a message or a state): the bytes of its tensors."""
    return sum(t.numel() * t.element_size() for t in tensors.values())


def is_batchnorm(module: nn.Module) -> bool:
    """Every BatchNorm layer (1d/2d/3d, sync), the predicate FedBN keeps local."""
    return isinstance(module, nn.modules.batchnorm._BatchNorm)


@dataclass(frozen=True)
class Select:
    """A selection of tensors inside one part.

    ``prefix`` narrows to keys equal to it or under it ("body" selects ``body.*``);
    ``modules`` narrows to tensors owned directly by modules for which it returns True, or, with
    ``invert``, to the tensors of all other modules.
    """

    part: str
    prefix: str = ""
    modules: Callable[[nn.Module], bool] | None = None
    invert: bool = False

    @staticmethod
    def parse(spec: str | Select) -> Select:
        """``"model"`` or ``"model/body"`` -> a Select; a Select is returned as is."""
        if isinstance(spec, Select):
            return spec
        part, _, prefix = str(spec).partition("/")
        return Select(part, prefix)

    def keys(self, value: Part) -> list[str]:
        """The keys of ``value`` (a part) that this selection covers, in state order."""
        keys = list(part_state(value))
        if self.prefix:
            p = self.prefix
            keys = [k for k in keys if k == p or k.startswith(p + ".")]
        if self.modules is not None:
            if not isinstance(value, nn.Module):
                raise PartError(
                    f"part {self.part!r} is a tensor dict; a module predicate needs a module"
                )
            owned = _keys_of_matching_modules(value, self.modules)
            keys = [k for k in keys if (k in owned) != self.invert]
        return keys


Selector = str | Select


def _keys_of_matching_modules(root: nn.Module, pred: Callable[[nn.Module], bool]) -> set[str]:
    out: set[str] = set()
    for name, module in root.named_modules():
        if pred(module):
            prefix = f"{name}." if name else ""
            out.update(prefix + k for k in module.state_dict(keep_vars=True) if "." not in k)
    return out


def part_state(value: Part) -> dict[str, Tensor]:
    """The tensors of a part by key (a module's state dict, or the tensor dict itself)."""
    if isinstance(value, nn.Module):
        return value.state_dict()
    return value


def select_state(
    parts: Parts, selectors: Iterable[Selector], clone: bool = True
) -> dict[str, Tensor]:
    """The selected tensors as a flat ``{"part/key": tensor}`` dict (detached clones by default)."""
    out: dict[str, Tensor] = {}
    for spec in selectors:
        sel = Select.parse(spec)
        if sel.part not in parts:
            raise PartError(f"selection names part {sel.part!r}, but the parts are {sorted(parts)}")
        state = part_state(parts[sel.part])
        for key in sel.keys(parts[sel.part]):
            t = state[key].detach()
            out[f"{sel.part}/{key}"] = t.clone() if clone else t
    return out


def selected_keys(parts: Parts, selectors: Iterable[Selector]) -> set[str]:
    """The flat keys a selection covers (without copying any tensor)."""
    out: set[str] = set()
    for spec in selectors:
        sel = Select.parse(spec)
        if sel.part in parts:
            out.update(f"{sel.part}/{k}" for k in sel.keys(parts[sel.part]))
    return out


def load_flat(
    parts: Parts,
    flat: Mapping[str, Tensor],
    what: str,
    allowed: set[str] | None = None,
) -> None:
    """Copy ``{"part/key": tensor}`` into the parts, in place.

    Every key must name an existing part and one of its tensors (and, when ``allowed`` is given,
    be one of those keys); a mismatch raises `PartError` naming the key and what would be valid.
    Shapes must agree. ``what`` ("message", "client state") names the source in errors.
    """
    by_part: dict[str, dict[str, Tensor]] = {}
    for flat_key, tensor in flat.items():
        part, sep, key = flat_key.partition("/")
        if not sep or part not in parts:
            raise PartError(
                f"{what} key {flat_key!r} names no part; the client's parts are {sorted(parts)} "
                "and keys look like '<part>/<tensor name>'"
            )
        if allowed is not None and flat_key not in allowed:
            raise PartError(
                f"{what} key {flat_key!r} is not among the tensors this client accepts here "
                f"({_describe(allowed)})"
            )
        by_part.setdefault(part, {})[key] = tensor
    for part, entries in by_part.items():
        target = part_state(parts[part])
        for key, tensor in entries.items():
            if key not in target:
                raise PartError(
                    f"{what} key {part + '/' + key!r} matches no tensor of part {part!r} "
                    f"({_describe(set(target))})"
                )
            dst = target[key]
            if dst.shape != tensor.shape:
                raise PartError(
                    f"{what} key {part + '/' + key!r} has shape {tuple(tensor.shape)}, but the "
                    f"client's tensor has shape {tuple(dst.shape)}"
                )
            with torch.no_grad():
                if isinstance(parts[part], nn.Module):
                    dst.copy_(tensor)
                else:
                    # keep the part's dtype, as a module's copy_ does
                    parts[part][key] = tensor.detach().to(dst.device, dst.dtype).clone()


def _describe(keys: set[str], limit: int = 6) -> str:
    shown = sorted(keys)[:limit]
    more = f", … {len(keys) - limit} more" if len(keys) > limit else ""
    return "valid keys: " + (", ".join(shown) + more if shown else "none")
