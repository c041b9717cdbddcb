"""The decision a user acts on: a threshold on the image score and one on the anomaly map.

An image is called anomalous when ``score >= image threshold``; the heatmap outlines the pixels with
``map >= pixel threshold``. ``apmask evaluate`` chooses both (:func:`choose_threshold`) and writes
them to ``OUT_DIR/evaluate/threshold.json``; ``apmask predict`` and ``apmask export`` read that file.

How a threshold is chosen depends on what the chosen data holds:

* normal AND anomalous images (labels): the F1-optimal threshold (maximum over ``score >= t`` of
  F1, :func:`apmask_lib.metrics.f1_max`); for pixels, the pixel F1-optimal threshold where masks exist.
* normal images only: the ``quantile`` of their scores (e.g. 0.99: about 1 % of normal images
  flagged); for pixels, the ``pixel_quantile`` of their map values.

Which data: the validation images when the data set has them (``data.dataset: folder`` holds out
``data.normal_val_split`` of the normal images, never trained on), else the TEST set. A threshold
chosen on the test set makes any metric measured at it on that same test set optimistic; the file and
the evaluation log say so (``chosen_on``).
"""
from __future__ import annotations

import json
import logging
import math
from pathlib import Path
from typing import Any, Callable, Mapping, Optional, Sequence

import numpy as np

from ..metrics import f1_max, finite_or_none
from ..core.files import write_json

log = logging.getLogger(__name__)

THRESHOLD_FILE = "threshold.json"
# the folder (in OUT_DIR) that evaluating each kind of model writes, threshold.json included
EVALUATE_DIRS = {"detector": "evaluate", "knn": "evaluate_knn"}
MAX_PIXELS_PER_MAP = 65536     # normal-pixel sample kept per map for the pixel quantile


def quantile_threshold(normal_scores: Sequence[float], q: float) -> float:
    """The ``q`` quantile (linear interpolation) of scores of normal images or pixels."""
    s = np.asarray(normal_scores, dtype=np.float64)
    if s.size == 0:
        raise ValueError("a quantile threshold needs at least one normal score")
    if not 0.0 < q <= 1.0:
        raise ValueError(f"threshold quantile must be in (0, 1], got {q}")
    return float(np.quantile(s, q))


def image_threshold(scores: Sequence[float], labels: Sequence[int], q: float) -> tuple[float, str]:
    """(threshold, method): F1-optimal when ``labels`` hold both classes, else the ``q`` quantile of the
    normal scores. Raises ValueError when there are no normal images to take a quantile of."""
    scores, labels = np.asarray(scores, dtype=np.float64), np.asarray(labels)
    if labels.size and 0 < labels.sum() < labels.size:
        return f1_max(scores, labels)[1], "f1_optimal"
    if (labels == 0).any():
        return quantile_threshold(scores[labels == 0], q), f"quantile {q:g} of normal image scores"
    raise ValueError("no normal images to choose a threshold on")


def normal_pixel_sample(amap: np.ndarray, limit: int = MAX_PIXELS_PER_MAP) -> np.ndarray:
    """A regular (strided) sample of at most about ``limit`` values of one map, for the pixel quantile."""
    a = np.asarray(amap, dtype=np.float32)
    step = max(1, math.ceil(math.sqrt(a.size / limit)))
    return a[::step, ::step].ravel()


def choose_threshold(scores: Sequence[float], labels: Sequence[int], score_name: str, chosen_on: str,
                     normal_pixels: Sequence[np.ndarray], pixel_f1_threshold: Optional[float],
                     q: float = 0.99, pixel_q: float = 0.999) -> dict[str, Any]:
    """The threshold record written to ``threshold.json`` (module docstring).

    ``normal_pixels``: samples of normal images' map values (:func:`normal_pixel_sample`);
    ``pixel_f1_threshold``: the pixel F1-optimal threshold of the same data where masks exist (else
    None/NaN, and the pixel quantile is used)."""
    thr, method = image_threshold(scores, labels, q)
    labels = np.asarray(labels)
    if pixel_f1_threshold is not None and math.isfinite(pixel_f1_threshold):
        pix, pix_method = float(pixel_f1_threshold), "f1_optimal over pixels with masks"
    elif len(normal_pixels):
        pix = quantile_threshold(np.concatenate([np.ravel(p) for p in normal_pixels]), pixel_q)
        pix_method = f"quantile {pixel_q:g} of normal images' map values"
    else:
        pix, pix_method = 0.5, "default 0.5 (no normal map values available)"
    return {"image_threshold": float(thr), "image_score": score_name, "image_method": method,
            "pixel_threshold": float(pix), "pixel_method": pix_method, "chosen_on": chosen_on,
            "n_normal": int((labels == 0).sum()), "n_anomalous": int(labels.sum()),
            "rule": "anomalous when image score >= image_threshold; heatmap outlines map >= pixel_threshold"}


