"""Helpers shared by several test files (a test file never imports another test file)."""
from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from apmask_lib.pretrain import stage as P
from apmask_lib.config import Config, replace
from apmask_lib.pretrain.multicrop import MultiCrop


# ---- evaluation with a stand-in detector (tests/test_evaluate.py, tests/test_knn.py) ----------------
@dataclass
class FakeOutput:
    logit: torch.Tensor
    seg_logits: torch.Tensor
    cls: torch.Tensor


class ConstantMap(nn.Module):
    """Every pixel gets probability 0.5 (all tied); image logit from the mean red value."""

    patch_size = 16

    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.zeros(1))

    def forward(self, x):
        red = x[:, 0].mean(dim=(1, 2))
        return FakeOutput(10 * (red - 0.5), torch.zeros(x.shape[0], *x.shape[-2:]), x.mean(dim=(2, 3)))


def micro_cfg(tmp_path: Path, mvtec_root: Path, **evaluate) -> Config:
    cfg = Config()
    return replace(cfg, out_dir=str(tmp_path / "run"), device="cpu", backbone="random:vit_tiny16",
                   data={"dataset": "mvtec", "root": str(mvtec_root), "category": "bottle", "max_test": 2,
                         "max_train": 4},
                   finetune={"epochs": 1, "batch_size": 4, "init": "random:vit_tiny16", "warmup_epochs": 0,
                             "num_workers": 0},
                   evaluate={"scales": (224, 320), "batch_size": 4, **evaluate})


# ---- a tiny pre-training setup (tests/test_fastpath.py, tests/test_rank_source.py) ------------------
TINY = {"global_size": 64, "local_size": 32, "n_local": 3, "hidden_dim": 64, "batch_size": 4, "epochs": 1,
        "warmup_epochs": 0, "log_every": 1}


def tiny_setup(mask: str, seed: int = 0, sizes=((80, 72),) * 4, **pretrain):
    """Tiny config, student, a perturbed teacher and one batch of views of 4 random images;
    ``sizes`` the images' valid (h, w), ``pretrain`` further pretrain overrides."""
    cfg = replace(Config(), seed=seed, backbone="random:vit_tiny16", device="cpu",
                  pretrain={**TINY, "mask": mask, **pretrain})
    torch.manual_seed(seed)
    student = P.build_student(cfg)
    teacher = copy.deepcopy(student).eval()
    with torch.no_grad():  # a teacher that differs from the student, as after some EMA steps
        for p in teacher.parameters():
            p.add_(0.01 * torch.randn_like(p))
    g = torch.Generator().manual_seed(seed)
    imgs = torch.randint(0, 256, (4, 3, 80, 72), dtype=torch.uint8, generator=g)
    views = MultiCrop.from_config(cfg.pretrain)(imgs, torch.tensor(sizes), g)
    return cfg, student, teacher, views
