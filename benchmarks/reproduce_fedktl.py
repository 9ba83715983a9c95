"""FedKTL beside every HtFL baseline on the HtFL protocol, and the cloud-edge transfer table.

1. **Federation.** FedKTL runs on exactly the protocol of ``benchmarks/reproduce_htfl.py``
   (Fashion-MNIST Dir(0.1), 20 clients, HtFE-img-cpu-4, batch 10, 1 local epoch, lr 0.005,
   20 rounds) and its row joins that script's rows (``benchmarks/results/htfl_fmnist.json``),
   so the ranking is one table. For every row with a run folder the server's share of a round
   is read from its per-round records (``aggregate_seconds / seconds`` of the round).
2. **Cloud-edge.** ``ktl transfer``'s table (``configs/transfer_animal.yaml``, shots 2, 9, 23,
   3 seeds by default); its rows are kept in ``benchmarks/results/fedktl_transfer.json``.

Both parts are resumable (finished rows are kept; an interrupted federation continues from its
checkpoint). ``benchmarks/results/fedktl.md`` is rewritten after each part; the text between its
``explanation`` markers is written by hand and kept.

    python benchmarks/reproduce_fedktl.py                      # both parts
    python benchmarks/reproduce_fedktl.py --part federation --rounds 20
    python benchmarks/reproduce_fedktl.py --part transfer --shots 2 9 23 --seeds 3
    python benchmarks/reproduce_fedktl.py --table              # rewrite the markdown only
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))

import reproduce_htfl as htfl  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"
TABLE = RESULTS / "fedktl.md"
TRANSFER_ROWS = RESULTS / "fedktl_transfer.json"
TRANSFER_CONFIG = ROOT / "configs" / "transfer_animal.yaml"
START, END = htfl.EXPLANATION_START, htfl.EXPLANATION_END


def server_share(row: dict, store: htfl.Store) -> float | None:
    """Median over rounds of (server aggregation seconds / round seconds), from the run's
    per-round records; None without this row's run folder here."""
    from fl_core.engine.outputs import read_metrics

    folder = htfl.run_folder(store, row["algorithm"], row["group"], row["overrides"])
    last = row.get("rounds_run", row["rounds"])
    recs = [r for r in read_metrics(folder / "metrics.jsonl") if r.round <= last]
    if not recs or max(r.metrics["test_acc"] for r in recs) != row["best_test_acc"]:
        return None  # the folder holds another run (the row came from another machine)
    shares = [
        r.aggregate_seconds / (r.seconds - prev.seconds)
        for prev, r in zip(recs, recs[1:], strict=False)
        if r.round > 0 and r.seconds > prev.seconds
    ]
    return statistics.median(shares) if shares else None


def record_server_shares(store: htfl.Store) -> list:
    """The rows, each with its ``server_share`` measured once from its run folder and then kept
    in the row (run folders do not travel between machines; the rows do)."""
    rows = store.load()
    changed = False
    for r in rows:
        if r.get("server_share") is None and (share := server_share(r, store)) is not None:
            r["server_share"] = share
            changed = True
    if changed:
        store.save(rows)
    return rows


