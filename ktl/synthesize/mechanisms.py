"""The two differentially private selection mechanisms, one class at a time.

Both take the embeddings of one class's synthetic candidates and of the private images, and
return *counts*: how often each candidate was selected. The counts are all that leaves the
private side; the next generation is drawn from them.

* :func:`pcevolve_utility` + :func:`exponential_mechanism` (PCEvolve): each candidate gets a
  utility in [0, 1] from its distance to the private class centre, after a contrastive filter
  and a calibrated similarity ``exp(tau * score)``; the exponential mechanism draws from it.
* :func:`pe_histogram` + :func:`pe_select` (Private Evolution): each private image votes for
  its nearest candidates (a vote vector of L2 norm 1), Gaussian (or Laplace) noise is added, the
  histogram is thresholded, and candidates are drawn in proportion to what is left. With
  :func:`kmeans`, the votes go to clusters of candidates instead (the clustering sees only the
  public candidates) and :func:`spread_over_members` turns the cluster counts into candidate
  counts.
"""

from __future__ import annotations

import math

import numpy as np
import torch


def class_centres(private: torch.Tensor, labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Mean private embedding per class (K, D)."""
    return torch.stack([private[labels == c].mean(0) for c in range(num_classes)])


def pcevolve_utility(
    candidates: torch.Tensor, centres: torch.Tensor, label: int, tau: float
) -> np.ndarray:
    """Utility in [0, 1] of each candidate (N, D) of class ``label``.

    Contrastive filter: a candidate nearer to another class's centre than to its own gets 0.
    The others: score = -distance to the own centre, min-max normalised over them to [-1, 0],
    utility = exp(tau * score) in [exp(-tau), 1]. A filtered candidate gets the minimum (0),
    not minus infinity, so that the utility stays in [0, 1] and its sensitivity is 1.
    """
    distances = torch.cdist(candidates.double(), centres.double())  # (N, K)
    keep = (distances.argmin(dim=1) == label).numpy()
    utility = np.zeros(candidates.shape[0])
    if keep.any():
        score = -distances[:, label].numpy()[keep]
        spread = score.max() - score.min()
        normalised = (score - score.max()) / spread if spread > 0 else np.zeros_like(score)
        utility[keep] = np.exp(tau * normalised)
    return utility


def exponential_probabilities(
    utility: np.ndarray, epsilon: float, sensitivity: float = 1.0
) -> np.ndarray:
    """Selection probabilities ``exp(epsilon u / (2 sensitivity))``, normalised; epsilon = inf
    puts all mass uniformly on the maximisers."""
    utility = np.asarray(utility, dtype=np.float64)
    if math.isinf(epsilon):
        top = utility == utility.max()
        return top / top.sum()
    logits = epsilon * utility / (2.0 * sensitivity)
    logits -= logits.max()
    weights = np.exp(logits)
    return weights / weights.sum()


def exponential_mechanism(
    utility: np.ndarray,
    epsilon: float,
    draws: int,
    rng: np.random.Generator,
    *,
    replace: bool = False,
) -> np.ndarray:
    """``draws`` exponential-mechanism selections, each ``epsilon``-DP for a utility of
    sensitivity 1; returns counts per candidate. Without replacement (the default) each draw
    runs over the candidates not yet chosen, so the selections are distinct (and, with
    epsilon = inf, the top ``draws``); the draws compose adaptively, at ``epsilon`` each."""
    utility = np.asarray(utility, dtype=np.float64)
    if replace:
        p = exponential_probabilities(utility, epsilon)
        return np.bincount(rng.choice(len(p), size=draws, replace=True, p=p), minlength=len(p))
    counts = np.zeros(len(utility), dtype=np.int64)
    left = np.arange(len(utility))
    for _ in range(min(draws, len(utility))):
        p = exponential_probabilities(utility[left], epsilon)
        pick = rng.choice(len(left), p=p)
        counts[left[pick]] += 1
        left = np.delete(left, pick)
    return counts


def pe_histogram(candidates: torch.Tensor, private: torch.Tensor, nearest: int = 1) -> np.ndarray:
    """Votes of the private images (M, D) for the candidates (N, D): each private image gives
    ``1/sqrt(k)`` to each of its ``k = nearest`` nearest candidates (L2), so its vote vector has
    L2 norm 1 and adding or removing one private image moves the histogram by norm 1."""
    n = candidates.shape[0]
    histogram = np.zeros(n)
    if private.shape[0] == 0 or n == 0:
        return histogram
    k = min(nearest, n)
    distances = torch.cdist(private.double(), candidates.double())
    idx = distances.topk(k, dim=1, largest=False).indices.numpy()
    np.add.at(histogram, idx.ravel(), 1.0 / math.sqrt(k))
    return histogram


def noisy_histogram(
    histogram: np.ndarray, sigma: float, rng: np.random.Generator, noise: str = "gaussian"
) -> np.ndarray:
    """``h + N(0, sigma^2)`` (or ``h + Laplace(0, sigma)``) per bin; ``h`` itself at sigma 0."""
    if sigma > 0:
        draw = rng.laplace if noise == "laplace" else rng.normal
        return histogram + draw(0.0, sigma, size=histogram.shape)
    return histogram + 0.0


def pe_select(
    histogram: np.ndarray,
    sigma: float,
    threshold: float,
    draws: int,
    rng: np.random.Generator,
    noise: str = "gaussian",
) -> tuple[np.ndarray, np.ndarray]:
    """Noisy histogram ``h + N(0, sigma^2)`` (or ``h + Laplace(0, sigma)`` with ``noise =
    'laplace'``), clipped at ``threshold`` (``max(h - H, 0)``), then ``draws`` candidates drawn
    in proportion to it (uniformly if nothing is left). Returns (counts, the noisy histogram);
    both are safe to release."""
    noisy = noisy_histogram(histogram, sigma, rng, noise)
    clipped = np.maximum(noisy - threshold, 0.0)
    total = clipped.sum()
    p = clipped / total if total > 0 else np.full(len(clipped), 1.0 / len(clipped))
    picks = rng.choice(len(p), size=draws, replace=True, p=p)
    return np.bincount(picks, minlength=len(p)), noisy


def kmeans(points: torch.Tensor, k: int, seed: int = 0, steps: int = 25) -> torch.Tensor:
    """Deterministic k-means (Lloyd, random distinct points as the start) of (N, D) points into
    ``min(k, N)`` clusters; returns the (k, D) centroids. An empty cluster keeps its centroid."""
    x = points.double()
    k = max(1, min(k, x.shape[0]))
    g = torch.Generator().manual_seed(seed)
    centroids = x[torch.randperm(x.shape[0], generator=g)[:k]].clone()
    for _ in range(steps):
        assign = torch.cdist(x, centroids).argmin(1)
        moved = centroids.clone()
        for j in range(k):
            members = assign == j
            if members.any():
                moved[j] = x[members].mean(0)
        if torch.equal(moved, centroids):
            break
        centroids = moved
    return centroids


def spread_over_members(
    cluster_counts: np.ndarray, assign: np.ndarray, rng: np.random.Generator
) -> np.ndarray:
    """Candidate counts from cluster counts: each draw of a cluster goes to one of its members,
    chosen uniformly (distinct members first while a cluster has unchosen ones)."""
    counts = np.zeros(len(assign), dtype=np.int64)
    for j in np.flatnonzero(cluster_counts):
        members = np.flatnonzero(assign == j)
        if len(members) == 0:
            continue
        n = int(cluster_counts[j])
        order = rng.permutation(members)
        picks = np.concatenate([order] * (n // len(order)) + [order[: n % len(order)]])
        np.add.at(counts, picks, 1)
    return counts


def label_bins(noisy: np.ndarray, threshold: float) -> np.ndarray:
    """The class of each bin from the classes' noisy histograms (C, K): the class with the
    highest noisy count where any class's count passes ``threshold``, else -1. A class that
    labels no bin gets the free bin where its own noisy count is highest, so that every class
    keeps at least one (classes in order of that count; with fewer bins than classes some stay
    without a bin). Post-processing of the noisy histograms only: it costs no privacy."""
    num_classes, k = noisy.shape
    labels = np.where((noisy > threshold).any(0), noisy.argmax(0), -1)
    missing = [c for c in range(num_classes) if not (labels == c).any()]
    for c in sorted(missing, key=lambda c: -noisy[c].max()):
        free = np.flatnonzero(labels == -1)
        if len(free) == 0:
            break
        labels[free[noisy[c, free].argmax()]] = c
    return labels


def label_by_nearest_bin(
    points: torch.Tensor, bins: torch.Tensor, bin_labels: np.ndarray
) -> np.ndarray:
    """Each point (N, D) takes the label of its nearest labelled bin centre (K, D) (L2); -1 for
    every point when no bin is labelled."""
    labelled = np.flatnonzero(bin_labels >= 0)
    if len(labelled) == 0:
        return np.full(points.shape[0], -1, dtype=np.int64)
    nearest = torch.cdist(points.double(), bins.double()[torch.from_numpy(labelled)]).argmin(1)
    return bin_labels[labelled][nearest.numpy()].astype(np.int64)
