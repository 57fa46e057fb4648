"""Loss pieces shared by the methods: plain tensors in, a scalar out."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from codistill.methods.sampled_targets import sampled_kl


def soft_targets(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    # fp32 whatever the compute dtype: bf16 keeps 8 bits of mantissa, too few for the small
    # probabilities a soft target is made of.
    return F.softmax(logits.float() / temperature, dim=-1)


def soft_kl(student_logits: torch.Tensor, teacher_probs: torch.Tensor, temperature: float) -> torch.Tensor:
    """T² · KL(teacher ‖ softmax(student / T)), averaged over the batch.

    The T² keeps the gradient of the soft term on the same scale as the cross-entropy's
    when T changes (Hinton et al. 2015): the soft gradient shrinks as 1/T².
    """
    log_student = F.log_softmax(student_logits.float() / temperature, dim=-1)
    return temperature**2 * F.kl_div(log_student, teacher_probs, reduction="batchmean")


def mean_peer_kl(student_logits: torch.Tensor, peer_logits: list[torch.Tensor], temperature: float) -> torch.Tensor:
    """(1/(K-1)) Σ_j T²·KL(p_j^T ‖ p_i^T): the DML term, one KL per peer, averaged."""
    return mean_payload_kl(student_logits, [{"logits": z.detach()} for z in peer_logits], temperature)


def mean_payload_kl(student_logits: torch.Tensor, payloads: list[dict], temperature: float) -> torch.Tensor:
    """`mean_peer_kl` from the peers' payloads: each holds its logits, or its top-k soft target."""
    return torch.stack([payload_kl(student_logits, p, temperature) for p in payloads]).mean()


def gated_ensemble(logits: torch.Tensor, gate_logits: torch.Tensor) -> torch.Tensor:
    """Σ_j softmax(gate)_j · z_j. logits: (m, B, C); gate_logits: (B, m) → (B, C)."""
    weights = F.softmax(gate_logits, dim=-1)  # (B, m), sums to one per sample
    return torch.einsum("bm,mbc->bc", weights, logits)


def linear_rampup(step: int, rampup_steps: int) -> float:
    """0 → 1 linearly over `rampup_steps` (1 throughout when 0)."""
    if rampup_steps <= 0:
        return 1.0
    return min(1.0, (step + 1) / rampup_steps)


def logit_l2(student_logits: torch.Tensor, target_logits: torch.Tensor) -> torch.Tensor:
    """Ba & Caruana 2014: ½·‖z_s − z_t‖²₂ summed over the classes, averaged over the rows (their
    1/(2T) Σ_t over the T examples, here the batch). In fp32 whatever the compute dtype."""
    return 0.5 * (student_logits.float() - target_logits.float()).pow(2).sum(-1).mean()


# ---------------------------------------------------------------------------------------------
# Feature-based terms (FitNets, attention transfer, FSP)


def attention_map(features: torch.Tensor) -> torch.Tensor:
    """Zagoruyko & Komodakis 2017: Q = mean_c |A_c|², flattened and L2-normalised per sample.
    features: (B, C, *spatial) → (B, *spatial), unit norm over the spatial positions. The
    normalisation is what lets networks of different widths and scales be compared."""
    q = features.float().pow(2).mean(1)
    return F.normalize(q.flatten(1), dim=1).view_as(q)


def resize_map(q: torch.Tensor, size: torch.Size) -> torch.Tensor:
    """An attention map resized to another network's spatial size (linear interpolation),
    normalised again so the distance stays a distance between unit vectors."""
    if q.shape[1:] == size:
        return q
    mode = "linear" if q.dim() == 2 else "bilinear"
    resized = F.interpolate(q.unsqueeze(1), size=tuple(size), mode=mode, align_corners=False).squeeze(1)
    return F.normalize(resized.flatten(1), dim=1).view_as(resized)


