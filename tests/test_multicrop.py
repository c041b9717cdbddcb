"""Batched DINO multi-crop: agreement with torchvision's per-image ops, geometry, determinism."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torchvision.transforms.v2.functional as TF

from apmask_lib.pretrain import multicrop as mc


@pytest.fixture
def x() -> torch.Tensor:
    return torch.rand(4, 3, 40, 48, generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("name", ["brightness", "contrast", "saturation"])
def test_colour_ops_match_torchvision(x, name):
    f = torch.tensor([0.6, 1.0, 1.3, 0.8])
    ours = getattr(mc, f"adjust_{name}")(x, f)
    ref = torch.stack([getattr(TF, f"adjust_{name}")(x[i], float(f[i])) for i in range(4)])
    torch.testing.assert_close(ours, ref, atol=1e-6, rtol=0)


def test_hue_gray_blur_solarize_match_torchvision(x):
    h = torch.tensor([-0.1, 0.0, 0.05, 0.1])
    ref = torch.stack([TF.adjust_hue(x[i], float(h[i])) for i in range(4)])
    torch.testing.assert_close(mc.adjust_hue(x, h), ref, atol=1e-5, rtol=0)
    torch.testing.assert_close(mc.grayscale(x), TF.rgb_to_grayscale(x), atol=1e-6, rtol=0)
    sig = torch.tensor([0.1, 0.5, 1.0, 2.0])
    ref = torch.stack([TF.gaussian_blur(x[i], [13, 13], [float(sig[i])] * 2) for i in range(4)])
    torch.testing.assert_close(mc.gaussian_blur(x, sig), ref, atol=1e-5, rtol=0)
    assert torch.equal(mc.gaussian_blur(x, torch.zeros(4)), x)  # sigma 0: unchanged
    on = torch.tensor([True, False, True, False])
    ref = torch.stack([TF.solarize(x[i], 128 / 255) if on[i] else x[i] for i in range(4)])
    assert torch.equal(mc.solarize(x, on), ref)


def test_crop_resize_matches_torchvision_resized_crop():
    yy, xx = torch.meshgrid(torch.arange(100.0), torch.arange(120.0), indexing="ij")
    img = torch.stack([torch.sin(xx / 9) * 0.5 + 0.5, torch.cos(yy / 7) * 0.5 + 0.5, (xx + yy) / 220]).unsqueeze(0)
    for box, size in [((10, 20, 90, 100), 32), ((5, 5, 35, 45), 64), ((0, 0, 120, 100), 48)]:
        out = mc.crop_resize(img, torch.tensor([box], dtype=torch.float32), torch.tensor([0]), size)[0]
        ref = TF.resized_crop(img[0], box[1], box[0], box[3] - box[1], box[2] - box[0], [size, size], antialias=True)
        assert (out - ref).abs().mean() < 2e-3 and (out - ref).abs().max() < 3e-2


def test_random_resized_crop_boxes_follow_torchvision_rules():
    g = torch.Generator().manual_seed(0)
    sizes = torch.tensor([[258, 258], [200, 300], [300, 180]]).repeat(200, 1)
    boxes = mc.random_resized_crop_boxes(sizes, (0.05, 0.4), generator=g)
    w, h = boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]
    H, W = sizes[:, 0].float(), sizes[:, 1].float()
    assert (boxes[:, 0] >= 0).all() and (boxes[:, 1] >= 0).all() and (boxes[:, 2] <= W).all() and (boxes[:, 3] <= H).all()
    frac = w * h / (W * H)
    assert frac.min() > 0.04 and frac.max() < 0.42  # scale range up to integer rounding
    ratio = w / h
    assert ratio.min() > 0.7 and ratio.max() < 1.4
    assert torch.equal(boxes, boxes.round())  # integer pixel boxes as torchvision
    # no attempt fits (extreme aspect, large scale): central crop, aspect clamped to 4/3
    fb = mc.random_resized_crop_boxes(torch.tensor([[10, 1000]]), (0.9, 1.0), generator=g)[0]
    assert fb.tolist() == [493.0, 0.0, 506.0, 10.0]  # h = 10, w = round(10 * 4/3), centred


@pytest.mark.slow
def test_multicrop_views_shapes_range_and_determinism():
    imgs = torch.randint(0, 256, (3, 3, 80, 90), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    sizes = torch.tensor([[80, 90], [80, 90], [70, 60]])
    crops = mc.MultiCrop(64, 32, n_local=2)
    v = crops(imgs, sizes, torch.Generator().manual_seed(1))
    assert v.teacher.shape == (3, 3, 64, 64) and v.student_global.shape == (3, 3, 64, 64)
    assert v.local.shape == (6, 3, 32, 32)
    for t in (v.teacher, v.student_global, v.local):
        assert t.dtype == torch.float32 and t.min() >= 0 and t.max() <= 1
    assert not torch.equal(v.teacher, v.student_global)  # a second, independent global crop
    w = crops(imgs, sizes, torch.Generator().manual_seed(1))
    assert torch.equal(v.local, w.local) and torch.equal(v.teacher, w.teacher)
    u = crops(imgs, sizes, torch.Generator().manual_seed(2))
    assert not torch.equal(v.local, u.local)
    same = mc.MultiCrop(64, 32, n_local=0, teacher_view="same")(imgs, sizes, torch.Generator().manual_seed(1))
    assert same.student_global is same.teacher and same.local.shape[0] == 0
    with pytest.raises(ValueError, match="teacher_view"):
        mc.MultiCrop(teacher_view="third")


def test_local_views_are_view_major(monkeypatch):
    # flat images of distinct levels and no photometrics: local row v * B + b must show image b
    monkeypatch.setattr(mc, "photometric", lambda x, *a, **k: x)
    B, n_local = 3, 4
    imgs = torch.stack([torch.full((3, 50, 50), 50 * (b + 1), dtype=torch.uint8) for b in range(B)])
    v = mc.MultiCrop(32, 16, n_local=n_local)(imgs, torch.tensor([[50, 50]] * B), torch.Generator().manual_seed(0))
    level = v.local.mean(dim=(1, 2, 3)).reshape(n_local, B)
    torch.testing.assert_close(level, (50 * torch.arange(1, B + 1) / 255).expand(n_local, B))


class _FakeDataset:
    """Images of different sizes, as a dataset object (``image(sample)``)."""

    def __init__(self, shapes):
        self.train = list(range(len(shapes)))
        self.shapes = shapes

    def image(self, i):
        h, w = self.shapes[i]
        return np.full((h, w, 3), i * 40, dtype=np.uint8)


def test_image_bank_resizes_short_side_and_pads():
    ds = _FakeDataset([(100, 100), (80, 160), (150, 60)])
    bank = mc.load_image_bank(ds, ds.train, short_side=40, num_workers=2, progress=False)
    assert bank.sizes.tolist() == [[40, 40], [40, 80], [100, 40]]
    assert bank.images.shape == (3, 3, 100, 80) and bank.images.dtype == torch.uint8
    assert (bank.images[1, :, :40, :80] == 40).all() and (bank.images[1, :, 40:] == 0).all()
    assert mc.cache_short_side(224) == 258
    # crops stay inside each image's valid region
    boxes = mc.random_resized_crop_boxes(bank.sizes, (0.4, 1.0), generator=torch.Generator().manual_seed(0))
    assert (boxes[:, 2] <= bank.sizes[:, 1]).all() and (boxes[:, 3] <= bank.sizes[:, 0]).all()


@pytest.mark.slow
def test_image_bank_on_real_bottle(mvtec_root):
    from apmask_lib.data import build_dataset

    ds = build_dataset("mvtec", mvtec_root, "bottle")
    bank = mc.load_image_bank(ds, ds.train[:3], short_side=74, progress=False)
    assert bank.images.shape == (3, 3, 74, 74)
    v = mc.MultiCrop(64, 32, n_local=2)(bank.images, bank.sizes, torch.Generator().manual_seed(0))
    assert v.local.shape == (6, 3, 32, 32) and math.isfinite(float(v.teacher.mean()))
