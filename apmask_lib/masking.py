"""Which patch tokens a student view keeps: APMask and its ablations (paper Sec. 3.1, Eq. 2-4; Table 4).

APMask ranks the N patches of a view by the [CLS]->patch attention of the last layer
(mean over heads, Eq. 2) and drops the ``k = ceil(r * N)`` *least* attended ones
(ascending sort, Eq. 3-4); the dropped tokens are removed from the student's sequence
(``VisionTransformer.forward(keep_idx=...)``), so the student also gets cheaper.

Where the scores come from (a choice of this implementation, made in
:mod:`apmask_lib.pretrain`): the **EMA teacher's** last-layer [CLS] attention on the
*same* student view, computed under ``torch.no_grad()``. The teacher is the slowly moving,
stabler network (its attention is the "semantic" map the paper shows), and computing the
ranking without gradient keeps the mask a pure data augmentation (no gradient flows
through the ranking, it is not differentiable anyway).

Ablations (Table 4) are parameters of the same function:

``apmask``  drop the k lowest-attention patches (ties: the lower index is dropped first,
            i.e. a stable ascending sort, deterministic on CPU and CUDA);
``random``  drop k patches uniformly at random;
``block``   iBOT/BEiT block-wise masking at the same ratio: rectangles of random area and
            log-uniform aspect ratio are placed on the (h, w) grid until k patches are
            covered, exactly k (a block that would overshoot is rejected as in BEiT's
            ``MaskingGenerator``; if no block fits the remainder, the rest is random);
``none``    keep all patches.

Random kinds draw on a CPU ``torch.Generator`` (pass one for reproducibility) and the
result is moved to ``scores.device``, so a fixed seed gives the same masks on any device.
"""
from __future__ import annotations

import math
from typing import Optional

import torch

KINDS = ("apmask", "random", "block", "none")


def num_dropped(n: int, ratio: float) -> int:
    """``k = ceil(r * N)`` patches to drop (Eq. 3). A tiny tolerance keeps float noise from
    rounding up (``0.3 * 10`` is ``3.0000000000000004`` in binary, which is 3, not 4)."""
    if not 0.0 <= ratio < 1.0:
        raise ValueError(f"mask ratio must be in [0, 1), got {ratio}")
    k = max(0, math.ceil(ratio * n - 1e-9))
    if k >= n:
        raise ValueError(f"mask ratio {ratio} drops all {n} patches; lower pretrain.mask_ratio or use larger crops")
    return k


def _sorted_keep(order: torch.Tensor, k: int) -> torch.Tensor:
    """``order`` (B, N) is a permutation whose first k entries are dropped."""
    return order[:, k:].sort(dim=1).values


def _block_mask(h: int, w: int, k: int, generator: Optional[torch.Generator],
                min_patches: int = 4, aspect: tuple[float, float] = (0.3, 1 / 0.3)) -> torch.Tensor:
    """One (h*w,) bool mask with exactly ``k`` True, built from rectangles (BEiT/iBOT)."""
    mask = torch.zeros(h, w, dtype=torch.bool)
    count = 0
    lo, hi = math.log(aspect[0]), math.log(aspect[1])
    min_patches = min(min_patches, k)
    while count < k:
        remaining = k - count
        added = 0
        for _ in range(10):
            u = torch.rand(4, generator=generator).tolist()
            area = min_patches + u[0] * (remaining - min_patches)
            ar = math.exp(lo + u[1] * (hi - lo))
            bh = int(round(math.sqrt(area * ar)))
            bw = int(round(math.sqrt(area / ar)))
            if not (0 < bh <= h and 0 < bw <= w):
                continue
            top = int(u[2] * (h - bh + 1))
            left = int(u[3] * (w - bw + 1))
            new = bh * bw - int(mask[top:top + bh, left:left + bw].sum())
            if 0 < new <= remaining:
                mask[top:top + bh, left:left + bw] = True
                added = new
                break
        if added == 0:
            break
        count += added
    flat = mask.flatten()
    if count < k:  # no rectangle fits the remainder: complete at random
        free = (~flat).nonzero().flatten()
        pick = free[torch.randperm(free.numel(), generator=generator)[: k - count]]
        flat[pick] = True
    return flat


def keep_indices(scores: torch.Tensor, ratio: float, kind: str = "apmask",
                 generator: Optional[torch.Generator] = None,
                 grid: Optional[tuple[int, int]] = None) -> torch.Tensor:
    """Indices of the patches a student view keeps (Eq. 3-4).

    scores:    (B, N) [CLS]->patch attention of the teacher on this view (mean over heads,
               Eq. 2; only read for ``kind="apmask"``, otherwise just its shape/device).
    ratio:     r, fraction of the N patches dropped; k = ceil(r * N).
    kind:      ``apmask`` | ``random`` | ``block`` | ``none`` (see the module docstring).
    generator: CPU generator for ``random``/``block``.
    grid:      (h, w) patch grid, row-major, for ``block``; default a square grid.
    Returns (B, N - k) long, sorted ascending along dim 1, on ``scores.device``.
    The model's [CLS] token is never part of this: it is always kept by the backbone.
    """
    if scores.dim() != 2:
        raise ValueError(f"scores must be (B, N), got shape {tuple(scores.shape)}")
    if kind not in KINDS:
        raise ValueError(f"unknown mask kind {kind!r}; choose from {', '.join(KINDS)}")
    B, N = scores.shape
    device = scores.device
    if kind == "none":
        return torch.arange(N, device=device).expand(B, N).clone()
    k = num_dropped(N, ratio)
    if kind == "apmask":
        # stable ascending sort: the k least-attended first; equal scores -> lower index first
        order = torch.argsort(scores.float(), dim=1, stable=True)
        return _sorted_keep(order, k)
    if kind == "random":
        order = torch.argsort(torch.rand(B, N, generator=generator), dim=1)
        return _sorted_keep(order, k).to(device, non_blocking=True)
    # block
    if grid is None:
        side = math.isqrt(N)
        if side * side != N:
            raise ValueError(f"block masking needs grid=(h, w) for a non-square N={N}")
        grid = (side, side)
    h, w = grid
    if h * w != N:
        raise ValueError(f"grid {grid} does not match N={N} patches")
    masks = torch.stack([_block_mask(h, w, k, generator) for _ in range(B)])  # (B, N) True = dropped
    keep = (~masks).nonzero()[:, 1].reshape(B, N - k)  # nonzero is row-major: sorted per row
    return keep.to(device, non_blocking=True)


def dropped_mask(keep_idx: torch.Tensor, n: int) -> torch.Tensor:
    """(B, N) bool, True where a patch was dropped (for figures and tests)."""
    mask = torch.ones(keep_idx.shape[0], n, dtype=torch.bool, device=keep_idx.device)
    mask.scatter_(1, keep_idx, False)
    return mask


__all__ = ["KINDS", "num_dropped", "keep_indices", "dropped_mask"]
