"""FedPAC (Xu, Tong and Huang, ICLR 2023): feature alignment to global prototypes and
classifier collaboration by a per-client quadratic program.

A selected client receives the global body and the global class prototypes (and, after its
first round, the personalized head the server combined for it). With the received body it
first measures its feature statistics: per class k the share p_k and mean μ_k of its features,
h_k = p_k·μ_k, and the variance of their estimate V = Σ_k (p_k·E[‖f‖² | k] − p_k²·‖μ_k‖²) / n.
It then trains the head for ``head_epochs`` with the body frozen, and the body for the local
epochs with the head frozen on CE + λ·MSE(feature, global prototype of its class). It uploads
body, head, its class prototypes with counts, and (V, h).

The server averages bodies by sample count and prototypes by class count, and for each
uploading client i solves

    min_α  Σ_j α_j²·V_j + ‖Σ_j α_j·(h_i − h_j)‖²   s.t.  α ≥ 0, Σ_j α_j = 1

over this round's uploaders j (a convex QP: diag(V) plus a Gram matrix), with SciPy's SLSQP
solver, and sends client i the head Σ_j α_ij·head_j next time it trains or is evaluated.
Clients are evaluated with the global body and their personalized head.

What travels, per selected client and round: down, the body and C×d prototypes with counts
(broadcast) plus its personalized head; up, body, head, C×d prototypes, C counts, C×d + 1
statistics.

Differences from PFLlib's FedPAC:

- PFLlib solves the QP with cvxpy after clipping negative eigenvalues; the matrix is positive
  semi-definite by construction (a diagonal of variances plus a Gram matrix), so we solve it as
  is with SciPy (scaled to unit magnitude, which leaves the minimiser unchanged). PFLlib then
  zeroes weights below 1e-3 without renormalising, so its heads are not a mixture; ours are
  (α ≥ 0, Σα = 1). If the solver fails, the client keeps its own head, as in PFLlib.
- PFLlib averages prototypes uniformly over the clients holding a class; the paper weights them
  by the clients' class counts. ``aggregate_by="samples"`` (default) follows the paper,
  ``"clients"`` PFLlib.
- PFLlib measures the statistics when it sends the model (before evaluation), for the selected
  clients; ours are measured by each uploader with the body it received, which is the same body.
"""

from __future__ import annotations

from typing import Literal

import numpy as np
import torch
from pydantic import Field
from scipy.optimize import minimize
from torch import Tensor, nn

from .base import HParams, Message, Reply, ServerContext
from .common import class_means, shared_model_state, weighted_average
from .fedproto import FedProtoClient, FedProtoServer
from .parts import select_state
from .registry import register_algorithm


class FedPACHParams(HParams):
    lam: float = Field(1.0, ge=0.0, description="λ: weight of the MSE to the global prototypes")
    head_epochs: int = Field(1, ge=0, description="epochs of head training (body frozen) first")
    aggregate_by: Literal["samples", "clients"] = Field(
        "samples", description="weight class prototypes by sample count (paper) or per client"
    )


def mixture_weights(matrix: np.ndarray) -> np.ndarray | None:
    """argmin αᵀPα over the probability simplex (P symmetric PSD), or None if SLSQP fails."""
    n = matrix.shape[0]
    if n == 1:
        return np.ones(1)
    p = (matrix + matrix.T) / 2
    scale = float(np.abs(p).max())
    if scale > 0:
        p = p / scale
    res = minimize(
        lambda a: float(a @ p @ a),
        np.full(n, 1.0 / n),
        jac=lambda a: 2.0 * (p @ a),
        bounds=[(0.0, 1.0)] * n,
        constraints=[{"type": "eq", "fun": lambda a: a.sum() - 1.0, "jac": lambda a: np.ones(n)}],
        method="SLSQP",
        options={"ftol": 1e-12, "maxiter": 1000},
    )
    if not res.success:
        return None
    alpha = np.clip(res.x, 0.0, None)
    return alpha / alpha.sum()


def qp_matrix(v: Tensor, h: Tensor, i: int) -> np.ndarray:
    """diag(V) + Gram matrix of (h_i − h_j) for uploader i; ``h`` is (uploaders, C·d)."""
    d = (h[i].unsqueeze(0) - h).double()
    return (torch.diag(v.double()) + d @ d.T).numpy()


