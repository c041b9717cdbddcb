"""Evaluation of a fine-tuned detector on the test split: metrics, scores, figures, features.

``run_evaluate(cfg)`` loads ``OUT_DIR/finetune/model.pt``, runs multi-scale inference
(:mod:`apmask_lib.multiscale`) over ``dataset.test`` (``cfg.data.max_test`` images per defect type
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
  threshold.json        the decision threshold for ``apmask predict`` (:mod:`apmask_lib.threshold`):
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
scorer on intermediate patch features (:mod:`apmask_lib.knn`, AnomalyDINO-style) runs beside the
detector, and, with ``cfg.evaluate.fusion="fused"``, a fusion of both:

  knn     cosine distance of each patch (block ``knn_layer`` tokens, from ``knn_backbone``:
          "init" = cfg.backbone before any training, or "finetuned") to the nearest patch of a
          memory bank of ALL training images; map = bilinear + Gaussian (``knn_sigma`` px at the
          resolution ``knn_sigma_at`` names); image
          score = mean of the top 1 % patch distances (AnomalyDINO). One bank per input size in
          ``knn_sizes``; maps and image scores are averaged over sizes, as the paper averages its
          test-time scales.
  fused   z_knn + z_det: each branch standardised with the mean/std of its values on NORMAL
          held-out training images (``knn_holdout`` of them, evenly spaced; their kNN distances are
          taken against a bank of the OTHER training images, the detector is applied as usual),
          the detector on the log-odds scale (logit of the averaged probability map / of the image
          score ``cfg.evaluate.score``); pixel map = squash(z_knn_map + z_seg_map), image score =
          squash(z_knn_score + z_det_score), squash(z) = 0.5 + 0.5 z / (1 + |z|) (monotone, into
          [0, 1] for the histogram). No test label or test statistic is used.
          Not the default (``fusion="knn"``): with the shortened CPU schedule's detector the fusion
          was within +-0.2 points of kNN alone on bottle, brick and gravel, but far below it on grass
          (pixel AUROC 82.9 vs 98.7) and NIH (71.8 vs 81.2): a weak detector adds noise
          (results/quality.md, results/quality_demo_nih.md).

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

import csv
import io
import logging
import math
import time
import warnings
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np
import torch
from tqdm import tqdm

from .config import Config
from .data import AnomalyDataset, Sample, dataset_from_config
from .metrics import PixelMetrics, f1_max, image_auroc
from .threshold import THRESHOLD_FILE, choose_threshold, confusion_at, normal_pixel_sample
from .multiscale import MultiScaleOutput, model_patch_size, predict_multiscale, scale_sizes
from .devices import resolve_device
from .machine import machine_info
from .files import atomic_write_bytes, atomic_write_text, write_json
from .rng import seed_everything
from .viz.evaluation import write_figures
from .viz.figure import RunLabel

log = logging.getLogger(__name__)



# --------------------------------------------------------------------------------------------
# small pure helpers
# --------------------------------------------------------------------------------------------
def cap_per_defect(samples: Sequence[Sample], max_per_defect: Optional[int]) -> list[Sample]:
    """The first ``max_per_defect`` samples of each defect type, in dataset order (None: all)."""
    if max_per_defect is None:
        return list(samples)
    seen: dict[str, int] = {}
    out = []
    for s in samples:
        if seen.get(s.defect, 0) < max_per_defect:
            seen[s.defect] = seen.get(s.defect, 0) + 1
            out.append(s)
    return out


def has_pixel_gt(sample: Sample) -> bool:
    """False for an anomalous image whose extent is unknown (no mask file, no boxes)."""
    if not getattr(sample, "has_pixel_gt", True):
        return False
    return sample.label == 0 or sample.mask_path is not None or bool(sample.boxes)


def pixel_ground_truth(dataset: AnomalyDataset, sample: Sample, shape: tuple[int, int]) -> Optional[np.ndarray]:
    """bool (H, W) ground truth, all-zero for normal images, None when the sample has none."""
    if not has_pixel_gt(sample):
        return None
    if sample.label == 0 and sample.mask_path is None and not sample.boxes:
        return np.zeros(shape, dtype=bool)
    return dataset.mask(sample, shape)


def pick_figure_samples(samples: Sequence[Sample], n: int) -> list[int]:
    """Indices of up to ``n`` samples for the localisation figure: round-robin over the anomalous
    defect types (those with pixel ground truth first), then normal images; deterministic."""
    by_defect: dict[str, list[int]] = {}
    for i, s in enumerate(samples):
        by_defect.setdefault(s.defect if s.label else "__normal__", []).append(i)
    normal = by_defect.pop("__normal__", [])
    for d in by_defect:
        by_defect[d].sort(key=lambda i: not has_pixel_gt(samples[i]))
    n_normal = min(len(normal), max(1, n // 4)) if n > 1 or not by_defect else 0
    picks: list[int] = []
    queues = [list(v) for _, v in sorted(by_defect.items())]
    while len(picks) < n - n_normal and any(queues):
        for q in queues:
            if q and len(picks) < n - n_normal:
                picks.append(q.pop(0))
    picks += normal[: n - len(picks)]
    return sorted(picks)


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


def finite_or_none(obj: Any) -> Any:
    """Replace NaN/inf floats by None (strict JSON), recursively."""
    if isinstance(obj, dict):
        return {k: finite_or_none(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [finite_or_none(v) for v in obj]
    if isinstance(obj, (float, np.floating)) and not math.isfinite(float(obj)):
        return None
    return obj


def write_csv(path: Path, rows: Sequence[dict[str, Any]], columns: Sequence[str]) -> None:
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=list(columns), extrasaction="ignore", lineterminator="\n")
    w.writeheader()
    for r in rows:
        w.writerow({k: (f"{v:.8g}" if isinstance(v, float) else v) for k, v in r.items()})
    atomic_write_text(path, buf.getvalue())


def save_npz(path: Path, **arrays: np.ndarray) -> None:
    buf = io.BytesIO()
    np.savez_compressed(buf, **arrays)
    atomic_write_bytes(path, buf.getvalue())


def save_npy(path: Path, array: np.ndarray) -> None:
    buf = io.BytesIO()
    np.save(buf, array)
    atomic_write_bytes(path, buf.getvalue())


# --------------------------------------------------------------------------------------------
# the extension: kNN branch and fusion (module docstring; not part of the paper)
# --------------------------------------------------------------------------------------------
def paper_image_score(res: MultiScaleOutput, score: str) -> np.ndarray:
    """The paper's continuous image score of a batch (``cfg.evaluate.score``)."""
    return res.det_mean if score == "det_mean" else res.map_max


