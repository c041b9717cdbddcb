"""MVTec AD in its official layout (Bergmann et al., CVPR 2019)::

    ROOT/CAT/train/good/*.png                      normal training images
    ROOT/CAT/test/good/*.png                       normal test images
    ROOT/CAT/test/<type>/*.png                     defective test images
    ROOT/CAT/ground_truth/<type>/<stem>_mask.png   one binary mask per defective image (0/255)

Images and masks keep their original resolution (900x900 .. 1024x1024 in the release; the shared
test copy of ``bottle`` is 512x512) -- nothing here assumes a size. Grayscale categories (grid,
screw, zipper) are read as 3-channel by :func:`read_image`. Indexing only lists files and checks the
layout (fast); ``verify=True`` (or :func:`~apmask_lib.data.loading.verify_dataset`) also decodes every
image and mask and checks that each mask matches its image's size. The built-in demo data set is
written in this same layout, so this reader serves both.
"""
from __future__ import annotations

import difflib
import logging
import warnings
from pathlib import Path

from .loading import verify_dataset
from .types import AnomalyDataset, Sample

CATEGORIES = ("bottle", "cable", "capsule", "carpet", "grid", "hazelnut", "leather", "metal_nut",
              "pill", "screw", "tile", "toothbrush", "transistor", "wood", "zipper")
TEXTURES = ("carpet", "grid", "leather", "tile", "wood")
IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")


log = logging.getLogger("apmask")


def _images(folder: Path) -> list[Path]:
    """The image files directly in ``folder``; what is left out (subfolders, other files) is logged."""
    found, subdirs, other = [], [], []
    for p in folder.iterdir():
        if p.name.startswith("."):
            continue
        if p.is_dir():
            subdirs.append(p.name)
        elif p.suffix.lower() in IMAGE_EXTS:
            found.append(p)
        else:
            other.append(p.name)
    if subdirs or other:
        why = [f"{len(subdirs)} subfolder(s) ({', '.join(sorted(subdirs)[:3])}) are not searched"] if subdirs else []
        why += [f"{len(other)} file(s) ({', '.join(sorted(other)[:3])}) are not {'/'.join(IMAGE_EXTS)} images"] if other else []
        log.warning("%s: skipped %d entries: %s", folder, len(subdirs) + len(other), "; ".join(why))
    return sorted(found)


def _category_hint(root: Path, category: str) -> str:
    if not root.is_dir():
        return (f"data root {root} does not exist; set data.root to the folder holding the category folders "
                f"(download with apmask_lib.data.download.download_mvtec)")
    nested = [p for p in root.glob(f"*/{category}") if (p / "train").is_dir()]
    if nested:
        return f"found {nested[0]}: set data.root={nested[0].parent}"
    present = sorted(p.name for p in root.iterdir() if (p / "train").is_dir())
    return f"data root {root} holds {', '.join(present) if present else 'no category folders'}"


def load_mvtec(root: str | Path, category: str, known: tuple[str, ...] | None = None,
               verify: bool = False, name: str = "mvtec", allow_unknown: bool = False) -> AnomalyDataset:
    """Index one category of an MVTec-layout tree.

    ``known`` restricts the category names (None: any folder name, as for the demo data);
    ``name`` prefixes :attr:`AnomalyDataset.name` (``"mvtec/bottle"``). ``allow_unknown``: a category
    outside ``known`` whose folder exists is read with a warning (your own data in the MVTec layout).
    Raises ValueError for an unknown category (without its folder, or ``allow_unknown`` False), FileNotFoundError (naming the path) for a missing
    folder, wrong layout or missing mask; with ``verify`` also ImageReadError for a corrupt image or
    a mask whose size differs from its image.
    """
    root = Path(root)
    if known is not None and category not in known and allow_unknown and (root / category).is_dir():
        warnings.warn(f"category {category!r} is not one of the {len(known)} known names; reading {root / category} "
                      "as an MVTec-layout folder", stacklevel=2)
    elif known is not None and category not in known:
        close = difflib.get_close_matches(category, known, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise ValueError(f"unknown category {category!r}{hint}; choose from {', '.join(known)}")
    cat = root / category
    if not cat.is_dir():
        raise FileNotFoundError(f"category folder not found: {cat}; {_category_hint(root, category)}")
    for sub in ("train/good", "test"):
        if not (cat / sub).is_dir():
            raise FileNotFoundError(f"wrong layout: {cat / sub} is missing (expected the official MVTec AD layout "
                                    f"{category}/train/good, {category}/test/<type>, {category}/ground_truth/<type>)")
    train = [Sample(p, 0, "good") for p in _images(cat / "train" / "good")]
    if not train:
        raise FileNotFoundError(f"no training images in {cat / 'train' / 'good'}")
    test: list[Sample] = []
    for d in sorted(x for x in (cat / "test").iterdir() if x.is_dir()):
        for p in _images(d):
            if d.name == "good":
                test.append(Sample(p, 0, "good"))
                continue
            mask = cat / "ground_truth" / d.name / f"{p.stem}_mask.png"
            if not mask.is_file():
                where = "" if (cat / "ground_truth" / d.name).is_dir() else \
                    f" (folder {cat / 'ground_truth' / d.name} is missing)"
                raise FileNotFoundError(f"missing ground-truth mask {mask} for test image {p}{where}")
            test.append(Sample(p, 1, d.name, mask_path=mask))
    if not test:
        raise FileNotFoundError(f"no test images under {cat / 'test'} (expected test/good and test/<defect type>)")
    ds = AnomalyDataset(name=f"{name}/{category}", train=train, test=test)
    if verify:
        verify_dataset(ds)
    return ds