def attention_distance(own: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """mean over samples and positions of (Q_own − Q_target)², the reference code's `at_loss`;
    the target map is resized to the own map's size when the networks' maps differ."""
    return (own - resize_map(target, own.shape[1:])).pow(2).mean()


def fsp_matrix(first: torch.Tensor, second: torch.Tensor) -> torch.Tensor:
    """Yim et al. 2017: G = (1/N) Σ_positions F1 · F2ᵀ, the 'flow' between two layers,
    (B, C1, C2). The larger map is average-pooled to the smaller's size first."""
    if first.shape[2:] != second.shape[2:]:
        size = [min(a, b) for a, b in zip(first.shape[2:], second.shape[2:])]
        pool = F.adaptive_avg_pool1d if first.dim() == 3 else F.adaptive_avg_pool2d
        first, second = (pool(t, size) if t.shape[2:] != torch.Size(size) else t for t in (first, second))
    a, b = first.float().flatten(2), second.float().flatten(2)
    return a @ b.transpose(1, 2) / a.shape[2]


def factor_distance(student_factor: torch.Tensor, target_factor: torch.Tensor) -> torch.Tensor:
    """Factor transfer (Kim et al. 2018), as its authors' code computes it: each factor (the
    translator's / the paraphraser's encoder output) flattened WHOLE and L2-normalised per sample,
    then the mean absolute difference over the batch and the factor's elements (their
    `L1Loss(FT(f_s), FT(f_t))`). RepDistiller's `FactorTransfer` differs: it first reduces a factor
    to an attention-style map (channel mean of squares) and normalises that."""
    own = F.normalize(student_factor.float().flatten(1), dim=1)
    target = F.normalize(target_factor.float().flatten(1), dim=1)
    return (own - target).abs().mean()


def negative_gaussian_mean(mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """Heo et al. 2019, eq. 3: the expectation of x given x < 0 for x ~ N(mean, std²), per channel:
        m − s·φ(m/s)/Φ(−m/s)
    — the value a ReLU maps every negative response to 0 from, averaged: the teacher's "margin".
    Where Φ(−m/s) ≤ 0.001 (almost no negative mass, the formula numerically unstable) the authors'
    code takes −3s instead; so does this. Computed in float64."""
    m, s = mean.double(), std.double().abs().clamp(min=1e-12)
    below = torch.special.ndtr(-m / s)
    margin = m - s * torch.exp(-0.5 * (m / s) ** 2) / math.sqrt(2 * math.pi) / below.clamp(min=1e-300)
    return torch.where(below > 0.001, margin, -3 * s).to(mean.dtype)


def batch_margin(features: torch.Tensor) -> torch.Tensor:
    """The margin from a pre-activation's own statistics per channel over the batch and positions
    (mean, population std: what a batch norm in training mode would make of it) — for maps with
    no batch norm before them. features: (B, C, *spatial) → (C,)."""
    flat = features.detach().float().transpose(0, 1).flatten(1)
    return negative_gaussian_mean(flat.mean(1), flat.std(1, unbiased=False))


def partial_l2(source: torch.Tensor, target: torch.Tensor, margin: torch.Tensor) -> torch.Tensor:
    """Heo et al. 2019, eq. 4: the teacher's negative responses are raised to its margin, then
        Σ (s − t)² over the positions where s > t or t > 0
    (a student below a negative target is as good as the target after the ReLU: no loss there).
    Summed over every element, as the authors' `distillation_loss`. margin: (C,)."""
    target = torch.max(target.float(), margin.float().view(1, -1, *[1] * (target.dim() - 2)))
    source = source.float()
    counted = ((source > target) | (target > 0)).float()
    return ((source - target).pow(2) * counted).sum()


def contrastive_nce(scores: torch.Tensor, num_examples: int, eps: float = 1e-7) -> torch.Tensor:
    """Tian et al. 2020, eq. 18 (the authors' `ContrastLoss`): noise-contrastive estimation with
    N = scores.shape[1] − 1 negatives from the uniform noise P_n = 1/n. scores: (B, 1 + N),
    column 0 the positive's normalised score h⁺, the rest the negatives':
        −Σ_b [ log h⁺/(h⁺ + N·P_n + ε) + Σ_k log N·P_n/(h_k + N·P_n + ε) ] / B"""
    batch, negatives = scores.shape[0], scores.shape[1] - 1
    noise = negatives / num_examples
    positive = torch.log(scores[:, 0] / (scores[:, 0] + noise + eps))
    negative = torch.log(noise / (scores[:, 1:] + noise + eps))
    return -(positive.sum() + negative.sum()) / batch


# ---------------------------------------------------------------------------------------------
# Ensemble teachers built from the peers (KDCL, OKDDip, PCL)


def min_loss_logits(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Per sample, the logits of the member with the smallest cross-entropy. logits: (K, B, C)."""
    ce = torch.stack([F.cross_entropy(z, labels, reduction="none") for z in logits])  # (K, B)
    best = ce.argmin(0)  # (B,)
    return logits[best, torch.arange(logits.shape[1], device=logits.device)]


def min_logit(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """KDCL-MinLogit: each member's logits shifted so its true-class logit is 0, then the
    element-wise minimum over members (the true class stays 0; every wrong class takes its
    least confident member's margin). logits: (K, B, C) → (B, C)."""
    true = logits.gather(2, labels.view(1, -1, 1).expand(logits.shape[0], -1, 1))  # (K, B, 1)
    return (logits - true).min(0).values


def simplex_combination(logits: torch.Tensor, labels: torch.Tensor, iterations: int = 20,
                        step_size: float = 1.0) -> torch.Tensor:
    """Weights α on the simplex (α ≥ 0, Σα = 1) minimising CE(Σ_k α_k z_k, y) on this batch, by
    exponentiated-gradient descent from the uniform weights (a convex problem in α; K weights,
    so a few dozen small steps). logits: (K, B, C), detached → α: (K,)."""
    k = logits.shape[0]
    alpha = torch.full((k,), 1.0 / k, device=logits.device)
    flat = logits.detach().float()
    for _ in range(iterations):
        combined = torch.einsum("k,kbc->bc", alpha, flat)
        probs = combined.softmax(-1)
        probs[torch.arange(len(labels)), labels] -= 1  # ∂CE/∂combined, summed over the batch below
        grad = torch.einsum("bc,kbc->k", probs, flat) / len(labels)
        alpha = alpha * torch.exp(-step_size * grad)
        alpha = alpha / alpha.sum()
    return alpha


def soft_kl_to_logits(student_logits: torch.Tensor, target_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """T²·KL(softmax(t/T) ‖ softmax(s/T)) from the target's logits, for a target that is
    trained through (OKDDip's attention mix). `soft_kl` takes probabilities, whose gradient
    log p + 1 is −∞ where a probability underflows to 0 — one such sample turns the weights
    NaN; from log-probabilities both sides' gradients stay finite."""
    log_p = F.log_softmax(target_logits.float() / temperature, dim=-1)
    log_q = F.log_softmax(student_logits.float() / temperature, dim=-1)
    return temperature**2 * (log_p.exp() * (log_p - log_q)).sum(-1).mean()


def attention_weights(queries: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
    """OKDDip's aggregation weights: α_ij = softmax_j(q_i · k_j). queries: (B, d), keys: (M, B, d)
    → (B, M): one peer's weights over the M members."""
    return torch.einsum("bd,mbd->bm", queries, keys).softmax(-1)


# ---------------------------------------------------------------------------------------------
# Top-k soft targets: a next-token distribution per position is far too large to ship whole


def top_k_targets(logits: torch.Tensor, k: int, temperature: float, dtype: torch.dtype = torch.float16) -> dict:
    """The soft target softmax(z/T) per row, cut to its k largest log-probabilities with their
    token ids, plus the log of the remaining mass (the tail bucket): (N, k) values, (N, k) ids,
    (N, 1) tail. Sent instead of the (N, V) logits; `top_k_kl` is the KL against it."""
    log_p = F.log_softmax(logits.detach().float() / temperature, dim=-1)
    values, ids = log_p.topk(min(k, log_p.shape[-1]), dim=-1)
    kept = values.exp().sum(-1, keepdim=True)
    tail = torch.log((1 - kept).clamp(min=0)).clamp(min=-1e4)  # ≈ −inf when k covers everything
    return {"topk_logp": values.to(dtype), "topk_ids": ids.to(torch.int32), "tail_logp": tail.to(dtype)}


def _renormalised(log_p: torch.Tensor, tail_p: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A sent top-k target's log-probabilities and tail, renormalised to sum to one (the values
    travel in fp16/bf16, whose rounding leaves the sum off by up to ~1e-3)."""
    log_p, tail_p = log_p.float(), tail_p.float()
    norm = torch.logsumexp(torch.cat([log_p, tail_p], dim=-1), dim=-1, keepdim=True)
    return log_p - norm, tail_p - norm


def top_k_kl(student_logits: torch.Tensor, target: dict, temperature: float) -> torch.Tensor:
    """T² · KL over the k sent tokens plus the tail bucket, averaged over rows:
        Σ_{j∈top-k} p_j log(p_j / q_j) + p_tail log(p_tail / q_tail),  q_tail = 1 − Σ_{j∈top-k} q_j.
    Merging the tail into one bucket can only lower a KL (it never exceeds the full KL); with
    k = V it is the full KL. The sent target is renormalised (values travel in fp16/bf16)."""
    log_q = F.log_softmax(student_logits.float() / temperature, dim=-1)
    ids = target["topk_ids"].long()
    log_p, tail_p = _renormalised(target["topk_logp"], target["tail_logp"])
    log_q_top = log_q.gather(-1, ids)
    q_tail = (1 - log_q_top.exp().sum(-1, keepdim=True)).clamp(min=1e-12)
    head = (log_p.exp() * (log_p - log_q_top)).sum(-1)
    tail = tail_p.exp() * (tail_p - q_tail.log())
    tail = torch.where(tail_p.exp() > 0, tail, torch.zeros_like(tail)).squeeze(-1)
    return temperature**2 * (head + tail).mean()


def mean_top_k_kl(student_logits: torch.Tensor, target: dict, temperature: float) -> torch.Tensor:
    """T²·KL(p̄ ‖ softmax(student/T)) toward the mean p̄ of M peers' top-k targets (`peers_topk_logp`,
    `peers_topk_ids`: (N, M, k); `peers_tail_logp`: (N, M, 1)), averaged over rows. p̄ is the mean of
    the peers' distributions, each peer's tail mass spread evenly over the V − k tokens it did not send:
        p̄_v = (1/M) Σ_j (p_jv if peer j sent v, else p_j,tail / (V − k)).
    The KL is taken over the union U of the tokens the peers sent, plus one bucket for the rest:
        Σ_{v∈U} p̄_v log(p̄_v / q_v) + p̄_rest log(p̄_rest / q_rest),  p̄_rest = Σ_{v∉U} p̄_v.
    With M = 1 it is `top_k_kl` (U is the k sent tokens); with k = V it is the KL to the mean of the
    whole distributions, codistillation's teacher (Anil et al.) — where the mean of the KLs to each
    peer (`mean_payload_kl`, DML's objective) is another objective. Dense over the vocabulary: a
    token's mean needs every peer's share of it; `payload_kl` takes it a chunk of rows at a time."""
    log_q = F.log_softmax(student_logits.float() / temperature, dim=-1)
    rows, vocab = log_q.shape
    log_p, tail_p = _renormalised(target["peers_topk_logp"], target["peers_tail_logp"])
    peers, k = log_p.shape[1], log_p.shape[2]
    ids = target["peers_topk_ids"].long().flatten(1)  # (N, M·k); a token two peers sent appears twice
    spread = tail_p.exp() / max(vocab - k, 1)  # (N, M, 1): a peer's tail per token it did not send
    everyone = spread.sum(1)  # (N, 1): Σ_j spread_j, every token's mass before the sent tokens replace theirs
    p = everyone.expand(rows, vocab).clone().scatter_add_(-1, ids, (log_p.exp() - spread).flatten(1))
    p = (p / peers).clamp(min=0)  # rounding in the sum can leave an unsent-by-all token at −1e-12
    sent = torch.zeros_like(p, dtype=torch.bool).scatter_(-1, ids, True)
    head = torch.where(sent, torch.xlogy(p, p) - p * log_q, 0).sum(-1)
    p_rest = (everyone.squeeze(-1) / peers) * (vocab - sent.sum(-1))
    # Σ of the student's own rest, not 1 − Σ_U q, which loses the small rest to rounding.
    q_rest = torch.where(sent, 0, log_q.exp()).sum(-1).clamp(min=1e-12)
    rest = torch.where(p_rest > 0, torch.xlogy(p_rest, p_rest) - p_rest * q_rest.log(), 0)
    return temperature**2 * (head + rest).mean()


KL_CHUNK_ELEMENTS = 2**22
"""A KL over more rows × classes than this (16 MB of fp32) is taken in chunks of rows."""


def _payload_kl(student_logits: torch.Tensor, payload: dict, temperature: float) -> torch.Tensor:
    if "sampled_ids" in payload or "peers_sampled_ids" in payload:
        return sampled_kl(student_logits, payload, temperature)
    if "peers_topk_ids" in payload:
        return mean_top_k_kl(student_logits, payload, temperature)
    if "peers_logits" in payload:
        return soft_kl(student_logits, soft_targets(payload["peers_logits"], temperature).mean(1), temperature)
    if "topk_ids" in payload:
        return top_k_kl(student_logits, payload, temperature)
    return soft_kl(student_logits, soft_targets(payload["logits"], temperature), temperature)


class _ChunkedKL(torch.autograd.Function):
    """The mean KL over rows, taken a chunk of rows at a time with its gradient computed in the
    forward pass into one (rows, V) buffer (as chunked-loss kernels do): only one chunk's
    softmaxes exist at a time, and the backward pass only scales the buffer. The targets are
    constants (a peer's or a teacher's detached payload)."""

    @staticmethod
    def forward(ctx, student, temperature, step, names, *values):
        rows = student.shape[0]
        grad = torch.zeros_like(student) if student.requires_grad else None
        total = torch.zeros((), dtype=torch.float32, device=student.device)
        for start in range(0, rows, step):
            part = student[start:start + step].detach().requires_grad_(grad is not None)
            with torch.enable_grad():
                kl = _payload_kl(part, {n: v[start:start + step] for n, v in zip(names, values)}, temperature)
                kl = kl * (part.shape[0] / rows)
                if grad is not None:
                    grad[start:start + step] = torch.autograd.grad(kl, part)[0]
            total += kl.detach()
        ctx.save_for_backward(grad)
        return total

    @staticmethod
    def backward(ctx, grad_output):
        (grad,) = ctx.saved_tensors
        # In place: the buffer is this backward's alone (a second backward through it is not supported).
        return grad.mul_(grad_output.to(grad.dtype)), None, None, None, *[None] * (len(ctx.needs_input_grad) - 4)


def payload_kl(student_logits: torch.Tensor, payload: dict, temperature: float,
               chunk_elements: int = KL_CHUNK_ELEMENTS) -> torch.Tensor:
    """T²·KL(a peer's soft target ‖ softmax(student/T)), from the peer's payload: its whole
    logits, its top-k target (`exchange.top_k`) or its sampled target (`exchange.targets: sampled`),
    averaged over the rows.

    A language model's rows are positions over a whole vocabulary: 16 × 512 positions × 32,000
    tokens is 1 GB per fp32 copy, and the KL makes several (log-softmax, softmax, their
    product), each kept for the backward pass. Above `chunk_elements` the rows are taken in
    chunks (`_ChunkedKL`), so only one chunk's copies exist at a time; the value and gradient
    are the unchunked ones. `codistill bench kl` measures the peak memory."""
    rows, classes = student_logits.shape[0], student_logits.shape[-1]
    if "peers_logits" in payload:  # every peer's softmax of a chunk exists at once
        classes *= payload["peers_logits"].shape[1]
    step = max(1, chunk_elements // classes)
    if rows <= step or any(v.requires_grad for v in payload.values()):
        return _payload_kl(student_logits, payload, temperature)
    names = tuple(payload)
    return _ChunkedKL.apply(student_logits, temperature, step, names, *(payload[n] for n in names))


def mean_target_kl(student_logits: torch.Tensor, payloads: list[dict], temperature: float,
                   chunk_elements: int = KL_CHUNK_ELEMENTS) -> torch.Tensor:
    """T²·KL(mean_j p_j ‖ softmax(student/T)): toward the mean of the peers' distributions
    (codistillation's teacher), whether they sent whole logits, top-k targets (`mean_top_k_kl`)
    or sampled targets (their draws pooled: `sampled_targets.sampled_kl`), chunked as `payload_kl`.
    With one peer, that peer's `payload_kl`."""
    if len(payloads) == 1:
        return payload_kl(student_logits, payloads[0], temperature, chunk_elements)
    names = next(names for names in (("topk_logp", "topk_ids", "tail_logp"), ("sampled_ids",), ("logits",))
                 if names[0] in payloads[0])
    # Stacked on dim 1: the rows stay first, so a chunk of rows holds every peer's part of them.
    stacked = {f"peers_{n}": torch.stack([p[n] for p in payloads], 1) for n in names}
    return payload_kl(student_logits, stacked, temperature, chunk_elements)
