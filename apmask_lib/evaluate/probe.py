"""A training-free probe of a backbone: how good are its features and its attention for anomaly
detection, before any fine-tuning? (Not in the paper; used to watch APMask pre-training.)

Three read-outs of one backbone on the test split of a data set, each needing no training:

* ``knn_block7``: the kNN model (:mod:`apmask_lib.knn.model`) on block 7's patch tokens, banks of the
  training images (AnomalyDINO's read-out; image score = top-1 % mean patch distance),
* ``knn_last``: the same on the last block,
* ``attention``: the untrained detector's map, i.e. the backbone's last-layer [CLS] attention (log of
  the heads' geometric mean, the paper's saliency, Eq. 2) as an anomaly map; image score = map maximum.

Pre-training that learns something should move these; one that collapses moves them down. Each
read-out is one :func:`~apmask_lib.evaluate.stage.run_evaluate` at one input size (``size``), written under
``out_dir/<read-out>/``. :func:`probe_backbone` returns ``{read-out: {image_auroc, pixel_auroc, au_pro}}``.
"""
from __future__ import annotations

import warnings
from pathlib import Path
from typing import Optional

from ..config import Config, replace

READOUTS = ("knn_block7", "knn_last", "attention")
METRICS = ("image_auroc", "pixel_auroc", "au_pro")


def probe_backbone(cfg: Config, source: str, out_dir: str | Path, dataset=None, size: Optional[int] = None,
                   readouts: tuple[str, ...] = READOUTS) -> dict[str, dict[str, Optional[float]]]:
    """Probe the backbone ``source`` (a :func:`~apmask_lib.weights.build_backbone` source, e.g.
    ``file:runs/.../pretrain/backbone.pt``) on ``cfg.data`` (or ``dataset``) at input ``size`` (default
    ``cfg.data.image_size``); results in % as :data:`METRICS` per read-out of :data:`READOUTS`."""
    from .stage import run_evaluate
    from ..finetune.stage import build_detector
    from ..knn.model import fit_knn_model
    from ..weights import build_backbone, save_detector

    bad = [r for r in readouts if r not in READOUTS]
    if bad:
        raise ValueError(f"unknown probe read-out(s) {bad}; choose from {READOUTS}")
    size = int(size or cfg.data.image_size)
    out_dir = Path(out_dir)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        backbone = build_backbone(source, seed=cfg.seed)
    depth = len(backbone.blocks)
    base = replace(cfg, backbone=source, evaluate={"scales": (size,), "knn_sizes": (size,), "figure_images": 0,
                                                   "fusion": "knn", "knn_layer": None})
    out: dict[str, dict[str, Optional[float]]] = {}
    for name in readouts:
        rcfg = replace(base, out_dir=str(out_dir / name))
        if name == "attention":
            path = save_detector(out_dir / name / "detector.pt", build_detector(rcfg, backbone), rcfg.to_dict())
            m = run_evaluate(replace(rcfg, evaluate={"score": "map_max"}), model_path=path, dataset=dataset)
        else:
            layer = min(7, depth - 1) if name == "knn_block7" else depth - 1
            kcfg = replace(rcfg, evaluate={"knn_layer": layer})
            m = run_evaluate(kcfg, model_path=fit_knn_model(kcfg, dataset, force=True), dataset=dataset)
        out[name] = {k: (None if m.get(k) is None else 100.0 * m[k]) for k in METRICS}
    return out



def probe_before_after(cfg: Config, teacher: str | Path, work_dir: str | Path | None = None,
                       size: Optional[int] = None) -> list[dict[str, object]]:
    """:func:`probe_backbone` of the backbone pre-training started from (``cfg.backbone``) and of the
    exported EMA teacher ``teacher`` (``<run>/pretrain/backbone.pt``), on ``cfg.data``'s training images
    (kNN banks) and test split: one row per read-out and metric with ``before``, ``after`` and
    ``change`` (points, %). Evaluation folders go to ``work_dir`` (default: a temporary folder, removed
    afterwards, so a run folder holds only what pre-training wrote)."""
    import tempfile

    with tempfile.TemporaryDirectory(prefix="apmask-probe-") as tmp:
        root = Path(work_dir) if work_dir is not None else Path(tmp)
        before = probe_backbone(cfg, cfg.backbone, root / "before", size=size)
        after = probe_backbone(cfg, f"file:{teacher}", root / "after", size=size)
    rows: list[dict[str, object]] = []
    for name in READOUTS:
        for metric in METRICS:
            b, a = before[name][metric], after[name][metric]
            rows.append({"read-out": name, "metric": metric, "before": b, "after": a,
                         "change": None if a is None or b is None else a - b})
    return rows


__all__ = ["READOUTS", "METRICS", "probe_backbone", "probe_before_after"]
