"""The fast pre-training path computes the same loss as a plain, view-by-view reading of Eq. 1-4.

Fast path (what ``run_pretrain`` runs): the teacher ranks all student views in two batched passes,
dropped tokens are gathered out of the sequence, the student runs once per crop size, Sinkhorn +
cross-entropy are vectorised, and (optionally) every ViT block is compiled.
Plain path (written here as an independent oracle): for every image and every view separately,
the teacher's last-layer [CLS] attention on that single view, ``topk`` of the most-attended
``N - ceil(rN)`` patches kept, one student forward per view, and the cross-entropy of Eq. 1 as an
explicit double loop over views and images.
"""
from __future__ import annotations

import copy
import csv
import math

import pytest
import torch
import torch.nn.functional as F
from torch._dynamo import config as dynamo_config

from helpers import TINY, tiny_setup

from apmask_lib.pretrain import stage as P
from apmask_lib.config import Config, replace
from apmask_lib.core.fastpath import COMPILE_MODES, compile_blocks
from apmask_lib.pretrain.sinkhorn import sinkhorn
from apmask_lib.core.files import load_checkpoint

pytestmark = pytest.mark.filterwarnings("ignore:backbone .random")

def plain_loss(student, teacher, views, p) -> torch.Tensor:
    """Eq. 1-4 one view at a time (see the module docstring)."""
    B = views.teacher.shape[0]
    with torch.no_grad():
        t_scores = teacher.head(teacher.backbone(views.teacher, attn=None).cls)
    q = sinkhorn(t_scores, eps=p.sinkhorn_eps, iters=p.sinkhorn_iters)
    codes = q / q.sum(dim=1, keepdim=True)
    student_views = [views.student_global[b:b + 1] for b in range(B)]
    student_views += [views.local[v * B + b:v * B + b + 1] for v in range(p.n_local) for b in range(B)]
    total = 0.0
    for i, x in enumerate(student_views):
        b = i % B
        keep = None
        if p.mask == "apmask":
            with torch.no_grad():
                a = teacher.backbone(x, attn="cls").attn.mean(dim=1)[0]  # (N,) Eq. 2
            n_keep = a.numel() - math.ceil(p.mask_ratio * a.numel())  # Eq. 3-4: drop the ceil(rN) lowest
            keep = torch.topk(a, n_keep).indices.unsqueeze(0)
        s = student.head(student.backbone(x, keep_idx=keep, attn=None).cls)[0]
        logp = F.log_softmax(s / p.temperature, dim=-1)
        total = total - (codes[b] * logp).sum()
    return total / len(student_views)


def grads(model) -> dict[str, torch.Tensor]:
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("mask", ["apmask", "none"])
@pytest.mark.slow
def test_batched_step_equals_view_by_view_reference(mask):
    cfg, student, teacher, views = tiny_setup(mask)
    fast = P.pretrain_loss(student, teacher, views, cfg.pretrain, torch.Generator())
    fast.backward()
    g_fast = grads(student)
    student.zero_grad(set_to_none=True)
    plain = plain_loss(student, teacher, views, cfg.pretrain)
    plain.backward()
    g_plain = grads(student)
    assert torch.allclose(fast, plain, rtol=0, atol=1e-5), (fast.item(), plain.item())
    assert g_fast.keys() == g_plain.keys()
    worst = max((g_fast[k] - g_plain[k]).abs().max().item() / (g_plain[k].abs().max().item() + 1e-12)
                for k in g_fast)
    assert worst < 1e-4, worst


@pytest.mark.slow
def test_reference_is_sensitive_to_which_tokens_are_dropped():
    """Guard for the test above: keeping the LEAST attended tokens instead changes the loss."""
    cfg, student, teacher, views = tiny_setup("apmask")
    fast = P.pretrain_loss(student, teacher, views, cfg.pretrain, torch.Generator())
    inverted = copy.deepcopy(teacher)
    orig = inverted.backbone.forward

    def forward(x, keep_idx=None, attn=None, **kw):  # negate the attention used for ranking only
        out = orig(x, keep_idx=keep_idx, attn=attn, **kw)
        if attn == "cls" and out.attn is not None:
            out.attn = -out.attn
        return out

    inverted.backbone.forward = forward
    wrong = P.pretrain_loss(student, inverted, views, cfg.pretrain, torch.Generator())
    assert abs(fast.item() - wrong.item()) > 1e-4


@pytest.mark.parametrize("mode", ["aot_eager"])
@pytest.mark.slow
def test_compiled_blocks_give_the_same_loss_and_gradients(mode):
    cfg, student, teacher, views = tiny_setup("apmask")
    eager = P.pretrain_loss(student, teacher, views, cfg.pretrain, torch.Generator())
    eager.backward()
    g_eager = grads(student)
    keys = list(student.state_dict())
    student.zero_grad(set_to_none=True)
    compile_blocks(student.backbone, mode)
    compile_blocks(teacher.backbone, mode)
    assert list(student.state_dict()) == keys  # checkpoints and EMA see the same names
    assert dynamo_config.recompile_limit >= 64  # every view shape gets its own graph, none falls back
    comp = P.pretrain_loss(student, teacher, views, cfg.pretrain, torch.Generator())
    comp.backward()
    g_comp = grads(student)
    assert torch.allclose(eager, comp, rtol=0, atol=1e-5)
    assert all(torch.allclose(g_eager[k], g_comp[k], rtol=1e-4, atol=1e-6) for k in g_eager)


@pytest.mark.slow
def test_compile_mode_is_checked():
    cfg, student, _, _ = tiny_setup("none")
    assert "reduce-overhead" in COMPILE_MODES
    with pytest.raises(ValueError, match="compile mode"):
        compile_blocks(student.backbone, "fastest")


@pytest.mark.slow
def test_run_pretrain_compiled_matches_eager(mvtec_root, tmp_path):
    """Two real steps through the training loop with compiled blocks log the same losses and write
    checkpoints with the same keys as the eager loop."""
    def run(out, mode):
        cfg = replace(Config(), seed=0, backbone="random:vit_tiny16", device="cpu", out_dir=str(out),
                      data={"dataset": "mvtec", "root": str(mvtec_root), "category": "bottle", "max_train": 8},
                      pretrain={**TINY, "n_local": 2, "epochs": 2, "compile": mode})
        d = P.run_pretrain(cfg, max_steps=2, progress=False)
        with open(d / "log.csv", newline="") as f:
            return [float(r["loss"]) for r in csv.DictReader(f)], load_checkpoint(d / "checkpoint.pt")

    eager, ck_e = run(tmp_path / "eager", "none")
    comp, ck_c = run(tmp_path / "aot", "aot_eager")
    assert len(eager) == 2 and eager == pytest.approx(comp, abs=1e-5)
    assert ck_e["student"].keys() == ck_c["student"].keys()
    assert all(torch.allclose(ck_e["teacher"][k], ck_c["teacher"][k], atol=1e-5) for k in ck_e["teacher"])
