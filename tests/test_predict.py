"""predict(): heatmaps + predictions.csv; unreadable files reported, the rest processed, nothing dropped."""
from __future__ import annotations

import csv
import logging
import shutil
import warnings
from pathlib import Path

import cv2
import pytest

from apmask_lib.predict import collect_inputs, heatmap_name, predict


@pytest.fixture(scope="module")
def model_path(tmp_path_factory) -> Path:
    from apmask_lib.models import build_backbone
    from apmask_lib.models.detector import AnomalyDetector, save_detector

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = AnomalyDetector(build_backbone("random:vit_tiny16", seed=0), hidden_dim=64, bottleneck_dim=32)
    return save_detector(tmp_path_factory.mktemp("model") / "model.pt", model, {})


@pytest.fixture()
def folder(tmp_path, mvtec_root) -> Path:
    d = tmp_path / "inputs"
    d.mkdir()
    test = mvtec_root / "bottle" / "test"
    shutil.copy(test / "good" / "000.png", d / "a_good.png")
    shutil.copy(test / "broken_large" / "000.png", d / "b_broken.png")
    (d / "c_corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n this is not really a png")
    (d / "notes.txt").write_text("not an image")
    (d / "sub").mkdir()
    return d


def test_folder_with_a_corrupt_file(folder, model_path, tmp_path, caplog):
    out = tmp_path / "out"
    with caplog.at_level(logging.WARNING, logger="apmask_lib.predict"):
        rows = predict(model_path, folder, out, scales=(224,), device="cpu")
    by_name = {Path(r["path"]).name: r for r in rows}
    assert list(by_name) == ["a_good.png", "b_broken.png", "c_corrupt.png", "notes.txt", "sub"]
    for name in ("a_good.png", "b_broken.png"):
        r = by_name[name]
        assert r["status"] == "ok" and r["error"] == "" and r["decision"] in ("normal", "anomalous")
        assert 0.0 <= r["score"] <= 1.0
        heat = cv2.imread(r["heatmap"])
        assert heat is not None and heat.shape[:2] == (512, 512)  # the original image size
    bad = by_name["c_corrupt.png"]
    assert bad["status"] == "error" and "c_corrupt.png" in bad["error"] and bad["score"] == ""
    assert by_name["notes.txt"]["status"] == "skipped" and "not an image" in by_name["notes.txt"]["skip_reason"]
    assert by_name["sub"]["status"] == "skipped" and "recursively" in by_name["sub"]["skip_reason"]
    warned = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert sum("c_corrupt.png" in m for m in warned) >= 2  # when met, and again in the final list
    with (out / "predictions.csv").open() as f:
        csv_rows = list(csv.DictReader(f))
    assert [Path(r["path"]).name for r in csv_rows] == list(by_name)
    assert csv_rows[2]["status"] == "error" and csv_rows[2]["error"]


def test_explicit_paths_missing_file_and_repeated_stems(folder, model_path, tmp_path):
    other = tmp_path / "other"
    other.mkdir()
    shutil.copy(folder / "a_good.png", other / "a_good.png")
    rows = predict(model_path, [folder / "a_good.png", other / "a_good.png", tmp_path / "missing.png"],
                   tmp_path / "out", scales=(224, 256), device="cpu")
    assert [r["status"] for r in rows] == ["ok", "ok", "error"]
    assert "not found" in rows[2]["error"]
    assert Path(rows[0]["heatmap"]).name == "a_good.png" and Path(rows[1]["heatmap"]).name == "a_good_2.png"
    assert rows[0]["score"] == pytest.approx(rows[1]["score"])


def test_missing_model_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="checkpoint not found"):
        predict(tmp_path / "nope.pt", tmp_path, tmp_path / "out")


def test_collect_inputs_and_names(tmp_path):
    (tmp_path / "x.JPG").write_bytes(b"")
    (tmp_path / "y.csv").write_text("")
    entries = collect_inputs(tmp_path)
    assert [(p.name, why is None) for p, why in entries] == [("x.JPG", True), ("y.csv", False)]
    used: set[str] = set()
    assert [heatmap_name(Path(p), used) for p in ("a/x.png", "b/x.jpg", "c/x.png")] == ["x.png", "x_2.png", "x_3.png"]
