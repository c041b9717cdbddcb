"""Patch-level k-nearest-neighbour anomaly scoring (an EXTENSION, not part of the paper).

The paper localises anomalies from the fine-tuned ViT's last-layer [CLS] attention. With a
backbone whose last block is tuned for saliency (the offline DINOv2 stand-in), those maps localise
poorly, whereas intermediate patch tokens keep fine local detail. This module scores every patch of
a test image by its cosine distance to the nearest patch of a memory bank of normal training
patches, as in AnomalyDINO (Damm et al., WACV 2025) and PatchCore (Roth et al., CVPR 2022):

    d(x_p) = min_{m in M} (1 - <x_p, m>)       x_p, m  l2-normalised patch features   (AnomalyDINO Eq. 1)
    image score  s(x) = mean of the top 1 % of {d(x_p)}_p                             (AnomalyDINO Eq. 2)
    pixel map    A(x) = G_sigma * up_{H,W}( d on the (h, w) patch grid )               (bilinear, sigma 4 px)

``k > 1`` averages the k smallest distances (AnomalyDINO ``knn_neighbors``; its default and ours
is k = 1).

Features (:func:`patch_features`): the patch tokens after transformer block ``layer`` (0-based),
[CLS] dropped, passed through the backbone's FINAL LayerNorm (``final_norm=True``, the default)
and l2-normalised: what DINOv2's ``get_intermediate_layers(..., norm=True)`` returns, the call
AnomalyDINO makes. The raw residual-stream tokens (``final_norm=False``) are also available.

Input sizes (``evaluate.knn_sizes``): AnomalyDINO uses one size (448 px); the evaluation averages
the maps and image scores of several sizes (:func:`average_outputs`), as the paper averages its
test-time scales. Smoothing (``sigma_at``): at the image's stored size (AnomalyDINO) or at the
network input size (PatchCore / anomalib), :func:`distance_map`.

Memory bank (:class:`MemoryBank`, :func:`knn_distances`, :func:`greedy_coreset`, in
:mod:`apmask_lib.knn.bank`): exact fp32 brute-force search in bounded chunks (bf16 candidate search
opt-in), an optional greedy (k-center) or random coreset capped by a fraction and a patch count, fp32 or
fp16 storage. ``KnnScorer(feature_bf16=True)`` computes the features with a bf16 copy of the backbone on
the CPU (:func:`bf16_copy`; bf16 autocast on CUDA): an opt-in approximation (``evaluate.knn_features``).

Aspect ratio (``KnnScorer(aspect=...)``): ``"square"`` (default, AnomalyDINO / PatchCore) stretches
every image to size x size; ``"keep"`` feeds each image at its own aspect ratio with about the same
number of patches (:func:`input_shape`), images of different shapes in separate backbone passes, each
map read out on its own grid.

Why these defaults, and how fast: measured in docs/knn.md and results/knn_readout.md,
results/knn_readout_blocks.md (blocks, sizes, sigma_at), results/knn_speed.md, results/knn_search.md
(time, memory, search), results/knn_aspect.md (aspect ratio), results/knn_bank.md (coreset, fp16 bank),
results/knn_scaling.md (time, memory and file size against the training-set size), each with its command.

torch (numpy for image inputs); no files, no loops over data sets (the caller batches images). The
extension's glue beside the detector and the fusion with it: :mod:`apmask_lib.knn.fusion`.
"""
from __future__ import annotations

import copy as _copy
import logging
import math
import weakref
from dataclasses import dataclass
from typing import Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from .bank import (BANK_CHUNK, BANK_DTYPES, CORESET_METHODS, QUERY_CHUNK, SEARCHES, MemoryBank, coreset_size,
                   greedy_coreset, knn_distances, random_coreset)

log = logging.getLogger(__name__)



