"""benchmarks/pretrain_probe.py: the LR readings reach the run, the probe rows, resume and the report, with a
tiny random ViT on real bottle images (two pre-training steps)."""
from __future__ import annotations

import json

import pytest
import torch

from benchmarks import common
from benchmarks import pretrain_probe as pp

pytestmark = pytest.mark.filterwarnings("ignore:backbone .random")


def test_relative_change_of_state_dicts():
    a = {"w": torch.ones(4), "n": torch.tensor([3])}
    b = {"w": torch.ones(4) * 2, "n": torch.tensor([1])}
    assert pp.relative_change(a, b) == pytest.approx(0.5)  # integer tensors are left out
    assert pp.relative_change(b, b) == 0.0


def test_config_per_reading_covers_the_steps():
    cfg, iters = pp.pretrain_config("bottle", "linear", 1000, 48, "dinov2-s14-offline")
    assert iters == 6 and cfg.pretrain.epochs == 167 and cfg.pretrain.warmup_epochs == 6
    assert cfg.pretrain.lr_scaling == "linear" and cfg.pretrain.global_size == 112 and cfg.pretrain.batch_size == 8


@pytest.mark.slow
def test_probe_run_rows_and_report(mvtec_root, tmp_path, monkeypatch):
    monkeypatch.setitem(common.DATA_ROOTS, "mvtec", str(mvtec_root))
    for name in ("JSON", "MD", "PNG"):
        monkeypatch.setattr(pp, name, tmp_path / getattr(pp, name).name)
    monkeypatch.setattr(pp, "RUNS", tmp_path / "runs")
    argv = ["--datasets", "bottle", "--lr-scaling", "linear", "--steps", "0", "2", "--max-train", "8", "--max-test", "2",
            "--probe-size", "64", "--backbone", "random:vit_tiny16"]
    assert pp.main(argv) == 0
    rows = json.loads((tmp_path / "pretrain_probe.json").read_text())["rows"]
    assert [r["step"] for r in rows] == [0, 2]
    assert rows[0]["teacher_change"] == 0.0 and rows[1]["teacher_change"] > 0
    assert rows[1]["peak_lr"] == pytest.approx(5e-4 * 8 / 256)
    assert rows[1]["diagnostics"]["lr_peak_so_far"] <= rows[1]["peak_lr"] + 1e-12
    assert set(rows[1]["probe"]) == set(pp.PROBE_KEYS)
    text = (tmp_path / "pretrain_probe.md").read_text()
    assert "| bottle | linear | 1.56e-05 | 2 |" in text and "benchmarks.pretrain_probe --datasets bottle" in text
    assert (tmp_path / "pretrain_probe.png").stat().st_size > 1000
