"""Figure: mean [CLS] attention of the last layer over real images, one row per backbone."""
from __future__ import annotations

from pathlib import Path
from typing import Mapping, Optional, Sequence

import cv2
import numpy as np
import torch

from .figure import add_colorbar, backbone_name, pyplot, run_title, save_figure
from .synthetic import ATTENTION_LABEL, heatmap


def images_source(titles: Optional[Sequence[str]]) -> str:
    """Where the images come from, from titles of the form ``<data set>/<defect>`` (the data set may
    hold slashes, e.g. ``demo/brick/hole``): the distinct data-set parts, e.g.
    ``"images: bottle (3 defective, 1 good)"``."""
    if not titles:
        return "images: unnamed"
    sources = sorted({t.rsplit("/", 1)[0] for t in titles})
    good = sum(t.endswith("/good") for t in titles)
    return f"images: {', '.join(sources)} ({len(titles) - good} defective, {good} good)"


@torch.no_grad()
def fig_backbone_attention(images: Sequence[np.ndarray], backbones: Mapping[str, torch.nn.Module],
                           out_png: str | Path, size: int = 224, titles: Sequence[str] | None = None,
                           source: Optional[str] = None) -> Path:
    """Rows: input, then the mean-over-heads [CLS]→patch attention (Eq. 2) of each backbone, with a
    colourbar; the suptitle names the backbones and the images' ``source`` (default: the data-set
    part of ``titles``, :func:`images_source`).

    images: RGB uint8 arrays (any size; resized to ``size``). Writes ``out_png`` atomically.
    """
    resized = [cv2.resize(im, (size, size), interpolation=cv2.INTER_AREA) for im in images]
    batch = torch.from_numpy(np.stack(resized)).permute(0, 3, 1, 2).float() / 255.0
    rows = [("input", resized)]
    for name, model in backbones.items():
        model.eval()
        sal = model.saliency(batch.to(next(model.parameters()).device)).float().cpu().numpy()
        rows.append((backbone_name(name), [heatmap(im, s) for im, s in zip(resized, sal)]))
    plt = pyplot()
    fig, axes = plt.subplots(len(rows), len(images), figsize=(2.2 * len(images) + 1.0, 2.2 * len(rows) + 0.6),
                             squeeze=False, layout="constrained")
    for r, (name, ims) in enumerate(rows):
        for c, im in enumerate(ims):
            ax = axes[r][c]
            ax.imshow(im)
            ax.set_xticks([])
            ax.set_yticks([])
            if c == 0:
                ax.set_ylabel(name, fontsize=8)
            if r == 0 and titles:
                ax.set_title(titles[c], fontsize=8)
    add_colorbar(fig, axes[1:], ATTENTION_LABEL)
    names = ", ".join(backbone_name(n) for n in backbones)
    run_title(fig, f"mean [CLS] attention, last layer, {size} px: {names}", source or images_source(titles))
    return save_figure(fig, out_png)


__all__ = ["images_source", "fig_backbone_attention"]