# --------------------------------------------------------------------------------------------
# features
# --------------------------------------------------------------------------------------------
@torch.no_grad()
def patch_features(backbone: torch.nn.Module, images01: torch.Tensor, layer: int,
                   final_norm: bool = True) -> torch.Tensor:
    """l2-normalised patch tokens after block ``layer`` (0-based; 7 = the 8th of 12 blocks).

    backbone: a :class:`~apmask_lib.models.vit.VisionTransformer`; images01: (B, 3, H, W) in [0, 1]
    (H, W multiples of the patch size); final_norm: apply the backbone's final LayerNorm first
    (DINOv2 ``get_intermediate_layers(norm=True)``, as AnomalyDINO). Returns (B, N, C) float32,
    N = (H / p) * (W / p) in row-major grid order, unit norm along C."""
    depth = len(backbone.blocks)
    if not -depth <= layer < depth:
        raise ValueError(f"layer must lie in [{-depth}, {depth - 1}] for a {depth}-block backbone, got {layer}")
    # stops after block `layer` (block 7 of 12: 4 blocks skipped); tests/test_knn.py checks it equals
    # backbone(images01, attn=None, return_layers=(layer,)).layers[layer]
    tokens = backbone.forward_intermediates(images01, [layer], norm=final_norm, stop_early=True)[0]
    return F.normalize(tokens.float(), dim=-1)


_BF16_COPIES: "weakref.WeakKeyDictionary[torch.nn.Module, torch.nn.Module]" = weakref.WeakKeyDictionary()


def bf16_copy(module: torch.nn.Module) -> torch.nn.Module:
    """A bfloat16 copy of ``module`` (weights and buffers), made at the first call and reused while
    ``module`` lives (several scorers share one copy). For CPU inference: every operation then runs in
    bf16 on AMX / AVX512-BF16 units (LayerNorm and softmax accumulate in fp32 inside their kernels),
    where CPU autocast converts every weight at each call and runs some element-wise operations in
    fp32 (block-7 features at 448 px on the 2-core Xeon: 36 ms per image vs 46 ms with autocast and
    163 ms in fp32, results/knn_speed.md). The copy does not follow later changes to ``module``'s
    weights."""
    copy = _BF16_COPIES.get(module)
    if copy is None:
        copy = _copy.deepcopy(module).to(torch.bfloat16).eval()
        _BF16_COPIES[module] = copy
    return copy


def patch_features_at(backbone: torch.nn.Module, images01: torch.Tensor, layer: int, final_norm: bool = True,
                      bf16: bool = False) -> torch.Tensor:
    """:func:`patch_features` in fp32 (``bf16=False``) or in bf16 (an APPROXIMATION): on the CPU a bf16
    copy of the backbone on a bf16 input (:func:`bf16_copy`), on CUDA bf16 autocast. float32 out."""
    if bf16 and images01.device.type == "cpu":
        return patch_features(bf16_copy(backbone), images01.bfloat16(), layer, final_norm)
    with torch.autocast(device_type=images01.device.type, dtype=torch.bfloat16, enabled=bf16):
        return patch_features(backbone, images01, layer, final_norm)


# --------------------------------------------------------------------------------------------
# nearest neighbours, coreset, storage: apmask_lib/knn/bank.py (re-exported here)
# --------------------------------------------------------------------------------------------

# --------------------------------------------------------------------------------------------
# image scores and maps
# --------------------------------------------------------------------------------------------
def top_fraction_mean(dists: torch.Tensor, fraction: float = 0.01) -> torch.Tensor:
    """(B, N) -> (B,) mean of the largest ``max(1, floor(fraction * N))`` values (AnomalyDINO's
    ``mean_top1p``: the empirical tail value at risk at level 1 - fraction)."""
    if not 0.0 < fraction <= 1.0:
        raise ValueError(f"fraction must lie in (0, 1], got {fraction}")
    n = max(1, int(dists.shape[-1] * fraction))
    return dists.topk(n, dim=-1).values.mean(dim=-1)


def gaussian_kernel1d(sigma: float, truncate: float = 4.0) -> torch.Tensor:
    """Normalised 1-D Gaussian, radius ``int(truncate * sigma + 0.5)`` (scipy.ndimage's)."""
    radius = int(truncate * float(sigma) + 0.5)
    x = torch.arange(-radius, radius + 1, dtype=torch.float64)
    k = torch.exp(-0.5 * (x / float(sigma)) ** 2)
    return (k / k.sum()).float()


def gaussian_filter(maps: torch.Tensor, sigma: float) -> torch.Tensor:
    """Separable Gaussian smoothing of (B, H, W) maps, borders reflected about the edge pixel
    (scipy.ndimage.gaussian_filter ``mode="mirror"``; kernel truncated at 4 sigma). sigma <= 0:
    unchanged. Named after scipy's, which it reproduces on score maps; pre-training's image augmentation
    is torchvision's blur instead (:func:`apmask_lib.pretrain.multicrop.gaussian_blur`: per-sample sigma,
    3-sigma kernel)."""
    if sigma <= 0:
        return maps
    k = gaussian_kernel1d(sigma).to(maps.device)
    r = (k.numel() - 1) // 2
    x = maps.float()[:, None]
    h, w = x.shape[-2:]
    if r >= min(h, w):
        raise ValueError(f"sigma {sigma} is too large for a {h}x{w} map (reflect padding needs radius < size)")
    x = F.conv2d(F.pad(x, (r, r, 0, 0), mode="reflect"), k.view(1, 1, 1, -1))
    x = F.conv2d(F.pad(x, (0, 0, r, r), mode="reflect"), k.view(1, 1, -1, 1))
    return x[:, 0]


