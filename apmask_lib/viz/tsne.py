"""Fig. 5: t-SNE of the detector's [CLS] features, normal vs each defect type, with a caption that
says what is plotted (which features, which images, perplexity, seed) and the run."""
from __future__ import annotations

import textwrap
from pathlib import Path
from typing import Optional, Sequence

import numpy as np

from .figure import RunLabel, pyplot, run_title, save_figure

#: what ``evaluate/features.npz``'s ``cls`` holds (:func:`apmask_lib.inference.multiscale.predict_multiscale`)
CLS_FEATURES = ("[CLS] token of the fine-tuned detector's ViT (last block, after the final LayerNorm, "
                "before the detection and segmentation heads)")
MARKERS = "^sDvP*Xh<>pd"  # defect types; normal images are circles


def resolve_perplexity(n: int, perplexity: Optional[float] = None) -> float:
    """The perplexity used for ``n`` samples: the requested one (default 30) capped at
    max((n - 1) / 3, 1), so that small test sets work (scikit-learn needs perplexity < n)."""
    return float(min(perplexity or 30.0, max((n - 1) / 3.0, 1.0)))


def tsne_embedding(features: np.ndarray, seed: int = 0, perplexity: Optional[float] = None) -> np.ndarray:
    """(N, C) features -> (N, 2) t-SNE embedding (scikit-learn, PCA init, fixed seed).

    Features are L2-normalised first ([CLS] features of a DINO-style ViT are compared by cosine).
    ``perplexity``: see :func:`resolve_perplexity`."""
    from sklearn.manifold import TSNE

    x = np.asarray(features, dtype=np.float64)
    if x.ndim != 2:
        raise ValueError(f"features must be (N, C), got {x.shape}")
    n = len(x)
    if n < 4:
        raise ValueError(f"t-SNE needs at least 4 samples, got {n}")
    x = x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
    return TSNE(n_components=2, perplexity=resolve_perplexity(n, perplexity), init="pca",
                random_state=seed).fit_transform(x)


def tsne_caption(labels: Sequence[int], defect_types: Sequence[str], perplexity: float, seed: int,
                 features: str = CLS_FEATURES, images: str = "test images", size: Optional[int] = None,
                 requested: Optional[float] = None) -> str:
    """One sentence on what a t-SNE figure plots: the features (and input size), the images
    (counts of normal and defective, number of defect types), the normalisation, perplexity (and the
    ``requested`` one when it was capped) and seed."""
    labels = np.asarray(labels)
    capped = f" (requested {requested:g}, capped at (N-1)/3)" if requested and requested != perplexity else ""
    types = sorted({str(d) for d, y in zip(defect_types, labels) if y})
    at = f" at {size} px input" if size else ""
    return (f"Each point: one of {len(labels)} {images} ({int((labels == 0).sum())} normal, "
            f"{int(labels.sum())} defective of {len(types)} type{'s' if len(types) != 1 else ''}). "
            f"Features: {features}{at}, L2-normalised. "
            f"2-D t-SNE (scikit-learn, PCA init), perplexity {perplexity:.3g}{capped}, seed {seed}; "
            f"axes have no units.")


def fig_tsne(features: np.ndarray, labels: Sequence[int], defect_types: Sequence[str], out_png: str | Path,
             seed: int = 0, perplexity: Optional[float] = None, *, run: RunLabel | str,
             features_desc: str = CLS_FEATURES, images: str = "test images", size: Optional[int] = None) -> Path:
    """Scatter of the 2-D t-SNE embedding: normal images as grey circles, each defect type its own
    colour and marker; a legend with counts, the run in the title and a caption
    (:func:`tsne_caption`) under the plot."""
    labels = np.asarray(labels)
    defect_types = np.asarray([str(d) for d in defect_types])
    if not (len(features) == len(labels) == len(defect_types)):
        raise ValueError("features, labels and defect_types must have the same length")
    perp = resolve_perplexity(len(labels), perplexity)
    emb = tsne_embedding(features, seed=seed, perplexity=perp)
    plt = pyplot()
    fig, (ax, cap) = plt.subplots(2, 1, figsize=(6.4, 6.0), height_ratios=[1, 0.16], layout="constrained")
    normal = labels == 0
    ax.scatter(emb[normal, 0], emb[normal, 1], s=18, c="0.6", marker="o", edgecolors="none",
               label=f"normal (n={int(normal.sum())})")
    cmap = plt.get_cmap("tab10")
    for i, d in enumerate(sorted(set(defect_types[~normal]))):
        sel = (~normal) & (defect_types == d)
        ax.scatter(emb[sel, 0], emb[sel, 1], s=22, color=cmap(i % 10), marker=MARKERS[i % len(MARKERS)],
                   edgecolors="none", label=f"{d} (n={int(sel.sum())})")
    ax.set_xticks([])
    ax.set_yticks([])
    ax.set_xlabel("t-SNE 1", fontsize=8)
    ax.set_ylabel("t-SNE 2", fontsize=8)
    ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5), markerscale=1.2, title="test image",
              title_fontsize=7, frameon=False)
    caption = tsne_caption(labels, defect_types, perp, seed, features_desc, images, size, requested=perplexity)
    cap.axis("off")
    cap.text(0.0, 1.0, textwrap.fill(caption, 105), fontsize=7, ha="left", va="top", transform=cap.transAxes)
    run_title(fig, "Fig. 5: t-SNE of [CLS] features, normal vs defect types", run)
    return save_figure(fig, out_png)


def tsne_from_run(run: str | Path, perplexity: float | None = None, seed: int = 0,
                  out_png: str | Path | None = None) -> Path:
    """Fig. 5 from a finished evaluation: t-SNE of ``<run>/evaluate/features.npz`` (the detector's
    [CLS] features of the test images at the first test scale), normal vs each defect type.
    Written to ``out_png``, by default ``runs/adhoc/figures/fig5_tsne__<run>.png`` (never into the
    run folder, a pipeline output)."""
    feats = Path(run) / "evaluate" / "features.npz"
    if not feats.is_file():
        raise FileNotFoundError(f"{feats} not found: run the evaluation (03_evaluate / apmask evaluate) first")
    z = np.load(feats, allow_pickle=False)
    size = int(z["size"]) if "size" in z.files else None
    default = Path("runs/adhoc/figures") / f"fig5_tsne__{'-'.join(Path(run).parts)}.png"
    return fig_tsne(z["cls"], z["labels"], z["defects"], out_png or default, seed=seed, perplexity=perplexity,
                    run=RunLabel.from_run(run), size=size)


__all__ = ["CLS_FEATURES", "resolve_perplexity", "tsne_embedding", "tsne_caption", "fig_tsne", "tsne_from_run"]
