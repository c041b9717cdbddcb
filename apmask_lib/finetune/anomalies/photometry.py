"""Colour of a synthetic anomaly and of the normal images around it: grayscale detection, the
colour jitter of pasted patches and the augmentation of normal images."""
from __future__ import annotations

from typing import Optional

import cv2
import numpy as np


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


__all__ = ["is_gray", "color_jitter", "augment_normal"]
