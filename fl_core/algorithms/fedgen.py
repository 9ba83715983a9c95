"""FedGen (Zhu et al., ICML 2021): a server-side generator of features distils the ensemble of
client heads back into every client.

The server holds a label-conditional generator G(y, ε) = Linear(hidden → D)(ReLU(BN(Linear(
noise + C → hidden)([ε, onehot(y)])))) that emits *features*, and the global head. Each round:

- down (one broadcast, the same for every client): the global head, the generator's weights and
  BatchNorm statistics, and the pooled label counts of the clients heard from so far;
- a client puts the head on its own body and trains its whole model on
  CE(model(x), y) + ``gen_weight``·CE(head(G(ỹ, ε)), ỹ), with a batch of labels ỹ drawn from the
  pooled label distribution each step; the generated features are inputs (no gradient reaches
  the generator), so the generator changes a client's training only through this term;
- up: the trained head and the client's label counts (the server never reads client data);
- the server records the label counts, trains the generator for ``server_epochs`` Adam steps on
  CE(ensemble of the round's heads applied to G(y, ε), y) (plus ``diversity_weight`` times the
  diversity loss), with y drawn from the pooled label counts, then averages the heads by sample
  count (as LG-FedAvg).

Per client and round: up (D + 1)·C floats + C label counts; down the head, the generator
((noise + C)·hidden + hidden·D + 4·hidden + D floats and a step counter) and C label counts.
Bodies never travel and persist per client, so clients may run different architectures with one
``feature_dim``; their heads must agree in shape (checked before training).

Differences from HtFLlib's FedGen, each decided here:

- HtFLlib's ``train_generator`` trains a copy of the generator loaded from disk and never saves
  it, so its clients always regularise with the untrained generator. That is a bug: here the
  trained generator is kept and broadcast, as in the paper. ``server_epochs=0`` reproduces
  HtFLlib's effective behaviour (an untrained generator).
- Noise: the paper samples Gaussian noise; HtFLlib (and the authors' code) draw ``torch.rand``,
  uniform on [0, 1), under a comment saying Gaussian. ``noise="gaussian"`` (default) or
  ``"uniform"``.
- Diversity: the authors' code adds a diversity loss (Mao et al., 2019) with weight 1 to the
  generator's objective; HtFLlib has none. ``diversity_weight`` defaults to 1; 0 is HtFLlib.
- Ensemble: the paper's objective (eq. 4) applies the softmax to the mean of the clients'
  logits; HtFLlib weights each client's logits by its share of the round's samples; the
  authors' code weights each client by its share of each label. ``ensemble="uniform"``
  (default), ``"samples"`` (HtFLlib) or ``"label"`` (label shares, applied to the logits).
- Clients run the generator in eval mode (running BatchNorm statistics), as the authors' code
  does. HtFLlib's clients run it in train mode: batch statistics, and BatchNorm statistics that
  every client's sampling updates (discarded here, since a client never uploads the generator).
  ``client_batch_stats=True`` reproduces the batch statistics.
- Labels: HtFLlib pools every client's label histogram at start-up, reading the clients' data.
  Here each reply carries its client's label counts and the server pools the latest counts of
  every client heard from; before the first aggregation nothing is pooled and clients train
  without the regulariser, as the authors' code does in its first round.
- The generator's Adam optimiser is fresh each round, as in HtFLlib (the authors' code keeps one
  with a decaying learning rate); the generated batch has the federation's batch size (at least
  2, for BatchNorm) on the server and on the clients, as in HtFLlib.
- The authors' client loss adds a decaying weight (10 · 0.98^round) and a distillation term on
  real labels; this follows the paper's and HtFLlib's objective, CE + CE on generated features.
- The generator's first Linear has no bias: BatchNorm follows it, so a bias changes nothing in
  training and its gradient is rounding noise, which Adam would turn into full-size steps.
- The train loss reported at evaluation is the cross-entropy on real data (HtFLlib adds a
  generated-feature term); a reply's ``train_loss`` is the loss the client optimised.
- A client trains on one CPU thread while ``gen_weight > 0``. The server's 100 Adam steps through
  ReLUs turn a one-ulp difference in a received head into a visible one, and the sum order
  (hence the last bit) depends on the thread count, which differs between the sequential
  executor and process workers; one thread gives every executor the same bits.

Defaults are HtFLlib's flags (``-nd 512 -hd 512 -glr 0.005 -se 100``, weight 1 on the generated
term as in the paper); HtFLlib's tuned Cifar100 run (``total.sh``) uses ``-nd 32 -glr 0.1``.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
from pydantic import Field
from torch import Tensor, nn
from torch.func import functional_call

from fl_core.seeding import derive_seed

from .base import Client, ClientContext, HParams, Message, Reply, ServerContext
from .common import weighted_average
from .lgfedavg import LGFedAvgServer
from .parts import Part
from .registry import AlgorithmError, register_algorithm

HEAD_PREFIX = "model/head."
GEN_PREFIX = "generator/"


class FedGenHParams(HParams):
    gen_weight: float = Field(
        1.0, ge=0.0, description="weight of the CE of the head on generated features"
    )
    noise_dim: int = Field(512, ge=1, description="size of the generator's noise input (-nd)")
    hidden_dim: int = Field(512, ge=1, description="width of the generator's hidden layer (-hd)")
    generator_lr: float = Field(0.005, gt=0.0, description="Adam learning rate (-glr)")
    server_epochs: int = Field(
        100, ge=0, description="generator Adam steps per round on the server (-se)"
    )
    noise: Literal["gaussian", "uniform"] = Field(
        "gaussian", description="noise distribution: N(0, I) (paper) or U[0, 1) (HtFLlib)"
    )
    diversity_weight: float = Field(
        1.0, ge=0.0, description="weight of the generator's diversity loss (0 = HtFLlib)"
    )
    ensemble: Literal["uniform", "samples", "label"] = Field(
        "uniform",
        description="weights of the clients' logits in the teacher: uniform (paper), by "
        "sample share (HtFLlib) or by per-label share (authors' code)",
    )
    client_batch_stats: bool = Field(
        False,
        description="clients run the generator with batch BatchNorm statistics (HtFLlib) "
        "instead of the running ones",
    )


class FeatureGenerator(nn.Module):
    """G(y, ε): noise and a one-hot label -> a feature vector of ``feature_dim``."""

    def __init__(self, noise_dim: int, num_classes: int, hidden_dim: int, feature_dim: int):
        super().__init__()
        self.noise_dim = noise_dim
        self.num_classes = num_classes
        self.hidden = nn.Sequential(
            nn.Linear(noise_dim + num_classes, hidden_dim, bias=False),
            nn.BatchNorm1d(hidden_dim),
            nn.ReLU(),
        )
        self.out = nn.Linear(hidden_dim, feature_dim)

    def forward(self, labels: Tensor, noise: Tensor) -> Tensor:
        onehot = nn.functional.one_hot(labels, self.num_classes).to(noise.dtype)
        return self.out(self.hidden(torch.cat([noise, onehot], dim=1)))


def build_generator(hp: FedGenHParams, num_classes: int, feature_dim: int) -> FeatureGenerator:
    return FeatureGenerator(hp.noise_dim, num_classes, hp.hidden_dim, feature_dim)


def init_generator(gen: FeatureGenerator, rng: torch.Generator) -> None:
    """PyTorch's default initialisation (Linear: Kaiming-uniform weight, uniform bias; BatchNorm:
    ones, zeros) drawn from ``rng`` instead of torch's global generator."""
    with torch.no_grad():
        for m in gen.modules():
            if isinstance(m, nn.Linear):
                nn.init.kaiming_uniform_(m.weight, a=math.sqrt(5), generator=rng)
                if m.bias is not None:
                    bound = 1 / math.sqrt(m.in_features)
                    nn.init.uniform_(m.bias, -bound, bound, generator=rng)
            elif isinstance(m, nn.BatchNorm1d):
                m.reset_parameters()