def method_metrics(scores: Sequence[float], labels: np.ndarray, defects: Sequence[str], pix: PixelMetrics,
                   fpr_limit: float) -> dict[str, Any]:
    """Image AUROC (+ per defect type, F1-max) and the pixel summary of one method's outputs."""
    scores = np.asarray(scores, dtype=np.float64)
    out: dict[str, Any] = {"image_auroc": safe_auroc(scores, labels, "image AUROC"),
                           "per_defect_image_auroc": per_defect_auroc(scores, labels, defects)}
    if labels.any():
        out["f1_max"], out["f1_threshold"] = f1_max(scores, labels)
    out.update(pix.summary(fpr_limit) if pix.n_maps else {})
    out.setdefault("pixel_auroc", float("nan"))
    out.setdefault("au_pro", float("nan"))
    return out


class KnnExtension:
    """The kNN branch (one memory bank per input size in ``knn_sizes``, fitted on the training
    images) and, for ``fusion="fused"``, the normal statistics of both branches on held-out training
    images. :meth:`predict` turns one test batch (images + the detector's :class:`MultiScaleOutput`)
    into {method: (image scores, maps)}."""

    def __init__(self, cfg: Config, dataset: AnomalyDataset, model: torch.nn.Module, sizes: Sequence[int],
                 device: torch.device):
        from .knn import KnnScorer, MemoryBank, RunningStats, average_outputs, holdout_indices, logit

        ecfg = cfg.evaluate
        if not ecfg.knn_sizes:
            raise ValueError("evaluate.knn_sizes is empty; give at least one input size, e.g. [448]")
        self.fusion, self.score = ecfg.fusion, ecfg.score
        self.methods = ("knn",) if ecfg.fusion == "knn" else ("knn", "fused")
        if ecfg.knn_backbone == "finetuned":
            backbone = model.backbone
        else:
            from .weights import build_backbone

            backbone = build_backbone(cfg.backbone, seed=cfg.seed).to(device).eval()
        scorers: dict[int, KnnScorer] = {}
        for size in ecfg.knn_sizes:
            sc = KnnScorer(backbone, ecfg.knn_layer, size, k=ecfg.knn_k, sigma=ecfg.knn_sigma, sigma_at=ecfg.knn_sigma_at,
                           coreset=ecfg.knn_coreset, seed=cfg.seed, device=device)
            scorers.setdefault(sc.size, sc)  # sizes that snap to the same grid are used once
        self.scorers = list(scorers.values())
        train = list(dataset.train)
        if cfg.data.max_train is not None:
            train = train[: cfg.data.max_train]
        if not train:
            raise ValueError(f"{dataset.name}: the kNN extension needs training images, found none")
        bs = max(1, int(ecfg.batch_size))
        held = [int(i) for i in holdout_indices(len(train), ecfg.knn_holdout)] if ecfg.fusion == "fused" else []
        held_set = set(held)
        timings = {"bank_features_s": 0.0, "fusion_stats_s": 0.0, "bank_fit_s": 0.0, "inference_s": 0.0}
        held_outputs: list[list] = []  # per size: KnnOutput per held-out batch
        for sc in self.scorers:  # one size at a time: only one size's training features in memory
            t0 = time.perf_counter()
            feats: list[torch.Tensor] = []
            for start in tqdm(range(0, len(train), bs), desc=f"kNN bank features {sc.size}px", unit="batch",
                              disable=None, leave=False):
                feats += list(sc.features([dataset.image(s) for s in train[start:start + bs]]).cpu())
            timings["bank_features_s"] += time.perf_counter() - t0
            if held:
                t0 = time.perf_counter()
                bank = MemoryBank(ecfg.knn_coreset, seed=cfg.seed).fit(
                    [f for i, f in enumerate(feats) if i not in held_set], device=device)
                outs = []
                for start in range(0, len(held), bs):
                    idx = held[start:start + bs]
                    dists = bank.score(torch.stack([feats[i] for i in idx]).to(device), sc.k)
                    outs.append(sc.readout(dists, [dataset.image(train[i]).shape[:2] for i in idx]))
                held_outputs.append(outs)
                del bank
                timings["fusion_stats_s"] += time.perf_counter() - t0
            t0 = time.perf_counter()
            sc.fit(feats)
            del feats
            timings["bank_fit_s"] += time.perf_counter() - t0

        self.stats: dict[str, dict[str, float]] = {}
        if held:
            t0 = time.perf_counter()
            acc = {k: RunningStats() for k in ("knn_map", "seg_map", "knn_score", "det_score")}
            for j, start in enumerate(tqdm(range(0, len(held), bs), desc="fusion statistics", unit="batch",
                                           disable=None, leave=False)):
                images = [dataset.image(train[i]) for i in held[start:start + bs]]
                kout = average_outputs([outs[j] for outs in held_outputs])
                res = predict_multiscale(model, images, sizes, device)
                for km, sm in zip(kout.maps, res.maps):
                    acc["knn_map"].update(km)
                    acc["seg_map"].update(logit(sm))
                acc["knn_score"].update(kout.scores)
                acc["det_score"].update(logit(paper_image_score(res, self.score)))
            self.stats = {k: v.as_dict() for k, v in acc.items()}
            timings["fusion_stats_s"] += time.perf_counter() - t0
        del held_outputs
        self.info: dict[str, Any] = {
            "knn_layer": ecfg.knn_layer, "knn_backbone": ecfg.knn_backbone,
            "knn_backbone_source": cfg.backbone if ecfg.knn_backbone == "init" else "finetuned detector",
            "knn_sizes": [sc.size for sc in self.scorers], "knn_grids": [list(sc.grid) for sc in self.scorers],
            "knn_k": ecfg.knn_k, "knn_coreset": ecfg.knn_coreset, "knn_sigma": ecfg.knn_sigma, "knn_sigma_at": ecfg.knn_sigma_at,
            "final_norm": self.scorers[0].final_norm, "top_fraction": self.scorers[0].top_fraction,
            "fusion": ecfg.fusion, "methods": list(self.methods),
            "bank_patches": [len(sc.bank) for sc in self.scorers], "bank_images": len(train),
            "holdout_images": len(held), "holdout_fraction": ecfg.knn_holdout if held else None,
            "fusion_stats": self.stats, "timings": timings,
        }

    def predict(self, images: Sequence[np.ndarray], res: MultiScaleOutput) -> dict[str, tuple[np.ndarray, list[np.ndarray]]]:
        """{method: (image scores (B,), list of (H_i, W_i) float32 maps)} for one test batch."""
        from .knn import average_outputs, logit, squash, standardise

        t0 = time.perf_counter()
        kout = average_outputs([sc.predict(images) for sc in self.scorers])
        out = {"knn": (kout.scores, [m.astype(np.float32) for m in kout.maps])}
        if self.fusion == "fused":
            st = self.stats
            z_img = standardise(kout.scores, st["knn_score"]) + standardise(logit(paper_image_score(res, self.score)),
                                                                            st["det_score"])
            maps = [squash(standardise(km, st["knn_map"]) + standardise(logit(sm), st["seg_map"])).astype(np.float32)
                    for km, sm in zip(kout.maps, res.maps)]
            out["fused"] = (squash(z_img), maps)
        self.info["timings"]["inference_s"] += time.perf_counter() - t0
        return out


