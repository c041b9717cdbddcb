"""Stopping a training run whose loss went NaN/inf, with one line that says where and what to do."""
from __future__ import annotations

import math
from pathlib import Path
from typing import Mapping

import torch


class NonFiniteLoss(FloatingPointError):
    """Training stopped at a NaN/inf loss; the message is one line (step, loss terms, last checkpoint)."""


def check_finite(value: torch.Tensor | float, what: str, step: int, terms: Mapping[str, float] | None = None,
                 checkpoint: str | Path | None = None) -> None:
    """Stop a run whose loss went NaN/inf with a one-line error naming the step, the loss terms and
    the last good checkpoint (which stays intact)."""
    v = float(value)
    if math.isfinite(v):
        return
    parts = ", ".join(f"{k}={float(x):.6g}" for k, x in (terms or {what.split()[-1]: v}).items())
    where = "no checkpoint was written yet"
    if checkpoint is not None and Path(checkpoint).is_file():
        try:
            step_saved = torch.load(checkpoint, map_location="cpu", weights_only=True, mmap=True).get("step", "?")
        except Exception:  # noqa: BLE001
            step_saved = "?"
        where = f"the last good checkpoint is {checkpoint} (step {step_saved}), untouched"
    raise NonFiniteLoss(f"{what} is {v} at step {step} ({parts}); {where}. Lower the learning rate or check the inputs.")


__all__ = ["NonFiniteLoss", "check_finite"]
