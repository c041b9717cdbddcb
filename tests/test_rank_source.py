"""pretrain.rank_source: APMask's ranking attention from the student views ("view", the default)
or from one teacher pass over the whole image, resampled onto each view's crop box ("image")."""
from __future__ import annotations

import csv
import types
from dataclasses import asdict

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from apmask_lib.pretrain import multicrop as mc
from apmask_lib.pretrain import masking as M
from apmask_lib.pretrain import stage as P
from apmask_lib.config import Config, load_params, replace
from apmask_lib.pretrain.masking import attention_on_boxes, dropped_mask, keep_indices
from apmask_lib.core.files import load_checkpoint
from apmask_lib.core.fingerprint import config_fingerprint

from helpers import TINY, tiny_setup as fastpath_setup

pytestmark = pytest.mark.filterwarnings("ignore:backbone .random")

def tiny_setup(teacher_view: str = "second", mask: str = "apmask", **pretrain):
    """test_fastpath's tiny setup with one image of another size and ``teacher_view``."""
    return fastpath_setup(mask, sizes=((80, 72), (80, 72), (70, 60), (80, 72)), teacher_view=teacher_view,
                         **pretrain)


# ----------------------------------------------------------------------------- the resampling
def test_full_box_returns_the_map_and_flip_mirrors_it():
    att = torch.rand(2, 4, 5, generator=torch.Generator().manual_seed(0))
    sizes = torch.tensor([[80, 100], [60, 50]])
    boxes = torch.tensor([[0.0, 0.0, 100.0, 80.0], [0.0, 0.0, 50.0, 60.0]])
    index = torch.tensor([0, 1])
    out = attention_on_boxes(att, sizes, boxes, index, None, (4, 5))
    torch.testing.assert_close(out, att.flatten(1), rtol=0, atol=1e-6)
    out = attention_on_boxes(att, sizes, boxes, index, torch.tensor([True, False]), (4, 5))
    torch.testing.assert_close(out.view(2, 4, 5)[0], att[0].flip(-1), rtol=0, atol=1e-6)
    torch.testing.assert_close(out.view(2, 4, 5)[1], att[1], rtol=0, atol=1e-6)
    # the same image twice (index), non-square image: each row reads its own image's map
    out = attention_on_boxes(att, sizes, boxes[[1, 1]], torch.tensor([1, 1]), torch.tensor([False, True]), (4, 5))
    torch.testing.assert_close(out.view(2, 4, 5), torch.stack([att[1], att[1].flip(-1)]), rtol=0, atol=1e-6)


def test_left_half_box_is_the_left_half_upsampled():
    """A map linear in both axes (bilinear resampling is exact on it): the left-half box at the
    full grid samples map column j/2 - 1/4 (patch centres, aligned=True), clamped to the map."""
    h, w, H, W = 3, 4, 60, 80
    i, j = torch.meshgrid(torch.arange(h, dtype=torch.float32), torch.arange(w, dtype=torch.float32), indexing="ij")
    att = (10 * i + j).unsqueeze(0)
    box = torch.tensor([[0.0, 0.0, W / 2, float(H)]])
    expected = 10 * i + (j / 2 - 0.25).clamp(0, w - 1)
    out = attention_on_boxes(att, torch.tensor([[H, W]]), box, torch.tensor([0]), None, (h, w))
    torch.testing.assert_close(out.view(h, w), expected, rtol=0, atol=1e-5)
    out = attention_on_boxes(att, torch.tensor([[H, W]]), box, torch.tensor([0]), torch.tensor([True]), (h, w))
    torch.testing.assert_close(out.view(h, w), expected.flip(-1), rtol=0, atol=1e-5)
    # the right half at 3 view columns: bins 2/3 of a map cell wide, centres at map columns
    # 2 + 1/3, 3, 3 + 2/3, i.e. indices 1 + 5/6, 2.5 and 3 + 1/6 -> clamped to 3
    box = torch.tensor([[W / 2, 0.0, float(W), float(H)]])
    out = attention_on_boxes(att, torch.tensor([[H, W]]), box, torch.tensor([0]), None, (h, 3))
    torch.testing.assert_close(out.view(h, 3), 10 * i[:, :3] + torch.tensor([11 / 6, 2.5, 3.0]), rtol=0, atol=1e-5)


def test_dropped_patches_are_the_least_attended_region_of_the_box():
    """Map 8x8 of a 64x64 image, low only at map rows 6-7, columns 0-1 (image y >= 48, x < 16).
    The bottom-left quadrant box at a 4x4 view grid: that region is view rows 2-3, columns 0-1;
    mirrored, columns 2-3. A wrong box or flip mapping drops other patches."""
    att = torch.ones(1, 8, 8)
    att[0, 6:, :2] = 0.1
    att += 1e-3 * torch.arange(64.0).view(8, 8)  # no ties
    box = torch.tensor([[0.0, 32.0, 32.0, 64.0]])
    sizes, index = torch.tensor([[64, 64]]), torch.tensor([0])

    def dropped(flip, sign=1.0):
        s = attention_on_boxes(sign * att, sizes, box, index, torch.tensor([flip]), (4, 4))
        return set(dropped_mask(keep_indices(s, 0.25), 16)[0].nonzero().flatten().tolist())  # k = 4

    assert dropped(False) == {8, 9, 12, 13}
    assert dropped(True) == {10, 11, 14, 15}
    assert dropped(False, -1.0).isdisjoint({8, 9, 12, 13})  # the opposite ordering drops other patches
    # the same region seen through the top-left box (not containing it) is not dropped there
    s = attention_on_boxes(att, sizes, torch.tensor([[0.0, 0.0, 32.0, 32.0]]), index, None, (4, 4))
    assert not dropped_mask(keep_indices(s, 0.25), 16)[0, [8, 9, 12, 13]].all()


