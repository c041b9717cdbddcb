"""Sinkhorn-Knopp codes and the swapped-prediction loss (paper Eq. 1; SwAV)."""
from __future__ import annotations

import math
import os
import tempfile

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from apmask_lib.sinkhorn import sinkhorn, swapped_prediction_loss


def swav_reference(out: torch.Tensor, eps: float, iters: int) -> torch.Tensor:
    """SwAV's ``distributed_sinkhorn`` (single process), verbatim maths, returned as the plan
    (SwAV returns ``Q * B``)."""
    Q = torch.exp(out / eps).t()
    B, K = Q.shape[1], Q.shape[0]
    Q /= Q.sum()
    for _ in range(iters):
        Q /= Q.sum(dim=1, keepdim=True)
        Q /= K
        Q /= Q.sum(dim=0, keepdim=True)
        Q /= B
    return Q.t()


@pytest.fixture
def scores() -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    return torch.nn.functional.normalize(torch.randn(32, 256, generator=g), dim=1) @ \
        torch.nn.functional.normalize(torch.randn(20, 256, generator=g), dim=1).t() * 3  # cosine-like, (B, K)


def test_matches_swav_reference(scores):
    for iters in (1, 3, 10):
        torch.testing.assert_close(sinkhorn(scores, 0.05, iters), swav_reference(scores.double(), 0.05, iters).float(),
                                   rtol=1e-4, atol=1e-7)


def test_marginals(scores):
    B, K = scores.shape
    q = sinkhorn(scores, eps=0.05, iters=3)
    assert q.dtype == torch.float32 and q.shape == (B, K)
    # the last normalisation is over prototypes per sample: rows exactly 1/B
    torch.testing.assert_close(q.sum(dim=1), torch.full((B,), 1 / B), rtol=1e-5, atol=0)
    # columns approximately 1/K after 3 iterations (these scores are 3x sharper than
    # SwAV's cosine/eps; at plain cosine scores the error is ~1 %) ...
    assert (q.sum(dim=0) - 1 / K).abs().max() < 0.5 / K
    q1 = sinkhorn(scores / 3, eps=0.05, iters=3)
    assert (q1.sum(dim=0) - 1 / K).abs().max() < 0.05 / K
    # ... and to tight tolerance with enough iterations
    q = sinkhorn(scores, eps=0.05, iters=300)
    torch.testing.assert_close(q.sum(dim=0), torch.full((K,), 1 / K), rtol=1e-4, atol=0)
    torch.testing.assert_close(q.sum(dim=1), torch.full((B,), 1 / B), rtol=1e-5, atol=0)
    assert q.sum().sub(1).abs() < 1e-5


def test_more_iterations_balance_better(scores):
    K = scores.shape[1]
    err = [(sinkhorn(scores, 0.05, it).sum(0) - 1 / K).abs().max() for it in (1, 3, 10)]
    assert err[0] > err[1] > err[2]


def test_invariant_to_constant_shift(scores):
    # Exact in real arithmetic. In float32 the log-domain values (scores + 7) / eps ~ 150 carry a
    # spacing of 150 * 2^-23 ~ 1.8e-5, so exp() of them may differ relatively by a few of those
    # (seen: 1.4e-5 on an AVX-512 Xeon, below 1e-5 on the AMD EPYC of earlier sessions); the bound is 4 such spacings.
    eps = 0.05
    rtol = 4 * torch.finfo(torch.float32).eps * float((scores.abs().max() + 7.0) / eps)
    torch.testing.assert_close(sinkhorn(scores + 7.0, eps), sinkhorn(scores, eps), rtol=rtol, atol=1e-8)


def test_finite_under_large_logits(scores):
    big = scores * 1e4  # exp(big / eps) overflows in the multiplicative form
    assert not torch.isfinite(swav_reference(big, 0.05, 3)).all()
    q = sinkhorn(big, eps=0.05, iters=3)
    assert torch.isfinite(q).all()
    torch.testing.assert_close(q.sum(dim=1), torch.full((q.shape[0],), 1 / q.shape[0]), rtol=1e-5, atol=0)
    # one sample far below all others (its whole row underflows in a global-max shift) stays valid
    s = scores.clone()
    s[0] -= 1e4
    q = sinkhorn(s)
    assert torch.isfinite(q).all() and q[0].sum().item() == pytest.approx(1 / s.shape[0], rel=1e-5)


def test_bf16_and_autocast(scores):
    q16 = sinkhorn(scores.bfloat16())
    assert q16.dtype == torch.float32 and torch.isfinite(q16).all()
    torch.testing.assert_close(q16, sinkhorn(scores.bfloat16().float()))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        qa = sinkhorn(scores)
    assert qa.dtype == torch.float32
    torch.testing.assert_close(qa, sinkhorn(scores))


def test_loss_is_cross_entropy():
    g = torch.Generator().manual_seed(1)
    B, K, tau = 4, 5, 0.1
    codes = torch.softmax(torch.randn(B, K, generator=g), dim=1)
    glob = torch.randn(B, K, generator=g, requires_grad=True)
    loc = torch.randn(3 * B, K, generator=g, requires_grad=True)
    loss = swapped_prediction_loss(codes, [glob, loc], tau)
    views = [glob] + list(loc.reshape(3, B, K))
    manual = sum(-(codes * torch.log_softmax(v / tau, dim=1)).sum(1).mean() for v in views) / 4
    torch.testing.assert_close(loss, manual)
    loss.backward()
    assert glob.grad is not None and loc.grad is not None
    # uniform predictions cost log K whatever the codes
    assert swapped_prediction_loss(codes, [torch.zeros(2 * B, K)]).item() == pytest.approx(math.log(K), rel=1e-6)
    with pytest.raises(ValueError, match="multiple of the batch"):
        swapped_prediction_loss(codes, [torch.zeros(B + 1, K)])


def test_single_process_needs_no_process_group(scores):
    assert not dist.is_initialized()
    sinkhorn(scores)


# --- two processes (gloo, CPU): the all-reduced codes equal those of the concatenated batch
def _worker(rank: int, world: int, init_file: str, scores: torch.Tensor, out_dir: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        half = scores.shape[0] // world
        q = sinkhorn(scores[rank * half:(rank + 1) * half], eps=0.05, iters=3)
        torch.save(q, os.path.join(out_dir, f"q{rank}.pt"))
    finally:
        dist.destroy_process_group()


def test_distributed_matches_concatenated_batch(scores, tmp_path):
    init = tempfile.mktemp(dir=tmp_path)
    mp.spawn(_worker, args=(2, init, scores, str(tmp_path)), nprocs=2, join=True)
    q = torch.cat([torch.load(tmp_path / f"q{r}.pt", weights_only=True) for r in range(2)])
    torch.testing.assert_close(q, sinkhorn(scores, eps=0.05, iters=3), rtol=1e-5, atol=1e-9)
