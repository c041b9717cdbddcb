"""The figures of an evaluation run (``apmask_lib.evaluate.stage.run_evaluate``): Fig. 4a (localisation,
one per method), ROC curves (image and pixel level) and Fig. 5 (t-SNE of the [CLS] features), each
naming its run."""
from __future__ import annotations

import warnings
from pathlib import Path
from typing import Mapping, Optional, Sequence

import numpy as np

from ..metrics import PixelMetrics, image_auroc, roc_curve
from .figure import RunLabel
from .localization import DETECTOR_MAP_LABEL, fig_localization
from .roc import RocCurve, fig_roc
from .tsne import CLS_FEATURES, fig_tsne

#: per localisation method: (name in the title, what the colour of its map means)
MAP_METHODS = {
    "paper": ("paper method (detector)", DETECTOR_MAP_LABEL),
    "knn": ("kNN extension (not in the paper)", "kNN anomaly score (cosine distance\nto the nearest training patch)"),
    "fused": ("fused kNN + detector (not in the paper)", "fused score squash(z_kNN + z_det) (0-1)"),
    "knn_model": ("kNN model (not in the paper)", "kNN anomaly score: cosine distance to the\nnearest training patch / 2 (0-1)"),
}
#: what a kNN model's ``cls`` output holds (:class:`apmask_lib.knn.model.KnnDetector`)
KNN_MODEL_FEATURES = ("mean of the patch features the kNN model compares (its read-out block, "
                      "no fine-tuning)")

#: one figure item: image RGB uint8, map (H, W), ground truth bool (H, W) or None, title
FigItem = tuple[np.ndarray, np.ndarray, Optional[np.ndarray], str]


def write_figures(out_dir: Path, fig_items: Sequence[FigItem], rows: Sequence[Mapping], labels: np.ndarray,
                  pix: PixelMetrics, feats: np.ndarray, defects: Sequence[str], seed: int, *, run: RunLabel,
                  size: Optional[int] = None,
                  ext_items: Optional[Mapping[str, Sequence[FigItem]]] = None, method: str = "paper",
                  features_desc: str = CLS_FEATURES) -> dict[str, Optional[str]]:
    """Fig. 4a (localisation; ``fig4a_localization_<method>.png`` too for each extension method in
    ``ext_items``), ROC curves and Fig. 5 (t-SNE of ``feats``, ``features_desc`` at input ``size``)
    under ``out_dir``, each titled with ``run``. ``method`` (a key of :data:`MAP_METHODS`) is what
    produced ``fig_items``/``rows``: it names the figures and the colourbar. A figure that cannot be
    drawn (e.g. a single class) is recorded as None with a warning, never faked. Returns figure name -> path."""
    name, colour = MAP_METHODS[method]
    figures: dict[str, Optional[str]] = {"localization": None, "roc": None, "tsne": None}
    if fig_items:
        ims, maps, gts, titles = zip(*fig_items)
        figures["localization"] = str(fig_localization(ims, maps, gts, out_dir / "fig4a_localization.png", titles,
                                                       run=run, method=name, colour_label=colour))
    curves = []
    score = [r["score"] for r in rows]
    if 0 < labels.sum() < len(labels):
        fpr, tpr, _ = roc_curve(score, labels)
        curves.append(RocCurve("image level", fpr, tpr, image_auroc(score, labels)))
    try:
        fpr, tpr, _ = pix.roc_curve() if pix.n_maps else (None, None, None)
        if fpr is not None:
            curves.append(RocCurve("pixel level", fpr, tpr, pix.pixel_auroc()))
    except ValueError as e:
        warnings.warn(f"no pixel ROC: {e}", stacklevel=2)
    if curves:
        figures["roc"] = str(fig_roc(curves, out_dir / "roc.png", run=run,
                                     what=f"ROC curves on the test set, {name}"))
    else:
        warnings.warn("no ROC figure: a single class in the test set", stacklevel=2)
    if len(feats) >= 4:
        figures["tsne"] = str(fig_tsne(feats, labels, defects, out_dir / "fig5_tsne.png", seed=seed, run=run,
                                       size=size, features_desc=features_desc))
    else:
        warnings.warn(f"no t-SNE figure: {len(feats)} test images (< 4)", stacklevel=2)
    for m, items in (ext_items or {}).items():
        if items:
            ims, maps, gts, titles = zip(*items)
            method, colour = MAP_METHODS.get(m, (m, f"{m} anomaly score"))
            figures[f"localization_{m}"] = str(fig_localization(
                ims, maps, gts, out_dir / f"fig4a_localization_{m}.png", titles, run=run, method=method,
                colour_label=colour))
    return figures


__all__ = ["MAP_METHODS", "KNN_MODEL_FEATURES", "FigItem", "write_figures"]