def sample_noise(n: int, dim: int, kind: str, rng: torch.Generator) -> Tensor:
    if kind == "uniform":
        return torch.rand(n, dim, generator=rng)
    return torch.randn(n, dim, generator=rng)


def sample_labels(counts: Tensor, n: int, rng: torch.Generator) -> Tensor:
    """``n`` labels drawn with replacement in proportion to ``counts``."""
    return torch.multinomial(counts.double().cpu(), n, replacement=True, generator=rng)


def diversity_loss(noise: Tensor, features: Tensor) -> Tensor:
    """exp(-mean_ij(d_noise(i, j) · d_feat(i, j))), with the mean squared difference between
    noise vectors and the mean absolute difference between features (Mao et al., 2019, as the
    FedGen authors use it): small when different noise gives different features."""
    d_noise = (noise.unsqueeze(0) - noise.unsqueeze(1)).pow(2).mean(dim=2)
    d_feat = (features.unsqueeze(0) - features.unsqueeze(1)).abs().mean(dim=2)
    return torch.exp(-(d_noise * d_feat).mean())


def generated_batch_size(batch_size: int) -> int:
    return max(2, batch_size)  # BatchNorm in train mode needs two samples


class FedGenClient(Client):
    shared = ("model/head", "generator", "labels")  # all received; head and counts go up
    persistent = ("model/body",)  # this client's own body (any architecture)

    def __init__(self, ctx: ClientContext) -> None:
        super().__init__(ctx)
        # built without drawing from any generator: its values always come from the broadcast
        with torch.device("meta"):
            gen = build_generator(self.hp, ctx.num_classes, self.model.feature_dim)
        self.generator = gen.to_empty(device=ctx.device)
        with torch.no_grad():
            for t in self.generator.state_dict().values():
                t.zero_()
        self.labels = {"count": torch.zeros(ctx.num_classes, dtype=torch.int64)}
        self._regularize = False
        self._sampler: torch.Generator | None = None

    def parts(self) -> dict[str, Part]:
        return {**super().parts(), "generator": self.generator, "labels": self.labels}

    def loss(self, model: nn.Module, x: Tensor, y: Tensor) -> Tensor:
        features = model.body(x)
        loss = nn.functional.cross_entropy(model.head(features), y)
        if self._regularize:
            ctx = self.ctx
            n = generated_batch_size(ctx.settings.batch_size)
            labels = sample_labels(self.labels["count"], n, self._sampler)
            noise = sample_noise(n, self.hp.noise_dim, self.hp.noise, self._sampler)
            with torch.no_grad():
                generated = self.generator(labels.to(ctx.device), noise.to(ctx.device))
            logits = model.head(generated)
            loss = loss + self.hp.gen_weight * nn.functional.cross_entropy(
                logits, labels.to(ctx.device)
            )
        return loss

    def fit(self) -> Reply:
        ctx = self.ctx
        self._regularize = self.hp.gen_weight > 0 and bool((self.labels["count"] > 0).any())
        if self._regularize:
            # a stream of its own: ctx.rng still shuffles the real batches as in LG-FedAvg
            seed = derive_seed(ctx.rng.initial_seed(), "fedgen-samples")
            self._sampler = torch.Generator().manual_seed(seed)
            self.generator.train(self.hp.client_batch_stats)
        # one thread: the sum order, hence the bits of the head, is the same in every executor
        # (the server's generator training turns a one-ulp difference into a visible one)
        threads = torch.get_num_threads()
        if self.hp.gen_weight > 0:
            torch.set_num_threads(1)
        try:
            result = self.train()
        finally:
            self._regularize = False
            torch.set_num_threads(threads)
        message = {
            HEAD_PREFIX + k: v.detach().clone() for k, v in self.model.head.state_dict().items()
        }
        message["labels/local_count"] = torch.bincount(
            ctx.train_y.long().cpu(), minlength=ctx.num_classes
        )
        return self.reply(message, result)


