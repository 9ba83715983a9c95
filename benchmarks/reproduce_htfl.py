"""HtFLlib's heterogeneous-model algorithms on Fashion-MNIST Dir(0.1), 20 clients, on two CPU cores.

Protocol: PFLlib/HtFLlib's practical setting (``configs/default.yaml``): Fashion-MNIST, Dirichlet
(0.1) label split over 20 clients, join ratio 1, 75/25 split, batch 10, 1 local epoch, lr 0.005,
every client evaluated every round. Client i trains architecture i mod 4 of the model group
HtFE-img-cpu-4 = (cnn4, googlenet, mlp, resnet4). Every algorithm registered with family "HtFL"
runs, plus Local (no communication), each with its registered (paper) defaults except
FedL2G's warm-up, shortened to one round (``ALGORITHM_OVERRIDES``).

Why this group. HtFLlib's own image groups do not train on two CPU cores in a reasonable
time: HtFE-img-8 holds ResNet-34/50/101/152 and HtFE-img-4 holds ResNet-18 and MobileNetV2.
Training throughput, one torch thread, batch 10, SGD on 1x28x28 (samples/s; measured with
``--throughput`` on this machine while other jobs shared it, so the ratios are the useful part):

    mlp 12955 | cnn4 1024 | resnet4 211 | googlenet 148 | resnet6 109 | resnet8 80
    mobilenet_v2 74 | resnet10 52 | resnet18 23 | resnet34 13 | resnet50 9 | resnet101 5
    resnet152 3.5

With equal shares of the samples per architecture, a round costs mean(1 / throughput) per
sample: 3.2x a cnn4 round for HtFE-img-cpu-4, 16.6x for HtFE-img-4, about 95x for
HtFE-img-8. HtFE-img-cpu-4 keeps four families (plain CNN, Inception, MLP, ResNet) and two of
HtFE-img-4's members, taking the cheapest member of each family: googlenet is the cheapest deep
CNN after cnn4 (mobilenet_v2 instead would make 4.9x), resnet4 the cheapest ResNet (resnet6:
4.4x), and the MLP stands in for a second, very different, cheap extractor. cnn4 is client 0, as
in HtFE-img-4/8 (HtFLlib builds FML's, FedKD's and FedMRL's shared model from client 0).

Expected time: a Local round on the full data is about 225 s of one core (160 s training, 65 s
evaluating every client's train and test split), so about 2 minutes on two idle cores; the other
algorithms cost 1.0-1.7 Local rounds (FedKD, FedTGP and FML the most), so the whole table, 11
algorithms x 20 rounds, is about 9 hours on two idle cores (more when they are shared;
``--set federation.eval_train_loss=false`` saves about a fifth).

``--htfe8-smoke`` shows that HtFE-img-8 itself runs: 8 clients (one per architecture), a 2,000
sample subset, 2 rounds, FedProto; its row is kept separately (about 5 minutes on two idle
cores: one ResNet-152 client alone trains 230 samples at 3.5/s). On a GPU, the full HtFE-img-8
group runs on the same protocol with ``--group HtFE-img-8 --set device=cuda --set
federation.executor=sequential``.

Resumable: finished rows are kept in ``benchmarks/results/htfl_fmnist.json`` and skipped; an
interrupted run continues from its checkpoint (written every round), and asking for more rounds
continues a finished one (runs live in ``runs/htfl_fmnist/``). The markdown
(``htfl_fmnist.md``) is rewritten after each row; the text between its ``explanation`` markers
is written by hand and kept.

    python benchmarks/reproduce_htfl.py --rounds 20                   # every HtFL algorithm + local
    python benchmarks/reproduce_htfl.py --algorithms fedtgp fd --rounds 20
    python benchmarks/reproduce_htfl.py --htfe8-smoke
    python benchmarks/reproduce_htfl.py --table                       # rewrite the markdown
    python benchmarks/reproduce_htfl.py --throughput cnn4 googlenet   # samples/s, one thread
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import signal
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_RESULTS = ROOT / "benchmarks" / "results" / "htfl_fmnist.json"
DEFAULT_GROUP = "HtFE-img-cpu-4"
PROTOCOL = {"data.partition": "dir", "data.alpha": 0.1, "data.num_clients": 20}
# Registered defaults that do not fit a run of a few dozen rounds, changed for every run here:
# FedL2G's 50 warm-up rounds precede HtFLlib's up to 2,000 training rounds (2.5% of them), but
# are rounds of the run here, in which clients do not train: 50 would leave a 20-round run
# untrained. One warm-up round (2.5% of 20 rounds, rounded up) meta-learns the guides once.
ALGORITHM_OVERRIDES: dict[str, list[str]] = {"fedl2g": ["algorithm.warm_up_rounds=1"]}
# Overrides that change where and how a run executes, not what it computes: kept out of a row's
# key, so a GPU run of the protocol is the protocol's row (its device is stated beside it).
RUNTIME_KEYS = (
    "device",
    "threads",
    "federation.executor",
    "federation.workers",
    "federation.threads_per_worker",
    "federation.checkpoint_every",
)
HTFE8_SMOKE = {
    "group": "HtFE-img-8",
    "rounds": 2,
    "algorithms": ["fedproto"],
    "extra": ["data.num_clients=8", "data.max_samples=2000"],
}

# Training samples/s, one torch thread, batch 10, 1x28x28 (see the module docstring).
THROUGHPUT = {
    "mlp": 12955,
    "cnn4": 1024,
    "resnet4": 211,
    "googlenet": 148,
    "resnet6": 109,
    "resnet8": 80,
    "mobilenet_v2": 74,
    "resnet10": 52,
    "resnet18": 23,
    "resnet34": 13,
    "resnet50": 9,
    "resnet101": 5,
    "resnet152": 3.5,
}

# HtFLlib's published orderings, from the reference notes (FedKTL's poster, §2.4): each setting's
# winner and best baseline, test accuracy in %, 20 clients, HtFE-img-8 unless the group is named.
# The notes hold no table of the FedTGP paper (§3), so none is printed for it.
PUBLISHED_BEST: list[tuple[str, float, str, float]] = [
    ("Cifar10, pathological", 88.43, "fedkd", 87.32),
    ("Cifar100, pathological", 62.01, "fedgen", 58.26),
    ("Flowers102, pathological", 64.72, "fedgen", 59.90),
    ("Tiny-ImageNet, pathological", 34.74, "fedkd", 32.64),
    ("Cifar10, Dir(0.1)", 87.63, "fedkd", 86.45),
    ("Cifar100, Dir(0.1)", 46.94, "fd", 41.54),
    ("Flowers102, Dir(0.1)", 53.16, "fd", 49.13),
    ("Tiny-ImageNet, Dir(0.1)", 28.17, "fedkd", 25.51),
    ("Cifar100, Dir(0.1), HtFE-img-2", 48.06, "fd", 46.88),
    ("Cifar100, Dir(0.1), HtFE-img-3", 49.83, "lg-fedavg", 45.56),
    ("Cifar100, Dir(0.1), HtFE-img-4", 47.06, "lg-fedavg", 43.91),
    ("Cifar100, Dir(0.1), HtFE-img-9", 50.33, "fedgh", 43.02),
    ("Cifar100, Dir(0.1), HtM-img-10", 45.84, "fd", 40.95),
]
# FedKTL's poster, communication per iteration on Cifar100, 20 clients (its "M" units).
PUBLISHED_COMM: list[tuple[str, float, float]] = [
    ("fedktl", 0.09, 7.17),
    ("fd", 0.09, 0.20),
    ("fedproto", 0.46, 1.02),
    ("lg-fedavg", 1.03, 1.03),
    ("fml", 18.5, 18.5),
    ("fedkd", 16.52, 16.52),
]

EXPLANATION_START = (
    "<!-- explanation: start (written by hand; kept when the table is rewritten) -->"
)
EXPLANATION_END = "<!-- explanation: end -->"
EXPLANATION_PLACEHOLDER = (
    "**[Explanation to be written once the 20-round rows exist.]** Where our ordering differs "
    "from HtFLlib's, say why here (dataset, group, rounds, hyperparameters); the script fills "
    "only the measured ranking above."
)


def default_algorithms() -> list[str]:
    """Every algorithm registered with family HtFL, plus local."""
    from fl_core.algorithms import registered_algorithms

    algos = registered_algorithms()
    return sorted(n for n, a in algos.items() if a.family == "HtFL") + ["local"]


def relative_cost(group: tuple[str, ...], reference: str = "cnn4") -> float | None:
    """Training cost per sample of `group` (equal shares per entry) over `reference`'s."""
    if any(a not in THROUGHPUT for a in group):
        return None
    return sum(1 / THROUGHPUT[a] for a in group) / len(group) * THROUGHPUT[reference]