SIGMA_AT = ("output", "input")


def distance_map(dists: torch.Tensor, grid: tuple[int, int], size: tuple[int, int], sigma: float = 4.0,
                 sigma_at: str = "output", input_size: Optional[tuple[int, int]] = None) -> torch.Tensor:
    """Patch distances (B, h*w) -> (B, H, W) pixel map.

    ``sigma_at="output"``: bilinear upsampling of the (h, w) grid to ``size`` (H, W), then Gaussian
    smoothing with ``sigma`` pixels at that size (AnomalyDINO's ``dists2map``: sigma 4 at the
    image's own resolution). ``sigma_at="input"``: bilinear upsampling to the network's
    ``input_size`` (the resized image the patches were computed on), smoothing with ``sigma``
    pixels THERE, then bilinear resizing to ``size`` (PatchCore's and anomalib's convention: sigma 4
    at the input resolution), so the smoothing is a fixed fraction of a patch whatever the size
    the image is stored at."""
    if sigma_at not in SIGMA_AT:
        raise ValueError(f"sigma_at must be one of {SIGMA_AT}, got {sigma_at!r}")
    if sigma_at == "input" and input_size is None:
        raise ValueError("sigma_at='input' needs input_size, the (H, W) the patch grid was computed at")
    smooth_at = tuple(size) if sigma_at == "output" else tuple(input_size)
    b = dists.shape[0]
    g = dists.reshape(b, 1, *grid).float()
    up = gaussian_filter(F.interpolate(g, size=smooth_at, mode="bilinear", align_corners=False)[:, 0], sigma)
    if smooth_at == tuple(size):
        return up
    return F.interpolate(up[:, None], size=tuple(size), mode="bilinear", align_corners=False)[:, 0]


# --------------------------------------------------------------------------------------------
# the kNN branch over RGB images
# --------------------------------------------------------------------------------------------
@dataclass
class KnnOutput:
    """One batch. dists: (B, N) patch distances on the (h, w) grid (a list of (N_i,) when the
    images' grids differ, ``aspect="keep"``); scores: (B,) top-1 % means;
    maps: list of (H_i, W_i) float32 pixel maps at each image's original size."""

    dists: torch.Tensor
    scores: np.ndarray
    maps: list[np.ndarray]


ASPECTS = ("square", "keep")


def input_shape(hw: tuple[int, int], size: int, patch: int, aspect: str = "square") -> tuple[int, int]:
    """Network input (h, w) for an image stored at ``hw`` (H, W).

    ``"square"``: (s, s) with s = ``size`` snapped to the patch grid (every image is stretched to a
    square, AnomalyDINO's and PatchCore's convention). ``"keep"``: the image's own aspect ratio at
    about the same pixel count, h = snap(size * sqrt(H / W)), w = snap(size * sqrt(W / H)) (no
    distortion up to the snapping to whole patches; about as many patches as the square input)."""
    from ..inference.multiscale import snap_size

    if aspect not in ASPECTS:
        raise ValueError(f"aspect must be one of {ASPECTS}, got {aspect!r}")
    if aspect == "square":
        s = snap_size(int(size), int(patch))
        return s, s
    h, w = int(hw[0]), int(hw[1])
    if h <= 0 or w <= 0:
        raise ValueError(f"image size must be positive, got {hw}")
    r = math.sqrt(h / w)
    return snap_size(round(size * r), int(patch)), snap_size(round(size / r), int(patch))


FEATURE_PRECISIONS = ("auto", "fp32", "bf16")


def feature_bf16_of(precision: str) -> Optional[bool]:
    """``evaluate.knn_features`` -> :class:`KnnScorer`'s ``feature_bf16``: "auto" -> None (bf16 on
    CUDA only), "fp32" -> False, "bf16" -> True."""
    if precision not in FEATURE_PRECISIONS:
        raise ValueError(f"kNN feature precision must be one of {FEATURE_PRECISIONS}, got {precision!r}")
    return {"auto": None, "fp32": False, "bf16": True}[precision]


