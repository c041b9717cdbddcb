"""The typed config: defaults are the paper's, overrides are typed, typos are errors."""
from __future__ import annotations

import pytest
import yaml

from apmask_lib.config import load_params, replace


def test_defaults_are_the_papers():
    cfg = load_params(None)
    p, f = cfg.pretrain, cfg.finetune
    assert (p.epochs, p.batch_size, p.mask, p.mask_ratio, p.n_local, p.global_size, p.local_size) == \
        (300, 16, "apmask", 0.3, 8, 224, 96)
    assert (p.n_prototypes, p.temperature, p.out_dim, p.lr, p.start_lr, p.warmup_epochs) == (20, 0.1, 256, 5e-4, 1e-5, 10)
    assert (f.epochs, f.det_weight, f.seg_weight) == (100, 0.95, 0.05)
    assert cfg.evaluate.scales == (224, 320, 384, 416, 448, 512)


def test_overrides_are_typed():
    cfg = load_params(None, ["finetune.lr=5e-5", "pretrain.epochs=3", "evaluate.scales=[224, 320]",
                             "data.category: bottle"])
    assert cfg.finetune.lr == 5e-5 and isinstance(cfg.finetune.lr, float)
    assert cfg.pretrain.epochs == 3 and cfg.evaluate.scales == (224, 320) and cfg.data.category == "bottle"
    with pytest.raises(ValueError, match="finetune.lr"):
        load_params(None, ["finetune.lr=fast"])
    with pytest.raises(ValueError, match="override"):
        load_params(None, ["finetune.lr"])


def test_unknown_keys_are_errors(tmp_path):
    p = tmp_path / "params.yaml"
    p.write_text(yaml.safe_dump({"pretrain": {"epoch": 3}}))
    with pytest.raises(ValueError, match="unknown key.*epoch"):
        load_params(p)
    with pytest.raises(FileNotFoundError):
        load_params(tmp_path / "missing.yaml")


def test_replace_copies():
    cfg = load_params(None)
    new = replace(cfg, pretrain={"epochs": 1}, seed=3)
    assert new.pretrain.epochs == 1 and new.seed == 3 and cfg.pretrain.epochs == 300