def measure_throughput(names: list[str], seconds: float = 2.0) -> None:
    """Print training and evaluation samples/s of each architecture, one torch thread."""
    import torch

    torch.set_num_threads(1)
    for name in names:
        train, evaluate = samples_per_second(name, seconds)
        print(f"{name}: train {train:.1f}/s, eval {evaluate:.1f}/s", flush=True)


def samples_per_second(name: str, seconds: float) -> tuple[float, float]:
    """(training, evaluation) samples/s of `name` on 1x28x28 at batch 10, SGD lr 0.005."""
    import torch

    from fl_core.models import build_model

    torch.manual_seed(0)
    model = build_model(name, (1, 28, 28), 10, feature_dim=512)
    opt = torch.optim.SGD(model.parameters(), lr=0.005)
    x, y = torch.randn(10, 1, 28, 28), torch.randint(0, 10, (10,))

    def step() -> None:
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(x), y).backward()
        opt.step()

    model.train()
    step()  # warm-up
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        step()
        n += 10
    train = n / (time.perf_counter() - t0)
    model.eval()
    with torch.no_grad():
        n, t0 = 0, time.perf_counter()
        while time.perf_counter() - t0 < seconds / 2:
            model(x)
            n += 10
    return train, n / (time.perf_counter() - t0)


