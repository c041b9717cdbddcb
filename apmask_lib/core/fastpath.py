"""Execution options that make training faster without changing what is computed.

``compile_blocks`` compiles each transformer block of a :class:`~apmask_lib.models.VisionTransformer`
in place (``nn.Module.compile``, so state-dict keys, EMA updates and checkpoints are unchanged).
Compiling the *block* rather than the whole training step keeps the build short: all blocks share one
code object and, with parameters treated as graph inputs (torch's default since 2.5), one compiled
graph serves all twelve blocks; a new graph is built only per distinct input shape (the recompile limit
is raised to ``RECOMPILE_LIMIT`` so none of them silently falls back to eager). With a fixed
masking ratio the kept-token count is static, so a pre-training run sees a handful of shapes (teacher
global / local views, masked student global / local views), fine-tuning one or two.

Modes (``pretrain.compile`` / ``finetune.compile``):

* ``none`` (default): eager PyTorch.
* ``default``, ``max-autotune-no-cudagraphs``: TorchInductor fused kernels.
* ``reduce-overhead``: TorchInductor + CUDA graphs (GPU only): removes the per-kernel launch cost that
  dominates a batch-16 ViT-S step on a large GPU.
* ``aot_eager``: traces through dynamo and AOTAutograd but runs eager kernels; a fast CPU check that a
  model compiles and that its gradients are unchanged (tests), not a speed-up.

Compilation does not change the maths: tests/test_fastpath.py compares losses and gradients of
compiled and eager pre-training steps on the CPU.
"""
from __future__ import annotations

from torch import nn

from ..config import COMPILE_MODES
# distinct (shape, attention-mode) variants one block sees in a process: teacher and student, global and
# local views, masked and unmasked, the last block's explicit attention, fine-tuning, evaluation sizes.
# torch's default (8) silently falls back to eager for the rest.
RECOMPILE_LIMIT = 64


def _raise_recompile_limit(limit: int = RECOMPILE_LIMIT) -> None:
    import torch._dynamo

    cfg = torch._dynamo.config
    for name in ("recompile_limit", "cache_size_limit"):  # the name changed across torch releases
        if hasattr(cfg, name):
            setattr(cfg, name, max(int(getattr(cfg, name)), limit))


def compile_blocks(vit: nn.Module, mode: str = "none") -> nn.Module:
    """Compile every block of ``vit.blocks`` in place with ``mode`` (see the module docstring);
    ``none`` leaves the model as it is. Returns ``vit``."""
    if mode not in COMPILE_MODES:
        raise ValueError(f"compile mode must be one of {COMPILE_MODES}, got {mode!r}")
    if mode == "none":
        return vit
    _raise_recompile_limit()
    for block in vit.blocks:
        if mode == "aot_eager":
            block.compile(backend="aot_eager", dynamic=False)
        else:
            block.compile(mode=mode, dynamic=False)
    return vit


__all__ = ["COMPILE_MODES", "compile_blocks"]
