"""The `train` section: how each peer's steps run — their number, evaluation and checkpoint
cadence, numeric precision, and how a peer is split over its workers (`sharding`)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from codistill.errors import check


@dataclass(frozen=True, kw_only=True, slots=True)
class TrainConfig:
    steps: int = 3000
    """Optimizer steps per peer."""
    eval_every: int = 250
    """Evaluate every peer, the ensemble and churn on the test split every N steps (and at the end)."""
    checkpoint_every: int = 500
    """Save every peer's state every N steps (0: only at the end)."""
    keep_checkpoints: int = 2
    """How many of the newest checkpoints to keep (0: all)."""
    on_nonfinite: Literal["stop", "skip_step"] = "stop"
    """A loss that is NaN or infinite: `stop` the run (no checkpoint of the bad weights is
    written; every good one is kept), or `skip_step` (drop that step's update and go on; this
    checks every step, a GPU sync per step)."""
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"
    """The compute dtype of the forward pass and the payloads (mixed precision: the engine's
    `Precision`): `bf16` halves the bytes a peer sends; `fp16` adds a gradient scaler. Soft
    targets and KL terms are computed in fp32 whatever the precision."""
    compile: bool = False
    """Wrap each peer's network in `torch.compile` for training (not with feature taps)."""
    data_on_device: bool = False
    """Move the whole data set to the peer's device once; batches are gathered and augmented
    there (the same batches as on the CPU). For data sets that fit: MNIST-1D, CIFAR."""
    sharding: Literal["ddp", "fsdp"] = "ddp"
    """How a peer's workers (`ray.workers_per_peer`, `peers.<i>.workers`) split it, one setting
    for every peer: `ddp`, each worker holds the whole model, its gradients and optimizer state
    and gradients are averaged; `fsdp`, FSDP2 shards parameters, gradients and optimizer state
    over them (`fully_shard` per transformer block, then the root) for a peer too large for one
    worker, and a teacher is sharded like its students. A peer on one worker is not split either way."""
    activation_checkpointing: bool = False
    """Keep only each transformer block's input and recompute the block in backward (models that
    declare their blocks: `hf_causal_lm`, `gpt`): less activation memory for one more forward."""
    label_smoothing: float = 0.0
    """Every cross-entropy with the labels is taken against labels smoothed by this much
    (`F.cross_entropy(label_smoothing=…)`): the regularisation baseline beside which a
    distillation gain that is only regularisation shows as such (Sinha et al., 2021)."""

    def __post_init__(self):
        check(self.steps >= 1, "steps", f"must be >= 1, got {self.steps}")
        check(0 <= self.label_smoothing < 1, "label_smoothing", f"must be in [0, 1), got {self.label_smoothing}")
        check(self.eval_every >= 1, "eval_every", f"must be >= 1, got {self.eval_every}")
        check(self.checkpoint_every >= 0, "checkpoint_every", f"must be >= 0, got {self.checkpoint_every}")
        check(self.keep_checkpoints >= 0, "keep_checkpoints", f"must be >= 0, got {self.keep_checkpoints}")
        check(self.sharding == "ddp" or self.precision != "fp16", "precision",
              "fp16 needs a gradient scaler, which sharding: fsdp does not run here; use bf16 (FSDP's mixed "
              "precision: bf16 parameters, fp32 gradient reduction) or fp32")
