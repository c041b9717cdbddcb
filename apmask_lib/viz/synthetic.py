"""Figures of the augmentations: the Fig. 1-style panel (input, attention, APMask, attention-guided
anomaly) and the Fig. 4b-style grid of synthetic anomalies with the pasted regions outlined.

Both take real RGB uint8 images of any size (resized to ``size``, rounded down to a multiple of the
patch size where a backbone is involved), draw with matplotlib's Agg canvas (no global pyplot
state) and write the PNG atomically. Randomness comes from ``seed`` only.
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional, Sequence

import cv2
import numpy as np
import torch

from ..finetune.anomalies import make_anomaly
from .figure import RunLabel, add_colorbar, run_title, save_figure

OUTLINE = (255, 40, 40)
#: colourbar label of :func:`heatmap` overlays
ATTENTION_LABEL = "mean [CLS] attention, last layer\n(min-max normalised per image, 0-1)"


def outline(image: np.ndarray, mask: np.ndarray, color: tuple[int, int, int] = OUTLINE, thickness: int = 1) -> np.ndarray:
    """Copy of RGB uint8 ``image`` with the outer contours of bool ``mask`` drawn (cv2.findContours)."""
    out = np.ascontiguousarray(image.copy())
    contours, _ = cv2.findContours(mask.astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_NONE)
    cv2.drawContours(out, contours, -1, color, thickness)
    return out


def grey_patches(image: np.ndarray, drop: np.ndarray, grid: tuple[int, int], level: int = 128) -> np.ndarray:
    """Grey out the patches whose row-major grid indices are in ``drop`` (an APMask view)."""
    out = image.copy()
    h, w = grid
    ph, pw = image.shape[0] // h, image.shape[1] // w
    for i in np.asarray(drop).ravel():
        r, c = divmod(int(i), w)
        out[r * ph:(r + 1) * ph, c * pw:(c + 1) * pw] = level
    return out


def heatmap(image: np.ndarray, attention: np.ndarray) -> np.ndarray:
    """Attention (h, w) min-max scaled, upsampled (cubic) and blended (jet) over ``image``."""
    a = attention.astype(np.float32)
    a = (a - a.min()) / max(float(a.max() - a.min()), 1e-12)
    a = cv2.resize(a, (image.shape[1], image.shape[0]), interpolation=cv2.INTER_CUBIC).clip(0, 1)
    heat = cv2.applyColorMap((a * 255).astype(np.uint8), cv2.COLORMAP_JET)[..., ::-1]
    return (0.5 * image + 0.5 * heat).astype(np.uint8)


def _resize_all(images: Sequence[np.ndarray], size: int) -> list[np.ndarray]:
    out = []
    for im in images:
        im = cv2.cvtColor(im, cv2.COLOR_GRAY2RGB) if im.ndim == 2 else im
        interp = cv2.INTER_AREA if im.shape[0] > size else cv2.INTER_CUBIC
        out.append(cv2.resize(im, (size, size), interpolation=interp))
    return out


@torch.no_grad()
def _saliency(backbone, images: Sequence[np.ndarray]) -> np.ndarray:
    backbone.eval()
    device = next(backbone.parameters()).device
    x = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).float().div(255.0).to(device)
    return backbone.saliency(x).float().cpu().numpy()


def _grid_figure(rows: list[list[np.ndarray]], col_titles: Sequence[str], out_png: str | Path, title: str,
                 run: RunLabel | str, row_labels: Optional[Sequence[str]] = None, cell: float = 2.0,
                 heat_cols: Sequence[int] = (), heat_label: str = ATTENTION_LABEL) -> Path:
    """Grid of RGB images (rows x columns) with column titles, a two-line suptitle (``title``, ``run``)
    and, when ``heat_cols`` names heatmap columns, one colourbar for them labelled ``heat_label``."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    nr, nc = len(rows), len(col_titles)
    fig = Figure(figsize=(cell * nc, cell * nr + (1.3 if heat_cols else 0.7)), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(nr, nc, squeeze=False)
    for r, row in enumerate(rows):
        for c, im in enumerate(row):
            ax = axes[r][c]
            ax.imshow(im)
            ax.set_xticks([])
            ax.set_yticks([])
            if r == 0:
                ax.set_title(col_titles[c], fontsize=8)
            if c == 0 and row_labels is not None:
                ax.set_ylabel(row_labels[r], fontsize=8)
    if heat_cols:
        add_colorbar(fig, axes[-1, list(heat_cols)], heat_label, 0.0, 1.0, location="bottom")
    run_title(fig, title, run)
    return save_figure(fig, out_png)


def fig_attention_panel(images: Sequence[np.ndarray], backbone, out_png: str | Path, mask_ratio: float = 0.3,
                        kind: str = "attention", size: int = 224, seed: int = 0, poisson: bool = False, *,
                        run: RunLabel | str) -> Path:
    """Fig. 1-style panel, one row per real image: input | mean [CLS] attention (Eq. 2) | APMask
    view (the ceil(r·N) least-attended patches greyed, Eq. 3-4) | a synthetic anomaly of ``kind``
    guided by that attention, outlined. ``nsa``/``fpi`` take their source from the next image.
    The attention column has a colourbar; the suptitle names the ``run`` (data and backbone)."""
    from ..pretrain.masking import keep_indices

    size = size - size % backbone.patch_size
    ims = _resize_all(images, size)
    sal = _saliency(backbone, ims)
    grid = sal.shape[1:]
    rng = np.random.default_rng(seed)
    rows = []
    for i, (im, att) in enumerate(zip(ims, sal)):
        n = att.size
        keep = keep_indices(torch.from_numpy(att.reshape(1, n)), mask_ratio, "apmask")[0].numpy()
        drop = np.setdiff1d(np.arange(n), keep)
        src = ims[(i + 1) % len(ims)] if len(ims) > 1 else None
        syn, m = make_anomaly(im, kind, rng, attention=att, source=src, poisson=poisson)
        rows.append([im, heatmap(im, att), grey_patches(im, drop, grid), outline(syn, m)])
    titles = ["input", "mean [CLS] attention", f"APMask (r={mask_ratio:g}, grey = dropped)", f"synthetic ({kind}, outlined)"]
    return _grid_figure(rows, titles, out_png, "Fig. 1: attention, APMask view and attention-guided anomaly", run,
                        heat_cols=[1])


def fig_synthetic_grid(images: Sequence[np.ndarray], kinds: Sequence[str], out_png: str | Path,
                       backbone=None, attentions: Optional[Sequence[np.ndarray]] = None, size: int = 224,
                       seed: int = 0, poisson: bool = False, blend: str = "normal", *,
                       run: RunLabel | str) -> Path:
    """Fig. 4b-style grid: one row per image, one column per anomaly kind (first column the input),
    each synthetic anomaly with its mask outlined. Kind ``attention`` needs ``attentions`` (one
    (h, w) map per image) or a ``backbone`` to compute them; the attention map that guides it is
    then shown as a second column, with a colourbar. ``nsa``/``fpi`` use the next image as source.
    The suptitle names the ``run``."""
    if backbone is not None:
        size = size - size % backbone.patch_size
    ims = _resize_all(images, size)
    if "attention" in kinds and attentions is None:
        if backbone is None:
            raise ValueError("kind 'attention' needs attentions= (one map per image) or backbone= to compute them")
        attentions = list(_saliency(backbone, ims))
    rng = np.random.default_rng(seed)
    rows = []
    for i, im in enumerate(ims):
        row = [im] + ([heatmap(im, attentions[i])] if attentions is not None else [])
        src = ims[(i + 1) % len(ims)] if len(ims) > 1 else None
        for kind in kinds:
            att = None if attentions is None else attentions[i]
            syn, m = make_anomaly(im, kind, rng, attention=att, source=src, poisson=poisson, blend=blend)
            row.append(outline(syn, m))
        rows.append(row)
    head = ["input"] + (["attention (guides 'attention')"] if attentions is not None else [])
    return _grid_figure(rows, [*head, *kinds], out_png, "Fig. 4b: synthetic anomalies of each kind (pasted region outlined)",
                        run, heat_cols=[1] if attentions is not None else [])


__all__ = ["ATTENTION_LABEL", "outline", "grey_patches", "heatmap", "fig_attention_panel", "fig_synthetic_grid"]
