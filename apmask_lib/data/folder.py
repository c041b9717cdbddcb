"""Your own images (``data.dataset: folder``), as anomalib's Folder data module::

    ROOT/<normal_dir>/**/*.png          normal images (searched recursively, any format read_image reads)
    ROOT/<abnormal_dir>/**/*.png        defective images; one or several folders, each one defect type
                                        (its folder name)
    ROOT/<mask_dir>/...                 optional masks; for ROOT/<abnormal_dir>/<sub>/<stem>.<ext> the mask
                                        is <mask_dir>/<abnormal folder name>/<sub>/<stem>[_mask].<any ext>
                                        or <mask_dir>/<sub>/<stem>[_mask].<any ext>
    ROOT/<normal_test_dir>/**/*.png     optional normal test images; without it a seeded random
                                        ``normal_test_split`` of the normal images is held out for testing

A defective image without a mask is used for image-level metrics only (``Sample.has_pixel_gt``
False); evaluation reports how many images its pixel metrics cover. ``normal_val_split`` of the
(remaining) normal images is held out as validation data, never trained on: evaluation picks the
decision threshold on it (:mod:`apmask_lib.evaluate.threshold`). The category name is free (it only names the
data set, ``folder/<category>``). Splits depend only on ``split_seed`` and the file names, not on the
training seed, so every seed is evaluated on the same images.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Optional, Sequence

import numpy as np

from .mvtec import IMAGE_EXTS
from .types import AnomalyDataset, Sample

log = logging.getLogger(__name__)


def list_images(folder: Path) -> list[Path]:
    """Image files under ``folder`` (recursively, sorted; hidden files skipped). Other files are
    counted and logged, never silently dropped."""
    files = sorted(p for p in folder.rglob("*") if p.is_file() and not p.name.startswith("."))
    images = [p for p in files if p.suffix.lower() in IMAGE_EXTS]
    if len(images) < len(files):
        log.warning("%s: %d file(s) skipped (not an image by extension; expected one of %s)", folder,
                    len(files) - len(images), ", ".join(IMAGE_EXTS))
    return images


def split_counts(n: int, test_fraction: float, val_fraction: float) -> tuple[int, int]:
    """(n_test, n_val) held out of ``n`` normal images: rounded fractions, at least one each when the
    fraction is positive, always leaving at least one image for training."""
    n_test = max(1, round(n * test_fraction)) if test_fraction > 0 else 0
    n_val = max(1, round(n * val_fraction)) if val_fraction > 0 else 0
    if n - n_test - n_val < 1:
        raise ValueError(f"{n} normal images cannot be split into test ({test_fraction}), validation "
                         f"({val_fraction}) and at least one training image; add images or lower the fractions")
    return n_test, n_val


def seeded_split(paths: Sequence[Path], n_test: int, n_val: int, seed: int) -> tuple[list[Path], list[Path], list[Path]]:
    """(train, val, test) from a seeded permutation of ``paths``; each part keeps the sorted order."""
    perm = np.random.default_rng(seed).permutation(len(paths))
    test, val = set(perm[:n_test].tolist()), set(perm[n_test:n_test + n_val].tolist())
    parts: tuple[list[Path], list[Path], list[Path]] = ([], [], [])
    for i, p in enumerate(paths):
        parts[1 if i in val else 2 if i in test else 0].append(p)
    return parts


def _mask_stem(stem: str) -> str:
    return stem[:-5] if stem.endswith("_mask") else stem


def index_masks(mask_dir: Path) -> dict[tuple[str, str], Path]:
    """{(relative folder, image stem): mask path} for every image file under ``mask_dir``."""
    out: dict[tuple[str, str], Path] = {}
    for p in list_images(mask_dir):
        rel = p.parent.relative_to(mask_dir).as_posix()
        out.setdefault(("" if rel == "." else rel, _mask_stem(p.stem)), p)
    return out


def _resolve(root: Path, sub: str, key: str) -> Path:
    p = Path(sub) if Path(sub).is_absolute() else root / sub
    if not p.is_dir():
        raise FileNotFoundError(f"data.{key}: folder not found: {p} (paths are relative to data.root={root})")
    return p


def load_folder(root: str | Path, category: str, normal_dir: Optional[str], abnormal_dir: str | Sequence[str] = (),
                mask_dir: Optional[str] = None, normal_test_dir: Optional[str] = None,
                normal_test_split: float = 0.2, normal_val_split: float = 0.1, split_seed: int = 0) -> AnomalyDataset:
    """Index a folder data set (module docstring). Raises FileNotFoundError naming a missing folder or
    an empty one, ValueError for impossible split fractions."""
    root = Path(root)
    if not normal_dir:
        raise ValueError("data.dataset=folder needs data.normal_dir (the folder of normal images, relative to "
                         "data.root)")
    for key, v in (("normal_test_split", normal_test_split), ("normal_val_split", normal_val_split)):
        if not 0.0 <= float(v) < 1.0:
            raise ValueError(f"data.{key} must be in [0, 1), got {v}")
    abnormal = (abnormal_dir,) if isinstance(abnormal_dir, str) else tuple(abnormal_dir or ())
    normal = list_images(_resolve(root, normal_dir, "normal_dir"))
    if not normal:
        raise FileNotFoundError(f"no images in {root / normal_dir} (data.normal_dir)")
    if normal_test_dir:
        n_val = split_counts(len(normal), 0.0, normal_val_split)[1]
        train, val, _ = seeded_split(normal, 0, n_val, split_seed)
        test_normal = list_images(_resolve(root, normal_test_dir, "normal_test_dir"))
    else:
        n_test, n_val = split_counts(len(normal), normal_test_split, normal_val_split)
        train, val, test_normal = seeded_split(normal, n_test, n_val, split_seed)
    masks = index_masks(_resolve(root, mask_dir, "mask_dir")) if mask_dir else {}
    test = [Sample(p, 0, "good") for p in test_normal]
    n_abnormal = n_masked = 0
    for sub in abnormal:
        folder = _resolve(root, sub, "abnormal_dir")
        defect = folder.name
        files = list_images(folder)
        if not files:
            raise FileNotFoundError(f"no images in {folder} (data.abnormal_dir)")
        for p in files:
            rel = p.parent.relative_to(folder).as_posix()
            rel = "" if rel == "." else rel
            m = masks.get((f"{defect}/{rel}".rstrip("/"), p.stem)) or masks.get((rel, p.stem))
            test.append(Sample(p, 1, defect, mask_path=m, has_pixel_gt=m is not None))
            n_abnormal += 1
            n_masked += m is not None
    if mask_dir and n_masked < n_abnormal:
        log.warning("%s: %d of %d defective images have no mask in %s; they count for image-level metrics "
                    "only", category, n_abnormal - n_masked, n_abnormal, root / mask_dir)
    if not test:
        raise FileNotFoundError("folder data set has no test images: set data.abnormal_dir and/or "
                                "data.normal_test_dir / data.normal_test_split")
    return AnomalyDataset(name=f"folder/{category}", train=[Sample(p, 0, "good") for p in train], test=test,
                          val=[Sample(p, 0, "good") for p in val])


__all__ = ["load_folder", "list_images", "split_counts", "seeded_split", "index_masks"]
