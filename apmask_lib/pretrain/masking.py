"""Which patch tokens a student view keeps: APMask and its ablations (paper Sec. 3.1, Eq. 2-4; Table 4).

APMask ranks the N patches of a view by the [CLS]->patch attention of the last layer
(mean over heads, Eq. 2) and drops the ``k = ceil(r * N)`` *least* attended ones
(ascending sort, Eq. 3-4); the dropped tokens are removed from the student's sequence
(``VisionTransformer.forward(keep_idx=...)``), so the student also gets cheaper.

Where the scores come from (a choice of this implementation, :func:`student_views`, called by
:func:`apmask_lib.pretrain.stage.pretrain_loss`): the **EMA teacher's** last-layer [CLS] attention on the
*same* student view, computed under ``torch.no_grad()``. The teacher is the slowly moving,
stabler network (its attention is the "semantic" map the paper shows), and computing the
ranking without gradient keeps the mask a pure data augmentation (no gradient flows
through the ranking, it is not differentiable anyway). Option ``pretrain.rank_source="image"``:
the teacher's attention on the whole image instead, resampled onto each view's crop box
(:func:`attention_on_boxes`), one teacher pass per image instead of one per view.

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
from typing import Optional, Sequence

import torch

from ..config import MASK_KINDS as KINDS, RANK_SOURCES



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


def attention_on_boxes(att_map: torch.Tensor, image_sizes: torch.Tensor, boxes: torch.Tensor,
                       index: torch.Tensor, flip: Optional[torch.Tensor], grid: tuple[int, int]) -> torch.Tensor:
    """Ranking scores of views cut from an image, read off ONE attention map of the whole image.

    Approximates Eq. 2 (the teacher's last-layer [CLS]->patch attention, mean over heads, on a
    student view) by the teacher's attention on the *whole* image, resampled onto the view's crop
    box at the view's own patch grid (``pretrain.rank_source="image"``). Why: the per-view
    ranking passes (the student global view and every local view through the teacher) are
    replaced by one pass per image at the global size -- fewer teacher tokens (paper sizes,
    ViT-S/16: 197 + 8 * 37 = 493 ranking tokens per image become 197; counted FLOPs of the teacher
    0.57x, of the whole step 0.83x; on a 2-core CPU the tiny preset's full step took 0.91-0.99x
    the view-ranked one; docs/speed.md, ``benchmarks/speed.py --rank-image``). What it loses: the
    attention is that of the image in its context, not of the cropped (and colour-jittered)
    view, and a small local crop is read off few map cells (bilinear upsampling).

    att_map:     (B, h, w) attention of image b on a patch grid spanning exactly the region
                 ``image_sizes[b]`` of that image (cell (i, j) covers rows [i, i+1) * H / h).
    image_sizes: (B, 2) the (height, width), in image pixels, the map spans.
    boxes:       (M, 4) crop boxes (x1, y1, x2, y2) in image pixels, the region each view's
                 patch grid covers.
    index:       (M,) which image (row of ``att_map``) each box is cut from.
    flip:        (M,) bool, True where the view was mirrored horizontally after the crop; None = none.
    grid:        (gh, gw) the views' patch grid.
    Returns (M, gh * gw) float32, row-major like the views' patch tokens. Bilinear sampling at
    the centre of each view patch (``torchvision.ops.roi_align``, ``aligned=True``; several
    samples averaged where a view patch spans more than one map cell), clamped at the map's
    border. Pure tensor maths on the map's device, no host synchronisation.
    """
    from torchvision.ops import roi_align

    if att_map.dim() != 3:
        raise ValueError(f"att_map must be (B, h, w), got shape {tuple(att_map.shape)}")
    h, w = att_map.shape[1:]
    dev = att_map.device
    sz = image_sizes.to(dev, torch.float32)[index.to(dev)]  # (M, 2) = (H, W) of each box's image
    b = boxes.to(dev, torch.float32)
    # image pixels -> map cells; multiply before dividing so a full box maps to exactly (0, 0, w, h)
    x1, x2 = b[:, 0] * w / sz[:, 1], b[:, 2] * w / sz[:, 1]
    y1, y2 = b[:, 1] * h / sz[:, 0], b[:, 3] * h / sz[:, 0]
    rois = torch.stack([index.to(dev, torch.float32), x1, y1, x2, y2], dim=1)
    out = roi_align(att_map.float().unsqueeze(1), rois, output_size=tuple(grid), spatial_scale=1.0,
                    sampling_ratio=-1, aligned=True)[:, 0]  # (M, gh, gw)
    if flip is not None:
        out = torch.where(flip.to(dev).view(-1, 1, 1), out.flip(-1), out)
    return out.reshape(out.shape[0], -1)


# ----------------------------------------------------------------------------- view selection (pre-training)
def _keep(scores: Optional[torch.Tensor], n_views: int, grid: tuple[int, int], kind: str, ratio: float,
          generator: torch.Generator, device: torch.device) -> Optional[torch.Tensor]:
    n = grid[0] * grid[1]
    if kind == "none" or num_dropped(n, ratio) == 0:
        return None
    if scores is None:  # random / block only need the shape
        scores = torch.zeros(n_views, n, device=device)
    return keep_indices(scores, ratio, kind, generator, grid)


def _grid_boxes(boxes: torch.Tensor, flip: Optional[torch.Tensor], view_hw: Sequence[int], grid: tuple[int, int],
                patch: int) -> torch.Tensor:
    """The part of each crop box (x1, y1, x2, y2, image pixels) a view's patch grid covers: the
    patch embedding drops the last ``view % patch`` rows/columns of the view (of the mirrored
    crop where ``flip``, i.e. its left side). The whole box when the view size is a multiple
    of the patch size."""
    fy, fx = grid[0] * patch / view_hw[0], grid[1] * patch / view_hw[1]
    if fx == 1.0 and fy == 1.0:
        return boxes
    x1, y1, x2, y2 = boxes.unbind(1)
    cw, ch = (x2 - x1) * fx, (y2 - y1) * fy
    left = x1 if flip is None else torch.where(flip.to(boxes.device), x2 - cw, x1)
    return torch.stack([left, y1, left + cw, y1 + ch], dim=1)


def _image_rank_scores(att: torch.Tensor, bb, views, size: int, boxes: torch.Tensor, flip: Optional[torch.Tensor],
                       view_hw: Sequence[int]) -> torch.Tensor:
    """Scores (M, N) for the views with crop ``boxes``, from the teacher's (B, h*w) attention
    ``att`` on the whole images resized to ``size`` (:func:`attention_on_boxes`)."""
    if boxes is None or views.sizes is None:
        raise ValueError("pretrain.rank_source='image' needs the views' crop boxes and image sizes "
                         "(MultiCropViews from MultiCrop)")
    B = att.shape[0]
    h, w = bb.grid_size(size, size)
    sizes = views.sizes.to(att.device, non_blocking=True).float()
    span = torch.stack([sizes[:, 0] * (h * bb.patch_size / size), sizes[:, 1] * (w * bb.patch_size / size)], dim=1)
    grid = bb.grid_size(*view_hw)
    index = torch.arange(B, device=att.device).repeat(boxes.shape[0] // B)
    return attention_on_boxes(att.reshape(B, h, w), span, _grid_boxes(boxes, flip, view_hw, grid, bb.patch_size),
                              index, flip, grid)


def student_views(teacher, views, mask: str, ratio: float, generator: torch.Generator,
                  rank_source: str = "view"):
    """Teacher pass (no grad) and token selection (``teacher``: the EMA
    :class:`~apmask_lib.models.swav.SwAVNet`; ``views``: :class:`~apmask_lib.pretrain.multicrop.MultiCropViews`).
    Returns (teacher scores (B, K), [(student global, keep_idx), (locals, keep_idx)]) -- the keep_idx come from the teacher's
    last-layer [CLS] attention for ``mask="apmask"``: on the student views themselves
    (``rank_source="view"``), or on the whole images, resampled onto each view's crop box
    (``rank_source="image"``; with ``teacher_view="same"`` the student global view still uses
    the teacher pass's own attention, which costs nothing)."""
    if rank_source not in RANK_SOURCES:
        raise ValueError(f"rank_source must be one of {RANK_SOURCES}, got {rank_source!r}")
    bb = teacher.backbone
    B = views.teacher.shape[0]
    need_attn = mask == "apmask"
    same = views.student_global is views.teacher
    with torch.no_grad():
        if need_attn and rank_source == "image":
            t_scores, g_attn, l_attn = _whole_image_pass(teacher, views, same)
        else:
            if same or not need_attn:
                out = bb(views.teacher, attn="cls" if (need_attn and same) else None)
                t_scores = teacher.head(out.cls)
                g_attn = out.cls_attention() if (need_attn and same) else None
            else:
                out = bb(torch.cat([views.teacher, views.student_global]), attn="cls")
                t_scores = teacher.head(out.cls[:B])
                g_attn = out.cls_attention()[B:]
            l_attn = None
            if need_attn and views.local.shape[0]:
                l_attn = bb(views.local, attn="cls").cls_attention()
    dev = views.teacher.device
    g_grid = bb.grid_size(*views.student_global.shape[-2:])
    groups = [(views.student_global, _keep(g_attn, B, g_grid, mask, ratio, generator, dev))]
    if views.local.shape[0]:
        l_grid = bb.grid_size(*views.local.shape[-2:])
        groups.append((views.local, _keep(l_attn, views.local.shape[0], l_grid, mask, ratio, generator, dev)))
    return t_scores, groups


def _whole_image_pass(teacher, views, same: bool):
    """The teacher pass of :func:`student_views` for ``rank_source="image"`` (under its no_grad):
    ONE forward of the teacher views and the whole images (both at the global size, 2B images; B
    when ``same`` and no locals). Returns (teacher scores (B, K), student-global ranking scores,
    local ranking scores or None)."""
    bb = teacher.backbone
    B = views.teacher.shape[0]
    G = views.teacher.shape[-1]
    n_loc = views.local.shape[0]
    whole = views.whole_image(G) if (not same or n_loc) else None
    out = bb(views.teacher if whole is None else torch.cat([views.teacher, whole]), attn="cls")
    t_scores = teacher.head(out.cls[:B])
    att = out.cls_attention()
    g_attn = att[:B] if same else _image_rank_scores(att[B:], bb, views, G, views.student_global_boxes,
                                                     views.student_global_flip, views.student_global.shape[-2:])
    l_attn = _image_rank_scores(att[B:], bb, views, G, views.local_boxes, views.local_flip,
                                views.local.shape[-2:]) if n_loc else None
    return t_scores, g_attn, l_attn


def dropped_mask(keep_idx: torch.Tensor, n: int) -> torch.Tensor:
    """(B, N) bool, True where a patch was dropped (for figures and tests)."""
    mask = torch.ones(keep_idx.shape[0], n, dtype=torch.bool, device=keep_idx.device)
    mask.scatter_(1, keep_idx, False)
    return mask


__all__ = ["KINDS", "num_dropped", "keep_indices", "attention_on_boxes", "student_views", "dropped_mask"]
