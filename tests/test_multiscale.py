"""Multi-scale inference: sizes, voting, and maps at the original resolution averaged over scales."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from apmask_lib.inference.multiscale import (majority_vote, model_patch_size, predict_multiscale, scale_sizes, snap_size)
from helpers import FakeOutput


class ConstantPerScale(nn.Module):
    """seg = logit(s / 1000) everywhere at input size s; image logit = logit(mean red of the input)."""

    patch_size = 16

    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.zeros(1))
        self.seen: list[tuple[int, int]] = []

    def forward(self, x):
        B, _, H, W = x.shape
        self.seen.append((H, W))
        p = torch.full((B, H, W), H / 1000.0)
        red = x[:, 0].mean(dim=(1, 2)).clamp(1e-4, 1 - 1e-4)
        return FakeOutput(torch.logit(red), torch.logit(p), torch.stack([red, red * 0 + H], 1))


class RedChannel(nn.Module):
    """seg = logit(red channel): the averaged map should reproduce the image's red channel."""

    patch_size = 16

    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.zeros(1))

    def forward(self, x):
        r = x[:, 0].clamp(1e-4, 1 - 1e-4)
        return FakeOutput(torch.zeros(x.shape[0]), torch.logit(r), torch.zeros(x.shape[0], 2))


def test_sizes_snap_to_the_patch_grid():
    paper = (224, 320, 384, 416, 448, 512)
    assert scale_sizes(paper, 16) == paper
    assert scale_sizes(paper, 14) == (224, 322, 378, 420, 448, 518)
    assert snap_size(7, 14) == 14 and snap_size(21, 14) == 28  # halves round up
    assert scale_sizes((224, 225, 230), 16) == (224,)           # duplicates used once
    with pytest.raises(ValueError):
        scale_sizes((), 16)


def test_majority_vote_ties_are_anomalous():
    probs = np.array([[0.9, 0.9, 0.1, 0.1],   # 2 of 4: tie -> anomalous
                      [0.9, 0.1, 0.1, 0.1],   # 1 of 4 -> normal
                      [0.5, 0.5, 0.5, 0.5],   # p > 0.5 is required
                      [0.6, 0.6, 0.6, 0.1]])
    assert majority_vote(probs).tolist() == [True, False, False, True]
    assert majority_vote(np.array([[0.6, 0.4, 0.4]])).tolist() == [False]


def test_maps_have_original_size_and_are_the_mean_over_scales():
    model = ConstantPerScale()
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 256, (100, 150, 3), dtype=np.uint8), rng.integers(0, 256, (301, 200, 3), dtype=np.uint8)]
    sizes = (224, 320, 512)
    out = predict_multiscale(model, images, sizes, torch.device("cpu"))
    assert model.seen == [(224, 224), (320, 320), (512, 512)]
    assert [m.shape for m in out.maps] == [(100, 150), (301, 200)]
    for m in out.maps:
        np.testing.assert_allclose(m, np.mean([s / 1000 for s in sizes]), atol=1e-6)
    assert out.probs.shape == (2, 3)
    np.testing.assert_allclose(out.det_mean, out.probs.mean(1))
    np.testing.assert_allclose(out.map_max, [np.mean(np.array(sizes) / 1000)] * 2, atol=1e-6)
    assert out.cls.shape == (2, 2) and np.all(out.cls[:, 1] == 224)  # [CLS] of the first scale
    assert out.maps[0].dtype == np.float32


def test_spatial_maps_come_back_aligned():
    h, w = 90, 130
    yy, xx = np.mgrid[0:h, 0:w]
    red = (40 + 170 * xx / (w - 1)).astype(np.uint8)            # smooth horizontal ramp
    img = np.stack([red, np.zeros_like(red), np.zeros_like(red)], -1)
    out = predict_multiscale(RedChannel(), [img], (224, 320), "cpu")
    err = np.abs(out.maps[0] - red / 255.0)
    assert err[:, 2:-2].max() < 0.01  # away from the border (resampling edge effects)


def test_patch_size_lookup():
    assert model_patch_size(ConstantPerScale()) == 16

    class NoPatch(nn.Module):
        pass

    with pytest.raises(AttributeError, match="patch_size"):
        model_patch_size(NoPatch())


@pytest.mark.slow
def test_real_detector_multiscale_shapes():
    """The real AnomalyDetector (tiny random backbone) through the multi-scale path."""
    from apmask_lib.weights import build_backbone
    from apmask_lib.models.detector import AnomalyDetector

    with pytest.warns(UserWarning, match="random weights"):
        bb = build_backbone("random:vit_tiny16", seed=0)
    model = AnomalyDetector(bb, hidden_dim=64, bottleneck_dim=32).eval()
    img = np.random.default_rng(1).integers(0, 256, (120, 90, 3), dtype=np.uint8)
    out = predict_multiscale(model, [img, img], scale_sizes((224, 320), model_patch_size(model)), "cpu")
    assert out.maps[0].shape == (120, 90)
    assert np.all((out.maps[0] >= 0) & (out.maps[0] <= 1))
    np.testing.assert_allclose(out.maps[0], out.maps[1], atol=1e-5)
    assert out.cls.shape == (2, bb.embed_dim)
