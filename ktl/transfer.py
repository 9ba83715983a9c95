"""Cloud-edge knowledge transfer to one edge client: ``ktl transfer``.

One client holds an N-way k-shot subset of a dataset; the server holds the generator. For each
shot count and seed the client trains twice with FedKTL on the same data, model, rounds and
seed: with the transfer task switched off (``mu = 0``: client data only, the same ETF
classifier and margin loss) and with it on (the configured ``mu``). The table gives accuracy
mean ± std over seeds, the gain and the relative gain, as in FedKTL's cloud-edge table.

The test split is the same for every shot count of a seed: up to ``test_per_class`` samples
of each chosen class that are never among the shots.
"""

from __future__ import annotations

import hashlib
import json
import os
import statistics
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from fl_core.config import AlgorithmSpec, RunConfig
from fl_core.data import FederatedDataset
from fl_core.data.federated import ClientData
from fl_core.data.sources import DataError, load_source, normalize
from fl_core.seeding import numpy_rng


@dataclass(frozen=True)
class TransferRow:
    shots: int
    seed: int
    mu: float
    best_acc: float
    final_acc: float
    seconds: float
    config: str = ""  # digest of what the run computes (``transfer_digest``)


# settings that change where a run executes, not what it computes
_RUNTIME_FIELDS = ("seed", "device", "threads")


