"""Multi-crop augmentation of DINO (Caron et al., ICCV 2021), batched on torch tensors.

Views per image (paper Sec. 3.1; DINO's ``DataAugmentationDINO``):

* **teacher view**: one unmasked global crop (``global_size``, scale ``global_scale``), DINO's
  "global crop 1" photometrics (Gaussian blur p = 1.0).
* **student global view**: with ``teacher_view="second"`` (default) a *second, independent*
  global crop of the same image with DINO's "global crop 2" photometrics (blur p = 0.1,
  solarisation p = 0.2) -- DINO and SwAV predict across two different global crops, and the
  paper only says the EMA teacher "sees an unmasked global view". With
  ``teacher_view="same"`` the student's global view is the teacher's view itself (the
  student then sees a masked copy of exactly what the teacher saw).
* **local views**: ``n_local`` crops of ``local_size`` (scale ``local_scale``), blur p = 0.5.

Every view: horizontal flip p = 0.5, colour jitter p = 0.8 (brightness 0.4, contrast 0.4,
saturation 0.2, hue 0.1; applied in this fixed order, torchvision's ``ColorJitter`` shuffles
the order per call), grayscale p = 0.2, Gaussian blur sigma ~ U(0.1, 2.0) px at the output
resolution, solarisation threshold 128/255. Outputs are float RGB in [0, 1]; the backbone
normalises them itself.

How it runs: every training image is decoded **once** (:func:`load_image_bank`), resized so
its short side is ``round(1.15 * global_size)`` and kept as a uint8 tensor (on the training
device when wanted). A batch is cropped and resized in one ``torchvision.ops.roi_align`` call
per view size (bilinear, adaptive super-sampling when shrinking, i.e. anti-aliased), and the
photometric ops are batched tensor maths with per-sample parameters. All random parameters
are drawn on the CPU from one ``torch.Generator`` in a fixed order, so a seed gives the same
views on CPU and GPU (up to float rounding of the pixel ops).
"""
from __future__ import annotations

import math
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torchvision.ops import roi_align
from tqdm.auto import tqdm

from ..config import TEACHER_VIEWS
from ..data import resize_image

# DINO's photometric settings (main_dino.py, DataAugmentationDINO)
FLIP_P = 0.5
JITTER_P = 0.8
JITTER = (0.4, 0.4, 0.2, 0.1)      # brightness, contrast, saturation, hue
GRAY_P = 0.2
BLUR_SIGMA = (0.1, 2.0)
SOLARIZE_THRESHOLD = 128 / 255
RATIO = (3 / 4, 4 / 3)             # RandomResizedCrop aspect-ratio range
GRAY_WEIGHTS = (0.2989, 0.587, 0.114)  # torchvision rgb_to_grayscale
CACHE_FACTOR = 1.15                # cached short side = CACHE_FACTOR * global_size


# ----------------------------------------------------------------------------- image bank
@dataclass
class ImageBank:
    """Decoded training images. images: (N, 3, H, W) uint8, zero-padded to the largest size;
    sizes: (N, 2) long (h, w) of each image's valid region."""

    images: torch.Tensor
    sizes: torch.Tensor

    def __len__(self) -> int:
        return self.images.shape[0]

    def to(self, device) -> "ImageBank":
        """Move the pixels; ``sizes`` stay on the CPU (crop parameters are drawn there)."""
        return ImageBank(self.images.to(device), self.sizes)


def cache_short_side(global_size: int) -> int:
    return int(round(CACHE_FACTOR * global_size))


def load_image_bank(dataset, samples: Sequence, short_side: int, num_workers: int = 2,
                    progress: bool = True) -> ImageBank:
    """Decode ``samples`` once with ``dataset.image`` and resize each (aspect kept) so its short
    side is ``short_side`` pixels. Decoding runs in ``num_workers`` threads (OpenCV releases the GIL)."""
    if not samples:
        raise ValueError("no training images to cache (dataset.train is empty)")

    def load(sample):
        img = dataset.image(sample)
        h, w = img.shape[:2]
        s = short_side / min(h, w)
        return resize_image(img, (max(1, round(h * s)), max(1, round(w * s))))

    with ThreadPoolExecutor(max(1, num_workers)) as pool:
        imgs = list(tqdm(pool.map(load, samples), total=len(samples), desc="decode train images",
                         disable=not progress, leave=False))
    H = max(i.shape[0] for i in imgs)
    W = max(i.shape[1] for i in imgs)
    bank = torch.zeros(len(imgs), 3, H, W, dtype=torch.uint8)
    for n, img in enumerate(imgs):
        bank[n, :, : img.shape[0], : img.shape[1]] = torch.from_numpy(img).permute(2, 0, 1)
    sizes = torch.tensor([i.shape[:2] for i in imgs], dtype=torch.long)
    return ImageBank(bank, sizes)


