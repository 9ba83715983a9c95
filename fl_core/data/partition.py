"""Partitioners: pure functions from labels + seed to one sorted index array per client.

Every scenario first decides a *count matrix* ``counts[client, class]`` (how many samples of each
class each client gets), then a bounded repair step enforces ``min_samples`` by moving samples
from clients with surplus to clients under the minimum (a moved sample keeps its label), and
finally the indices of each class are shuffled and cut by those counts. Each step is bounded, so
every call terminates: it returns a partition that is disjoint, complete and meets
``min_samples``, or raises :class:`DataError` naming the parameter to change.

Semantics follow PFLlib's ``separate_data`` (iid, pathological, practical Dirichlet with its
N/num_clients cap, extended Dirichlet of Li et al., arXiv 2311.03154); the redraw loops that can
hang there are capped at ``max_redraws`` and followed by the repair.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

from fl_core.data.sources import DataError
from fl_core.seeding import numpy_rng

__all__ = [
    "SCENARIOS",
    "default_min_samples",
    "dirichlet_partition",
    "extended_dirichlet_partition",
    "iid_partition",
    "partition_labels",
    "pathological_partition",
    "resolve_scenario",
    "train_test_split",
]

MAX_REDRAWS = 100


def default_min_samples(
    num_samples: int, num_clients: int, batch_size: int = 10, train_ratio: float = 0.75
) -> int:
    """PFLlib's ``least_samples`` (enough for one test batch, at most half a fair share), >= 1."""
    return max(1, int(min(batch_size / (1.0 - train_ratio), num_samples / num_clients / 2)))


# ----------------------------------------------------------------------------- shared steps


def _check_common(labels: np.ndarray, num_clients: int, min_samples: int) -> np.ndarray:
    labels = np.asarray(labels)
    if labels.ndim != 1 or not np.issubdtype(labels.dtype, np.integer):
        raise DataError(
            f"labels must be a 1-D integer array, got shape {labels.shape} dtype {labels.dtype}"
        )
    if len(labels) == 0:
        raise DataError("labels is empty: nothing to partition")
    if labels.min() < 0:
        raise DataError("labels must be non-negative class ids")
    if int(num_clients) != num_clients or num_clients < 1:
        raise DataError(f"num_clients must be an integer >= 1, got {num_clients}")
    if min_samples < 0:
        raise DataError(f"min_samples must be >= 0, got {min_samples}")
    if num_clients * min_samples > len(labels):
        raise DataError(
            f"min_samples={min_samples} x num_clients={num_clients} = {num_clients * min_samples} "
            f"exceeds the {len(labels)} samples available; lower min_samples or num_clients"
        )
    return labels


