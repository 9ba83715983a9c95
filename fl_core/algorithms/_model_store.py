"""A server-side store of one model state per client, in memory up to a budget, then on disk.

FedFomo, FedAMP and APPLE need every client's latest model on the server. Keeping them as live
modules makes server memory grow with the number of clients; this store keeps flat tensor dicts
instead, the most recently written ones in memory while their total size is under a byte budget
and the rest as safetensors files (the approach of the engine's `ClientStateStore`). Reads of a
spilled state go to disk and are not cached, so a pass over every client (FedAMP's distances)
costs one file read per client and never evicts the states that were just written.

A client that never uploaded reads as ``default`` (the federation's initial model), stored once.
The store registers no algorithm.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import weakref
from collections import OrderedDict
from collections.abc import Iterator, Mapping
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor

from .parts import PartError, tensor_nbytes


def _remove_dir(path: str, owner_pid: int) -> None:
    # a forked worker inherits the store object; only the process that made the folder removes it
    if os.getpid() == owner_pid:
        shutil.rmtree(path, ignore_errors=True)


def _own_storage(t: Tensor) -> Tensor:
    """``t`` on the CPU in a storage of its own: kept as is when it already is (a reply's
    tensors, which nothing else writes to), copied when it is a view into a larger one."""
    t = t.detach().to("cpu").contiguous()
    if t.untyped_storage().nbytes() != t.numel() * t.element_size() or t.storage_offset():
        t = t.clone()
    return t


class ModelStore:
    """Per-client model states (flat ``{key: tensor}`` dicts) under a memory budget in bytes."""

    def __init__(self, memory_budget: int, default: Mapping[str, Tensor]) -> None:
        self.memory_budget = int(memory_budget)
        self.default = {k: v.detach().cpu().contiguous() for k, v in default.items()}
        self._mem: OrderedDict[int, dict[str, Tensor]] = OrderedDict()
        self._mem_bytes = 0
        self._on_disk: set[int] = set()
        self._dir: Path | None = None
        self.spills = 0

    # -- bookkeeping -------------------------------------------------------------------------
    def __contains__(self, client_id: int) -> bool:
        return client_id in self._mem or client_id in self._on_disk

    def __len__(self) -> int:
        return len(self._mem) + len(self._on_disk)

    def ids(self) -> list[int]:
        """The clients that have a stored model, in increasing order."""
        return sorted([*self._mem, *self._on_disk])

    @property
    def memory_bytes(self) -> int:
        return self._mem_bytes

    def _path(self, client_id: int) -> Path:
        if self._dir is None:
            path = tempfile.mkdtemp(prefix="ktl-server-models-")
            weakref.finalize(self, _remove_dir, path, os.getpid())
            self._dir = Path(path)
        return self._dir / f"client_{client_id}.safetensors"

    # -- reading and writing -----------------------------------------------------------------
    def get(self, client_id: int) -> dict[str, Tensor]:
        """The client's model, or ``default`` for a client that never stored one. Do not modify
        the returned tensors in place: they may be the stored ones."""
        if client_id in self._mem:
            return self._mem[client_id]
        if client_id in self._on_disk:
            return load_file(str(self._path(client_id)))
        return self.default

    def put(self, client_id: int, state: Mapping[str, Tensor]) -> None:
        """Store the client's model (its tensors are kept, not copied, when each is already a
        whole CPU storage: do not modify them afterwards); its keys must be ``default``'s."""
        if set(state) != set(self.default):
            extra = sorted(set(state) - set(self.default))[:3]
            missing = sorted(set(self.default) - set(state))[:3]
            raise PartError(
                f"client {client_id}'s model does not match the server's model keys "
                f"(unexpected {extra}, missing {missing})"
            )
        self.discard(client_id)
        kept = {k: _own_storage(v) for k, v in state.items()}
        self._mem[client_id] = kept
        self._mem_bytes += tensor_nbytes(kept)
        while self._mem_bytes > self.memory_budget and self._mem:
            old_id, old = self._mem.popitem(last=False)
            self._mem_bytes -= tensor_nbytes(old)
            path = self._path(old_id)
            tmp = path.with_suffix(".tmp")
            save_file(old, str(tmp))
            os.replace(tmp, path)
            self._on_disk.add(old_id)
            self.spills += 1

    def discard(self, client_id: int) -> None:
        if client_id in self._mem:
            self._mem_bytes -= tensor_nbytes(self._mem.pop(client_id))
        if client_id in self._on_disk:
            self._on_disk.discard(client_id)
            self._path(client_id).unlink(missing_ok=True)

    def items(self, client_ids: list[int] | None = None) -> Iterator[tuple[int, dict[str, Tensor]]]:
        """(client id, model) for ``client_ids`` (default: every stored client), one at a time:
        a spilled model is read when it is reached and dropped by the caller after use."""
        for cid in self.ids() if client_ids is None else client_ids:
            yield cid, self.get(cid)

    # -- checkpoints -------------------------------------------------------------------------
    def state_dict(self, prefix: str) -> dict[str, Tensor]:
        """Every stored model, flat: ``{prefix}{client id}/{key}`` (for the server's checkpoint)."""
        return {f"{prefix}{cid}/{k}": v for cid, state in self.items() for k, v in state.items()}

    def load_state_dict(self, flat: Mapping[str, Tensor], prefix: str) -> None:
        """Replace the stored models by those in ``flat`` (keys as `state_dict` writes them)."""
        for cid in self.ids():
            self.discard(cid)
        by_client: dict[int, dict[str, Tensor]] = {}
        for key, value in flat.items():
            if key.startswith(prefix):
                cid, _, name = key.removeprefix(prefix).partition("/")
                by_client.setdefault(int(cid), {})[name] = value
        for cid in sorted(by_client):
            self.put(cid, by_client[cid])


