"""Synthetic anomalies for fine-tuning: the paper's attention-guided cut-paste and four baselines.

One generator, :func:`make_anomaly`, whose ``kind`` selects the recipe; everything else is a
parameter (Poisson blending, blend mode, patch sizes, the visibility threshold ...):

===============  ============================================================================
kind             recipe (written from each paper's description)
===============  ============================================================================
``attention``    The paper's (Bozorgtabar & Mahapatra 2023, Sec. 3.2). The mean [CLS] attention
                 of the *normal* image (Eq. 2; the caller passes it) is turned into a sampling
                 distribution (:func:`attention_distribution`). A patch of width ~ U(0.1 W, 0.4 W)
                 and height ~ U(0.1 H, 0.4 H) is cut around a centre drawn from it (the salient
                 region), colour-jittered, rescaled (``scale_range``), rotated (``max_angle``) and
                 pasted centred on a second draw from the same distribution.
``cutpaste``     CutPaste (Li et al. 2021), "CutPaste (normal)": a rectangle of area ratio
                 U(0.02, 0.15) and aspect ratio log-U(0.3, 3.3) is cut from the same image,
                 colour-jittered and pasted at a uniform location (fully inside the image).
``scar``         CutPaste-Scar: a thin rectangle, width U(2, 16) px and length U(10, 25) px at 256
                 px scale (scaled with the image), colour-jittered, rotated U(-45, 45) degrees.
``nsa``          Natural Synthetic Anomalies (Schlüter et al. 2022): a patch cut from ANOTHER
                 normal image of the class (``source``), randomly rescaled, moved to a new
                 location (inside ``object_mask`` when given) and Poisson-blended
                 (``cv2.seamlessClone``), always.
``fpi``          Foreign Patch Interpolation (Tan et al. 2020): inside a rectangle, the convex
                 combination x' = (1 - α) x + α x_src with α ~ U(0, 1) per patch and ``source``
                 another image, same location. FPI's label is α per pixel; we use the binary
                 footprint so that one Dice loss serves all kinds.
===============  ============================================================================

Poisson blending (``poisson=True``; :func:`poisson_paste`) uses ``cv2.seamlessClone`` with
``NORMAL_CLONE`` (objects) or ``MIXED_CLONE`` (textures, chest X-rays). 8-bit grayscale input
(2-D, or 3-channel with equal channels) is cloned as 3 channels and returned grayscale.

**No invisible anomalies.** Blending or a patch that resembles what it covers can leave a
"defect" nobody could see. Every candidate is therefore checked:

* ``min_mean_diff`` (default :data:`MIN_MEAN_DIFF` = 10 grey levels of 255, ≈ 4 %): the mean,
  over the pasted footprint, of the per-pixel max-over-channels |x' - x| must reach it, else the
  candidate is redrawn (at most ``max_tries`` times; then, if Poisson blending was on, another
  ``max_tries`` without blending, which thin scars need; after that the most visible candidate is
  kept).
* ``pixel_tol`` (default :data:`PIXEL_TOL` = 4 grey levels): footprint pixels that changed by at
  most this much are restored to the original and left out of the mask.

Hence the returned mask is *exactly* the set of changed pixels, ``mask == (x' != x).any(-1)``,
and every masked pixel changed by more than ``pixel_tol``: label 1 always means a visible change.

Images are RGB uint8 (H, W, 3) (or grayscale (H, W)); masks are bool (H, W). Randomness comes
only from the ``rng`` argument (``numpy.random.Generator``), so a seed fixes the output.
"""
from __future__ import annotations

import math
from typing import Optional, Sequence

import cv2
import numpy as np

from ..config import ANOMALY_KINDS as KINDS
BLENDS = ("normal", "mixed")
MIN_MEAN_DIFF = 10.0   # mean |x' - x| (0..255, max over channels) over the footprint below which a candidate is redrawn
PIXEL_TOL = 4          # per-pixel |x' - x| at or below which a footprint pixel is restored and unlabelled
_CLONE_FLAGS = {"normal": cv2.NORMAL_CLONE, "mixed": cv2.MIXED_CLONE}


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


# --------------------------------------------------------------------------- photometry
def is_gray(image: np.ndarray) -> bool:
    """True for 2-D images and 3-channel images whose channels are all equal (X-rays)."""
    return image.ndim == 2 or (np.array_equal(image[..., 0], image[..., 1]) and np.array_equal(image[..., 1], image[..., 2]))