def write_threshold(ecfg: Any, dataset_name: str, val: Sequence[Any],
                    score_val: Callable[[list], tuple[np.ndarray, list[np.ndarray]]], out_dir: Path,
                    test_scores: np.ndarray, test_labels: np.ndarray, test_normal_pixels: list[np.ndarray],
                    test_pixel_f1_threshold: Optional[float], extra: Mapping[str, Any]) -> dict[str, Any]:
    """Choose the decision threshold on the validation samples ``val`` (``ecfg.threshold_on``
    auto/val; ``score_val(val)`` gives their image scores and a sample of each map's values,
    :func:`normal_pixel_sample`) or on the test set (auto without validation images, or test), write
    ``out_dir/threshold.json`` (the record of :func:`choose_threshold` + ``extra``) and return it with
    precision / recall / F1 of the TEST set at that threshold. ``ecfg``: the
    :class:`~apmask_lib.config.EvaluateConfig` (threshold_on, score, quantiles)."""
    val = list(val)
    if ecfg.threshold_on == "val" or (ecfg.threshold_on == "auto" and val):
        if not val:
            raise ValueError(f"evaluate.threshold_on=val but {dataset_name} has no validation images "
                             "(data.dataset=folder holds out data.normal_val_split of the normal images)")
        scores, pixels = score_val(val)
        labels = np.array([s.label for s in val])
        pixels = [p for p, s in zip(pixels, val) if s.label == 0]
        chosen_on = f"validation: {len(val)} images held out of training"
        rec = choose_threshold(scores, labels, ecfg.score, chosen_on, pixels, None,
                               ecfg.threshold_quantile, ecfg.pixel_threshold_quantile)
    else:
        chosen_on = ("TEST set (no validation images): metrics measured at this threshold on the test set are "
                     "optimistic; use data.dataset=folder with normal_val_split > 0 for an honest choice")
        rec = choose_threshold(test_scores, test_labels, ecfg.score, chosen_on, test_normal_pixels,
                               test_pixel_f1_threshold, ecfg.threshold_quantile, ecfg.pixel_threshold_quantile)
        log.warning("decision threshold chosen on the test set of %s (no validation images)", dataset_name)
    rec.update(extra)
    write_json(Path(out_dir) / THRESHOLD_FILE, finite_or_none(rec))
    log.info("threshold %.6g on %s (%s; %s) -> %s", rec["image_threshold"], ecfg.score, rec["image_method"],
             rec["chosen_on"], Path(out_dir) / THRESHOLD_FILE)
    return {**rec, "test_at_threshold": confusion_at(test_scores, test_labels, rec["image_threshold"])}


def decide(scores: Sequence[float], threshold: float) -> np.ndarray:
    """(N,) 0/1: 1 (anomalous) where ``score >= threshold`` (the rule F1-optimal thresholds are found for)."""
    return (np.asarray(scores, dtype=np.float64) >= threshold).astype(np.int64)


def confusion_at(scores: Sequence[float], labels: Sequence[int], threshold: float) -> dict[str, float]:
    """Counts and precision / recall / F1 of the decision ``score >= threshold`` against ``labels``."""
    pred, labels = decide(scores, threshold), np.asarray(labels)
    tp, fp = int(((pred == 1) & (labels == 1)).sum()), int(((pred == 1) & (labels == 0)).sum())
    fn, tn = int(((pred == 0) & (labels == 1)).sum()), int(((pred == 0) & (labels == 0)).sum())
    p = tp / (tp + fp) if tp + fp else float("nan")
    r = tp / (tp + fn) if tp + fn else float("nan")
    f1 = 2 * p * r / (p + r) if tp else 0.0
    return {"tp": tp, "fp": fp, "fn": fn, "tn": tn, "precision": p, "recall": r, "f1": f1}


def find_threshold_file(model_path: str | Path, kind: str = "detector") -> Optional[Path]:
    """``threshold.json`` beside the model, else in the run folder's evaluation folder of that kind of
    model (:data:`EVALUATE_DIRS`: ``.../finetune/model.pt`` -> ``.../evaluate/threshold.json``,
    ``.../knn/model.pt`` -> ``.../evaluate_knn/threshold.json``); None when neither exists."""
    model_path = Path(model_path)
    for p in (model_path.parent / THRESHOLD_FILE, model_path.parent.parent / EVALUATE_DIRS[kind] / THRESHOLD_FILE):
        if p.is_file():
            return p
    return None


def read_threshold(path: str | Path) -> dict[str, Any]:
    """Read and check a ``threshold.json``; errors name the file."""
    path = Path(path)
    try:
        rec = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise ValueError(f"cannot read threshold file {path}: {e}") from e
    for key in ("image_threshold", "pixel_threshold", "image_score"):
        if key not in rec:
            raise ValueError(f"threshold file {path} has no {key!r}; re-run apmask evaluate to write it")
    if rec["image_score"] not in ("det_mean", "map_max"):
        raise ValueError(f"threshold file {path}: unknown image_score {rec['image_score']!r}")
    return rec


__all__ = ["THRESHOLD_FILE", "EVALUATE_DIRS", "quantile_threshold", "image_threshold", "normal_pixel_sample", "choose_threshold",
           "write_threshold", "decide", "confusion_at", "find_threshold_file", "read_threshold"]
