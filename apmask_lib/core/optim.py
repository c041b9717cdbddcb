"""Optimiser setup shared by pre-training and fine-tuning: AdamW parameter groups and the
per-iteration schedules (learning rate, weight decay, EMA momentum)."""
from __future__ import annotations

from typing import Any, Sequence

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


def _no_decay(name: str, prm: torch.Tensor) -> bool:
    return prm.ndim <= 1 or name.endswith(".bias") or "pos_embed" in name or "cls_token" in name \
        or "prototypes" in name


def backbone_depth(name: str, depth: int, prefix: str = "backbone.") -> int | None:
    """Layer id of a parameter for layer-wise LR decay (BEiT / MAE fine-tuning): 0 for the
    backbone's embeddings (``patch_embed``, ``pos_embed``, ``cls_token``, registers), ``i + 1`` for
    ``blocks.i``, ``depth + 1`` for the backbone's final norm; None for parameters outside the
    backbone (the new heads), which always take the full learning rate."""
    if not name.startswith(prefix):
        return None
    rest = name[len(prefix):]
    if rest.startswith("blocks."):
        return int(rest.split(".")[1]) + 1
    if rest.startswith(("patch_embed", "pos_embed", "cls_token", "reg_token", "register")):
        return 0
    return depth + 1


def lr_scale(name: str, depth: int, layer_decay: float = 1.0, backbone_scale: float = 1.0) -> float:
    """The learning-rate multiplier of one parameter: 1 for the heads; for the backbone
    ``backbone_scale · layer_decay^(depth + 1 − layer)`` (:func:`backbone_depth`), so the last
    block gets ``backbone_scale · layer_decay``, the embeddings the smallest share. ``layer_decay``
    1 and ``backbone_scale`` 1 = one learning rate for everything (the paper)."""
    layer = backbone_depth(name, depth)
    if layer is None:
        return 1.0
    return float(backbone_scale) * float(layer_decay) ** (depth + 1 - layer)


def param_groups(model: torch.nn.Module, layer_decay: float = 1.0, backbone_scale: float = 1.0,
                 depth: int | None = None) -> list[dict[str, Any]]:
    """AdamW groups: no weight decay on biases, norms (1-D tensors), the position embedding, the
    [CLS] token and SwAV prototypes (re-normalised every step, so decay would only fight the
    normalisation).

    With ``layer_decay == backbone_scale == 1`` (the default) exactly two groups, [decayed, not
    decayed]. Otherwise one group per (decay, :func:`lr_scale`) pair, each carrying its multiplier as
    ``group["lr_scale"]``: the training loop sets ``lr = schedule[step] · lr_scale``
    (:func:`set_lr`). ``depth``: the backbone's number of blocks (default: ``model.backbone.blocks``)."""
    if layer_decay == 1.0 and backbone_scale == 1.0:
        decay, no_decay = [], []
        for name, prm in model.named_parameters():
            if prm.requires_grad:
                (no_decay if _no_decay(name, prm) else decay).append(prm)
        return [{"params": decay}, {"params": no_decay, "weight_decay": 0.0}]
    if depth is None:
        depth = len(model.backbone.blocks)
    groups: dict[tuple[bool, float], dict[str, Any]] = {}
    for name, prm in model.named_parameters():
        if not prm.requires_grad:
            continue
        nd, scale = _no_decay(name, prm), lr_scale(name, depth, layer_decay, backbone_scale)
        g = groups.setdefault((nd, scale), {"params": [], "lr_scale": scale, **({"weight_decay": 0.0} if nd else {})})
        g["params"].append(prm)
    return list(groups.values())


@torch.no_grad()
def ema_update(average: torch.nn.Module, model: torch.nn.Module, momentum: float) -> None:
    """average <- m * average + (1 - m) * model, all parameters: the pre-training's EMA teacher and
    fine-tuning's weight average (``finetune.ema``)."""
    torch._foreach_lerp_(list(average.parameters()), [p.detach() for p in model.parameters()], 1.0 - momentum)


def optimizer_step(optimizer: torch.optim.Optimizer, loss: torch.Tensor, model: torch.nn.Module, clip_grad: float = 0.0,
                   frozen: Sequence[torch.nn.Parameter] = ()) -> None:
    """One optimisation step on ``loss``: zero the gradients, backward, clip the gradient norm of
    ``model``'s parameters at ``clip_grad`` (0 or None = no clipping), drop the gradient of the
    ``frozen`` parameters (the optimiser then leaves them as they are), step."""
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    if clip_grad and clip_grad > 0:
        torch.nn.utils.clip_grad_norm_(model.parameters(), clip_grad)
    for prm in frozen:
        prm.grad = None
    optimizer.step()


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    """Every group's learning rate for this step: ``lr · group["lr_scale"]`` (1 where absent)."""
    for group in optimizer.param_groups:
        group["lr"] = lr * group["lr_scale"] if "lr_scale" in group else lr


__all__ = ["cosine_scheduler", "param_groups", "lr_scale", "backbone_depth", "ema_update", "optimizer_step", "set_lr"]
