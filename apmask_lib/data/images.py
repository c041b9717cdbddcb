"""Reading images and masks with errors that name the file.

Every image comes back as RGB uint8 (H, W, 3) at its original resolution whatever is on disk:
grayscale (MVTec grid/screw/zipper, NIH X-rays) becomes 3-channel, RGBA and gray+alpha drop the
alpha channel (a known quirk of some NIH ChestX-ray14 PNGs), 16-bit images are scaled to 8-bit
(value / 257, i.e. 65535 -> 255). Masks: foreground is any non-zero value in any colour channel, at
any bit depth (0/255, 0/1, 16-bit, a red foreground on black), or the alpha channel where only it
draws the shape (:func:`mask_foreground`). Files are read as bytes and decoded in memory, so a missing
file, an unreadable file and an undecodable (corrupt, truncated, not-an-image) file give three
different messages, each naming the path.
"""
from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np


class ImageReadError(ValueError):
    """An image or mask could not be read; the message names the file."""


def _decode(path: Path, flags: int, what: str) -> np.ndarray:
    if not path.is_file():
        raise ImageReadError(f"{what} not found: {path}")
    try:
        data = np.fromfile(str(path), dtype=np.uint8)
    except OSError as e:
        raise ImageReadError(f"cannot read {what} file {path}: {e}") from e
    img = cv2.imdecode(data, flags) if data.size else None
    if img is None or img.size == 0:
        raise ImageReadError(f"cannot decode {what} (corrupt, truncated or not an image): {path}; "
                             "re-download or delete this file")
    return img


def read_image(path: str | Path) -> np.ndarray:
    """Read an image as RGB uint8 (H, W, 3). Grayscale becomes 3-channel, RGBA drops alpha,
    16-bit is scaled to 8-bit."""
    path = Path(path)
    img = _decode(path, cv2.IMREAD_UNCHANGED, "image")
    if img.dtype == np.uint16:
        img = (img.astype(np.float32) / 257.0).round().astype(np.uint8)
    elif img.dtype != np.uint8:
        raise ImageReadError(f"unsupported pixel type {img.dtype} in {path} (expected 8- or 16-bit)")
    if img.ndim == 3 and img.shape[2] == 1:
        img = img[:, :, 0]
    if img.ndim == 2:
        img = cv2.cvtColor(img, cv2.COLOR_GRAY2RGB)
    elif img.shape[2] == 4:
        img = cv2.cvtColor(img, cv2.COLOR_BGRA2RGB)
    elif img.shape[2] == 3:
        img = cv2.cvtColor(img, cv2.COLOR_BGR2RGB)
    else:
        raise ImageReadError(f"unsupported channel count {img.shape[2]} in {path}")
    return np.ascontiguousarray(img)


def mask_foreground(m: np.ndarray, where: str = "mask") -> np.ndarray:
    """bool (H, W) foreground of a decoded mask (``cv2.IMREAD_UNCHANGED``: (H, W), (H, W, 1|2|3|4),
    8- or 16-bit): any non-zero value in any colour channel. The alpha channel (last of 2 or 4)
    counts only when it varies: alone when the colour is uniform (an alpha-only mask), otherwise as
    "visible" (foreground = coloured and not transparent). Other pixel types are refused."""
    if m.dtype not in (np.uint8, np.uint16):
        raise ImageReadError(f"unsupported mask pixel type {m.dtype} in {where} (expected 8- or 16-bit integers)")
    if m.ndim == 2:
        return m > 0
    if m.shape[2] in (1, 3):
        return (m > 0).any(axis=2)
    if m.shape[2] not in (2, 4):
        raise ImageReadError(f"unsupported channel count {m.shape[2]} in mask {where}")
    colour, alpha = m[..., :-1], m[..., -1]
    fg = (colour > 0).any(axis=2)
    if alpha.min() == alpha.max():  # opaque (or uniformly transparent): alpha says nothing
        return fg
    if colour.min() == colour.max():  # the shape is drawn in alpha only
        return alpha > 0
    return fg & (alpha > 0)


def read_mask(path: str | Path, shape: tuple[int, int] | None = None) -> np.ndarray:
    """Read a binary mask as bool (H, W); ``shape`` (H, W) of its image must match when given.

    Foreground is any non-zero value (:func:`mask_foreground`): MVTec's 0/255 masks, 0/1 masks,
    16-bit masks, coloured (e.g. red on black) and alpha-only masks all read the same."""
    path = Path(path)
    m = _decode(path, cv2.IMREAD_UNCHANGED, "mask")
    if shape is not None and tuple(m.shape[:2]) != tuple(shape[:2]):
        raise ImageReadError(f"mask {path} has size {m.shape[1]}x{m.shape[0]} (WxH) but its image is "
                             f"{shape[1]}x{shape[0]}; masks must be at the image's original resolution")
    return mask_foreground(m, str(path))


def resize_image(img: np.ndarray, size: int | tuple[int, int]) -> np.ndarray:
    """Resize (H, W, 3) uint8 to ``size`` (square int or (H, W)): area when shrinking, cubic when enlarging."""
    h, w = (size, size) if isinstance(size, int) else size
    interp = cv2.INTER_AREA if h < img.shape[0] else cv2.INTER_CUBIC
    return cv2.resize(img, (w, h), interpolation=interp)


def resize_mask(mask: np.ndarray, size: int | tuple[int, int]) -> np.ndarray:
    """Resize a bool (H, W) mask to ``size`` (square int or (H, W)) with nearest-neighbour sampling."""
    h, w = (size, size) if isinstance(size, int) else size
    return cv2.resize(mask.astype(np.uint8), (w, h), interpolation=cv2.INTER_NEAREST).astype(bool)
