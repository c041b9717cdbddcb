"""Reading many samples at once: stacked arrays for a split, and a full integrity check."""
from __future__ import annotations

from typing import Sequence

import numpy as np
from tqdm.auto import tqdm

from .images import resize_image, resize_mask
from .types import AnomalyDataset, Sample
from .verify import check_sample


def _size(size: int | tuple[int, int]) -> tuple[int, int]:
    return (size, size) if isinstance(size, int) else (int(size[0]), int(size[1]))


def load_split_images(samples: Sequence[Sample], size: int | tuple[int, int], progress: bool = True,
                      desc: str = "images") -> np.ndarray:
    """Read and resize ``samples`` -> uint8 (N, H, W, 3) RGB; ``size`` a square int or (H, W)."""
    h, w = _size(size)
    out = np.empty((len(samples), h, w, 3), dtype=np.uint8)
    for i, s in enumerate(tqdm(samples, desc=desc, disable=not progress or len(samples) < 2, leave=False)):
        out[i] = resize_image(AnomalyDataset.image(s), (h, w))
    return out


def load_split_masks(samples: Sequence[Sample], size: int | tuple[int, int] | None = None,
                     progress: bool = True) -> list[np.ndarray] | np.ndarray:
    """Ground-truth masks of ``samples`` (all must have ``has_pixel_gt``).

    ``size`` None: a list of bool (H, W) at each image's original resolution (what evaluation should
    use); otherwise bool (N, H, W) resized with nearest-neighbour sampling."""
    masks = []
    for s in tqdm(samples, desc="masks", disable=not progress or len(samples) < 2, leave=False):
        shape = AnomalyDataset.image(s).shape[:2]
        m = AnomalyDataset.mask(s, shape)
        masks.append(m if size is None else resize_mask(m, _size(size)))
    if size is None:
        return masks
    h, w = _size(size)
    return np.stack(masks) if masks else np.zeros((0, h, w), dtype=bool)


def verify_dataset(ds: AnomalyDataset, progress: bool = True) -> None:
    """Decode every image and mask of ``ds`` and check each mask has its image's size.

    Raises :class:`ImageReadError` naming the first bad file (corrupt image, unreadable mask,
    size mismatch). Boxes reaching outside their image are reported the same way. (Cached by file
    size and mtime: :func:`apmask_lib.data.verify.verify_split`.)"""
    for s in tqdm(ds.train + ds.val + ds.test, desc=f"verify {ds.name}", disable=not progress, leave=False):
        check_sample(s)
