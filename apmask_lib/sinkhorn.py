"""The SwAV objective of APMask pre-training (paper Eq. 1): Sinkhorn-Knopp codes from the
teacher, cross-entropy of the student's prototype predictions against them.

* :func:`sinkhorn` turns teacher prototype scores ``z_t·C`` (B, K) into a transport plan Q
  with equal partition: every prototype receives mass 1/K and every sample 1/B
  (Caron et al., SwAV, NeurIPS 2020, Sec. 3.1 and their ``distributed_sinkhorn``).
* :func:`swapped_prediction_loss` is ``-Σ_k q_k log softmax(z_s·C / τ)_k``, averaged over
  the student views and the batch.

Both run in float32 even under autocast. The Sinkhorn iterations are written in the log
domain (each normalisation is a ``logsumexp``, i.e. "subtract the max, then exp"), which is
the same algorithm as SwAV's multiplicative one, but cannot overflow or divide 0 by 0 when
the scores are large (SwAV's ``exp(scores / eps)`` overflows for scores/eps > 88).
"""
from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.distributed as dist
import torch.nn.functional as F


def _world() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def _all_reduce(x: torch.Tensor, op) -> torch.Tensor:
    if _world() > 1:
        dist.all_reduce(x, op=op)
    return x


def _logsumexp_over_batch(logq: torch.Tensor) -> torch.Tensor:
    """log Σ_b exp(logq[b, k]) over the batch of *all* ranks, (1, K). Max-shifted like
    ``torch.logsumexp``; the shift is the global max so every rank uses the same constant."""
    if _world() == 1:
        return torch.logsumexp(logq, dim=0, keepdim=True)
    m = _all_reduce(logq.max(dim=0, keepdim=True).values.clone(), dist.ReduceOp.MAX)
    m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
    s = _all_reduce(torch.exp(logq - m).sum(dim=0, keepdim=True), dist.ReduceOp.SUM)
    return m + torch.log(s)


@torch.no_grad()
def sinkhorn(scores: torch.Tensor, eps: float = 0.05, iters: int = 3) -> torch.Tensor:
    """Sinkhorn-Knopp equal-partition codes (SwAV), world-size aware.

    scores: (B, K) teacher scores ``z·Cᵀ`` of this process's batch (any float dtype).
    eps:    entropic regularisation; Q ∝ exp(scores / eps) before balancing.
    iters:  alternating normalisations; each makes every prototype's column sum 1/K
            over the *global* batch, then every sample's row sum 1/B (B = global batch).
    Returns Q (B, K) float32: the plan, rows summing exactly to 1/B (the last
    normalisation), columns to ~1/K (exactly in the limit of many iterations). The
    per-sample codes (targets of Eq. 1) are ``Q * B`` = ``Q / Q.sum(1, keepdim=True)``.

    If ``torch.distributed`` is initialised, the column sums and the batch size are
    all-reduced across ranks (as SwAV's ``distributed_sinkhorn``), so each rank gets its
    rows of the plan of the concatenated batch. A single process needs no process group.
    """
    if scores.dim() != 2:
        raise ValueError(f"scores must be (B, K), got shape {tuple(scores.shape)}")
    with torch.autocast(device_type=scores.device.type, enabled=False):
        logq = scores.float() / eps
        B, K = logq.shape
        n = torch.tensor([float(B)], device=logq.device)
        log_b = torch.log(_all_reduce(n, dist.ReduceOp.SUM)) if _world() > 1 else math.log(B)
        log_k = math.log(K)
        for _ in range(iters):
            logq = logq - _logsumexp_over_batch(logq) - log_k           # columns (prototypes) -> 1/K
            logq = logq - torch.logsumexp(logq, dim=1, keepdim=True) - log_b  # rows (samples) -> 1/B
        return torch.exp(logq)


def swapped_prediction_loss(codes: torch.Tensor, student_scores: Sequence[torch.Tensor],
                            temperature: float = 0.1) -> torch.Tensor:
    """Eq. 1: cross-entropy between the teacher codes and each student view's prediction.

    codes:          (B, K) per-sample target distributions (rows sum to 1), no gradient.
    student_scores: list of (V_i * B, K) student scores ``z_s·Cᵀ``, views stacked view-major
                    (row ``v * B + b`` is view v of image b), e.g. [global (B, K), locals (8B, K)].
    Every student view of image b predicts the codes of image b's teacher view.
    Returns the scalar mean over all views and images (float32).
    """
    codes = codes.detach().float()
    B = codes.shape[0]
    total, n_views = 0.0, 0
    for s in student_scores:
        if s.shape[0] % B:
            raise ValueError(f"student scores {tuple(s.shape)} are not a multiple of the batch {B}")
        v = s.shape[0] // B
        logp = F.log_softmax(s.float().reshape(v, B, -1) / temperature, dim=-1)
        total = total + (-(codes.unsqueeze(0) * logp).sum(dim=-1)).mean(dim=1).sum()
        n_views += v
    return total / n_views


__all__ = ["sinkhorn", "swapped_prediction_loss"]
