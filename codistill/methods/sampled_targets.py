"""Sampled soft targets (`exchange.targets: sampled`): an unbiased sparse estimate of a peer's
distribution, in the bytes top-k targets would take.

Per row a peer draws n tokens with replacement from its own soft target p = softmax(z/T) and
sends their ids; the receiver's estimate is their empirical distribution

    p̂_v = c_v / n,   c_v = #{draws equal to v},   E[p̂_v] = p_v exactly (c_v ~ Binomial(n, p_v)),

and the loss is T²·KL(p̂ ‖ softmax(s/T)). Its gradient in the student's logits s is
T·(softmax(s/T) − p̂), linear in p̂, so its expectation over the draws is T·(softmax(s/T) − p):
the gradient of the whole-distribution KL. (The KL's value is not unbiased — Σ p̂ log p̂, the
negative entropy of p̂, is biased upwards — but that term does not depend on the student.)
Toward the mean of M peers (codistillation's teacher, `mean_target_kl`) the receiver pools
every peer's n draws: p̄̂ = (1/M) Σ_j p̂_j, whose expectation is p̄ = (1/M) Σ_j p_j, so the
same gradient argument holds for the mean.

This is importance sampling (Anshumann et al., "Sparse Logit Sampling: Accelerating Knowledge
Distillation in LLMs", ACL 2025: random-sampling KD, unbiased, the gradient preserved in
expectation) with the proposal the distribution itself, where every importance weight p/q is
1, so nothing but the ids travels. What their paper's text says of its proposal and weights
could not be read here (only its abstract was reachable); this estimator is the one built from
first principles above. Top-k targets with a tail bucket (`losses.top_k_targets`) are biased:
the tail's shape is lost (spread evenly).

Bytes: n draws of int32 ids take the bytes of top-k's k values, k int32 ids and one tail value
(`sampled_draws`): with fp16 values, top-8 is 50 bytes a row and 12 draws 48.

Draws are a pure function of the logits drawn from (a generator keyed by their bits), so a run
draws the same on every runner and after a resume, with no random state to checkpoint, and
the run's own random numbers are untouched. A frozen teacher's targets on a batch seen again
are the same draws again — the estimate cached once, as the paper's offline setting does.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

ID_BYTES = 4  # ids travel as int32, as top-k's do


def sampled_draws(k: int, value_dtype: torch.dtype) -> int:
    """The draws that fit the bytes of a top-k target (k values, k ids, one tail value)."""
    value = torch.finfo(value_dtype).bits // 8
    return max(1, (k * (value + ID_BYTES) + value) // ID_BYTES)


KEY_ELEMENTS = 2**20
"""At most this many of the logits (evenly strided) make the key: exact in int64, and cheap."""


def logits_key(logits: torch.Tensor) -> int:
    """A key from the logits' bits: integer arithmetic (|bits·weight| < 2^41, at most 2^20 terms:
    no overflow), so the same bits give the same key on every device and in any summation order."""
    flat = logits.detach().float().flatten()
    bits = flat[::max(1, flat.numel() // KEY_ELEMENTS)].contiguous().view(torch.int32).long()
    weights = torch.arange(bits.numel(), device=bits.device) % 1_009 + 1
    return int((bits * weights).sum()) % (2**62) + flat.numel()


def sampled_targets(logits: torch.Tensor, draws: int, temperature: float,
                    generator: torch.Generator | None = None, chunk_elements: int = 2**22) -> dict:
    """n = `draws` token ids per row drawn with replacement from softmax(z/T): {"sampled_ids":
    (N, n) int32}. By inverse CDF on uniforms from a CPU generator (keyed by the logits unless
    one is given), so a CUDA tensor draws as a CPU one would; a chunk of rows at a time (the
    CDF is fp64: a whole batch of positions over a large vocabulary would be gigabytes)."""
    if generator is None:
        generator = torch.Generator().manual_seed(logits_key(logits))
    rows, vocab = logits.shape
    u = torch.rand(rows, draws, generator=generator, dtype=torch.float64).to(logits.device)
    ids = torch.empty(rows, draws, dtype=torch.int32, device=logits.device)
    step = max(1, chunk_elements // vocab)
    for start in range(0, rows, step):
        cdf = F.softmax(logits[start:start + step].detach().float() / temperature, dim=-1).double().cumsum(-1)
        # Scaled by the row's own total: rounding in the sum never leaves a uniform past the last token.
        part = torch.searchsorted(cdf, u[start:start + step] * cdf[:, -1:], right=True)
        ids[start:start + step] = part.clamp(max=vocab - 1).to(torch.int32)
    return {"sampled_ids": ids}


def empirical_distribution(ids: torch.Tensor, vocab: int) -> torch.Tensor:
    """p̂ from draws (N, n) — or every peer's pooled, (N, M, n) — as dense (N, V) fp32."""
    ids = ids.long().flatten(1)
    counts = torch.zeros(ids.shape[0], vocab, device=ids.device).scatter_add_(-1, ids, torch.ones_like(ids,
                                                                                                     dtype=torch.float))
    return counts / ids.shape[1]


def sampled_kl(student_logits: torch.Tensor, target: dict, temperature: float) -> torch.Tensor:
    """T²·KL(p̂ ‖ softmax(student/T)), averaged over rows, from one peer's draws (`sampled_ids`)
    or the mean of M peers' (`peers_sampled_ids`, (N, M, n): pooled, p̄̂ = (1/M) Σ_j p̂_j). Dense
    over the vocabulary like `mean_top_k_kl`; `losses.payload_kl` takes it a chunk of rows at a time."""
    ids = target["sampled_ids"] if "sampled_ids" in target else target["peers_sampled_ids"]
    log_q = F.log_softmax(student_logits.float() / temperature, dim=-1)
    p = empirical_distribution(ids, log_q.shape[-1])
    # Where no draw fell, p̂ is 0 and so is its term (also where the student's log q is −inf).
    cross = torch.where(p > 0, p * log_q, 0)
    return temperature**2 * (torch.xlogy(p, p) - cross).sum(-1).mean()
