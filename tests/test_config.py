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


def _choice_fields():
    """(section, field, allowed values) of every Literal-typed field of the config."""
    import dataclasses
    from typing import get_type_hints

    from apmask_lib.config import Config, choices

    out = []
    for sec in dataclasses.fields(Config):
        cls = get_type_hints(Config)[sec.name]
        owner = cls if dataclasses.is_dataclass(cls) else Config
        prefix = sec.name if dataclasses.is_dataclass(cls) else ""
        for f, tp in get_type_hints(owner).items():
            if choices(tp) and (prefix or f == sec.name):
                out.append((prefix, f, choices(tp)))
    return out


def test_every_choice_is_a_literal_checked_at_load():
    """Each string field with a fixed set of values is typed with a Literal from config.py's table,
    and a value outside it is refused when the params are read, naming the key and the choices."""
    fields = _choice_fields()
    names = {f"{s}.{f}" for s, f, _ in fields}
    assert {"data.dataset", "pretrain.mask", "pretrain.rank_source", "pretrain.teacher_view", "pretrain.compile",
            "finetune.anomaly", "finetune.poisson", "finetune.seg_maps", "finetune.blend", "finetune.dice",
            "finetune.seg_transform", "finetune.compile", "evaluate.score", "evaluate.threshold_on",
            "evaluate.knn_backbone", "evaluate.knn_sigma_at", "evaluate.fusion"} <= names
    for section, field, allowed in fields:
        key = f"{section}.{field}"
        assert load_params(None, [f"{key}={allowed[-1]}"]).to_dict()[section][field] == allowed[-1]
        with pytest.raises(ValueError, match=rf"{key} must be one of {', '.join(allowed)}, got 'bogus'"):
            load_params(None, [f"{key}=bogus"])


@pytest.mark.parametrize("raw, expected", [("on", "on"), ("off", "off"), ("yes", "on"), ("no", "off"),
                                           ("true", "on"), ("false", "off"), ("auto", "auto")])
def test_poisson_reads_yaml_booleans_as_on_off(raw, expected):
    """YAML 1.1 reads on/off/yes/no/true/false as booleans; finetune.poisson stores them as on/off."""
    assert load_params(None, [f"finetune.poisson={raw}"]).finetune.poisson == expected


def test_modules_take_their_choices_from_the_config_table():
    from apmask_lib import config
    from apmask_lib.core import fastpath
    from apmask_lib.finetune import anomalies
    from apmask_lib.pretrain import masking
    from apmask_lib.data import DATASETS
    from apmask_lib.models import detector

    assert anomalies.KINDS == config.ANOMALY_KINDS and masking.KINDS == config.MASK_KINDS
    assert fastpath.COMPILE_MODES == config.COMPILE_MODES and detector.SEG_MAPS == config.SEG_MAPS
    assert DATASETS == config.choices(config.Dataset)
