"""The training-free backbone probe (apmask_lib/evaluate/probe.py) on real bottle images with a tiny random ViT."""
from __future__ import annotations

import pytest

from apmask_lib.config import Config, replace
from apmask_lib.evaluate.probe import METRICS, READOUTS, probe_backbone

pytestmark = pytest.mark.filterwarnings("ignore:backbone .random")


@pytest.mark.slow
def test_probe_gives_every_readout_and_metric(mvtec_root, tmp_path):
    cfg = replace(Config(), backbone="random:vit_tiny16", device="cpu", out_dir=str(tmp_path),
                  data={"dataset": "mvtec", "root": str(mvtec_root), "category": "bottle", "image_size": 64,
                        "max_train": 4, "max_test": 3}, pretrain={"hidden_dim": 32, "bottleneck_dim": 16})
    out = probe_backbone(cfg, "random:vit_tiny16", tmp_path / "probe")
    assert list(out) == list(READOUTS)
    for name, m in out.items():
        assert set(m) == set(METRICS)
        assert all(v is not None and 0.0 <= v <= 100.0 for v in m.values()), (name, m)
    assert (tmp_path / "probe" / "knn_last" / "knn" / "model.pt").is_file()
    with pytest.raises(ValueError, match="unknown probe"):
        probe_backbone(cfg, "random:vit_tiny16", tmp_path / "p2", readouts=("nope",))
