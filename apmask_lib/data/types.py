"""The data contract every loader returns: lists of samples, masks read on demand."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import numpy as np

from .images import read_image, read_mask


@dataclass(frozen=True)
class Sample:
    """One image. ``label`` 0 = normal, 1 = anomalous; ``defect`` 'good' or the defect type.
    Pixel ground truth is a mask file (MVTec) or boxes (x, y, w, h) in original pixels (NIH)."""

    path: Path
    label: int
    defect: str
    mask_path: Optional[Path] = None
    boxes: tuple[tuple[float, float, float, float], ...] = ()
    meta: tuple[tuple[str, str], ...] = field(default=())


@dataclass
class AnomalyDataset:
    name: str
    train: list[Sample]
    test: list[Sample]

    @staticmethod
    def image(sample: Sample) -> np.ndarray:
        """RGB uint8 (H, W, 3) at original resolution."""
        return read_image(sample.path)

    @staticmethod
    def mask(sample: Sample, shape: tuple[int, int]) -> np.ndarray:
        """bool (H, W) ground truth at the image's original resolution ``shape``."""
        if sample.mask_path is not None:
            return read_mask(sample.mask_path, shape)
        m = np.zeros(shape, dtype=bool)
        for x, y, w, h in sample.boxes:
            x0, y0 = max(int(round(x)), 0), max(int(round(y)), 0)
            m[y0:int(round(y + h)), x0:int(round(x + w))] = True
        return m
