"""benchmarks/seed_spread.py: variants, the run config, the spread statistics, the comparison rule and the
report, on tiny fake results (no training)."""
from __future__ import annotations

import math

import numpy as np
import pytest

from benchmarks import seed_spread as ss


def row(variant="paper", seed=0, metrics=(90.0, 80.0, 70.0), at=20, dataset="bottle", tag=""):
    return {"dataset": dataset, "variant": variant, "tag": tag, "overrides": ss.VARIANTS[variant], "seed": seed,
            "epochs": 20, "at": at, "max_train": 48, "scales": [224], "n_train": 48, "iters_per_epoch": 3,
            **dict(zip(ss.METRICS, metrics)), "acc": 1.0, "val_acc": 1.0, "val_auroc": 1.0, "val_dice": 0.7,
            "finetune_s": 300.0, "evaluate_s": 10.0, "load_start": [2.0, 2, 2], "load_end": [2.0, 2, 2],
            "command": f".venv/bin/python -m benchmarks.seed_spread --variants {variant} --seeds {seed}",
            "machine": "test cpu", "versions": "python x", "date": "2026-12-04T00:00:00"}


def test_spread_is_mean_sd_and_se_over_finite_values():
    s = ss.spread([1.0, 2.0, 3.0, None, float("nan")])
    assert s["n"] == 3 and s["mean"] == 2.0 and s["sd"] == pytest.approx(1.0)
    assert s["se"] == pytest.approx(1.0 / math.sqrt(3)) and (s["min"], s["max"]) == (1.0, 3.0)
    x = np.random.default_rng(0).normal(size=7)
    assert ss.spread(x)["sd"] == pytest.approx(float(np.std(x, ddof=1)))
    assert ss.spread([5.0])["sd"] is None and ss.spread([])["mean"] is None


def test_run_config_is_the_paper_profile_with_the_variant():
    cfg = ss.run_config("bottle", "bb0.1+ema0.9", 3, 20, 48, [224])
    assert (cfg.data.dataset, cfg.data.category, cfg.data.max_train, cfg.seed) == ("mvtec", "bottle", 48, 3)
    assert cfg.finetune.backbone_lr_scale == 0.1 and cfg.finetune.ema == 0.9 and cfg.finetune.layer_decay == 1.0
    assert cfg.finetune.init == "dinov2-s14-offline" and cfg.finetune.warmup_epochs == 2
    assert cfg.finetune.batch_size == 16 and cfg.data.image_size == 224 and cfg.evaluate.scales == (224,)
    assert cfg.out_dir.endswith("bottle/bb0.1+ema0.9/e20_n48/s3")
    assert ss.run_config("nih", "paper", 0, 10, 32, [224], init="file:x.pt", tag="pre").finetune.init == "file:x.pt"
    with pytest.raises(ValueError, match="unknown variant"):
        ss.variant_overrides("nope")


def test_rows_merge_per_seed_and_evaluated_epoch():
    old = [row(seed=0), row(seed=1), row(seed=0, at=10)]
    new = [row(seed=1, metrics=(1.0, 2.0, 3.0))]
    merged = ss.merge_rows(old, new)
    assert len(merged) == 3
    assert [r["image_auroc"] for r in merged if r["seed"] == 1] == [1.0]
    assert [r["at"] for r in merged][:1] == [10]  # sorted by evaluated epoch first


def test_differences_inside_the_spread_are_no_finding():
    base = [row(seed=s, metrics=(90.0 + d, 80.0 + d, 70.0)) for s, d in enumerate((-3, -1, 0, 1, 3))]
    near = [row("bb0.1", seed=s, metrics=(91.0 + d, 95.0 + d / 10, 70.0)) for s, d in enumerate((-3, -1, 0, 1, 3))]
    summary = ss.summarise(base + near)
    (c,) = ss.compare(summary)
    assert c["variant"] == "bb0.1"
    assert c["image_auroc"]["delta"] == pytest.approx(1.0) and not c["image_auroc"]["beyond"]
    assert c["pixel_auroc"]["delta"] == pytest.approx(15.0) and c["pixel_auroc"]["beyond"]
    assert c["au_pro"] is not None and c["au_pro"]["delta"] == 0.0 and not c["au_pro"]["beyond"]


def test_a_pretrained_start_is_compared_with_the_same_variant_from_the_untouched_backbone():
    plain = [row("bb0.1", seed=s, metrics=(90.0 + s, 80.0, 70.0)) for s in range(5)]
    pre = [row("bb0.1", seed=s, metrics=(90.5 + s, 86.0 + s / 10, 70.0), tag="pre300") for s in range(5)]
    (c,) = ss.compare_start(ss.summarise(plain + pre + [row(seed=s) for s in range(5)]))
    assert (c["variant"], c["tag"]) == ("bb0.1", "pre300")
    assert c["image_auroc"]["delta"] == pytest.approx(0.5) and not c["image_auroc"]["beyond"]
    assert c["pixel_auroc"]["delta"] == pytest.approx(6.2) and c["pixel_auroc"]["beyond"]
    assert ss.compare_start(ss.summarise(pre)) == []  # no untouched run of that variant: nothing to compare
    assert "## Pre-trained start against the untouched backbone" in ss.render(plain + pre)
    assert "## Pre-trained start" not in ss.render(plain)


