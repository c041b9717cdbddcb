"""The fine-tuning stabilisers (off by default): per-parameter learning-rate scales (backbone share,
layer-wise decay) and the weight average; the default stays the paper's single learning rate."""
from __future__ import annotations

import json
import warnings

import pytest
import torch

from apmask_lib.config import Config, replace
from apmask_lib.finetune.stage import WeightAverage, build_detector, run_finetune
from apmask_lib.core.optim import backbone_depth, lr_scale, param_groups, set_lr
from apmask_lib.weights import build_backbone, load_detector

pytestmark = pytest.mark.filterwarnings("ignore:backbone .random.*random weights")


def _detector(seed: int = 0):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        bb = build_backbone("random:vit_tiny16", seed=seed)
    return build_detector(replace(Config(), pretrain={"hidden_dim": 32, "bottleneck_dim": 16}), bb)


def test_layer_ids_and_scales():
    L = 12
    assert backbone_depth("backbone.patch_embed.proj.weight", L) == 0
    assert backbone_depth("backbone.cls_token", L) == 0
    assert backbone_depth("backbone.blocks.0.attn.qkv.weight", L) == 1
    assert backbone_depth("backbone.blocks.11.mlp.fc1.weight", L) == 12
    assert backbone_depth("backbone.norm.weight", L) == 13
    assert backbone_depth("det_out.weight", L) is None and backbone_depth("seg.weight", L) is None
    # heads always 1; the final norm gets backbone_scale; block i gets decay^(L - i); embeddings the least
    assert lr_scale("det_mlp.layers.0.weight", L, 0.5, 0.1) == 1.0
    assert lr_scale("backbone.norm.weight", L, 0.5, 0.1) == pytest.approx(0.1)
    assert lr_scale("backbone.blocks.11.attn.qkv.weight", L, 0.5, 0.1) == pytest.approx(0.1 * 0.5)
    assert lr_scale("backbone.blocks.0.attn.qkv.weight", L, 0.5, 0.1) == pytest.approx(0.1 * 0.5 ** 12)
    assert lr_scale("backbone.pos_embed", L, 0.5, 1.0) == pytest.approx(0.5 ** 13)
    assert lr_scale("backbone.blocks.3.attn.qkv.weight", L) == 1.0


def test_default_groups_are_the_two_of_the_paper():
    model = _detector()
    groups = param_groups(model)
    assert len(groups) == 2 and all("lr_scale" not in g for g in groups)
    assert groups[1]["weight_decay"] == 0.0
    n = sum(1 for p in model.parameters() if p.requires_grad)
    assert len(groups[0]["params"]) + len(groups[1]["params"]) == n


def test_scaled_groups_cover_every_parameter_once_with_its_scale():
    model = _detector()
    groups = param_groups(model, layer_decay=0.75, backbone_scale=0.1)
    ids = [id(p) for g in groups for p in g["params"]]
    assert len(ids) == len(set(ids)) == sum(1 for p in model.parameters() if p.requires_grad)
    depth = len(model.backbone.blocks)
    names = {id(p): n for n, p in model.named_parameters()}
    for g in groups:
        for p in g["params"]:
            assert g["lr_scale"] == pytest.approx(lr_scale(names[id(p)], depth, 0.75, 0.1))
    opt = torch.optim.AdamW(groups, lr=1.0)
    set_lr(opt, 2e-4)
    assert {round(g["lr"] / 2e-4, 12) for g in opt.param_groups} == {round(g["lr_scale"], 12) for g in groups}
    # groups without a scale (the default) take the schedule's value as it is
    opt = torch.optim.AdamW(param_groups(model), lr=1.0)
    set_lr(opt, 3e-5)
    assert all(g["lr"] == 3e-5 for g in opt.param_groups)


def test_weight_average_warms_up_and_follows_the_weights():
    model = torch.nn.Linear(3, 1)
    avg = WeightAverage(model, 0.9)
    assert avg.momentum_at(0) == pytest.approx(0.1) and avg.momentum_at(1000) == 0.9
    start = [p.detach().clone() for p in avg.model.parameters()]
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    avg.update(model, 0)  # m = 0.1: 90 % of the way to the new weights
    for a, s, p in zip(avg.model.parameters(), start, model.parameters()):
        assert torch.allclose(a, 0.1 * s + 0.9 * p.detach())
        assert not a.requires_grad
    with pytest.raises(ValueError, match="finetune.ema"):
        WeightAverage(model, 1.0)


def test_config_bounds_name_the_key():
    with pytest.raises(ValueError, match="finetune.layer_decay"):
        replace(Config(), finetune={"layer_decay": 0.0})
    with pytest.raises(ValueError, match="finetune.ema"):
        replace(Config(), finetune={"ema": 1.0})
    with pytest.raises(ValueError, match="finetune.backbone_lr_scale"):
        replace(Config(), finetune={"backbone_lr_scale": -0.1})


def _cfg(tmp_path, **ft) -> Config:
    finetune = {"init": "random:vit_tiny16", "batch_size": 4, "epochs": 2, "warmup_epochs": 1, "num_workers": 0,
                "log_every": 2, "lr": 1e-4}
    finetune.update(ft)
    return replace(Config(out_dir=str(tmp_path), device="cpu", seed=3), data={"image_size": 64, "max_train": 8},
                   finetune=finetune, pretrain={"hidden_dim": 64, "bottleneck_dim": 32})


@pytest.fixture(scope="module")
def bottle(mvtec_root):
    from apmask_lib.data import build_dataset

    return build_dataset("mvtec", mvtec_root, "bottle")


@pytest.mark.slow
def test_frozen_backbone_keeps_its_weights_and_the_heads_learn(tmp_path, bottle):
    cfg = _cfg(tmp_path, backbone_lr_scale=0.0)
    fdir = run_finetune(cfg, bottle, progress=False)
    trained = load_detector(fdir / "model.pt")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        start = build_backbone("random:vit_tiny16", seed=cfg.seed)
    for (n, a), b in zip(trained.backbone.state_dict().items(), start.state_dict().values()):
        assert torch.equal(a, b), n
    fresh = build_detector(cfg, start)
    assert not torch.equal(trained.det_out.weight, fresh.det_out.weight)


@pytest.mark.slow
def test_weight_average_is_exported_and_resumes_exactly(tmp_path, bottle):
    whole = run_finetune(_cfg(tmp_path / "whole", ema=0.8), bottle, progress=False)
    part = _cfg(tmp_path / "part", ema=0.8)
    run_finetune(part, bottle, max_steps=2, progress=False)
    parted = run_finetune(part, bottle, progress=False)
    a, b = load_detector(whole / "model.pt"), load_detector(parted / "model.pt")
    for (n, x), y in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(x, y), n
    # the export is the average, not the last weights kept in the checkpoint
    ck = torch.load(whole / "checkpoint.pt", weights_only=True)
    last = ck["model"]
    assert any(not torch.equal(last[k], v) for k, v in a.state_dict().items() if k in last)
    for k, v in ck["ema"].items():
        assert torch.equal(a.state_dict()[k], v), k
    # a checkpoint written without an average cannot silently resume with one
    plain = _cfg(tmp_path / "plain")
    run_finetune(plain, bottle, max_steps=2, progress=False)
    with pytest.raises(ValueError):
        run_finetune(replace(plain, finetune={"ema": 0.8}), bottle, progress=False)
    assert json.loads((whole / "done.json").read_text())["done"]
