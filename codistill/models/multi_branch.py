"""Multi-branch network shapes, built from any registered model that declares a
`branch_point`. Every every-step peer method (`PeerMethodConfig`) can train its peers as branches
of one network (`method.branches >= 2`: DML, KDCL, OKDDip, PCL and ONE alike) — not
codistillation, whose peers meet once a round, each its own network; the gate is ONE's (Lan et
al., NeurIPS 2018):

- `MultiBranchModel`: a shared low-level trunk, m branches (copies of the high-level layers
  and classifier, each initialised differently) and a gate on the pooled trunk features.
- `GatedPeer`: one peer of ONE-across-peers: the model plus a gate head on its penultimate
  features, giving one gate logit per sample.
"""

from __future__ import annotations

import copy
from typing import NamedTuple

import torch
from torch import nn

from codistill.models.registry import MODELS, PeerModel


class BranchOutputs(NamedTuple):
    logits: torch.Tensor       # (m, B, C): every branch's logits
    gate_logits: torch.Tensor  # (B, m): softmax over these weights the branches


def _out_channels(module: nn.Module) -> int:
    last = [m for m in module.modules() if isinstance(m, (nn.Conv1d, nn.Conv2d, nn.Linear))][-1]
    return last.out_channels if isinstance(last, (nn.Conv1d, nn.Conv2d)) else last.out_features


def _pool(x: torch.Tensor) -> torch.Tensor:
    return x.flatten(2).mean(-1) if x.dim() > 2 else x  # global average over length / H×W


def _reset(module: nn.Module) -> None:
    for m in module.modules():
        if hasattr(m, "reset_parameters") and m is not module:
            m.reset_parameters()


class MultiBranchModel(nn.Module):
    def __init__(self, model: PeerModel, branch_point: int, branches: int):
        super().__init__()
        self.trunk = model.features[:branch_point]
        high_level = nn.Sequential(*model.features[branch_point:], model.classifier)
        self.branches = nn.ModuleList([high_level] + [copy.deepcopy(high_level) for _ in range(branches - 1)])
        for branch in list(self.branches)[1:]:
            _reset(branch)  # copies would start identical, and identical branches teach nothing
        width = _out_channels(self.trunk)
        # The paper's gate: pooled trunk features → FC → BN → ReLU, softmax in the loss.
        self.gate = nn.Sequential(nn.Linear(width, branches), nn.BatchNorm1d(branches), nn.ReLU())

    def forward(self, x: torch.Tensor) -> BranchOutputs:
        shared = self.trunk(x)
        logits = torch.stack([branch(shared) for branch in self.branches])
        return BranchOutputs(logits, self.gate(_pool(shared)))

    def single_branch(self, k: int) -> nn.Sequential:
        """Branch k with the trunk as a standalone network: the deployable student, at the
        inference cost of one model."""
        return nn.Sequential(copy.deepcopy(self.trunk), copy.deepcopy(self.branches[k]))


class GatedOutputs(NamedTuple):
    logits: torch.Tensor  # (B, C)
    gate: torch.Tensor    # (B, 1): this peer's gate logit; a softmax over the peers' weights them


class GatedPeer(nn.Module):
    def __init__(self, model: PeerModel):
        super().__init__()
        self.model = model
        self.gate = nn.Linear(model.feature_dim, 1)

    def forward(self, x: torch.Tensor) -> GatedOutputs:
        features = self.model.features(x)
        return GatedOutputs(self.model.classifier(features), self.gate(features))


def make_multi_branch(model: PeerModel, model_name: str, branches: int) -> MultiBranchModel:
    point = MODELS[model_name].branch_point
    if point is None:
        able = sorted(n for n, e in MODELS.items() if e.branch_point is not None)
        raise ValueError(f"model {model_name!r} has no trunk/branch split; models that can branch: {', '.join(able)}")
    return MultiBranchModel(model, point, branches)


class PeerBranches(nn.Module):
    """A shared trunk and m branches, each branch a whole peer network of its own: `make_peer`
    wraps a `PeerModel` holding a copy of the high-level layers and a classifier (the way a
    method wraps a peer's model across workers, e.g. with attention projections). The forward
    pass returns each branch's outputs, in branch order: the peers of one network."""

    def __init__(self, model: PeerModel, branch_point: int, branches: int, make_peer):
        super().__init__()
        self.trunk = model.features[:branch_point]
        high_level = nn.Sequential(*model.features[branch_point:])
        members = []
        for k in range(branches):
            branch = PeerModel(high_level if k == 0 else copy.deepcopy(high_level), model.feature_dim,
                               model.classifier.out_features)
            if k == 0:
                branch.classifier = model.classifier
            else:
                _reset(branch)  # copies would start identical, and identical branches teach nothing
            members.append(make_peer(branch))
        self.branches = nn.ModuleList(members)

    def forward(self, x: torch.Tensor) -> list:
        shared = self.trunk(x)
        return [branch(shared) for branch in self.branches]


def make_peer_branches(model: PeerModel, model_name: str, branches: int, make_peer) -> PeerBranches:
    point = MODELS[model_name].branch_point
    if point is None:
        able = sorted(n for n, e in MODELS.items() if e.branch_point is not None)
        raise ValueError(f"model {model_name!r} has no trunk/branch split; models that can branch: {', '.join(able)}")
    return PeerBranches(model, point, branches, make_peer)
