"""ROC curves (image level and pixel level) as one figure, one panel per curve."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from .figure import RunLabel, pyplot, run_title, save_figure


@dataclass
class RocCurve:
    """name: panel title; fpr/tpr: ascending curve points; auc: the area to print (None: not shown)."""

    name: str
    fpr: np.ndarray
    tpr: np.ndarray
    auc: float | None = None


def thin_curve(fpr: np.ndarray, tpr: np.ndarray, max_points: int = 4000) -> tuple[np.ndarray, np.ndarray]:
    """Keep at most ``max_points`` points (evenly spaced in index, ends kept) of a long pixel curve
    for plotting; the area is computed elsewhere from the full curve."""
    fpr, tpr = np.asarray(fpr), np.asarray(tpr)
    if len(fpr) <= max_points:
        return fpr, tpr
    idx = np.unique(np.linspace(0, len(fpr) - 1, max_points).round().astype(int))
    return fpr[idx], tpr[idx]


def fig_roc(curves: Sequence[RocCurve], out_png: str | Path, *, run: RunLabel | str,
            what: str = "ROC curves on the test set") -> Path:
    """One ROC panel per curve, with the chance diagonal; the suptitle names ``what`` and the ``run``."""
    if not curves:
        raise ValueError("no ROC curves to plot")
    plt = pyplot()
    fig, axes = plt.subplots(1, len(curves), figsize=(max(3.4 * len(curves), 5.0), 3.9), squeeze=False,
                             layout="constrained")
    for ax, c in zip(axes[0], curves):
        x, y = thin_curve(c.fpr, c.tpr)
        label = f"AUROC = {c.auc:.4f}" if c.auc is not None and np.isfinite(c.auc) else None
        ax.plot(x, y, lw=1.5, label=label)
        ax.plot([0, 1], [0, 1], "k--", lw=0.7, label="chance")
        ax.set_xlim(0, 1)
        ax.set_ylim(0, 1.01)
        ax.set_xlabel("false positive rate")
        ax.set_ylabel("true positive rate")
        ax.set_title(c.name, fontsize=9)
        ax.legend(loc="lower right", fontsize=8)
    run_title(fig, what, run)
    return save_figure(fig, out_png)


__all__ = ["RocCurve", "thin_curve", "fig_roc"]