class FedGenServer(LGFedAvgServer):
    """The global head (averaged as in LG-FedAvg), the generator, and every client's latest label
    counts."""

    def __init__(self, ctx: ServerContext, hparams: FedGenHParams) -> None:
        super().__init__(ctx, hparams)
        self.template = ctx.build_model(ctx.distinct_architectures[0]).head.to(ctx.device).eval()
        self.generator = build_generator(hparams, ctx.num_classes, ctx.feature_dim)
        init_generator(self.generator, ctx.rng(0, "fedgen-init"))
        self.generator.to(ctx.device)
        self.label_counts = torch.zeros(ctx.num_clients, ctx.num_classes, dtype=torch.int64)

    def _generator_message(self) -> Message:
        # copies: the generator trains in place after the broadcast is published
        return {GEN_PREFIX + k: v.detach().clone() for k, v in self.generator.state_dict().items()}

    def pooled_label_counts(self) -> Tensor:
        return self.label_counts.sum(dim=0)

    def broadcast(self, round: int) -> Message:
        return {
            **self.global_state,
            **self._generator_message(),
            "labels/count": self.pooled_label_counts(),
        }

    def evaluation_broadcast(self, round: int) -> Message:
        return self.global_state  # evaluation and fine-tuning use the head alone

    def aggregate(self, round: int, replies: dict[int, Reply]) -> dict[str, float] | None:
        """Trains the generator on the round's heads, then averages the heads; reports the
        generator's loss at its last step (``server_generator_loss``) when it trained."""
        if not replies:
            return None
        heads: dict[int, dict[str, Tensor]] = {}
        counts: dict[int, Tensor] = {}
        for cid, reply in replies.items():
            msg = dict(reply.message)
            if "labels/local_count" not in msg:
                raise AlgorithmError(f"client {cid} sent no label counts to the FedGen server")
            counts[cid] = msg.pop("labels/local_count").long().cpu()
            unknown = set(msg) - set(self.global_state)
            if unknown:
                raise AlgorithmError(
                    f"client {cid} uploaded {sorted(unknown)[:3]}, which the server does not hold"
                )
            heads[cid] = msg
        for cid, c in counts.items():
            self.label_counts[cid] = c
        loss = self.train_generator(round, replies, heads, counts)
        self.global_state = {
            **self.global_state,
            **weighted_average([(heads[cid], r.num_samples) for cid, r in replies.items()]),
        }
        return None if loss is None else {"generator_loss": loss}

    def teacher_weights(self, replies: dict[int, Reply], counts: dict[int, Tensor]) -> Tensor:
        """(clients, classes) weights of each client's logits for a sample of each label."""
        ids = list(replies)
        k, c = len(ids), self.ctx.num_classes
        if self.hp.ensemble == "uniform":
            return torch.full((k, c), 1.0 / k)
        if self.hp.ensemble == "samples":
            n = torch.tensor([float(replies[i].num_samples) for i in ids])
            n = n / n.sum() if n.sum() > 0 else torch.full((k,), 1.0 / k)
            return n.unsqueeze(1).expand(k, c).clone()
        per_label = torch.stack([counts[i].double() for i in ids])  # (clients, classes)
        total = per_label.sum(dim=0, keepdim=True)
        return torch.where(total > 0, per_label / total.clamp(min=1), 1.0 / k).float()

    def train_generator(
        self,
        round: int,
        replies: dict[int, Reply],
        heads: dict[int, dict[str, Tensor]],
        counts: dict[int, Tensor],
    ) -> float | None:
        """``server_epochs`` Adam steps; the loss of the last one (None when it did not train)."""
        pooled = self.pooled_label_counts()
        if self.hp.server_epochs == 0 or not bool((pooled > 0).any()):
            return None
        device = self.ctx.device
        params = [
            {k.removeprefix(HEAD_PREFIX): v.to(device) for k, v in heads[cid].items()}
            for cid in replies
        ]
        weights = self.teacher_weights(replies, counts).to(device)
        gen = self.generator
        gen.train()
        opt = torch.optim.Adam(gen.parameters(), lr=self.hp.generator_lr)
        rng = self.ctx.rng(round, "fedgen-generator")
        n = generated_batch_size(self.ctx.settings.batch_size)
        for _ in range(self.hp.server_epochs):
            labels = sample_labels(pooled, n, rng)
            noise = sample_noise(n, self.hp.noise_dim, self.hp.noise, rng).to(device)
            labels = labels.to(device)
            features = gen(labels, noise)
            logits = sum(
                functional_call(self.template, p, (features,)) * weights[i, labels].unsqueeze(1)
                for i, p in enumerate(params)
            )
            loss = nn.functional.cross_entropy(logits, labels)
            if self.hp.diversity_weight > 0:
                loss = loss + self.hp.diversity_weight * diversity_loss(noise, features)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        gen.eval()
        return float(loss.detach())

    def state_dict(self) -> dict[str, Tensor]:
        return {
            **self.global_state,
            **self._generator_message(),
            "labels/by_client": self.label_counts.clone(),
        }

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        self.global_state = {k: v for k, v in state.items() if k.startswith(HEAD_PREFIX)}
        self.generator.load_state_dict(
            {k.removeprefix(GEN_PREFIX): v for k, v in state.items() if k.startswith(GEN_PREFIX)}
        )
        self.label_counts = state["labels/by_client"].clone()


register_algorithm(
    "fedgen",
    FedGenClient,
    FedGenServer,
    FedGenHParams,
    "FedGen: a server generator of features, trained on the clients' heads, regularises them",
    family="HtFL",
    paper="Zhu et al., Data-Free Knowledge Distillation for Heterogeneous Federated Learning, "
    "ICML 2021",
    heterogeneous=True,
)
