"""Fine-tuning: losses, the detector, synthetic batches, the training run (real bottle images),
exact resume, save/load, and the augmentation figures."""
from __future__ import annotations

import json
import warnings

import numpy as np
import pandas as pd
import pytest
import torch

from apmask_lib.config import Config, replace
from apmask_lib.data import build_dataset, resize_image
from apmask_lib.finetune.losses import detection_loss, dice_loss, finetune_loss
from apmask_lib.weights import build_backbone
from apmask_lib.models.detector import AnomalyDetector, attention_features
from apmask_lib.weights import load_detector, read_detector_checkpoint, save_detector

pytestmark = pytest.mark.filterwarnings("ignore:backbone .random.*random weights")


def _tiny(seed: int = 0):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return build_backbone("random:vit_tiny16", seed=seed)


@pytest.fixture(scope="module")
def bottle(mvtec_root):
    return build_dataset("mvtec", mvtec_root, "bottle")


def _cfg(tmp_path, **ft) -> Config:
    finetune = {"init": "random:vit_tiny16", "batch_size": 4, "epochs": 3, "warmup_epochs": 1, "num_workers": 0,
                "log_every": 2, "lr": 1e-4}
    finetune.update(ft)
    return replace(Config(out_dir=str(tmp_path), device="cpu", seed=3), data={"image_size": 64, "max_train": 8},
                   finetune=finetune, pretrain={"hidden_dim": 64, "bottleneck_dim": 32})


# ----------------------------------------------------------------------------- losses
def test_dice_loss_values():
    g = torch.zeros(2, 8, 8)
    g[0, 2:6, 2:6] = 1
    perfect = (g * 2 - 1) * 30
    assert dice_loss(perfect, g) < 1e-3
    assert dice_loss(-perfect, g) > 0.95
    # the formula, batch-joint: 1 - (2 Σpg + 1) / (Σp + Σg + 1)
    logits = torch.randn(2, 8, 8)
    p = torch.sigmoid(logits)
    expect = 1 - (2 * (p * g).sum() + 1) / (p.sum() + g.sum() + 1)
    assert torch.allclose(dice_loss(logits, g), expect)
    per = [1 - (2 * (p[i] * g[i]).sum() + 1) / (p[i].sum() + g[i].sum() + 1) for i in range(2)]
    assert torch.allclose(dice_loss(logits, g, reduction="mean"), torch.stack(per).mean())
    # an all-normal batch (empty masks) is well-defined and pushes predictions down
    empty = torch.zeros(2, 8, 8)
    x = torch.zeros(2, 8, 8, requires_grad=True)
    loss = dice_loss(x, empty)
    loss.backward()
    assert torch.isfinite(loss) and (x.grad > 0).all()
    # false positives on the normal image of a mixed batch are penalised
    fp = perfect.clone()
    fp[1] = 30
    assert dice_loss(fp, g) > dice_loss(perfect, g) + 0.3
    with pytest.raises(ValueError):
        dice_loss(torch.zeros(2, 8, 8), torch.zeros(2, 4, 4))


def test_finetune_loss_weights():
    logit, label = torch.tensor([2.0, -1.0]), torch.tensor([1.0, 0.0])
    seg, mask = torch.randn(2, 4, 4), torch.rand(2, 4, 4) > 0.5
    total, ld, ls = finetune_loss(logit, seg, label, mask, 0.95, 0.05)
    assert torch.allclose(ld, detection_loss(logit, label)) and torch.allclose(ls, dice_loss(seg, mask))
    assert torch.allclose(total, 0.95 * ld + 0.05 * ls)


# ----------------------------------------------------------------------------- detector
@pytest.mark.parametrize("seg_maps", ["heads", "heads_full", "tokens"])
@pytest.mark.slow
def test_detector_shapes_and_gradients(seg_maps):
    torch.manual_seed(0)
    model = AnomalyDetector(_tiny(), hidden_dim=64, bottleneck_dim=32, seg_maps=seg_maps)
    x = torch.rand(2, 3, 64, 96)
    out = model(x)
    assert out.logit.shape == (2,) and out.seg_logits.shape == (2, 64, 96) and out.cls.shape == (2, 96)
    # the segmentation loss alone reaches the backbone (through the attention for heads*)
    dice_loss(out.seg_logits, torch.rand(2, 64, 96) > 0.7).backward()
    qkv = model.backbone.blocks[-1].attn.qkv.weight.grad
    assert qkv is not None and qkv.abs().sum() > 0
    if seg_maps != "tokens":
        # only q and k feed the attention weights; the value projection gets no gradient from them
        assert qkv[:96].abs().sum() > 0 and qkv[192:].abs().sum() == 0
    assert model.det_out.weight.grad is None


