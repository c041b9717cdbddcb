"""Anomaly-detection metrics: image AUROC, pixel AUROC, AU-PRO, F1-max, one method's summary, seed aggregation.

Everything is computed from one representation: for each distinct threshold ``t`` (descending),
the number of positive and negative samples whose score equals ``t`` (and, for pixels, the sum of
per-region PRO weights). Cumulative sums of those counts give the ROC, PR and PRO curves with
ties merged exactly as the official MVTec AD evaluation (``compute_pro``, ``trapezoid``,
``compute_classification_roc``; Bergmann et al., IJCV 2021) and scikit-learn do: a threshold
``t`` classifies ``score >= t`` as anomalous, and tied scores enter the curve together.

Two ways to get the counts for pixels:

* **exact** (``bins=None``): the distinct values of all scores (``np.unique``). Memory grows with
  the number of pixels: for small inputs and tests.
* **histogram** (``bins=2**20`` by default): scores binned uniformly over a fixed range (``[0, 1]``
  for probability maps). Memory is O(bins) whatever the number of maps, so the full MVTec test set
  at 900x900 (~1.4e9 pixels) streams through in ~25 MB. Scores in the same bin count as tied; the
  AUROC error this can cause is bounded by ``0.5 * sum_b pos_b * neg_b / (P * N)``, reported as
  ``PixelMetrics.auroc_bin_error_bound()`` (on the oracle cases the histogram and exact results
  agree to < 1e-5; see tests/test_metrics.py).

Conventions:
  maps:  (N, H, W) float anomaly scores (or an iterable of (H, W) maps), higher = more anomalous.
  masks: (N, H, W) bool/0-1 ground truth; regions are 8-connected components (3x3 structure),
         as in the official evaluation.
"""
from __future__ import annotations

import math
import warnings
from bisect import bisect
from dataclasses import dataclass
from typing import Any, Iterable, Mapping, Optional, Sequence

import numpy as np
from scipy import ndimage

EIGHT_CONNECTED = np.ones((3, 3), dtype=int)
DEFAULT_BINS = 2**20


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


# --------------------------------------------------------------------------------------------
# pixel-level
# --------------------------------------------------------------------------------------------
def region_weights(mask: np.ndarray) -> tuple[np.ndarray, int]:
    """(H, W) mask -> (weights (H, W) float64 with 1/|region| on each 8-connected GT region's
    pixels and 0 elsewhere, number of regions). Summing weights over the pixels with score >= t
    and dividing by the total number of regions gives PRO(t)."""
    labeled, n = ndimage.label(np.asarray(mask, dtype=bool), structure=EIGHT_CONNECTED)
    if n == 0:
        return np.zeros(labeled.shape, dtype=np.float64), 0
    sizes = np.bincount(labeled.ravel(), minlength=n + 1).astype(np.float64)
    inv = np.zeros(n + 1, dtype=np.float64)
    inv[1:] = 1.0 / sizes[1:]
    return inv[labeled], int(n)