# ----------------------------------------------------------------------------- geometry
def random_resized_crop_boxes(sizes: torch.Tensor, scale: tuple[float, float],
                              ratio: tuple[float, float] = RATIO,
                              generator: Optional[torch.Generator] = None, attempts: int = 10) -> torch.Tensor:
    """torchvision ``RandomResizedCrop.get_params``, vectorised: for each image of size
    ``sizes[m] = (h, w)`` (M, 2), up to ``attempts`` draws of area ~ U(scale) * h * w and
    log-uniform aspect ratio; the first crop that fits is used, else the central crop with the
    aspect ratio clamped to ``ratio``. Returns (M, 4) float boxes (x1, y1, x2, y2) in pixels."""
    sizes = sizes.detach().cpu().double()
    M = sizes.shape[0]
    H, W = sizes[:, 0:1], sizes[:, 1:2]
    area = H * W
    u = torch.rand(4, M, attempts, generator=generator, dtype=torch.float64)
    target = area * (scale[0] + u[0] * (scale[1] - scale[0]))
    logr = math.log(ratio[0]) + u[1] * (math.log(ratio[1]) - math.log(ratio[0]))
    ar = torch.exp(logr)
    w = torch.round(torch.sqrt(target * ar))
    h = torch.round(torch.sqrt(target / ar))
    ok = (w > 0) & (w <= W) & (h > 0) & (h <= H)
    i = torch.floor(u[2] * (H - h + 1))
    j = torch.floor(u[3] * (W - w + 1))
    first = ok.double().argmax(dim=1, keepdim=True)  # first valid attempt (0 if none)
    pick = lambda t: t.gather(1, first).squeeze(1)  # noqa: E731
    h_, w_, i_, j_ = pick(h), pick(w), pick(i), pick(j)
    # fallback: central crop
    Hs, Ws = H.squeeze(1), W.squeeze(1)
    in_ratio = Ws / Hs
    fw = torch.where(in_ratio < ratio[0], Ws, torch.where(in_ratio > ratio[1], torch.round(Hs * ratio[1]), Ws))
    fh = torch.where(in_ratio < ratio[0], torch.round(Ws / ratio[0]), Hs)
    fi, fj = torch.floor((Hs - fh) / 2), torch.floor((Ws - fw) / 2)
    any_ok = ok.any(dim=1)
    h_, w_ = torch.where(any_ok, h_, fh), torch.where(any_ok, w_, fw)
    i_, j_ = torch.where(any_ok, i_, fi), torch.where(any_ok, j_, fj)
    return torch.stack([j_, i_, j_ + w_, i_ + h_], dim=1).float()


def crop_resize(images: torch.Tensor, boxes: torch.Tensor, index: torch.Tensor, size: int) -> torch.Tensor:
    """Crop ``boxes`` (M, 4) (x1, y1, x2, y2, pixels) from ``images[index]`` (images (B, 3, H, W)
    float) and resize each to ``size``x``size`` (bilinear; ``roi_align`` averages
    ceil(box/size) samples per output pixel when shrinking). Returns (M, 3, size, size)."""
    rois = torch.cat([index.to(images.dtype).unsqueeze(1), boxes.to(images)], dim=1)
    return roi_align(images, rois, output_size=(size, size), spatial_scale=1.0, sampling_ratio=-1, aligned=True)


# ----------------------------------------------------------------------------- photometrics
def grayscale(x: torch.Tensor) -> torch.Tensor:
    """(M, 3, H, W) -> (M, 1, H, W) luma with torchvision's weights."""
    r, g, b = x.unbind(1)
    return (GRAY_WEIGHTS[0] * r + GRAY_WEIGHTS[1] * g + GRAY_WEIGHTS[2] * b).unsqueeze(1)


