"""Multi-scale test-time inference (paper, Sec. 3.3 / experiments: scales {224, 320, 384, 416, 448, 512}).

For each scale ``s`` the image is resized to ``s x s`` and passed through the detector; the
segmentation output ``sigmoid(seg_logits)`` (B, s, s) is resized back (bilinear) to the image's
ORIGINAL resolution, and the maps of all scales are averaged:

    M(x) = 1/S * sum_s  up_{H,W}( sigmoid(seg_s(resize_s(x))) )          (H, W), values in [0, 1]

Image level: ``p_s = sigmoid(logit_s)`` per scale.
  * decision: majority vote ``#{s : p_s > 0.5} >= S / 2``. With an even number of scales a tie
    (e.g. 3 of 6) counts as ANOMALOUS: for inspection and screening a missed defect costs more
    than a second look at a normal item.
  * continuous score for AUROC: ``det_mean = mean_s p_s`` (``cfg.evaluate.score="det_mean"``);
    the alternative ``map_max = max_{h,w} M(x)``.

Sizes are snapped to the nearest multiple of the backbone's patch size (the ViT drops a border
that does not fill a patch): at patch 16 the paper's scales are unchanged; at patch 14 (the offline
DINOv2 stand-in) 224, 320, 384, 416, 448, 512 become 224, 322, 378, 420, 448, 518. Sizes that snap
to the same value are used once.

Memory: images go through in batches of ``batch_size`` at one scale at a time; only the running
sum of the (H, W) maps of the current batch is kept (float32), nothing at the larger scales.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..data import resize_image
from ..core.devices import autocast_context

DECISION_THRESHOLD = 0.5


def snap_size(size: int, patch: int) -> int:
    """Nearest multiple of ``patch`` to ``size`` (at least one patch); halves round up."""
    if size <= 0 or patch <= 0:
        raise ValueError(f"size and patch must be positive, got size={size}, patch={patch}")
    return max(patch, int(np.floor(size / patch + 0.5)) * patch)


def scale_sizes(scales: Sequence[int], patch: int) -> tuple[int, ...]:
    """Snap each requested scale to the patch grid; drop duplicates, keep order."""
    out: list[int] = []
    for s in scales:
        v = snap_size(int(s), patch)
        if v not in out:
            out.append(v)
    if not out:
        raise ValueError("no test-time scales given")
    return tuple(out)


def model_patch_size(model: nn.Module) -> int:
    """The detector's patch size (``model.backbone.patch_size`` or ``model.patch_size``)."""
    for obj in (getattr(model, "backbone", None), model):
        p = getattr(obj, "patch_size", None)
        if p is not None:
            return int(p)
    raise AttributeError(f"{type(model).__name__} has neither .backbone.patch_size nor .patch_size")


def majority_vote(probs: np.ndarray, threshold: float = DECISION_THRESHOLD) -> np.ndarray:
    """probs (N, S) per-scale P(anomalous) -> (N,) bool: anomalous when at least half of the scales
    say ``p > threshold`` (ties -> anomalous, see the module docstring)."""
    probs = np.asarray(probs, dtype=np.float64)
    if probs.ndim != 2:
        raise ValueError(f"probs must be (N, S), got {probs.shape}")
    return 2 * (probs > threshold).sum(axis=1) >= probs.shape[1]


def det_mean(probs: np.ndarray) -> np.ndarray:
    """(N, S) -> (N,) mean detection probability over scales (the default AUROC score)."""
    return np.asarray(probs, dtype=np.float64).mean(axis=1)


def map_max(maps: Sequence[np.ndarray]) -> np.ndarray:
    """Max of each averaged (H, W) map -> (N,)."""
    return np.array([float(np.max(m)) for m in maps], dtype=np.float64)


@dataclass
class MultiScaleOutput:
    """One batch of images.

    maps:  list of (H_i, W_i) float32 mean per-pixel anomaly probability at each image's original size.
    probs: (B, S) float64 per-scale image-level P(anomalous) = sigmoid(logit).
    cls:   (B, C) float32 [CLS] feature at the first scale (for t-SNE).
    sizes: the S input sizes used.
    """

    maps: list[np.ndarray]
    probs: np.ndarray
    cls: np.ndarray
    sizes: tuple[int, ...]

    @property
    def det_mean(self) -> np.ndarray:
        return det_mean(self.probs)

    @property
    def map_max(self) -> np.ndarray:
        return map_max(self.maps)

    @property
    def vote(self) -> np.ndarray:
        return majority_vote(self.probs)


def to_batch(images: Sequence[np.ndarray], size: int, device: torch.device) -> torch.Tensor:
    """RGB uint8 images (any sizes) -> (B, 3, size, size) float in [0, 1] on ``device``."""
    arr = np.stack([resize_image(im, size) for im in images])
    return torch.from_numpy(arr).to(device).permute(0, 3, 1, 2).float().div_(255.0)


@torch.no_grad()
def predict_multiscale(model: nn.Module, images: Sequence[np.ndarray], sizes: Sequence[int],
                       device: torch.device | str | None = None) -> MultiScaleOutput:
    """Run ``model`` (a detector returning ``logit (B,)``, ``seg_logits (B, s, s)``, ``cls (B, C)``)
    on one batch of RGB uint8 (H_i, W_i, 3) images at every size in ``sizes`` (already snapped, see
    :func:`scale_sizes`); no grad, bf16 autocast on CUDA (:func:`~apmask_lib.core.devices.accelerated`). Returns a :class:`MultiScaleOutput`."""
    if len(images) == 0:
        raise ValueError("empty batch")
    device = torch.device(device) if device is not None else next(model.parameters()).device
    shapes = [im.shape[:2] for im in images]
    sums = [torch.zeros(h, w, device=device, dtype=torch.float32) for h, w in shapes]
    probs = np.zeros((len(images), len(sizes)), dtype=np.float64)
    cls = None
    for j, s in enumerate(sizes):
        x = to_batch(images, int(s), device)
        with autocast_context(device):
            out = model(x)
        seg = torch.sigmoid(out.seg_logits.float())
        if seg.shape[-2:] != x.shape[-2:]:
            raise ValueError(f"detector returned seg_logits {tuple(seg.shape)} for input {tuple(x.shape)}; "
                             "expected (B, H, W) at the input resolution")
        probs[:, j] = torch.sigmoid(out.logit.float()).reshape(-1).cpu().numpy()
        if j == 0:
            cls = out.cls.float().cpu().numpy()
        for i, (h, w) in enumerate(shapes):
            sums[i] += F.interpolate(seg[i][None, None], size=(h, w), mode="bilinear", align_corners=False)[0, 0]
        del x, out, seg
    maps = [(m / len(sizes)).cpu().numpy() for m in sums]
    return MultiScaleOutput(maps=maps, probs=probs, cls=cls, sizes=tuple(int(s) for s in sizes))


__all__ = ["DECISION_THRESHOLD", "snap_size", "scale_sizes", "model_patch_size", "majority_vote", "det_mean",
           "map_max", "MultiScaleOutput", "to_batch", "predict_multiscale"]
