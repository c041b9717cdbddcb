"""Your own images (issue 15): data.dataset=folder, an unknown MVTec category name, and the whole
fit -> evaluate -> predict -> export chain through the command line on real bottle images."""
from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import cv2
import numpy as np
import pytest
import yaml

from apmask_lib.cli import main
from apmask_lib.config import load_params
from apmask_lib.data import build_dataset, dataset_from_config

DEFECTS = {"broken_large": 3, "contamination": 2}   # images copied per defect type
MASKED = {"broken_large": 2}                        # of which the first n get a mask


@pytest.fixture()
def widget(tmp_path, mvtec_root) -> Path:
    """A folder data set named 'widget' built from real bottle images: 10 + 1 normal (one in a
    sub-folder), two defect folders, masks for two of the five defective images."""
    src = mvtec_root / "bottle"
    root = tmp_path / "my_data"
    (root / "good" / "more").mkdir(parents=True)
    for i in range(10):
        shutil.copy(src / "train" / "good" / f"{i:03d}.png", root / "good" / f"{i:03d}.png")
    shutil.copy(src / "train" / "good" / "010.png", root / "good" / "more" / "010.png")
    (root / "good" / "notes.txt").write_text("not an image")
    for d, n in DEFECTS.items():
        (root / "defects" / d).mkdir(parents=True)
        for i in range(n):
            shutil.copy(src / "test" / d / f"{i:03d}.png", root / "defects" / d / f"{i:03d}.png")
    for d, n in MASKED.items():
        (root / "masks" / d).mkdir(parents=True)
        for i in range(n):
            shutil.copy(src / "ground_truth" / d / f"{i:03d}_mask.png", root / "masks" / d / f"{i:03d}_mask.png")
    return root


def _options(**kw):
    opts = dict(normal_dir="good", abnormal_dir=["defects/broken_large", "defects/contamination"],
                mask_dir="masks", normal_test_split=0.3, normal_val_split=0.2)
    opts.update(kw)
    return opts


def test_folder_dataset_index(widget):
    ds = build_dataset("folder", widget, "widget", **_options())
    assert ds.name == "folder/widget"
    assert (len(ds.train), len(ds.val), sum(s.label == 0 for s in ds.test)) == (6, 2, 3)  # 11 normal images
    paths = [s.path for s in ds.train + ds.val + ds.test]
    assert len(set(paths)) == len(paths) and widget / "good" / "more" / "010.png" in paths  # recursive, disjoint
    abn = [s for s in ds.test if s.label == 1]
    assert sorted({s.defect for s in abn}) == ["broken_large", "contamination"] and len(abn) == 5
    with_mask = {s.path.name for s in abn if s.has_pixel_gt and s.defect == "broken_large"}
    assert with_mask == {"000.png", "001.png"} and not any(s.has_pixel_gt for s in abn if s.defect == "contamination")
    assert all(s.mask_path.parent == widget / "masks" / "broken_large" for s in abn if s.has_pixel_gt)
    # the split depends on split_seed only, and changes with it
    again = build_dataset("folder", widget, "widget", **_options())
    assert [s.path for s in again.train] == [s.path for s in ds.train]
    other = build_dataset("folder", widget, "widget", **_options(split_seed=1))
    assert [s.path for s in other.test] != [s.path for s in ds.test]
    # a separate normal test folder; a single defect folder as a plain string; no masks at all
    ds2 = build_dataset("folder", widget, "widget", **_options(normal_test_dir="good/more", mask_dir=None,
                                                               abnormal_dir="defects/contamination"))
    assert [s.path.name for s in ds2.test if s.label == 0] == ["010.png"] and len(ds2.val) == 2
    assert len(ds2.test_pixel_gt) == 1  # the normal image only


def test_folder_errors_name_the_key(widget):
    with pytest.raises(ValueError, match="data.normal_dir"):
        build_dataset("folder", widget, "widget", **_options(normal_dir=None))
    with pytest.raises(FileNotFoundError, match="data.abnormal_dir: folder not found.*nowhere"):
        build_dataset("folder", widget, "widget", **_options(abnormal_dir=["nowhere"]))
    with pytest.raises(ValueError, match="normal_test_split"):
        build_dataset("folder", widget, "widget", **_options(normal_test_split=1.5))
    with pytest.raises(ValueError, match="cannot be split"):
        build_dataset("folder", widget, "widget", **_options(normal_test_split=0.6, normal_val_split=0.4))


def test_mvtec_reader_accepts_an_unknown_category_with_a_warning(tmp_path, mvtec_root):
    src, cat = mvtec_root / "bottle", tmp_path / "mv" / "widget"
    shutil.copytree(src / "train" / "good", cat / "train" / "good", ignore=lambda d, f: f[3:])
    shutil.copytree(src / "test" / "good", cat / "test" / "good", ignore=lambda d, f: f[2:])
    with pytest.warns(UserWarning, match="'widget' is not one of the 15"):
        ds = build_dataset("mvtec", tmp_path / "mv", "widget")
    assert ds.name == "mvtec/widget" and len(ds.train) == 3
    with pytest.raises(ValueError, match="did you mean 'bottle'"):
        build_dataset("mvtec", tmp_path / "mv", "botle")  # no such folder: still an error with a hint


