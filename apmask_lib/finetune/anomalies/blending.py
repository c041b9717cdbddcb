"""Putting a placed patch into the image: Poisson blending (``cv2.seamlessClone``) or a plain copy.

Poisson blending (:func:`poisson_paste`) uses ``cv2.seamlessClone`` with ``NORMAL_CLONE`` (objects)
or ``MIXED_CLONE`` (textures, chest X-rays).
"""
from __future__ import annotations

from typing import Optional

import cv2
import numpy as np

BLENDS = ("normal", "mixed")
_CLONE_FLAGS = {"normal": cv2.NORMAL_CLONE, "mixed": cv2.MIXED_CLONE}


def check_blend(blend: str) -> None:
    """Refuse a ``blend`` that is none of :data:`BLENDS`."""
    if blend not in _CLONE_FLAGS:
        raise ValueError(f"blend must be one of {BLENDS}, got {blend!r}")


def poisson_paste(dst: np.ndarray, canvas: np.ndarray, footprint: np.ndarray, blend: str = "normal") -> Optional[np.ndarray]:
    """Poisson-blend ``canvas`` (H, W, 3) into ``dst`` (H, W, 3) inside ``footprint`` (H, W) bool
    with ``cv2.seamlessClone`` (``blend``: "normal" -> NORMAL_CLONE, "mixed" -> MIXED_CLONE).

    seamlessClone places the mask's bounding box centred on the point it is given and fails or
    shifts the result when that box leaves the image; it also ignores the 1-pixel image frame.
    So the frame is cleared here and the centre is that of the bounding box (the ROI is then exactly
    where the patch lies). Returns None when too little is left to blend (< 3 px wide or high) or
    OpenCV refuses; the caller then draws another candidate. Pixels outside the footprint are
    returned unchanged."""
    check_blend(blend)
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


def paste(image: np.ndarray, canvas: np.ndarray, footprint: np.ndarray, poisson: bool,
          blend: str) -> Optional[tuple[np.ndarray, np.ndarray]]:
    """(image', footprint): ``canvas`` put into ``image`` inside ``footprint``, Poisson-blended
    (:func:`poisson_paste`) when ``poisson``, else copied; None when blending fails."""
    if poisson:
        out = poisson_paste(image, canvas, footprint, blend)
        if out is None:
            return None
    else:
        out = image.copy()
        out[footprint] = canvas[footprint]
    return out, footprint


__all__ = ["BLENDS", "check_blend", "poisson_paste", "paste"]
