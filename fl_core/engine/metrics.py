"""Evaluation metrics computed the same way for every algorithm."""

from __future__ import annotations

import math

import torch
from torch import Tensor

from fl_core.algorithms import EvalReport


def micro_auc(probs: Tensor, labels: Tensor, num_classes: int) -> float:
    """Micro-averaged one-vs-rest ROC AUC (PFLlib's per-client AUC), rank-based with ties.

    Every (sample, class) pair is a binary decision scored by its probability; the AUC is the
    probability that a random positive pair outranks a random negative one.
    """
    if probs.numel() == 0:
        return float("nan")
    scores = probs.reshape(-1).double()
    target = torch.nn.functional.one_hot(labels.long(), num_classes).reshape(-1).bool()
    n_pos = int(target.sum())
    n_neg = target.numel() - n_pos
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    order = torch.argsort(scores)
    sorted_scores = scores[order]
    # average ranks over ties: positions 1..n, tied groups get their mean rank
    _, inverse, counts = torch.unique_consecutive(
        sorted_scores, return_inverse=True, return_counts=True
    )
    ends = torch.cumsum(counts, 0).double()
    mean_rank = ends - (counts.double() - 1) / 2
    ranks = torch.empty_like(scores)
    ranks[order] = mean_rank[inverse]
    rank_sum = float(ranks[target].sum())
    return (rank_sum - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg)


def summarize_clients(reports: list[EvalReport], num_classes: int) -> dict[str, float]:
    """Sample-weighted accuracy/AUC, mean train loss and the spread of accuracy across clients."""
    test_num = sum(r.test_num for r in reports)
    correct = sum(r.test_correct for r in reports)
    accs, aucs, weights = [], [], []
    for r in reports:
        if r.test_num == 0:
            continue
        accs.append(r.test_correct / r.test_num)
        aucs.append(micro_auc(r.test_probs, r.test_labels, num_classes))
        weights.append(r.test_num)
    valid = [(a, w) for a, w in zip(aucs, weights, strict=True) if not math.isnan(a)]
    out = {
        "test_acc": correct / test_num if test_num else float("nan"),
        "test_auc": (
            sum(a * w for a, w in valid) / sum(w for _, w in valid) if valid else float("nan")
        ),
        "test_acc_std": float(torch.tensor(accs).std(unbiased=False)) if accs else float("nan"),
        "test_auc_std": (
            float(torch.tensor([a for a, _ in valid]).std(unbiased=False))
            if valid
            else float("nan")
        ),
    }
    train_num = sum(r.train_num for r in reports)
    if train_num:
        out["train_loss"] = sum(r.train_loss_sum for r in reports) / train_num
    return out
