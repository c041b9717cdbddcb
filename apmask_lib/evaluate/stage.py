"""Evaluation of a fine-tuned detector on the test split: metrics, scores, figures, features.

``run_evaluate(cfg)`` loads ``OUT_DIR/finetune/model.pt``, runs multi-scale inference
(:mod:`apmask_lib.inference.multiscale`) over ``dataset.test`` (``cfg.data.max_test`` images per defect type
for micro runs) and writes to ``OUT_DIR/evaluate/`` (all atomically):

  metrics.json          image AUROC (``cfg.evaluate.score``; both det_mean and map_max are reported),
                        pixel AUROC, AU-PRO (FPR <= cfg.evaluate.pro_fpr_limit), image and pixel F1-max
                        with thresholds, per-defect-type image AUROC, counts, scales, seed,
                        backbone. Wall-clock timings and the machine go to
                        ``OUT_DIR/evaluate_timings.json`` (beside the folder: they differ between runs
                        with equal results) and are in the returned dict.
  scores.csv            one row per test image: path, defect, label, score, score_det_mean,
                        score_map_max, vote, pixel_gt, prob_<size> for each scale.
  features.npz          [CLS] features at the first scale + labels, defect types, paths (Fig. 5 input).
  config.json           the configuration used (tables read run metadata from it).
  threshold.json        the decision threshold for ``apmask predict`` (:mod:`apmask_lib.evaluate.threshold`):
                        chosen on the validation images when the data set has them (folder data sets),
                        else on the test set (``chosen_on`` says which; metrics.json ``threshold`` also
                        holds precision/recall/F1 on the test set at it).
  fig4a_localization.png, roc.png, fig5_tsne.png
  maps/<defect>/<stem>.npy   averaged maps (float16) when cfg.evaluate.save_maps.

Pixel ground truth: MVTec masks; NIH boxes. Normal images have all-zero ground truth. Anomalous
images without pixel ground truth (``Sample.has_pixel_gt`` False: NIH abnormal images without a box)
are EXCLUDED from the pixel metrics (AUROC, AU-PRO, pixel F1) and kept for the image metrics; their
number is reported as ``n_excluded_from_pixel_metrics`` and ``pixel_metrics_scope`` says in words
which images the pixel metrics cover (none when no anomalous image has a mask: image metrics only).

EXTENSION (not in the paper; ``cfg.evaluate.knn_layer`` set, default None = off): a kNN patch
scorer beside the detector and, with ``cfg.evaluate.fusion="fused"``, a fusion of both
(:mod:`apmask_lib.knn.fusion`).

With the extension on, every top-level key of metrics.json still describes the PAPER method
(tables read them unchanged); ``metrics["methods"]`` holds {"paper", "knn"[, "fused"]} -> image
AUROC, pixel AUROC, AU-PRO, F1s, and ``metrics["extension"]`` the configuration, the fusion
statistics and timings. scores.csv gains ``score_knn`` (and ``score_fused``) columns and the
figure ``fig4a_localization_<method>.png`` is drawn for each extension method. With
``knn_layer=None`` nothing of this runs and the outputs are exactly the paper method's.

Pixel metrics stream through a histogram (``cfg.evaluate.pixel_bins``, default 2^20 bins over the
probability range [0, 1], see :mod:`apmask_lib.metrics`), so memory does not grow with the test set.
"""
from __future__ import annotations

import logging
import time
import warnings
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np
import torch
from tqdm import tqdm

from ..config import Config
from ..data import AnomalyDataset, Sample, dataset_from_config
from ..data.ground_truth import cap_per_defect, pick_figure_samples, pixel_ground_truth
from ..knn.fusion import KnnExtension
from ..metrics import (PixelMetrics, finite_or_none, method_metrics, paper_image_score,
                      safe_auroc)
from ..knn.model import evaluated_config, load_model, model_kind, run_sizes
from ..inference.multiscale import predict_multiscale
from ..core.outputs import save_npy, save_npz, write_csv
from .threshold import EVALUATE_DIRS, normal_pixel_sample, write_threshold
from ..core.devices import resolve_device
from ..core.files import write_json
from ..core.machine import machine_info
from ..core.rng import seed_everything
from ..viz.evaluation import KNN_MODEL_FEATURES, write_figures
from ..viz.figure import RunLabel
from ..viz.tsne import CLS_FEATURES