# --------------------------------------------------------------------------------------------
# the evaluation
# --------------------------------------------------------------------------------------------
def run_evaluate(cfg: Config, model_path: str | Path | None = None,
                 dataset: Optional[AnomalyDataset] = None, model: Optional[torch.nn.Module] = None) -> dict[str, Any]:
    """Evaluate the detector at ``model_path`` (default ``cfg.out_dir/finetune/model.pt``) on the test
    split of ``dataset`` (default: built from ``cfg.data``); returns the metrics dict (also written).
    ``model``: an in-memory detector to use instead of loading one (notebooks, tests)."""
    ecfg = cfg.evaluate
    t_start = time.perf_counter()
    out_dir = Path(cfg.out_dir) / "evaluate"
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
        from .weights import load_detector

        model = load_detector(model_path, map_location="cpu")
    else:
        from .weights import check_finite_weights

        model_path = Path("<in-memory model>")
        check_finite_weights(model, model_path)
    model = model.to(device).eval()
    t_load = time.perf_counter() - t0
    sizes = scale_sizes(ecfg.scales, model_patch_size(model))
    if tuple(sizes) != tuple(ecfg.scales):
        log.info("test-time scales %s snapped to the patch grid: %s", tuple(ecfg.scales), sizes)

    pix = PixelMetrics(bins=ecfg.pixel_bins, value_range=(0.0, 1.0))
    ext = None
    if ecfg.knn_layer is not None:  # EXTENSION (module docstring)
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
    metrics: dict[str, Any] = {
        "image_score": ecfg.score,
        "image_auroc": safe_auroc(score, labels, "image AUROC"),
        "image_auroc_det_mean": safe_auroc([r["score_det_mean"] for r in rows], labels, "image AUROC (det_mean)"),
        "image_auroc_map_max": safe_auroc([r["score_map_max"] for r in rows], labels, "image AUROC (map_max)"),
        "per_defect_image_auroc": per_defect_auroc(score, labels, defects),
        "vote_accuracy": float(np.mean(np.array([r["vote"] for r in rows]) == labels)),
    }
    if labels.any():
        metrics["f1_max"], metrics["f1_threshold"] = f1_max(score, labels)
    else:
        metrics["f1_max"] = metrics["f1_threshold"] = float("nan")
    pixel_summary = pix.summary(ecfg.pro_fpr_limit) if pix.n_maps else {}
    metrics.update(pixel_summary)
    metrics.setdefault("pixel_auroc", float("nan"))
    metrics.setdefault("au_pro", float("nan"))
    n_anom_gt = sum(1 for r in rows if r["label"] == 1 and r["pixel_gt"])
    metrics["pixel_metrics_scope"] = (
        "none: no anomalous test image has pixel ground truth (image-level metrics only)" if not n_anom_gt else
        f"{n_anom_gt} of {int(labels.sum())} anomalous test images (those with pixel ground truth) + "
        f"{int((labels == 0).sum())} normal images")
    if not n_anom_gt:
        metrics["pixel_auroc"] = metrics["au_pro"] = float("nan")
    t_metrics = time.perf_counter() - t0
    try:
        metrics["threshold"] = write_threshold(cfg, ds, model, sizes, device, out_dir, score, labels, normal_pixels,
                                               metrics.get("pixel_f1_threshold"), model_path)
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
    write_json(out_dir / "config.json", cfg.to_dict())

    t0 = time.perf_counter()
    figures = write_figures(out_dir, fig_items, rows, labels, pix, feats_arr, defects, cfg.seed,
                            run=RunLabel.from_config(cfg), size=sizes[0], ext_items=ext_fig if ext is not None else None)
    t_fig = time.perf_counter() - t0

    metrics.update({
        "n_images": len(rows), "n_normal": int((labels == 0).sum()), "n_anomalous": int(labels.sum()),
        "n_pixel_gt_images": pix.n_maps, "n_excluded_from_pixel_metrics": n_excluded,
        "au_pro_fpr_limit": ecfg.pro_fpr_limit, "scales": list(ecfg.scales), "sizes": list(sizes),
        "dataset": cfg.data.dataset, "category": cfg.data.category, "dataset_name": ds.name,
        "max_test": cfg.data.max_test, "seed": cfg.seed, "backbone": cfg.backbone,
        "finetune_init": cfg.finetune.init, "model_path": str(model_path), "machine": machine_info(device),
        "figures": figures,
        "timings": {"total_s": time.perf_counter() - t_start, "model_load_s": t_load, "inference_s": t_inf,
                    "inference_per_image_s": t_inf / len(rows), "metrics_s": t_metrics, "figures_s": t_fig},
    })
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
    write_json(out_dir.parent / "evaluate_timings.json", varying)
    log.info("evaluate %s: image AUROC %s, pixel AUROC %s, AU-PRO %s", ds.name, metrics["image_auroc"],
             metrics["pixel_auroc"], metrics["au_pro"])
    return metrics


