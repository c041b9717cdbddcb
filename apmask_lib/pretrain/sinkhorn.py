"""The SwAV objective of APMask pre-training (paper Eq. 1): Sinkhorn-Knopp codes from the
teacher, cross-entropy of the student's prototype predictions against them.

* :func:`sinkhorn` turns teacher prototype scores ``z_t·C`` (B, K) into a transport plan Q
  with equal partition: every prototype receives mass 1/K and every sample 1/B
  (Caron et al., SwAV, NeurIPS 2020, Sec. 3.1 and their ``distributed_sinkhorn``).
* :func:`sinkhorn_with_queue` and :func:`push_queue`: SwAV's feature queue for small batches
  (Caron et al. 2020, the paragraph "Working with small batches" of Sec. 3.1, and ``main_swav.py`` of
  facebookresearch/swav): the equal partition is computed over the batch *and* the stored teacher
  embeddings of the last L images (scored with the current prototypes), and only the batch's rows
  are used as codes. With B < K the batch alone cannot give every prototype 1/K of the mass with
  confident rows; the queue gives Sinkhorn B + L samples to partition.
* :func:`swapped_prediction_loss` is ``-Σ_k q_k log softmax(z_s·C / τ)_k``, averaged over
  the student views and the batch.

Both run in float32 even under autocast. The Sinkhorn iterations are written in the log
domain (each normalisation is a ``logsumexp``, i.e. "subtract the max, then exp"), which is
the same algorithm as SwAV's multiplicative one, but cannot overflow or divide 0 by 0 when
the scores are large (SwAV's ``exp(scores / eps)`` overflows for scores/eps > 88).
"""
from __future__ import annotations

import math
from typing import Optional, Sequence

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


@torch.no_grad()
def sinkhorn_with_queue(scores: torch.Tensor, queue_scores: Optional[torch.Tensor], eps: float = 0.05,
                        iters: int = 3) -> torch.Tensor:
    """Sinkhorn codes of a batch, balanced together with a queue of earlier samples (SwAV, see module
    docstring; their ``main_swav.py``: ``out = cat(queue @ prototypes.T, out)``, codes ``[-bs:]``).

    scores:       (B, K) the batch's teacher scores.
    queue_scores: (L, K) scores of the queued embeddings under the *current* prototypes, or None / L = 0.
    Returns the batch's rows (B, K) of the plan over the B + L samples: each row sums to 1/(B + L)
    (per-sample codes: divide by the row sum), every prototype's column over all B + L rows to ~1/K.
    With no queue it is exactly :func:`sinkhorn` (the same tensor, bit for bit). Under
    ``torch.distributed`` each rank concatenates its own queue, as SwAV does.
    """
    if queue_scores is None or queue_scores.shape[0] == 0:
        return sinkhorn(scores, eps=eps, iters=iters)
    if queue_scores.dim() != 2 or queue_scores.shape[1] != scores.shape[1]:
        raise ValueError(f"queue scores {tuple(queue_scores.shape)} do not match the batch scores "
                         f"{tuple(scores.shape)} (same K needed)")
    B = scores.shape[0]
    return sinkhorn(torch.cat([scores.float(), queue_scores.float()]), eps=eps, iters=iters)[:B]


@torch.no_grad()
def push_queue(queue: Optional[torch.Tensor], feats: torch.Tensor, length: int) -> torch.Tensor:
    """FIFO queue of embeddings, newest first: ``cat(feats, queue)[:length]`` (SwAV's
    ``queue[bs:] = queue[:-bs]; queue[:bs] = embedding``, but growing from empty instead of
    zero-filled, so a partly filled queue holds only real samples). Returns a new tensor
    (float32, detached); ``queue`` None or empty starts it. ``length`` must be > 0."""
    if length <= 0:
        raise ValueError(f"queue length must be > 0, got {length}")
    feats = feats.detach().float()
    if queue is None or queue.shape[0] == 0:
        return feats[:length].clone()
    if queue.shape[1:] != feats.shape[1:]:
        raise ValueError(f"queue rows {tuple(queue.shape[1:])} and features {tuple(feats.shape[1:])} differ")
    return torch.cat([feats, queue])[:length]


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


__all__ = ["push_queue", "sinkhorn", "sinkhorn_with_queue", "swapped_prediction_loss"]
