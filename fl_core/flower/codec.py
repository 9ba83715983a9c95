"""ktl tasks and results <-> Flower records.

A ktl message is a flat ``dict[str, Tensor]``; it becomes one ``ArrayRecord`` (one Array per
key, the key unchanged). Everything else a task or a result carries is a scalar and goes into a
``ConfigRecord`` (what the client is asked to do) or a ``MetricRecord`` (what it reports).
Client state never travels: it stays with the client (see `fl_core.flower.client`).

Records of one message::

    task    ConfigRecord  kind, client-id, round, finetune-epochs, train-loss, config-digest
    bcast   ArrayRecord   the round's broadcast (same for every client)
    own     ArrayRecord   this client's own message
    ---- reply ----
    result  MetricRecord  client-id, num-samples, test-correct, test-num, train-loss-sum, ...
    metrics MetricRecord  the reply's own metrics (train_loss, steps, ...)
    reply   ArrayRecord   the reply's message (fit)
    eval    ArrayRecord   test-probs, test-labels (eval)
"""

from __future__ import annotations

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, MetricRecord, RecordDict
from torch import Tensor

from fl_core.algorithms import Message
from fl_core.engine.runtime import Task, TaskResult

# numpy has no bfloat16; nothing in ktl sends one, and a clear error beats a silent cast
_UNSUPPORTED = {torch.bfloat16, torch.complex32}


class CodecError(ValueError):
    """A message that cannot cross the Flower boundary (or a reply that is not ktl's)."""


def tensors_to_record(message: Message) -> ArrayRecord:
    arrays: dict[str, Array] = {}
    for key, value in message.items():
        if not isinstance(value, Tensor):
            raise CodecError(f"message key {key!r} holds {type(value).__name__}, not a tensor")
        if value.dtype in _UNSUPPORTED:
            raise CodecError(
                f"message key {key!r} has dtype {value.dtype}, which Flower arrays cannot "
                "carry; send float32 or float16"
            )
        arrays[key] = Array(value.detach().cpu().contiguous().numpy())
    # keep_input skips a copy; ArrayRecord keeps the insertion order, so keys come back in order
    return ArrayRecord(arrays, keep_input=True)


def record_to_tensors(record: ArrayRecord) -> Message:
    # np.load returns a read-only view of the message bytes; copy so training can write in place
    return {key: torch.from_numpy(np.array(arr.numpy(), copy=True)) for key, arr in record.items()}


def encode_task(task: Task, broadcast: Message, config_digest: str) -> RecordDict:
    content = RecordDict()
    content["task"] = ConfigRecord(
        {
            "kind": task.kind,
            "client-id": int(task.client_id),
            "round": int(task.round),
            "finetune-epochs": int(task.finetune_epochs),
            "train-loss": bool(task.train_loss),
            "config-digest": config_digest,
        }
    )
    content["bcast"] = tensors_to_record(broadcast)
    content["own"] = tensors_to_record(task.message)
    return content


def decode_task(content: RecordDict) -> tuple[Task, Message, str]:
    """(task without state, broadcast, config digest)."""
    try:
        cfg = content.config_records["task"]
        task = Task(
            kind=str(cfg["kind"]),
            client_id=int(cfg["client-id"]),
            round=int(cfg["round"]),
            message=record_to_tensors(content.array_records["own"]),
            broadcast="",
            state={},
            finetune_epochs=int(cfg["finetune-epochs"]),
            train_loss=bool(cfg["train-loss"]),
        )
        broadcast = record_to_tensors(content.array_records["bcast"])
        digest = str(cfg["config-digest"])
    except KeyError as e:
        raise CodecError(f"not a ktl task message: record or field {e} is missing") from None
    if task.kind not in ("fit", "eval"):
        raise CodecError(f"task kind must be 'fit' or 'eval', got {task.kind!r}")
    return task, broadcast, digest


def encode_result(result: TaskResult) -> RecordDict:
    content = RecordDict()
    scalars: dict[str, int | float] = {
        "client-id": int(result.client_id),
        "num-samples": int(result.num_samples),
    }
    if result.report is not None:
        rep = result.report
        scalars.update(
            {
                "test-correct": int(rep["test_correct"]),
                "test-num": int(rep["test_num"]),
                "train-loss-sum": float(rep["train_loss_sum"]),
                "train-num": int(rep["train_num"]),
            }
        )
        content["eval"] = tensors_to_record(
            {"test-probs": rep["test_probs"], "test-labels": rep["test_labels"]}
        )
    content["result"] = MetricRecord(scalars)
    content["metrics"] = MetricRecord({k: float(v) for k, v in result.metrics.items()})
    content["reply"] = tensors_to_record(result.message)
    return content


def decode_result(content: RecordDict) -> TaskResult:
    try:
        scalars = content.metric_records["result"]
        result = TaskResult(
            client_id=int(scalars["client-id"]),
            message=record_to_tensors(content.array_records["reply"]),
            num_samples=int(scalars["num-samples"]),
            metrics={k: float(v) for k, v in content.metric_records["metrics"].items()},
            state=None,  # state stays with the client
        )
        if "eval" in content.array_records:
            arrays = record_to_tensors(content.array_records["eval"])
            result.report = {
                "test_correct": int(scalars["test-correct"]),
                "test_num": int(scalars["test-num"]),
                "test_probs": arrays["test-probs"],
                "test_labels": arrays["test-labels"],
                "train_loss_sum": float(scalars["train-loss-sum"]),
                "train_num": int(scalars["train-num"]),
            }
    except KeyError as e:
        raise CodecError(f"not a ktl reply: record or field {e} is missing") from None
    return result
