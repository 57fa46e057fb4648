"""A run's numeric precision as one object (`train.precision`), which the loop and the checkpoint
consult and never look behind, as Lightning's precision plugins are: the forward pass's compute
dtype (torch's automatic mixed precision), backward and the optimizer step, and the state they
keep in a checkpoint.

- `fp32`: the plain path.
- `bf16`: the forward pass (and the loss) in bfloat16, whose range is fp32's: nothing to scale.
- `fp16`: the same in float16, whose narrow range makes small gradients underflow: the loss is
  scaled before backward and the gradients unscaled before the step (torch's gradient scaler),
  a step whose scaled gradients overflowed is skipped, and the scale is checkpointed with the
  peer (`grad_scaler`), so a resumed run scales as the uninterrupted one did.

A peer sharded with FSDP (`sharded`) is not run under autocast: FSDP casts the parameters
itself, by its mixed-precision policy (`sharding_policy`: parameters all-gathered and computed
in bf16, gradients reduced in fp32 and kept, with the optimizer's state, against fp32 shards).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:  # imported where a sharded peer needs it (engine/sharding.py says why)
    from torch.distributed.fsdp import MixedPrecisionPolicy

COMPUTE_DTYPES = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


class Precision:
    def __init__(self, name: str, device: torch.device, sharded: bool = False):
        self.name = name
        self.device = device
        self.dtype = COMPUTE_DTYPES[name]
        self.sharded = sharded
        if sharded and name == "fp16":  # the config refuses it (train.precision); a scaler would need FSDP's own
            raise ValueError("fp16 is not run on a sharded peer: use bf16")
        self.scaler = torch.amp.GradScaler(device.type) if name == "fp16" else None

    def forward(self):
        """The context of the forward pass and the loss: computed in `dtype` (fp32: as they are)
        under autocast; a sharded peer's casts are FSDP's (`sharding_policy`), none here."""
        return torch.autocast(self.device.type, dtype=self.dtype, enabled=self.dtype is not None and not self.sharded)

    def sharding_policy(self) -> MixedPrecisionPolicy:
        """FSDP's mixed precision for this precision: compute in `dtype`, gradients reduced in
        fp32 (a bf16 sum over many workers loses the small ones); fp32: no casts at all."""
        from torch.distributed.fsdp import MixedPrecisionPolicy

        return MixedPrecisionPolicy(param_dtype=self.dtype, reduce_dtype=torch.float32 if self.dtype else None)

    def backward(self, loss: torch.Tensor) -> None:
        (self.scaler.scale(loss) if self.scaler is not None else loss).backward()

    def optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        if self.scaler is not None:  # fp16: skips the step when the scaled gradients overflowed
            self.scaler.step(optimizer)
            self.scaler.update()
        else:
            optimizer.step()

    def state_dict(self) -> dict:
        """What a peer's checkpoint keeps of the precision (fp16's scale), merged into the peer's state."""
        return {"grad_scaler": self.scaler.state_dict()} if self.scaler is not None else {}

    def load_state_dict(self, state: dict) -> None:
        """From a peer's checkpoint state; a file without the scaler's (a run that was not fp16
        before, and every file older than this object: the key is the one they wrote) starts
        the scale afresh."""
        if self.scaler is not None and "grad_scaler" in state:
            self.scaler.load_state_dict(state["grad_scaler"])