def write_table(store: htfl.Store, transfer_rows: list) -> None:
    from ktl.transfer import format_table, summarize

    rows = record_server_shares(store)
    by_setting = htfl.settings(rows)
    key = htfl.main_setting(by_setting)
    ours = by_setting.get(key, []) if key is not None else []
    lines = [
        "# FedKTL beside the HtFL baselines, and cloud-edge transfer",
        "",
        "Written by `benchmarks/reproduce_fedktl.py`.",
        "",
        "## Federation (the HtFL protocol of `reproduce_htfl.py`)",
        "",
    ]
    if ours:
        lines += [
            f"{key[0]}, {htfl.plural(key[2], 'round')}; the rows of `htfl_fmnist.md` with "
            "FedKTL among them. Server share = median over rounds of the server's aggregation "
            "time over the round's time, measured from the run's records (blank where they were "
            "not kept).",
            "",
            "| rank | algorithm | rounds run | best % (round) | up / round / client "
            "| down / round / client | s / round | server share | device |",
            "|---|---|---|---|---|---|---|---|---|",
        ]
        for rank, r in enumerate(ours, 1):
            share = r.get("server_share")
            lines.append(
                f"| {rank} | {htfl.label(r)} | {r.get('rounds_run', r['rounds'])} | "
                f"{100 * r['best_test_acc']:.2f} ({r['best_round']}) | "
                f"{htfl.fmt_bytes(r['bytes_up_per_round_per_client'])} | "
                f"{htfl.fmt_bytes(r['bytes_down_per_round_per_client'])} | "
                f"{r['seconds_per_round']:.1f} | "
                f"{'' if share is None else f'{100 * share:.1f}%'} | {r.get('device', 'cpu')} |"
            )
        if not any(r["algorithm"] == "fedktl" for r in ours):
            lines += ["", "FedKTL has no row yet: run `--part federation`."]
    else:
        lines.append("No rows yet: run `--part federation`.")
    lines += ["", "## Cloud-edge: one edge client, with and without transfer", ""]
    if transfer_rows:
        lines += [
            f"`ktl transfer {TRANSFER_CONFIG.relative_to(ROOT)}`: best test accuracy of each "
            "run; client data only = the same client and rounds with mu = 0.",
            "",
            format_table(summarize(transfer_rows)),
        ]
    else:
        lines.append("No rows yet: run `--part transfer`.")
    old = TABLE.read_text() if TABLE.exists() else ""
    s, e = old.find(START), old.find(END)
    kept = old[s + len(START) : e].strip() if 0 <= s < e else "**[Explanation to be written.]**"
    lines += ["", START, kept, END, ""]
    TABLE.parent.mkdir(parents=True, exist_ok=True)
    tmp = TABLE.with_suffix(".tmp")
    tmp.write_text("\n".join(lines))
    tmp.replace(TABLE)
    print("\n".join(lines))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--part", choices=["federation", "transfer", "both"], default="both")
    ap.add_argument("--rounds", type=int, default=20)
    ap.add_argument("--set", dest="extra", action="append", default=[], help="federation override")
    ap.add_argument("--deadline", type=float, default=None, help="seconds for the federation")
    ap.add_argument("--shots", type=int, nargs="+", default=[2, 9, 23])
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument(
        "--transfer-set", action="append", default=[], help="override for the transfer config"
    )
    ap.add_argument("--table", action="store_true", help="only rewrite the markdown")
    args = ap.parse_args()
    from ktl.transfer import TransferRow, run_transfer

    store = htfl.Store(htfl.DEFAULT_RESULTS, None)
    transfer_rows = (
        [TransferRow(**r) for r in json.loads(TRANSFER_ROWS.read_text())]
        if TRANSFER_ROWS.exists()
        else []
    )
    if not args.table and args.part in ("federation", "both"):
        extra, runtime = htfl.split_runtime(list(args.extra))
        deadline = None if args.deadline is None else time.monotonic() + args.deadline
        key = ("fedktl", htfl.DEFAULT_GROUP, args.rounds, extra)
        rows = store.load()
        if not any(
            htfl.row_key(r) == key and r.get("rounds_run", args.rounds) >= args.rounds for r in rows
        ):
            row = htfl.run_row(
                store, "fedktl", htfl.DEFAULT_GROUP, args.rounds, extra, runtime, deadline
            )
            rows = [r for r in store.load() if htfl.row_key(r) != key] + [row]
            store.save(rows)
            htfl.write_table(store, rows)
        write_table(store, transfer_rows)
    if not args.table and args.part in ("transfer", "both"):
        from fl_core.config import load_config

        cfg = load_config(TRANSFER_CONFIG, args.transfer_set)
        transfer_rows = run_transfer(
            cfg,
            args.shots,
            list(range(args.seeds)),
            rows_file=TRANSFER_ROWS,
            on_row=lambda r: print(f"  {r.shots}-shot seed {r.seed} mu {r.mu}: {r.best_acc:.4f}"),
        )
    write_table(store, transfer_rows)


if __name__ == "__main__":
    main()
