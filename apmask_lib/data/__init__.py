"""Data layer: loaders return an :class:`AnomalyDataset` (lists of :class:`Sample`).

* ``mvtec``: MVTec AD, official layout (:mod:`.mvtec`); download helper in :mod:`.download`.
* ``nih``: NIH ChestX-ray14, original release layout, patient-disjoint split (:mod:`.nih`).
* ``demo``: built-in real-texture data set with synthetic defects (:mod:`.demo`), generated on demand.
"""
from __future__ import annotations

import logging
from pathlib import Path

from .images import ImageReadError, read_image, read_mask, resize_image, resize_mask
from .loading import load_split_images, load_split_masks, verify_dataset
from .mvtec import CATEGORIES, load_mvtec
from .types import AnomalyDataset, Sample

__all__ = ["ImageReadError", "read_image", "read_mask", "resize_image", "resize_mask", "CATEGORIES",
           "load_mvtec", "AnomalyDataset", "Sample", "build_dataset", "load_split_images", "load_split_masks",
           "verify_dataset", "DATASETS"]

DATASETS = ("mvtec", "nih", "demo")
log = logging.getLogger("apmask")


def build_dataset(dataset: str, root: str | Path, category: str) -> AnomalyDataset:
    """``dataset`` in mvtec | nih | demo; ``root`` its folder; ``category`` an MVTec/demo category or,
    for nih, all | male | female. The demo data is generated under ``root`` first when
    ``root/category`` holds no demo marker (a few seconds)."""
    if dataset == "mvtec":
        return load_mvtec(root, category, known=CATEGORIES)
    if dataset == "demo":
        from .demo import DEMO_CATEGORIES, ensure_demo

        if category not in DEMO_CATEGORIES:
            raise ValueError(f"unknown demo category {category!r}; choose from {', '.join(DEMO_CATEGORIES)}")
        ensure_demo(root, category)
        return load_mvtec(root, category, known=DEMO_CATEGORIES, name="demo")
    if dataset == "nih":
        from .nih import load_nih

        return load_nih(root, category)
    raise ValueError(f"unknown dataset {dataset!r}; choose from {', '.join(DATASETS)}")
