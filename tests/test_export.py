"""apmask export: the ONNX / TorchScript file agrees with the PyTorch model on real images.

Tolerances: exported graph vs the same graph in PyTorch (MultiScaleDetector) 1e-4 absolute on scores,
per-scale probabilities and maps (float32; measured ~1e-6). Exported graph vs apmask's own inference
(predict_multiscale, OpenCV resizing of the uint8 image) after the recipe of docs/own-data.md (shrink with
cv2.INTER_AREA to the largest scale first): 0.005 absolute on scores and 0.005 on the mean absolute map
difference (measured 1.5e-5 and 5-6e-4 with this model) -- the resize kernels differ, so this is an
agreement bound, not round-off.
"""
from __future__ import annotations

import json
import warnings
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from apmask_lib.data import read_image
from apmask_lib.deploy.export import MultiScaleDetector, export_detector, run_onnx
from apmask_lib.inference.multiscale import predict_multiscale

SCALES = (224, 320)


@pytest.fixture(scope="module")
def model_path(tmp_path_factory) -> Path:
    from apmask_lib.weights import build_backbone
    from apmask_lib.models.detector import AnomalyDetector
    from apmask_lib.weights import save_detector

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = AnomalyDetector(build_backbone("random:vit_tiny16", seed=0), hidden_dim=64, bottleneck_dim=32)
    with torch.no_grad():  # spread the outputs (maps 0.13..0.73 on bottle): a near-constant model would agree trivially
        model.det_out.weight.mul_(300)
        model.seg.weight.mul_(30)
    return save_detector(tmp_path_factory.mktemp("model") / "model.pt", model, {})


@pytest.fixture(scope="module")
def images(mvtec_root) -> list[np.ndarray]:
    test = mvtec_root / "bottle" / "test"
    return [read_image(test / d / "000.png") for d in ("good", "broken_large", "contamination")]


def _batch(images: list[np.ndarray], size: int) -> np.ndarray:
    arr = np.stack([cv2.resize(im, (size, size), interpolation=cv2.INTER_AREA) for im in images])
    return np.ascontiguousarray(arr.transpose(0, 3, 1, 2).astype(np.float32) / 255.0)


@pytest.mark.slow
def test_onnx_agrees_with_pytorch_on_real_images(model_path, images, tmp_path):
    from apmask_lib.weights import load_detector

    out = export_detector(model_path, tmp_path / "detector.onnx", "onnx", scales=SCALES)
    info = json.loads((tmp_path / "detector.onnx.json").read_text())
    assert info["sizes"] == list(SCALES) and info["threshold"] is None
    x = _batch(images, max(SCALES))
    score, amap, probs = run_onnx(out, x)
    assert score.shape == (3,) and amap.shape == (3, 320, 320) and probs.shape == (3, 2)
    model = load_detector(model_path)
    with torch.no_grad():
        ref = [t.numpy() for t in MultiScaleDetector(model, SCALES)(torch.from_numpy(x))]
    for got, want in zip((score, amap, probs), ref):
        np.testing.assert_allclose(got, want, atol=1e-4, rtol=0)
    # another batch size and image size than the export example (dynamic axes)
    x2 = _batch(images[:2], 288)
    s2, m2, _ = run_onnx(out, x2)
    assert m2.shape == (2, 288, 288)
    np.testing.assert_allclose(s2, score[:2], atol=0.05)
    # against apmask's own inference on the original 512 px images (OpenCV resizing inside)
    res = predict_multiscale(model, images, SCALES, "cpu")
    assert np.abs(score - res.det_mean).max() < 0.005
    for k in range(3):
        up = cv2.resize(amap[k], (512, 512), interpolation=cv2.INTER_LINEAR)
        assert np.abs(up - res.maps[k]).mean() < 0.005


@pytest.mark.slow
def test_torchscript_agrees_and_threshold_travels(model_path, images, tmp_path):
    run = tmp_path / "run"
    (run / "finetune").mkdir(parents=True)
    (run / "evaluate").mkdir()
    model = run / "finetune" / "model.pt"
    model.write_bytes(model_path.read_bytes())
    (run / "evaluate" / "threshold.json").write_text(json.dumps(
        {"image_threshold": 0.42, "image_score": "det_mean", "pixel_threshold": 0.6, "chosen_on": "validation"}))
    out = export_detector(model, tmp_path / "detector.pt", "torchscript", scales=SCALES)
    extra = {"apmask.json": ""}
    loaded = torch.jit.load(str(out), _extra_files=extra)
    assert json.loads(extra["apmask.json"])["threshold"]["image_threshold"] == 0.42
    x = torch.from_numpy(_batch(images, 320))
    from apmask_lib.weights import load_detector

    with torch.no_grad():
        got, want = loaded(x), MultiScaleDetector(load_detector(model), SCALES)(x)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, atol=1e-5, rtol=0)
    with pytest.raises(FileExistsError, match="--force"):
        export_detector(model, out, "torchscript", scales=SCALES)


@pytest.mark.slow
def test_export_refuses_bad_input(model_path, tmp_path):
    with pytest.raises(ValueError, match="onnx, torchscript"):
        export_detector(model_path, tmp_path / "x.bin", "tflite")
    from apmask_lib.weights import load_detector, save_detector

    model = load_detector(model_path)
    with torch.no_grad():
        model.seg.bias.fill_(float("inf"))
    bad = save_detector(tmp_path / "bad.pt", model, {})
    with pytest.raises(ValueError, match="non-finite"):
        export_detector(bad, tmp_path / "bad.onnx", "onnx", scales=SCALES)
    assert not (tmp_path / "bad.onnx").exists()
