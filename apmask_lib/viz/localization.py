"""Fig. 4a: localisation. Anomaly heatmaps over the test images, ground truth outlined in green."""
from __future__ import annotations

from pathlib import Path
from typing import Optional, Sequence

import cv2
import numpy as np

from .figure import RunLabel, add_colorbar, pyplot, run_title, save_figure

GT_COLOR = (0, 255, 0)  # RGB green


def heatmap_overlay(image: np.ndarray, amap: np.ndarray, vmin: float = 0.0, vmax: float = 1.0,
                    alpha: float = 0.5) -> np.ndarray:
    """Blend an anomaly map over an RGB uint8 (H, W, 3) image (JET colormap; ``amap`` is resized to
    the image if needed and scaled so that ``vmin`` -> blue, ``vmax`` -> red). Returns RGB uint8.
    A fixed range (0..1 for probabilities) keeps colours comparable across images."""
    h, w = image.shape[:2]
    a = np.asarray(amap, dtype=np.float32)
    if a.shape != (h, w):
        a = cv2.resize(a, (w, h), interpolation=cv2.INTER_LINEAR)
    a = ((a - vmin) / max(vmax - vmin, 1e-12)).clip(0, 1)
    heat = cv2.applyColorMap((a * 255).round().astype(np.uint8), cv2.COLORMAP_JET)[..., ::-1]
    return ((1 - alpha) * image.astype(np.float32) + alpha * heat).round().astype(np.uint8)


def outline_mask(image: np.ndarray, mask: Optional[np.ndarray], color=GT_COLOR, thickness: int = 0) -> np.ndarray:
    """Draw the contours of a bool (H, W) mask on a copy of an RGB image (thickness 0: ~0.5 % of the
    image side, at least 1 px)."""
    out = np.ascontiguousarray(image.copy())
    if mask is None or not np.any(mask):
        return out
    t = thickness or max(1, round(0.005 * max(image.shape[:2])))
    contours, _ = cv2.findContours(np.asarray(mask, dtype=np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_NONE)
    cv2.drawContours(out, contours, -1, tuple(int(c) for c in color), t)
    return out


#: colourbar label of the detector's map (mean over test scales of the segmentation sigmoid)
DETECTOR_MAP_LABEL = "anomaly score\n(detector probability, mean over scales)"


def fig_localization(images: Sequence[np.ndarray], maps: Sequence[np.ndarray],
                     masks: Sequence[Optional[np.ndarray]], out_png: str | Path,
                     titles: Optional[Sequence[str]] = None, vmin: Optional[float] = None,
                     vmax: Optional[float] = None, *, run: RunLabel | str,
                     colour_label: str = DETECTOR_MAP_LABEL, method: str = "paper method (detector)") -> Path:
    """Two rows per column: the image with its ground truth outlined, and the heatmap overlay (same
    outline). images RGB uint8 (H, W, 3); maps (H, W); masks bool (H, W) or None.

    One colour scale for the whole figure, so images stay comparable: ``vmin``/``vmax`` default to
    the min/max over all the maps shown; pass 0 and 1 for absolute probabilities. A colourbar labelled
    ``colour_label`` shows the scale; the suptitle names ``method`` and the ``run``."""
    if not (len(images) == len(maps) == len(masks)) or not images:
        raise ValueError(f"need equal, non-zero numbers of images/maps/masks, got "
                         f"{len(images)}/{len(maps)}/{len(masks)}")
    vmin = float(min(np.min(m) for m in maps)) if vmin is None else vmin
    vmax = float(max(np.max(m) for m in maps)) if vmax is None else vmax
    plt = pyplot()
    n = len(images)
    fig, axes = plt.subplots(2, n, figsize=(2.2 * n + 1.0, 5.2), squeeze=False, layout="constrained")
    for c, (im, m, gt) in enumerate(zip(images, maps, masks)):
        axes[0][c].imshow(outline_mask(im, gt))
        axes[1][c].imshow(outline_mask(heatmap_overlay(im, m, vmin, vmax), gt))
        if titles:
            axes[0][c].set_title(titles[c], fontsize=7)
        for r in range(2):
            axes[r][c].set_xticks([])
            axes[r][c].set_yticks([])
    axes[0][0].set_ylabel("image + GT", fontsize=8)
    axes[1][0].set_ylabel("anomaly map", fontsize=8)
    add_colorbar(fig, axes[1], colour_label, vmin, vmax)
    run_title(fig, f"localisation, {method}\ngreen: ground truth; colour scale {vmin:.3g}..{vmax:.3g} "
                   "(min..max of the maps shown)", run)
    return save_figure(fig, out_png)


__all__ = ["GT_COLOR", "DETECTOR_MAP_LABEL", "save_figure", "pyplot", "heatmap_overlay", "outline_mask", "fig_localization"]
