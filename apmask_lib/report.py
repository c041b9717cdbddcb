"""Collect a finished run's small, plottable results where DVC tracks them as
``metrics`` and ``plots`` (outside the run folder, which is a cached DVC output)."""
from __future__ import annotations

import csv
import json
from pathlib import Path

from .utils import atomic_write_text, write_json


def _copy_columns(src: Path, dst: Path, columns: tuple[str, ...]) -> bool:
    if not src.is_file():
        return False
    with src.open(newline="") as f:
        rows = list(csv.DictReader(f))
    keep = [c for c in columns if rows and c in rows[0]]
    text = ",".join(keep) + "\n" + "".join(",".join(r[c] for c in keep) + "\n" for r in rows)
    atomic_write_text(dst, text)
    return True


def collect_run(run: str | Path, name: str, results: str | Path = "results") -> dict[str, str]:
    """Copy ``run/evaluate/metrics.json`` to ``results/metrics/NAME.json`` and write
    ``results/plots/NAME/{pretrain_loss,finetune_loss,finetune_validation,roc}.csv``. Returns what was written."""
    import numpy as np

    from .metrics import roc_curve

    run, results = Path(run), Path(results)
    metrics_src = run / "evaluate" / "metrics.json"
    if not metrics_src.is_file():
        raise FileNotFoundError(f"{metrics_src} not found: evaluate the run first (apmask evaluate)")
    written = {}
    out = results / "metrics" / f"{name}.json"
    metrics = json.loads(metrics_src.read_text())
    write_json(out, {k: v for k, v in metrics.items() if isinstance(v, (int, float, str, type(None)))})
    written["metrics"] = str(out)
    plots = results / "plots" / name
    for stage, cols in (("pretrain", ("step", "loss")), ("finetune", ("step", "loss", "loss_det", "loss_seg"))):
        dst = plots / f"{stage}_loss.csv"
        if _copy_columns(run / stage / "log.csv", dst, cols):
            written[f"{stage}_loss"] = str(dst)
    dst = plots / "finetune_validation.csv"  # label-free validation signal per epoch (apmask_lib/validation.py)
    if _copy_columns(run / "finetune" / "validation.csv", dst, ("epoch", "acc", "val_acc", "val_auroc", "val_dice",
                                                                 "val_loss")):
        written["finetune_validation"] = str(dst)
    scores = run / "evaluate" / "scores.csv"
    if scores.is_file():
        with scores.open(newline="") as f:
            rows = list(csv.DictReader(f))
        fpr, tpr, _ = roc_curve(np.array([float(r["score"]) for r in rows]), np.array([int(r["label"]) for r in rows]))
        dst = plots / "roc.csv"
        atomic_write_text(dst, "fpr,tpr\n" + "".join(f"{a:.6g},{b:.6g}\n" for a, b in zip(fpr, tpr)))
        written["roc"] = str(dst)
    return written
