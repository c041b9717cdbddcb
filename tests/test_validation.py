"""The label-free validation signal of fine-tuning, the per-dataset flip default, and the collapse
diagnostics of pre-training (pure functions; the run-level logging is checked in
tests/test_accelerated_path.py)."""
from __future__ import annotations

import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from apmask_lib.pretrain.collapse import STAT_COLUMNS, assignment_stats
from apmask_lib.config import Config, replace
from apmask_lib.finetune.stage import resolve_hflip
from apmask_lib.pretrain.sinkhorn import sinkhorn
from apmask_lib.finetune.validation import holdout_indices, make_validation_set, score_validation, soft_dice


def test_holdout_is_fixed_disjoint_and_capped():
    tr, va = holdout_indices(209, 0.1, 32)
    assert len(va) == 21 and len(tr) == 188 and not set(tr) & set(va) and set(tr) | set(va) == set(range(209))
    tr2, va2 = holdout_indices(209, 0.1, 32)
    assert np.array_equal(va, va2)                         # fixed seed: the same slice every time
    assert len(holdout_indices(1000, 0.1, 32)[1]) == 32     # capped
    assert len(holdout_indices(8, 0.1, None)[1]) == 2       # at least 2 for an AUROC
    assert len(holdout_indices(3, 0.5, None)[1]) == 0       # never below 2 training images
    assert len(holdout_indices(50, 0.0, None)[1]) == 0
    with pytest.raises(ValueError, match="val_fraction"):
        holdout_indices(10, 1.0, None)


def _images(n=4, size=64, seed=0):
    rng = np.random.default_rng(seed)
    base = np.full((n, size, size, 3), 128, np.uint8)
    return np.clip(base + rng.integers(-20, 20, base.shape), 0, 255).astype(np.uint8)


def test_validation_set_is_normals_then_their_anomalies_and_reproducible():
    ims = _images()
    v1 = make_validation_set(ims, None, "cutpaste")
    v2 = make_validation_set(ims, None, "cutpaste")
    assert len(v1) == 8 and v1.labels.tolist() == [0] * 4 + [1] * 4
    assert torch.equal(v1.images, v2.images) and torch.equal(v1.masks, v2.masks)
    assert torch.equal(v1.images[:4], torch.from_numpy(ims).permute(0, 3, 1, 2))  # normals untouched (no flip/jitter)
    assert not v1.masks[:4].any() and all(v1.masks[i].any() for i in range(4, 8))


class _Oracle(torch.nn.Module):
    """Detector stand-in: logit = +5 where the image differs from the reference normals, seg = the truth."""

    def __init__(self, val, flip: bool = False):
        super().__init__()
        self.val, self.flip, self.w = val, flip, torch.nn.Parameter(torch.zeros(()))

    def forward(self, x):
        n = x.shape[0]
        labels = self.val.labels[self._offset:self._offset + n]
        masks = self.val.masks[self._offset:self._offset + n].float()
        self._offset += n
        sign = -1.0 if self.flip else 1.0
        return SimpleNamespace(logit=sign * (labels * 10 - 5), seg_logits=(masks * 2 - 1) * 30 * sign)


def test_score_validation_perfect_and_inverted():
    val = make_validation_set(_images(), None, "cutpaste")
    f = SimpleNamespace(det_weight=0.95, seg_weight=0.05)
    good = _Oracle(val)
    good._offset = 0
    s = score_validation(good, val, torch.device("cpu"), f, batch_size=3)
    assert s["val_auroc"] == 1.0 and s["val_acc"] == 1.0 and s["val_dice"] > 0.99 and good.training
    bad = _Oracle(val, flip=True)
    bad._offset = 0
    s = score_validation(bad, val, torch.device("cpu"), f, batch_size=8)
    assert s["val_auroc"] == 0.0 and s["val_acc"] == 0.0 and s["val_dice"] < 0.01
    assert soft_dice(torch.zeros(2, 4, 4), torch.zeros(2, 4, 4)) == 1.0  # both empty: smoothed to 1


def test_hflip_default_depends_on_the_dataset():
    assert resolve_hflip(Config()) == 0.5
    assert resolve_hflip(replace(Config(), data={"dataset": "nih"})) == 0.0
    assert resolve_hflip(replace(Config(), data={"dataset": "nih"}, finetune={"hflip": 0.5})) == 0.5
    with pytest.raises(ValueError, match="finetune.hflip"):
        resolve_hflip(replace(Config(), finetune={"hflip": 1.5}))


def test_collapse_statistics_tell_collapse_from_learning():
    K, B, tau = 20, 16, 0.1
    g = torch.Generator().manual_seed(0)
    # collapsed: every image has the same teacher and student scores
    same = torch.nn.functional.normalize(torch.randn(1, K, generator=g), dim=1).repeat(B, 1)
    q = sinkhorn(same, 0.05, 3)
    st = assignment_stats(same, q / q.sum(1, keepdim=True), [same.repeat(3, 1)], tau)
    assert set(st) == set(STAT_COLUMNS)
    assert st["teacher_spread"] < 1e-6 and st["code_entropy"] == pytest.approx(math.log(K), abs=1e-4)
    # learning: distinct, confident teacher scores that the student predicts
    t = torch.full((B, K), -0.5)
    t[torch.arange(B), torch.arange(B)] = 1.0
    q = sinkhorn(t, 0.05, 3)
    codes = q / q.sum(1, keepdim=True)
    st2 = assignment_stats(t, codes, [t.repeat(2, 1)], tau)
    assert st2["teacher_spread"] > 0.1 and st2["code_entropy"] < 0.5 * math.log(K)
    assert st2["agreement"] == 1.0 and st2["protos_used"] == B and st2["student_entropy"] < st["student_entropy"]
