"""Sinkhorn-Knopp codes and the swapped-prediction loss (paper Eq. 1; SwAV)."""
from __future__ import annotations

import math
import os
import tempfile

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from apmask_lib.pretrain.sinkhorn import push_queue, sinkhorn, sinkhorn_with_queue, swapped_prediction_loss


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


@pytest.mark.slow
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


@pytest.mark.slow
def test_distributed_matches_concatenated_batch(scores, tmp_path):
    init = tempfile.mktemp(dir=tmp_path)
    mp.spawn(_worker, args=(2, init, scores, str(tmp_path)), nprocs=2, join=True)
    q = torch.cat([torch.load(tmp_path / f"q{r}.pt", weights_only=True) for r in range(2)])
    torch.testing.assert_close(q, sinkhorn(scores, eps=0.05, iters=3), rtol=1e-5, atol=1e-9)


# --- SwAV's queue (small batches)
def test_queue_absent_is_exactly_plain_sinkhorn(scores):
    """No queue / an empty queue: the same tensor as today's sinkhorn, bit for bit."""
    ref = sinkhorn(scores, eps=0.05, iters=3)
    assert torch.equal(sinkhorn_with_queue(scores, None, eps=0.05, iters=3), ref)
    assert torch.equal(sinkhorn_with_queue(scores, scores[:0], eps=0.05, iters=3), ref)


@pytest.mark.slow
def test_queue_codes_are_the_batch_rows_of_the_joint_plan(scores):
    """Batch rows of the plan over batch + queue: rows sum to 1/(B+L); every prototype's column over
    all B + L rows to 1/K (many iterations); equal to SwAV's cat(queue, batch) ordering, rows [-B:]."""
    batch, queue = scores[:6], scores[6:]  # B = 6 < K = 20, L = 26
    B, L, K = 6, 26, 20
    q = sinkhorn_with_queue(batch, queue, eps=0.05, iters=3)
    assert q.shape == (B, K)
    torch.testing.assert_close(q.sum(1), torch.full((B,), 1.0 / (B + L)))
    swav = swav_reference(torch.cat([queue, batch]).double(), 0.05, 3)[-B:].float()
    torch.testing.assert_close(q, swav, rtol=1e-5, atol=1e-8)
    joint = sinkhorn(torch.cat([batch, queue]), eps=0.05, iters=200)
    torch.testing.assert_close(joint.sum(0), torch.full((K,), 1.0 / K), rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(sinkhorn_with_queue(batch, queue, eps=0.05, iters=200), joint[:B])
    with pytest.raises(ValueError, match="same K"):
        sinkhorn_with_queue(batch, queue[:, :5])


def test_queue_sharpens_codes_when_batch_is_smaller_than_k():
    """The reason for the queue: with B < K each image must spread over >= K/B prototypes; with B + L
    >= K samples to partition, the codes of distinct images can be confident."""
    g = torch.Generator().manual_seed(1)
    K = 20
    protos = torch.nn.functional.normalize(torch.randn(K, 64, generator=g), dim=1)
    z = protos[torch.arange(40) % K] + 0.05 * torch.randn(40, 64, generator=g)  # each sample near one prototype
    s = torch.nn.functional.normalize(z, dim=1) @ protos.t()
    ent = lambda q: float(-(q / q.sum(1, keepdim=True) * torch.log(q / q.sum(1, keepdim=True))).sum(1).mean())  # noqa: E731
    alone = ent(sinkhorn(s[:4], eps=0.05, iters=3))
    queued = ent(sinkhorn_with_queue(s[:4], s[4:], eps=0.05, iters=3))
    assert alone > math.log(K / 4) - 0.1   # at least ln(K/B): forced spread
    assert queued < alone - 1.0


def test_push_queue_is_fifo_newest_first():
    a, b, c = (torch.full((3, 2), float(i)) for i in (1, 2, 3))
    q = push_queue(None, a, 5)
    assert torch.equal(q, a) and q.data_ptr() != a.data_ptr()
    q2 = push_queue(q, b, 5)
    assert torch.equal(q2, torch.cat([b, a[:2]])) and torch.equal(q, a)  # input not modified
    q3 = push_queue(q2, c, 5)
    assert torch.equal(q3, torch.cat([c, b[:2]]))
    assert push_queue(None, torch.ones(7, 2), 4).shape == (4, 2)
    with pytest.raises(ValueError, match="length"):
        push_queue(None, a, 0)
    with pytest.raises(ValueError, match="differ"):
        push_queue(q, torch.ones(1, 3), 5)


@pytest.mark.slow
def test_pretrain_loss_queue_zero_is_today_and_queue_fills():
    """pretrain_loss: queue_length 0 leaves no queue state; with L > 0 the first step (empty queue)
    gives exactly the loss without a queue, the queue then holds the teacher's projections (newest
    first, at most L), and a later step's codes differ from the queue-free ones."""
    from apmask_lib.pretrain import stage as P
    from apmask_lib.config import Config, replace
    from apmask_lib.pretrain.multicrop import MultiCrop

    cfg = replace(Config(), backbone="random:vit_tiny16", device="cpu",
                  pretrain={"global_size": 32, "local_size": 16, "n_local": 1, "hidden_dim": 32, "out_dim": 16,
                            "n_prototypes": 6, "mask": "none"})
    torch.manual_seed(0)
    student = P.build_student(cfg)
    crops = MultiCrop.from_config(cfg.pretrain)
    va, vb = (crops(torch.randint(0, 256, (3, 3, 40, 40), dtype=torch.uint8, generator=torch.Generator().manual_seed(i)),
                    torch.tensor([[40, 40]] * 3), torch.Generator().manual_seed(i)) for i in (0, 1))

    def loss(p, teacher, views):
        return P.pretrain_loss(student, teacher, views, p, torch.Generator().manual_seed(0))

    def proj(teacher, views):
        with torch.no_grad():
            return teacher.head.projection(teacher.backbone(views.teacher).cls)

    t0, t1 = P.build_student(cfg).eval(), P.build_student(cfg).eval()
    t1.load_state_dict(t0.state_dict())
    plain_a, plain_b = loss(cfg.pretrain, t0, va), loss(cfg.pretrain, t0, vb)
    assert not hasattr(t0, "sinkhorn_queue")
    pq = replace(cfg, pretrain={"queue_length": 5}).pretrain
    assert torch.equal(loss(pq, t1, va), plain_a)  # empty queue: today's loss
    assert torch.equal(t1.sinkhorn_queue, proj(t1, va))
    queued_b = loss(pq, t1, vb)  # batch b balanced with a's 3 queued projections
    assert torch.equal(t1.sinkhorn_queue, torch.cat([proj(t1, vb), proj(t1, va)[:2]]))
    assert torch.isfinite(queued_b) and not torch.equal(queued_b, plain_b)
    assert "sinkhorn_queue" not in t1.state_dict()
