"""Devices: which one to run on, whether the GPU configuration (bf16 autocast, fused AdamW) applies,
the autocast context, and waiting for queued work (for timing)."""
from __future__ import annotations

import contextlib
import os

import torch

ACCELERATED_ON_CPU_ENV = "APMASK_ACCELERATED_ON_CPU"


def resolve_device(name: str = "auto") -> torch.device:
    """``auto`` -> cuda if available else cpu. ``cuda`` without a GPU is a clear error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(name)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(f"device={name!r} requested but no CUDA device is visible; use device='cpu' or 'auto'")
    return dev


def accelerated(device: torch.device) -> bool:
    """Whether the GPU configuration (bf16 autocast, fused AdamW) is used on ``device``: on CUDA always;
    on the CPU only when the environment variable ``APMASK_ACCELERATED_ON_CPU=1`` is set, a seam that
    lets tests run those branches on a machine without a GPU (tests/test_accelerated_path.py)."""
    return device.type == "cuda" or (device.type == "cpu" and os.environ.get(ACCELERATED_ON_CPU_ENV) == "1")


def autocast_context(device: torch.device):
    """bf16 autocast where :func:`accelerated`, else a null context."""
    return torch.autocast(device.type, dtype=torch.bfloat16) if accelerated(device) else contextlib.nullcontext()


def synchronize(device: torch.device) -> None:
    """Wait for the device's queued work (CUDA); a no-op on the CPU. For timing."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


__all__ = ["ACCELERATED_ON_CPU_ENV", "resolve_device", "accelerated", "autocast_context", "synchronize"]
