"""The data contract every loader returns: lists of samples, masks read on demand."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence

import numpy as np

from .images import read_image, read_mask


@dataclass(frozen=True)
class Sample:
    """One image. ``label`` 0 = normal, 1 = anomalous; ``defect`` 'good' or the defect type.

    Pixel ground truth is a mask file (MVTec, demo) or boxes (x, y, w, h) in original pixels (NIH).
    A normal image with neither has an all-false mask. ``has_pixel_gt`` is False only for anomalous
    images whose extent is unknown (NIH abnormal images without a box): pixel-level metrics must skip
    them (:meth:`AnomalyDataset.mask` refuses them), image-level metrics use them as usual.
    ``meta`` holds loader-specific (key, value) strings (NIH: patient id, gender, findings)."""

    path: Path
    label: int
    defect: str
    mask_path: Optional[Path] = None
    boxes: tuple[tuple[float, float, float, float], ...] = ()
    meta: tuple[tuple[str, str], ...] = field(default=())
    has_pixel_gt: bool = True

    def get(self, key: str, default: Optional[str] = None) -> Optional[str]:
        """Value of ``key`` in :attr:`meta` (or ``default``)."""
        return dict(self.meta).get(key, default)


@dataclass
class AnomalyDataset:
    """``val``: normal images held out of training to choose a decision threshold (folder data sets;
    empty for the others, where evaluation says the threshold was chosen on the test set)."""

    name: str
    train: list[Sample]
    test: list[Sample]
    val: list[Sample] = field(default_factory=list)

    @staticmethod
    def image(sample: Sample) -> np.ndarray:
        """RGB uint8 (H, W, 3) at original resolution."""
        return read_image(sample.path)

    @staticmethod
    def mask(sample: Sample, shape: tuple[int, int]) -> np.ndarray:
        """bool (H, W) ground truth at the image's original resolution ``shape``.

        Raises ValueError for a sample with ``has_pixel_gt`` False (an all-false mask would be a wrong
        label there); filter with ``[s for s in ds.test if s.has_pixel_gt]`` for pixel metrics."""
        if not sample.has_pixel_gt:
            raise ValueError(f"{sample.path} is anomalous but has no pixel ground truth (no mask or box); "
                             "restrict pixel-level metrics to samples with has_pixel_gt=True")
        if sample.mask_path is not None:
            return read_mask(sample.mask_path, shape)
        m = np.zeros(shape[:2], dtype=bool)
        for x, y, w, h in sample.boxes:
            x0, y0 = max(int(round(x)), 0), max(int(round(y)), 0)
            m[y0:max(int(round(y + h)), 0), x0:max(int(round(x + w)), 0)] = True
        return m

    @property
    def test_pixel_gt(self) -> list[Sample]:
        """Test samples that have pixel ground truth (all of them for MVTec and demo)."""
        return [s for s in self.test if s.has_pixel_gt]

    def summary(self) -> str:
        """One line: counts of train, test normal/anomalous, and test images with pixel ground truth."""
        n_abn = sum(s.label for s in self.test)
        return (f"{self.name}: train {len(self.train)}, test {len(self.test)} "
                f"({len(self.test) - n_abn} normal, {n_abn} anomalous; {len(self.test_pixel_gt)} with pixel GT)")


def cap_train(samples: Sequence[Sample], max_train: Optional[int]) -> list[Sample]:
    """The training images a run uses: the first ``max_train`` of ``samples`` (``data.max_train``, for
    micro runs and tests), all of them when None. Every stage caps the same way (pre-training, fine-tuning
    after its validation hold-out, the kNN extension's memory bank)."""
    samples = list(samples)
    return samples if max_train is None else samples[:max_train]