def score_split(model: torch.nn.Module, ds: AnomalyDataset, samples: Sequence[Sample], sizes: Sequence[int],
                device: torch.device, batch_size: int, score: str, desc: str) -> tuple[np.ndarray, list[np.ndarray]]:
    """Image scores (``score``: det_mean | map_max) of ``samples`` and a sample of each map's values
    (:func:`~apmask_lib.threshold.normal_pixel_sample`), with a progress bar."""
    scores: list[float] = []
    pixels: list[np.ndarray] = []
    bs = max(1, int(batch_size))
    for start in tqdm(range(0, len(samples), bs), desc=desc, unit="batch", disable=None, leave=False):
        res = predict_multiscale(model, [ds.image(s) for s in samples[start:start + bs]], sizes, device)
        scores += paper_image_score(res, score).tolist()
        pixels += [normal_pixel_sample(m) for m in res.maps]
    return np.asarray(scores, dtype=np.float64), pixels


def write_threshold(cfg: Config, ds: AnomalyDataset, model: torch.nn.Module, sizes: Sequence[int],
                    device: torch.device, out_dir: Path, test_scores: np.ndarray, test_labels: np.ndarray,
                    test_normal_pixels: list[np.ndarray], test_pixel_f1_threshold: Optional[float],
                    model_path: Path) -> dict[str, Any]:
    """Choose the decision threshold (:mod:`apmask_lib.threshold`) on the validation images
    (``ds.val``; ``evaluate.threshold_on`` auto/val) or on the test set (auto without validation
    images, or test), write ``out_dir/threshold.json`` and return it with precision / recall / F1 of
    the TEST set at that threshold."""
    ecfg = cfg.evaluate
    val = list(getattr(ds, "val", []))
    if ecfg.threshold_on == "val" or (ecfg.threshold_on == "auto" and val):
        if not val:
            raise ValueError(f"evaluate.threshold_on=val but {ds.name} has no validation images "
                             "(data.dataset=folder holds out data.normal_val_split of the normal images)")
        scores, pixels = score_split(model, ds, val, sizes, device, ecfg.batch_size, ecfg.score,
                                     f"threshold on validation {ds.name}")
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
        log.warning("decision threshold chosen on the test set of %s (no validation images)", ds.name)
    rec.update(dataset_name=ds.name, model_path=str(model_path), sizes=list(sizes))
    write_json(out_dir / THRESHOLD_FILE, finite_or_none(rec))
    log.info("threshold %.6g on %s (%s; %s) -> %s", rec["image_threshold"], ecfg.score, rec["image_method"],
             rec["chosen_on"], out_dir / THRESHOLD_FILE)
    return {**rec, "test_at_threshold": confusion_at(test_scores, test_labels, rec["image_threshold"])}


__all__ = ["run_evaluate", "score_split", "write_threshold", "KnnExtension", "method_metrics", "paper_image_score",
           "cap_per_defect", "has_pixel_gt", "pixel_ground_truth", "pick_figure_samples",
           "per_defect_auroc", "safe_auroc", "finite_or_none"]
