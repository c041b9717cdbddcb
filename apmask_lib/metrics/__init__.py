"""Anomaly-detection metrics: image AUROC, pixel AUROC, AU-PRO, F1-max, one method's summary, seed aggregation.

Everything is computed from one representation, the counts of positives and negatives at each distinct
threshold, with ties merged as the official MVTec AD evaluation does (:mod:`~apmask_lib.metrics.curves`).

:mod:`~apmask_lib.metrics.curves`: the counts, the curves and the image-level metrics;
:mod:`~apmask_lib.metrics.pixel`: the streaming pixel metrics; :mod:`~apmask_lib.metrics.summary`: one
method's ``metrics.json`` entries and the seed aggregation. Every public name is importable from here.
"""
from .curves import (ThresholdCounts, au_pro_from_counts, auroc_from_counts, counts_from_scores, f1_max,
                     f1_max_from_counts, image_auroc, pro_from_counts, roc_curve, roc_from_counts, trapezoid)
from .pixel import DEFAULT_BINS, PixelMetrics, au_pro, pixel_auroc, pro_curve, region_weights
from .summary import aggregate_seeds, finite_or_none, method_metrics, paper_image_score, per_defect_auroc, safe_auroc

__all__ = ["ThresholdCounts", "counts_from_scores", "trapezoid", "roc_from_counts", "auroc_from_counts",
           "f1_max_from_counts", "pro_from_counts", "au_pro_from_counts", "image_auroc", "roc_curve", "f1_max",
           "region_weights", "PixelMetrics", "pixel_auroc", "pro_curve", "au_pro", "safe_auroc", "per_defect_auroc",
           "paper_image_score", "method_metrics", "finite_or_none", "aggregate_seeds", "DEFAULT_BINS"]
