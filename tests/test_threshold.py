"""The decision threshold (apmask_lib/evaluate/threshold.py): how it is chosen, and how it is read back."""
from __future__ import annotations

import json

import numpy as np
import pytest

from apmask_lib.evaluate.threshold import (choose_threshold, confusion_at, decide, find_threshold_file, image_threshold,
                                  normal_pixel_sample, quantile_threshold, read_threshold)


def test_f1_optimal_with_labels_and_quantile_without():
    scores = [0.1, 0.2, 0.3, 0.6, 0.7, 0.35]
    labels = [0, 0, 0, 1, 1, 1]
    t, method = image_threshold(scores, labels, 0.99)
    assert method == "f1_optimal" and t == pytest.approx(0.35)  # catches all three anomalies, no false alarm
    assert confusion_at(scores, labels, t) == {"tp": 3, "fp": 0, "fn": 0, "tn": 3, "precision": 1.0,
                                               "recall": 1.0, "f1": 1.0}
    t, method = image_threshold(np.arange(101) / 100, np.zeros(101), 0.9)
    assert method.startswith("quantile 0.9") and t == pytest.approx(0.9)
    assert list(decide([0.89, 0.9, 0.91], t)) == [0, 1, 1]
    with pytest.raises(ValueError, match="no normal images"):
        image_threshold([0.5], [1], 0.99)
    with pytest.raises(ValueError, match=r"\(0, 1\]"):
        quantile_threshold([0.1], 1.5)


def test_pixel_threshold_sources():
    maps = [np.linspace(0, 1, 10000, dtype=np.float32).reshape(100, 100)]
    rec = choose_threshold([0.1, 0.2], [0, 0], "det_mean", "validation", [normal_pixel_sample(m) for m in maps], None,
                           pixel_q=0.5)
    assert rec["pixel_threshold"] == pytest.approx(0.5, abs=1e-3) and rec["pixel_method"].startswith("quantile 0.5")
    rec = choose_threshold([0.1, 0.9], [0, 1], "map_max", "test", [], 0.7)
    assert rec["pixel_threshold"] == 0.7 and rec["pixel_method"].startswith("f1_optimal")
    assert rec["image_score"] == "map_max" and rec["chosen_on"] == "test"
    assert choose_threshold([0.1], [0], "det_mean", "v", [], float("nan"))["pixel_method"].startswith("default")
    big = np.zeros((1000, 1000), dtype=np.float32)
    assert normal_pixel_sample(big).size <= 65536


def test_threshold_file_lookup_and_errors(tmp_path):
    run = tmp_path / "run"
    (run / "finetune").mkdir(parents=True)
    model = run / "finetune" / "model.pt"
    assert find_threshold_file(model) is None
    (run / "evaluate").mkdir()
    f = run / "evaluate" / "threshold.json"
    f.write_text(json.dumps({"image_threshold": 0.3, "pixel_threshold": 0.5, "image_score": "det_mean"}))
    assert find_threshold_file(model) == f and read_threshold(f)["image_threshold"] == 0.3
    f.write_text("{not json")
    with pytest.raises(ValueError, match="cannot read threshold file.*threshold.json"):
        read_threshold(f)
    f.write_text(json.dumps({"image_threshold": 0.3}))
    with pytest.raises(ValueError, match="no 'pixel_threshold'.*apmask evaluate"):
        read_threshold(f)
