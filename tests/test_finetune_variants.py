"""benchmarks/finetune_variants.py: variant overrides, the run config, row merging, the comparison with the
default and the report, on tiny fake results (no training)."""
from __future__ import annotations

import pytest

from benchmarks import finetune_variants as fv

THREE = ("bottle", "brick", "nih")  # the data sets of the rule for a new default


def row(dataset, variant, seed=0, metrics=(90.0, 80.0, 70.0), dice=(0.1, 0.3, 0.6), epochs=3):
    lr, seg = fv.VARIANTS[variant]
    return {"dataset": dataset, "variant": variant, "lr": lr, "seg_weight": seg, "seed": seed, "epochs": epochs,
            "max_train": 32, "scales": [224], "n_train": 32, "n_val_images": 4, "iters_per_epoch": 2,
            **dict(zip(fv.METRICS, metrics)),
            "epochs_log": [{"epoch": i, "acc": 0.9, "val_auroc": 1.0, "val_dice": d} for i, d in enumerate(dice)],
            "finetune_s": 10.0, "evaluate_s": 5.0, "load_start": [1.0, 1, 1], "load_end": [2.0, 2, 2],
            "command": f".venv/bin/python -m benchmarks.finetune_variants --datasets {dataset} --variants {variant}",
            "machine": "test cpu", "versions": "python x", "date": "2026-12-03T00:00:00"}


def test_variant_overrides_keep_the_weights_summing_to_one():
    assert fv.variant_overrides("default") == ["finetune.lr=5e-05", "finetune.det_weight=0.95",
                                               "finetune.seg_weight=0.05"]
    assert fv.variant_overrides("lr1.5e-4+seg0.2") == ["finetune.lr=0.00015", "finetune.det_weight=0.8",
                                                       "finetune.seg_weight=0.2"]
    with pytest.raises(ValueError, match="unknown variant"):
        fv.variant_overrides("lr9")


def test_run_config_is_the_paper_profile_with_the_variant_and_the_backbone_as_start():
    cfg = fv.run_config("nih", "seg0.2", 1, 10, 32, [224])
    assert (cfg.data.dataset, cfg.data.category, cfg.data.max_train) == ("nih", "all", 32)
    assert (cfg.finetune.lr, cfg.finetune.det_weight, cfg.finetune.seg_weight) == (5e-5, 0.8, 0.2)
    assert cfg.finetune.init == "dinov2-s14-offline" and cfg.finetune.epochs == 10 and cfg.finetune.warmup_epochs == 1
    assert cfg.finetune.batch_size == 16 and cfg.data.image_size == 224 and cfg.evaluate.scales == (224,)
    assert cfg.seed == 1 and cfg.out_dir.endswith("nih/seg0.2/s1_e10_n32")


def test_demo_profile_is_params_yaml_from_the_demo_backbone(tmp_path):
    with pytest.raises(FileNotFoundError, match="dvc repro"):
        fv.run_config("grass", "seg0.2", 0, 10, 32, [224], profile="demo", demo_runs=str(tmp_path))
    init = tmp_path / "grass" / "s0" / "pretrain" / "backbone.pt"
    init.parent.mkdir(parents=True)
    init.write_bytes(b"")
    cfg = fv.run_config("grass", "seg0.2", 0, 10, 32, [224], profile="demo", demo_runs=str(tmp_path))
    assert cfg.finetune.init == f"file:{init}" and cfg.data.category == "grass" and cfg.data.image_size == 112
    assert (cfg.finetune.epochs, cfg.finetune.batch_size, cfg.evaluate.scales) == (15, 8, (112, 168))
    assert (cfg.finetune.lr, cfg.finetune.seg_weight) == (5e-5, 0.2)
    with pytest.raises(ValueError, match="demo categories"):
        fv.run_config("bottle", "seg0.2", 0, 10, 32, [224], profile="demo", demo_runs=str(tmp_path))


def test_first_epoch_at():
    assert fv.first_epoch_at([0.1, None, 0.5, 0.9], 0.5) == 3
    assert fv.first_epoch_at([0.1, 0.2], 0.5) is None


