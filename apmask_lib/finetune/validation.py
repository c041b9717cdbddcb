"""A validation signal for fine-tuning that needs no test labels.

A fixed slice of the *normal training images* is held out of fine-tuning
(``finetune.val_fraction``, at most ``finetune.val_max_images``; chosen with the fixed seed
``VAL_SEED``, the same whatever ``cfg.seed`` is, so runs and seeds are scored on the same images).
Each held-out image enters the validation set twice: once as it is (label 0, empty mask) and once
as a synthetic anomaly made exactly as in training (same kind, attention maps of the initial
backbone, Poisson/blend settings; no flip or colour jitter), with a generator seeded by
``VAL_SEED`` too, so the validation set is identical at every epoch, on resume and across runs.

At every fine-tuning epoch end the detector scores it (:func:`score_validation`):

* ``val_auroc``: image AUROC of the detection probability (synthetic vs. normal),
* ``val_acc``:   accuracy of ``logit > 0`` (compare with the training accuracy ``acc``),
* ``val_dice``:  soft Dice (1 − the Dice loss, jointly over the set, as the training loss) of the
  segmentation map against the synthetic masks,
* ``val_loss``:  the training objective on the set (0.95·BCE + 0.05·Dice loss).

What it does and does not say: it measures how well the model separates *the synthetic anomalies it
is trained on* from normal images it has not seen; it is an over-fitting and "is it learning at all"
signal, not an estimate of the test AUROC on real defects.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch

VAL_SEED = 20230207  # fixed: the held-out slice and its anomalies do not depend on cfg.seed
COLUMNS = ("epoch", "step", "loss", "acc", "val_loss", "val_acc", "val_auroc", "val_dice")


def holdout_indices(n: int, fraction: float, max_images: Optional[int], seed: int = VAL_SEED) -> tuple[np.ndarray, np.ndarray]:
    """Split ``n`` training images into (train, held-out) index arrays, each sorted.

    The held-out count is ``round(fraction · n)`` capped at ``max_images`` (None = no cap), and 0
    when that would leave fewer than 2 images to train on; at least 2 when ``fraction > 0`` and
    ``n >= 4`` (one image cannot give an AUROC). Which images: a permutation from ``seed``."""
    if not 0.0 <= fraction < 1.0:
        raise ValueError(f"finetune.val_fraction must lie in [0, 1), got {fraction}")
    k = int(round(fraction * n))
    if max_images is not None:
        k = min(k, int(max_images))
    if fraction > 0 and n >= 4:
        k = max(k, 2)
    if n - k < 2:
        k = 0
    perm = np.random.default_rng(np.random.SeedSequence([seed, n])).permutation(n)
    return np.sort(perm[k:]), np.sort(perm[:k])


@dataclass
class ValidationSet:
    """Normal images followed by their synthetic anomalies: images uint8 (2M, 3, H, W), masks bool
    (2M, H, W), labels float32 (2M,)."""

    images: torch.Tensor
    masks: torch.Tensor
    labels: torch.Tensor

    def __len__(self) -> int:
        return int(self.labels.shape[0])


def make_validation_set(images: np.ndarray, attentions: Optional[np.ndarray], kind: str,
                        sources: Optional[np.ndarray] = None, seed: int = VAL_SEED, **anomaly_kwargs) -> ValidationSet:
    """The validation set of held-out normal ``images`` (M, H, W, 3) uint8: each as it is and as a
    synthetic anomaly of ``kind`` (no flip, no jitter; ``anomaly_kwargs`` as in training: poisson,
    blend, temperature). ``attentions`` (M, h, w) for kind "attention"; ``sources`` (other normal
    images, e.g. the training ones) for ``nsa``/``fpi`` — drawn at random from them."""
    from .anomalies import anomaly_batch, needs_source

    M = len(images)
    rng = np.random.default_rng(np.random.SeedSequence([seed, M]))
    srcs = None
    if needs_source(kind) and sources is not None and len(sources):
        srcs = [sources[int(j)] for j in rng.integers(0, len(sources), size=M)]
    atts = None if attentions is None else list(attentions)
    anom, masks, _ = anomaly_batch(list(images), rng, kind, np.ones(M, bool), attentions=atts, sources=srcs,
                                   hflip=0.0, normal_jitter=0.0, **anomaly_kwargs)
    ims = np.concatenate([images, anom])
    ms = np.concatenate([np.zeros_like(masks), masks])
    labels = np.concatenate([np.zeros(M, np.float32), np.ones(M, np.float32)])
    return ValidationSet(torch.from_numpy(ims).permute(0, 3, 1, 2).contiguous(), torch.from_numpy(ms),
                         torch.from_numpy(labels))


def soft_dice(prob: torch.Tensor, target: torch.Tensor, smooth: float = 1.0) -> float:
    """(2 Σ p·g + s) / (Σ p + Σ g + s) over all pixels of all images (1 = perfect)."""
    p, g = prob.double(), target.double()
    return float((2.0 * (p * g).sum() + smooth) / (p.sum() + g.sum() + smooth))


@torch.no_grad()
def score_validation(model, val: ValidationSet, device: torch.device, f, batch_size: int = 16,
                     autocast=None) -> dict[str, float]:
    """Score the detector on ``val`` (eval mode, restored afterwards); ``f`` = ``cfg.finetune``
    (loss weights). Returns val_loss, val_acc, val_auroc, val_dice (module docstring)."""
    from .losses import detection_loss
    from ..metrics import image_auroc

    was_training = model.training
    model.eval()
    logits, probs = [], []
    try:
        for i in range(0, len(val), batch_size):
            x = val.images[i:i + batch_size].to(device).float().div_(255.0)
            with autocast or contextlib.nullcontext():
                o = model(x)
            logits.append(o.logit.float().cpu())
            probs.append(torch.sigmoid(o.seg_logits.float()).cpu())
    finally:
        model.train(was_training)
    logit, prob = torch.cat(logits), torch.cat(probs)
    labels = val.labels
    dice = soft_dice(prob, val.masks)
    l_det = float(detection_loss(logit, labels))
    return {"val_loss": f.det_weight * l_det + f.seg_weight * (1.0 - dice),
            "val_acc": float(((logit > 0).float() == labels).float().mean()),
            "val_auroc": image_auroc(logit.numpy(), labels.numpy().astype(int)),
            "val_dice": dice}


__all__ = ["VAL_SEED", "COLUMNS", "holdout_indices", "ValidationSet", "make_validation_set", "soft_dice",
           "score_validation"]
