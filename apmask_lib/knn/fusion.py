"""The kNN extension beside the paper's detector (NOT part of the paper): its glue and the fusion.

``cfg.evaluate.knn_layer`` set (default None = off) makes :func:`apmask_lib.evaluate.stage.run_evaluate`
build a :class:`KnnExtension`: a kNN patch scorer on intermediate patch features (memory bank,
nearest-neighbour search and the AnomalyDINO read-out live in :mod:`apmask_lib.knn.scoring`) runs beside the
detector, and, with ``cfg.evaluate.fusion="fused"``, a fusion of both:

  knn     cosine distance of each patch (block ``knn_layer`` tokens, from ``knn_backbone``:
          "init" = cfg.backbone before any training, or "finetuned") to the nearest patch of a
          memory bank of ALL training images; map = bilinear + Gaussian (``knn_sigma`` px at the
          resolution ``knn_sigma_at`` names); image score = mean of the top 1 % patch distances
          (AnomalyDINO). One bank per input size in ``knn_sizes``; maps and image scores are
          averaged over sizes, as the paper averages its test-time scales.
  fused   z_knn + z_det: each branch standardised (:func:`standardise`) with the mean/std of its
          values on NORMAL held-out training images (``knn_holdout`` of them, evenly spaced,
          :func:`calibration_indices`; their kNN distances are taken against a bank of the OTHER
          training images, the detector is applied as usual), the detector on the log-odds scale
          (:func:`logit` of the averaged probability map / of the image score
          ``cfg.evaluate.score``); pixel map = squash(z_knn_map + z_seg_map), image score =
          squash(z_knn_score + z_det_score) (:func:`squash`: monotone, into (0, 1) for the
          histogram). No test label or test statistic is used. Not the default (``fusion="knn"``):
          a weak detector adds noise (docs/knn.md; results/quality.md, results/quality_demo_nih.md).

:meth:`KnnExtension.predict` turns one test batch into {method: (image scores, maps)}; the
evaluation scores them like the paper method (``metrics["methods"]``).
"""
from __future__ import annotations

import math
import time
from typing import Any, Sequence

import numpy as np
import torch
from tqdm import tqdm

from ..config import Config
from ..data import AnomalyDataset
from ..data.types import cap_train
from .scoring import KnnScorer, MemoryBank, average_outputs, feature_bf16_of
from ..metrics import paper_image_score
from ..inference.multiscale import MultiScaleOutput, predict_multiscale



# --------------------------------------------------------------------------------------------
# fusion helpers: hold-out, running statistics, standardisation, log-odds, squash
# --------------------------------------------------------------------------------------------
def calibration_indices(n: int, fraction: float) -> np.ndarray:
    """``max(2, round(fraction * n))`` indices of range(n) (two, so that a standard deviation of
    image scores exists), evenly spaced (deterministic), leaving at least one image for the bank.
    The held-out images calibrate the fusion (never test images). Not fine-tuning's validation hold-out
    (:func:`apmask_lib.finetune.validation.holdout_indices`: a seeded random split)."""
    if n < 2:
        raise ValueError(f"fusion needs at least 2 training images (bank + held-out), got {n}")
    if not 0.0 < fraction < 1.0:
        raise ValueError(f"hold-out fraction must lie in (0, 1), got {fraction}")
    m = min(n - 1, max(2, int(round(fraction * n))))
    return np.unique(np.round(np.linspace(0, n - 1, m)).astype(np.int64))


class RunningStats:
    """Mean and standard deviation of a stream of values (float64 sums; arrays of any shape)."""

    def __init__(self):
        self.n, self.s, self.ss = 0, 0.0, 0.0

    def update(self, values) -> None:
        v = np.asarray(values, dtype=np.float64).ravel()
        self.n += v.size
        self.s += float(v.sum())
        self.ss += float(np.square(v).sum())

    @property
    def mean(self) -> float:
        return self.s / self.n if self.n else float("nan")

    @property
    def std(self) -> float:
        if self.n < 2:
            return float("nan")
        var = (self.ss - self.s * self.s / self.n) / (self.n - 1)
        return math.sqrt(max(var, 0.0))

    def as_dict(self) -> dict[str, float]:
        return {"mean": self.mean, "std": self.std, "n": self.n}


def standardise(x, stats: RunningStats | dict, eps: float = 1e-12):
    """(x - mean) / std with the statistics of NORMAL held-out training values."""
    st = stats.as_dict() if isinstance(stats, RunningStats) else stats
    if not (math.isfinite(st["mean"]) and math.isfinite(st["std"])):
        raise ValueError(f"fusion statistics are undefined ({st}); the hold-out needs at least 2 values")
    return (np.asarray(x, dtype=np.float64) - st["mean"]) / max(st["std"], eps)


def logit(p, eps: float = 1e-6):
    """log(p / (1 - p)) with p clipped to [eps, 1 - eps]: the detector's outputs on the scale its
    BCE loss works on (probabilities saturate, log-odds add)."""
    p = np.clip(np.asarray(p, dtype=np.float64), eps, 1.0 - eps)
    return np.log(p) - np.log1p(-p)


def squash(z):
    """A strictly increasing map of the real line onto (0, 1): 0.5 + 0.5 z / (1 + |z|). Keeps the
    order of fused z-scores (so AUROC / AU-PRO are unchanged) while fitting the [0, 1] histogram of
    the streaming pixel metrics; unlike the logistic it does not round large z to 1.0."""
    z = np.asarray(z, dtype=np.float64)
    return 0.5 + 0.5 * z / (1.0 + np.abs(z))


