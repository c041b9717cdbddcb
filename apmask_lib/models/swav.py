"""The SwAV network of APMask pre-training (paper Sec. 3.1): backbone + projection + prototypes.

The student is a :class:`SwAVNet`; the EMA teacher is a copy of it (:mod:`apmask_lib.pretrain.stage`).
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
from torch import nn

from .heads import ProjectionMLP, Prototypes
from .vit import VisionTransformer


class SwAVHead(nn.Module):
    """Projection MLP (l2 output) followed by the K prototypes: feature (.., C) -> scores z·Cᵀ (.., K).
    ``norm``: the projection's hidden normalisation (:class:`ProjectionMLP`; ``pretrain.head_norm``)."""

    def __init__(self, in_dim: int, hidden_dim: int, out_dim: int, n_prototypes: int, nlayers: int = 3,
                 norm: str = "none"):
        super().__init__()
        self.projection = ProjectionMLP(in_dim, hidden_dim, out_dim, nlayers=nlayers, l2=True, norm=norm)
        self.prototypes = Prototypes(out_dim, n_prototypes)

    def forward(self, feats: torch.Tensor) -> torch.Tensor:
        return self.prototypes(self.projection(feats))


class SwAVNet(nn.Module):
    """Backbone + :class:`SwAVHead` (the student; the teacher is a copy). ``forward`` takes a
    list of ``(images, keep_idx or None)`` view groups (one per crop size, DINO's
    ``MultiCropWrapper``) and returns their prototype scores, one (B_i, K) tensor per group.
    The head runs once on the concatenated [CLS] features. Key names are ``backbone.*`` and
    ``head.*``, so ``build_backbone("file:checkpoint.pt")`` finds the teacher's backbone."""

    def __init__(self, backbone: VisionTransformer, head: SwAVHead):
        super().__init__()
        self.backbone = backbone
        self.head = head

    def forward(self, views: Sequence[tuple[torch.Tensor, Optional[torch.Tensor]]]) -> list[torch.Tensor]:
        feats = [self.backbone(x, keep_idx=k, attn=None).cls for x, k in views]
        scores = self.head(torch.cat(feats))
        return list(scores.split([f.shape[0] for f in feats]))


__all__ = ["SwAVHead", "SwAVNet"]
