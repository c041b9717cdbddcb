"""Fine-tuning losses (paper Sec. 3.2): L = λ_det · L_det + λ_seg · L_seg, λ = (0.95, 0.05).

* L_det: binary cross-entropy on the image-level logit (0 = normal, 1 = synthetic anomaly).
* L_seg: the soft Dice loss on the per-pixel anomaly probabilities against the synthetic mask.

Half of every batch is normal, so half of the ground-truth masks are empty, where a per-image
Dice is undefined (0/0) or, smoothed, rewards nothing but an all-zero map. We therefore compute
Dice **over the batch jointly** (``reduction="batch"``, the default): the sums run over all pixels
of all images, so false positives on normal images enter the denominator and are penalised, and
the loss is well-defined for any batch. ``reduction="mean"`` (per-image Dice averaged over images)
is available for ablation; it is only well-defined thanks to the smoothing term.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def dice_loss(logits: torch.Tensor, target: torch.Tensor, smooth: float = 1.0, reduction: str = "batch") -> torch.Tensor:
    """Soft Dice loss, the paper's L_seg:  1 - (2 Σ p·g + s) / (Σ p + Σ g + s),  p = sigmoid(logits).

    logits: (B, H, W) pixel logits; target: (B, H, W) {0, 1} (bool or float); ``smooth`` s keeps it
    finite when both sums vanish. ``reduction``: "batch" (sums over the whole batch, one Dice;
    well-defined with empty masks, see the module docstring) | "mean" (per-image Dice, averaged).
    Computed in float32 whatever the autocast dtype.
    """
    if logits.shape != target.shape:
        raise ValueError(f"logits {tuple(logits.shape)} and target {tuple(target.shape)} differ in shape")
    p = torch.sigmoid(logits.float())
    g = target.float()
    if reduction == "batch":
        inter, total = (p * g).sum(), p.sum() + g.sum()
        return 1.0 - (2.0 * inter + smooth) / (total + smooth)
    if reduction == "mean":
        dims = tuple(range(1, p.dim()))
        inter, total = (p * g).sum(dims), p.sum(dims) + g.sum(dims)
        return (1.0 - (2.0 * inter + smooth) / (total + smooth)).mean()
    raise ValueError(f"reduction must be 'batch' or 'mean', got {reduction!r}")


def detection_loss(logit: torch.Tensor, label: torch.Tensor) -> torch.Tensor:
    """L_det: binary cross-entropy with logits; logit (B,), label (B,) in {0, 1}."""
    return F.binary_cross_entropy_with_logits(logit.float(), label.float())


def finetune_loss(logit: torch.Tensor, seg_logits: torch.Tensor, label: torch.Tensor, mask: torch.Tensor,
                  det_weight: float = 0.95, seg_weight: float = 0.05, dice_reduction: str = "batch"):
    """Total loss λ_det·L_det + λ_seg·L_seg. Returns (total, L_det, L_seg) scalars."""
    l_det = detection_loss(logit, label)
    l_seg = dice_loss(seg_logits, mask, reduction=dice_reduction)
    return det_weight * l_det + seg_weight * l_seg, l_det, l_seg


__all__ = ["dice_loss", "detection_loss", "finetune_loss"]