def test_views_record_boxes_and_flips_that_match_their_pixels(monkeypatch):
    """Geometry of the real plumbing (MultiCrop's boxes/flips, the patch grid's coverage of a
    40 px view at patch 16, the whole-image view): on an image that is a linear ramp, the whole
    image's patch means resampled onto each view equal that view's own patch means; with the
    flips inverted they do not."""
    def flip_only(x, generator, blur_p, solarize_p=0.0, params_out=None):  # draws and records a flip only
        flip = torch.rand(x.shape[0], generator=generator) < 0.5
        if params_out is not None:
            params_out["flip"] = flip
        return torch.where(flip.view(-1, 1, 1, 1), x.flip(-1), x)

    monkeypatch.setattr(mc, "photometric", flip_only)
    H, W = 90, 120
    yy, xx = torch.meshgrid(torch.arange(H), torch.arange(W), indexing="ij")
    ramp = 0.8 * (xx + 0.5) / W + 0.2 * (yy + 0.5) / H
    imgs = (255 * ramp).round().to(torch.uint8).expand(3, 3, H, W).clone()
    cfg = replace(Config(), backbone="random:vit_tiny16", pretrain={"hidden_dim": 32})
    bb = P.build_student(cfg).backbone  # patch 16
    v = mc.MultiCrop(128, 40, n_local=4)(imgs, torch.tensor([[H, W]] * 3), torch.Generator().manual_seed(0))
    assert v.local_flip.any() and (~v.local_flip).any() and v.student_global_flip.any()
    att = F.avg_pool2d(mc.grayscale(v.whole_image(128)), 16).flatten(1)  # (3, 64): "attention" = the ramp
    for boxes, flip, x in ((v.student_global_boxes, v.student_global_flip, v.student_global),
                           (v.local_boxes, v.local_flip, v.local)):
        gh, gw = bb.grid_size(*x.shape[-2:])
        own = F.avg_pool2d(mc.grayscale(x)[..., :gh * 16, :gw * 16], 16).flatten(1)
        got = M._image_rank_scores(att, bb, v, 128, boxes, flip, x.shape[-2:])
        assert (got - own).abs().max() < 5e-3
        wrong = M._image_rank_scores(att, bb, v, 128, boxes, ~flip, x.shape[-2:])
        assert ((wrong - own).abs().mean(1) > 0.05).all()