@pytest.mark.slow
def test_fit_evaluate_predict_export_end_to_end(widget, tmp_path, capsys):
    """The own-data commands (README 'Your own images', docs/own-data.md), tiny settings (random tiny ViT, 64 px, 1 + 1 epochs).
    33-191 s measured on the shared 2-core CPU, depending on its load (no wall-clock assertion)."""
    from apmask_lib.deploy.export import run_onnx

    run = tmp_path / "runs" / "widget"
    params = {
        "seed": 0, "device": "cpu", "backbone": "random:vit_tiny16", "out_dir": str(run),
        "data": {"dataset": "folder", "root": str(widget), "category": "widget", "image_size": 64,
                 **_options(), "abnormal_dir": ["defects/broken_large", "defects/contamination"]},
        "pretrain": {"epochs": 1, "batch_size": 4, "global_size": 64, "local_size": 32, "n_local": 2,
                     "hidden_dim": 64, "num_workers": 0, "warmup_epochs": 0},
        "finetune": {"epochs": 1, "batch_size": 4, "num_workers": 0, "warmup_epochs": 0},
        "evaluate": {"scales": [64, 96], "batch_size": 4, "figure_images": 2},
    }
    pfile = tmp_path / "params.yaml"
    pfile.write_text(yaml.safe_dump(params))
    assert dataset_from_config(load_params(pfile).data).name == "folder/widget"

    main(["fit", "--params", str(pfile)])
    model = run / "finetune" / "model.pt"
    assert (run / "pretrain" / "backbone.pt").is_file() and model.is_file()

    main(["evaluate", "--params", str(pfile)])
    out = capsys.readouterr().out
    metrics = json.loads((run / "evaluate" / "metrics.json").read_text())
    assert metrics["n_images"] == 3 + 5 and metrics["n_excluded_from_pixel_metrics"] == 3
    assert metrics["pixel_metrics_scope"].startswith("2 of 5 anomalous") and "pixel metrics: 2 of 5" in out
    assert metrics["pixel_auroc"] is not None
    thr = json.loads((run / "evaluate" / "threshold.json").read_text())
    assert thr["chosen_on"].startswith("validation: 2 images") and thr["image_method"].startswith("quantile 0.99")
    assert thr["image_score"] == "det_mean" and thr["n_normal"] == 2 and "threshold" in out

    # the same model, threshold chosen on the test set instead: said so, F1-optimal (it has labels and masks)
    main(["evaluate", "--params", str(pfile), "-S", "evaluate.threshold_on=test", "-S", f"out_dir={tmp_path / 'on_test'}",
          "--model", str(model)])
    on_test = json.loads((tmp_path / "on_test" / "evaluate" / "threshold.json").read_text())
    assert on_test["chosen_on"].startswith("TEST set") and "optimistic" in on_test["chosen_on"]
    assert on_test["image_method"] == "f1_optimal" and on_test["pixel_method"].startswith("f1_optimal")
    capsys.readouterr()

    new = tmp_path / "new_images"
    new.mkdir()
    for d in ("broken_large", "contamination"):
        shutil.copy(widget / "defects" / d / "000.png", new / f"{d}.png")
    shutil.copy(widget / "good" / "more" / "010.png", new / "good.png")
    pred = tmp_path / "pred"
    main(["predict", "--params", str(pfile), "--model", str(model), "--out", str(pred), str(new)])
    summary = capsys.readouterr().out
    with (pred / "predictions.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert [r["status"] for r in rows] == ["ok"] * 3
    for r in rows:
        assert float(r["threshold"]) == pytest.approx(thr["image_threshold"], rel=1e-6)
        assert int(r["anomalous"]) == int(float(r["score"]) >= float(r["threshold"]))
        assert cv2.imread(r["heatmap"]).shape[:2] == (512, 512)
    assert "3 images scored" in summary and "validation: 2 images" in summary
    with pytest.raises(SystemExit):  # the same folder again without --force
        main(["predict", "--params", str(pfile), "--model", str(model), "--out", str(pred), str(new)])
    assert "--force" in capsys.readouterr().err

    onnx_file = tmp_path / "widget.onnx"
    main(["export", "--params", str(pfile), "--model", str(model), "--format", "onnx", "--out", str(onnx_file)])
    info = json.loads(onnx_file.with_name("widget.onnx.json").read_text())
    assert info["sizes"] == [64, 96] and info["threshold"]["image_threshold"] == thr["image_threshold"]
    img = cv2.cvtColor(cv2.imread(str(new / "good.png")), cv2.COLOR_BGR2RGB)
    x = cv2.resize(img, (96, 96), interpolation=cv2.INTER_AREA).transpose(2, 0, 1)[None].astype(np.float32) / 255
    score, amap, probs = run_onnx(onnx_file, x)
    good = next(r for r in rows if r["path"].endswith("good.png"))
    assert abs(float(score[0]) - float(good["score"])) < 0.005 and amap.shape == (1, 96, 96)
