"""Counts at each distinct threshold, the curves and areas built from them, and the image-level metrics
(image AUROC, ROC, F1-max): the core that :mod:`apmask_lib.metrics.pixel` streams pixels into.

Everything is computed from one representation: for each distinct threshold ``t`` (descending),
the number of positive and negative samples whose score equals ``t`` (and, for pixels, the sum of
per-region PRO weights). Cumulative sums of those counts give the ROC, PR and PRO curves with
ties merged exactly as the official MVTec AD evaluation (``compute_pro``, ``trapezoid``,
``compute_classification_roc``; Bergmann et al., IJCV 2021) and scikit-learn do: a threshold
``t`` classifies ``score >= t`` as anomalous, and tied scores enter the curve together.
"""
from __future__ import annotations

import warnings
from bisect import bisect
from dataclasses import dataclass
from typing import Optional, Sequence

import numpy as np


# --------------------------------------------------------------------------------------------
# counts at each distinct threshold
# --------------------------------------------------------------------------------------------
@dataclass
class ThresholdCounts:
    """Per distinct threshold, in *descending* threshold order.

    thresholds: (T,) the score (exact) or the bin's lower edge (histogram).
    pos, neg:   (T,) number of positive / negative samples at that threshold.
    region:     (T,) sum over positive pixels at that threshold of 1/|region| (PRO weights), or None.
    n_regions:  number of ground-truth regions (PRO denominator).
    """

    thresholds: np.ndarray
    pos: np.ndarray
    neg: np.ndarray
    region: Optional[np.ndarray] = None
    n_regions: int = 0

    @property
    def n_pos(self) -> float:
        return float(self.pos.sum())

    @property
    def n_neg(self) -> float:
        return float(self.neg.sum())


def counts_from_scores(scores: np.ndarray, labels: np.ndarray,
                       region_weights: Optional[np.ndarray] = None, n_regions: int = 0) -> ThresholdCounts:
    """Exact counts: one threshold per distinct score. ``scores``, ``labels`` (bool/0-1) and the
    optional ``region_weights`` are flat arrays of equal length."""
    scores = np.asarray(scores).ravel()
    labels = np.asarray(labels).ravel().astype(bool)
    if scores.shape != labels.shape:
        raise ValueError(f"scores ({scores.shape}) and labels ({labels.shape}) differ in length")
    if scores.size and not np.isfinite(scores).all():
        raise ValueError(f"{int((~np.isfinite(scores)).sum())} non-finite scores; metrics need finite scores")
    values, inverse = np.unique(scores, return_inverse=True)
    k = len(values)
    pos = np.bincount(inverse[labels], minlength=k).astype(np.float64)
    neg = np.bincount(inverse[~labels], minlength=k).astype(np.float64)
    region = None
    if region_weights is not None:
        rw = np.asarray(region_weights, dtype=np.float64).ravel()
        region = np.bincount(inverse, weights=rw, minlength=k)
        region = region[::-1].copy()
    return ThresholdCounts(values[::-1].copy(), pos[::-1].copy(), neg[::-1].copy(), region, n_regions)


# --------------------------------------------------------------------------------------------
# curves and areas
# --------------------------------------------------------------------------------------------
def trapezoid(x: np.ndarray, y: np.ndarray, x_max: Optional[float] = None) -> float:
    """Area under the curve ``y(x)`` (x ascending) by the trapezoidal rule, up to ``x_max``.

    As the official MVTec AD ``trapezoid``: non-finite points are dropped; when ``x_max`` is not
    one of the ``x``, ``y`` is linearly interpolated between the two neighbouring points and the
    partial trapezoid from the last point below ``x_max`` to ``x_max`` is added."""
    x = np.asarray(x, dtype=np.float64)
    y = np.asarray(y, dtype=np.float64)
    finite = np.isfinite(x) & np.isfinite(y)
    if not finite.all():
        warnings.warn("trapezoid: dropping non-finite points", stacklevel=2)
    x, y = x[finite], y[finite]
    correction = 0.0
    if x_max is not None:
        if x_max not in x:
            ins = bisect(x.tolist(), x_max)
            if not 0 < ins < len(x):
                raise ValueError(f"x_max={x_max} lies outside the curve's x range [{x.min()}, {x.max()}]")
            y_interp = y[ins - 1] + (y[ins] - y[ins - 1]) * (x_max - x[ins - 1]) / (x[ins] - x[ins - 1])
            correction = 0.5 * (y_interp + y[ins - 1]) * (x_max - x[ins - 1])
        keep = x <= x_max
        x, y = x[keep], y[keep]
    return float(np.sum(0.5 * (x[1:] - x[:-1]) * (y[1:] + y[:-1])) + correction)


