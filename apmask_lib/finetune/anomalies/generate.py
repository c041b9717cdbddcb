"""Making synthetic anomalies of any registered kind: :func:`make_anomaly` (one image) and
:func:`anomaly_batch` (a training batch), with the visibility rules every kind obeys.

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
"""
from __future__ import annotations

from typing import Optional, Sequence

import cv2
import numpy as np

from .blending import check_blend
from .photometry import augment_normal, is_gray
from .registry import AnomalyKind, Scene, get_kind

MIN_MEAN_DIFF = 10.0   # mean |x' - x| (0..255, max over channels) over the footprint below which a candidate is redrawn
PIXEL_TOL = 4          # per-pixel |x' - x| at or below which a footprint pixel is restored and unlabelled


def _finalise(image: np.ndarray, out: np.ndarray, foot: np.ndarray, pixel_tol: float):
    """Restore footprint pixels that changed by <= pixel_tol; mask = the pixels that changed."""
    diff = np.abs(out.astype(np.int16) - image.astype(np.int16)).max(axis=-1)
    score = float(diff[foot].mean()) if foot.any() else 0.0
    keep = foot & (diff > pixel_tol)
    out = np.where(keep[..., None], out, image)
    return out, keep, score


def _rgb_image(image: np.ndarray) -> np.ndarray:
    img = np.asarray(image)
    if img.dtype != np.uint8 or img.ndim not in (2, 3) or (img.ndim == 3 and img.shape[2] != 3):
        raise ValueError(f"image must be uint8 (H, W, 3) or (H, W), got {img.dtype} {img.shape}")
    return img


def _prepare_source(source: Optional[np.ndarray], shape: tuple[int, int], gray: bool) -> Optional[np.ndarray]:
    """``source`` as RGB at the image's size (INTER_AREA), grayscale where the image is."""
    if source is None:
        return None
    H, W = shape
    src = np.asarray(source)
    if src.ndim == 2:
        src = cv2.cvtColor(src, cv2.COLOR_GRAY2RGB)
    if src.shape[:2] != (H, W):
        src = cv2.resize(src, (W, H), interpolation=cv2.INTER_AREA)
    if gray:  # keep an X-ray an X-ray
        src = np.repeat(cv2.cvtColor(src, cv2.COLOR_RGB2GRAY)[..., None], 3, axis=2)
    return src


def _most_visible(kind: AnomalyKind, scene: Scene, rng: np.random.Generator, poisson: bool, min_mean_diff: float,
                  pixel_tol: float, min_pixels: int, max_tries: int):
    """(image', mask, score) of the first candidate visible enough, else of the most visible one;
    None when no candidate was made. Thin patches (scars) can vanish under Poisson blending, which
    keeps only the gradients inside: when no blended candidate passes, a second round pastes without
    blending (not for a kind that is ``always_poisson``, whose definition is the blending)."""
    rounds = [poisson] + ([False] if poisson and not kind.always_poisson else [])
    best = None
    for blend_round in rounds:
        for _ in range(max(1, max_tries)):
            cand = kind.propose(scene, rng, blend_round)
            if cand is None:
                continue
            cand_out = np.repeat(cand[0][..., :1], 3, axis=2) if scene.gray else cand[0]
            out, mask, score = _finalise(scene.image, cand_out, cand[1], pixel_tol)
            if mask.sum() < min_pixels:
                continue
            if best is None or score > best[2]:
                best = (out, mask, score)
            if score >= min_mean_diff:
                break
        if best is not None and best[2] >= min_mean_diff:
            break
    return best


