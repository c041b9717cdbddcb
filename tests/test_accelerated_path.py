"""The GPU configuration, exercised on the CPU: bf16 autocast, fused AdamW and compiled blocks through
pre-training, fine-tuning (with the validation signal) and evaluation, on a tiny model and real bottle
images. ``APMASK_ACCELERATED_ON_CPU=1`` (:func:`apmask_lib.core.devices.accelerated`) turns on on the CPU the
branches that otherwise only CUDA takes, so dtype or device mistakes in them surface here.

Still CUDA-only (torch has no CPU equivalent): CUDA graphs (``compile=reduce-overhead``), pinned memory
for the fine-tuning loader, NCCL for multi-GPU pre-training; ``non_blocking`` copies run but are
synchronous on the CPU. Inductor on the CPU is too slow for a test (docs/speed.md); ``aot_eager``
traces the same graphs through dynamo and AOTAutograd."""
from __future__ import annotations

import json
import math

import pytest
import torch

from apmask_lib.config import Config, replace
from apmask_lib.core.devices import accelerated, ACCELERATED_ON_CPU_ENV, autocast_context
from apmask_lib.core.files import load_checkpoint

pytestmark = pytest.mark.filterwarnings("ignore:backbone .random")


def test_seam_is_off_by_default(monkeypatch):
    monkeypatch.delenv(ACCELERATED_ON_CPU_ENV, raising=False)
    cpu = torch.device("cpu")
    assert not accelerated(cpu)
    with autocast_context(cpu):
        assert (torch.ones(2, 2) @ torch.ones(2, 2)).dtype == torch.float32
    monkeypatch.setenv(ACCELERATED_ON_CPU_ENV, "1")
    assert accelerated(cpu)
    with autocast_context(cpu):
        assert (torch.ones(2, 2) @ torch.ones(2, 2)).dtype == torch.bfloat16


def _cfg(tmp_path, mvtec_root, compile_mode: str) -> Config:
    return replace(Config(), seed=0, device="cpu", backbone="random:vit_tiny16", out_dir=str(tmp_path / "run"),
                   data={"dataset": "mvtec", "root": str(mvtec_root), "category": "bottle", "image_size": 64,
                         "max_train": 8, "max_test": 1},
                   pretrain={"epochs": 1, "batch_size": 4, "global_size": 64, "local_size": 32, "n_local": 2,
                             "hidden_dim": 64, "bottleneck_dim": 32, "warmup_epochs": 0, "num_workers": 0,
                             "log_every": 1, "compile": compile_mode},
                   finetune={"epochs": 1, "batch_size": 4, "warmup_epochs": 0, "num_workers": 0, "log_every": 1,
                             "lr": 1e-4, "compile": compile_mode, "val_fraction": 0.02, "val_max_images": 4},
                   evaluate={"scales": (64, 96), "figure_images": 0})


@pytest.mark.slow
def test_pretrain_finetune_evaluate_through_the_gpu_branches(tmp_path, mvtec_root, monkeypatch):
    from apmask_lib.evaluate.stage import run_evaluate
    from apmask_lib.finetune.stage import run_finetune
    from apmask_lib.weights import load_detector
    from apmask_lib.pretrain.stage import run_pretrain

    monkeypatch.setenv(ACCELERATED_ON_CPU_ENV, "1")
    cfg = _cfg(tmp_path, mvtec_root, "aot_eager")
    pdir = run_pretrain(cfg, progress=False)
    ck = load_checkpoint(pdir / "checkpoint.pt")
    assert all(g.get("fused") for g in ck["optimizer"]["param_groups"]), "pre-training did not use fused AdamW"
    assert all(v.dtype == torch.float32 for v in ck["student"].values() if v.is_floating_point())  # fp32 master weights
    epoch = json.loads((pdir / "log.jsonl").read_text().splitlines()[-1])
    assert math.isfinite(epoch["loss"]) and 0 < epoch["code_entropy"] <= math.log(cfg.pretrain.n_prototypes) + 1e-4

    fdir = run_finetune(cfg, progress=False)
    fk = load_checkpoint(fdir / "checkpoint.pt")
    assert all(g.get("fused") for g in fk["optimizer"]["param_groups"]), "fine-tuning did not use fused AdamW"
    val = (fdir / "validation.csv").read_text().splitlines()
    assert len(val) == 2 and "val_auroc" in val[0]
    rec = json.loads((fdir / "log.jsonl").read_text().splitlines()[-1])
    assert all(math.isfinite(rec[k]) for k in ("loss", "val_loss", "val_auroc", "val_dice"))

    # the autocast really runs in bf16: a linear layer's output inside the fine-tuned model's forward
    model = load_detector(fdir / "model.pt")
    seen = []
    linear = next(m for m in model.backbone.blocks[0].modules() if isinstance(m, torch.nn.Linear))
    linear.register_forward_hook(lambda m, i, o: seen.append(o.dtype))
    with autocast_context(torch.device("cpu")):
        model(torch.rand(1, 3, 64, 64))
    assert seen == [torch.bfloat16]

    m = run_evaluate(cfg)
    for k in ("image_auroc", "pixel_auroc", "au_pro"):
        assert m[k] is not None and math.isfinite(m[k]) and 0.0 <= m[k] <= 1.0, k
