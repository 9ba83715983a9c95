"""FedGC (Niu & Deng, AAAI 2022): private class embeddings, and a server-side softmax
regulariser that corrects their gradients with the classes of the other clients.

Each client classifies with its own bias-free class embeddings, one row of D per class *it
holds* (the model's head is not used): logits = W_k·body(x) over its own classes, trained with
cross-entropy together with the received body. It uploads the body, its embeddings and their
class ids. The server averages bodies by sample count and keeps every client's embeddings. A
client's softmax never sees the classes it lacks, so the server adds that missing cross-client
term: for each class c, with a_c the mean embedding of c over the clients that hold it (held
fixed), and for each client k holding c,

    Reg += −log( e^{a_c·a_c} / (e^{a_c·a_c} + Σ_{j: c ∉ C_j} Σ_{c' ∈ C_j} e^{a_c·W_j,c'}) ),

and takes one SGD step of size ``lam``·lr on all stored embeddings: the embeddings of clients
lacking c are pushed away from c. In the paper's face-recognition setting classes are disjoint,
so a_c is the single embedding of c and "clients lacking c" are all the others; with shared
labels (image classification) this is the generalisation PFLlib uses. A client predicts among
its own classes only.

``lam`` defaults to 1, PFLlib's value (the step is then lr, the clients' own learning rate).

Down per client and round: the body and that client's embeddings (a client the server has not
seen yet gets the initial table of C rows instead, and takes its own rows). Up: the body, its
embeddings and its class ids. Nothing persists on the client: the server holds the embeddings.

Differences from PFLlib's FedGC:

- A test sample of a class the client never trained on counts as wrong; PFLlib maps such a
  label to the client's first class, so it is counted right when that class is predicted.
- The server knows a client's embeddings from its first upload on (PFLlib builds every client,
  and so every head, before round 1), so with partial participation the regulariser covers the
  clients seen so far. Every client's initial embeddings are rows of one seeded table
  (U(−1/√D, 1/√D), nn.Linear's initialisation).
- The regulariser is evaluated with a log-sum-exp (PFLlib exponentiates dot products directly,
  which overflows for large embeddings); the value and gradient are the same otherwise.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import Tensor, nn

from .base import (
    Client,
    ClientContext,
    EvalReport,
    HParams,
    Message,
    Reply,
    ServerContext,
    TrainResult,
)
from .fedavg import FedAvgServer
from .parts import Part, select_state
from .registry import register_algorithm


class FedGCHParams(HParams):
    lam: float = Field(
        1.0,
        ge=0.0,
        description="server step on the cross-client regulariser, as a multiple of the learning "
        "rate (0 = no correction)",
    )


class FedGCClient(Client):
    shared = ("model/body", "emb", "init")  # body; own embeddings (or the initial table)
    persistent = ()  # the server keeps the embeddings

    def __init__(self, ctx: ClientContext) -> None:
        super().__init__(ctx)
        counts = torch.bincount(ctx.train_y, minlength=ctx.num_classes)
        self.classes = torch.nonzero(counts).flatten().to(ctx.device)  # ascending class ids
        self.local_index = torch.full((ctx.num_classes,), -1, dtype=torch.int64, device=ctx.device)
        self.local_index[self.classes] = torch.arange(len(self.classes), device=ctx.device)
        dim = self.model.feature_dim
        with torch.random.fork_rng(devices=[]):  # values come from the server
            self.emb = nn.Linear(dim, len(self.classes), bias=False).to(ctx.device)
        self.init = {"weight": torch.zeros(ctx.num_classes, dim, device=ctx.device)}

    def parts(self) -> dict[str, Part]:
        return {**super().parts(), "emb": self.emb, "init": self.init}

    def receive(self, message: Message) -> None:
        super().receive(message)
        if "init/weight" in message:  # first contact: this client's rows of the initial table
            with torch.no_grad():
                self.emb.weight.copy_(self.init["weight"][self.classes])

    def loss(self, model: nn.Module, x: Tensor, y: Tensor) -> Tensor:
        return F.cross_entropy(self.emb(model.body(x)), self.local_index[y])

    def predict(self, model: nn.Module, x: Tensor) -> Tensor:
        features = model.body(x)
        scores = torch.full(
            (x.shape[0], self.ctx.num_classes), float("-inf"), device=features.device
        )
        if len(self.classes) == 0:
            return scores.zero_()
        scores[:, self.classes] = self.emb(features).to(scores.dtype)
        return scores

    def train_local(self, epochs: int | None = None) -> TrainResult:
        """SGD on the body and the class embeddings."""
        self.emb.train()
        params = [*self.model.body.parameters(), *self.emb.parameters()]
        return self.train(params=params, epochs=epochs)

    def fit(self) -> Reply:
        result = self.train_local()
        message = select_state(self.parts(), ("model/body",))
        message["emb/weight"] = self.emb.weight.detach().clone()
        message["emb/classes"] = self.classes.clone()
        return self.reply(message, result)

    def finetune(self, epochs: int) -> None:
        self.train_local(epochs)

    def evaluate(self, model: nn.Module | None = None, train_loss: bool = True) -> EvalReport:
        self.emb.eval()
        return super().evaluate(model, train_loss)


def gradient_correction_loss(
    embeddings: dict[int, Tensor], classes: dict[int, Tensor], num_classes: int
) -> Tensor:
    """FedGC's regulariser over every stored client's embeddings (see the module docstring);
    class anchors carry no gradient."""
    ids = sorted(embeddings)
    first = embeddings[ids[0]]
    sums = torch.zeros(num_classes, first.shape[1], dtype=first.dtype, device=first.device)
    holders = torch.zeros(num_classes, dtype=first.dtype, device=first.device)
    for cid in ids:
        sums.index_add_(0, classes[cid], embeddings[cid].detach())
        holders[classes[cid]] += 1
    anchors = sums / holders.clamp(min=1).unsqueeze(1)
    total = first.new_zeros(())
    for c in range(num_classes):
        if holders[c] == 0:
            continue
        lacking = [embeddings[j] for j in ids if not bool((classes[j] == c).any())]
        if not lacking:
            continue
        anchor = anchors[c]
        positive = anchor @ anchor
        negatives = torch.cat([w @ anchor for w in lacking])
        term = torch.logsumexp(torch.cat([positive.view(1), negatives]), 0) - positive
        total = total + holders[c] * term  # one term per client that holds c
    return total


class FedGCServer(FedAvgServer):
    """Averages bodies; keeps and corrects every client's class embeddings."""

    def __init__(self, ctx: ServerContext, hparams: FedGCHParams) -> None:
        super().__init__(ctx, hparams)
        bound = 1.0 / math.sqrt(ctx.feature_dim)
        table = torch.rand(ctx.num_classes, ctx.feature_dim, generator=ctx.rng(0, "fedgc-init"))
        self.initial_table = ((2 * table - 1) * bound).to(ctx.device)
        self.embeddings: dict[int, Tensor] = {}
        self.classes: dict[int, Tensor] = {}

    def configure(self, round: int, client_ids: list[int]) -> dict[int, Message]:
        return {
            cid: (
                {"emb/weight": self.embeddings[cid]}
                if cid in self.embeddings
                else {"init/weight": self.initial_table}
            )
            for cid in client_ids
        }

    def aggregate(self, round: int, replies: dict[int, Reply]) -> None:
        if not replies:
            return
        bodies = {}
        for cid, reply in replies.items():
            msg = dict(reply.message)
            self.embeddings[cid] = msg.pop("emb/weight").detach().clone()
            self.classes[cid] = msg.pop("emb/classes").detach().clone()
            bodies[cid] = Reply(msg, reply.num_samples, reply.metrics)
        super().aggregate(round, bodies)
        if self.hp.lam > 0:
            self.correct()

    def correct(self) -> None:
        """One SGD step of size lam·lr on the regulariser, over all stored embeddings."""
        weights = {cid: w.clone().requires_grad_(True) for cid, w in self.embeddings.items()}
        loss = gradient_correction_loss(weights, self.classes, self.ctx.num_classes)
        if not loss.requires_grad:
            return  # no class is missing anywhere: nothing to correct
        loss.backward()
        step = self.hp.lam * self.ctx.settings.lr
        for cid, w in weights.items():
            if w.grad is not None:
                self.embeddings[cid] = (w - step * w.grad).detach()

    def state_dict(self) -> dict[str, Tensor]:
        state = dict(self.global_state)
        for cid in self.embeddings:
            state[f"emb/{cid}/weight"] = self.embeddings[cid]
            state[f"emb/{cid}/classes"] = self.classes[cid]
        return state

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        self.global_state = {k: v for k, v in state.items() if not k.startswith("emb/")}
        self.embeddings, self.classes = {}, {}
        for key, value in state.items():
            if key.startswith("emb/"):
                _, cid, what = key.split("/")
                target = self.embeddings if what == "weight" else self.classes
                target[int(cid)] = value


register_algorithm(
    "fedgc",
    FedGCClient,
    FedGCServer,
    FedGCHParams,
    "FedGC: private class embeddings; the server corrects them with a cross-client softmax term",
    family="pFL",
    paper="Niu & Deng, Federated Learning for Face Recognition with Gradient Correction, AAAI 2022",
)
