"""The fine-tuned detector's checkpoint (``finetune/model.pt``): written atomically as plain tensors
and dicts (the ViT architecture, the head configuration, the run's config), read back with
``weights_only=True``, its architecture bounded before anything is allocated, NaN/inf weights refused."""
from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Mapping, Optional

import torch
from torch import nn

from ..core.files import load_checkpoint, save_checkpoint
from ..models.detector import AnomalyDetector
from ..models.vit import ViTConfig, VisionTransformer
from .backbones import check_architecture

FORMAT = "apmask-detector-v1"


def save_detector(path: str | Path, model: AnomalyDetector, config_dict: Optional[Mapping[str, Any]] = None,
                  meta: Optional[Mapping[str, Any]] = None) -> Path:
    """Atomically write a detector: plain state dict + the ViTConfig and head config as plain dicts
    (+ the run's config dict and ``meta`` such as the step). Readable with weights_only=True."""
    path = Path(path)
    save_checkpoint(path, format=FORMAT, vit_config=dataclasses.asdict(model.backbone.cfg),
                    head_config=model.head_config(), state_dict=model.state_dict(),
                    config=dict(config_dict or {}), meta=dict(meta or {}))
    return path


def read_detector_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """The raw payload of :func:`save_detector` (``config``, ``meta`` ...), checked for its format."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"detector not found: {path}. Run fine-tuning first (apmask finetune / run_finetune).")
    ckpt = load_checkpoint(path, map_location)
    if not isinstance(ckpt, Mapping) or ckpt.get("format") != FORMAT:
        raise ValueError(f"{path} is not an apmask detector ({FORMAT}); it should be finetune/model.pt written by save_detector")
    return ckpt


def check_finite_weights(model: nn.Module, source: str | Path) -> None:
    """Refuse a model with NaN/inf parameters or buffers (a diverged run): its scores would be NaN and
    read as "normal". The one check evaluation, prediction and export all use (via :func:`load_detector`)."""
    bad = [name for name, t in list(model.named_parameters()) + list(model.named_buffers())
           if t.is_floating_point() and not torch.isfinite(t).all()]
    if bad:
        raise ValueError(f"detector {source} has non-finite (NaN/inf) weights in {len(bad)} tensor(s), e.g. "
                         f"{', '.join(bad[:3])}; the run that wrote it diverged: retrain (e.g. a lower finetune.lr)")


def load_detector(path: str | Path, map_location: str | torch.device = "cpu") -> AnomalyDetector:
    """Rebuild the detector saved by :func:`save_detector` (eval mode); refuses non-finite weights
    (:func:`check_finite_weights`)."""
    ckpt = read_detector_checkpoint(path, map_location)
    try:
        vit_cfg = ViTConfig(**ckpt["vit_config"])
    except TypeError as e:
        raise ValueError(f"{path}: vit_config is not a ViT architecture ({e})") from None
    check_architecture(vit_cfg, ckpt.get("state_dict") if isinstance(ckpt.get("state_dict"), Mapping) else {},
                       str(path))
    backbone = VisionTransformer(vit_cfg)
    model = AnomalyDetector(backbone, **ckpt["head_config"])
    model.load_state_dict(ckpt["state_dict"], strict=True)
    check_finite_weights(model, path)
    return model.eval()


__all__ = ["FORMAT", "save_detector", "read_detector_checkpoint", "load_detector", "check_finite_weights"]
