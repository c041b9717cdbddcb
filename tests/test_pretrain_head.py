"""Options of the pre-training head against collapse (docs/experiments.md "Is pre-training learning?"):
``pretrain.head_norm`` (batch-normalised projection head, SwAV's) and ``pretrain.freeze_prototypes_iters``
(SwAV's frozen prototypes in the first steps)."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from apmask_lib.pretrain import stage as P
from apmask_lib.config import Config, load_params, replace
from apmask_lib.core.files import load_checkpoint
from apmask_lib.models.heads import ProjectionMLP
from apmask_lib.models.swav import SwAVHead

pytestmark = pytest.mark.filterwarnings("ignore:backbone .random")

TINY = {"global_size": 64, "local_size": 32, "n_local": 2, "hidden_dim": 128, "batch_size": 4,
        "epochs": 3, "warmup_epochs": 0, "log_every": 1}


def make_cfg(root, out_dir, **pretrain) -> Config:
    return replace(Config(), seed=0, backbone="random:vit_tiny16", device="cpu", out_dir=str(out_dir),
                   data={"dataset": "mvtec", "root": str(root), "category": "bottle", "max_train": 8},
                   pretrain={**TINY, **pretrain})


def test_default_head_is_the_plain_mlp():
    """head_norm defaults to none: no normalisation layer, the state-dict keys of the plain GELU MLP."""
    assert Config().pretrain.head_norm == "none"
    head = SwAVHead(32, 64, 16, 5)
    assert not any(isinstance(m, nn.BatchNorm1d) for m in head.modules())
    assert [k for k in head.state_dict() if k.startswith("projection")] == [
        f"projection.mlp.{i}.{w}" for i in (0, 2, 4) for w in ("weight", "bias")]


def test_batchnorm_head_shapes_and_same_init_otherwise():
    """A BatchNorm1d after each hidden Linear; l2-normalised (N, out) output; the Linear weights and the
    prototypes are drawn exactly as in the plain head (BN draws no random numbers), so runs with and
    without BN start from the same random weights."""
    torch.manual_seed(0)
    plain = SwAVHead(32, 64, 16, 5)
    torch.manual_seed(0)
    bn = SwAVHead(32, 64, 16, 5, norm="batchnorm")
    bns = [m for m in bn.modules() if isinstance(m, nn.BatchNorm1d)]
    assert len(bns) == 2 and all(not m.track_running_stats and m.running_mean is None for m in bns)
    lin_p = [m.weight for m in plain.modules() if isinstance(m, nn.Linear)]
    lin_b = [m.weight for m in bn.modules() if isinstance(m, nn.Linear)]
    assert all(torch.equal(a, b) for a, b in zip(lin_p, lin_b)) and len(lin_p) == 3
    assert torch.equal(plain.prototypes.weight, bn.prototypes.weight)
    x = torch.randn(6, 32)
    z = bn.projection(x)
    assert z.shape == (6, 16) and torch.allclose(z.norm(dim=1), torch.ones(6))
    assert bn(x).shape == (6, 5)


def test_batchnorm_head_removes_the_common_component_in_train_and_eval():
    """What the option is for: a component shared by every feature of the batch (one category's images)
    does not reach the output of the BN head -- in train mode (student) and eval mode (the EMA teacher)
    alike, since it normalises with the batch's own statistics -- while it dominates the plain head's."""
    torch.manual_seed(0)
    bn = ProjectionMLP(32, 64, 16, norm="batchnorm")
    plain = ProjectionMLP(32, 64, 16)
    x = torch.randn(8, 32)
    common = 50.0 * torch.randn(1, 32)
    for mode in (True, False):
        bn.train(mode)
        assert torch.allclose(bn(x + common), bn(x), atol=1e-4)
    assert not torch.allclose(plain(x + common), plain(x), atol=1e-2)
    bn.train()
    a = bn(x)
    bn.eval()
    assert torch.equal(bn(x), a)  # no running statistics: eval = train


@pytest.mark.slow
def test_batchnorm_head_trains_and_refuses_a_batch_of_one():
    torch.manual_seed(0)
    head = SwAVHead(32, 64, 16, 5, norm="batchnorm")
    opt = torch.optim.SGD(head.parameters(), lr=0.5)
    bn = next(m for m in head.modules() if isinstance(m, nn.BatchNorm1d))
    w0 = bn.weight.detach().clone()
    x, target = torch.randn(8, 32), torch.randint(0, 5, (8,))
    loss0 = nn.functional.cross_entropy(head(x) / 0.1, target)
    for _ in range(20):
        opt.zero_grad()
        nn.functional.cross_entropy(head(x) / 0.1, target).backward()
        opt.step()
    assert nn.functional.cross_entropy(head(x) / 0.1, target) < loss0 - 0.5
    assert not torch.equal(bn.weight, w0)  # the BN affine parameters are trained
    with pytest.raises(ValueError, match="head_norm"):
        head(torch.randn(1, 32))


def test_head_norm_is_a_checked_config_choice(tmp_path):
    with pytest.raises(ValueError, match="head_norm"):
        replace(Config(), pretrain={"head_norm": "layernorm"})
    p = tmp_path / "p.yaml"
    p.write_text("pretrain:\n  head_norm: batchnorm\n")
    assert load_params(p).pretrain.head_norm == "batchnorm"


@pytest.mark.slow
def test_pretraining_with_the_batchnorm_head(mvtec_root, tmp_path):
    """A short run on real bottle images: finite losses; the teacher's BN parameters are the EMA of the
    student's (they are parameters, and there are no running buffers to go stale)."""
    out = P.run_pretrain(make_cfg(mvtec_root, tmp_path, head_norm="batchnorm"), max_steps=3, progress=False)
    ck = load_checkpoint(out / "checkpoint.pt")
    assert all(torch.isfinite(v).all() for v in ck["teacher"].values())
    keys = [k for k in ck["student"] if k.startswith("head.projection.mlp.1.")]
    assert keys == ["head.projection.mlp.1.weight", "head.projection.mlp.1.bias"]
    s, t = ck["student"]["head.projection.mlp.1.weight"], ck["teacher"]["head.projection.mlp.1.weight"]
    assert not torch.equal(s, torch.ones_like(s)) and not torch.equal(t, torch.ones_like(t))
    assert (t - 1).abs().max() < (s - 1).abs().max()  # the teacher lags behind the student


@pytest.mark.slow
def test_frozen_prototypes_do_not_move_for_n_steps_then_do(mvtec_root, tmp_path):
    """freeze_prototypes_iters=2: after 2 steps the student's and the teacher's prototypes are bit-identical
    to their initial values while the rest of the head has moved; after 2 more steps they have moved."""
    cfg = make_cfg(mvtec_root, tmp_path, freeze_prototypes_iters=2)
    init = P.build_pretrain_state(cfg).student.state_dict()
    out = P.run_pretrain(cfg, max_steps=2, progress=False)
    ck = load_checkpoint(out / "checkpoint.pt")
    for net in ("student", "teacher"):
        assert torch.equal(ck[net]["head.prototypes.weight"], init["head.prototypes.weight"]), net
        assert not torch.equal(ck[net]["head.projection.mlp.0.weight"], init["head.projection.mlp.0.weight"]), net
    P.run_pretrain(cfg, max_steps=4, progress=False)
    ck = load_checkpoint(out / "checkpoint.pt")
    assert ck["step"] == 4
    for net in ("student", "teacher"):
        assert not torch.equal(ck[net]["head.prototypes.weight"], init["head.prototypes.weight"]), net
    assert torch.allclose(ck["student"]["head.prototypes.weight"].norm(dim=1), torch.ones(cfg.pretrain.n_prototypes))
