"""VisionTransformer.forward_intermediates / no_weight_decay (timm's names and meaning)."""
import pytest
import torch

from apmask_lib.weights import build_backbone


@pytest.fixture(scope="module")
def tiny():
    return build_backbone("random:vit_tiny16", seed=0).eval()


def test_forward_intermediates_equal_the_full_forward(tiny):
    x = torch.rand(2, 3, 64, 48)
    with torch.no_grad():
        full = tiny(x, attn=None, return_layers=(0, 1, 3)).layers
        got = tiny.forward_intermediates(x, [3, 1], norm=False, stop_early=False)
        normed = tiny.forward_intermediates(x, [1, -1], norm=True)
        last2 = tiny.forward_intermediates(x, 2, norm=False)
        grid = tiny.forward_intermediates(x, [1], norm=False, output_fmt="NCHW")[0]
    assert [t.shape for t in got] == [(2, 12, 96), (2, 12, 96)]  # 64x48 px = 4x3 patches, [CLS] dropped
    assert torch.equal(got[0], full[3][:, 1:]) and torch.equal(got[1], full[1][:, 1:])  # order of `indices`
    assert torch.equal(normed[0], tiny.norm(full[1][:, 1:])) and torch.equal(normed[1], tiny.norm(full[3][:, 1:]))
    with torch.no_grad():
        ref2 = tiny(x, attn=None, return_layers=(2,)).layers[2][:, 1:]
    assert torch.equal(last2[0], ref2) and torch.equal(last2[1], got[0])
    assert grid.shape == (2, 96, 4, 3) and torch.equal(grid[:, :, 1, 2], full[1][:, 1 + 1 * 3 + 2])


def test_forward_intermediates_stop_early_skips_the_later_blocks(tiny):
    calls = []
    hooks = [b.register_forward_hook(lambda m, i, o, n=n: calls.append(n)) for n, b in enumerate(tiny.blocks)]
    try:
        with torch.no_grad():
            tiny.forward_intermediates(torch.rand(1, 3, 32, 32), [1])
            early = list(calls)
            calls.clear()
            tiny.forward_intermediates(torch.rand(1, 3, 32, 32), [1], stop_early=False)
    finally:
        for h in hooks:
            h.remove()
    assert early == [0, 1] and calls == [0, 1, 2, 3]


def test_forward_intermediates_refuses_bad_indices(tiny):
    x = torch.rand(1, 3, 32, 32)
    for bad in ([4], [-5], 0, 5, []):
        with pytest.raises(ValueError):
            tiny.forward_intermediates(x, bad)
    with pytest.raises(ValueError, match="output_fmt"):
        tiny.forward_intermediates(x, [0], output_fmt="NHWC")


def test_no_weight_decay_names_existing_parameters(tiny):
    names = dict(tiny.named_parameters())
    assert tiny.no_weight_decay() == {"pos_embed", "cls_token"} and tiny.no_weight_decay() <= set(names)