class Store:
    """Rows in a JSON file, the markdown beside it, the run folders under ``runs/<stem>``."""

    def __init__(self, results: Path, runs: Path | None):
        self.rows_file = results
        self.table_file = results.with_suffix(".md")
        self.runs = runs if runs is not None else ROOT / "runs" / results.stem

    def load(self) -> list[dict]:
        return json.loads(self.rows_file.read_text()) if self.rows_file.exists() else []

    def save(self, rows: list[dict]) -> None:
        self.rows_file.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.rows_file.with_suffix(".tmp")
        tmp.write_text(json.dumps(rows, indent=2))
        os.replace(tmp, self.rows_file)


def row_key(r: dict) -> tuple:
    return (r["algorithm"], r["group"], r["rounds"], r["overrides"])


def run_folder(store: Store, algorithm: str, group: str, extra: list[str]) -> Path:
    """One folder per (algorithm, group, overrides): a longer run resumes a shorter one."""
    name = "-".join([group, algorithm, *ALGORITHM_OVERRIDES.get(algorithm, []), *extra])
    return store.runs / re.sub(r"[^A-Za-z0-9._=+-]", "_", name)


def split_runtime(extra: list[str]) -> tuple[list[str], list[str]]:
    """(protocol overrides, runtime overrides) of ``--set`` items."""
    runtime = [o for o in extra if o.split("=", 1)[0].strip() in RUNTIME_KEYS]
    return [o for o in extra if o not in runtime], runtime


def machine_name(device: str) -> str:
    text = f"{platform.machine()}, {os.cpu_count()} cores"
    if device.startswith("cuda"):
        import torch

        if torch.cuda.is_available():
            text += f", {torch.cuda.get_device_name(0)}"
    return text