# --------------------------------------------------------------------------------------------
# the extension
# --------------------------------------------------------------------------------------------
def training_samples(cfg: Config, dataset: AnomalyDataset) -> list:
    """The images a memory bank is fitted on: ``dataset.train``, the first ``data.max_train`` of them."""
    train = cap_train(dataset.train, cfg.data.max_train)
    if not train:
        raise ValueError(f"{dataset.name}: the kNN extension needs training images, found none")
    return train


def bank_features(scorer: KnnScorer, dataset: AnomalyDataset, samples: Sequence, batch_size: int) -> list[torch.Tensor]:
    """(N, C) patch features (on the CPU) of each of ``samples`` at the scorer's size, in batches."""
    bs = max(1, int(batch_size))
    feats: list[torch.Tensor] = []
    for start in tqdm(range(0, len(samples), bs), desc=f"kNN bank features {scorer.size}px", unit="batch",
                      disable=None, leave=False):
        feats += [f.cpu() for f in scorer.features_list([dataset.image(s) for s in samples[start:start + bs]])]
    return feats


class KnnExtension:
    """The kNN branch (one memory bank per input size in ``knn_sizes``, fitted on the training
    images) and, for ``fusion="fused"``, the normal statistics of both branches on held-out training
    images. :meth:`predict` turns one test batch (images + the detector's :class:`MultiScaleOutput`)
    into {method: (image scores, maps)}."""

    def __init__(self, cfg: Config, dataset: AnomalyDataset, model: torch.nn.Module, sizes: Sequence[int],
                 device: torch.device):
        ecfg = cfg.evaluate
        if not ecfg.knn_sizes:
            raise ValueError("evaluate.knn_sizes is empty; give at least one input size, e.g. [448]")
        self.fusion, self.score = ecfg.fusion, ecfg.score
        self.methods = ("knn",) if ecfg.fusion == "knn" else ("knn", "fused")
        if ecfg.knn_backbone == "finetuned":
            backbone = model.backbone
        else:
            from ..weights import build_backbone

            backbone = build_backbone(cfg.backbone, seed=cfg.seed).to(device).eval()
        scorers: dict[int, KnnScorer] = {}
        for size in ecfg.knn_sizes:
            sc = KnnScorer(backbone, ecfg.knn_layer, size, k=ecfg.knn_k, sigma=ecfg.knn_sigma, sigma_at=ecfg.knn_sigma_at,
                           coreset=ecfg.knn_coreset, seed=cfg.seed, device=device, aspect=ecfg.knn_aspect,
                           feature_bf16=feature_bf16_of(ecfg.knn_features), search=ecfg.knn_search,
                           bank_max=ecfg.knn_bank_max, bank_dtype=ecfg.knn_bank_dtype)
            scorers.setdefault(sc.size, sc)  # sizes that snap to the same grid are used once
        self.scorers = list(scorers.values())
        train = training_samples(cfg, dataset)
        bs = max(1, int(ecfg.batch_size))
        held = [int(i) for i in calibration_indices(len(train), ecfg.knn_holdout)] if ecfg.fusion == "fused" else []
        held_set = set(held)
        timings = {"bank_features_s": 0.0, "fusion_stats_s": 0.0, "bank_fit_s": 0.0, "inference_s": 0.0}
        held_outputs: list[list] = []  # per size: KnnOutput per held-out batch
        for sc in self.scorers:  # one size at a time: only one size's training features in memory
            t0 = time.perf_counter()
            feats = bank_features(sc, dataset, train, bs)
            timings["bank_features_s"] += time.perf_counter() - t0
            if held:
                t0 = time.perf_counter()
                bank = MemoryBank(ecfg.knn_coreset, seed=cfg.seed, search=ecfg.knn_search, max_patches=ecfg.knn_bank_max,
                                  dtype=ecfg.knn_bank_dtype).fit(
                    [f for i, f in enumerate(feats) if i not in held_set], device=device)
                outs = []
                for start in range(0, len(held), bs):
                    idx = held[start:start + bs]
                    dists = sc.score_features([feats[i] for i in idx], bank)
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
            "knn_aspect": ecfg.knn_aspect, "knn_features": "bf16" if self.scorers[0].feature_bf16 else "fp32",
            "knn_search": ecfg.knn_search, "knn_bank_max": ecfg.knn_bank_max, "knn_bank_dtype": ecfg.knn_bank_dtype,
            "final_norm": self.scorers[0].final_norm, "top_fraction": self.scorers[0].top_fraction,
            "fusion": ecfg.fusion, "methods": list(self.methods),
            "bank_patches": [len(sc.bank) for sc in self.scorers], "bank_images": len(train),
            "holdout_images": len(held), "holdout_fraction": ecfg.knn_holdout if held else None,
            "fusion_stats": self.stats, "timings": timings,
        }

    def predict(self, images: Sequence[np.ndarray], res: MultiScaleOutput) -> dict[str, tuple[np.ndarray, list[np.ndarray]]]:
        """{method: (image scores (B,), list of (H_i, W_i) float32 maps)} for one test batch."""
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


__all__ = ["KnnExtension", "training_samples", "bank_features", "calibration_indices", "RunningStats", "standardise", "logit",
           "squash"]
