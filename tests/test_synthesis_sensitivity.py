"""benchmarks/synthesis_sensitivity.py: the perturbation's size, the mask IoU and the batch comparison."""
from __future__ import annotations

import pytest
import torch

from benchmarks import synthesis_sensitivity as s


def test_perturbation_has_the_asked_relative_size_and_leaves_the_original():
    torch.manual_seed(0)
    m = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.Linear(64, 8))
    before = [p.detach().clone() for p in m.parameters()]
    out, rel = s.perturbed(m, 1e-3)
    assert rel == pytest.approx(1e-3, rel=0.1)
    assert all(torch.equal(a, b) for a, b in zip(before, m.parameters()))
    assert any(not torch.equal(a, b) for a, b in zip(out.parameters(), m.parameters()))


def test_mask_iou_and_batch_comparison():
    a = torch.zeros(2, 4, 4)
    a[0, :2] = 1
    b = a.clone()
    b[0, 1] = 0
    assert s.mask_iou(a, a) == 1.0 and s.mask_iou(a, b) == pytest.approx(0.5)
    assert s.mask_iou(torch.zeros(1, 2, 2), torch.zeros(1, 2, 2)) == 1.0
    x = [{"masks": a, "images": torch.zeros(1)}, {"masks": a, "images": torch.zeros(1)}]
    y = [{"masks": a, "images": torch.zeros(1)}, {"masks": b, "images": torch.zeros(1)}]
    c = s.compare_batches(x, y, 2)
    assert c["identical_steps"] == 1 and c["first_different"] == 1 and c["mean_mask_iou"] == pytest.approx(0.75)
