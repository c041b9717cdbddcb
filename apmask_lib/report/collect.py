"""Collect a finished run's small, plottable results where DVC tracks them as
``metrics`` and ``plots`` (outside the run folder, which is a cached DVC output)."""
from __future__ import annotations

import csv
import json
from pathlib import Path

from ..core.files import atomic_write_text, write_json


def _copy_columns(src: Path, dst: Path, columns: tuple[str, ...]) -> bool:
    if not src.is_file():
        return False
    with src.open(newline="") as f:
        rows = list(csv.DictReader(f))
    keep = [c for c in columns if rows and c in rows[0]]
    text = ",".join(keep) + "\n" + "".join(",".join(r[c] for c in keep) + "\n" for r in rows)
    atomic_write_text(dst, text)
    return True


#: keys of a run's metrics.json that differ between runs with equal results (wall-clock times, the machine): kept in
#: the run folder, left out of the git-tracked copies so a reproduced pipeline leaves git status clean
VARYING = ("timings", "machine")


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


#: what each stage contributes: (loss log, its columns) for the training stages
LOSS_COLUMNS = {"pretrain": ("step", "loss"), "finetune": ("step", "loss", "loss_det", "loss_seg")}
STAGES = ("pretrain", "finetune", "evaluate")


def collect_run(run: str | Path, name: str, results: str | Path = "results",
                stages: tuple[str, ...] = STAGES) -> dict[str, str]:
    """Copy a run's small, deterministic results to where DVC tracks them, per stage:
    ``pretrain`` / ``finetune`` -> ``results/plots/NAME/<stage>_loss.csv`` (step and loss columns of
    the stage's log.csv; ``finetune`` also ``finetune_validation.csv``, the label-free
    validation signal per epoch, apmask_lib/finetune/validation.py); ``evaluate`` -> the numbers of ``evaluate/metrics.json`` to
    ``results/metrics/NAME.json`` (a DVC metrics file), its strings (model path, backbone, ...) to
    ``results/info/NAME.json`` and ``results/plots/NAME/roc.csv``. Each DVC stage collects its own
    part, so a stage's outputs never depend on files another stage does not declare. A missing
    input is an error naming it. Returns what was written."""
    import numpy as np

    from ..metrics import roc_curve

    unknown = set(stages) - set(STAGES)
    if unknown:
        raise ValueError(f"unknown stage(s) {sorted(unknown)}; known: {STAGES}")
    run, results = Path(run), Path(results)
    plots = results / "plots" / name
    written = {}
    for stage in stages:
        if stage in LOSS_COLUMNS:
            src, dst = run / stage / "log.csv", plots / f"{stage}_loss.csv"
            if not _copy_columns(src, dst, LOSS_COLUMNS[stage]):
                raise FileNotFoundError(f"{src} not found: run the {stage} stage for {run} first")
            written[f"{stage}_loss"] = str(dst)
            if stage == "finetune":
                dst = plots / "finetune_validation.csv"
                if _copy_columns(run / "finetune" / "validation.csv", dst,
                                 ("epoch", "acc", "val_acc", "val_auroc", "val_dice", "val_loss")):
                    written["finetune_validation"] = str(dst)
            continue
        metrics_src = run / "evaluate" / "metrics.json"
        if not metrics_src.is_file():
            raise FileNotFoundError(f"{metrics_src} not found: evaluate the run first (apmask evaluate)")
        numbers, info = split_metrics(json.loads(metrics_src.read_text()))
        out, info_path = results / "metrics" / f"{name}.json", results / "info" / f"{name}.json"
        write_json(out, numbers)
        write_json(info_path, info)
        written.update(metrics=str(out), info=str(info_path))
        scores = run / "evaluate" / "scores.csv"
        if scores.is_file():
            with scores.open(newline="") as f:
                rows = list(csv.DictReader(f))
            fpr, tpr, _ = roc_curve(np.array([float(r["score"]) for r in rows]),
                                    np.array([int(r["label"]) for r in rows]))
            dst = plots / "roc.csv"
            atomic_write_text(dst, "fpr,tpr\n" + "".join(f"{a:.6g},{b:.6g}\n" for a, b in zip(fpr, tpr)))
            written["roc"] = str(dst)
    return written