class KnnScorer:
    """kNN anomaly scoring of RGB uint8 images with ``backbone``'s block-``layer`` patch tokens at
    input ``size`` (snapped to the patch grid; square, or each image's own aspect ratio with
    ``aspect="keep"``, :func:`input_shape`), a :class:`MemoryBank` and the AnomalyDINO read-out
    (module docstring). The caller loops over batches: :meth:`features` (or :meth:`features_list`)
    for the training images, :meth:`fit` on them, then :meth:`predict` per test batch.

    Two opt-in APPROXIMATIONS for speed on CPUs with bf16 units (AMX / AVX512-BF16), off by default
    except ``feature_bf16`` on CUDA: ``feature_bf16=True`` runs a bf16 copy of the backbone on the CPU
    (:func:`bf16_copy`), the backbone under bf16 autocast on CUDA; ``search="bf16"`` chooses the nearest neighbours on bf16 products and recomputes their distances
    in fp32 (:func:`knn_distances`). Measured speed and quality cost: results/knn_speed.md."""

    def __init__(self, backbone: torch.nn.Module, layer: int, size: int = 448, k: int = 1, sigma: float = 4.0,
                 final_norm: bool = True, coreset: float = 1.0, coreset_method: str = "greedy", seed: int = 0,
                 top_fraction: float = 0.01, device: torch.device | str = "cpu", sigma_at: str = "output",
                 feature_bf16: Optional[bool] = None, aspect: str = "square", search: str = "exact",
                 bank_max: Optional[int] = None, bank_dtype: str = "fp32"):
        from ..inference.multiscale import snap_size

        if sigma_at not in SIGMA_AT:
            raise ValueError(f"sigma_at must be one of {SIGMA_AT}, got {sigma_at!r}")
        if aspect not in ASPECTS:
            raise ValueError(f"aspect must be one of {ASPECTS}, got {aspect!r}")
        self.backbone = backbone
        self.layer, self.k, self.sigma, self.final_norm = int(layer), int(k), float(sigma), bool(final_norm)
        self.sigma_at, self.aspect = sigma_at, aspect
        self.top_fraction = float(top_fraction)
        self.patch = int(backbone.patch_size)
        self.size = snap_size(int(size), self.patch)
        self.grid = (self.size // self.patch,) * 2  # the square grid (aspect="keep": per image, grid_of)
        self.device = torch.device(device)
        self.bank = MemoryBank(coreset, coreset_method, seed, search=search, max_patches=bank_max, dtype=bank_dtype)
        # bf16 features: default on CUDA only (an APPROXIMATION on the CPU, opt-in; its quality cost and
        # speed: results/knn_speed.md)
        self.feature_bf16 = self.device.type == "cuda" if feature_bf16 is None else bool(feature_bf16)
        if self.device.type == "cpu" and (self.feature_bf16 or search == "bf16"):
            from ..core.machine import bf16_slow_reason

            reason = bf16_slow_reason()
            if reason:
                log.warning("kNN bf16 features / search requested, but %s: they will run SLOWER than fp32 here "
                            "(results/knn_speed.md); use evaluate.knn_features=fp32, knn_search=exact", reason)

    def input_of(self, hw: tuple[int, int]) -> tuple[int, int]:
        """Network input (h, w) of an image stored at ``hw`` (:func:`input_shape`)."""
        return input_shape(hw, self.size, self.patch, self.aspect)

    def grid_of(self, hw: tuple[int, int]) -> tuple[int, int]:
        """Patch grid (h / p, w / p) of an image stored at ``hw``."""
        h, w = self.input_of(hw)
        return h // self.patch, w // self.patch

    def batch(self, images: Sequence[np.ndarray]) -> torch.Tensor:
        """RGB uint8 (H_i, W_i, 3) images sharing one input shape -> (B, 3, h, w) float in [0, 1]."""
        from ..data.images import resize_image

        shapes = {self.input_of(im.shape[:2]) for im in images}
        if len(shapes) != 1:
            raise ValueError(f"aspect='keep': these images need different input shapes {sorted(shapes)}; "
                             "batch them with features_list() / predict(), which group them by shape")
        hw = shapes.pop()
        arr = np.stack([resize_image(im, hw) for im in images])
        return torch.from_numpy(arr).to(self.device).permute(0, 3, 1, 2).float().div_(255.0)

    @torch.no_grad()
    def features(self, images: Sequence[np.ndarray]) -> torch.Tensor:
        """(B, N, C) l2-normalised patch features of a batch of RGB uint8 images (one input shape)."""
        f = patch_features_at(self.backbone, self.batch(images), self.layer, self.final_norm, bf16=self.feature_bf16)
        return F.normalize(f.float(), dim=-1)

    def features_list(self, images: Sequence[np.ndarray]) -> list[torch.Tensor]:
        """[(N_i, C)] patch features of images of any sizes, in order; images sharing an input shape
        go through the backbone together."""
        groups: dict[tuple[int, int], list[int]] = {}
        for i, im in enumerate(images):
            groups.setdefault(self.input_of(im.shape[:2]), []).append(i)
        out: list[Optional[torch.Tensor]] = [None] * len(images)
        for idx in groups.values():
            for i, f in zip(idx, self.features([images[i] for i in idx])):
                out[i] = f
        return out  # type: ignore[return-value]

    def fit(self, features: torch.Tensor | Sequence[torch.Tensor]) -> "KnnScorer":
        """Fit the memory bank (on this scorer's device) on training patch features."""
        self.bank.fit(features, device=self.device)
        return self

    def readout(self, dists: torch.Tensor | Sequence[torch.Tensor], shapes: Sequence[tuple[int, int]]) -> KnnOutput:
        """Patch distances ((B, N), or one (N_i,) per image) -> image scores and pixel maps at
        ``shapes`` (H_i, W_i), each on its image's grid (:meth:`grid_of`)."""
        rows = list(dists) if not torch.is_tensor(dists) else [dists[i] for i in range(dists.shape[0])]
        if len(rows) != len(shapes):
            raise ValueError(f"{len(rows)} distance rows for {len(shapes)} image shapes")
        scores = np.array([float(top_fraction_mean(d[None], self.top_fraction)[0]) for d in rows], dtype=np.float64)
        maps = [distance_map(d[None], self.grid_of(hw), tuple(hw), self.sigma, self.sigma_at,
                             self.input_of(hw))[0].cpu().numpy()
                for d, hw in zip(rows, shapes)]
        return KnnOutput(dists=dists, scores=scores, maps=maps)

    def score_features(self, feats: Sequence[torch.Tensor], bank: Optional[MemoryBank] = None) -> torch.Tensor | list[torch.Tensor]:
        """Patch distances of per-image features [(N_i, C)] to ``bank`` (default: the fitted one): one
        (B, N) search when all images share a grid, else one (N_i,) row per image."""
        bank = bank or self.bank
        if len({f.shape for f in feats}) == 1:  # one search for the whole batch
            return bank.score(torch.stack(list(feats)).to(self.device), self.k)
        return [bank.score(f.to(self.device), self.k) for f in feats]

    def predict(self, images: Sequence[np.ndarray], bank: Optional[MemoryBank] = None) -> KnnOutput:
        """Score a batch of RGB uint8 images (any sizes) against ``bank`` (default: the fitted one)."""
        return self.readout(self.score_features(self.features_list(images), bank), [im.shape[:2] for im in images])


def average_outputs(outputs: Sequence[KnnOutput]) -> KnnOutput:
    """Mean image scores and mean pixel maps of the same images scored at several input sizes
    (the paper's multi-scale averaging, Sec. 3.3, applied to the kNN branch); ``dists`` is that of
    the first output (grids differ between sizes)."""
    if not outputs:
        raise ValueError("no kNN outputs to average")
    n = len(outputs)
    scores = sum(o.scores for o in outputs) / n
    maps = [sum(ms) / n for ms in zip(*(o.maps for o in outputs))]
    return KnnOutput(dists=outputs[0].dists, scores=scores, maps=maps)


__all__ = ["CORESET_METHODS", "SEARCHES", "BANK_DTYPES", "QUERY_CHUNK", "BANK_CHUNK", "patch_features", "bf16_copy",
           "patch_features_at", "knn_distances", "random_coreset", "greedy_coreset", "coreset_size", "MemoryBank",
           "top_fraction_mean", "gaussian_kernel1d", "gaussian_filter", "SIGMA_AT", "distance_map", "KnnOutput", "ASPECTS", "input_shape", "FEATURE_PRECISIONS", "feature_bf16_of", "KnnScorer", "average_outputs"]
