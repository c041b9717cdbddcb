"""The training-free backbone probe (apmask_lib/evaluate/probe.py) on real bottle images with a tiny random ViT."""
from __future__ import annotations

import pytest

from apmask_lib.config import Config, replace
import torch

from apmask_lib.evaluate.probe import METRICS, READOUTS, probe_backbone, probe_before_after
from apmask_lib.weights import build_backbone

pytestmark = pytest.mark.filterwarnings("ignore:backbone .random")


def tiny_cfg(mvtec_root, tmp_path):
    return replace(Config(), backbone="random:vit_tiny16", device="cpu", out_dir=str(tmp_path),
                   data={"dataset": "mvtec", "root": str(mvtec_root), "category": "bottle", "image_size": 64,
                         "max_train": 4, "max_test": 3}, pretrain={"hidden_dim": 32, "bottleneck_dim": 16})


@pytest.mark.slow
def test_probe_gives_every_readout_and_metric(mvtec_root, tmp_path):
    cfg = tiny_cfg(mvtec_root, tmp_path)
    out = probe_backbone(cfg, "random:vit_tiny16", tmp_path / "probe")
    assert list(out) == list(READOUTS)
    for name, m in out.items():
        assert set(m) == set(METRICS)
        assert all(v is not None and 0.0 <= v <= 100.0 for v in m.values()), (name, m)
    assert (tmp_path / "probe" / "knn_last" / "knn" / "model.pt").is_file()
    with pytest.raises(ValueError, match="unknown probe"):
        probe_backbone(cfg, "random:vit_tiny16", tmp_path / "p2", readouts=("nope",))


@pytest.mark.slow
def test_before_after_of_unchanged_weights_is_no_change(mvtec_root, tmp_path):
    """The notebook-01 table: a "teacher" that holds the starting weights probes exactly like the start,
    one row per read-out and metric; the evaluation folders go where ``work_dir`` says."""
    cfg = tiny_cfg(mvtec_root, tmp_path)
    teacher = tmp_path / "backbone.pt"
    torch.save(build_backbone(cfg.backbone, seed=cfg.seed).state_dict(), teacher)
    rows = probe_before_after(cfg, teacher, work_dir=tmp_path / "w")
    assert [(r["read-out"], r["metric"]) for r in rows] == [(k, m) for k in READOUTS for m in METRICS]
    assert all(r["before"] is not None and r["change"] == 0.0 and r["after"] == r["before"] for r in rows), rows
    assert (tmp_path / "w" / "before").is_dir() and (tmp_path / "w" / "after").is_dir()