def test_merge_replaces_a_remeasured_row_and_keeps_the_others_in_order():
    old = [row("nih", "default"), row("bottle", "seg0.2"), row("bottle", "default")]
    new = [row("bottle", "seg0.2", metrics=(1.0, 2.0, 3.0))]
    merged = fv.merge_rows(old, new)
    assert [(r["dataset"], r["variant"]) for r in merged] == [("bottle", "default"), ("bottle", "seg0.2"),
                                                              ("nih", "default")]
    assert merged[1]["image_auroc"] == 1.0


def test_compare_and_the_three_dataset_rule():
    rows = [row(d, "default") for d in THREE]
    # seg0.2: better everywhere; lr1.5e-4: better on two, 2 points worse on NIH's AU-PRO
    rows += [row(d, "seg0.2", metrics=(90.0, 82.0, 71.0)) for d in THREE]
    rows += [row(d, "lr1.5e-4", metrics=(91.0, 80.0, 70.0 if d != "nih" else 68.0)) for d in THREE]
    rows += [row("bottle", "lr1.5e-4+seg0.2", metrics=(99.0, 99.0, 99.0))]  # only one data set: no verdict
    comps = fv.compare(rows)
    seg_bottle = next(c for c in comps if c["variant"] == "seg0.2" and c["dataset"] == "bottle")
    assert seg_bottle["delta"] == pytest.approx({"image_auroc": 0.0, "pixel_auroc": 2.0, "au_pro": 1.0})
    assert seg_bottle["helps"]
    assert fv.helps_everywhere(comps) == {"seg0.2": True, "lr1.5e-4": False}
    # a demo-profile row is compared with the demo-profile default only and gives no verdict on its own
    demo = [{**row("grass", v), "profile": "demo"} for v in ("default", "seg0.2")]
    assert [(c["profile"], c["dataset"]) for c in fv.compare(demo + rows) if c["dataset"] == "grass"] == [("demo", "grass")]
    # a row whose default (same seed) is missing is not compared
    assert not fv.compare([row("bottle", "seg0.2", seed=1), row("bottle", "default", seed=0)])


def test_report_renders_rows_deltas_and_the_verdict():
    rows = [row(d, "default") for d in THREE] + [row(d, "seg0.2", metrics=(90.0, 82.0, 71.0),
                                                          dice=(0.2, 0.55, 0.7)) for d in THREE]
    text = fv.render({"rows": fv.merge_rows([], rows)})
    assert "| paper | bottle | seg0.2 | 5e-05 | 0.2 | 0 | 3 × 2 | 32 / 4 | 1 | 90.00 | 82.00 | 71.00 | 0.20 0.55 0.70 | 2 |" in text
    assert "| paper | brick | seg0.2 | 0 | 3 | 1 | +0.00 | +2.00 | +1.00 | yes |" in text
    assert "seg0.2: yes" in text
    assert text.count("`nice -n 19 .venv/bin/python -m benchmarks.finetune_variants") == 6


def test_run_info_is_read_back_from_the_run_folder(tmp_path, monkeypatch):
    monkeypatch.setattr(fv, "RUNS", tmp_path)
    r = {**row("nih", "seg0.2"), "n_train": None, "n_val_images": None, "iters_per_epoch": None}
    assert fv.run_dir(r) == tmp_path / "nih" / "seg0.2" / "s0_e3_n32"
    assert fv.with_run_info(r) == r  # no run folder: unchanged
    (fv.run_dir(r) / "finetune").mkdir(parents=True)
    (fv.run_dir(r) / "finetune" / "config.json").write_text(
        '{"_run": {"n_train": 32, "n_val_images": 4, "iters_per_epoch": 2}, "seed": 0}')
    filled = fv.with_run_info(r)
    assert (filled["n_train"], filled["n_val_images"], filled["iters_per_epoch"]) == (32, 4, 2)
    assert fv.run_dir({**r, "profile": "demo"}) == tmp_path / "demo_profile" / "nih" / "seg0.2" / "s0"