def run_row(
    store: Store,
    algorithm: str,
    group: str,
    rounds: int,
    extra: list[str],
    runtime: list[str] = (),
    deadline: float | None = None,
) -> dict:
    """Run (or continue) one algorithm and return its row. With ``deadline`` (a
    ``time.monotonic()`` value) the run stops after the first round that ends past it and the
    row is partial: ``rounds_run`` < ``rounds``."""
    from fl_core.config import load_config
    from fl_core.engine import run
    from fl_core.engine.checkpoint import find_checkpoint
    from fl_core.engine.federation import round_half_up
    from fl_core.models import get_group

    overrides = [f"{k}={v}" for k, v in PROTOCOL.items()]
    overrides += [
        f"model.name={group}",
        f"algorithm.name={algorithm}",
        f"federation.rounds={rounds}",
        "federation.checkpoint_every=1",
        *ALGORITHM_OVERRIDES.get(algorithm, []),
        *extra,
        *runtime,
    ]
    cfg = load_config(ROOT / "configs" / "default.yaml", overrides)
    out = run_folder(store, algorithm, group, extra)
    ckpt = find_checkpoint(out)
    if ckpt is not None and json.loads((ckpt / "progress.json").read_text())["round"] > rounds:
        out = out.with_name(f"{out.name}-r{rounds}")  # a longer run exists: do not truncate it
        ckpt = find_checkpoint(out)
    resume = ckpt is not None
    t0 = time.perf_counter()

    def progress(rnd: int, rec) -> bool:
        acc = f" acc {rec.metrics['test_acc']:.4f}" if rec is not None else ""
        print(f"  {group}/{algorithm} round {rnd}/{rounds}{acc}", flush=True)
        return deadline is not None and 0 < rnd < rounds and time.monotonic() > deadline

    summary, cut = run_or_cut_off(
        lambda: run(cfg, out_dir=out, on_round=progress, resume=resume), out
    )
    if summary["stop_requested"]:
        why = "cut off by SIGTERM" if cut else "time budget spent"
        print(f"  {group}/{algorithm}: {why} after {summary['rounds']} rounds", flush=True)
    per_round = max(summary["rounds"], 1)
    fed = cfg.federation
    # nominal: exact with join ratio 1 and no drops, as in this protocol
    per_round_clients = max(1, round_half_up(fed.join_ratio * cfg.data.num_clients))
    return {
        "algorithm": algorithm,
        "group": group,
        "architectures": list(get_group(group)),
        "rounds": rounds,
        "rounds_run": summary["rounds"],
        "overrides": extra,
        "runtime": list(runtime),
        "algorithm_overrides": ALGORITHM_OVERRIDES.get(algorithm, []),
        "hparams": cfg.algorithm_hparams().model_dump(),
        "clients_per_round": per_round_clients,
        "best_test_acc": summary["best_test_acc"],
        "best_round": summary["best_round"],
        "final_test_acc": summary["final_test_acc"],
        "seconds_per_round": summary["seconds_per_round"],
        "median_train_seconds": summary["median_train_seconds"],
        "median_eval_seconds": summary["median_eval_seconds"],
        "bytes_up_per_round_per_client": summary["bytes_up"] / per_round / per_round_clients,
        "bytes_down_per_round_per_client": summary["bytes_down"] / per_round / per_round_clients,
        "wall_seconds_this_session": time.perf_counter() - t0,
        "resumed": resume,
        "cut_off": cut,
        "device": cfg.device,
        "machine": machine_name(cfg.device),
        "date": time.strftime("%Y-%m-%d"),
    }


def fmt_bytes(n: float) -> str:
    for unit, size in (("MB", 1e6), ("kB", 1e3)):
        if n >= size:
            return f"{n / size:.2f} {unit}"
    return f"{n:.0f} B"


def plural(n: int, noun: str) -> str:
    return f"{n} {noun}{'' if n == 1 else 's'}"


def label(r: dict) -> str:
    """The algorithm, with the hyperparameters this benchmark changed from its defaults."""
    changed = [o.removeprefix("algorithm.") for o in r.get("algorithm_overrides", [])]
    return r["algorithm"] + (f" ({', '.join(changed)})" if changed else "")