class FedPACClient(FedProtoClient):
    # the body and the prototypes are broadcast; the personalized head comes per client
    shared = ("model/body", "model/head", "proto")
    persistent = ("model/head",)

    @torch.no_grad()
    def feature_statistics(self) -> tuple[Tensor, Tensor]:
        """(V, h): the variance of the estimate of h, and h = p_k·μ_k per class (C × d)."""
        ctx = self.ctx
        means, counts = class_means(self.model, ctx)
        body = self.model.body
        sq = torch.zeros(ctx.num_classes, device=ctx.device, dtype=torch.float64)
        bs = ctx.settings.eval_batch_size
        for start in range(0, ctx.num_train, bs):
            f = body(ctx.train_x[start : start + bs].to(ctx.device)).double()
            sq.index_add_(0, ctx.train_y[start : start + bs].to(ctx.device), (f * f).sum(1))
        n = max(ctx.num_train, 1)
        share = counts.double() / n
        mean_sq = sq / counts.clamp(min=1).double()
        v = (share * mean_sq - share**2 * (means.double() ** 2).sum(1)).sum() / n
        h = share.unsqueeze(1) * means.double()
        return v.float().reshape(1), h.float()

    def fit(self) -> Reply:
        v, h = self.feature_statistics()  # with the body just received
        if self.hp.head_epochs:
            self.train(params=self.model.head.parameters(), epochs=self.hp.head_epochs)
        result = self.train(params=self.model.body.parameters())
        means, counts = class_means(self.model, self.ctx)
        message = select_state(self.parts(), ("model/body", "model/head"))
        message.update(
            {"proto/local": means, "proto/local_count": counts, "stats/v": v, "stats/h": h}
        )
        return self.reply(message, result)

    def predict(self, model: nn.Module, x: Tensor) -> Tensor:
        return model(x)  # the personalized head, not FedProto's nearest prototype

    def finetune(self, epochs: int) -> None:
        self.train(epochs=epochs)


class FedPACServer(FedProtoServer):
    def __init__(self, ctx: ServerContext, hparams: FedPACHParams) -> None:
        super().__init__(ctx, hparams)
        self.body = shared_model_state(ctx, ("model/body",))  # refuses a mixed group
        self.heads: dict[int, dict[str, Tensor]] = {}  # each client's personalized head
        self.last_weights: dict[int, np.ndarray] = {}  # the QP's α per uploader (for tests)

    def broadcast(self, round: int) -> Message:
        return {**self.body, **super().broadcast(round)}

    def configure(self, round: int, client_ids: list[int]) -> dict[int, Message]:
        return {cid: self.heads[cid] for cid in client_ids if cid in self.heads}

    def aggregate(self, round: int, replies: dict[int, Reply]) -> None:
        if not replies:
            return
        super().aggregate(round, replies)  # the class prototypes
        bodies = [
            ({k: v for k, v in r.message.items() if k.startswith("model/body.")}, r.num_samples)
            for r in replies.values()
        ]
        self.body = weighted_average(bodies)
        ids = sorted(replies)
        v = torch.cat([replies[c].message["stats/v"].double().cpu() for c in ids])
        h = torch.stack([replies[c].message["stats/h"].double().cpu().flatten() for c in ids])
        heads = [
            {k: t for k, t in replies[c].message.items() if k.startswith("model/head.")}
            for c in ids
        ]
        self.last_weights = {}
        for a, cid in enumerate(ids):
            alpha = mixture_weights(qp_matrix(v, h, a))
            if alpha is None:  # no solution: the client keeps its own head
                alpha = np.eye(len(ids))[a]
            self.last_weights[cid] = alpha
            self.heads[cid] = weighted_average(list(zip(heads, alpha.tolist(), strict=True)))

    def state_dict(self) -> dict[str, Tensor]:
        heads = {f"heads/{c}/{k}": v for c, head in self.heads.items() for k, v in head.items()}
        return {**super().state_dict(), **self.body, **heads}

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        super().load_state_dict(state)
        self.body = {k: v for k, v in state.items() if k.startswith("model/")}
        self.heads = {}
        for key, value in state.items():
            if key.startswith("heads/"):
                cid, _, name = key.removeprefix("heads/").partition("/")
                self.heads.setdefault(int(cid), {})[name] = value


register_algorithm(
    "fedpac",
    FedPACClient,
    FedPACServer,
    FedPACHParams,
    "FedPAC: features aligned to global prototypes; heads mixed by a per-client QP",
    family="pFL",
    paper="Xu, Tong and Huang, Personalized Federated Learning with Feature Alignment and "
    "Classifier Collaboration, ICLR 2023",
)
