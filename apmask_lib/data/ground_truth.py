"""Which test images count, and their pixel ground truth: the sample side of an evaluation.

* :func:`cap_per_defect` -- the first N images of each defect type (micro runs, ``data.max_test``).
* :func:`has_pixel_gt` / :func:`pixel_ground_truth` -- a bool (H, W) mask per image: the MVTec /
  folder mask, NIH boxes, all-zero for normal images; None for an anomalous image whose extent is
  unknown (no mask, no box), which the pixel metrics then leave out.
* :func:`pick_figure_samples` -- the images shown in the localisation figure.
"""
from __future__ import annotations

from typing import Optional, Sequence

import numpy as np

from .types import AnomalyDataset, Sample


def cap_per_defect(samples: Sequence[Sample], max_per_defect: Optional[int]) -> list[Sample]:
    """The first ``max_per_defect`` samples of each defect type, in dataset order (None: all)."""
    if max_per_defect is None:
        return list(samples)
    seen: dict[str, int] = {}
    out = []
    for s in samples:
        if seen.get(s.defect, 0) < max_per_defect:
            seen[s.defect] = seen.get(s.defect, 0) + 1
            out.append(s)
    return out


def has_pixel_gt(sample: Sample) -> bool:
    """False for an anomalous image whose extent is unknown (no mask file, no boxes)."""
    if not getattr(sample, "has_pixel_gt", True):
        return False
    return sample.label == 0 or sample.mask_path is not None or bool(sample.boxes)


def pixel_ground_truth(dataset: AnomalyDataset, sample: Sample, shape: tuple[int, int]) -> Optional[np.ndarray]:
    """bool (H, W) ground truth, all-zero for normal images, None when the sample has none."""
    if not has_pixel_gt(sample):
        return None
    if sample.label == 0 and sample.mask_path is None and not sample.boxes:
        return np.zeros(shape, dtype=bool)
    return dataset.mask(sample, shape)


def pick_figure_samples(samples: Sequence[Sample], n: int) -> list[int]:
    """Indices of up to ``n`` samples for the localisation figure: round-robin over the anomalous
    defect types (those with pixel ground truth first), then normal images; deterministic."""
    by_defect: dict[str, list[int]] = {}
    for i, s in enumerate(samples):
        by_defect.setdefault(s.defect if s.label else "__normal__", []).append(i)
    normal = by_defect.pop("__normal__", [])
    for d in by_defect:
        by_defect[d].sort(key=lambda i: not has_pixel_gt(samples[i]))
    n_normal = min(len(normal), max(1, n // 4)) if n > 1 or not by_defect else 0
    picks: list[int] = []
    queues = [list(v) for _, v in sorted(by_defect.items())]
    while len(picks) < n - n_normal and any(queues):
        for q in queues:
            if q and len(picks) < n - n_normal:
                picks.append(q.pop(0))
    picks += normal[: n - len(picks)]
    return sorted(picks)


__all__ = ["cap_per_defect", "has_pixel_gt", "pixel_ground_truth", "pick_figure_samples"]
