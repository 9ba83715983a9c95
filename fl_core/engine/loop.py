"""The round loop, owned by the engine: train, aggregate, evaluate, checkpoint, stop early."""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable, Mapping
from pathlib import Path

from fl_core.algorithms.base import Reply
from fl_core.config import RunConfig, dump_config
from fl_core.data.federated import FederatedDataset

from .checkpoint import Checkpoint, load_checkpoint, save_checkpoint
from .federation import Federation
from .outputs import MetricsFile, atomic_write_text, write_summary
from .results import RoundRecord, RunResult

# Called after each round (and after round 0's evaluation) with the round's record (None when
# the round was not evaluated); a true return value ends the run after that round.
OnRound = Callable[[int, RoundRecord | None], bool | None]


class TrainingDiverged(RuntimeError):
    """A client's training loss was not finite: the run diverged (see
    ``federation.stop_on_divergence``)."""


def check_divergence(replies: Mapping[int, Reply], round: int, algorithm: str, lr: float) -> None:
    """Raise `TrainingDiverged` naming the clients whose reported training loss is NaN or
    infinite (a client that reports no loss is not checked)."""
    bad = [
        cid
        for cid, reply in replies.items()
        if isinstance(loss := reply.metrics.get("train_loss"), int | float)
        and not math.isfinite(loss)
    ]
    if bad:
        shown = ", ".join(map(str, bad[:5])) + (f" and {len(bad) - 5} more" if len(bad) > 5 else "")
        raise TrainingDiverged(
            f"round {round}: the training loss of client {shown} is not finite: {algorithm} "
            f"diverged. Lower federation.lr (now {lr:g}) or the algorithm's step sizes, or set "
            "federation.stop_on_divergence: false to run on regardless. The metrics of the "
            "rounds before this one are written; no checkpoint is written for this round."
        )


def run(
    config: RunConfig,
    out_dir: str | os.PathLike | None = None,
    dataset: FederatedDataset | None = None,
    on_round: OnRound | None = None,
    resume: bool = False,
) -> RunResult:
    """Run a federation end to end; write config, metrics, summary, curves and checkpoints to
    ``out_dir``. With ``resume``, continue from the checkpoint in ``out_dir``: the finished run
    has exactly the metrics of one that was never interrupted.

    ``on_round(round, record)`` returning true stops the run after that round as if it were the
    last one (checkpointed, summarised, ``result.stop_requested`` set); resuming continues it.
    A time budget is one use: stop at the first round that ends past it."""
    fed_cfg = config.federation
    out = Path(out_dir) if out_dir is not None else None
    ckpt = None
    if resume:
        if out is None:
            raise ValueError("resume needs the run's output folder")
        ckpt = load_checkpoint(out)
    federation = Federation(config, dataset)
    federation.server_context.out_dir = out
    result = RunResult(algorithm=federation.algorithm.name)
    start_round, best, since_best, elapsed_before = 1, -1.0, 0, 0.0
    if ckpt is not None:
        federation.server.load_state_dict(ckpt.server_state)
        for cid, state in ckpt.client_states.items():
            federation.store.put(cid, state)
        federation.bytes_up, federation.bytes_down = ckpt.bytes_up, ckpt.bytes_down
        result = ckpt.result
        if ckpt.round < fed_cfg.rounds:  # continuing (or extending): new clients are re-evaluated
            result.new_client_metrics = None
        start_round = ckpt.round + 1
        best, since_best, elapsed_before = ckpt.best, ckpt.since_best, ckpt.elapsed
    metrics_file = None
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        atomic_write_text(out / "config.yaml", dump_config(config))
        metrics_file = MetricsFile(out / "metrics.jsonl", result.history)
    try:
        start = time.perf_counter() - elapsed_before

        def do_eval(
            rnd: int, train_s: float, agg_s: float, server: dict[str, float] | None = None
        ) -> RoundRecord:
            t0 = time.perf_counter()
            metrics = federation.evaluate(list(range(federation.num_clients)), rnd)
            metrics.update(server or {})
            rec = RoundRecord(
                round=rnd,
                metrics=metrics,
                bytes_up=federation.bytes_up,
                bytes_down=federation.bytes_down,
                seconds=time.perf_counter() - start,
                train_seconds=train_s,
                aggregate_seconds=agg_s,
                eval_seconds=time.perf_counter() - t0,
            )
            result.history.append(rec)
            if metrics_file is not None:
                metrics_file.write(rec)
            return rec

        result.stop_requested = False  # (a resumed run was stopped by its caller, if at all)
        stop = result.stopped_early
        if ckpt is None:
            rec = do_eval(0, 0.0, 0.0)
            if on_round and on_round(0, rec):
                result.stop_requested = stop = True
        for rnd in range(start_round, fed_cfg.rounds + 1):
            if stop:
                break
            t0 = time.perf_counter()
            up, down = federation.train_round(rnd)
            if fed_cfg.stop_on_divergence:
                check_divergence(federation.pending_replies, rnd, result.algorithm, fed_cfg.lr)
            t1 = time.perf_counter()
            server_metrics = federation.aggregate(rnd)
            t2 = time.perf_counter()
            federation.bytes_up += up
            federation.bytes_down += down
            result.bytes_up, result.bytes_down = federation.bytes_up, federation.bytes_down
            result.train_seconds.append(t1 - t0)
            rec = None
            if rnd % fed_cfg.eval_every == 0 or rnd == fed_cfg.rounds:
                rec = do_eval(rnd, t1 - t0, t2 - t1, server_metrics)
                result.eval_seconds.append(rec.eval_seconds)
            result.round_seconds.append(time.perf_counter() - t0)
            result.rounds_run = rnd
            if rec is not None and fed_cfg.early_stop_patience is not None:
                acc = rec.metrics["test_acc"]
                if acc > best:
                    best, since_best = acc, 0
                else:
                    since_best += 1
                    if since_best >= fed_cfg.early_stop_patience:
                        result.stopped_early = stop = True
            if on_round and on_round(rnd, rec):
                result.stop_requested = stop = True
            every = fed_cfg.checkpoint_every
            if out is not None and every and (rnd % every == 0 or stop or rnd == fed_cfg.rounds):
                save_checkpoint(
                    out,
                    Checkpoint(
                        round=rnd,
                        server_state=federation.server.state_dict(),
                        client_states=federation.store.all_states(),
                        result=result,
                        bytes_up=federation.bytes_up,
                        bytes_down=federation.bytes_down,
                        best=best,
                        since_best=since_best,
                        elapsed=time.perf_counter() - start,
                    ),
                )
        if federation.new_client_ids and result.new_client_metrics is None:
            result.new_client_metrics = federation.evaluate(
                federation.new_client_ids,
                result.rounds_run,
                finetune_epochs=fed_cfg.new_client_finetune_epochs,
            )
    finally:
        if metrics_file is not None:
            metrics_file.close()
        federation.close()
    if out is not None:
        write_summary(result, out)
    return result
