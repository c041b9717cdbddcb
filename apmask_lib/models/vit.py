"""Vision Transformer backbone with the accessors APMask needs.

One readable file, in the spirit of facebookresearch/dino ``vision_transformer.py``.
State-dict keys follow timm's layout (``patch_embed.proj``, ``blocks.N.attn.qkv``,
``blocks.N.ls1.gamma`` ...), so timm and official DINO checkpoints load directly.

What this model adds over a plain ViT:

* **Any input size.** Absolute position embeddings are resampled to the patch grid
  (bicubic, no anti-aliasing: what DINO and Hugging Face DINOv2 do).
* **Token dropping.** ``keep_idx`` (B, K) selects which patch tokens enter the
  transformer; the others are *removed* from the sequence, so a student view with
  30 % of its patches dropped really costs ~30 % less (paper, Sec. 3.1).
* **Last-layer attention** without giving up fused attention elsewhere: every block
  runs ``scaled_dot_product_attention``; the last block additionally computes the
  explicit softmax weights of the [CLS] row (``attn="cls"``, cheap: q_cls·Kᵀ) or of
  the full matrix (``attn="full"``) when asked. The mean over heads of the [CLS] row
  is the saliency map the whole method uses (Eq. 2).
* **Intermediate blocks** as timm's ``forward_intermediates`` (stopping after the last
  requested block) and ``no_weight_decay`` (timm's names), for the kNN extension.

Inputs are RGB images in [0, 1], shape (B, 3, H, W); the model normalises them
itself with ``mean``/``std`` (ImageNet statistics, the one place they are written).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class ViTConfig:
    """Architecture hyper-parameters. ``pos_grid`` is the grid the stored position
    embeddings were trained for (14 for ViT-S/16 at 224 px, 37 for DINOv2 at 518 px)."""

    patch_size: int = 16
    embed_dim: int = 384
    depth: int = 12
    num_heads: int = 6
    mlp_ratio: float = 4.0
    layerscale: bool = False
    pos_grid: int = 14
    eps: float = 1e-6


ARCHS = {
    # the paper's backbone (DINO ViT-S/16)
    "vit_s16": ViTConfig(patch_size=16, pos_grid=14),
    # the offline stand-in (DINOv2 ViT-S/14, LayerScale, position embeddings for 518 px)
    "vit_s14": ViTConfig(patch_size=14, layerscale=True, pos_grid=37),
    # tiny model for fast CPU tests only
    "vit_tiny16": ViTConfig(patch_size=16, embed_dim=96, depth=4, num_heads=3, pos_grid=14),
}


@dataclass
class ViTOutput:
    """What one forward pass returns.

    cls:      (B, C) final-normed [CLS] feature.
    patches:  (B, N, C) final-normed patch tokens (only the kept ones when dropping).
    attn:     last-layer attention: (B, heads, N) [CLS]→patch row when ``attn="cls"``,
              (B, heads, N+1, N+1) full matrix (index 0 = [CLS]) when ``attn="full"``,
              else None. Rows are softmax-normalised over all N+1 tokens.
    grid:     (h, w) patch grid of the *full* image.
    keep_idx: (B, N) indices of the kept patches into the full grid, or None.
    layers:   {block index: (B, N+1, C) un-normed tokens after that block} for
              ``return_layers``.
    """

    cls: torch.Tensor
    patches: torch.Tensor
    attn: Optional[torch.Tensor]
    grid: tuple[int, int]
    keep_idx: Optional[torch.Tensor] = None
    layers: dict[int, torch.Tensor] = field(default_factory=dict)

    def cls_attention(self) -> torch.Tensor:
        """Mean over heads of the [CLS]→patch attention, (B, N) (paper Eq. 2)."""
        if self.attn is None:
            raise ValueError("forward() was called with attn=None; pass attn='cls' or 'full'")
        row = self.attn if self.attn.dim() == 3 else self.attn[:, :, 0, 1:]
        return row.mean(dim=1)


class LayerScale(nn.Module):
    def __init__(self, dim: int, init: float = 1e-5):
        super().__init__()
        self.gamma = nn.Parameter(init * torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.gamma


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class Attention(nn.Module):
    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.scale = (dim // num_heads) ** -0.5
        self.qkv = nn.Linear(dim, dim * 3)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, attn: Optional[str] = None):
        B, N, C = x.shape
        q, k, v = self.qkv(x).reshape(B, N, 3, self.num_heads, C // self.num_heads).permute(2, 0, 3, 1, 4)
        weights = None
        if attn == "full":
            weights = ((q * self.scale) @ k.transpose(-2, -1)).softmax(dim=-1)  # (B, h, N, N)
            out = weights @ v
        else:
            out = F.scaled_dot_product_attention(q, k, v)
            if attn == "cls":
                row = ((q[:, :, :1] * self.scale) @ k.transpose(-2, -1)).softmax(dim=-1)  # (B, h, 1, N)
                weights = row[:, :, 0, 1:]  # (B, h, N-1): [CLS] -> patches
        out = out.transpose(1, 2).reshape(B, N, C)
        return self.proj(out), weights


class Block(nn.Module):
    def __init__(self, cfg: ViTConfig):
        super().__init__()
        d = cfg.embed_dim
        self.norm1 = nn.LayerNorm(d, eps=cfg.eps)
        self.attn = Attention(d, cfg.num_heads)
        self.ls1 = LayerScale(d) if cfg.layerscale else nn.Identity()
        self.norm2 = nn.LayerNorm(d, eps=cfg.eps)
        self.mlp = Mlp(d, int(d * cfg.mlp_ratio))
        self.ls2 = LayerScale(d) if cfg.layerscale else nn.Identity()

    def forward(self, x: torch.Tensor, attn: Optional[str] = None):
        y, weights = self.attn(self.norm1(x), attn=attn)
        x = x + self.ls1(y)
        x = x + self.ls2(self.mlp(self.norm2(x)))
        return x, weights


class PatchEmbed(nn.Module):
    def __init__(self, patch_size: int, embed_dim: int):
        super().__init__()
        self.proj = nn.Conv2d(3, embed_dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, x: torch.Tensor):
        x = self.proj(x)  # (B, C, h, w); a border that does not fill a patch is dropped
        return x.flatten(2).transpose(1, 2), (x.shape[-2], x.shape[-1])


def resample_pos_embed(pos: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """Resample (1, 1 + g*g, C) position embeddings to ``grid`` (bicubic, no antialias)."""
    n = pos.shape[1] - 1
    g = int(math.isqrt(n))
    if (g, g) == tuple(grid):
        return pos
    cls_pos, patch_pos = pos[:, :1], pos[:, 1:]
    patch_pos = patch_pos.reshape(1, g, g, -1).permute(0, 3, 1, 2).float()
    patch_pos = F.interpolate(patch_pos, size=tuple(grid), mode="bicubic", align_corners=False, antialias=False)
    patch_pos = patch_pos.permute(0, 2, 3, 1).reshape(1, grid[0] * grid[1], -1).to(pos.dtype)
    return torch.cat([cls_pos, patch_pos], dim=1)


class VisionTransformer(nn.Module):
    """ViT backbone (no classification head). See the module docstring."""

    def __init__(self, cfg: ViTConfig = ARCHS["vit_s16"]):
        super().__init__()
        self.cfg = cfg
        self.patch_size = cfg.patch_size
        self.embed_dim = cfg.embed_dim
        self.num_heads = cfg.num_heads
        self.patch_embed = PatchEmbed(cfg.patch_size, cfg.embed_dim)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, cfg.embed_dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, 1 + cfg.pos_grid**2, cfg.embed_dim))
        self.blocks = nn.ModuleList([Block(cfg) for _ in range(cfg.depth)])
        self.norm = nn.LayerNorm(cfg.embed_dim, eps=cfg.eps)
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)
        self._init_weights()

    def _init_weights(self) -> None:
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        nn.init.trunc_normal_(self.cls_token, std=0.02)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)

    # --- tokens -------------------------------------------------------------------
    def grid_size(self, height: int, width: int) -> tuple[int, int]:
        return height // self.patch_size, width // self.patch_size

    def prepare_tokens(self, images: torch.Tensor, keep_idx: Optional[torch.Tensor] = None):
        """Normalise, embed, add position embeddings, drop tokens not in ``keep_idx``,
        prepend [CLS]. Returns (tokens (B, 1+K, C), grid)."""
        x = (images - self.mean) / self.std
        x, grid = self.patch_embed(x)
        pos = resample_pos_embed(self.pos_embed, grid)
        x = x + pos[:, 1:]
        if keep_idx is not None:
            x = torch.gather(x, 1, keep_idx.unsqueeze(-1).expand(-1, -1, x.shape[-1]))
        cls = (self.cls_token + pos[:, :1]).expand(x.shape[0], -1, -1)
        return torch.cat([cls, x], dim=1), grid

    # --- forward ------------------------------------------------------------------
    def forward(
        self,
        images: torch.Tensor,
        keep_idx: Optional[torch.Tensor] = None,
        attn: Optional[str] = "cls",
        return_layers: Sequence[int] = (),
    ) -> ViTOutput:
        """images: (B, 3, H, W) in [0, 1]; keep_idx: (B, K) long indices into the
        h*w patch grid (row-major) or None; attn: "cls" | "full" | None."""
        if attn not in (None, "cls", "full"):
            raise ValueError(f"attn must be None, 'cls' or 'full', got {attn!r}")
        x, grid = self.prepare_tokens(images, keep_idx)
        layers: dict[int, torch.Tensor] = {}
        last = len(self.blocks) - 1
        weights = None
        for i, blk in enumerate(self.blocks):
            x, w = blk(x, attn=attn if i == last else None)
            if i == last:
                weights = w
            if i in return_layers or (i - len(self.blocks)) in return_layers:
                layers[i] = x
        x = self.norm(x)
        return ViTOutput(cls=x[:, 0], patches=x[:, 1:], attn=weights, grid=grid, keep_idx=keep_idx, layers=layers)

    def forward_intermediates(
        self,
        images: torch.Tensor,
        indices: int | Sequence[int] | None = None,
        norm: bool = True,
        stop_early: bool = True,
        output_fmt: str = "NLC",
    ) -> list[torch.Tensor]:
        """Patch tokens ([CLS] dropped) after the requested blocks, in the order of ``indices``.

        timm's ``forward_intermediates`` (names and meaning; here it always returns the
        intermediates only, timm's ``intermediates_only=True``): ``indices`` an int n = the last n
        blocks, a sequence = block indices (0-based, negative from the end), None = all blocks;
        ``norm`` passes each through the FINAL LayerNorm (DINOv2 ``get_intermediate_layers(norm=True)``,
        what AnomalyDINO reads); ``stop_early`` runs no block after the last requested one (block 7
        of 12: 4 blocks skipped, the same numbers); ``output_fmt`` "NLC" -> (B, h*w, C) row-major,
        "NCHW" -> (B, C, h, w). images: (B, 3, H, W) in [0, 1]."""
        depth = len(self.blocks)
        if indices is None:
            indices = range(depth)
        elif isinstance(indices, int):
            if not 1 <= indices <= depth:
                raise ValueError(f"indices as a count must lie in [1, {depth}], got {indices}")
            indices = range(depth - indices, depth)
        wanted = []
        for i in indices:
            if not -depth <= int(i) < depth:
                raise ValueError(f"block index must lie in [{-depth}, {depth - 1}] for a {depth}-block backbone, got {i}")
            wanted.append(int(i) % depth)
        if not wanted:
            raise ValueError("forward_intermediates needs at least one block index")
        if output_fmt not in ("NLC", "NCHW"):
            raise ValueError(f"output_fmt must be 'NLC' or 'NCHW', got {output_fmt!r}")
        x, grid = self.prepare_tokens(images)
        found: dict[int, torch.Tensor] = {}
        for i, blk in enumerate(self.blocks[:max(wanted) + 1] if stop_early else self.blocks):
            x, _ = blk(x, attn=None)
            if i in wanted:
                tokens = x[:, 1:]
                found[i] = self.norm(tokens) if norm else tokens
        out = [found[i] for i in wanted]
        if output_fmt == "NCHW":
            out = [t.transpose(1, 2).reshape(t.shape[0], t.shape[2], *grid) for t in out]
        return out

    def no_weight_decay(self) -> set[str]:
        """Parameter names exempt from weight decay (timm's convention for ViTs): the position
        embedding and the [CLS] token."""
        return {"pos_embed", "cls_token"}

    @torch.no_grad()
    def get_last_selfattention(self, images: torch.Tensor) -> torch.Tensor:
        """(B, heads, N+1, N+1) last-layer attention, as in facebookresearch/dino."""
        return self.forward(images, attn="full").attn

    @torch.no_grad()
    def saliency(self, images: torch.Tensor) -> torch.Tensor:
        """Mean-over-heads [CLS]→patch attention of the last layer as a (B, h, w) map (Eq. 2)."""
        out = self.forward(images, attn="cls")
        return out.cls_attention().reshape(images.shape[0], *out.grid)