def settings(rows: list[dict]) -> dict[tuple, list[dict]]:
    """Rows by (group, overrides, rounds): each is one comparable ranking."""
    out: dict[tuple, list[dict]] = {}
    for r in rows:
        out.setdefault((r["group"], tuple(r["overrides"]), r["rounds"]), []).append(r)
    for group in out.values():
        group.sort(key=lambda r: -r["best_test_acc"])
    return out


def kept_explanation(table: Path) -> str:
    if table.exists():
        text = table.read_text()
        start, end = text.find(EXPLANATION_START), text.find(EXPLANATION_END)
        if 0 <= start < end:
            return text[start + len(EXPLANATION_START) : end].strip()
    return EXPLANATION_PLACEHOLDER


def main_setting(by_setting: dict[tuple, list[dict]]) -> tuple | None:
    """The protocol's ranking: the default group without extra overrides, most rounds (else,
    as in a smoke run, the setting with the most rows)."""
    keys = [k for k in by_setting if k[0] == DEFAULT_GROUP and not k[1]] or list(by_setting)
    return max(keys, key=lambda k: (len(by_setting[k]) > 1, k[2], len(by_setting[k])), default=None)


def write_table(store: Store, rows: list[dict]) -> None:
    from fl_core.models import get_group

    group = get_group(DEFAULT_GROUP)
    cost = relative_cost(group)
    tput = ", ".join(f"{a} {THROUGHPUT[a]:g}" for a in sorted(THROUGHPUT, key=THROUGHPUT.get)[::-1])
    lines = [
        "# HtFL algorithms on Fashion-MNIST Dir(0.1), 20 clients, a heterogeneous model group",
        "",
        "Protocol (PFLlib/HtFLlib practical setting): Dirichlet(0.1) labels over 20 clients, join "
        "ratio 1, 75/25 split, batch 10, 1 local epoch, lr 0.005, every client evaluated every "
        "round, each algorithm with its registered (paper) defaults except where the algorithm "
        "column names a change (FedL2G's 50 warm-up rounds, in which clients do not train, "
        "would leave a 20-round run untrained). Best = best mean test "
        "accuracy over the evaluated rounds (round reached in brackets). Bytes are per round per "
        "participating client (total / rounds / clients per round). Seconds per round include "
        "the evaluation of every client (test accuracy and train loss). Written by "
        "`benchmarks/reproduce_htfl.py`.",
        "",
        f"**The group {DEFAULT_GROUP}** = ({', '.join(group)}); client i trains entry i mod 4. "
        "HtFLlib's image groups do not train on two CPU cores in a reasonable time (HtFE-img-8 "
        "holds ResNet-34 to "
        "-152, HtFE-img-4 ResNet-18 and MobileNetV2). Training throughput, one torch thread, "
        f"batch 10, 1x28x28, samples/s: {tput}. With equal shares per architecture a round costs "
        f"{cost:.1f}x a cnn4 round for {DEFAULT_GROUP} (HtFE-img-4: "
        f"{relative_cost(get_group('HtFE-img-4')):.1f}x, HtFE-img-8: "
        f"{relative_cost(get_group('HtFE-img-8')):.0f}x). It keeps four families (plain CNN, "
        "Inception, MLP, ResNet), the cheapest member of each, and cnn4 as client 0 (the shared "
        "model of FML, FedKD and FedMRL is cnn4, as in HtFLlib).",
        "",
    ]
    by_setting = settings(rows)
    first = main_setting(by_setting)
    for (grp, extra, rounds), rs in sorted(by_setting.items(), key=lambda kv: kv[0] != first):
        what = f"{grp}, {plural(rounds, 'round')}" + (f", {', '.join(extra)}" if extra else "")
        lines += [
            f"## {what}",
            "",
            f"Clients train ({', '.join(rs[0]['architectures'])}) in turn. Machines: "
            + "; ".join(sorted({f"{r.get('device', 'cpu')} = {r['machine']}" for r in rs}))
            + ". A run stopped by its time budget shows fewer rounds run than the setting's.",
            "",
            "| rank | algorithm | rounds run | best % (round) | final % | up / round / client "
            "| down / round / client | s / round | train s (median) | eval s (median) | device "
            "| date |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|",
        ]
        for rank, r in enumerate(rs, 1):
            lines.append(
                f"| {rank} | {label(r)} | {r.get('rounds_run', r['rounds'])} | "
                f"{100 * r['best_test_acc']:.2f} "
                f"({r['best_round']}) | {100 * r['final_test_acc']:.2f} | "
                f"{fmt_bytes(r['bytes_up_per_round_per_client'])} | "
                f"{fmt_bytes(r['bytes_down_per_round_per_client'])} | "
                f"{r['seconds_per_round']:.1f} | {r['median_train_seconds']:.1f} | "
                f"{r['median_eval_seconds']:.1f} | {r.get('device', 'cpu')} | {r['date']} |"
            )
        lines.append("")
    lines += comparison(by_setting)
    lines += ["", EXPLANATION_START, kept_explanation(store.table_file), EXPLANATION_END, ""]
    store.table_file.parent.mkdir(parents=True, exist_ok=True)
    store.table_file.write_text("\n".join(lines))
    print("\n".join(lines))


