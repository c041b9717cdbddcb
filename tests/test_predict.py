"""predict(): heatmaps + predictions.csv; unreadable files reported, the rest processed, nothing dropped."""
from __future__ import annotations

import csv
import logging
import shutil
import warnings
from pathlib import Path

import json
import struct
import zlib

import cv2
import numpy as np
import pytest
import torch

from apmask_lib.deploy import predict as predict_module
from apmask_lib.deploy.predict import collect_inputs, heatmap_name, predict


@pytest.fixture(scope="module")
def model_path(tmp_path_factory) -> Path:
    from apmask_lib.weights import build_backbone
    from apmask_lib.models.detector import AnomalyDetector
    from apmask_lib.weights import save_detector

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


@pytest.mark.slow
def test_folder_with_a_corrupt_file(folder, model_path, tmp_path, caplog):
    out = tmp_path / "out"
    with caplog.at_level(logging.WARNING, logger="apmask_lib.deploy.predict"), pytest.warns(UserWarning, match="no threshold.json"):
        rows = predict(model_path, folder, out, scales=(224,), device="cpu")
    by_name = {Path(r["path"]).name: r for r in rows}
    assert list(by_name) == ["a_good.png", "b_broken.png", "c_corrupt.png", "notes.txt", "sub"]
    for name in ("a_good.png", "b_broken.png"):
        r = by_name[name]
        assert r["status"] == "ok" and r["error"] == "" and r["anomalous"] in (0, 1) and r["vote"] in (0, 1)
        assert 0.0 <= r["score"] <= 1.0 and r["threshold"] == 0.5  # no threshold.json: the stated default
        assert r["anomalous"] == int(r["score"] >= 0.5)
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


@pytest.mark.slow
def test_explicit_paths_missing_file_and_repeated_stems(folder, model_path, tmp_path):
    other = tmp_path / "other"
    other.mkdir()
    shutil.copy(folder / "a_good.png", other / "a_good.png")
    rows = predict(model_path, [folder / "a_good.png", other / "a_good.png", tmp_path / "missing.png"],
                   tmp_path / "out", scales=(224, 256), device="cpu", threshold=0.25)
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


# ---------------------------------------------------------------------------------------------
# bad input (issue 14, items 6 and 7): each of these failed before the fix
# ---------------------------------------------------------------------------------------------
def _read_csv(path: Path) -> list[dict[str, str]]:
    with path.open() as f:
        return list(csv.DictReader(f))


@pytest.mark.slow
def test_non_empty_output_folder_is_refused_without_force(folder, model_path, tmp_path):
    out = tmp_path / "out"
    predict(model_path, folder / "a_good.png", out, scales=(224,), device="cpu", threshold=0.5)
    (out / "heatmaps" / "old_unrelated.png").write_bytes(b"old")
    before = (out / "predictions.csv").read_text()
    with pytest.raises(FileExistsError, match="not empty.*--force"):
        predict(model_path, folder / "b_broken.png", out, scales=(224,), device="cpu", threshold=0.5)
    assert (out / "predictions.csv").read_text() == before  # nothing was touched
    rows = predict(model_path, folder / "b_broken.png", out, scales=(224,), device="cpu", threshold=0.5, force=True)
    assert [Path(r["path"]).name for r in _read_csv(out / "predictions.csv")] == ["b_broken.png"]
    assert sorted(p.name for p in (out / "heatmaps").iterdir()) == ["b_broken.png"]  # no old heatmap mixed in
    assert rows[0]["status"] == "ok"


