"""Data layer: loaders return an :class:`AnomalyDataset` (lists of :class:`Sample`)."""
from .images import ImageReadError, read_image, read_mask, resize_image
from .mvtec import CATEGORIES, load_mvtec
from .types import AnomalyDataset, Sample

__all__ = ["ImageReadError", "read_image", "read_mask", "resize_image", "CATEGORIES", "load_mvtec",
           "AnomalyDataset", "Sample", "build_dataset"]


def build_dataset(dataset: str, root, category: str) -> AnomalyDataset:
    """``dataset`` in mvtec | nih | demo."""
    if dataset == "mvtec":
        return load_mvtec(root, category, known=CATEGORIES)
    if dataset == "demo":
        return load_mvtec(root, category)
    if dataset == "nih":
        from .nih import load_nih

        return load_nih(root, category)
    raise ValueError(f"unknown dataset {dataset!r}; choose mvtec, nih or demo")