def _class_sizes(labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Present classes (sorted) and how many samples each has."""
    classes, sizes = np.unique(labels, return_counts=True)
    return classes, sizes.astype(np.int64)


def _proportional(weights: np.ndarray, n: int) -> np.ndarray:
    """Integer counts summing to n, proportional to weights (cut points of the cumulative sum)."""
    cuts = np.minimum(np.floor(np.cumsum(weights / weights.sum()) * n).astype(np.int64), n)
    cuts[-1] = n  # float round-off must not lose the last samples
    return np.diff(np.concatenate([[0], cuts]))


def _equal_shares(n: int, holders: np.ndarray, totals: np.ndarray) -> np.ndarray:
    """n split as evenly as possible; the +1 remainders go to the holders with the least so far."""
    m = len(holders)
    shares = np.full(m, n // m, dtype=np.int64)
    order = np.lexsort((holders, totals[holders]))  # fewest samples first, ties by client id
    shares[order[: n % m]] += 1
    return shares


def _repair(
    counts: np.ndarray, allowed: np.ndarray, min_samples: int, param_hint: str
) -> np.ndarray:
    """Move samples from clients with surplus to clients under ``min_samples``.

    A recipient takes first labels it already holds, then any label it is allowed (``allowed``
    keeps pathological/extended-Dirichlet clients within their classes). Each move fills the
    recipient or exhausts a donor's surplus or a (donor, label) cell, so the loop is bounded.
    """
    counts = counts.copy()
    totals = counts.sum(axis=1)
    for r in np.flatnonzero(totals < min_samples):
        while totals[r] < min_samples:
            surplus = np.clip(totals - min_samples, 0, None)
            for mask in ((counts[r] > 0) & allowed[r], allowed[r]):
                cols = np.flatnonzero(mask)
                if cols.size == 0:
                    continue
                avail = np.minimum(counts[:, cols], surplus[:, None])
                if avail.max() > 0:
                    donor, j = np.unravel_index(int(np.argmax(avail)), avail.shape)
                    amount = min(int(min_samples - totals[r]), int(avail[donor, j]))
                    label = cols[j]
                    counts[donor, label] -= amount
                    counts[r, label] += amount
                    totals[donor] -= amount
                    totals[r] += amount
                    break
            else:
                raise DataError(
                    f"cannot give client {r} min_samples={min_samples}: no client with spare "
                    f"samples holds one of its allowed classes; lower min_samples or change "
                    f"{param_hint}"
                )
    return counts


def _materialize(
    labels: np.ndarray, classes: np.ndarray, counts: np.ndarray, seed: int
) -> list[np.ndarray]:
    """Shuffle each class's indices and cut them by the count matrix; sorted index arrays."""
    rng = numpy_rng(seed, "partition", "assign")
    order = np.argsort(labels, kind="stable")
    starts = np.searchsorted(labels[order], classes)
    pieces: list[list[np.ndarray]] = [[] for _ in range(counts.shape[0])]
    for ci, start in enumerate(starts):
        idx = order[start : start + int(counts[:, ci].sum())].copy()
        rng.shuffle(idx)
        for client, chunk in enumerate(np.split(idx, np.cumsum(counts[:, ci])[:-1])):
            if chunk.size:
                pieces[client].append(chunk)
    return [
        np.sort(np.concatenate(p)).astype(np.int64) if p else np.empty(0, dtype=np.int64)
        for p in pieces
    ]


def _finish(
    labels: np.ndarray,
    classes: np.ndarray,
    counts: np.ndarray,
    allowed: np.ndarray,
    min_samples: int,
    seed: int,
    param_hint: str,
) -> list[np.ndarray]:
    counts = _repair(counts, allowed, min_samples, param_hint)
    return _materialize(labels, classes, counts, seed)


def _share_counts(
    sizes: np.ndarray,
    holders_of: list[np.ndarray],
    num_clients: int,
    balance: bool,
    rng: np.random.Generator,
) -> np.ndarray:
    """Split each class among its holders: equal shares, or random shares (PFLlib draws each in
    [n/10, n) of a fair share; here weights ~ U(0.1, 1) give the same spread without its
    last-holder-takes-the-remainder skew)."""
    counts = np.zeros((num_clients, len(sizes)), dtype=np.int64)
    for ci, (n, holders) in enumerate(zip(sizes, holders_of, strict=True)):
        if balance:
            counts[holders, ci] = _equal_shares(int(n), holders, counts.sum(axis=1))
        else:
            counts[holders, ci] = _proportional(rng.uniform(0.1, 1.0, size=len(holders)), int(n))
    return counts


# ----------------------------------------------------------------------------- scenarios


def iid_partition(
    labels: np.ndarray, num_clients: int, seed: int, *, balance: bool = False, min_samples: int = 0
) -> list[np.ndarray]:
    """Every class is split across all clients (PFLlib: pathological with every class).

    ``balance``: equal shares of each class; otherwise random shares per class.
    """
    labels = _check_common(labels, num_clients, min_samples)
    classes, sizes = _class_sizes(labels)
    rng = numpy_rng(seed, "partition", "iid")
    everyone = np.arange(num_clients)
    counts = _share_counts(sizes, [everyone] * len(classes), num_clients, balance, rng)
    allowed = np.ones_like(counts, dtype=bool)
    return _finish(labels, classes, counts, allowed, min_samples, seed, "balance or num_clients")


def _check_classes_per_client(classes_per_client: int, num_classes: int, num_clients: int) -> None:
    if int(classes_per_client) != classes_per_client or classes_per_client < 1:
        raise DataError(f"classes_per_client must be an integer >= 1, got {classes_per_client}")
    if classes_per_client > num_classes:
        raise DataError(
            f"classes_per_client={classes_per_client} exceeds the {num_classes} classes present "
            f"in the labels; use classes_per_client <= {num_classes}"
        )
    if num_clients * classes_per_client < num_classes:
        raise DataError(
            f"classes_per_client={classes_per_client} x num_clients={num_clients} < "
            f"{num_classes} classes, so some class would have no client; raise "
            f"classes_per_client to >= {-(-num_classes // num_clients)} or add clients"
        )


def pathological_partition(
    labels: np.ndarray,
    num_clients: int,
    seed: int,
    *,
    classes_per_client: int = 2,
    balance: bool = False,
    min_samples: int = 0,
    shuffle_classes: bool = False,
) -> list[np.ndarray]:
    """Each client holds exactly ``classes_per_client`` classes; every class has holders.

    Client k gets classes ``order[(k*cpc + j) % C]``, so holders per class differ by at most
    one. ``order`` is the label order, as in PFLlib's quota walk (with 2 classes per client,
    clients hold the pairs (0, 1), (2, 3), …: on Fashion-MNIST none of them is a hard pair
    such as shirt / T-shirt), or with ``shuffle_classes`` a seeded permutation (which pairs
    are hard then depends on the seed). Each class is then split among its holders in equal
    (``balance``) or random shares.
    """
    labels = _check_common(labels, num_clients, min_samples)
    classes, sizes = _class_sizes(labels)
    num_classes = len(classes)
    _check_classes_per_client(classes_per_client, num_classes, num_clients)
    rng = numpy_rng(seed, "partition", "pat")
    perm = rng.permutation(num_classes)  # drawn either way: the shares below use the same rng
    if not shuffle_classes:
        perm = np.arange(num_classes)
    allowed = np.zeros((num_clients, num_classes), dtype=bool)
    slots = np.arange(num_clients)[:, None] * classes_per_client + np.arange(classes_per_client)
    allowed[np.arange(num_clients)[:, None], perm[slots % num_classes]] = True
    holders_of = [np.flatnonzero(allowed[:, ci]) for ci in range(num_classes)]
    counts = _share_counts(sizes, holders_of, num_clients, balance, rng)
    return _finish(labels, classes, counts, allowed, min_samples, seed, "classes_per_client")


def _dirichlet_counts(
    sizes: np.ndarray,
    holders_of: list[np.ndarray],
    num_clients: int,
    alpha: float,
    rng: np.random.Generator,
) -> np.ndarray:
    """One draw: class by class, Dir(alpha) proportions over its holders; a client that already
    holds >= N/num_clients samples gets none of later classes (PFLlib's cap)."""
    cap = sizes.sum() / num_clients
    counts = np.zeros((num_clients, len(sizes)), dtype=np.int64)
    totals = np.zeros(num_clients, dtype=np.int64)
    for ci, (n, holders) in enumerate(zip(sizes, holders_of, strict=True)):
        p = rng.dirichlet(np.full(len(holders), alpha))
        p = p * (totals[holders] < cap)
        if not p.sum() > 0:  # all mass fell on capped clients: spread over the uncapped ones
            p = (totals[holders] < cap).astype(np.float64)
            if not p.sum() > 0:  # every holder is capped: ignore the cap for this class
                p = np.ones(len(holders))
        share = _proportional(p, int(n))
        counts[holders, ci] = share
        totals[holders] += share
    return counts


def _best_dirichlet_draw(
    sizes: np.ndarray,
    holders_of: list[np.ndarray],
    num_clients: int,
    alpha: float,
    min_samples: int,
    rng: np.random.Generator,
    max_redraws: int,
) -> np.ndarray:
    """Redraw (bounded) until every client has min_samples; else the draw with the best minimum."""
    best, best_min = None, -1
    for _ in range(max(1, max_redraws)):
        counts = _dirichlet_counts(sizes, holders_of, num_clients, alpha, rng)
        smallest = int(counts.sum(axis=1).min())
        if smallest > best_min:
            best, best_min = counts, smallest
        if smallest >= min_samples:
            break
    assert best is not None
    return best


def _check_alpha(alpha: float) -> None:
    if not alpha > 0 or not np.isfinite(alpha):
        raise DataError(f"alpha must be a finite number > 0 (Dirichlet concentration), got {alpha}")


def dirichlet_partition(
    labels: np.ndarray,
    num_clients: int,
    seed: int,
    *,
    alpha: float = 0.1,
    min_samples: int = 0,
    max_redraws: int = MAX_REDRAWS,
) -> list[np.ndarray]:
    """Practical non-IID: per class, proportions ~ Dir(alpha) over all clients (PFLlib "dir").

    Smaller alpha means more skew. Redraws at most ``max_redraws`` times for ``min_samples``,
    then repairs deterministically instead of looping forever.
    """
    labels = _check_common(labels, num_clients, min_samples)
    _check_alpha(alpha)
    classes, sizes = _class_sizes(labels)
    rng = numpy_rng(seed, "partition", "dir")
    everyone = np.arange(num_clients)
    holders_of = [everyone] * len(classes)
    counts = _best_dirichlet_draw(
        sizes, holders_of, num_clients, alpha, min_samples, rng, max_redraws
    )
    allowed = np.ones_like(counts, dtype=bool)
    return _finish(labels, classes, counts, allowed, min_samples, seed, "alpha or num_clients")


def _assign_labels(
    num_clients: int,
    num_classes: int,
    classes_per_client: int,
    rng: np.random.Generator,
    max_redraws: int,
) -> np.ndarray:
    """Each client draws classes_per_client distinct labels; every label needs at least
    max(cpc*K/C/2, 1) holders. Bounded redraws, then swaps from over- to under-held labels."""
    need = max(classes_per_client * num_clients // num_classes // 2, 1)
    best, best_min = None, -1
    for _ in range(max(1, max_redraws)):
        allowed = np.zeros((num_clients, num_classes), dtype=bool)
        for k in range(num_clients):
            allowed[k, rng.choice(num_classes, classes_per_client, replace=False)] = True
        held = int(allowed.sum(axis=0).min())
        if held > best_min:
            best, best_min = allowed, held
        if held >= need:
            return allowed
    assert best is not None
    allowed = best
    # A client holding an over-held label o but not an under-held u always exists (else u would
    # have at least as many holders as o), so each swap makes progress and the loop ends.
    while (holders := allowed.sum(axis=0)).min() < need:
        u = int(np.argmin(holders))
        o = int(np.argmax(holders))
        k = int(np.flatnonzero(allowed[:, o] & ~allowed[:, u])[0])
        allowed[k, o], allowed[k, u] = False, True
    return allowed


def extended_dirichlet_partition(
    labels: np.ndarray,
    num_clients: int,
    seed: int,
    *,
    classes_per_client: int = 2,
    alpha: float = 0.1,
    min_samples: int = 0,
    max_redraws: int = MAX_REDRAWS,
) -> list[np.ndarray]:
    """Extended Dirichlet (Li et al., arXiv 2311.03154; PFLlib "exdir").

    Each client is given ``classes_per_client`` random labels, every label held by at least
    max(cpc*K/C/2, 1) clients; each label is then split by Dir(alpha) among its holders only
    (with PFLlib's N/num_clients cap). A client never holds more than ``classes_per_client``
    labels. PFLlib suggests alpha=100 for near-equal shares within a label.
    """
    labels = _check_common(labels, num_clients, min_samples)
    _check_alpha(alpha)
    classes, sizes = _class_sizes(labels)
    num_classes = len(classes)
    _check_classes_per_client(classes_per_client, num_classes, num_clients)
    rng = numpy_rng(seed, "partition", "exdir")
    allowed = _assign_labels(num_clients, num_classes, classes_per_client, rng, max_redraws)
    holders_of = [np.flatnonzero(allowed[:, ci]) for ci in range(num_classes)]
    counts = _best_dirichlet_draw(
        sizes, holders_of, num_clients, alpha, min_samples, rng, max_redraws
    )
    return _finish(
        labels, classes, counts, allowed, min_samples, seed, "classes_per_client or alpha"
    )


# ----------------------------------------------------------------------------- dispatch

Partitioner = Callable[..., list[np.ndarray]]

SCENARIOS: dict[str, Partitioner] = {
    "iid": iid_partition,
    "pat": pathological_partition,
    "dir": dirichlet_partition,
    "exdir": extended_dirichlet_partition,
}
_SCENARIO_ALIASES = {
    "pathological": "pat",
    "dirichlet": "dir",
    "extended_dirichlet": "exdir",
}


def resolve_scenario(name: str) -> str:
    """Canonical scenario name ("iid", "pat", "dir", "exdir") for a name or alias."""
    key = name.strip().lower().replace("-", "_")
    key = _SCENARIO_ALIASES.get(key, key)
    if key not in SCENARIOS:
        choices = ", ".join([*SCENARIOS, *_SCENARIO_ALIASES])
        raise DataError(f"unknown partition scenario {name!r}; choices: {choices}")
    return key


def scenario_parameters(scenario: str) -> list[str]:
    """Keyword parameters the scenario's partitioner accepts."""
    import inspect

    fn = SCENARIOS[resolve_scenario(scenario)]
    return [p.name for p in inspect.signature(fn).parameters.values() if p.kind is p.KEYWORD_ONLY]


def partition_labels(
    labels: np.ndarray, scenario: str, num_clients: int, seed: int, **params: Any
) -> list[np.ndarray]:
    """Dispatch to the scenario's partitioner; parameters it does not take are an error."""
    key = resolve_scenario(scenario)
    accepted = scenario_parameters(key)
    unknown = sorted(set(params) - set(accepted))
    if unknown:
        raise DataError(
            f"scenario {key!r} does not take {', '.join(unknown)}; it accepts: {', '.join(accepted)}"
        )
    return SCENARIOS[key](np.asarray(labels), num_clients, seed, **params)


def train_test_split(
    indices: np.ndarray, train_ratio: float, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """Shuffle one client's indices and cut floor(train_ratio*n) for training (as sklearn does);
    with n >= 2 both sides get at least one sample. Both halves are returned sorted."""
    if not 0.0 < train_ratio < 1.0:
        raise DataError(f"train_ratio must be strictly between 0 and 1, got {train_ratio}")
    idx = np.asarray(indices, dtype=np.int64).copy()
    rng.shuffle(idx)
    n = len(idx)
    n_train = int(np.floor(train_ratio * n))
    if n >= 2:
        n_train = min(max(n_train, 1), n - 1)
    else:
        n_train = n  # a single sample is more use for training than as a test set
    return np.sort(idx[:n_train]), np.sort(idx[n_train:])