def roc_from_counts(c: ThresholdCounts) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """ROC (fpr, tpr, thresholds) starting at (0, 0) (threshold +inf), ties merged."""
    if c.n_pos == 0 or c.n_neg == 0:
        raise ValueError(f"ROC needs both classes (positives={c.n_pos:.0f}, negatives={c.n_neg:.0f})")
    tpr = np.concatenate([[0.0], np.cumsum(c.pos) / c.n_pos])
    fpr = np.concatenate([[0.0], np.cumsum(c.neg) / c.n_neg])
    thr = np.concatenate([[np.inf], c.thresholds.astype(np.float64)])
    return fpr, tpr, thr


def auroc_from_counts(c: ThresholdCounts) -> float:
    """Area under the ROC curve (= probability a positive outscores a negative, ties count 1/2)."""
    fpr, tpr, _ = roc_from_counts(c)
    return trapezoid(fpr, tpr)


def f1_max_from_counts(c: ThresholdCounts) -> tuple[float, float]:
    """Maximum over thresholds of F1 = 2PR/(P+R) for ``score >= t``; returns (F1, t).
    Ties go to the highest threshold (first in descending order)."""
    if c.n_pos == 0:
        raise ValueError("F1 needs at least one positive")
    tp = np.cumsum(c.pos)
    fp = np.cumsum(c.neg)
    precision = np.divide(tp, tp + fp, out=np.zeros_like(tp), where=(tp + fp) > 0)
    recall = tp / c.n_pos
    denom = precision + recall
    f1 = np.divide(2 * precision * recall, denom, out=np.zeros_like(tp), where=denom > 0)
    i = int(np.argmax(f1))
    return float(f1[i]), float(c.thresholds[i])


def pro_from_counts(c: ThresholdCounts) -> tuple[np.ndarray, np.ndarray]:
    """PRO curve (fpr, pro) as the official ``compute_pro``: starts at (0, 0), one point per
    distinct threshold, values clipped to <= 1, ends with an appended (1, 1).

    fpr(t) = #normal pixels with score >= t / #normal pixels (over all maps);
    pro(t) = mean over GT regions of the fraction of the region's pixels with score >= t."""
    if c.region is None:
        raise ValueError("PRO needs region weights (use PixelMetrics or counts_from_scores(region_weights=...))")
    if c.n_regions == 0:
        raise ValueError("PRO needs at least one ground-truth region")
    if c.n_neg == 0:
        raise ValueError("PRO needs normal (GT = 0) pixels")
    fpr = np.minimum(np.cumsum(c.neg) / c.n_neg, 1.0)
    pro = np.minimum(np.cumsum(c.region) / c.n_regions, 1.0)
    return np.concatenate([[0.0], fpr, [1.0]]), np.concatenate([[0.0], pro, [1.0]])


def au_pro_from_counts(c: ThresholdCounts, fpr_limit: float = 0.3) -> float:
    """Area under the PRO curve up to ``fpr_limit``, divided by ``fpr_limit`` (so 1.0 is perfect)."""
    if not 0 < fpr_limit <= 1:
        raise ValueError(f"fpr_limit must be in (0, 1], got {fpr_limit}")
    fpr, pro = pro_from_counts(c)
    return trapezoid(fpr, pro, x_max=fpr_limit) / fpr_limit


# --------------------------------------------------------------------------------------------
# image-level
# --------------------------------------------------------------------------------------------
def image_auroc(scores: Sequence[float], labels: Sequence[int]) -> float:
    """Image AUROC: scores (N,) higher = anomalous, labels (N,) 1 = anomalous. Exact, tie-aware
    (equals sklearn ``roc_auc_score`` and the official ``compute_classification_roc`` + trapezoid)."""
    return auroc_from_counts(counts_from_scores(np.asarray(scores, dtype=np.float64), np.asarray(labels)))


def roc_curve(scores: Sequence[float], labels: Sequence[int]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(fpr, tpr, thresholds) of the exact ROC, starting at (0, 0)."""
    return roc_from_counts(counts_from_scores(np.asarray(scores, dtype=np.float64), np.asarray(labels)))


def f1_max(scores: Sequence[float], labels: Sequence[int]) -> tuple[float, float]:
    """(best F1, its threshold) over all thresholds ``score >= t`` (exact)."""
    return f1_max_from_counts(counts_from_scores(np.asarray(scores, dtype=np.float64), np.asarray(labels)))


__all__ = ["ThresholdCounts", "counts_from_scores", "trapezoid", "roc_from_counts", "auroc_from_counts",
           "f1_max_from_counts", "pro_from_counts", "au_pro_from_counts", "image_auroc", "roc_curve", "f1_max"]
