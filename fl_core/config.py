"""Run configuration: YAML files validated by pydantic, with ``key=value`` overrides."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from fl_core.algorithms import AlgorithmError, HParams, get_algorithm
from fl_core.data.federated import DataSpec


class ConfigError(ValueError):
    """A configuration problem, phrased for the user (field, value, valid choices)."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ModelSpec(_Strict):
    name: str = Field("cnn4", description="registered model, or a heterogeneous model group")
    feature_dim: int = Field(512, ge=1, description="size of the body's output features")


class AlgorithmSpec(BaseModel):
    """``name`` plus the algorithm's own hyperparameters, validated against its dataclass."""

    model_config = ConfigDict(extra="allow")
    name: str = Field("fedavg", description="registered algorithm name (ktl list algorithms)")

    def hparams(self) -> dict[str, Any]:
        return dict(self.model_extra or {})


class FederationSpec(_Strict):
    """The round loop and every client's local training settings (the only copy of them).

    Frozen: clients read it as their ``ctx.settings``.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    rounds: int = Field(50, ge=0, description="communication rounds")
    join_ratio: float = Field(1.0, gt=0.0, le=1.0, description="fraction of clients per round")
    random_join_ratio: bool = Field(
        False, description="draw the number of joining clients in [join_ratio·N, N] each round"
    )
    client_drop_rate: float = Field(
        0.0, ge=0.0, lt=1.0, description="probability that a selected client drops out"
    )
    eval_every: int = Field(1, ge=1, description="evaluate every this many rounds")
    eval_train_loss: bool = Field(True, description="also compute the train loss on evaluation")
    local_epochs: int = Field(1, ge=1, description="local epochs per round")
    batch_size: int = Field(10, ge=1, description="local mini-batch size")
    drop_last: bool = Field(
        True,
        description="skip each epoch's last, incomplete training batch, as PFLlib and HtFLlib "
        "do (it may hold a single sample, which BatchNorm cannot train on); a client with "
        "fewer samples than one batch still trains on all of them",
    )
    lr: float = Field(0.005, gt=0.0, description="local learning rate")
    eval_batch_size: int = Field(1000, ge=1, description="batch size for evaluation")
    num_new_clients: int = Field(
        0, ge=0, description="clients held out from training, evaluated at the end"
    )
    new_client_finetune_epochs: int = Field(
        0, ge=0, description="local epochs a new client trains before it is evaluated"
    )
    stop_on_divergence: bool = Field(
        True,
        description="stop the run with an error (TrainingDiverged) when a client's training "
        "loss is not finite (NaN or infinite): a diverged run would otherwise train at chance "
        "to its last round; false keeps going",
    )
    early_stop_patience: int | None = Field(
        None, ge=1, description="stop after this many evaluations without a better test_acc"
    )
    executor: Literal["auto", "sequential", "process", "flower-sim", "flower"] = Field(
        "auto",
        description="run clients in this process or in a pool of single-threaded processes; "
        "auto = process on a CPU with 2+ cores, else sequential; flower-sim = Flower's "
        "simulation runtime (pip install 'ktl[flower]'); flower = a Flower deployment (set by "
        "ktl's ServerApp, docs/flower.md)",
    )
    workers: int | None = Field(
        None, ge=1, description="processes for executor=process (default: one per core)"
    )
    threads_per_worker: int = Field(1, ge=1, description="torch threads in each worker process")
    state_memory_mb: float = Field(
        2048.0, gt=0, description="memory budget for client states before they go to disk"
    )
    checkpoint_every: int | None = Field(
        10,
        ge=1,
        description="write a resumable checkpoint into the output folder every this many rounds "
        "(null = never); ktl run --resume DIR continues from the latest",
    )


class RunConfig(_Strict):
    seed: int = Field(0, description="root seed for every random choice")
    device: Literal["cpu", "cuda", "auto"] = Field("cpu", description="where models train")
    threads: int | None = Field(None, ge=1, description="torch CPU threads (default: all cores)")
    data: DataSpec = Field(default_factory=DataSpec)
    model: ModelSpec = Field(default_factory=ModelSpec)
    algorithm: AlgorithmSpec = Field(default_factory=AlgorithmSpec)
    federation: FederationSpec = Field(default_factory=FederationSpec)

    @model_validator(mode="after")
    def _check_algorithm(self) -> RunConfig:
        try:
            algo = get_algorithm(self.algorithm.name)
        except AlgorithmError as e:
            raise ValueError(str(e)) from None
        try:
            algo.hparams_cls(**self.algorithm.hparams())
        except ValidationError as e:
            fields = ", ".join(algo.hparams_cls.model_fields) or "none"
            raise ValueError(
                f"invalid hyperparameters for algorithm {algo.name!r}: "
                f"{_format_errors(e, prefix='algorithm.')} (its hyperparameters: {fields})"
            ) from None
        return self

    def algorithm_hparams(self) -> HParams:
        algo = get_algorithm(self.algorithm.name)
        return algo.hparams_cls(**self.algorithm.hparams())


def _format_errors(err: ValidationError, prefix: str = "") -> str:
    parts = []
    for e in err.errors():
        loc = prefix + ".".join(str(x) for x in e["loc"]) if e["loc"] else prefix.rstrip(".")
        msg = e["msg"]
        if e["type"] == "extra_forbidden":
            msg = "unknown key"
        parts.append(f"{loc}: {msg}" if loc else msg)
    return "; ".join(parts)


def _valid_keys(model: type[BaseModel], path: list[str]) -> list[str]:
    """The keys valid at ``path`` inside a config model (for 'unknown key' messages)."""
    current: Any = model
    for p in path:
        field = getattr(current, "model_fields", {}).get(p)
        if field is None:
            return []
        current = field.annotation
    return sorted(getattr(current, "model_fields", {}))


def parse_override(item: str) -> tuple[list[str], Any]:
    if "=" not in item:
        raise ConfigError(f"override {item!r} must look like key=value, e.g. federation.rounds=5")
    key, raw = item.split("=", 1)
    key = key.strip()
    if not key:
        raise ConfigError(f"override {item!r} has an empty key")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    return key.split("."), value


def apply_overrides(raw: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    out = copy.deepcopy(raw)
    for item in overrides:
        path, value = parse_override(item)
        node = out
        for p in path[:-1]:
            nxt = node.get(p)
            if nxt is None:
                nxt = node[p] = {}
            if not isinstance(nxt, dict):
                raise ConfigError(f"override {item!r}: {p!r} is a value, not a section")
            node = nxt
        node[path[-1]] = value
    return out


def build_config(raw: dict[str, Any]) -> RunConfig:
    try:
        return RunConfig(**raw)
    except ValidationError as e:
        msgs = []
        for err in e.errors():
            loc = [str(x) for x in err["loc"]]
            where = ".".join(loc)
            if err["type"] == "extra_forbidden":
                valid = _valid_keys(RunConfig, loc[:-1])
                msgs.append(f"{where}: unknown key; valid keys here: {', '.join(valid)}")
            elif err["type"] == "value_error":
                msgs.append(err["msg"].removeprefix("Value error, "))
            else:
                got = err.get("input")
                msgs.append(f"{where}: {err['msg']} (got {got!r})")
        raise ConfigError("invalid configuration: " + "; ".join(msgs)) from None


def load_config(path: str | Path | None, overrides: list[str] | None = None) -> RunConfig:
    raw: dict[str, Any] = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file {str(p)!r} does not exist")
        try:
            raw = yaml.safe_load(p.read_text()) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"config file {str(p)!r} is not valid YAML: {e}") from None
        if not isinstance(raw, dict):
            raise ConfigError(f"config file {str(p)!r} must hold a mapping of sections")
    raw = apply_overrides(raw, overrides or [])
    return build_config(raw)


def dump_config(config: RunConfig) -> str:
    data = config.model_dump(mode="json")
    return yaml.safe_dump(data, sort_keys=False)