def _blend(a: torch.Tensor, b: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    return (factor.view(-1, 1, 1, 1) * a + (1 - factor.view(-1, 1, 1, 1)) * b).clamp(0, 1)


def adjust_brightness(x: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """Per-sample ``factor`` (M,), as torchvision ``adjust_brightness``."""
    return (x * factor.view(-1, 1, 1, 1)).clamp(0, 1)


def adjust_contrast(x: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """Blend with the image's mean luma, as torchvision ``adjust_contrast``."""
    return _blend(x, grayscale(x).mean(dim=(1, 2, 3), keepdim=True), factor)


def adjust_saturation(x: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """Blend with the luma image, as torchvision ``adjust_saturation``."""
    return _blend(x, grayscale(x), factor)


def rgb_to_hsv(x: torch.Tensor) -> torch.Tensor:
    r, g, b = x.unbind(1)
    maxc, minc = x.max(dim=1).values, x.min(dim=1).values
    eqc = maxc == minc
    cr = maxc - minc
    ones = torch.ones_like(maxc)
    s = cr / torch.where(eqc, ones, maxc)
    crd = torch.where(eqc, ones, cr)
    rc, gc, bc = (maxc - r) / crd, (maxc - g) / crd, (maxc - b) / crd
    hr = (maxc == r) * (bc - gc)
    hg = ((maxc == g) & (maxc != r)) * (2.0 + rc - bc)
    hb = ((maxc != g) & (maxc != r)) * (4.0 + gc - rc)
    h = torch.fmod((hr + hg + hb) / 6.0 + 1.0, 1.0)
    return torch.stack([h, s, maxc], dim=1)


def hsv_to_rgb(x: torch.Tensor) -> torch.Tensor:
    h, s, v = x.unbind(1)
    i = torch.floor(h * 6.0)
    f = h * 6.0 - i
    i = i.to(torch.int64) % 6
    p = (v * (1.0 - s)).clamp(0, 1)
    q = (v * (1.0 - s * f)).clamp(0, 1)
    t = (v * (1.0 - s * (1.0 - f))).clamp(0, 1)
    sel = (i.unsqueeze(1) == torch.arange(6, device=x.device).view(1, 6, 1, 1)).to(x.dtype)  # (M, 6, H, W)
    r = torch.stack([v, q, p, p, t, v], dim=1)
    g = torch.stack([t, v, v, q, p, p], dim=1)
    b = torch.stack([p, p, t, v, v, q], dim=1)
    return torch.stack([(sel * r).sum(1), (sel * g).sum(1), (sel * b).sum(1)], dim=1)


def adjust_hue(x: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """Rotate hue by ``shift`` (M,) in [-0.5, 0.5] turns, as torchvision ``adjust_hue``."""
    hsv = rgb_to_hsv(x)
    h = torch.remainder(hsv[:, 0] + shift.view(-1, 1, 1), 1.0)
    return hsv_to_rgb(torch.stack([h, hsv[:, 1], hsv[:, 2]], dim=1))


def gaussian_blur(x: torch.Tensor, sigma: torch.Tensor, kernel_size: Optional[int] = None) -> torch.Tensor:
    """Per-sample Gaussian blur, sigma (M,) in pixels (sigma <= 0: unchanged). Separable,
    reflect padding, kernel ``exp(-d²/2σ²)`` normalised: torchvision ``gaussian_blur``.
    Default kernel size 2*ceil(3*max σ)+1 (13 for DINO's σ ≤ 2), capped by the image size. The kNN
    maps are smoothed by scipy's filter instead (:func:`apmask_lib.knn.scoring.gaussian_filter`: one
    sigma, 4-sigma kernel)."""
    M, C, H, W = x.shape
    if kernel_size is None:
        kernel_size = 2 * math.ceil(3 * BLUR_SIGMA[1]) + 1
    half = min(kernel_size // 2, H - 1, W - 1)
    if half <= 0:
        return x
    d = torch.arange(-half, half + 1, device=x.device, dtype=x.dtype)
    sig = sigma.to(x).clamp_min(1e-6).view(-1, 1)
    k = torch.exp(-0.5 * (d.view(1, -1) / sig) ** 2)
    k = k / k.sum(dim=1, keepdim=True)
    delta = (d == 0).to(x.dtype).expand_as(k)
    k = torch.where((sigma.to(x.device) > 0).view(-1, 1), k, delta)  # (M, ks)
    k = k.repeat_interleave(C, dim=0)  # (M*C, ks)
    y = x.reshape(1, M * C, H, W)
    y = F.conv2d(F.pad(y, (half, half, 0, 0), mode="reflect"), k.view(M * C, 1, 1, -1), groups=M * C)
    y = F.conv2d(F.pad(y, (0, 0, half, half), mode="reflect"), k.view(M * C, 1, -1, 1), groups=M * C)
    return y.reshape(M, C, H, W)


def solarize(x: torch.Tensor, apply: torch.Tensor, threshold: float = SOLARIZE_THRESHOLD) -> torch.Tensor:
    """Invert pixels >= threshold where ``apply`` (M,) bool (PIL ``ImageOps.solarize``)."""
    return torch.where(apply.view(-1, 1, 1, 1) & (x >= threshold), 1.0 - x, x)


def photometric(x: torch.Tensor, generator: Optional[torch.Generator], blur_p: float,
                solarize_p: float = 0.0, params_out: Optional[dict] = None) -> torch.Tensor:
    """DINO's per-view pipeline after the crop: flip, colour jitter, grayscale, blur,
    solarisation, with per-sample random parameters drawn from ``generator`` (CPU).
    ``params_out``: a dict that, when given, receives ``"flip"`` ((M,) bool on ``x.device``,
    True where the view was mirrored horizontally); it draws nothing more from ``generator``."""
    M = x.shape[0]
    u = torch.rand(5, M, generator=generator)
    f = torch.rand(4, M, generator=generator)
    sig = BLUR_SIGMA[0] + torch.rand(M, generator=generator) * (BLUR_SIGMA[1] - BLUR_SIGMA[0])
    dev = x.device
    u, f, sig = (t.to(dev, non_blocking=True) for t in (u, f, sig))  # no host sync on CUDA
    flip, jit, gray, blur, sol = u[0] < FLIP_P, u[1] < JITTER_P, u[2] < GRAY_P, u[3] < blur_p, u[4] < solarize_p
    b, c, s, h = JITTER
    one = torch.ones(M, device=dev)
    if params_out is not None:
        params_out["flip"] = flip
    x = torch.where(flip.view(-1, 1, 1, 1), x.flip(-1), x)
    x = adjust_brightness(x, torch.where(jit, 1 - b + 2 * b * f[0], one))
    x = adjust_contrast(x, torch.where(jit, 1 - c + 2 * c * f[1], one))
    x = adjust_saturation(x, torch.where(jit, 1 - s + 2 * s * f[2], one))
    x = torch.where(jit.view(-1, 1, 1, 1), adjust_hue(x, -h + 2 * h * f[3]), x)
    x = torch.where(gray.view(-1, 1, 1, 1), grayscale(x).expand_as(x), x)
    x = gaussian_blur(x, torch.where(blur, sig, torch.zeros_like(sig)))
    return solarize(x, sol)


# ----------------------------------------------------------------------------- views
@dataclass
class MultiCropViews:
    """teacher: (B, 3, G, G) unmasked teacher view; student_global: (B, 3, G, G);
    local: (n_local * B, 3, L, L), view-major (row v * B + b is local view v of image b).

    Where the student views come from (filled by :class:`MultiCrop`; None when the views were
    built otherwise): ``images`` the float (B, 3, H, W) batch in [0, 1] they were cut from,
    ``sizes`` (B, 2) its valid (h, w) per image, ``student_global_boxes`` (B, 4) and
    ``local_boxes`` (n_local * B, 4) the crop boxes (x1, y1, x2, y2) in those images' pixels,
    ``student_global_flip`` (B,) and ``local_flip`` (n_local * B,) bool, True where the view
    was mirrored horizontally after the crop. Used by ``pretrain.rank_source="image"``."""

    teacher: torch.Tensor
    student_global: torch.Tensor
    local: torch.Tensor
    images: Optional[torch.Tensor] = None
    sizes: Optional[torch.Tensor] = None
    student_global_boxes: Optional[torch.Tensor] = None
    student_global_flip: Optional[torch.Tensor] = None
    local_boxes: Optional[torch.Tensor] = None
    local_flip: Optional[torch.Tensor] = None

    def whole_image(self, size: int) -> torch.Tensor:
        """The whole valid region of every source image resized to ``size`` x ``size`` (one
        :func:`crop_resize` with the full box; no flip, no photometrics): (B, 3, size, size)."""
        if self.images is None or self.sizes is None:
            raise ValueError("these views carry no source images/sizes (built outside MultiCrop?)")
        sizes = self.sizes.to(self.images.device, non_blocking=True)
        boxes = torch.zeros(sizes.shape[0], 4, device=self.images.device)
        boxes[:, 2], boxes[:, 3] = sizes[:, 1], sizes[:, 0]
        return crop_resize(self.images, boxes, torch.arange(sizes.shape[0], device=self.images.device), size)


@dataclass(frozen=True)
class MultiCrop:
    """The view generator (see the module docstring); ``__call__`` on a batch of cached images."""

    global_size: int = 224
    local_size: int = 96
    global_scale: tuple[float, float] = (0.4, 1.0)
    local_scale: tuple[float, float] = (0.05, 0.4)
    n_local: int = 8
    teacher_view: str = "second"  # second | same

    def __post_init__(self):
        if self.teacher_view not in TEACHER_VIEWS:
            raise ValueError(f"teacher_view must be one of {', '.join(TEACHER_VIEWS)}, got {self.teacher_view!r}")
        if self.n_local < 0:
            raise ValueError(f"n_local must be >= 0, got {self.n_local}")

    @classmethod
    def from_config(cls, p) -> "MultiCrop":
        """From a :class:`apmask_lib.config.PretrainConfig`."""
        return cls(p.global_size, p.local_size, tuple(p.global_scale), tuple(p.local_scale), p.n_local,
                   getattr(p, "teacher_view", "second"))

    def _views(self, images, sizes, n, size, scale, blur_p, sol_p, generator):
        """(views, boxes on images.device, flip mask or None)."""
        B = images.shape[0]
        boxes = random_resized_crop_boxes(sizes.repeat(n, 1), scale, generator=generator)
        index = torch.arange(B).repeat(n)
        boxes = boxes.to(images.device, non_blocking=True)
        x = crop_resize(images, boxes, index.to(images.device, non_blocking=True), size)
        drawn: dict = {}
        x = photometric(x, generator, blur_p, sol_p, params_out=drawn)
        return x, boxes, drawn.get("flip")

    def __call__(self, images: torch.Tensor, sizes: torch.Tensor,
                 generator: Optional[torch.Generator] = None) -> MultiCropViews:
        """images: (B, 3, H, W) uint8 (or float in [0, 1]) on any device, sizes (B, 2) valid (h, w)."""
        x = images.float() / 255.0 if images.dtype == torch.uint8 else images.float()
        teacher, t_boxes, t_flip = self._views(x, sizes, 1, self.global_size, self.global_scale, 1.0, 0.0, generator)
        if self.teacher_view == "same":
            student, s_boxes, s_flip = teacher, t_boxes, t_flip
        else:
            student, s_boxes, s_flip = self._views(x, sizes, 1, self.global_size, self.global_scale, 0.1, 0.2,
                                                   generator)
        if self.n_local:
            local, l_boxes, l_flip = self._views(x, sizes, self.n_local, self.local_size, self.local_scale, 0.5, 0.0,
                                                 generator)
        else:
            local = x.new_zeros(0, 3, self.local_size, self.local_size)
            l_boxes, l_flip = x.new_zeros(0, 4), torch.zeros(0, dtype=torch.bool, device=x.device)
        return MultiCropViews(teacher, student, local, images=x, sizes=sizes, student_global_boxes=s_boxes,
                              student_global_flip=s_flip, local_boxes=l_boxes, local_flip=l_flip)


__all__ = ["ImageBank", "load_image_bank", "cache_short_side", "random_resized_crop_boxes", "crop_resize",
           "grayscale", "adjust_brightness", "adjust_contrast", "adjust_saturation", "adjust_hue",
           "rgb_to_hsv", "hsv_to_rgb", "gaussian_blur", "solarize", "photometric", "MultiCrop", "MultiCropViews"]
