"""The client side: a Flower ClientApp that runs ktl tasks on one partition.

Every message is one ktl `Task` (see `codec`). The handler builds the client runtime from the
run's config, loads the client's stored state from a disk store keyed by partition id, runs the
task exactly as the in-process engine would (`ClientRuntime.run_task`), writes the new state
back (training only) and replies with the client's message, sample count and metrics.

Where things live, chosen for hundreds of clients:

- **Data** is read from a saved ``ktl partition`` folder, one client's tensors at a time, and
  cached per process: a simulation worker (a Ray actor) that runs many clients reads each
  client once; a deployment SuperNode, whose ClientApp process lives for one message, reads
  only its own partition.
- **Client state** is one safetensors file per partition id in a state folder, written to a
  temporary name and renamed. Flower's node ids change every run, so they are never the key.
  It is not kept in Flower's ``Context.state``: in simulation every node's context lives in the
  driver process and crosses to a Ray actor and back on every message, so N personal models
  would cost N models of driver memory and two copies per message; on disk, memory stays flat
  and a worker reads only the state of the client it runs.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch
import yaml
from flwr.app import ConfigRecord, Context, Message, RecordDict
from flwr.clientapp import ClientApp
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import Tensor

from fl_core.algorithms import get_algorithm
from fl_core.config import RunConfig, build_config
from fl_core.data.federated import MANIFEST, TENSORS, ClientData
from fl_core.data.sources import DataError, normalize
from fl_core.device import resolve_device
from fl_core.engine.runtime import ClientRuntime
from fl_core.models.groups import model_for_client

from .codec import CodecError, decode_task, encode_result

PARTITION_ID = "partition-id"
DATA_PATH = "data-path"
STATE_DIR = "state-dir"
CONFIG_KEY = "ktl-config"


def config_digest(config_text: str) -> str:
    return hashlib.sha256(config_text.encode()).hexdigest()[:16]


class PartitionData:
    """A saved ``ktl partition`` folder, read one client at a time (lazily, then cached).

    The folder may hold every client (``ktl partition`` output) or only some of them (``ktl
    flower split``): a client is read by its original id either way.
    """

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        mpath, self._tensors = self.path / MANIFEST, self.path / TENSORS
        for p in (mpath, self._tensors):
            if not p.is_file():
                raise DataError(
                    f"node config {DATA_PATH}={str(self.path)!r} is not a saved ktl partition "
                    f"folder: {p.name} is missing (write one with `ktl partition --out DIR`)"
                )
        try:
            manifest = json.loads(mpath.read_text())
            self.num_classes = int(manifest["num_classes"])
            self.input_shape = tuple(int(v) for v in manifest["input_shape"])
            self.num_clients = int(manifest["num_clients"])
            self._images = manifest["storage"]["images"]
            self._norm = manifest["normalization"]
        except (json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
            raise DataError(f"{mpath} is corrupt or not a ktl manifest ({e!r})") from None
        self.manifest = manifest
        self._cache: dict[int, ClientData] = {}

    def client(self, client_id: int) -> ClientData:
        if client_id not in self._cache:
            pre = f"client{client_id:06d}."
            parts: dict[str, Tensor] = {}
            with safe_open(str(self._tensors), framework="pt") as f:
                keys = set(f.keys())
                for split in ("train", "test"):
                    for field in ("x", "y", "indices"):
                        key = f"{pre}{split}_{field}"
                        if key not in keys:
                            raise DataError(
                                f"{self._tensors} holds no client {client_id} (tensor {key} is "
                                f"missing); this folder has clients "
                                f"{sorted({int(k[6:12]) for k in keys if k.startswith('client')})}"
                            )
                        parts[f"{split}_{field}"] = f.get_tensor(key)
            for split in ("train", "test"):
                if self._images == "uint8":
                    parts[f"{split}_x"] = normalize(
                        parts[f"{split}_x"], self._norm["mean"], self._norm["std"]
                    )
            self._cache[client_id] = ClientData(**parts)
        return self._cache[client_id]


class PartitionStateStore:
    """Each client's persistent state as ``client_<partition id>.safetensors`` in one folder.

    Written to a temporary name and renamed, so a client killed mid-write keeps its previous
    state whole; the round that wrote a state is kept in the file's metadata.
    """

    def __init__(self, folder: str | os.PathLike):
        self.folder = Path(folder)

    def path(self, client_id: int) -> Path:
        return self.folder / f"client_{client_id}.safetensors"

    def get(self, client_id: int) -> dict[str, Tensor]:
        p = self.path(client_id)
        return load_file(str(p)) if p.is_file() else {}

    def round_of(self, client_id: int) -> int | None:
        p = self.path(client_id)
        if not p.is_file():
            return None
        with safe_open(str(p), framework="pt") as f:
            return int((f.metadata() or {}).get("round", -1))

    def put(self, client_id: int, state: dict[str, Tensor], round: int) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        final = self.path(client_id)
        tmp = final.with_name(f".{final.name}.{os.getpid()}.tmp")
        tensors = {k: v.detach().cpu().contiguous().clone() for k, v in state.items()}
        save_file(tensors, str(tmp), metadata={"round": str(round)})
        os.replace(tmp, final)


@dataclass
class _Loaded:
    config: RunConfig
    digest: str
    runtime: ClientRuntime


# per-process caches: a Ray actor runs many messages; data and runtime are built once
_DATA: dict[str, PartitionData] = {}
_RUNTIMES: dict[tuple[str, str], _Loaded] = {}


def partition_data(path: str | os.PathLike) -> PartitionData:
    key = str(Path(path).resolve())
    if key not in _DATA:
        _DATA[key] = PartitionData(key)
    return _DATA[key]


def _runtime(config_text: str, data_path: str) -> _Loaded:
    key = (config_digest(config_text), str(Path(data_path).resolve()))
    if key not in _RUNTIMES:
        config = build_config(yaml.safe_load(config_text))
        data = partition_data(data_path)
        runtime = ClientRuntime(
            algorithm=get_algorithm(config.algorithm.name),
            hparams=config.algorithm_hparams(),
            settings=config.federation,
            seed=config.seed,
            device=resolve_device(config.device),
            clients=data.client,
            num_classes=data.num_classes,
            input_shape=data.input_shape,
            feature_dim=config.model.feature_dim,
            architecture=lambda cid, name=config.model.name: model_for_client(name, cid),
        )
        _RUNTIMES.clear()  # one run at a time per process: drop an earlier run's models
        _RUNTIMES[key] = _Loaded(config, key[0], runtime)
    return _RUNTIMES[key]


def handle_task(
    msg: Message, context: Context, config_text: str, data_path: str, state_dir: str
) -> Message:
    """Run one ktl task carried by ``msg`` and reply with its result."""
    task, broadcast, digest = decode_task(msg.content)
    loaded = _runtime(config_text, data_path)
    if digest != loaded.digest:
        raise CodecError(
            f"the server's config (digest {digest}) differs from this ClientApp's "
            f"({loaded.digest}); start the run from one config"
        )
    node_pid = context.node_config.get(PARTITION_ID)
    if node_pid is not None and int(node_pid) != task.client_id:
        raise CodecError(
            f"this node holds partition {node_pid} but was sent client {task.client_id}'s task"
        )
    torch.set_num_threads(loaded.config.federation.threads_per_worker)
    store = PartitionStateStore(state_dir)
    task.state = store.get(task.client_id)
    runtime = loaded.runtime
    runtime.broadcasts = {"flower": broadcast} if broadcast else {}
    task.broadcast = "flower" if broadcast else ""
    result = runtime.run_task(task)
    if task.kind == "fit":
        store.put(task.client_id, result.state or {}, task.round)
    result.state = None
    return Message(encode_result(result), reply_to=msg)


def handle_query(msg: Message, context: Context) -> Message:
    """Which partition this node holds (node ids are random per run; partitions are not)."""
    pid = context.node_config.get(PARTITION_ID)
    if pid is None:
        raise CodecError(
            f"node config has no {PARTITION_ID}; start the SuperNode with "
            f"--node-config '{PARTITION_ID}=<client id> {DATA_PATH}=\"<folder>\"'"
        )
    content = RecordDict()
    content["node"] = ConfigRecord({PARTITION_ID: int(pid)})
    return Message(content, reply_to=msg)


def make_client_app(config_text: str, data_path: str, state_dir: str) -> ClientApp:
    """A ClientApp bound to one config, data folder and state folder (the simulation's)."""
    app = ClientApp()

    @app.train()
    def _train(msg: Message, context: Context) -> Message:
        return handle_task(msg, context, config_text, data_path, state_dir)

    @app.evaluate()
    def _evaluate(msg: Message, context: Context) -> Message:
        return handle_task(msg, context, config_text, data_path, state_dir)

    @app.query()
    def _query(msg: Message, context: Context) -> Message:
        return handle_query(msg, context)

    return app


def _deployment_paths(context: Context) -> tuple[str, str, str]:
    """(config text, data folder, state folder) of a deployed SuperNode."""
    config_text = context.run_config.get(CONFIG_KEY)
    if not isinstance(config_text, str) or not config_text:
        raise CodecError(
            f"the run config has no {CONFIG_KEY!r}; write the app with `ktl flower app`"
        )
    data_path = context.node_config.get(DATA_PATH)
    if not data_path:
        raise CodecError(
            f"node config has no {DATA_PATH}; start the SuperNode with --node-config "
            f"'{PARTITION_ID}=<client id> {DATA_PATH}=\"<saved ktl partition folder>\"'"
        )
    state_dir = context.node_config.get(STATE_DIR) or str(
        Path(str(data_path)) / "ktl-state" / f"run-{context.run_id}"
    )
    return config_text, str(data_path), str(state_dir)


# the deployment ClientApp: config from the run config, data and state from the node config
app = ClientApp()


@app.train()
def _deployed_train(msg: Message, context: Context) -> Message:
    return handle_task(msg, context, *_deployment_paths(context))


@app.evaluate()
def _deployed_evaluate(msg: Message, context: Context) -> Message:
    return handle_task(msg, context, *_deployment_paths(context))


@app.query()
def _deployed_query(msg: Message, context: Context) -> Message:
    return handle_query(msg, context)
