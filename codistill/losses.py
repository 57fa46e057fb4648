"""Loss pieces shared by the methods: plain tensors in, a scalar out."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def soft_targets(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    return F.softmax(logits / temperature, dim=-1)


def soft_kl(student_logits: torch.Tensor, teacher_probs: torch.Tensor, temperature: float) -> torch.Tensor:
    """T² · KL(teacher ‖ softmax(student / T)), averaged over the batch.

    The T² keeps the gradient of the soft term on the same scale as the cross-entropy's
    when T changes (Hinton et al. 2015): the soft gradient shrinks as 1/T².
    """
    log_student = F.log_softmax(student_logits / temperature, dim=-1)
    return temperature**2 * F.kl_div(log_student, teacher_probs, reduction="batchmean")


def mean_peer_kl(student_logits: torch.Tensor, peer_logits: list[torch.Tensor], temperature: float) -> torch.Tensor:
    """(1/(K-1)) Σ_j T²·KL(p_j^T ‖ p_i^T): the DML term, one KL per peer, averaged."""
    terms = [soft_kl(student_logits, soft_targets(z.detach(), temperature), temperature) for z in peer_logits]
    return torch.stack(terms).mean()


def gated_ensemble(logits: torch.Tensor, gate_logits: torch.Tensor) -> torch.Tensor:
    """Σ_j softmax(gate)_j · z_j. logits: (m, B, C); gate_logits: (B, m) → (B, C)."""
    weights = F.softmax(gate_logits, dim=-1)  # (B, m), sums to one per sample
    return torch.einsum("bm,mbc->bc", weights, logits)


def linear_rampup(step: int, rampup_steps: int) -> float:
    """0 → 1 linearly over `rampup_steps` (1 throughout when 0)."""
    if rampup_steps <= 0:
        return 1.0
    return min(1.0, (step + 1) / rampup_steps)
