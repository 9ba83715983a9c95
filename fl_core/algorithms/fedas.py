"""FedAS (Yang, Huang and Ye, CVPR 2024): federated parameter-alignment and client-synchronization.

The body is shared, the head is personal. Each round a selected client:

1. *parameter alignment*: before it overwrites its body, it computes the class prototypes (mean
   body features per class, eval mode) of its own data under its current local body; it then
   loads the received global body and trains it for ``align_epochs`` on
   Σ_c MSE(body(x)[y = c], prototype_c) per mini-batch of ``align_batch_size``, plain SGD at
   ``align_lr``, so that the shared body first learns the client's local representation;
2. trains the whole model (aligned body + its own head) with cross-entropy;
3. estimates the trace of its model's Fisher information on its training data, as the
   authors' code does: the sum over mini-batches of ||∇θ mean NLL(batch)||² (all parameters,
   eval mode, one pass);
4. uploads its body and that trace. The server averages the bodies weighted by the traces
   (normalised to sum to one): a client whose parameters carry little information (a straggler
   with an under-trained model) weighs little.

A client is evaluated with its own model (local body after its last training + its head); a
client that has never trained (a held-out new client, or one not selected yet) is sent the
global body for evaluation.

Differences from PFLlib's FedAS (whose code is the authors'):

- PFLlib uploads and averages the whole model, but clients only ever load the body from it; here
  only the body travels (the same updates, fewer bytes).
- A client with no local model yet (its first participation) has no local knowledge to align to;
  PFLlib still aligns the global body to the prototypes of the client's *initial, untrained*
  model. Here it takes the global body as is. ``align_untrained=true`` reproduces PFLlib.
- PFLlib also computes the Fisher trace of clients that were not selected, then never uses it;
  here only selected clients compute it.
- The alignment epoch runs in train mode (PFLlib's copy of the global model happens to be in
  eval mode); this matters only for BatchNorm and dropout.
"""

from __future__ import annotations

import torch
from pydantic import Field
from torch import Tensor, nn

from .base import Client, ClientContext, HParams, Message, Reply, ServerContext, split_batches
from .common import class_means, weighted_average
from .fedavg import FedAvgServer
from .registry import AlgorithmError, register_algorithm


class FedAsHParams(HParams):
    align_lr: float = Field(0.01, gt=0.0, description="SGD step size of the alignment epochs")
    align_epochs: int = Field(
        1, ge=0, description="epochs aligning the received body to the local prototypes"
    )
    align_batch_size: int = Field(16, ge=1, description="mini-batch size of the alignment")
    align_untrained: bool = Field(
        False,
        description="also align on a client's first participation, to its initial model's "
        "prototypes (PFLlib)",
    )


def alignment_loss(features: Tensor, labels: Tensor, prototypes: Tensor) -> Tensor:
    """Σ over the classes in the batch of the MSE between their features and their prototype.

    Computed without a loop over classes: a sample of class c weighs 1 / (n_c·d), n_c the
    class's count in the batch, so no step waits for the device to list the batch's classes."""
    sq = (features - prototypes[labels].to(features.dtype)).pow(2).sum(1)
    n_c = torch.bincount(labels, minlength=prototypes.shape[0])[labels]
    return (sq / (n_c * features.shape[1])).sum()


class FedAsClient(Client):
    shared = ("model/body",)
    persistent = ("model",)

    def __init__(self, ctx: ClientContext) -> None:
        super().__init__(ctx)
        self._has_local = False

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        super().load_state_dict(state)
        self._has_local = bool(state)

    def receive(self, message: Message) -> None:
        align = bool(message) and (self._has_local or self.hp.align_untrained)
        prototypes = class_means(self.model, self.ctx)[0] if align else None
        super().receive(message)
        if prototypes is not None and self.ctx.num_train:
            self.align(prototypes)

    def align(self, prototypes: Tensor) -> None:
        """``align_epochs`` of SGD on the body toward the local prototypes."""
        ctx, body = self.ctx, self.model.body
        body.train()
        opt = torch.optim.SGD(body.parameters(), lr=self.hp.align_lr)
        bs = self.hp.align_batch_size
        for _ in range(self.hp.align_epochs):
            perm = torch.randperm(ctx.num_train, generator=ctx.rng)
            for idx in split_batches(perm, bs, ctx.settings.drop_last):
                x = ctx.train_x.index_select(0, idx).to(ctx.device)
                y = ctx.train_y.index_select(0, idx).to(ctx.device)
                opt.zero_grad(set_to_none=True)
                alignment_loss(body(x), y, prototypes).backward()
                opt.step()

    def fisher_trace(self) -> float:
        """Σ over mini-batches of the squared norm of the mean-NLL gradient (all parameters)."""
        model = self.model
        model.eval()
        params = [p for p in model.parameters() if p.requires_grad]
        total = torch.zeros((), dtype=torch.float64, device=self.ctx.device)
        for x, y in self.batches(epochs=1):
            nll = nn.functional.cross_entropy(model(x), y)
            grads = torch.autograd.grad(nll, params)
            total += sum(g.double().pow(2).sum() for g in grads)
        return float(total)  # one wait for the device, after the last batch

    def fit(self) -> Reply:
        result = self.train()
        message = self.upload()
        message["fisher/trace"] = torch.tensor([self.fisher_trace()], dtype=torch.float64)
        return self.reply(message, result)


class FedAsServer(FedAvgServer):
    """Averages bodies weighted by the clients' Fisher traces; remembers who has trained."""

    def __init__(self, ctx: ServerContext, hparams: HParams) -> None:
        super().__init__(ctx, hparams)
        self.trained = torch.zeros(ctx.num_clients, dtype=torch.bool)

    def weight(self, reply: Reply) -> float:
        return float(reply.message["fisher/trace"])

    def aggregate(self, round: int, replies: dict[int, Reply]) -> None:
        if not replies:
            return
        models = []
        for cid, reply in replies.items():
            body = {k: v for k, v in reply.message.items() if k != "fisher/trace"}
            unknown = set(body) - set(self.global_state)
            if unknown or "fisher/trace" not in reply.message:
                raise AlgorithmError(
                    f"client {cid} uploaded {sorted(reply.message)[:3]}; fedas expects the body "
                    "and 'fisher/trace'"
                )
            models.append((body, self.weight(reply)))  # all-zero traces: a uniform average
            self.trained[cid] = True
        self.global_state = {**self.global_state, **weighted_average(models)}

    def evaluation_broadcast(self, round: int) -> Message:
        return {}  # a client that has trained is evaluated with its own model

    def configure_evaluation(self, round: int, client_ids: list[int]) -> dict[int, Message]:
        n = self.ctx.num_clients
        return {
            cid: self.global_state for cid in client_ids if cid >= n or not bool(self.trained[cid])
        }

    def state_dict(self) -> dict[str, Tensor]:
        return {**self.global_state, "trained": self.trained}

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        self.trained = state["trained"].clone()
        self.global_state = {k: v for k, v in state.items() if k != "trained"}


register_algorithm(
    "fedas",
    FedAsClient,
    FedAsServer,
    FedAsHParams,
    "FedAS: received body aligned to local prototypes, bodies averaged by Fisher-trace weights",
    family="pFL",
    paper="Yang, Huang and Ye, FedAS: Bridging Inconsistency in Personalized Federated "
    "Learning, CVPR 2024",
)
