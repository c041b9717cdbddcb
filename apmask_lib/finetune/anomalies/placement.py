"""Where a synthetic anomaly goes and what shape it has: the sampling distributions (the attention
map, an object mask), patch sizes and boxes, rescaling and rotation, and placement on the canvas.

Randomness comes only from the ``rng`` argument (``numpy.random.Generator``).
"""
from __future__ import annotations

import math
from typing import Optional

import cv2
import numpy as np


# --------------------------------------------------------------------------- distributions
def attention_distribution(attention: np.ndarray, shape: tuple[int, int], temperature: float = 1.0) -> np.ndarray:
    """Where to cut and paste: attention (h, w) -> probabilities (H, W) summing to 1.

    The paper softmax-normalises the mean [CLS] attention (Eq. 2), resizes it to the image and
    re-normalises. A softmax of the raw attention is nearly uniform (its values are ≈ 1/N), so the
    map is first standardised: p_cell = softmax((a - mean(a)) / (std(a) · T)). With T = 1 a patch
    two standard deviations above the mean is e² ≈ 7.4 times as likely as an average one; T → ∞
    gives the uniform distribution, T → 0 the arg-max. The (h, w) probabilities are resized
    bilinearly to (H, W), clipped at 0 and re-normalised.
    """
    a = np.asarray(attention, dtype=np.float64)
    if a.ndim != 2:
        raise ValueError(f"attention must be a 2-D (h, w) map, got shape {a.shape}")
    if not np.all(np.isfinite(a)):
        raise ValueError("attention map contains NaN/inf")
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    std = a.std()
    z = (a - a.mean()) / (std * temperature) if std > 1e-12 else np.zeros_like(a)
    p = np.exp(z - z.max())
    p /= p.sum()
    H, W = shape
    p = cv2.resize(p.astype(np.float32), (W, H), interpolation=cv2.INTER_LINEAR).astype(np.float64)
    p = np.clip(p, 0, None)
    return p / p.sum()


def sample_point(dist: Optional[np.ndarray], rng: np.random.Generator, shape: tuple[int, int] | None = None) -> tuple[int, int]:
    """Draw one pixel (y, x) from a (H, W) distribution, or uniformly over ``shape`` when None."""
    if dist is None:
        H, W = shape
        return int(rng.integers(H)), int(rng.integers(W))
    flat = rng.choice(dist.size, p=dist.ravel())
    return int(flat // dist.shape[1]), int(flat % dist.shape[1])


def mask_distribution(mask: np.ndarray) -> np.ndarray:
    """Uniform distribution over the True pixels of a bool mask (H, W)."""
    m = np.asarray(mask, dtype=np.float64)
    if m.sum() <= 0:
        raise ValueError("object_mask is empty")
    return m / m.sum()


def object_distribution(object_mask: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """:func:`mask_distribution` of ``object_mask``, resized (nearest) to ``shape`` (H, W) first."""
    H, W = shape
    om = np.asarray(object_mask, bool)
    if om.shape != (H, W):
        om = cv2.resize(om.astype(np.uint8), (W, H), interpolation=cv2.INTER_NEAREST).astype(bool)
    return mask_distribution(om)


# --------------------------------------------------------------------------- sizes and boxes
def patch_sizes(rng: np.random.Generator, shape: tuple[int, int], patch_range: tuple[float, float]) -> tuple[int, int]:
    """(h, w) of a patch whose sides are U(patch_range) fractions of the image's (at least 2 px)."""
    H, W = shape
    return (max(2, int(round(rng.uniform(*patch_range) * H))), max(2, int(round(rng.uniform(*patch_range) * W))))


def crop_box(center: tuple[int, int], size: tuple[int, int], shape: tuple[int, int]) -> tuple[int, int, int, int]:
    """(y0, x0, h, w) of a size-(h, w) box centred near ``center``, shifted to lie inside ``shape``."""
    H, W = shape
    h, w = min(max(1, size[0]), H), min(max(1, size[1]), W)
    y0 = int(np.clip(center[0] - h // 2, 0, H - h))
    x0 = int(np.clip(center[1] - w // 2, 0, W - w))
    return y0, x0, h, w


# --------------------------------------------------------------------------- geometry
def transform_patch(patch: np.ndarray, angle: float = 0.0, scale: float = 1.0) -> tuple[np.ndarray, np.ndarray]:
    """Rescale then rotate an (h, w, 3) patch by ``angle`` degrees on an enlarged canvas.

    Returns (patch (h', w', 3) uint8, footprint (h', w') bool): the footprint is the exact rotated
    rectangle (nearest-neighbour warp of an all-ones mask); patch colours at the edge come from
    border replication, never from black."""
    h, w = patch.shape[:2]
    if scale != 1.0:
        nw, nh = max(1, int(round(w * scale))), max(1, int(round(h * scale)))
        patch = cv2.resize(patch, (nw, nh), interpolation=cv2.INTER_AREA if scale < 1 else cv2.INTER_LINEAR)
        h, w = nh, nw
    ones = np.ones((h, w), np.uint8)
    if angle % 360 == 0:
        return patch.copy(), ones.astype(bool)
    M = cv2.getRotationMatrix2D(((w - 1) / 2, (h - 1) / 2), angle, 1.0)
    cos, sin = abs(M[0, 0]), abs(M[0, 1])
    W2, H2 = int(math.ceil(h * sin + w * cos)), int(math.ceil(h * cos + w * sin))
    M[0, 2] += (W2 - w) / 2
    M[1, 2] += (H2 - h) / 2
    rot = cv2.warpAffine(patch, M, (W2, H2), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE)
    foot = cv2.warpAffine(ones, M, (W2, H2), flags=cv2.INTER_NEAREST, borderMode=cv2.BORDER_CONSTANT, borderValue=0)
    return rot, foot.astype(bool)


def place(patch: np.ndarray, footprint: np.ndarray, center: tuple[int, int], shape: tuple[int, int]):
    """Put a patch centred on ``center`` (y, x) in an (H, W) canvas, clipping at the borders.

    Returns (canvas (H, W, 3) uint8, footprint (H, W) bool)."""
    H, W = shape
    ph, pw = footprint.shape
    y0, x0 = center[0] - ph // 2, center[1] - pw // 2
    ys, xs = max(0, y0), max(0, x0)
    ye, xe = min(H, y0 + ph), min(W, x0 + pw)
    canvas = np.zeros((H, W, 3), np.uint8)
    foot = np.zeros((H, W), bool)
    if ye > ys and xe > xs:
        canvas[ys:ye, xs:xe] = patch[ys - y0:ye - y0, xs - x0:xe - x0]
        foot[ys:ye, xs:xe] = footprint[ys - y0:ye - y0, xs - x0:xe - x0]
    return canvas, foot


def inside_center(rng: np.random.Generator, patch_shape: tuple[int, int],
                  shape: tuple[int, int]) -> Optional[tuple[int, int]]:
    """Centre (y, x) of a ``patch_shape`` patch placed uniformly over the positions where it lies
    wholly inside ``shape`` (CutPaste); None when it does not fit."""
    (ph, pw), (H, W) = patch_shape, shape
    if ph > H or pw > W:
        return None
    return int(rng.integers(0, H - ph + 1)) + ph // 2, int(rng.integers(0, W - pw + 1)) + pw // 2


__all__ = ["attention_distribution", "sample_point", "mask_distribution", "object_distribution", "patch_sizes",
           "crop_box", "transform_patch", "place", "inside_center"]
