"""The kNN extension as a model of its own (apmask_lib/knn/model.py): fit without training, save, load,
evaluate, predict, export -- on real bottle images.

Tolerances: the kNN model through the detector's multi-scale inference vs the extension's own read-out
(KnnScorer, sigma at the input size, sizes averaged): 1e-5 absolute on image scores and maps (both
float32; the model returns them as logits of d / 2 that the caller's sigmoid turns back). Exported ONNX
vs the same graph in PyTorch: 1e-4 absolute (float32), as tests/test_export.py for the detector.
"""
from __future__ import annotations

import json
import shutil
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from apmask_lib.knn import scoring as knn
from apmask_lib.cli import main
from apmask_lib.data import read_image
from apmask_lib.knn.model import (KNN_FORMAT, KnnDetector, load_knn_model, load_model, save_knn_model,
                                  truncated_backbone)
from apmask_lib.inference.multiscale import predict_multiscale


@pytest.fixture(scope="module")
def bottle_images(mvtec_root) -> dict[str, list[np.ndarray]]:
    b = mvtec_root / "bottle"
    return {"train": [read_image(b / "train" / "good" / f"{i:03d}.png") for i in range(4)],
            "test": [read_image(b / "test" / d / "000.png") for d in ("good", "broken_large", "contamination")]}


@pytest.mark.slow
def test_model_equals_the_extension_read_out(bottle_images, offline_backbone, tmp_path):
    """Offline ViT-S/14, block 7, sizes 112 and 168: the saved and reloaded model, run by
    predict_multiscale as evaluate/predict run it, gives the extension's kNN scores and maps / 2."""
    sizes, layer = (112, 168), 7
    backbone = truncated_backbone(offline_backbone, layer)
    assert len(backbone.blocks) == layer + 1
    scorers = [knn.KnnScorer(backbone, layer, s, sigma_at="input") for s in sizes]
    for sc in scorers:
        sc.fit(sc.features(bottle_images["train"]))
    model = KnnDetector(backbone, sizes, [sc.bank.features for sc in scorers])
    path = save_knn_model(tmp_path / "model.pt", model, {"note": "test"})
    raw = torch.load(path, map_location="cpu", weights_only=True)
    assert raw["format"] == KNN_FORMAT and set(raw["banks"]) == {"112", "168"}
    loaded = load_model(path)
    assert isinstance(loaded, KnnDetector) and loaded.sizes == sizes and loaded.layer == layer

    test = bottle_images["test"]
    res = predict_multiscale(loaded, test, sizes, "cpu")
    ref = knn.average_outputs([sc.predict(test) for sc in scorers])
    np.testing.assert_allclose(res.det_mean * 2, ref.scores, atol=1e-5, rtol=0)
    for got, want in zip(res.maps, ref.maps):
        assert got.shape == want.shape == test[0].shape[:2]
        np.testing.assert_allclose(got * 2, want, atol=1e-5, rtol=0)
    assert res.det_mean[0] < res.det_mean[1:].min()          # the good image scores lowest


def test_bad_model_files_are_refused(tmp_path):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from apmask_lib.weights import build_backbone

        backbone = truncated_backbone(build_backbone("random:vit_tiny16", seed=0), 1)
    bank = torch.nn.functional.normalize(torch.randn(20, backbone.embed_dim), dim=-1)
    with pytest.raises(ValueError, match="one bank per size"):
        KnnDetector(backbone, (64, 96), [bank])
    model = KnnDetector(backbone, (64,), [bank])
    with pytest.raises(ValueError, match="banks for input sizes \\[64\\] only"):
        model(torch.rand(1, 3, 96, 96))
    model.bank_64[0, 0] = float("nan")
    bad = save_knn_model(tmp_path / "bad.pt", model)
    with pytest.raises(ValueError, match="non-finite"):
        load_knn_model(bad)
    torch.save({"format": "something else"}, tmp_path / "other.pt")
    with pytest.raises(ValueError, match="not an apmask kNN model"):
        load_knn_model(tmp_path / "other.pt")