def color_jitter(image: np.ndarray, rng: np.random.Generator, strength: float = 0.1, gray: bool | None = None) -> np.ndarray:
    """torchvision-style ColorJitter(b, c, s, h) with all four = ``strength`` on RGB uint8 (H, W, 3).

    Brightness x·b, contrast (x - mean)·c + mean, saturation (blend with the luma), hue (shift by
    h·180° in HSV), b, c, s ~ U(1 - strength, 1 + strength), h ~ U(-strength, strength). Grayscale
    images (``gray``; detected when None) get brightness and contrast only and stay grayscale.
    """
    if strength <= 0:
        return image.copy()
    gray = is_gray(image) if gray is None else gray
    x = image.astype(np.float32)
    b, c, s = rng.uniform(1 - strength, 1 + strength, size=3)
    h = rng.uniform(-strength, strength)
    x = x * b
    luma = x.mean() if gray else (x @ np.array([0.299, 0.587, 0.114], np.float32)).mean()
    x = (x - luma) * c + luma
    if not gray:
        g = (x @ np.array([0.299, 0.587, 0.114], np.float32))[..., None]
        x = (x - g) * s + g
        hsv = cv2.cvtColor(np.clip(x, 0, 255).astype(np.uint8), cv2.COLOR_RGB2HSV)
        hsv[..., 0] = ((hsv[..., 0].astype(np.int32) + int(round(h * 180))) % 180).astype(np.uint8)
        return cv2.cvtColor(hsv, cv2.COLOR_HSV2RGB)
    return np.clip(np.rint(x), 0, 255).astype(np.uint8)


def augment_normal(image: np.ndarray, rng: np.random.Generator, hflip: float = 0.5, jitter: float = 0.05,
                   attention: Optional[np.ndarray] = None) -> tuple[np.ndarray, Optional[np.ndarray]]:
    """Augment a normal image before anomalies are made: horizontal flip with probability ``hflip``
    (the attention map, if given, is flipped with it) and a small colour jitter of ``jitter``."""
    flip = hflip > 0 and rng.random() < hflip
    out = np.ascontiguousarray(image[:, ::-1]) if flip else image
    att = None if attention is None else (np.ascontiguousarray(attention[:, ::-1]) if flip else attention)
    return color_jitter(out, rng, jitter), att


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


