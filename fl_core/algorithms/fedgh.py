"""FedGH (Yi et al., ACM MM 2023): a generalized global head trained on the server from class
prototypes.

Each round a selected client receives the global head, puts it on its own body and trains the
whole model with cross-entropy. It then uploads, for each class it holds, the mean feature of
its training samples under the trained body (computed in eval mode), with those classes' labels:
P·D floats and P labels for P classes held and D features. The server trains the global head
with SGD on the uploaded (prototype, label) pairs, every pair one sample, for
``server_epochs`` epochs of shuffled mini-batches of the federation's batch size, and broadcasts
it: (D + 1)·C floats per client down for C classes. Bodies never travel and persist per client,
so clients may run different architectures with one ``feature_dim``; the server checks before
training that their heads agree in shape, and trains the head of the first client's
architecture (the heads' forward must be the same).

Differences from HtFLlib's FedGH:

- The server head is the server's own module, initialised as the first client architecture's
  initial head. HtFLlib copies client 0's head at start-up, which is the same initial value;
  PFLlib's FedGH makes the server head *the same object* as client 0's head, so client 0's
  local training also moves the global head between rounds. That aliasing is not reproduced.
- ``server_epochs`` defaults to 1, HtFLlib's tuned setting for FedGH (``total.sh``: ``-se 1``);
  its flag default is 100, shared with FedGen and FedTGP. ``server_lr`` is HtFLlib's ``-slr``
  (0.01, also in ``total.sh``); PFLlib's FedGH defaults it to 1.0.
- A client uploads prototypes only for the classes it holds, with their labels, as HtFLlib's
  dict of prototypes does; a class no selected client holds gives no training pair that round.
- A client is evaluated with the latest global head on its own body; the head it trained is
  overwritten on receipt, so only the body persists.
"""

from __future__ import annotations

import torch
from pydantic import Field
from torch import Tensor, nn

from .base import Client, HParams, Message, Reply, Server, ServerContext
from .common import class_means, shared_model_state
from .registry import AlgorithmError, register_algorithm

HEAD_PREFIX = "model/head."


class FedGHHParams(HParams):
    server_lr: float = Field(
        0.01, gt=0.0, description="SGD learning rate of the global head on the server"
    )
    server_epochs: int = Field(
        1, ge=0, description="epochs over the received (prototype, label) pairs per round"
    )


class FedGHClient(Client):
    shared = ("model/head",)  # the global head, received; prototypes go up instead
    persistent = ("model/body",)  # this client's own body (any architecture)

    def fit(self) -> Reply:
        result = self.train()
        means, counts = class_means(self.model, self.ctx)
        held = torch.nonzero(counts > 0).flatten()  # only the classes this client holds
        return self.reply({"proto/local": means[held], "proto/labels": held}, result)


class FedGHServer(Server):
    """Holds the global head and trains it on the prototypes of each round's clients."""

    def __init__(self, ctx: ServerContext, hparams: FedGHHParams) -> None:
        super().__init__(ctx, hparams)
        self.global_state: dict[str, Tensor] = shared_model_state(ctx, ("model/head",))
        self.head = ctx.build_model(ctx.distinct_architectures[0]).head.to(ctx.device)

    def broadcast(self, round: int) -> Message:
        return self.global_state

    def aggregate(self, round: int, replies: dict[int, Reply]) -> None:
        protos, labels = [], []
        for cid, reply in replies.items():
            try:
                protos.append(reply.message["proto/local"].float())
                labels.append(reply.message["proto/labels"].long())
            except KeyError as e:
                raise AlgorithmError(
                    f"client {cid} sent no {e.args[0]!r} to the FedGH server"
                ) from None
        if not protos:
            return
        device = self.ctx.device
        x = torch.cat(protos).to(device)
        y = torch.cat(labels).to(device)
        if x.shape[0] == 0:
            return
        head = self.head
        head.load_state_dict({k.removeprefix(HEAD_PREFIX): v for k, v in self.global_state.items()})
        head.train()
        opt = torch.optim.SGD(head.parameters(), lr=self.hp.server_lr)
        rng = self.ctx.rng(round, "fedgh-head")
        bs = self.ctx.settings.batch_size
        for _ in range(self.hp.server_epochs):
            perm = torch.randperm(x.shape[0], generator=rng).to(device)
            for start in range(0, x.shape[0], bs):
                idx = perm[start : start + bs]
                opt.zero_grad(set_to_none=True)
                loss = nn.functional.cross_entropy(head(x[idx]), y[idx])
                loss.backward()
                opt.step()
        self.global_state = {
            HEAD_PREFIX + k: v.detach().clone() for k, v in head.state_dict().items()
        }

    def state_dict(self) -> dict[str, Tensor]:
        return dict(self.global_state)

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        self.global_state = dict(state)


register_algorithm(
    "fedgh",
    FedGHClient,
    FedGHServer,
    FedGHHParams,
    "FedGH: class prototypes up; a global head trained on them by the server, down",
    family="HtFL",
    paper="Yi et al., FedGH: Heterogeneous Federated Learning with Generalized Global Header, "
    "ACM MM 2023",
    heterogeneous=True,
)
