"""APMask token selection (paper Eq. 2-4) and its ablations (Table 4)."""
from __future__ import annotations

import warnings

import pytest
import torch

from apmask_lib.pretrain.masking import dropped_mask, keep_indices, num_dropped
from apmask_lib.weights import build_backbone


def _check_keep(keep: torch.Tensor, B: int, N: int, k: int) -> None:
    assert keep.shape == (B, N - k) and keep.dtype == torch.long
    assert (keep[:, 1:] > keep[:, :-1]).all(), "sorted ascending, no duplicates"
    assert keep.min() >= 0 and keep.max() < N


@pytest.mark.parametrize("n,ratio,k", [(10, 0.3, 3), (36, 0.3, 11), (196, 0.3, 59), (256, 0.3, 77),
                                       (16, 0.0, 0), (4, 0.3, 2), (36, 0.5, 18)])
def test_num_dropped_is_ceil(n, ratio, k):
    assert num_dropped(n, ratio) == k


def test_num_dropped_rejects_bad_ratios():
    for bad in (-0.1, 1.0):
        with pytest.raises(ValueError, match="mask ratio"):
            num_dropped(10, bad)
    with pytest.raises(ValueError, match="drops all"):
        num_dropped(2, 0.9)


def test_apmask_drops_the_k_lowest():
    g = torch.Generator().manual_seed(0)
    scores = torch.rand(5, 36, generator=g)
    k = num_dropped(36, 0.3)
    keep = keep_indices(scores, 0.3, "apmask")
    _check_keep(keep, 5, 36, k)
    expected = torch.argsort(scores, dim=1)[:, k:].sort(dim=1).values
    assert torch.equal(keep, expected)
    drop = dropped_mask(keep, 36)
    assert (drop.sum(1) == k).all()
    for b in range(5):
        assert scores[b][drop[b]].max() < scores[b][~drop[b]].min()


def test_apmask_ties_are_deterministic():
    scores = torch.zeros(2, 10)
    keep = keep_indices(scores, 0.3, "apmask")
    assert torch.equal(keep, torch.arange(3, 10).expand(2, 7))  # equal scores: lower index dropped first
    scores = torch.tensor([[0.5, 0.1, 0.1, 0.9, 0.1, 0.7]])
    assert keep_indices(scores, 0.5, "apmask").tolist() == [[0, 3, 5]]  # 3 tied lowest: 1, 2, 4 dropped
    scores = torch.tensor([[0.5, 0.1, 0.1, 0.9, 0.1, 0.7]])
    assert keep_indices(scores, 0.3, "apmask").tolist() == [[0, 3, 4, 5]]  # k=2 of 3 ties: 1, 2 dropped
    assert torch.equal(keep_indices(scores.bfloat16(), 0.3, "apmask"), keep_indices(scores, 0.3, "apmask"))


@pytest.mark.parametrize("kind", ["random", "block"])
@pytest.mark.parametrize("grid,ratio", [((14, 14), 0.3), ((6, 6), 0.3), ((4, 4), 0.3), ((2, 2), 0.3),
                                        ((16, 16), 0.5), ((6, 10), 0.3)])
def test_random_and_block_drop_exactly_k(kind, grid, ratio):
    N = grid[0] * grid[1]
    k = num_dropped(N, ratio)
    scores = torch.zeros(8, N)
    keep = keep_indices(scores, ratio, kind, torch.Generator().manual_seed(1), grid=grid)
    _check_keep(keep, 8, N, k)
    again = keep_indices(scores, ratio, kind, torch.Generator().manual_seed(1), grid=grid)
    assert torch.equal(keep, again)
    other = keep_indices(scores, ratio, kind, torch.Generator().manual_seed(2), grid=grid)
    if N > 4:
        assert not torch.equal(keep, other)


def _adjacent_pairs(drop: torch.Tensor, grid) -> float:
    """Mean number of 4-neighbour pairs of dropped patches per image."""
    d = drop.reshape(-1, *grid).float()
    return float(((d[:, 1:] * d[:, :-1]).sum((1, 2)) + (d[:, :, 1:] * d[:, :, :-1]).sum((1, 2))).mean())


def test_block_masks_are_spatially_contiguous():
    grid, N = (14, 14), 196
    g = torch.Generator().manual_seed(0)
    blk = dropped_mask(keep_indices(torch.zeros(64, N), 0.3, "block", g, grid), N)
    rnd = dropped_mask(keep_indices(torch.zeros(64, N), 0.3, "random", g, grid), N)
    # 59 dropped patches: random ones have ~2*59*58/195*(182/196) ~ 32 adjacent pairs, blocks far more
    assert _adjacent_pairs(blk, grid) > 2 * _adjacent_pairs(rnd, grid)


def test_block_needs_a_grid_for_non_square_n():
    with pytest.raises(ValueError, match="grid"):
        keep_indices(torch.zeros(1, 12), 0.3, "block")
    with pytest.raises(ValueError, match="does not match"):
        keep_indices(torch.zeros(1, 12), 0.3, "block", grid=(3, 3))


def test_none_keeps_all_and_unknown_kind_fails():
    keep = keep_indices(torch.rand(3, 16), 0.3, "none")
    assert torch.equal(keep, torch.arange(16).expand(3, 16))
    with pytest.raises(ValueError, match="unknown mask kind"):
        keep_indices(torch.rand(3, 16), 0.3, "bogus")


@pytest.fixture(scope="module")
def tiny():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return build_backbone("random:vit_tiny16", seed=0).eval()


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["apmask", "random", "block"])
def test_student_sequence_is_shorter_by_k_and_keeps_cls(tiny, kind):
    x = torch.rand(2, 3, 96, 96, generator=torch.Generator().manual_seed(0))  # 6x6 grid
    with torch.no_grad():
        full = tiny(x, attn="cls")
        N = full.grid[0] * full.grid[1]
        k = num_dropped(N, 0.3)
        keep = keep_indices(full.cls_attention(), 0.3, kind, torch.Generator().manual_seed(0), full.grid)
        out = tiny(x, keep_idx=keep, attn="cls", return_layers=(0,))
    assert N == 36 and k == 11
    assert out.patches.shape == (2, N - k, tiny.embed_dim)
    assert out.layers[0].shape[1] == 1 + N - k  # [CLS] + kept patches
    assert out.cls.shape == (2, tiny.embed_dim)
    # keeping every patch is the unmasked forward: [CLS] is never part of keep_idx
    with torch.no_grad():
        same = tiny(x, keep_idx=keep_indices(full.cls_attention(), 0.3, "none"), attn="cls")
    torch.testing.assert_close(same.cls, full.cls)


def test_apmask_on_real_attention_drops_low_attention_tokens(tiny):
    x = torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        a = tiny(x, attn="cls").cls_attention()  # (1, 16)
    keep = keep_indices(a, 0.3, "apmask")
    kept, dropped = a[0, keep[0]], a[0, dropped_mask(keep, 16)[0]]
    assert kept.min() >= dropped.max()
    assert kept.mean() > a.mean() > dropped.mean()
