"""Methods whose peers teach each other every step, in either of the two forms the papers use:

- across peers (`branches: 1`): one peer per worker (GPU); each step every peer sends its
  payload (logits, and whatever else the method declares) and receives the others';
- in one network (`branches: m ≥ 2`, one peer): a shared low-level trunk and m branches, each
  branch a whole peer network as the method builds it across workers; the branches are the
  peers, and exchange inside the network.

One loss serves both: a method writes its loss for one peer given the other peers' payloads
(`own_loss` / `distill_terms` on `Signals`). In one network, branch k's loss is that same loss
with the other branches' detached payloads, and the network's loss is the sum over branches —
so the trunk learns from every branch, and each branch exactly as it would across workers.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from codistill.errors import ConfigError
from codistill.methods.base import DistillConfig, Method, Needs, Signals
from codistill.models import MODELS
from codistill.models.multi_branch import make_peer_branches


@dataclass(frozen=True, kw_only=True, slots=True)
class PeerMethodConfig(DistillConfig):
    branches: int = 1
    """1: one peer per worker, exchanging across workers. m ≥ 2: one peer whose network has a
    shared trunk and m branches that are the peers (the papers' CIFAR form)."""

    @property
    def trains_one_network(self) -> bool:
        return self.branches >= 2

    def own_needs(self) -> Needs:
        # Branches of one network see each other in its own forward pass: nothing to exchange.
        return Needs(peers=not self.trains_one_network)

    def check(self, peers, teacher) -> None:
        if self.branches < 1:
            raise ConfigError("method.branches", f"must be >= 1, got {self.branches}")
        if self.branches < 2:
            DistillConfig.check(self, peers, teacher)
            return
        if len(peers) != 1:
            raise ConfigError("peers", f"method {self.name!r} in one network (method.branches={self.branches}) "
                              f"trains exactly one peer, got {len(peers)}; across peers set method.branches: 1")
        if MODELS[peers[0].model].branch_point is None:
            able = sorted(n for n, e in MODELS.items() if e.branch_point is not None)
            raise ConfigError("peers.0.model", f"{peers[0].model!r} has no trunk/branch split; "
                              f"models that can branch: {', '.join(able)}")
        if self.also:
            raise ConfigError("method.also", "terms cannot be added to a method in one network (method.branches >= 2)")
        if self.branches < self.min_peers:
            raise ConfigError("method.branches", f"method {self.name!r} needs at least {self.min_peers} branches, "
                              f"got {self.branches}")
        DistillConfig.check(self, [peers[0]] * self.min_peers, teacher)


class PeerMethod(Method):
    """Subclasses write one peer: `peer_network` (the model as the method wraps it),
    `whole_network` (what a one-network form wraps around its branches), `peer_logits`,
    `peer_heads`, `members` (the outputs an ensemble is taken over), `own_payload` and
    `own_loss`/`distill_terms`, and `after_update` for state kept across steps (PCL's temporal
    mean). A method whose one-network form is more than its peers side by side (ONE's gate on
    the trunk) overrides `branch_network`, `branch_ensemble` and `loss`."""

    config_class = PeerMethodConfig

    def __init__(self, config: PeerMethodConfig, top_k=None):
        self.trains_one_network = config.trains_one_network
        super().__init__(config, top_k)


    # -- one peer (a worker's, or a branch's) ------------------------------------------------

    def peer_network(self, model: nn.Module) -> nn.Module:
        return model

    def whole_network(self, network: nn.Module) -> nn.Module:
        """What wraps the peer network, or all branches with their trunk (a temporal mean)."""
        return network

    def peer_logits(self, outputs) -> torch.Tensor:
        return outputs

    def peer_heads(self, outputs) -> dict[str, torch.Tensor]:
        return {"model": self.peer_logits(outputs)}

    def members(self, outputs) -> list:
        """The whole network's outputs → each member's (one across peers; the branches)."""
        return list(outputs) if self.trains_one_network else [outputs]

    def branch_network(self, model: nn.Module, model_name: str) -> nn.Module:
        """The one-network form: a shared trunk and the branches, each a peer network."""
        return make_peer_branches(model, model_name, self.config.branches, self.peer_network)

    def branch_ensemble(self, outputs, firsts: list[torch.Tensor]) -> torch.Tensor:
        """The branches' ensemble head: the mean of their probabilities, as logits (log-probabilities)."""
        return torch.stack([z.float().softmax(-1) for z in firsts]).mean(0).log()

    # -- the Method interface -----------------------------------------------------------------

    def own_network(self, model, model_name, tap_shapes):
        if self.trains_one_network:
            network = self.branch_network(model, model_name)
        else:
            network = self.peer_network(model)
        return self.whole_network(network)

    def logits(self, outputs):
        members = [self.peer_logits(o) for o in self.members(outputs)]
        return members[0] if len(members) == 1 else torch.stack(members).mean(0)

    def evaluation_heads(self, outputs):
        members = self.members(outputs)
        if not self.trains_one_network:
            return self.peer_heads(members[0])
        firsts = [next(iter(self.peer_heads(o).values())) for o in members]
        heads = {"ensemble": self.branch_ensemble(outputs, firsts)}
        heads.update({f"branch{k}": z for k, z in enumerate(firsts)})
        return heads

    def evaluation_members(self, heads):
        return [name for name in heads if name.startswith("branch")] if self.trains_one_network else [next(iter(heads))]

    def payload(self, outputs, taps):
        member = self.members(outputs)[0]
        sent = self.own_payload(self.peer_logits(member), member, taps)
        for extra in self.also:
            sent.update(extra.own_payload(self.peer_logits(member), member, taps))
        return self.sendable(sent)

    def loss(self, s: Signals):
        if not self.trains_one_network:
            return super().loss(s)
        members = self.members(s.outputs)
        sent = [{n: t.detach() for n, t in self.own_payload(self.peer_logits(o), o, {}).items()} for o in members]
        total, terms = 0.0, {}
        for k, member in enumerate(members):
            branch = Signals(network=s.network, outputs=member, logits=self.peer_logits(member), labels=s.labels,
                             step=s.step, peer=k, seed=s.seed, peers=[p for j, p in enumerate(sent) if j != k],
                             label_smoothing=s.label_smoothing)
            value, branch_terms = self.own_loss(branch)
            total = total + value
            for name, v in branch_terms.items():
                terms[name] = terms.get(name, 0.0) + v / len(members)  # terms: the branches' mean
        return total, {**terms, "loss": total.detach()}
