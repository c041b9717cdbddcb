"""Data layer: loaders return an :class:`AnomalyDataset` (lists of :class:`Sample`).

* ``mvtec``: MVTec AD, official layout (:mod:`.mvtec`); download helper in :mod:`.download`.
* ``nih``: NIH ChestX-ray14, original release layout, patient-disjoint split (:mod:`.nih`).
* ``folder``: your own images, any category name (:mod:`.folder`).
* ``demo``: built-in real-texture data set with synthetic defects (:mod:`.demo`), generated on demand.
"""
from __future__ import annotations

import logging
from pathlib import Path

from ..config import choices, Dataset
from .demo import DEMO_CATEGORIES, ensure_demo
from .folder import load_folder
from .images import ImageReadError, read_image, read_mask, resize_image, resize_mask
from .loading import load_split_images, load_split_masks, verify_dataset
from .mvtec import CATEGORIES, load_mvtec
from .nih import load_nih
from .types import AnomalyDataset, Sample

__all__ = ["ImageReadError", "read_image", "read_mask", "resize_image", "resize_mask", "CATEGORIES",
           "load_mvtec", "AnomalyDataset", "Sample", "build_dataset", "load_split_images", "load_split_masks",
           "verify_dataset", "DATASETS", "FOLDER_KEYS", "dataset_from_config"]

DATASETS = choices(Dataset)
# DataConfig fields that only data.dataset=folder reads (apmask_lib/data/folder.py)
FOLDER_KEYS = ("normal_dir", "abnormal_dir", "mask_dir", "normal_test_dir", "normal_test_split", "normal_val_split",
               "split_seed")
log = logging.getLogger("apmask")


def dataset_from_config(data) -> AnomalyDataset:
    """The data set a :class:`~apmask_lib.config.DataConfig` describes (what every stage calls)."""
    return build_dataset(data.dataset, data.root, data.category,
                         **({k: getattr(data, k) for k in FOLDER_KEYS} if data.dataset == "folder" else {}))


def build_dataset(dataset: str, root: str | Path, category: str, **folder_options) -> AnomalyDataset:
    """``dataset`` in mvtec | nih | demo | folder; ``root`` its folder; ``category`` an MVTec/demo
    category (MVTec: any folder name, with a warning outside the 15), for nih all | male | female, for
    folder any name. The demo data is generated under ``root`` first when ``root/category`` holds no
    demo marker (a few seconds). ``folder_options``: :data:`FOLDER_KEYS` for ``folder``."""
    if dataset == "folder":
        return load_folder(root, category, **folder_options)
    if dataset == "mvtec":
        return load_mvtec(root, category, known=CATEGORIES, allow_unknown=True)
    if dataset == "demo":
        if category not in DEMO_CATEGORIES:
            raise ValueError(f"unknown demo category {category!r}; choose from {', '.join(DEMO_CATEGORIES)}")
        ensure_demo(root, category)
        return load_mvtec(root, category, known=DEMO_CATEGORIES, name="demo")
    if dataset == "nih":
        return load_nih(root, category)
    raise ValueError(f"unknown dataset {dataset!r}; choose from {', '.join(DATASETS)}")
