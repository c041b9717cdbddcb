"""One method's outputs on a test set (image AUROC overall and per defect type, F1-max, the pixel
summary) as written to ``metrics.json``, strict-JSON floats, and the mean ± SE over seeds."""
from __future__ import annotations

import math
import warnings
from typing import Any, Mapping, Sequence

import numpy as np

from .curves import f1_max, image_auroc
from .pixel import PixelMetrics


# --------------------------------------------------------------------------------------------
# one method's outputs on a test set
# --------------------------------------------------------------------------------------------
def safe_auroc(scores: Sequence[float], labels: Sequence[int], what: str) -> float:
    """AUROC, or NaN (with a warning) when only one class is present."""
    labels = np.asarray(labels)
    if labels.min(initial=1) == labels.max(initial=0) or len(labels) == 0:
        warnings.warn(f"{what}: needs normal and anomalous images; reported as NaN", stacklevel=2)
        return float("nan")
    return image_auroc(scores, labels)


def per_defect_auroc(scores: Sequence[float], labels: Sequence[int], defects: Sequence[str]) -> dict[str, float]:
    """Image AUROC of each anomalous defect type against all normal images."""
    scores, labels, defects = np.asarray(scores), np.asarray(labels), np.asarray(defects)
    normal = labels == 0
    out = {}
    for d in sorted(set(defects[labels == 1])):
        sel = normal | ((defects == d) & (labels == 1))
        out[str(d)] = safe_auroc(scores[sel], labels[sel], f"image AUROC of {d}")
    return out


def paper_image_score(res: Any, score: str) -> np.ndarray:
    """The paper's continuous image score of a batch (``cfg.evaluate.score``): ``det_mean`` (mean
    detection probability over the scales) or ``map_max`` of a
    :class:`~apmask_lib.inference.multiscale.MultiScaleOutput`."""
    return res.det_mean if score == "det_mean" else res.map_max


def method_metrics(scores: Sequence[float], labels: np.ndarray, defects: Sequence[str], pix: PixelMetrics,
                   fpr_limit: float) -> dict[str, Any]:
    """Image AUROC (+ per defect type, F1-max where anomalous images exist) and the pixel summary
    (:meth:`PixelMetrics.summary`; pixel AUROC / AU-PRO NaN without maps) of one method's outputs."""
    scores = np.asarray(scores, dtype=np.float64)
    out: dict[str, Any] = {"image_auroc": safe_auroc(scores, labels, "image AUROC"),
                           "per_defect_image_auroc": per_defect_auroc(scores, labels, defects)}
    if labels.any():
        out["f1_max"], out["f1_threshold"] = f1_max(scores, labels)
    out.update(pix.summary(fpr_limit) if pix.n_maps else {})
    out.setdefault("pixel_auroc", float("nan"))
    out.setdefault("au_pro", float("nan"))
    return out


def finite_or_none(obj: Any) -> Any:
    """Replace NaN/inf floats by None (strict JSON), recursively."""
    if isinstance(obj, dict):
        return {k: finite_or_none(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [finite_or_none(v) for v in obj]
    if isinstance(obj, (float, np.floating)) and not math.isfinite(float(obj)):
        return None
    return obj


# --------------------------------------------------------------------------------------------
# seeds
# --------------------------------------------------------------------------------------------
def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float, np.integer, np.floating)) and not isinstance(v, bool)


def aggregate_seeds(runs: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """Mean ± standard error over seeds of every numeric entry (nested dicts recurse).

    Returns ``{key: {"mean": m, "se": std(ddof=1)/sqrt(n) or None when n < 2, "n": n}}``; non-finite
    values (NaN, or None as in metrics.json) are left out of that key's n. Keys absent from some runs use
    the runs that have them."""
    out: dict[str, Any] = {}
    keys: list[str] = []
    for r in runs:
        keys += [k for k in r if k not in keys]
    for k in keys:
        vals = [r[k] for r in runs if r.get(k) is not None]
        if vals and all(isinstance(v, Mapping) for v in vals):
            out[k] = aggregate_seeds(vals)
        elif vals and all(_is_number(v) for v in vals):
            x = np.array([float(v) for v in vals if math.isfinite(float(v))])
            n = len(x)
            mean = float(x.mean()) if n else float("nan")
            se = float(x.std(ddof=1) / math.sqrt(n)) if n >= 2 else None
            out[k] = {"mean": mean, "se": se, "n": n}
    return out


__all__ = ["safe_auroc", "per_defect_auroc", "paper_image_score", "method_metrics", "finite_or_none", "aggregate_seeds"]
