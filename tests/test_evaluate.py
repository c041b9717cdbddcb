"""Evaluation: helpers, metrics written from known maps, NIH-style exclusions, and one real end-to-end run."""
from __future__ import annotations

import csv
import json
import warnings
from pathlib import Path

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from apmask_lib.config import Config
from apmask_lib.data import AnomalyDataset, Sample, build_dataset
from helpers import ConstantMap, micro_cfg

from apmask_lib.data.ground_truth import cap_per_defect, has_pixel_gt, pick_figure_samples, pixel_ground_truth
from apmask_lib.evaluate.stage import run_evaluate
from apmask_lib.metrics import finite_or_none, per_defect_auroc

RESULT_FILES = ("metrics.json", "scores.csv", "features.npz", "config.json", "fig4a_localization.png", "roc.png",
                "fig5_tsne.png")


def read_scores(path: Path) -> list[dict[str, str]]:
    with path.open() as f:
        return list(csv.DictReader(f))


# --- helpers ---------------------------------------------------------------------------------
def test_cap_per_defect_and_pixel_gt():
    s = [Sample(Path(f"{d}{i}.png"), int(d != "good"), d, mask_path=None if d == "good" else Path("m.png"))
         for d in ("good", "crack") for i in range(3)]
    assert [x.path.name for x in cap_per_defect(s, 2)] == ["good0.png", "good1.png", "crack0.png", "crack1.png"]
    assert cap_per_defect(s, None) == s
    nih_abnormal = Sample(Path("x.png"), 1, "abnormal", has_pixel_gt=False)
    nih_boxed = Sample(Path("y.png"), 1, "abnormal", boxes=((2.0, 1.0, 3.0, 2.0),))
    normal = Sample(Path("z.png"), 0, "good")
    assert not has_pixel_gt(nih_abnormal) and has_pixel_gt(nih_boxed) and has_pixel_gt(normal)
    assert not has_pixel_gt(Sample(Path("w.png"), 1, "abnormal"))  # anomalous without mask or boxes
    ds = AnomalyDataset("t", [], [])
    assert pixel_ground_truth(ds, nih_abnormal, (8, 8)) is None
    assert not pixel_ground_truth(ds, normal, (8, 8)).any()
    assert pixel_ground_truth(ds, nih_boxed, (8, 8)).sum() == 6


def test_pick_figure_samples_covers_defect_types_and_normals():
    s = [Sample(Path(f"{d}{i}"), int(d != "good"), d) for d in ("good", "a", "b", "c") for i in range(4)]
    picks = pick_figure_samples(s, 8)
    kinds = [s[i].defect for i in picks]
    assert len(picks) == 8 and kinds.count("good") == 2
    assert {"a", "b", "c"} <= set(kinds)
    assert pick_figure_samples(s, 8) == picks  # deterministic


def test_per_defect_auroc_and_json_safety():
    scores = [0.1, 0.2, 0.9, 0.8, 0.15]
    labels = [0, 0, 1, 1, 1]
    defects = ["good", "good", "a", "a", "b"]
    assert per_defect_auroc(scores, labels, defects) == {"a": 1.0, "b": 0.5}
    assert finite_or_none({"x": float("nan"), "y": [1.0, float("inf")]}) == {"x": None, "y": [1.0, None]}


