"""Optimiser setup shared by pre-training and fine-tuning: AdamW parameter groups and the
per-iteration schedules (learning rate, weight decay, EMA momentum)."""
from __future__ import annotations

from typing import Any

import numpy as np
import torch


def cosine_scheduler(base: float, final: float, epochs: int, iters_per_epoch: int,
                     warmup_epochs: int = 0, start_warmup: float = 0.0) -> np.ndarray:
    """Per-iteration values: linear warm-up ``start_warmup -> base`` then cosine ``base -> final``
    (as facebookresearch/dino ``utils.cosine_scheduler``). Length ``epochs * iters_per_epoch``.

    With W warm-up iterations and T = total - W cosine iterations, iteration t >= W takes
    ``final + (base - final) * (1 + cos(pi * (t - W) / T)) / 2``."""
    total = epochs * iters_per_epoch
    warm = min(warmup_epochs * iters_per_epoch, total)
    warmup = np.linspace(start_warmup, base, warm) if warm > 0 else np.array([])
    iters = np.arange(total - warm)
    cosine = final + 0.5 * (base - final) * (1 + np.cos(np.pi * iters / max(len(iters), 1)))
    return np.concatenate([warmup, cosine])


def param_groups(model: torch.nn.Module) -> list[dict[str, Any]]:
    """AdamW groups [decayed, not decayed]: no weight decay on biases, norms (1-D tensors), the
    position embedding, the [CLS] token and SwAV prototypes (re-normalised every step, so decay
    would only fight the normalisation)."""
    decay, no_decay = [], []
    for name, prm in model.named_parameters():
        if not prm.requires_grad:
            continue
        skip = prm.ndim <= 1 or name.endswith(".bias") or "pos_embed" in name or "cls_token" in name \
            or "prototypes" in name
        (no_decay if skip else decay).append(prm)
    return [{"params": decay}, {"params": no_decay, "weight_decay": 0.0}]


__all__ = ["cosine_scheduler", "param_groups"]
