"""The fine-tuned anomaly detector (paper Sec. 3.2): backbone + detection head + segmentation map.

Detection: the pre-training head minus its last layer (:class:`ProjectionMLP`, no l2 bottleneck)
followed by ``Linear(bottleneck, 1)`` on the last-layer [CLS] token gives one image logit
(sigmoid = P(anomalous)), trained with BCE (L_det).

Segmentation: the paper localises with the last layer's self-attention, trained with a Dice loss
(L_seg), without saying which maps or how they are combined. Our choice, switchable with
``seg_maps`` (``cfg.finetune.seg_maps``) for ablation:

``heads`` (default)  the per-head [CLS]→patch attention rows of the last layer, a_k (N,) for head
                     k, scaled by N (uniform attention = 1) and log-transformed,
                     f_k = log(N·a_k + 1e-6), then a learned 1×1 convolution over heads plus bias:
                     s = Σ_k w_k f_k + b at the patch grid (h, w). Initialised to w_k = 1/heads,
                     b = 0, i.e. the log of the geometric mean of the heads' attention, the
                     paper's saliency (Eq. 2) up to the mean. ``seg_transform="linear"`` uses N·a_k.
``heads_full``       as ``heads`` plus, per head, how much each patch is attended by all patches:
                     the column mean over patch queries of the patch→patch attention, same scaling
                     (2·heads channels into the 1×1 convolution). Needs the full attention matrix.
``tokens``           a linear map of the last-layer patch tokens (not in the paper; an extension).

The map is upsampled bilinearly to the input size. Gradients reach the backbone through the
explicitly computed attention weights (``attn="cls"`` / ``"full"`` in the backbone's forward).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

import torch
import torch.nn.functional as F
from torch import nn

from ..config import SEG_MAPS, SEG_TRANSFORMS
from .heads import ProjectionMLP
from .vit import VisionTransformer



@dataclass
class DetectorOutput:
    """logit (B,) image anomaly logit; seg_logits (B, H, W) pixel logits at the input resolution;
    cls (B, C) the backbone's [CLS] feature."""

    logit: torch.Tensor
    seg_logits: torch.Tensor
    cls: torch.Tensor


def attention_features(attn: torch.Tensor, grid: tuple[int, int], seg_maps: str = "heads",
                       transform: str = "log") -> torch.Tensor:
    """Per-head attention maps as channels (B, K, h, w) from the last-layer attention.

    attn: (B, heads, N) [CLS]→patch rows (``seg_maps="heads"``) or (B, heads, N+1, N+1) full
    matrices (either mode; index 0 = [CLS]). Values are scaled by N (uniform = 1); ``transform``
    "log" applies log(· + 1e-6). Float32 whatever the autocast dtype."""
    attn = attn.float()
    if attn.dim() == 3:
        if seg_maps != "heads":
            raise ValueError(f"seg_maps={seg_maps!r} needs the full attention matrix (attn='full')")
        feats = [attn]
    else:
        feats = [attn[:, :, 0, 1:]]
        if seg_maps == "heads_full":
            feats.append(attn[:, :, 1:, 1:].mean(dim=2))
    x = torch.cat(feats, dim=1)  # (B, K, N)
    n = x.shape[-1]
    x = x * n
    if transform == "log":
        x = torch.log(x + 1e-6)
    elif transform != "linear":
        raise ValueError(f"transform must be one of {SEG_TRANSFORMS}, got {transform!r}")
    return x.reshape(x.shape[0], x.shape[1], *grid)


class AnomalyDetector(nn.Module):
    """Backbone + detection head + segmentation head. See the module docstring.

    backbone: a :class:`VisionTransformer`; hidden_dim, bottleneck_dim, nlayers: the detection
    MLP (as the pre-training head); seg_maps: "heads" | "heads_full" | "tokens";
    seg_transform: "log" | "linear" (attention modes)."""

    def __init__(self, backbone: VisionTransformer, hidden_dim: int = 2048, bottleneck_dim: int = 256,
                 seg_maps: str = "heads", nlayers: int = 3, seg_transform: str = "log"):
        super().__init__()
        if seg_maps not in SEG_MAPS:
            raise ValueError(f"seg_maps must be one of {SEG_MAPS}, got {seg_maps!r}")
        if seg_transform not in SEG_TRANSFORMS:
            raise ValueError(f"seg_transform must be one of {SEG_TRANSFORMS}, got {seg_transform!r}")
        self.backbone = backbone
        self.hidden_dim, self.bottleneck_dim, self.nlayers = hidden_dim, bottleneck_dim, nlayers
        self.seg_maps, self.seg_transform = seg_maps, seg_transform
        dim = backbone.embed_dim
        self.det_mlp = ProjectionMLP(dim, hidden_dim, bottleneck_dim, nlayers=nlayers, l2=False)
        self.det_out = nn.Linear(bottleneck_dim, 1)
        nn.init.trunc_normal_(self.det_out.weight, std=0.02)
        nn.init.zeros_(self.det_out.bias)
        if seg_maps == "tokens":
            self.seg = nn.Linear(dim, 1)
        else:
            k = backbone.num_heads * (2 if seg_maps == "heads_full" else 1)
            self.seg = nn.Conv2d(k, 1, kernel_size=1)
            nn.init.constant_(self.seg.weight, 1.0 / k)
            nn.init.zeros_(self.seg.bias)

    @property
    def attn_mode(self) -> Optional[str]:
        return {"heads": "cls", "heads_full": "full", "tokens": None}[self.seg_maps]

    def head_config(self) -> dict[str, Any]:
        return {"hidden_dim": self.hidden_dim, "bottleneck_dim": self.bottleneck_dim, "nlayers": self.nlayers,
                "seg_maps": self.seg_maps, "seg_transform": self.seg_transform}

    def forward(self, images: torch.Tensor) -> DetectorOutput:
        """images: (B, 3, H, W) in [0, 1], H and W multiples of the patch size."""
        B, _, H, W = images.shape
        out = self.backbone(images, attn=self.attn_mode)
        logit = self.det_out(self.det_mlp(out.cls)).squeeze(-1)
        if self.seg_maps == "tokens":
            grid_map = self.seg(out.patches).squeeze(-1).reshape(B, 1, *out.grid)
        else:
            grid_map = self.seg(attention_features(out.attn, out.grid, self.seg_maps, self.seg_transform))
        seg = F.interpolate(grid_map.float(), size=(H, W), mode="bilinear", align_corners=False)[:, 0]
        return DetectorOutput(logit=logit.float(), seg_logits=seg, cls=out.cls)


__all__ = ["SEG_MAPS", "SEG_TRANSFORMS", "DetectorOutput", "AnomalyDetector", "attention_features"]