def make_anomaly(image: np.ndarray, kind: str = "attention", rng: Optional[np.random.Generator] = None, *,
                 attention: Optional[np.ndarray] = None, source: Optional[np.ndarray] = None,
                 source_attention: Optional[np.ndarray] = None, object_mask: Optional[np.ndarray] = None,
                 poisson: bool = False, blend: str = "normal", temperature: float = 1.0,
                 patch_range: tuple[float, float] = (0.1, 0.4), scale_range: tuple[float, float] = (0.8, 1.25),
                 max_angle: float = 90.0, jitter: float = 0.1, min_mean_diff: float = MIN_MEAN_DIFF,
                 pixel_tol: float = PIXEL_TOL, min_pixels: int = 4, max_tries: int = 20) -> tuple[np.ndarray, np.ndarray]:
    """Make one synthetic anomaly. Returns (image' uint8 like ``image``, mask bool (H, W)).

    image:        RGB uint8 (H, W, 3) or grayscale (H, W) normal image.
    kind:         a registered kind (:func:`~apmask_lib.finetune.anomalies.registry.registered_kinds`;
                  the built-in ones are :data:`KINDS`, described in their modules).
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
    recipe = get_kind(kind)
    check_blend(blend)
    img = _rgb_image(image)
    rng = np.random.default_rng() if rng is None else rng
    two_d, gray = img.ndim == 2, is_gray(img)
    img3 = cv2.cvtColor(img, cv2.COLOR_GRAY2RGB) if two_d else img
    H, W = img3.shape[:2]
    src = _prepare_source(source, (H, W), gray)
    if recipe.needs_source and src is None:
        raise ValueError(f"kind {kind!r} needs source= another normal image of the same class")
    dist, src_dist = recipe.distributions((H, W), attention=attention, source_attention=source_attention,
                                          object_mask=object_mask, has_source=src is not None, temperature=temperature)
    scene = Scene(img3, src, dist, src_dist, gray, blend, patch_range, scale_range, max_angle, jitter)
    best = _most_visible(recipe, scene, rng, poisson or recipe.always_poisson, min_mean_diff, pixel_tol,
                         min_pixels, max_tries)
    if best is None:
        raise RuntimeError(f"could not make a visible {kind!r} anomaly in {max_tries} tries on a {H}x{W} image "
                           "(is the image nearly constant?); raise max_tries or lower min_mean_diff/pixel_tol")
    out, mask, _ = best
    return (out[..., 0].copy() if two_d else out), mask


def _anomalous_flags(anomalous: Sequence[bool] | float, B: int, rng: np.random.Generator) -> np.ndarray:
    if isinstance(anomalous, (float, int)) and not isinstance(anomalous, bool):
        n = int(round(float(anomalous) * B))
        flags = np.zeros(B, bool)
        flags[rng.permutation(B)[:n]] = True
        return flags
    flags = np.asarray(anomalous, bool)
    if flags.shape != (B,):
        raise ValueError(f"anomalous must have {B} flags, got shape {flags.shape}")
    return flags


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
                this batch, chosen at random, for a kind that needs a source; else the image itself).
    Returns (images uint8 (B, H, W, 3), masks bool (B, H, W), labels int64 (B,)); normal samples
    have an all-zero mask and label 0, synthetic ones label 1.
    """
    B = len(images)
    if B == 0:
        raise ValueError("empty batch")
    flags = _anomalous_flags(anomalous, B, rng)
    H, W = images[0].shape[:2]
    out_im = np.empty((B, H, W, 3), np.uint8)
    out_m = np.zeros((B, H, W), bool)
    for i in range(B):
        att = None if attentions is None else attentions[i]
        im, att = augment_normal(images[i], rng, hflip=hflip, jitter=normal_jitter, attention=att)
        if flags[i]:
            src = None if sources is None else sources[i]
            if src is None and get_kind(kind).needs_source:
                others = [j for j in range(B) if j != i]
                if not others:
                    raise ValueError(f"kind {kind!r} needs another image: pass sources= or a batch of >= 2 images")
                src = images[int(rng.choice(others))]
            im, m = make_anomaly(im, kind, rng, attention=att, source=src, **kwargs)
            out_m[i] = m
        out_im[i] = im
    return out_im, out_m, flags.astype(np.int64)


__all__ = ["MIN_MEAN_DIFF", "PIXEL_TOL", "make_anomaly", "anomaly_batch"]