def _crop_box(center: tuple[int, int], size: tuple[int, int], shape: tuple[int, int]) -> tuple[int, int, int, int]:
    """(y0, x0, h, w) of a size-(h, w) box centred near ``center``, shifted to lie inside ``shape``."""
    H, W = shape
    h, w = min(max(1, size[0]), H), min(max(1, size[1]), W)
    y0 = int(np.clip(center[0] - h // 2, 0, H - h))
    x0 = int(np.clip(center[1] - w // 2, 0, W - w))
    return y0, x0, h, w


# --------------------------------------------------------------------------- blending
def poisson_paste(dst: np.ndarray, canvas: np.ndarray, footprint: np.ndarray, blend: str = "normal") -> Optional[np.ndarray]:
    """Poisson-blend ``canvas`` (H, W, 3) into ``dst`` (H, W, 3) inside ``footprint`` (H, W) bool
    with ``cv2.seamlessClone`` (``blend``: "normal" -> NORMAL_CLONE, "mixed" -> MIXED_CLONE).

    seamlessClone places the mask's bounding box centred on the point it is given and fails or
    shifts the result when that box leaves the image; it also ignores the 1-pixel image frame.
    So the frame is cleared here and the centre is that of the bounding box (the ROI is then exactly
    where the patch lies). Returns None when too little is left to blend (< 3 px wide or high) or
    OpenCV refuses; the caller then draws another candidate. Pixels outside the footprint are
    returned unchanged."""
    if blend not in _CLONE_FLAGS:
        raise ValueError(f"blend must be one of {BLENDS}, got {blend!r}")
    m = footprint.astype(np.uint8) * 255
    m[0, :] = m[-1, :] = 0
    m[:, 0] = m[:, -1] = 0
    x, y, w, h = cv2.boundingRect(m)
    if w < 3 or h < 3:
        return None
    try:
        out = cv2.seamlessClone(np.ascontiguousarray(canvas), np.ascontiguousarray(dst), m.copy(),
                                (x + w // 2, y + h // 2), _CLONE_FLAGS[blend])
    except cv2.error:
        return None
    out[m == 0] = dst[m == 0]
    return out


# --------------------------------------------------------------------------- proposals
def _sizes(rng: np.random.Generator, shape: tuple[int, int], patch_range: tuple[float, float]) -> tuple[int, int]:
    H, W = shape
    return (max(2, int(round(rng.uniform(*patch_range) * H))), max(2, int(round(rng.uniform(*patch_range) * W))))


def _propose(kind: str, image: np.ndarray, source: Optional[np.ndarray], rng: np.random.Generator,
             dist: Optional[np.ndarray], src_dist: Optional[np.ndarray], *, poisson: bool, blend: str,
             patch_range: tuple[float, float], scale_range: tuple[float, float], max_angle: float,
             jitter: float, gray: bool) -> Optional[tuple[np.ndarray, np.ndarray]]:
    """One candidate (image', footprint) of ``kind``; None when it cannot be made."""
    H, W = image.shape[:2]
    shape = (H, W)
    if kind == "fpi":
        h, w = _sizes(rng, shape, patch_range)
        y0, x0, h, w = _crop_box(sample_point(dist, rng, shape), (h, w), shape)
        alpha = rng.uniform(0.0, 1.0)
        out = image.copy()
        blendv = (1 - alpha) * image[y0:y0 + h, x0:x0 + w].astype(np.float32) + alpha * source[y0:y0 + h, x0:x0 + w]
        out[y0:y0 + h, x0:x0 + w] = np.clip(np.rint(blendv), 0, 255).astype(np.uint8)
        foot = np.zeros(shape, bool)
        foot[y0:y0 + h, x0:x0 + w] = True
        return out, foot

    src = image if source is None else source
    angle, scale = 0.0, 1.0
    if kind == "attention":
        size = _sizes(rng, shape, patch_range)
        cut_center = sample_point(src_dist, rng, shape)
        scale = rng.uniform(*scale_range)
        angle = rng.uniform(-max_angle, max_angle)
    elif kind == "cutpaste":
        area = rng.uniform(0.02, 0.15) * H * W
        aspect = math.exp(rng.uniform(math.log(0.3), math.log(1 / 0.3)))
        size = (max(2, int(round(math.sqrt(area / aspect)))), max(2, int(round(math.sqrt(area * aspect)))))
        cut_center = sample_point(None, rng, shape)
    elif kind == "scar":
        s = W / 256.0
        size = (max(2, int(round(rng.uniform(10, 25) * s))), max(2, int(round(rng.uniform(2, 16) * s))))
        cut_center = sample_point(None, rng, shape)
        angle = rng.uniform(-45, 45)
    elif kind == "nsa":
        size = _sizes(rng, shape, patch_range)
        cut_center = sample_point(src_dist, rng, shape)
        scale = rng.uniform(*scale_range)
    else:  # pragma: no cover - checked by make_anomaly
        raise ValueError(kind)
    y0, x0, h, w = _crop_box(cut_center, size, shape)
    patch = color_jitter(src[y0:y0 + h, x0:x0 + w], rng, jitter, gray=gray)
    patch, pfoot = transform_patch(patch, angle, scale)
    if kind in ("cutpaste", "scar"):
        # CutPaste pastes the whole rectangle inside the image: centre uniform over valid positions
        ph, pw = pfoot.shape
        if ph > H or pw > W:
            return None
        center = (int(rng.integers(0, H - ph + 1)) + ph // 2, int(rng.integers(0, W - pw + 1)) + pw // 2)
    else:
        center = sample_point(dist, rng, shape)
    canvas, foot = place(patch, pfoot, center, shape)
    if not foot.any():
        return None
    if poisson:
        out = poisson_paste(image, canvas, foot, blend)
        if out is None:
            return None
    else:
        out = image.copy()
        out[foot] = canvas[foot]
    return out, foot


def _finalise(image: np.ndarray, out: np.ndarray, foot: np.ndarray, pixel_tol: float):
    """Restore footprint pixels that changed by <= pixel_tol; mask = the pixels that changed."""
    diff = np.abs(out.astype(np.int16) - image.astype(np.int16)).max(axis=-1)
    score = float(diff[foot].mean()) if foot.any() else 0.0
    keep = foot & (diff > pixel_tol)
    out = np.where(keep[..., None], out, image)
    return out, keep, score


# --------------------------------------------------------------------------- public API
def make_anomaly(image: np.ndarray, kind: str = "attention", rng: Optional[np.random.Generator] = None, *,
                 attention: Optional[np.ndarray] = None, source: Optional[np.ndarray] = None,
                 source_attention: Optional[np.ndarray] = None, object_mask: Optional[np.ndarray] = None,
                 poisson: bool = False, blend: str = "normal", temperature: float = 1.0,
                 patch_range: tuple[float, float] = (0.1, 0.4), scale_range: tuple[float, float] = (0.8, 1.25),
                 max_angle: float = 90.0, jitter: float = 0.1, min_mean_diff: float = MIN_MEAN_DIFF,
                 pixel_tol: float = PIXEL_TOL, min_pixels: int = 4, max_tries: int = 20) -> tuple[np.ndarray, np.ndarray]:
    """Make one synthetic anomaly. Returns (image' uint8 like ``image``, mask bool (H, W)).

    image:        RGB uint8 (H, W, 3) or grayscale (H, W) normal image.
    kind:         one of :data:`KINDS` (see the module docstring).
    attention:    (h, w) mean [CLS] attention of ``image`` (required for ``attention``); the
                  paste centre (and, for the same-image cut, the cut centre) is drawn from
                  :func:`attention_distribution` (``temperature``).
    source:       another normal image (same class) for ``nsa``/``fpi`` (required) or as the cut
                  source for ``attention`` (default: ``image`` itself); resized to ``image``'s size.
    source_attention: attention of ``source`` for choosing the cut (default: uniform over the source).
    object_mask:  bool (H, W): restrict paste centres to the object (``nsa``, ``fpi``; ``attention``
                  ignores it since attention already plays that role).
    poisson:      blend with ``cv2.seamlessClone`` (``blend`` "normal" | "mixed"); ``nsa`` always does.
    patch_range:  patch side as a fraction of the image side (``attention``, ``nsa``, ``fpi``).
    scale_range, max_angle, jitter: patch rescale, rotation (degrees, ``attention``) and colour jitter.
    min_mean_diff, pixel_tol, min_pixels, max_tries: the visibility rules of the module docstring.
    """
    if kind not in KINDS:
        raise ValueError(f"unknown anomaly kind {kind!r}; choose from {', '.join(KINDS)}")
    if blend not in BLENDS:
        raise ValueError(f"blend must be one of {BLENDS}, got {blend!r}")
    img = np.asarray(image)
    if img.dtype != np.uint8 or img.ndim not in (2, 3) or (img.ndim == 3 and img.shape[2] != 3):
        raise ValueError(f"image must be uint8 (H, W, 3) or (H, W), got {img.dtype} {img.shape}")
    rng = np.random.default_rng() if rng is None else rng
    two_d = img.ndim == 2
    gray = is_gray(img)
    img3 = cv2.cvtColor(img, cv2.COLOR_GRAY2RGB) if two_d else img
    H, W = img3.shape[:2]

    src = None
    if source is not None:
        src = np.asarray(source)
        if src.ndim == 2:
            src = cv2.cvtColor(src, cv2.COLOR_GRAY2RGB)
        if src.shape[:2] != (H, W):
            src = cv2.resize(src, (W, H), interpolation=cv2.INTER_AREA)
        if gray:  # keep an X-ray an X-ray
            src = np.repeat(cv2.cvtColor(src, cv2.COLOR_RGB2GRAY)[..., None], 3, axis=2)
    if kind in ("nsa", "fpi") and src is None:
        raise ValueError(f"kind {kind!r} needs source= another normal image of the same class")

    dist = src_dist = None
    if kind == "attention":
        if attention is None:
            raise ValueError("kind 'attention' needs attention= the (h, w) mean [CLS] attention of the image")
        dist = attention_distribution(attention, (H, W), temperature)
        if src is None:
            src_dist = dist
        elif source_attention is not None:
            src_dist = attention_distribution(source_attention, (H, W), temperature)
    elif object_mask is not None:
        om = np.asarray(object_mask, bool)
        if om.shape != (H, W):
            om = cv2.resize(om.astype(np.uint8), (W, H), interpolation=cv2.INTER_NEAREST).astype(bool)
        dist = mask_distribution(om)
    if kind == "nsa":
        poisson = True

    # Thin patches (scars) can vanish under Poisson blending, which keeps only the gradients inside:
    # when no blended candidate passes, a second round pastes without blending (not for nsa, whose
    # definition is the blending).
    rounds = [poisson] + ([False] if poisson and kind != "nsa" else [])
    best = None
    for blend_round in rounds:
        for _ in range(max(1, max_tries)):
            cand = _propose(kind, img3, src, rng, dist, src_dist, poisson=blend_round, blend=blend,
                            patch_range=patch_range, scale_range=scale_range, max_angle=max_angle,
                            jitter=jitter, gray=gray)
            if cand is None:
                continue
            cand_out = np.repeat(cand[0][..., :1], 3, axis=2) if gray else cand[0]
            out, mask, score = _finalise(img3, cand_out, cand[1], pixel_tol)
            if mask.sum() < min_pixels:
                continue
            if best is None or score > best[2]:
                best = (out, mask, score)
            if score >= min_mean_diff:
                break
        if best is not None and best[2] >= min_mean_diff:
            break
    if best is None:
        raise RuntimeError(f"could not make a visible {kind!r} anomaly in {max_tries} tries on a {H}x{W} image "
                           "(is the image nearly constant?); raise max_tries or lower min_mean_diff/pixel_tol")
    out, mask, _ = best
    return (out[..., 0].copy() if two_d else out), mask


def anomaly_batch(images: Sequence[np.ndarray], rng: np.random.Generator, kind: str = "attention",
                  anomalous: Sequence[bool] | float = 0.5, attentions: Optional[Sequence[Optional[np.ndarray]]] = None,
                  sources: Optional[Sequence[Optional[np.ndarray]]] = None, hflip: float = 0.5,
                  normal_jitter: float = 0.05, **kwargs) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A training batch: augment every normal image (:func:`augment_normal`), then turn the
    anomalous ones into synthetic anomalies (:func:`make_anomaly`, ``**kwargs`` passed on).

    images:     B RGB uint8 (H, W, 3) normal images of one size.
    anomalous:  B flags, or a fraction f: round(f·B) randomly chosen slots become anomalous.
    attentions: B (h, w) attention maps of the *normal* images (needed for kind "attention").
    sources:    B source images for ``nsa``/``fpi``/``attention`` (None entries: another image of
                this batch, chosen at random, or the image itself for ``attention``).
    Returns (images uint8 (B, H, W, 3), masks bool (B, H, W), labels int64 (B,)); normal samples
    have an all-zero mask and label 0, synthetic ones label 1.
    """
    B = len(images)
    if B == 0:
        raise ValueError("empty batch")
    if isinstance(anomalous, (float, int)) and not isinstance(anomalous, bool):
        n = int(round(float(anomalous) * B))
        flags = np.zeros(B, bool)
        flags[rng.permutation(B)[:n]] = True
    else:
        flags = np.asarray(anomalous, bool)
        if flags.shape != (B,):
            raise ValueError(f"anomalous must have {B} flags, got shape {flags.shape}")
    H, W = images[0].shape[:2]
    out_im = np.empty((B, H, W, 3), np.uint8)
    out_m = np.zeros((B, H, W), bool)
    for i in range(B):
        att = None if attentions is None else attentions[i]
        im, att = augment_normal(images[i], rng, hflip=hflip, jitter=normal_jitter, attention=att)
        if flags[i]:
            src = None if sources is None else sources[i]
            if src is None and kind in ("nsa", "fpi"):
                others = [j for j in range(B) if j != i]
                if not others:
                    raise ValueError(f"kind {kind!r} needs another image: pass sources= or a batch of >= 2 images")
                src = images[int(rng.choice(others))]
            im, m = make_anomaly(im, kind, rng, attention=att, source=src, **kwargs)
            out_m[i] = m
        out_im[i] = im
    return out_im, out_m, flags.astype(np.int64)


__all__ = ["KINDS", "BLENDS", "MIN_MEAN_DIFF", "PIXEL_TOL", "attention_distribution", "sample_point",
           "mask_distribution", "is_gray", "color_jitter", "augment_normal", "transform_patch", "place",
           "poisson_paste", "make_anomaly", "anomaly_batch"]
