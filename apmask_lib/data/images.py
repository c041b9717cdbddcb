"""Reading images and masks with errors that name the file."""
from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np


class ImageReadError(ValueError):
    """An image or mask could not be read; the message names the file."""


def read_image(path: str | Path) -> np.ndarray:
    """Read an image as RGB uint8 (H, W, 3). Grayscale becomes 3-channel, RGBA drops alpha,
    16-bit is scaled to 8-bit."""
    path = Path(path)
    if not path.is_file():
        raise ImageReadError(f"image not found: {path}")
    img = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
    if img is None or img.size == 0:
        raise ImageReadError(f"cannot decode image (corrupt or not an image): {path}")
    if img.dtype == np.uint16:
        img = (img.astype(np.float32) / 257.0).round().astype(np.uint8)
    elif img.dtype != np.uint8:
        raise ImageReadError(f"unsupported pixel type {img.dtype} in {path}")
    if img.ndim == 2:
        img = cv2.cvtColor(img, cv2.COLOR_GRAY2RGB)
    elif img.shape[2] == 4:
        img = cv2.cvtColor(img, cv2.COLOR_BGRA2RGB)
    elif img.shape[2] == 3:
        img = cv2.cvtColor(img, cv2.COLOR_BGR2RGB)
    else:
        raise ImageReadError(f"unsupported channel count {img.shape[2]} in {path}")
    return np.ascontiguousarray(img)


def read_mask(path: str | Path, shape: tuple[int, int] | None = None) -> np.ndarray:
    """Read a binary mask as bool (H, W); ``shape`` (H, W) must match when given."""
    path = Path(path)
    if not path.is_file():
        raise ImageReadError(f"mask not found: {path}")
    m = cv2.imread(str(path), cv2.IMREAD_GRAYSCALE)
    if m is None:
        raise ImageReadError(f"cannot decode mask: {path}")
    if shape is not None and tuple(m.shape[:2]) != tuple(shape):
        raise ImageReadError(f"mask {path} has size {m.shape[1]}x{m.shape[0]} but its image is {shape[1]}x{shape[0]}")
    return m > 127


def resize_image(img: np.ndarray, size: int | tuple[int, int]) -> np.ndarray:
    """Resize (H, W, 3) uint8 to ``size`` (square int or (H, W)) with area/cubic interpolation."""
    h, w = (size, size) if isinstance(size, int) else size
    interp = cv2.INTER_AREA if h < img.shape[0] else cv2.INTER_CUBIC
    return cv2.resize(img, (w, h), interpolation=interp)