def comparison(by_setting: dict[tuple, list[dict]]) -> list[str]:
    key = main_setting(by_setting)
    ours = by_setting.get(key, []) if key is not None else []
    rank = {r["algorithm"]: i for i, r in enumerate(ours, 1)}
    lines = [
        "## Ordering beside HtFLlib's published tables",
        "",
        "HtFLlib's figures are on Cifar10/100, Flowers102 and Tiny-ImageNet with HtFE-img-8 "
        "(unless named), 20 clients (HtFLlib's total.sh: lr 0.01, up to 2,000 rounds with "
        "auto-break). The reference notes hold, from FedKTL's poster, each setting's winner "
        "(FedKTL, not run here) and best baseline; they hold no table of the FedTGP paper, so "
        "its ordering is not printed. Names are ours: FedDistill is `fd`.",
        "",
    ]
    if ours:
        extra = f", {', '.join(key[1])}" if key[1] else ""
        lines.append(
            f"**Ours ({key[0]}, {plural(key[2], 'round')}{extra}), best accuracy, high to "
            "low:** " + " > ".join(f"{r['algorithm']} {100 * r['best_test_acc']:.2f}" for r in ours)
        )
    else:
        lines.append("**Ours:** no rows yet for the protocol's group.")
    n = len(ours)
    lines += [
        "",
        "| setting (FedKTL poster) | FedKTL | best baseline | its accuracy | its rank here |",
        "|---|---|---|---|---|",
    ]
    for setting, ktl, base, acc in PUBLISHED_BEST:
        here = f"{rank[base]} of {n}" if base in rank else "not run"
        lines.append(f"| {setting} | {ktl:.2f} | {base} | {acc:.2f} | {here} |")
    by_up = {r["algorithm"]: r["bytes_up_per_round_per_client"] for r in ours}
    pub = sorted(PUBLISHED_COMM, key=lambda t: (t[1], t[2]))
    lines += [
        "",
        "Communication, upload per round, low to high (upload/download shown). FedKTL's "
        "poster, Cifar100 (its units, all clients): "
        + " <= ".join(f"{a} {up:g}M/{down:g}M" for a, up, down in pub)
        + ". Ours, per client: "
        + (
            " <= ".join(f"{a} {fmt_bytes(b)}" for a, b in sorted(by_up.items(), key=lambda t: t[1]))
            or "no rows yet"
        )
        + ".",
    ]
    return lines


class CutOff(Exception):
    """SIGTERM arrived (``timeout`` in benchmarks/device_*.sh): the run stops where it is."""


def stop_on_sigterm() -> None:
    """Turn SIGTERM into :class:`CutOff` in this process, so that a run cut off by a time limit
    still gives the row of the rounds it finished instead of none."""

    def cut_off(signum, frame):
        raise CutOff

    signal.signal(signal.SIGTERM, cut_off)