# --- run_evaluate with a model whose maps we know ---------------------------------------------
@pytest.mark.slow
def test_known_maps_give_known_metrics(tmp_path, mvtec_root):
    """Constant maps: every pixel tied -> pixel AUROC 0.5 and AU-PRO(0.3) = 0.15 exactly; the image
    metrics must equal those recomputed from scores.csv. An NIH-style anomalous image without pixel
    ground truth is excluded from the pixel metrics only."""
    cfg = micro_cfg(tmp_path, mvtec_root, figure_images=4)
    ds = build_dataset("mvtec", mvtec_root, "bottle")
    extra = Sample(ds.test[-1].path, 1, "no_pixel_gt", has_pixel_gt=False)
    ds = AnomalyDataset(ds.name, ds.train, ds.test + [extra])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        m = run_evaluate(cfg, dataset=ds, model=ConstantMap())
    out = Path(cfg.out_dir) / "evaluate"
    for f in RESULT_FILES:
        assert (out / f).is_file(), f
    assert m["pixel_auroc"] == pytest.approx(0.5, abs=1e-12)
    assert m["au_pro"] == pytest.approx(0.15, abs=1e-12)
    assert m["n_images"] == 9 and m["n_excluded_from_pixel_metrics"] == 1 and m["n_pixel_gt_images"] == 8
    rows = read_scores(out / "scores.csv")
    assert len(rows) == 9 and rows[-1]["pixel_gt"] == "0"
    labels = np.array([int(r["label"]) for r in rows])
    det = np.array([float(r["score_det_mean"]) for r in rows])
    probs = np.array([[float(r["prob_224"]), float(r["prob_320"])] for r in rows])
    np.testing.assert_allclose(det, probs.mean(1), rtol=1e-6)
    assert m["image_auroc"] == pytest.approx(roc_auc_score(labels, det), abs=1e-6)
    assert m["image_auroc_map_max"] == pytest.approx(0.5)  # all maps are 0.5 everywhere
    assert set(m["per_defect_image_auroc"]) == {"broken_large", "broken_small", "contamination", "no_pixel_gt"}
    assert json.loads((out / "metrics.json").read_text())["au_pro"] == pytest.approx(0.15)


def test_missing_model_is_a_clear_error(tmp_path, mvtec_root):
    with pytest.raises(FileNotFoundError, match="apmask finetune"):
        run_evaluate(micro_cfg(tmp_path, mvtec_root))


# --- end to end with the real detector -------------------------------------------------------
def make_detector(cfg: Config) -> Path:
    """A briefly fine-tuned detector (the real fine-tuning stage, two steps, tiny random backbone)."""
    from apmask_lib.finetune.stage import run_finetune

    run_finetune(cfg, max_steps=2, progress=False)
    path = Path(cfg.out_dir) / "finetune" / "model.pt"
    assert path.is_file()
    return path


@pytest.mark.slow
def test_end_to_end_on_real_bottle_images(tmp_path, mvtec_root):
    cfg = micro_cfg(tmp_path, mvtec_root)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        make_detector(cfg)
        m = run_evaluate(cfg)
    out = Path(cfg.out_dir) / "evaluate"
    for f in RESULT_FILES:
        assert (out / f).is_file() and (out / f).stat().st_size > 0, f
    assert m["n_images"] == 8 and m["sizes"] == [224, 320] and m["scales"] == [224, 320]
    for k in ("image_auroc", "pixel_auroc", "au_pro", "image_auroc_map_max", "f1_max", "pixel_f1_max"):
        assert 0.0 <= m[k] <= 1.0, k
    assert m["pixel_auroc_bin_error_bound"] < 1e-3
    assert {"total_s", "inference_s"} <= set(m["timings"]) and m["seed"] == 0
    assert m["backbone"] == "random:vit_tiny16" and m["machine"]["device"] == "cpu"
    assert m["finetune_init"] == "random:vit_tiny16"
    on_disk = json.loads((out / "metrics.json").read_text())   # equal results give equal files: no wall clock
    assert "timings" not in on_disk and "machine" not in on_disk and on_disk["image_auroc"] == m["image_auroc"]
    assert json.loads((out.parent / "evaluate_timings.json").read_text())["timings"]["total_s"] > 0
    feats = np.load(out / "features.npz")
    assert feats["cls"].shape == (8, 96) and feats["labels"].sum() == 6
    rows = read_scores(out / "scores.csv")
    assert [r["defect"] for r in rows].count("good") == 2
    assert m["image_auroc"] == pytest.approx(
        roc_auc_score([int(r["label"]) for r in rows], [float(r["score"]) for r in rows]), abs=1e-6)
