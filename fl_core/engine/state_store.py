"""Client state store: per-client tensor dicts in memory up to a budget, then on disk."""

from __future__ import annotations

import os
import tempfile
from collections import OrderedDict
from pathlib import Path

from safetensors.torch import load_file, save_file
from torch import Tensor

from fl_core.algorithms.parts import tensor_nbytes


class ClientStateStore:
    """Holds what each client keeps between rounds.

    The most recently used states stay in memory while their total size is under
    ``memory_budget`` bytes; older ones are spilled to ``spill_dir`` as safetensors and read
    back on demand. Memory therefore grows with the budget, not with the number of clients.
    """

    def __init__(self, memory_budget: int = 2 << 30, spill_dir: str | os.PathLike | None = None):
        self.memory_budget = int(memory_budget)
        self._mem: OrderedDict[int, dict[str, Tensor]] = OrderedDict()
        self._mem_bytes = 0
        self._on_disk: set[int] = set()
        self._spill_root = Path(spill_dir) if spill_dir is not None else None
        self._tmp: tempfile.TemporaryDirectory | None = None
        self.spills = 0

    def _dir(self) -> Path:
        if self._spill_root is None:
            self._tmp = tempfile.TemporaryDirectory(prefix="ktl-client-states-")
            self._spill_root = Path(self._tmp.name)
        self._spill_root.mkdir(parents=True, exist_ok=True)
        return self._spill_root

    def _path(self, client_id: int) -> Path:
        return self._dir() / f"client_{client_id}.safetensors"

    def __contains__(self, client_id: int) -> bool:
        return client_id in self._mem or client_id in self._on_disk

    def __len__(self) -> int:
        return len(self._mem) + len(self._on_disk)

    @property
    def memory_bytes(self) -> int:
        return self._mem_bytes

    def get(self, client_id: int) -> dict[str, Tensor]:
        """The client's stored state, or an empty dict for a client that has none yet."""
        if client_id in self._mem:
            self._mem.move_to_end(client_id)
            return self._mem[client_id]
        if client_id in self._on_disk:
            state = load_file(str(self._path(client_id)))
            self._on_disk.discard(client_id)
            self._path(client_id).unlink(missing_ok=True)
            self._insert(client_id, state)
            return state
        return {}

    def put(self, client_id: int, state: dict[str, Tensor]) -> None:
        self.discard(client_id)
        if state:
            self._insert(client_id, {k: v.detach().contiguous() for k, v in state.items()})

    def discard(self, client_id: int) -> None:
        if client_id in self._mem:
            self._mem_bytes -= tensor_nbytes(self._mem.pop(client_id))
        if client_id in self._on_disk:
            self._on_disk.discard(client_id)
            self._path(client_id).unlink(missing_ok=True)

    def _insert(self, client_id: int, state: dict[str, Tensor]) -> None:
        self._mem[client_id] = state
        self._mem_bytes += tensor_nbytes(state)
        while self._mem_bytes > self.memory_budget and len(self._mem) > 1:
            old_id, old_state = self._mem.popitem(last=False)
            self._mem_bytes -= tensor_nbytes(old_state)
            tmp = self._path(old_id).with_suffix(".tmp")
            save_file({k: v.cpu().contiguous() for k, v in old_state.items()}, str(tmp))
            os.replace(tmp, self._path(old_id))
            self._on_disk.add(old_id)
            self.spills += 1

    def all_states(self) -> dict[int, dict[str, Tensor]]:
        """Every stored state (for checkpoints); reads spilled ones without re-inserting them."""
        out = dict(self._mem)
        for cid in self._on_disk:
            out[cid] = load_file(str(self._path(cid)))
        return out

    def close(self) -> None:
        self._mem.clear()
        self._mem_bytes = 0
        self._on_disk.clear()
        if self._tmp is not None:
            self._tmp.cleanup()
            self._tmp = None
        elif self._spill_root is not None and self._spill_root.exists():
            # a folder the caller gave us: remove only the files this store wrote
            for f in self._spill_root.glob("client_*.safetensors"):
                f.unlink(missing_ok=True)