@pytest.mark.slow
def test_bf16_settings_are_saved_and_used_and_export_stays_exact(tmp_path):
    """features / search = bf16: stored in the file, read back, used in eager forward passes (within
    bf16 rounding of the fp32 model's output), while the traced forward (export) is the exact fp32 one."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from apmask_lib.weights import build_backbone

        backbone = truncated_backbone(build_backbone("random:vit_tiny16", seed=0), 1)
    torch.manual_seed(0)
    bank = torch.nn.functional.normalize(torch.randn(200, backbone.embed_dim), dim=-1)
    with pytest.raises(ValueError, match="features must be fp32 \\| bf16"):
        KnnDetector(backbone, (64,), [bank], features="fp16")
    exact = KnnDetector(backbone, (64,), [bank])
    fast = load_knn_model(save_knn_model(tmp_path / "fast.pt", KnnDetector(backbone, (64,), [bank], features="bf16",
                                                                            search="bf16")))
    assert fast.settings()["features"] == "bf16" and fast.settings()["search"] == "bf16"
    assert load_knn_model(save_knn_model(tmp_path / "old.pt", exact)).settings()["features"] == "fp32"
    x = torch.rand(2, 3, 64, 64)
    with torch.no_grad():
        want, got = exact(x), fast(x)
        class SegLogits(torch.nn.Module):
            def __init__(self, m):
                super().__init__()
                self.m = m

            def forward(self, t):
                return self.m(t).seg_logits

        traced = torch.jit.trace(SegLogits(fast), (x,), check_trace=False)(x)
    assert not torch.equal(got.seg_logits, want.seg_logits)
    torch.testing.assert_close(torch.sigmoid(got.seg_logits), torch.sigmoid(want.seg_logits), atol=0.02, rtol=0)
    torch.testing.assert_close(traced, want.seg_logits, atol=1e-5, rtol=0)


@pytest.fixture()
def widget(tmp_path, mvtec_root) -> Path:
    """A folder data set from real bottle images: 10 normal, 2 + 2 defective, a mask for one."""
    src = mvtec_root / "bottle"
    root = tmp_path / "my_data"
    (root / "good").mkdir(parents=True)
    for i in range(10):
        shutil.copy(src / "train" / "good" / f"{i:03d}.png", root / "good" / f"{i:03d}.png")
    for d in ("broken_large", "contamination"):
        (root / "defects" / d).mkdir(parents=True)
        for i in range(2):
            shutil.copy(src / "test" / d / f"{i:03d}.png", root / "defects" / d / f"{i:03d}.png")
    (root / "masks" / "broken_large").mkdir(parents=True)
    shutil.copy(src / "ground_truth" / "broken_large" / "000_mask.png", root / "masks" / "broken_large" / "000_mask.png")
    return root


@pytest.mark.slow
def test_fit_knn_evaluate_predict_export_end_to_end(widget, tmp_path, capsys):
    """The own-data commands with ``--method knn`` (docs/own-data.md) (tiny random ViT, block 2, sizes 64 + 96)."""
    from apmask_lib.deploy.export import MultiScaleDetector, run_onnx

    run = tmp_path / "runs" / "widget"
    params = {"seed": 0, "device": "cpu", "backbone": "random:vit_tiny16", "out_dir": str(run),
              "data": {"dataset": "folder", "root": str(widget), "category": "widget", "image_size": 64,
                       "normal_dir": "good", "abnormal_dir": ["defects/broken_large", "defects/contamination"],
                       "mask_dir": "masks", "normal_test_split": 0.2, "normal_val_split": 0.2},
              "evaluate": {"knn_layer": 2, "knn_sizes": [64, 96], "batch_size": 4, "figure_images": 2}}
    pfile = tmp_path / "params.yaml"
    pfile.write_text(yaml.safe_dump(params))

    main(["fit", "--method", "knn", "--params", str(pfile)])
    model_path = run / "knn" / "model.pt"
    assert model_path.is_file() and (run / "knn" / "config.json").is_file()
    assert not (run / "pretrain").exists() and not (run / "finetune").exists()     # no training
    raw = torch.load(model_path, map_location="cpu", weights_only=True)
    assert raw["format"] == KNN_FORMAT and raw["meta"]["bank_images"] == 6 and raw["vit_config"]["depth"] == 3
    applied = json.loads((run / "knn" / "config.json").read_text())["evaluate"]   # as applied, not as asked
    assert (applied["knn_layer"], applied["knn_sigma_at"], applied["knn_aspect"], applied["knn_features"],
            applied["scales"]) == (2, "input", "square", "fp32", [64, 96])
    main(["fit", "--method", "knn", "--params", str(pfile)])                        # same settings: kept
    with pytest.raises(SystemExit):                                                  # other settings: refused
        main(["fit", "--method", "knn", "--params", str(pfile), "-S", "evaluate.knn_sizes=[64]"])
    assert "evaluate.knn_sizes" in capsys.readouterr().err

    main(["evaluate", "--method", "knn", "--params", str(pfile)])
    metrics = json.loads((run / "evaluate_knn" / "metrics.json").read_text())
    assert metrics["model_kind"] == "knn" and metrics["sizes"] == [64, 96] and metrics["n_images"] == 2 + 4
    assert metrics["knn_model"]["bank_patches"] == [6 * 16, 6 * 36] and metrics["image_auroc"] is not None
    assert metrics["scales"] == [64, 96]                  # the model's own sizes, not evaluate.scales
    ev = json.loads((run / "evaluate_knn" / "config.json").read_text())["evaluate"]
    assert (ev["knn_layer"], ev["knn_sizes"], ev["scales"], ev["knn_sigma_at"]) == (2, [64, 96], [64, 96], "input")
    thr = json.loads((run / "evaluate_knn" / "threshold.json").read_text())
    assert thr["chosen_on"].startswith("validation: 2 images") and thr["model_path"] == str(model_path)
    assert not (run / "evaluate").exists()                      # the detector's folder is not touched

    pred = tmp_path / "pred"
    main(["predict", "--params", str(pfile), "--model", str(model_path), "--out", str(pred),
          str(widget / "defects" / "contamination"), str(widget / "good" / "000.png")])
    out = capsys.readouterr().out
    assert "evaluate_knn/threshold.json" in out and "2 failed" not in out
    info = json.loads((pred / "predict.json").read_text())
    assert info["model_kind"] == "knn" and info["threshold"]["image_threshold"] == thr["image_threshold"]
    rows = (pred / "predictions.csv").read_text().splitlines()
    assert len(rows) == 1 + 3 and len(list((pred / "heatmaps").glob("*.png"))) == 3

    onnx = tmp_path / "widget_knn.onnx"
    main(["export", "--params", str(pfile), "--model", str(model_path), "--out", str(onnx)])
    meta = json.loads((tmp_path / "widget_knn.onnx.json").read_text())
    assert meta["model_kind"] == "knn" and meta["sizes"] == [64, 96]
    assert meta["threshold"]["image_threshold"] == thr["image_threshold"]
    x = np.stack([read_image(widget / "defects" / d / "000.png") for d in ("broken_large", "contamination")])
    x = np.ascontiguousarray(torch.nn.functional.interpolate(
        torch.from_numpy(x).permute(0, 3, 1, 2).float() / 255, size=(96, 96), mode="area").numpy())
    got = run_onnx(onnx, x)
    with torch.no_grad():
        want = [t.numpy() for t in MultiScaleDetector(load_model(model_path), (64, 96))(torch.from_numpy(x))]
    for g, w in zip(got, want):
        assert g.shape == w.shape
        np.testing.assert_allclose(g, w, atol=1e-4, rtol=0)