def transfer_digest(config: RunConfig) -> str:
    """A short digest of everything in ``config`` that the transfer runs compute from, except
    the seed, mu and where they run: rows with the same digest belong to one table."""
    body = transfer_config(config, 0.0).model_dump(mode="json", exclude=set(_RUNTIME_FIELDS))
    text = json.dumps(body, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def few_shot_dataset(
    config: RunConfig, shots: int, seed: int, ways: int | None = None, test_per_class: int = 100
) -> FederatedDataset:
    """One client with ``shots`` training samples of each of ``ways`` classes (default: all),
    drawn with ``seed``, and a disjoint test split of up to ``test_per_class`` per class."""
    if shots < 1:
        raise DataError(f"shots must be >= 1, got {shots}")
    data = config.data
    source = load_source(
        data.dataset, root=data.root, download=data.download, **data.source_options
    )
    k = source.num_classes
    ways = k if ways is None else ways
    if not 2 <= ways <= k:
        raise DataError(f"ways must be in 2..{k} for {data.dataset}, got {ways}")
    rng = numpy_rng(seed, "few-shot")
    classes = np.sort(rng.choice(k, size=ways, replace=False)) if ways < k else np.arange(k)
    labels = source.labels.numpy()
    train_idx, test_idx, train_y, test_y = [], [], [], []
    for new, c in enumerate(classes):
        members = np.flatnonzero(labels == c)
        if len(members) < shots + 1:
            raise DataError(
                f"class {int(c)} of {data.dataset} has {len(members)} samples; {shots} shots "
                "and at least one test sample are needed"
            )
        perm = rng.permutation(members)
        test_part = perm[-min(test_per_class, len(members) - shots) :]
        # shots drawn from the rest, in a seed-fixed order: k shots are a prefix of k' > k shots
        pool = perm[: len(perm) - len(test_part)]
        train_idx.append(pool[:shots])
        test_idx.append(test_part)
        train_y += [new] * shots
        test_y += [new] * len(test_part)
    tr, te = np.concatenate(train_idx), np.concatenate(test_idx)

    def take(idx: np.ndarray) -> torch.Tensor:
        return normalize(
            source.images.index_select(0, torch.from_numpy(idx)), source.mean, source.std
        )

    client = ClientData(
        train_x=take(tr),
        train_y=torch.tensor(train_y, dtype=torch.int64),
        test_x=take(te),
        test_y=torch.tensor(test_y, dtype=torch.int64),
        train_indices=torch.from_numpy(tr),
        test_indices=torch.from_numpy(te),
    )
    manifest = {
        "dataset": source.name,
        "few_shot": {"shots": shots, "ways": ways, "classes": classes.tolist(), "seed": seed},
        "num_clients": 1,
        "num_classes": ways,
        "input_shape": list(source.input_shape),
        "normalization": {
            "formula": "(x/255 - mean)/std"
            if source.images.dtype == torch.uint8
            else "(x - mean)/std",
            "mean": list(source.mean),
            "std": list(source.std),
        },
    }
    return FederatedDataset([client], ways, tuple(source.input_shape), manifest)


def transfer_config(config: RunConfig, mu: float) -> RunConfig:
    """``config`` for one edge client, FedKTL with transfer weight ``mu``."""
    data = config.data.model_copy(update={"num_clients": 1})
    algo = AlgorithmSpec(name="fedktl", **{**config.algorithm.hparams(), "mu": mu})
    fed = config.federation.model_copy(update={"join_ratio": 1.0, "num_new_clients": 0})
    return config.model_copy(update={"data": data, "algorithm": algo, "federation": fed})


def run_transfer(
    config: RunConfig,
    shots: Sequence[int],
    seeds: Sequence[int],
    ways: int | None = None,
    rows_file: Path | None = None,
    on_row: Callable[[TransferRow], None] | None = None,
) -> list[TransferRow]:
    """Every (shots, seed, mu in {0, configured mu}) run; rows already in ``rows_file`` are
    kept and skipped, and the file is rewritten atomically after each new row. A rows file
    written with another configuration (a different digest) is refused rather than mixed in."""
    from fl_core.engine import run

    mu_on = float(config.algorithm_hparams().mu)
    if mu_on <= 0:
        raise ValueError("algorithm.mu must be > 0 for the transfer run (mu = 0 is the baseline)")
    digest = transfer_digest(config)
    rows: list[TransferRow] = []
    if rows_file is not None and rows_file.exists():
        rows = [TransferRow(**r) for r in json.loads(rows_file.read_text())]
        other = sorted({r.config or "(none)" for r in rows if r.config != digest})
        if other:
            raise ValueError(
                f"{rows_file} holds runs of another configuration (digest {', '.join(other)}; "
                f"this one is {digest}): write to another output folder, or remove that file "
                "to start the table again"
            )
    done = {(r.shots, r.seed, r.mu) for r in rows}
    for k in shots:
        for seed in seeds:
            dataset = few_shot_dataset(config, k, seed, ways)
            for mu in (0.0, mu_on):
                if (k, seed, mu) in done:
                    continue
                cfg = transfer_config(config, mu).model_copy(update={"seed": seed})
                t0 = time.perf_counter()
                result = run(cfg, dataset=dataset)
                row = TransferRow(
                    k,
                    seed,
                    mu,
                    float(result.best_test_acc),
                    float(result.final_test_acc),
                    time.perf_counter() - t0,
                    digest,
                )
                rows.append(row)
                if rows_file is not None:
                    _atomic_json(rows_file, [r.__dict__ for r in rows])
                if on_row is not None:
                    on_row(row)
    return rows


def _atomic_json(path: Path, data: object) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    with os.fdopen(fd, "w") as f:
        json.dump(data, f, indent=2)
    os.replace(tmp, path)


def summarize(rows: Sequence[TransferRow]) -> list[dict]:
    """Per shot count: accuracy mean ± std (over seeds) without and with transfer, the gain and
    the relative gain, from the best test accuracy of each run."""
    out = []
    for k in sorted({r.shots for r in rows}):
        base = [r.best_acc for r in rows if r.shots == k and r.mu == 0]
        ktl = [r.best_acc for r in rows if r.shots == k and r.mu > 0]
        if not base or not ktl:
            continue
        b, t = statistics.fmean(base), statistics.fmean(ktl)
        out.append(
            {
                "shots": k,
                "seeds": min(len(base), len(ktl)),
                "client_only": 100 * b,
                "client_only_std": 100 * (statistics.stdev(base) if len(base) > 1 else 0.0),
                "with_ktl": 100 * t,
                "with_ktl_std": 100 * (statistics.stdev(ktl) if len(ktl) > 1 else 0.0),
                "gain": 100 * (t - b),
                "relative_gain": (t - b) / b * 100 if b > 0 else float("nan"),
            }
        )
    return out


def format_table(summary: Sequence[dict]) -> str:
    lines = [
        "| shots | seeds | client data only % | with KTL % | gain (points) | relative gain |",
        "|---|---|---|---|---|---|",
    ]
    for s in summary:
        lines.append(
            f"| {s['shots']} | {s['seeds']} | {s['client_only']:.2f} ± {s['client_only_std']:.2f} "
            f"| {s['with_ktl']:.2f} ± {s['with_ktl_std']:.2f} | {s['gain']:+.2f} "
            f"| {s['relative_gain']:+.1f}% |"
        )
    return "\n".join(lines)