# ----------------------------------------------------------------------------- default unchanged
def test_multicrop_draws_are_unchanged():
    """The views and the generator's state after the call are those of the plain sequence of
    draws (boxes, photometric) the view generator has always made; the new fields only record."""
    imgs = torch.randint(0, 256, (3, 3, 80, 90), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    sizes = torch.tensor([[80, 90], [80, 90], [70, 60]])
    g = torch.Generator().manual_seed(1)
    v = mc.MultiCrop(64, 32, n_local=2)(imgs, sizes, g)
    r = torch.Generator().manual_seed(1)
    x = imgs.float() / 255.0

    def old(n, size, scale, blur_p, sol_p):
        boxes = mc.random_resized_crop_boxes(sizes.repeat(n, 1), scale, generator=r)
        return mc.photometric(mc.crop_resize(x, boxes, torch.arange(3).repeat(n), size), r, blur_p, sol_p), boxes

    t, _ = old(1, 64, (0.4, 1.0), 1.0, 0.0)
    s, s_boxes = old(1, 64, (0.4, 1.0), 0.1, 0.2)
    loc, l_boxes = old(2, 32, (0.05, 0.4), 0.5, 0.0)
    assert torch.equal(v.teacher, t) and torch.equal(v.student_global, s) and torch.equal(v.local, loc)
    assert torch.equal(g.get_state(), r.get_state())
    assert torch.equal(v.student_global_boxes, s_boxes) and torch.equal(v.local_boxes, l_boxes)
    assert v.local_flip.shape == (6,) and v.local_flip.dtype == torch.bool and torch.equal(v.sizes, sizes)


@pytest.mark.slow
def test_default_is_view_and_gives_the_same_loss_as_without_the_field():
    assert Config().pretrain.rank_source == "view" and load_params("params.yaml").pretrain.rank_source == "view"
    cfg, student, teacher, views = tiny_setup(mask="apmask")
    legacy = types.SimpleNamespace(**{k: v for k, v in asdict(cfg.pretrain).items() if k != "rank_source"})
    a = P.pretrain_loss(student, teacher, views, cfg.pretrain, torch.Generator())
    b = P.pretrain_loss(student, teacher, views, legacy, torch.Generator())
    c = P.pretrain_loss(student, teacher, views, replace(cfg, pretrain={"rank_source": "image"}).pretrain,
                        torch.Generator())
    assert torch.equal(a, b)
    assert not torch.equal(a, c)  # the option does change what is dropped


@pytest.mark.slow
def test_config_validation_and_resume_fingerprint():
    with pytest.raises(ValueError, match="rank_source must be one of view, image, got 'views'"):
        load_params(None, ["pretrain.rank_source=views"])
    assert load_params(None, ["pretrain.rank_source=image"]).pretrain.rank_source == "image"
    # checkpoints written before the key existed still resume at the default; "image" is a different run
    assert "rank_source" not in config_fingerprint(Config(), ())["pretrain"]
    image = replace(Config(), pretrain={"rank_source": "image"})
    assert config_fingerprint(image, ())["pretrain"]["rank_source"] == "image"
    _, _, teacher, views = tiny_setup()
    with pytest.raises(ValueError, match="rank_source"):
        M.student_views(teacher, views, "apmask", 0.3, torch.Generator(), "whole")


# ----------------------------------------------------------------------------- passes
def _record_teacher_passes(teacher):
    calls = []
    orig = teacher.backbone.forward

    def forward(x, keep_idx=None, attn=None, **kw):
        calls.append((tuple(x.shape), attn))
        return orig(x, keep_idx=keep_idx, attn=attn, **kw)

    teacher.backbone.forward = forward
    return calls


@pytest.mark.parametrize("teacher_view", ["second", "same"])
@pytest.mark.slow
def test_image_ranking_is_one_teacher_pass_at_the_global_size(teacher_view):
    _, _, teacher, views = tiny_setup(teacher_view)
    calls = _record_teacher_passes(teacher)
    M.student_views(teacher, views, "apmask", 0.3, torch.Generator(), "view")
    first = 8 if teacher_view == "second" else 4  # teacher view (+ student global view) at 64 px
    assert calls == [((first, 3, 64, 64), "cls"), ((12, 3, 32, 32), "cls")]  # + 3 local views of 4 images
    calls.clear()
    t_scores, groups = M.student_views(teacher, views, "apmask", 0.3, torch.Generator(), "image")
    # one pass: the 4 teacher views and the 4 whole images; none on the local views
    assert calls == [((8, 3, 64, 64), "cls")]
    assert groups[0][1].shape == (4, 11) and groups[1][1].shape == (12, 2)
    calls.clear()
    t_ref, _ = M.student_views(teacher, views, "none", 0.3, torch.Generator(), "image")
    assert calls == [((4, 3, 64, 64), None)]  # mask != apmask: rank_source plays no part
    torch.testing.assert_close(t_scores, t_ref, rtol=0, atol=1e-5)
    if teacher_view == "same":  # the student global view keeps the teacher pass's own attention
        _, g_view = M.student_views(teacher, views, "apmask", 0.3, torch.Generator(), "view")
        assert torch.equal(groups[0][1], g_view[0][1])


@pytest.mark.slow
def test_image_ranking_reads_the_whole_image_attention():
    """The keep indices are keep_indices() of the teacher's attention on views.whole_image(),
    resampled onto the recorded boxes (an independent re-statement of the pipeline)."""
    _, _, teacher, views = tiny_setup()
    _, groups = M.student_views(teacher, views, "apmask", 0.3, torch.Generator(), "image")
    with torch.no_grad():
        att = teacher.backbone(views.whole_image(64), attn="cls").cls_attention().view(4, 4, 4)
    for (x, keep), boxes, flip in zip(groups, (views.student_global_boxes, views.local_boxes),
                                      (views.student_global_flip, views.local_flip)):
        grid = (x.shape[-2] // 16, x.shape[-1] // 16)
        s = attention_on_boxes(att, views.sizes, boxes, torch.arange(4).repeat(x.shape[0] // 4), flip, grid)
        assert torch.equal(keep, keep_indices(s, 0.3))


# ----------------------------------------------------------------------------- end to end
@pytest.mark.parametrize("teacher_view", ["second", "same"])
@pytest.mark.slow
def test_run_pretrain_with_image_ranking(mvtec_root, tmp_path, teacher_view):
    cfg = replace(Config(), seed=0, backbone="random:vit_tiny16", device="cpu", out_dir=str(tmp_path),
                  data={"dataset": "mvtec", "root": str(mvtec_root), "category": "bottle", "max_train": 8},
                  pretrain={**TINY, "n_local": 2, "epochs": 2, "rank_source": "image", "teacher_view": teacher_view})
    out = P.run_pretrain(cfg, max_steps=2, progress=False)
    with open(out / "log.csv", newline="") as f:
        losses = [float(r["loss"]) for r in csv.DictReader(f)]
    assert len(losses) == 2 and np.isfinite(losses).all()
    ck = load_checkpoint(out / "checkpoint.pt")
    assert ck["step"] == 2 and all(torch.isfinite(v).all() for v in ck["teacher"].values())
    assert (out / "backbone.pt").is_file()