class PixelMetrics:
    """Streaming pixel metrics over many (map, mask) pairs: pixel AUROC, AU-PRO, pixel F1-max.

    ``bins=None``: exact (keeps all pixels; small inputs). ``bins=K``: K uniform bins over
    ``value_range``; memory O(K). Scores outside the range are clipped into the end bins (counted
    in ``n_clipped`` and warned about). Maps may have different sizes.
    """

    def __init__(self, bins: Optional[int] = DEFAULT_BINS, value_range: tuple[float, float] = (0.0, 1.0)):
        if bins is not None and bins < 2:
            raise ValueError(f"bins must be >= 2 or None (exact), got {bins}")
        lo, hi = float(value_range[0]), float(value_range[1])
        if not hi > lo:
            raise ValueError(f"value_range must be increasing, got {value_range}")
        self.bins, self.lo, self.hi = bins, lo, hi
        self.n_regions = 0
        self.n_maps = 0
        self.n_clipped = 0
        if bins is None:
            self._scores: list[np.ndarray] = []
            self._labels: list[np.ndarray] = []
            self._weights: list[np.ndarray] = []
        else:
            self._pos = np.zeros(bins, dtype=np.float64)
            self._neg = np.zeros(bins, dtype=np.float64)
            self._reg = np.zeros(bins, dtype=np.float64)

    @property
    def exact(self) -> bool:
        return self.bins is None

    def bin_index(self, scores: np.ndarray) -> np.ndarray:
        """Bin of each score: floor((s - lo) / (hi - lo) * bins), clipped to [0, bins - 1]."""
        s = np.asarray(scores, dtype=np.float64)
        idx = np.floor((s - self.lo) * (self.bins / (self.hi - self.lo)))
        return np.clip(idx, 0, self.bins - 1).astype(np.int64)

    def update(self, score_map: np.ndarray, mask: np.ndarray) -> None:
        """Add one (H, W) map and its (H, W) ground truth (all-zero for a normal image)."""
        score_map = np.asarray(score_map)
        mask = np.asarray(mask, dtype=bool)
        if score_map.shape != mask.shape or score_map.ndim != 2:
            raise ValueError(f"map {score_map.shape} and mask {mask.shape} must be equal (H, W)")
        if not np.isfinite(score_map).all():
            raise ValueError("anomaly map has non-finite values")
        w, n = region_weights(mask)
        self.n_regions += n
        self.n_maps += 1
        if self.exact:
            self._scores.append(score_map.ravel().copy())
            self._labels.append(mask.ravel())
            self._weights.append(w.ravel())
            return
        out = (score_map < self.lo) | (score_map > self.hi)
        self.n_clipped += int(out.sum())
        idx = self.bin_index(score_map).ravel()
        m = mask.ravel()
        self._pos += np.bincount(idx[m], minlength=self.bins)
        self._neg += np.bincount(idx[~m], minlength=self.bins)
        if n:
            self._reg += np.bincount(idx[m], weights=w.ravel()[m], minlength=self.bins)

    def update_batch(self, maps: Iterable[np.ndarray], masks: Iterable[np.ndarray]) -> None:
        for s, m in zip(maps, masks, strict=True):
            self.update(s, m)

    def counts(self) -> ThresholdCounts:
        """Counts per distinct threshold (descending); empty bins are dropped."""
        if self.n_maps == 0:
            raise ValueError("no maps were added")
        if self.n_clipped:
            warnings.warn(f"{self.n_clipped} pixel scores lay outside [{self.lo}, {self.hi}] and were clipped "
                          "into the end bins (treated as ties there)", stacklevel=2)
        if self.exact:
            return counts_from_scores(np.concatenate(self._scores), np.concatenate(self._labels),
                                      np.concatenate(self._weights), self.n_regions)
        keep = (self._pos + self._neg) > 0
        edges = self.lo + np.arange(self.bins, dtype=np.float64) * ((self.hi - self.lo) / self.bins)
        rev = slice(None, None, -1)
        return ThresholdCounts(edges[keep][rev].copy(), self._pos[keep][rev].copy(), self._neg[keep][rev].copy(),
                               self._reg[keep][rev].copy(), self.n_regions)

    def pixel_auroc(self) -> float:
        return auroc_from_counts(self.counts())

    def au_pro(self, fpr_limit: float = 0.3) -> float:
        return au_pro_from_counts(self.counts(), fpr_limit)

    def f1_max(self) -> tuple[float, float]:
        return f1_max_from_counts(self.counts())

    def roc_curve(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        return roc_from_counts(self.counts())

    def pro_curve(self) -> tuple[np.ndarray, np.ndarray]:
        return pro_from_counts(self.counts())

    def auroc_bin_error_bound(self) -> float:
        """Largest possible |histogram AUROC - exact AUROC|: pairs (positive, negative) sharing a bin
        are scored 1/2 but could be anything in [0, 1]. 0 for the exact path."""
        if self.exact:
            return 0.0
        p, n = self._pos.sum(), self._neg.sum()
        if p == 0 or n == 0:
            return float("nan")
        return float(0.5 * np.dot(self._pos, self._neg) / (p * n))

    def summary(self, fpr_limit: float = 0.3) -> dict[str, Any]:
        """pixel_auroc, au_pro, pixel_f1_max, pixel_f1_threshold (NaN where undefined), plus the method."""
        c = self.counts() if self.n_maps else None
        out: dict[str, Any] = {"pixel_metric_method": "exact" if self.exact else
                               f"histogram {self.bins} bins over [{self.lo}, {self.hi}]",
                               "pixel_auroc_bin_error_bound": self.auroc_bin_error_bound() if self.n_maps else float("nan"),
                               "n_gt_regions": self.n_regions, "n_pixel_maps": self.n_maps}
        for key, fn in (("pixel_auroc", lambda: auroc_from_counts(c)),
                        ("au_pro", lambda: au_pro_from_counts(c, fpr_limit))):
            try:
                out[key] = fn() if c is not None else float("nan")
            except ValueError as e:
                warnings.warn(f"{key} undefined: {e}", stacklevel=2)
                out[key] = float("nan")
        try:
            out["pixel_f1_max"], out["pixel_f1_threshold"] = f1_max_from_counts(c) if c is not None else (float("nan"),) * 2
        except ValueError:
            out["pixel_f1_max"], out["pixel_f1_threshold"] = float("nan"), float("nan")
        return out


def _with_range(maps, bins, value_range):
    """For the convenience functions: default histogram range = the maps' own min..max."""
    if value_range is not None:
        return maps, value_range
    if bins is None:
        return maps, (0.0, 1.0)  # unused by the exact path
    maps = [np.asarray(m) for m in maps]
    lo = min(float(m.min()) for m in maps)
    hi = max(float(m.max()) for m in maps)
    return maps, (lo, hi if hi > lo else lo + 1.0)


def pixel_auroc(maps: Iterable[np.ndarray], masks: Iterable[np.ndarray], bins: Optional[int] = None,
                value_range: Optional[tuple[float, float]] = None) -> float:
    """AUROC over all pixels of all maps (exact by default; ``bins`` for the histogram path,
    over ``value_range`` or, when None, the maps' own min..max)."""
    maps, value_range = _with_range(maps, bins, value_range)
    acc = PixelMetrics(bins, value_range)
    acc.update_batch(maps, masks)
    return acc.pixel_auroc()


def pro_curve(maps: Iterable[np.ndarray], masks: Iterable[np.ndarray], bins: Optional[int] = None,
              value_range: Optional[tuple[float, float]] = None) -> tuple[np.ndarray, np.ndarray]:
    """The official PRO curve (fpr, pro); see :func:`pro_from_counts`."""
    maps, value_range = _with_range(maps, bins, value_range)
    acc = PixelMetrics(bins, value_range)
    acc.update_batch(maps, masks)
    return acc.pro_curve()


def au_pro(maps: Iterable[np.ndarray], masks: Iterable[np.ndarray], fpr_limit: float = 0.3,
           bins: Optional[int] = None, value_range: Optional[tuple[float, float]] = None) -> float:
    """Normalised area under the PRO curve up to ``fpr_limit`` (MVTec AD: 0.3)."""
    maps, value_range = _with_range(maps, bins, value_range)
    acc = PixelMetrics(bins, value_range)
    acc.update_batch(maps, masks)
    return acc.au_pro(fpr_limit)


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


__all__ = ["ThresholdCounts", "counts_from_scores", "trapezoid", "roc_from_counts", "auroc_from_counts",
           "f1_max_from_counts", "pro_from_counts", "au_pro_from_counts", "image_auroc", "roc_curve", "f1_max",
           "region_weights", "PixelMetrics", "pixel_auroc", "pro_curve", "au_pro", "safe_auroc", "per_defect_auroc",
           "paper_image_score", "method_metrics", "finite_or_none", "aggregate_seeds", "DEFAULT_BINS"]