def test_seeds_from_two_cpus_are_two_settings_and_comparisons_pair_within_a_cpu():
    amd = [dict(row("bb0.1", seed=s, metrics=(90.0 + s, 80.0, 70.0)), machine="AMD EPYC, 2 cores") for s in range(5)]
    intel = [dict(row("bb0.1", seed=s, metrics=(99.0, 88.0 + s, 70.0)), machine="Intel(R) Xeon(R) Processor, 2 cores")
             for s in range(5)]
    pre = [dict(row("bb0.1", seed=s, metrics=(99.5, 88.0 + s, 70.0), tag="pre"),
                machine="Intel(R) Xeon(R) Processor, 2 cores") for s in range(5)]
    assert len(ss.merge_rows(amd, intel)) == 10  # the same seed on another CPU does not replace the row
    summary = ss.summarise(amd + intel + pre)
    assert sorted(s["cpu"] for s in summary) == ["AMD EPYC", "Intel Xeon", "Intel Xeon"]
    (c,) = ss.compare_start(summary)
    assert c["cpu"] == "Intel Xeon" and c["image_auroc"]["delta"] == pytest.approx(0.5)
    assert c["pixel_auroc"]["delta"] == pytest.approx(0.0)
    assert ss.compare_start(ss.summarise(amd + pre)) == []  # no untouched run on that CPU: nothing to compare
    text = ss.render(amd + intel + pre)
    assert "| Intel Xeon |" in text and "| AMD EPYC |" in text


def test_sd_goal_needs_five_seeds_and_both_metrics():
    tight = [row(seed=s, metrics=(95.0 + 0.1 * s, 90.0 + 0.5 * s, 70.0)) for s in range(5)]
    (s,) = ss.summarise(tight)
    assert ss.meets_goal(s)
    (s,) = ss.summarise(tight[:4])
    assert not ss.meets_goal(s)
    wide = [row(seed=s, metrics=(95.0, 80.0 + 3 * s, 70.0)) for s in range(5)]
    (s,) = ss.summarise(wide)
    assert not ss.meets_goal(s)


def test_report_lists_settings_comparisons_seeds_and_commands(tmp_path):
    rows = [row(seed=s, metrics=(90.0 + s, 80.0, 70.0)) for s in range(3)]
    rows += [row("bb0.1", seed=s, metrics=(95.0, 90.0 + s, 80.0)) for s in range(3)]
    text = ss.render(rows)
    assert "| bottle | 20 of 20 (3) | 48 | 224 | paper | 3 | 91.0 ± 1.0 | 80.0 ± 0.0 |" in text
    assert "| bottle | 20 of 20 | 224 | bb0.1 | +4.0 ± 0.6 **beyond** |" in text
    assert text.count("`.venv/bin/python -m benchmarks.seed_spread") == 6
    assert "test cpu; python x" in text
    ss.plot(rows, tmp_path / "f.png")
    assert (tmp_path / "f.png").stat().st_size > 1000


def test_spread_lines_quote_the_measured_setting_only(tmp_path):
    import json

    from benchmarks.common import spread_lines

    path = tmp_path / "s.json"
    rows = [row(seed=s, metrics=(90.0 + s, 80.0, 70.0), at=at) for s in range(3) for at in (10, 20)]
    rows.append(row("bb0.1", seed=0, metrics=(1.0, 1.0, 1.0)))
    path.write_text(json.dumps({"rows": rows}))
    (line, blank) = spread_lines("bottle", 20, 48, path=path)
    assert "epoch 10: 91.0 ± 1.0 / 80.0 ± 0.0 / 70.0 ± 0.0 (n = 3); epoch 20: 91.0 ± 1.0" in line and blank == ""
    assert spread_lines("bottle", 10, 48, path=path) == [] and spread_lines("nih", 20, 48, path=path) == []
    assert spread_lines("bottle", 20, 48, path=tmp_path / "missing.json") == []


def test_learning_curve_reference_lines_are_the_full_training_set_peers(tmp_path):
    import json

    from benchmarks.learning_curve import peer_lines

    rows = [{"name": "A", "category": "bottle", "max_train": None, "image_auroc": 1.0},
            {"name": "A", "category": "bottle", "max_train": 50, "image_auroc": 2.0},
            {"name": "B", "category": "grass", "max_train": None, "image_auroc": 3.0}]
    (tmp_path / "p.json").write_text(json.dumps({"rows": rows}))
    lines = peer_lines(tmp_path / "p.json", "bottle")
    assert [(p["name"], p["image_auroc"]) for p in lines] == [("A", 1.0)]
