"""Human-readable summaries of a federated dataset."""

from __future__ import annotations

from rich.table import Table

from fl_core.data.federated import FederatedDataset

__all__ = ["client_table", "format_label_counts"]


def format_label_counts(counts: list[int] | tuple[int, ...]) -> str:
    """Compact ``label:count`` list of the non-zero entries, e.g. ``"0:12 3:40"``."""
    return " ".join(f"{label}:{n}" for label, n in enumerate(counts) if n)


def client_table(ds: FederatedDataset, max_rows: int | None = None) -> Table:
    """One row per client: id, train/test sizes, number of classes and label counts (train+test).

    ``max_rows`` keeps the first rows only (a footer says how many were left out).
    """
    source = ds.manifest.get("source", {}).get("name", "?")
    scenario = ds.manifest.get("scenario", "?")
    table = Table(title=f"{source} · {scenario} · {ds.num_clients} clients", show_footer=False)
    for name, justify in (
        ("client", "right"),
        ("train", "right"),
        ("test", "right"),
        ("classes", "right"),
        ("label:count", "left"),
    ):
        table.add_column(name, justify=justify)  # type: ignore[arg-type]
    counts = ds.label_counts("all")
    shown = ds.num_clients if max_rows is None else min(max_rows, ds.num_clients)
    for i in range(shown):
        c = ds.client(i)
        row = counts[i].tolist()
        table.add_row(
            str(i),
            str(c.num_train),
            str(c.num_test),
            str(sum(1 for n in row if n)),
            format_label_counts(row),
        )
    if shown < ds.num_clients:
        table.caption = f"{ds.num_clients - shown} more clients not shown"
    return table