def summary_from_metrics(out: Path, algorithm: str = "") -> dict:
    """A run's summary rebuilt from the rounds in its metrics.jsonl, for a run that ended
    without returning one (its seconds per round count training, aggregation and evaluation)."""
    from fl_core.engine.outputs import read_metrics
    from fl_core.engine.results import RunResult

    result = RunResult.from_history(algorithm, read_metrics(out / "metrics.jsonl"))
    result.stop_requested = True
    return result.summary()


def run_or_cut_off(run_once, out: Path) -> tuple[dict, bool]:
    """``run_once()``'s summary, or, when SIGTERM cuts it off, that of its finished rounds;
    and whether it was cut off."""
    try:
        return run_once().summary(), False
    except CutOff:
        return summary_from_metrics(out), True


def add_budget_options(ap: argparse.ArgumentParser) -> None:
    """``--deadline`` and ``--merge``: how a table is filled under a time budget elsewhere (a GPU
    machine) and its rows brought back."""
    ap.add_argument(
        "--deadline",
        type=float,
        default=None,
        help="seconds: stop each run after the first round past this budget (a partial row); "
        "a SIGTERM then also ends the run with the row of its finished rounds",
    )
    ap.add_argument(
        "--merge", nargs="+", type=Path, default=None, help="add the rows of other results JSONs"
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument(
        "--algorithms", nargs="+", default=None, help="default: every HtFL algorithm, and local"
    )
    ap.add_argument("--group", default=DEFAULT_GROUP, help="model group (or one model)")
    ap.add_argument("--rounds", type=int, default=20)
    ap.add_argument("--set", dest="extra", action="append", default=[], help="extra override")
    ap.add_argument(
        "--htfe8-smoke",
        action="store_true",
        help="HtFE-img-8 on 8 clients, 2,000 samples, 2 rounds, FedProto (a row of its own)",
    )
    ap.add_argument("--results", type=Path, default=DEFAULT_RESULTS, help="rows JSON (.md beside)")
    ap.add_argument("--runs", type=Path, default=None, help="run folders (default runs/<stem>)")
    ap.add_argument("--table", action="store_true", help="only rewrite the markdown table")
    add_budget_options(ap)
    ap.add_argument("--throughput", nargs="+", metavar="ARCH", help="only measure samples/s")
    args = ap.parse_args()
    if args.throughput:
        measure_throughput(args.throughput)
        return
    store = Store(args.results.resolve(), args.runs)
    if args.merge:
        rows = store.load()
        for path in args.merge:
            for row in json.loads(path.read_text()):
                rows = [r for r in rows if row_key(r) != row_key(row)] + [row]
        store.save(rows)
        write_table(store, rows)
        return
    deadline = None if args.deadline is None else time.monotonic() + args.deadline
    if args.deadline is not None:  # a budgeted run: a kill by `timeout` still gives a row
        stop_on_sigterm()
    group, rounds = args.group, args.rounds
    extra, runtime = split_runtime(list(args.extra))
    algorithms = args.algorithms
    if args.htfe8_smoke:
        group, rounds = HTFE8_SMOKE["group"], HTFE8_SMOKE["rounds"]
        extra = HTFE8_SMOKE["extra"] + extra
        algorithms = algorithms or HTFE8_SMOKE["algorithms"]
    rows = store.load()
    if not args.table:
        for algorithm in algorithms or default_algorithms():
            key = (algorithm, group, rounds, extra)
            if any(row_key(r) == key and r.get("rounds_run", rounds) >= rounds for r in rows):
                print(f"kept: {group}/{algorithm}/{rounds} rounds", flush=True)
                continue
            if deadline is not None and time.monotonic() > deadline:
                print(f"skipped (time budget spent): {group}/{algorithm}", flush=True)
                continue
            row = run_row(store, algorithm, group, rounds, extra, runtime, deadline)
            rows = [r for r in store.load() if row_key(r) != key] + [row]
            store.save(rows)
            write_table(store, rows)
    write_table(store, rows)


if __name__ == "__main__":
    sys.exit(main())
