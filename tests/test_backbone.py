"""Backbone: agreement with timm and with the ONNX original, weight sources, attention accessors."""
from __future__ import annotations

import time
import warnings

import numpy as np
import pytest
import timm
import torch

from apmask_lib.models import ARCHS, VisionTransformer
from apmask_lib.weights import BackboneUnavailable, build_backbone
from apmask_lib.weights.backbones import clean_state_dict, load_file


@pytest.fixture(scope="module")
def timm_s16():
    torch.manual_seed(0)
    return timm.create_model("vit_small_patch16_224", pretrained=False, num_classes=0).eval()


def _normalise(x: torch.Tensor) -> torch.Tensor:
    mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    return (x - mean) / std


@pytest.mark.slow
def test_matches_timm_vit_s16(timm_s16):
    ours = VisionTransformer(ARCHS["vit_s16"]).eval()
    ours.load_state_dict(clean_state_dict(timm_s16.state_dict()), strict=True)
    x = torch.rand(2, 3, 224, 224)
    with torch.no_grad():
        ref = timm_s16.forward_features(_normalise(x))
        out = ours(x, attn="full")
    got = torch.cat([out.cls[:, None], out.patches], 1)
    assert torch.allclose(got, ref, atol=1e-4), (got - ref).abs().max()
    # the explicit-softmax path (attn="full") equals the fused SDPA path (attn=None)
    with torch.no_grad():
        fused = ours(x, attn=None)
    assert torch.allclose(fused.patches, out.patches, atol=1e-4)


@pytest.mark.slow
def test_offline_dinov2_matches_onnx(offline_backbone):
    """The converted DINOv2 ViT-S/14 reproduces the ONNX backbone through onnxruntime."""
    import onnx
    import onnxruntime as ort

    from apmask_lib.weights.dinov2_onnx import ONNX_BACKBONE_OUTPUT, convert_onnx, find_onnx

    path = find_onnx()
    # the converted state dict loads strictly into timm's vit_small_patch14_dinov2
    ref = timm.create_model("vit_small_patch14_dinov2", pretrained=False, num_classes=0)
    ref.load_state_dict(convert_onnx(path), strict=True)

    model = onnx.load(str(path))
    model.graph.output.append(onnx.helper.make_tensor_value_info(ONNX_BACKBONE_OUTPUT, onnx.TensorProto.FLOAT, None))
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    torch.manual_seed(1)
    x = torch.rand(2, 3, 224, 224)
    onnx_tokens = sess.run([ONNX_BACKBONE_OUTPUT], {"input_image": _normalise(x).numpy()})[0]
    with torch.no_grad():
        out = offline_backbone(x, attn="cls")
    ours = torch.cat([out.cls[:, None], out.patches], 1).numpy()
    assert out.grid == (16, 16)  # same 16x16 grid as ViT-S/16 at 224 px
    assert np.abs(ours - onnx_tokens).max() <= 1e-4


@pytest.mark.parametrize("layout", ["timm", "dino_release", "dino_train", "ddp"])
@pytest.mark.slow
def test_file_source_layouts(tmp_path, timm_s16, layout):
    sd = timm_s16.state_dict()
    if layout == "dino_release":  # official dino_deitsmall16_pretrain.pth: bare backbone keys, no head
        payload = {k: v for k, v in sd.items() if not k.startswith("head")}
    elif layout == "dino_train":  # DINO training checkpoint: teacher/student with backbone./head. prefixes
        payload = {"teacher": {**{f"backbone.{k}": v for k, v in sd.items()}, "head.mlp.0.weight": torch.zeros(4, 384)},
                   "epoch": 100}
    elif layout == "ddp":
        payload = {"state_dict": {f"module.{k}": v for k, v in sd.items()}}
    else:
        payload = sd
    path = tmp_path / "ckpt.pth"
    torch.save(payload, path)
    model = build_backbone(f"file:{path}").eval()
    assert model.patch_size == 16 and len(model.blocks) == 12
    x = torch.rand(1, 3, 224, 224)
    with torch.no_grad():
        ref = timm_s16.forward_features(_normalise(x))[:, 0]
        assert torch.allclose(model(x).cls, ref, atol=1e-4)


def test_file_source_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="dinov2-s14-offline"):
        build_backbone(f"file:{tmp_path / 'nope.pth'}")
    bad = tmp_path / "corrupt.pth"
    bad.write_bytes(b"not a torch file")
    with pytest.raises(ValueError, match="corrupt.pth"):
        load_file(bad)
    wrong = tmp_path / "wrong.pth"
    torch.save({"foo": torch.zeros(3)}, wrong)
    with pytest.raises(ValueError, match="wrong.pth"):
        load_file(wrong)


def test_unknown_source():
    with pytest.raises(ValueError, match="unknown backbone source"):
        build_backbone("imagenet")


def test_dino_hub_fails_fast_offline(monkeypatch):
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # nothing listens there
    t0 = time.time()
    with pytest.raises(BackboneUnavailable, match="dinov2-s14-offline"):
        build_backbone("dino")
    assert time.time() - t0 < 15


def test_random_source_warns_and_is_seeded():
    with pytest.warns(UserWarning, match="random"):
        a = build_backbone("random:vit_tiny16", seed=3)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        b = build_backbone("random:vit_tiny16", seed=3)
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))


@pytest.fixture(scope="module")
def tiny():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return build_backbone("random:vit_tiny16").eval()


@pytest.mark.slow
def test_any_size_and_attention(tiny):
    x = torch.rand(2, 3, 320, 256)
    with torch.no_grad():
        full = tiny(x, attn="full")
        row = tiny(x, attn="cls")
    h, w = full.grid
    assert (h, w) == (20, 16)
    n = h * w
    assert full.patches.shape == (2, n, tiny.embed_dim)
    assert full.attn.shape == (2, tiny.num_heads, n + 1, n + 1)
    assert torch.allclose(full.attn.sum(-1), torch.ones(2, tiny.num_heads, n + 1), atol=1e-5)
    assert row.attn.shape == (2, tiny.num_heads, n)
    assert torch.allclose(row.attn, full.attn[:, :, 0, 1:], atol=1e-6)
    assert torch.allclose(row.cls_attention(), full.cls_attention(), atol=1e-6)
    sal = tiny.saliency(x)
    assert sal.shape == (2, h, w)
    assert torch.allclose(tiny.get_last_selfattention(x), full.attn)


def test_keep_indices_shorten_the_sequence(tiny):
    x = torch.rand(2, 3, 96, 96)
    n = 36
    keep = torch.stack([torch.arange(0, n, 2), torch.arange(1, n, 2)])  # 18 of 36 patches each
    with torch.no_grad():
        out = tiny(x, keep_idx=keep, attn="cls")
        alone = tiny(x[:1], keep_idx=keep[:1], attn="cls")
    assert out.patches.shape == (2, 18, tiny.embed_dim)
    assert out.attn.shape == (2, tiny.num_heads, 18)
    assert torch.allclose(out.patches[:1], alone.patches, atol=1e-5)


def test_intermediate_layers(tiny):
    with torch.no_grad():
        out = tiny(torch.rand(1, 3, 64, 64), attn=None, return_layers=(1, -1))
    assert sorted(out.layers) == [1, len(tiny.blocks) - 1]
    assert out.layers[1].shape == (1, 17, tiny.embed_dim)
