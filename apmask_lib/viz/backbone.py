"""Figure: mean [CLS] attention of the last layer over real images, one row per backbone."""
from __future__ import annotations

from pathlib import Path
from typing import Mapping, Sequence

import cv2
import numpy as np
import torch

from .synthetic import heatmap


@torch.no_grad()
def fig_backbone_attention(images: Sequence[np.ndarray], backbones: Mapping[str, torch.nn.Module],
                           out_png: str | Path, size: int = 224, titles: Sequence[str] | None = None) -> Path:
    """Rows: input, then the mean-over-heads [CLS]→patch attention (Eq. 2) of each backbone.

    images: RGB uint8 arrays (any size; resized to ``size``). Writes ``out_png`` atomically.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from ..files import atomic_write_bytes

    resized = [cv2.resize(im, (size, size), interpolation=cv2.INTER_AREA) for im in images]
    batch = torch.from_numpy(np.stack(resized)).permute(0, 3, 1, 2).float() / 255.0
    rows = [("input", resized)]
    for name, model in backbones.items():
        model.eval()
        sal = model.saliency(batch.to(next(model.parameters()).device)).float().cpu().numpy()
        rows.append((name, [heatmap(im, s) for im, s in zip(resized, sal)]))
    fig, axes = plt.subplots(len(rows), len(images), figsize=(2.2 * len(images), 2.2 * len(rows)), squeeze=False)
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
    fig.suptitle("mean [CLS] attention, last layer", fontsize=9)
    fig.tight_layout()
    import io

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    out_png = Path(out_png)
    atomic_write_bytes(out_png, buf.getvalue())
    return out_png