@pytest.mark.parametrize("seg_maps", ["heads", "heads_full"])
@pytest.mark.slow
def test_detector_under_bf16_autocast(seg_maps):
    """The CUDA path trains under bf16 autocast: outputs and losses come back float32 and finite
    (checked here with CPU autocast)."""
    torch.manual_seed(0)
    model = AnomalyDetector(_tiny(), 64, 32, seg_maps)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(torch.rand(2, 3, 64, 64))
    assert out.logit.dtype == torch.float32 and out.seg_logits.dtype == torch.float32
    total, _, _ = finetune_loss(out.logit, out.seg_logits, torch.tensor([0.0, 1.0]), torch.rand(2, 64, 64) > 0.8)
    assert total.dtype == torch.float32 and torch.isfinite(total)
    total.backward()


@pytest.mark.slow
def test_heads_map_starts_as_log_mean_attention():
    """Initial 1x1 conv = mean over heads of log(N a): the log-geometric mean of Eq. 2's maps."""
    torch.manual_seed(0)
    model = AnomalyDetector(_tiny(), 64, 32, "heads").eval()
    x = torch.rand(1, 3, 64, 64)
    with torch.no_grad():
        out = model(x)
        a = model.backbone(x, attn="cls").attn  # (1, heads, 16)
        expect = torch.log(16 * a + 1e-6).mean(1).reshape(1, 1, 4, 4)
        expect = torch.nn.functional.interpolate(expect, size=(64, 64), mode="bilinear", align_corners=False)[:, 0]
    assert torch.allclose(out.seg_logits, expect, atol=1e-5)
    feats = attention_features(model.backbone(x, attn="full").attn, (4, 4), "heads_full")
    assert feats.shape == (1, 6, 4, 4)


@pytest.mark.slow
def test_save_load_roundtrip(tmp_path):
    torch.manual_seed(1)
    model = AnomalyDetector(_tiny(), 64, 32, "heads_full", seg_transform="linear").eval()
    path = save_detector(tmp_path / "model.pt", model, {"seed": 1}, meta={"step": 5})
    loaded = load_detector(path)
    x = torch.rand(2, 3, 64, 64)
    with torch.no_grad():
        a, b = model(x), loaded(x)
    for k in ("logit", "seg_logits", "cls"):
        assert torch.equal(getattr(a, k), getattr(b, k))
    assert loaded.seg_maps == "heads_full" and loaded.seg_transform == "linear"
    torch.save({"x": torch.zeros(1)}, tmp_path / "other.pt")
    with pytest.raises(ValueError, match="not an apmask detector"):
        load_detector(tmp_path / "other.pt")
    with pytest.raises(FileNotFoundError, match="fine-tuning"):
        load_detector(tmp_path / "missing.pt")


# ----------------------------------------------------------------------------- batches
@pytest.mark.slow
def test_batches_do_not_depend_on_workers(bottle):
    from apmask_lib.finetune.stage import SyntheticBatches, batch_loader

    imgs = np.stack([resize_image(bottle.image(s), 64) for s in bottle.train[:6]])
    atts = np.random.default_rng(0).random((6, 4, 4)).astype(np.float32)
    sb = SyntheticBatches(imgs, atts, batch_size=3, seed=5, kind="attention", poisson=True)
    assert sb.steps_per_epoch == 2
    assert sorted(np.concatenate([sb.indices(0), sb.indices(1)]).tolist()) == list(range(6))
    a = list(batch_loader(sb, 0, 4, num_workers=0))
    b = list(batch_loader(sb, 0, 4, num_workers=2))
    for x, y in zip(a, b):
        for k in ("images", "masks", "labels"):
            assert torch.equal(x[k], y[k])
    assert a[0]["images"].dtype == torch.uint8 and a[0]["images"].shape == (3, 3, 64, 64)
    assert a[0]["labels"].sum() == 2  # round(0.5 * 3) anomalous
    assert not torch.equal(a[0]["images"], a[2]["images"])