log = logging.getLogger(__name__)



# --------------------------------------------------------------------------------------------
# the evaluation
# --------------------------------------------------------------------------------------------
def run_evaluate(cfg: Config, model_path: str | Path | None = None,
                 dataset: Optional[AnomalyDataset] = None, model: Optional[torch.nn.Module] = None) -> dict[str, Any]:
    """Evaluate the detector at ``model_path`` (default ``cfg.out_dir/finetune/model.pt``; a kNN model
    file of ``apmask fit --method knn`` is evaluated the same way, :mod:`apmask_lib.knn.model`, into
    ``OUT_DIR/evaluate_knn/``) on the test split of ``dataset`` (default: built from ``cfg.data``);
    returns the metrics dict (also written). ``model``: an in-memory model to use instead of loading
    one (notebooks, tests)."""
    ecfg = cfg.evaluate
    t_start = time.perf_counter()
    model_path = Path(model_path) if model_path is not None else Path(cfg.out_dir) / "finetune" / "model.pt"
    if model is None and not model_path.is_file():
        raise FileNotFoundError(f"detector checkpoint not found: {model_path}. Run `apmask finetune` for this "
                                "out_dir first, or pass the checkpoint with --model/model_path.")
    seed_everything(cfg.seed)
    device = resolve_device(cfg.device)
    ds = dataset if dataset is not None else dataset_from_config(cfg.data)
    samples = cap_per_defect(ds.test, cfg.data.max_test)
    if not samples:
        raise ValueError(f"{ds.name}: the test split is empty")

    t0 = time.perf_counter()
    if model is None:
        model = load_model(model_path, map_location="cpu")   # the fine-tuned detector or a kNN model
    else:
        from ..weights import check_finite_weights

        model_path = Path("<in-memory model>")
        check_finite_weights(model, model_path)
    model = model.to(device).eval()
    t_load = time.perf_counter() - t0
    kind = model_kind(model)
    out_dir = Path(cfg.out_dir) / EVALUATE_DIRS[kind]
    sizes = run_sizes(model, ecfg.scales)
    if kind == "detector" and tuple(sizes) != tuple(ecfg.scales):
        log.info("test-time scales %s snapped to the patch grid: %s", tuple(ecfg.scales), sizes)

    pix = PixelMetrics(bins=ecfg.pixel_bins, value_range=(0.0, 1.0))
    ext = None
    if ecfg.knn_layer is not None and kind == "knn":
        log.info("evaluating the kNN model itself: the kNN extension beside it (evaluate.knn_layer) is not run")
    elif ecfg.knn_layer is not None:  # EXTENSION (module docstring)
        ext = KnnExtension(cfg, ds, model, sizes, device)
        # kNN maps are cosine distances in [0, 2]; fused maps are squashed into (0, 1)
        ext_pix = {m: PixelMetrics(bins=ecfg.pixel_bins, value_range=(0.0, 2.0) if m == "knn" else (0.0, 1.0))
                   for m in ext.methods}
        ext_fig: dict[str, list] = {m: [] for m in ext.methods}
    fig_idx = set(pick_figure_samples(samples, ecfg.figure_images))
    fig_items: list[tuple[np.ndarray, np.ndarray, Optional[np.ndarray], str]] = []
    rows: list[dict[str, Any]] = []
    feats: list[np.ndarray] = []
    n_excluded = 0
    normal_pixels: list[np.ndarray] = []   # sampled map values of normal test images (pixel threshold)
    t_inf = 0.0
    bs = max(1, int(ecfg.batch_size))
    bar = tqdm(total=len(samples), desc=f"evaluate {ds.name}", unit="img", disable=None, leave=False)
    for start in range(0, len(samples), bs):
        batch = samples[start:start + bs]
        images = [ds.image(s) for s in batch]
        t0 = time.perf_counter()
        res = predict_multiscale(model, images, sizes, device)
        t_inf += time.perf_counter() - t0
        feats.append(res.cls)
        ext_out = ext.predict(images, res) if ext is not None else {}
        vote, dmean, mmax = res.vote, res.det_mean, res.map_max
        for k, (s, im, amap) in enumerate(zip(batch, images, res.maps)):
            gt = pixel_ground_truth(ds, s, im.shape[:2])
            if s.label == 0:
                normal_pixels.append(normal_pixel_sample(amap))
            if gt is None:
                n_excluded += 1
            else:
                pix.update(amap, gt)
            row = {"path": str(s.path), "defect": s.defect, "label": int(s.label),
                   "score_det_mean": float(dmean[k]), "score_map_max": float(mmax[k]),
                   "vote": int(vote[k]), "pixel_gt": int(gt is not None)}
            row["score"] = row[f"score_{ecfg.score}"]
            row.update({f"prob_{sz}": float(res.probs[k, j]) for j, sz in enumerate(sizes)})
            for m, (m_scores, m_maps) in ext_out.items():
                row[f"score_{m}"] = float(m_scores[k])
                if gt is not None:
                    ext_pix[m].update(m_maps[k], gt)
                if start + k in fig_idx:
                    ext_fig[m].append((im, m_maps[k], gt, f"{s.defect}/{Path(s.path).stem}"))
            rows.append(row)
            if start + k in fig_idx:
                fig_items.append((im, amap.astype(np.float32), gt, f"{s.defect}/{Path(s.path).stem}"))
            if ecfg.save_maps:
                save_npy(out_dir / "maps" / s.defect / f"{Path(s.path).stem}.npy", amap.astype(np.float16))
        del images, res, ext_out
        bar.update(len(batch))
    bar.close()

    t0 = time.perf_counter()
    labels = np.array([r["label"] for r in rows])
    defects = [r["defect"] for r in rows]
    score = np.array([r["score"] for r in rows])
    paper = method_metrics(score, labels, defects, pix, ecfg.pro_fpr_limit)   # the paper method, computed once
    metrics: dict[str, Any] = {
        "image_score": ecfg.score,
        "image_auroc_det_mean": safe_auroc([r["score_det_mean"] for r in rows], labels, "image AUROC (det_mean)"),
        "image_auroc_map_max": safe_auroc([r["score_map_max"] for r in rows], labels, "image AUROC (map_max)"),
        "vote_accuracy": float(np.mean(np.array([r["vote"] for r in rows]) == labels)),
        "f1_max": float("nan"), "f1_threshold": float("nan"),   # stay NaN without anomalous images
        **paper,
    }
    n_anom_gt = sum(1 for r in rows if r["label"] == 1 and r["pixel_gt"])
    metrics["pixel_metrics_scope"] = (
        "none: no anomalous test image has pixel ground truth (image-level metrics only)" if not n_anom_gt else
        f"{n_anom_gt} of {int(labels.sum())} anomalous test images (those with pixel ground truth) + "
        f"{int((labels == 0).sum())} normal images")
    if not n_anom_gt:
        metrics["pixel_auroc"] = metrics["au_pro"] = float("nan")
    t_metrics = time.perf_counter() - t0
    try:
        metrics["threshold"] = write_threshold(
            ecfg, ds.name, list(getattr(ds, "val", [])),
            lambda val: score_split(model, ds, val, sizes, device, ecfg.batch_size, ecfg.score,
                                    f"threshold on validation {ds.name}"),
            out_dir, score, labels, normal_pixels, metrics.get("pixel_f1_threshold"),
            {"dataset_name": ds.name, "model_path": str(model_path), "sizes": list(sizes)})
    except ValueError as e:  # e.g. a test set without normal images and no validation images
        warnings.warn(f"no decision threshold written: {e}", stacklevel=2)
        metrics["threshold"] = None

    out_dir.mkdir(parents=True, exist_ok=True)
    feats_arr = np.concatenate(feats).astype(np.float32)
    save_npz(out_dir / "features.npz", cls=feats_arr, labels=labels, defects=np.array(defects),
             paths=np.array([r["path"] for r in rows]), size=np.array(sizes[0]))
    columns = ["path", "defect", "label", "score", "score_det_mean", "score_map_max", "vote", "pixel_gt"] + \
              [f"prob_{sz}" for sz in sizes] + ([f"score_{m}" for m in ext.methods] if ext is not None else [])
    write_csv(out_dir / "scores.csv", rows, columns)
    write_json(out_dir / "config.json", (evaluated_config(cfg, model) if kind == "knn" else cfg).to_dict())

    t0 = time.perf_counter()
    figures = write_figures(out_dir, fig_items, rows, labels, pix, feats_arr, defects, cfg.seed,
                            run=RunLabel.from_config(cfg), size=sizes[0], ext_items=ext_fig if ext is not None else None,
                            method="knn_model" if kind == "knn" else "paper",
                            features_desc=KNN_MODEL_FEATURES if kind == "knn" else CLS_FEATURES)
    t_fig = time.perf_counter() - t0

    metrics.update({
        "n_images": len(rows), "n_normal": int((labels == 0).sum()), "n_anomalous": int(labels.sum()),
        "n_pixel_gt_images": pix.n_maps, "n_excluded_from_pixel_metrics": n_excluded,
        "au_pro_fpr_limit": ecfg.pro_fpr_limit,
        "scales": list(sizes) if kind == "knn" else list(ecfg.scales), "sizes": list(sizes),
        "dataset": cfg.data.dataset, "category": cfg.data.category, "dataset_name": ds.name,
        "max_test": cfg.data.max_test, "seed": cfg.seed, "backbone": cfg.backbone,
        "finetune_init": cfg.finetune.init, "model_path": str(model_path), "machine": machine_info(device),
        "figures": figures,
        "timings": {"total_s": time.perf_counter() - t_start, "model_load_s": t_load, "inference_s": t_inf,
                    "inference_per_image_s": t_inf / len(rows), "metrics_s": t_metrics, "figures_s": t_fig},
    })
    if kind == "knn":
        metrics["model_kind"] = "knn"
        metrics["knn_model"] = model.settings()
    if ext is not None:
        keys = ("image_auroc", "per_defect_image_auroc", "f1_max", "f1_threshold", "pixel_auroc", "au_pro",
                "pixel_f1_max", "pixel_f1_threshold", "pixel_metric_method", "pixel_auroc_bin_error_bound")
        metrics["methods"] = {"paper": {k: metrics[k] for k in keys if k in metrics}}
        for m in ext.methods:
            metrics["methods"][m] = method_metrics([r[f"score_{m}"] for r in rows], labels, defects, ext_pix[m],
                                                   ecfg.pro_fpr_limit)
        metrics["extension"] = ext.info
        metrics["timings"]["total_s"] = time.perf_counter() - t_start
        for m in ext.methods:
            log.info("evaluate %s [extension %s]: image AUROC %s, pixel AUROC %s, AU-PRO %s", ds.name, m,
                     metrics["methods"][m]["image_auroc"], metrics["methods"][m]["pixel_auroc"],
                     metrics["methods"][m]["au_pro"])
    metrics = finite_or_none(metrics)
    # wall-clock times and the machine differ between runs with equal results: they go beside the evaluate
    # folder (a DVC output), so a reproduced pipeline gives the same folder; the returned dict keeps them
    varying = {"timings": metrics["timings"], "machine": metrics["machine"]}
    stable = {k: v for k, v in metrics.items() if k not in varying}
    if "extension" in metrics and "timings" in metrics["extension"]:
        varying["extension_timings"] = metrics["extension"]["timings"]
        stable["extension"] = {k: v for k, v in metrics["extension"].items() if k != "timings"}
    write_json(out_dir / "metrics.json", stable)
    write_json(out_dir.parent / f"{out_dir.name}_timings.json", varying)
    log.info("evaluate %s: image AUROC %s, pixel AUROC %s, AU-PRO %s", ds.name, metrics["image_auroc"],
             metrics["pixel_auroc"], metrics["au_pro"])
    return metrics


def score_split(model: torch.nn.Module, ds: AnomalyDataset, samples: Sequence[Sample], sizes: Sequence[int],
                device: torch.device, batch_size: int, score: str, desc: str) -> tuple[np.ndarray, list[np.ndarray]]:
    """Image scores (``score``: det_mean | map_max) of ``samples`` and a sample of each map's values
    (:func:`~apmask_lib.evaluate.threshold.normal_pixel_sample`), with a progress bar."""
    scores: list[float] = []
    pixels: list[np.ndarray] = []
    bs = max(1, int(batch_size))
    for start in tqdm(range(0, len(samples), bs), desc=desc, unit="batch", disable=None, leave=False):
        res = predict_multiscale(model, [ds.image(s) for s in samples[start:start + bs]], sizes, device)
        scores += paper_image_score(res, score).tolist()
        pixels += [normal_pixel_sample(m) for m in res.maps]
    return np.asarray(scores, dtype=np.float64), pixels


__all__ = ["run_evaluate", "score_split"]
