"""Fig. 5: t-SNE of the detector's [CLS] features, normal vs each defect type."""
from __future__ import annotations

from pathlib import Path
from typing import Optional, Sequence

import numpy as np

from .localization import pyplot, save_figure


def tsne_embedding(features: np.ndarray, seed: int = 0, perplexity: Optional[float] = None) -> np.ndarray:
    """(N, C) features -> (N, 2) t-SNE embedding (scikit-learn, PCA init, fixed seed).

    Features are L2-normalised first ([CLS] features of a DINO-style ViT are compared by cosine).
    ``perplexity`` defaults to min(30, (N - 1) / 3) so that small test sets work (it must be < N)."""
    from sklearn.manifold import TSNE

    x = np.asarray(features, dtype=np.float64)
    if x.ndim != 2:
        raise ValueError(f"features must be (N, C), got {x.shape}")
    n = len(x)
    if n < 4:
        raise ValueError(f"t-SNE needs at least 4 samples, got {n}")
    x = x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
    perp = perplexity if perplexity is not None else min(30.0, (n - 1) / 3.0)
    return TSNE(n_components=2, perplexity=perp, init="pca", random_state=seed).fit_transform(x)


def fig_tsne(features: np.ndarray, labels: Sequence[int], defect_types: Sequence[str], out_png: str | Path,
             seed: int = 0, perplexity: Optional[float] = None, title: str = "t-SNE of [CLS] features") -> Path:
    """Scatter of the 2-D t-SNE embedding: normal images in grey, one colour per defect type."""
    labels = np.asarray(labels)
    defect_types = np.asarray([str(d) for d in defect_types])
    if not (len(features) == len(labels) == len(defect_types)):
        raise ValueError("features, labels and defect_types must have the same length")
    emb = tsne_embedding(features, seed=seed, perplexity=perplexity)
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(4.8, 4.2))
    normal = labels == 0
    ax.scatter(emb[normal, 0], emb[normal, 1], s=14, c="0.6", label="normal", edgecolors="none")
    cmap = plt.get_cmap("tab10")
    for i, d in enumerate(sorted(set(defect_types[~normal]))):
        sel = (~normal) & (defect_types == d)
        ax.scatter(emb[sel, 0], emb[sel, 1], s=14, color=cmap(i % 10), label=d, edgecolors="none")
    ax.set_xticks([])
    ax.set_yticks([])
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=7, loc="best", markerscale=1.2)
    fig.tight_layout()
    return save_figure(fig, out_png)


__all__ = ["tsne_embedding", "fig_tsne"]
