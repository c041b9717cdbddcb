"""Benchmark reports render what was measured: ratios within a round, the equal-quality judgement,
the backbone table for both numerics settings, and the notes (benchmarks/knn_speed.py)."""
from __future__ import annotations

from benchmarks.knn_speed import render


def _row(method, total, quality, **kw):
    t = {"total_s": total, "train_features_s": 1.0, "fit_s": 0.1, "test_features_s": 1.0, "search_s": 1.0,
         "readout_s": 0.1, "other_s": 0.1}
    return {"method": method, "n_train": 209, "n_test": 83, "timings": t, "peak_rss_mb": 1000.0,
            "load_before": [2.0], "load_after": [2.0], "quality": dict(zip(("image_auroc", "pixel_auroc", "au_pro"), quality)),
            **kw}


def test_knn_speed_report_judges_ratio_and_quality_per_round():
    rnd = [_row("anomalydino", 30.0, (100.0, 98.95, 95.65)),
           _row("ours", 90.0, (100.0, 98.91, 95.87)),
           _row("ours", 30.0, (100.0, 98.90, 95.88), feature_bf16=True, search="bf16"),
           _row("ours", 15.0, (100.0, 98.80, 95.87), feature_bf16=True)]
    bb = {"timings": {"fp32 @ 224": 30.0, "fp32 @ 448": 163.0, "bf16 copy @ 224": 8.0, "bf16 copy @ 448": 36.0},
          "load_before": [2.0], "load_after": [2.1]}
    md = render({"rounds": [rnd], "scaling": [], "date": "d", "total_s": 1.0, "notes": ["jobs paused"],
                 "backbone": bb, "backbone_pinned": bb}, "cmd", "machine")
    lines = md.splitlines()
    exact = next(l for l in lines if "fp32 features, exact fp32 search" in l and "| 1 |" in l)
    assert "| 90.0 s | 3.00 |" in exact and "| yes |" in exact            # the exact row is its own reference
    fast = next(l for l in lines if "bf16 search" in l and "| 1 |" in l)
    assert "| 30.0 s | 1.00 |" in fast and "| yes |" in fast
    off = next(l for l in lines if "bf16 copy of the backbone), exact" in l and "| 1 |" in l)
    assert "| 0.50 |" in off and "| no |" in off                           # 0.11 points of pixel AUROC lost
    assert "Note: jobs paused" in md
    assert sum("| bf16 copy | 8 ms | 36 ms |" in l for l in lines) == 2       # native and pinned