# ----------------------------------------------------------------------------- the run
@pytest.mark.slow
def test_finetune_steps_lower_the_loss_on_real_images(bottle, offline_backbone):
    """Ten steps of the training step on one batch of real bottle images with attention-guided
    anomalies (real offline backbone, 84 px): the loss, and the Dice loss above all, drop."""
    import copy

    from apmask_lib.finetune.stage import SyntheticBatches, attention_maps, build_detector, param_groups, train_step

    cfg = replace(Config(seed=3), pretrain={"hidden_dim": 256, "bottleneck_dim": 64})
    imgs = np.stack([resize_image(bottle.image(s), 84) for s in bottle.train[:8]])
    torch.manual_seed(0)
    model = build_detector(cfg, copy.deepcopy(offline_backbone))  # the fixture is shared: train a copy
    atts = attention_maps(model.backbone, imgs, torch.device("cpu"), progress=False)
    batch = SyntheticBatches(imgs, atts, batch_size=8, seed=3)[0]
    assert batch["labels"].sum() == 4 and batch["masks"].any()

    def loss_of():
        model.eval()
        with torch.no_grad():
            o = model(batch["images"].float() / 255)
        model.train()
        return finetune_loss(o.logit, o.seg_logits, batch["labels"], batch["masks"])

    before = loss_of()
    opt = torch.optim.AdamW(param_groups(model), lr=1e-4, weight_decay=0.04)
    model.train()
    for _ in range(10):
        r = train_step(model, opt, batch, cfg.finetune, torch.device("cpu"))
        assert set(r) == {"loss", "loss_det", "loss_seg", "acc"}
    after = loss_of()
    assert after[0] < 0.95 * before[0]
    assert after[2] < before[2] - 0.2


@pytest.mark.slow
def test_run_writes_logs_and_model(tmp_path, bottle):
    from apmask_lib.finetune.stage import run_finetune

    out = run_finetune(_cfg(tmp_path), bottle, max_steps=4, progress=False)
    log = pd.read_csv(out / "log.csv")
    assert list(log.columns) == ["step", "epoch", "loss", "loss_det", "loss_seg", "lr", "step_time", "images_per_s"]
    assert log["step"].tolist() == [0, 1, 2, 3] and log["epoch"].tolist() == [0, 0, 1, 1]
    assert np.isfinite(log[["loss", "loss_det", "loss_seg"]].to_numpy()).all()
    # warm-up of one epoch from start_lr, then cosine
    assert log["lr"].iloc[0] == pytest.approx(1e-5) and log["lr"].iloc[2] == pytest.approx(1e-4)
    lines = (out / "log.jsonl").read_text().splitlines()
    assert len(lines) == 2 and {"epoch", "loss", "loss_det", "loss_seg", "acc", "lr"} <= set(json.loads(lines[0]))
    cfg_json = json.loads((out / "config.json").read_text())
    assert cfg_json["_run"]["poisson"] is False and cfg_json["_run"]["iters_per_epoch"] == 2
    model = load_detector(out / "model.pt")
    with torch.no_grad():
        o = model(torch.rand(1, 3, 64, 64))
    assert o.seg_logits.shape == (1, 64, 64)


@pytest.mark.slow
def test_resume_is_exact_and_finished_runs_are_kept(tmp_path, bottle):
    from apmask_lib.finetune.stage import run_finetune
    from apmask_lib.core.files import load_checkpoint

    full = run_finetune(_cfg(tmp_path / "a"), bottle, progress=False)  # 3 epochs x 2 steps
    part = run_finetune(_cfg(tmp_path / "b"), bottle, max_steps=3, progress=False)  # stops mid-epoch
    assert load_checkpoint(part / "checkpoint.pt")["step"] == 3
    meta = read_detector_checkpoint(part / "model.pt")["meta"]
    assert meta == {"step": 3, "total_steps": 6, "done": False}
    run_finetune(_cfg(tmp_path / "b"), bottle, progress=False)
    assert read_detector_checkpoint(part / "model.pt")["meta"]["done"] is True
    sa = load_checkpoint(full / "checkpoint.pt")["model"]
    sb = load_checkpoint(part / "checkpoint.pt")["model"]
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)
    la, lb = pd.read_csv(full / "log.csv"), pd.read_csv(part / "log.csv")
    assert lb["step"].tolist() == list(range(6))
    np.testing.assert_array_equal(la["loss"].to_numpy(), lb["loss"].to_numpy())
    assert len(open(part / "log.jsonl").read().splitlines()) == 3
    # a finished run is not retrained
    stamp = (full / "model.pt").stat().st_mtime_ns, (full / "log.csv").read_text()
    run_finetune(_cfg(tmp_path / "a"), bottle, progress=False)
    assert stamp == ((full / "model.pt").stat().st_mtime_ns, (full / "log.csv").read_text())
    # a changed configuration is refused on resume
    with pytest.raises(ValueError, match="different configuration"):
        run_finetune(_cfg(tmp_path / "a", lr=3e-4), bottle, progress=False)


