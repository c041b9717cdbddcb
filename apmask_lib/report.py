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


#: keys of a run's metrics.json that differ between runs with equal results (wall-clock times): kept in
#: the run folder, left out of the git-tracked copies so a reproduced pipeline leaves git status clean
VARYING = ("timings",)


def split_metrics(metrics: dict) -> tuple[dict, dict]:
    """(numbers, info): DVC metrics files hold numbers only (``dvc metrics show`` / ``dvc exp show``
    tabulate every key), nested sections kept where they hold numbers; strings, None and booleans
    (model path, backbone, dataset, ...) go to the info part; :data:`VARYING` keys (timings) to neither."""
    numbers, info = {}, {}
    for k, v in metrics.items():
        if k in VARYING:
            continue
        if isinstance(v, dict):
            n, i = split_metrics(v)
            if n:
                numbers[k] = n
            if i:
                info[k] = i
        elif isinstance(v, (int, float)) and not isinstance(v, bool):
            numbers[k] = v
        elif isinstance(v, (str, bool, type(None))):
            info[k] = v
    return numbers, info


def collect_run(run: str | Path, name: str, results: str | Path = "results") -> dict[str, str]:
    """Copy the numbers of ``run/evaluate/metrics.json`` to ``results/metrics/NAME.json`` (a DVC
    metrics file), its strings (model path, backbone, ...) to ``results/info/NAME.json``, and write
    ``results/plots/NAME/{pretrain_loss,finetune_loss,roc}.csv``. Returns what was written."""
    import numpy as np

    from .metrics import roc_curve

    run, results = Path(run), Path(results)
    metrics_src = run / "evaluate" / "metrics.json"
    if not metrics_src.is_file():
        raise FileNotFoundError(f"{metrics_src} not found: evaluate the run first (apmask evaluate)")
    written = {}
    out = results / "metrics" / f"{name}.json"
    numbers, info = split_metrics(json.loads(metrics_src.read_text()))
    write_json(out, numbers)
    written["metrics"] = str(out)
    info_path = results / "info" / f"{name}.json"
    write_json(info_path, info)
    written["info"] = str(info_path)
    plots = results / "plots" / name
    for stage, cols in (("pretrain", ("step", "loss")), ("finetune", ("step", "loss", "loss_det", "loss_seg"))):
        dst = plots / f"{stage}_loss.csv"
        if _copy_columns(run / stage / "log.csv", dst, cols):
            written[f"{stage}_loss"] = str(dst)
    scores = run / "evaluate" / "scores.csv"
    if scores.is_file():
        with scores.open(newline="") as f:
            rows = list(csv.DictReader(f))
        fpr, tpr, _ = roc_curve(np.array([float(r["score"]) for r in rows]), np.array([int(r["label"]) for r in rows]))
        dst = plots / "roc.csv"
        atomic_write_text(dst, "fpr,tpr\n" + "".join(f"{a:.6g},{b:.6g}\n" for a, b in zip(fpr, tpr)))
        written["roc"] = str(dst)
    return written