def flatten_vector(state: Mapping[str, Tensor], keys: list[str]) -> Tensor:
    """The floating tensors ``keys`` of ``state`` as one float64 vector (for distances)."""
    return torch.cat([state[k].reshape(-1).double() for k in keys])


def pack_models(part: str, models: list[Mapping[str, Tensor]]) -> dict[str, Tensor]:
    """Several models in one message: model ``s``'s tensor ``key`` under ``{part}/{s}.{key}``."""
    return {f"{part}/{slot}.{key}": v for slot, m in enumerate(models) for key, v in m.items()}


def unpack_models(
    message: Mapping[str, Tensor], part: str, template: Mapping[str, Tensor]
) -> tuple[dict[str, Tensor], list[dict[str, Tensor]]]:
    """Split `pack_models`' keys out of ``message``: (the other keys, the models in slot order).

    Every model must have exactly the keys and shapes of ``template``; a key that does not fit
    raises `PartError` naming it, as the parts' loading does. Each tensor is put on the device
    of the template's tensor of that name (messages arrive on the CPU; a client computes on its
    model's device).
    """
    rest: dict[str, Tensor] = {}
    slots: dict[int, dict[str, Tensor]] = {}
    for flat_key, tensor in message.items():
        if not flat_key.startswith(part + "/"):
            rest[flat_key] = tensor
            continue
        slot, dot, key = flat_key.removeprefix(part + "/").partition(".")
        if not dot or not slot.isdigit() or key not in template:
            raise PartError(
                f"message key {flat_key!r} is not '{part}/<slot>.<model tensor name>' "
                f"for this client's model"
            )
        if tensor.shape != template[key].shape:
            raise PartError(
                f"message key {flat_key!r} has shape {tuple(tensor.shape)}, but the client's "
                f"tensor has shape {tuple(template[key].shape)}"
            )
        slots.setdefault(int(slot), {})[key] = tensor.to(template[key].device)
    models = []
    for slot in sorted(slots):
        missing = set(template) - set(slots[slot])
        if missing or slot != len(models):
            raise PartError(
                f"model {slot} of '{part}' is incomplete (missing {sorted(missing)[:3]})"
            )
        models.append(slots[slot])
    return rest, models