@pytest.mark.parametrize("kind", ["nsa", "scar"])
@pytest.mark.slow
def test_baseline_kinds_train(tmp_path, bottle, kind):
    from apmask_lib.finetune.stage import run_finetune

    out = run_finetune(_cfg(tmp_path, anomaly=kind, seg_maps="tokens", poisson="on"), bottle, max_steps=2,
                       progress=False)
    assert len(pd.read_csv(out / "log.csv")) == 2
    assert load_detector(out / "model.pt").seg_maps == "tokens"


def test_missing_pretrained_backbone_is_a_clear_error(tmp_path, bottle):
    from apmask_lib.finetune.stage import run_finetune

    with pytest.raises(FileNotFoundError, match=r"pretrain/backbone\.pt.*finetune\.init"):
        run_finetune(_cfg(tmp_path, init="pretrain"), bottle, max_steps=1, progress=False)


@pytest.mark.slow
def test_pretrained_backbone_file_is_used(tmp_path, bottle):
    from apmask_lib.finetune.stage import initial_backbone

    bb = _tiny(seed=7)
    (tmp_path / "pretrain").mkdir()
    torch.save(bb.state_dict(), tmp_path / "pretrain" / "backbone.pt")
    got = initial_backbone(_cfg(tmp_path, init="pretrain"))
    assert all(torch.equal(a, b) for a, b in zip(bb.state_dict().values(), got.state_dict().values()))


@pytest.mark.slow
def test_nan_loss_stops_with_a_clear_error(tmp_path, bottle, monkeypatch):
    import apmask_lib.finetune.stage as ft

    def bad(*args, **kw):
        total, ld, ls = finetune_loss(*args, **kw)
        return total * float("nan"), ld, ls

    monkeypatch.setattr(ft, "finetune_loss", bad)
    with pytest.raises(FloatingPointError, match="fine-tuning loss is nan at step 0"):
        ft.run_finetune(_cfg(tmp_path), bottle, max_steps=2, progress=False)
    assert not (tmp_path / "finetune" / "checkpoint.pt").exists()


# ----------------------------------------------------------------------------- figures
@pytest.mark.slow
def test_figures_are_written(tmp_path, bottle):
    from apmask_lib.viz.synthetic import fig_attention_panel, fig_synthetic_grid

    images = [bottle.image(s) for s in bottle.train[:2]]
    bb = _tiny()
    p1 = fig_attention_panel(images, bb, tmp_path / "fig1.png", size=112, run="mvtec / bottle / seed 0")
    p2 = fig_synthetic_grid(images, ["attention", "cutpaste", "scar", "nsa", "fpi"], tmp_path / "fig4b.png",
                            backbone=bb, size=112, run="mvtec / bottle / seed 0")
    for p in (p1, p2):
        assert p.is_file() and p.stat().st_size > 20_000
        assert p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(ValueError, match="attention"):
        fig_synthetic_grid(images, ["attention"], tmp_path / "x.png", run="mvtec / bottle / seed 0")


@pytest.mark.slow
def test_compiled_blocks_train_like_eager(tmp_path, bottle):
    """finetune.compile (apmask_lib/core/fastpath.py) changes how the blocks run, not what they compute:
    the same losses are logged and model.pt has the same keys and (to float tolerance) values."""
    from apmask_lib.finetune.stage import run_finetune

    outs = {m: run_finetune(_cfg(tmp_path / m, compile=m), bottle, max_steps=2, progress=False)
            for m in ("none", "aot_eager")}
    logs = {m: pd.read_csv(o / "log.csv") for m, o in outs.items()}
    assert np.allclose(logs["none"]["loss"], logs["aot_eager"]["loss"], atol=1e-5)
    a, b = (load_detector(o / "model.pt").state_dict() for o in outs.values())
    assert a.keys() == b.keys() and all(torch.allclose(a[k], b[k], atol=1e-5) for k in a)
