"""Heads on top of the backbone's [CLS] feature (DINO/SwAV style)."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class ProjectionMLP(nn.Module):
    """MLP ``in -> hidden -> hidden -> bottleneck`` (GELU), output l2-normalised when
    ``l2=True`` (the l2 bottleneck of DINO's head). Used by pre-training (Eq. 1) and, minus
    the prototype layer, as the detection head of fine-tuning.

    ``norm="batchnorm"`` puts a ``BatchNorm1d`` after every hidden Linear (before the GELU), as
    SwAV's projection head (Linear, BatchNorm1d, ReLU, Linear) and DINO's head with ``use_bn``. It
    normalises with the statistics of the batch it is given, in train *and* eval mode
    (``track_running_stats=False``): the EMA teacher of pre-training runs in eval mode and must
    centre its batch as the student does (DINO's and BYOL's teachers use batch statistics), and the
    pre-training head is dropped after pre-training, so no running averages are needed. The input
    must then be (N, C) with N >= 2. ``norm="none"`` (default) is the plain MLP, weights and
    state-dict keys unchanged."""

    def __init__(self, in_dim: int, hidden_dim: int = 2048, bottleneck_dim: int = 256, nlayers: int = 3, l2: bool = True,
                 norm: str = "none"):
        super().__init__()
        if norm not in ("none", "batchnorm"):
            raise ValueError(f"norm must be 'none' or 'batchnorm', got {norm!r}")
        layers: list[nn.Module] = []
        dims = [in_dim] + [hidden_dim] * (nlayers - 1) + [bottleneck_dim]
        for i in range(nlayers):
            layers.append(nn.Linear(dims[i], dims[i + 1]))
            if i < nlayers - 1:
                if norm == "batchnorm":
                    layers.append(nn.BatchNorm1d(dims[i + 1], track_running_stats=False))
                layers.append(nn.GELU())
        self.mlp = nn.Sequential(*layers)
        self.l2 = l2
        self.norm = norm
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.norm == "batchnorm" and (x.dim() != 2 or x.shape[0] < 2):
            raise ValueError(f"a batch-normalised projection head needs (N, C) features with N >= 2, got "
                             f"{tuple(x.shape)} (pretrain.head_norm: batchnorm; use a batch of at least 2 images)")
        z = self.mlp(x)
        return F.normalize(z, dim=-1) if self.l2 else z


class Prototypes(nn.Module):
    """K learnable prototypes C (K, D); scores z·Cᵀ. Call :meth:`normalize_` after every
    optimiser step to keep them on the unit sphere (SwAV)."""

    def __init__(self, dim: int, k: int):
        super().__init__()
        self.weight = nn.Parameter(F.normalize(torch.randn(k, dim), dim=1))

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return z @ self.weight.t()

    @torch.no_grad()
    def normalize_(self) -> None:
        self.weight.copy_(F.normalize(self.weight, dim=1))