def _huge_grey_png(dst: Path, width: int, height: int) -> None:
    """A valid all-black 8-bit grey PNG of width x height, streamed (a few hundred KB on disk, but
    width * height bytes -- and three times that as RGB -- once decoded)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    z, row, parts = zlib.compressobj(9), b"\0" * (width + 1), []
    for _ in range(height):
        parts.append(z.compress(row))
    parts.append(z.flush())
    dst.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0))
                    + chunk(b"IDAT", b"".join(parts)) + chunk(b"IEND", b""))


@pytest.mark.slow
def test_huge_image_is_refused_per_image_and_the_rest_processed(folder, model_path, tmp_path):
    _huge_grey_png(tmp_path / "small.png", 40, 30)
    assert cv2.imread(str(tmp_path / "small.png")).shape == (30, 40, 3)  # the writer makes real PNGs
    _huge_grey_png(folder / "aa_huge.png", 20000, 20000)  # 0.4 GB decoded, ~1.2 GB as RGB, more as maps
    rows = predict(model_path, folder, tmp_path / "out", scales=(224,), device="cpu", threshold=0.5)
    by_name = {Path(r["path"]).name: r for r in rows}
    huge = by_name["aa_huge.png"]
    assert huge["status"] == "error" and "20000x20000" in huge["error"] and "limit" in huge["error"]
    assert by_name["a_good.png"]["status"] == by_name["b_broken.png"]["status"] == "ok"
    # an image under the header check but over a (lowered) limit is refused after decoding too
    rows = predict(model_path, folder / "a_good.png", tmp_path / "out2", scales=(224,), device="cpu",
                   threshold=0.5, max_pixels=512 * 511)
    assert rows[0]["status"] == "error" and "512x512" in rows[0]["error"]


@pytest.mark.slow
def test_csv_is_written_incrementally(folder, model_path, tmp_path, monkeypatch):
    calls = {"n": 0}
    real = predict_module.predict_multiscale

    def crash_on_second_batch(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:
            raise MemoryError("simulated crash in the second batch")
        return real(*args, **kwargs)

    monkeypatch.setattr(predict_module, "predict_multiscale", crash_on_second_batch)
    out = tmp_path / "out"
    with pytest.raises(MemoryError):
        predict(model_path, folder, out, scales=(224,), device="cpu", threshold=0.5, batch_size=1)
    done = _read_csv(out / "predictions.csv")
    assert [Path(r["path"]).name for r in done] == ["a_good.png"] and done[0]["status"] == "ok"


@pytest.mark.slow
def test_threshold_json_from_evaluate_decides(folder, model_path, tmp_path):
    run = tmp_path / "run"
    (run / "finetune").mkdir(parents=True)
    (run / "evaluate").mkdir()
    model = run / "finetune" / "model.pt"
    shutil.copy(model_path, model)
    rows = predict(model, folder / "a_good.png", tmp_path / "probe", scales=(224,), device="cpu", threshold=0.5)
    s = rows[0]["score"]
    (run / "evaluate" / "threshold.json").write_text(json.dumps(
        {"image_threshold": s, "image_score": "det_mean", "pixel_threshold": 0.99, "chosen_on": "validation: 3 images"}))
    rows = predict(model, [folder / "a_good.png", folder / "b_broken.png"], tmp_path / "out", scales=(224,),
                   device="cpu")
    assert rows[0]["threshold"] == s and rows[0]["anomalous"] == 1  # score >= threshold
    assert rows[1]["anomalous"] == int(rows[1]["score"] >= s)
    info = json.loads((tmp_path / "out" / "predict.json").read_text())
    assert info["threshold"]["source"].endswith("threshold.json") and "validation" in info["summary"]
    assert f"{info['n_anomalous']} anomalous" in info["summary"]


@pytest.mark.slow
def test_nan_detector_is_refused_by_predict_and_evaluate_alike(mvtec_root, folder, tmp_path):
    from apmask_lib.config import Config
    from apmask_lib.data import build_dataset
    from apmask_lib.evaluate.stage import run_evaluate
    from apmask_lib.weights import build_backbone
    from apmask_lib.models.detector import AnomalyDetector
    from apmask_lib.weights import save_detector

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = AnomalyDetector(build_backbone("random:vit_tiny16", seed=0), hidden_dim=64, bottleneck_dim=32)
    with torch.no_grad():
        model.det_out.weight.fill_(float("nan"))
    path = save_detector(tmp_path / "nan.pt", model, {})
    with pytest.raises(ValueError, match="non-finite.*det_out.weight") as from_predict:
        predict(path, folder / "a_good.png", tmp_path / "out", scales=(224,), device="cpu", threshold=0.5)
    cfg = Config(out_dir=str(tmp_path / "run"), device="cpu")
    cfg.evaluate.scales = (224,)
    with pytest.raises(ValueError, match="non-finite.*det_out.weight") as from_evaluate:
        run_evaluate(cfg, model_path=path, dataset=build_dataset("mvtec", mvtec_root, "bottle"))
    assert str(from_predict.value) == str(from_evaluate.value)
    assert not (tmp_path / "out" / "predictions.csv").exists()
