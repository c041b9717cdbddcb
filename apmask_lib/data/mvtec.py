"""MVTec AD in its official layout: CAT/train/good, CAT/test/<type>, CAT/ground_truth/<type>/<stem>_mask.png."""
from __future__ import annotations

from pathlib import Path

from .types import AnomalyDataset, Sample

CATEGORIES = ("bottle", "cable", "capsule", "carpet", "grid", "hazelnut", "leather", "metal_nut",
              "pill", "screw", "tile", "toothbrush", "transistor", "wood", "zipper")
TEXTURES = ("carpet", "grid", "leather", "tile", "wood")
IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")


def _images(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_EXTS)


def load_mvtec(root: str | Path, category: str, known: tuple[str, ...] | None = None) -> AnomalyDataset:
    """Index one category. ``known`` restricts the category names (None: any folder name)."""
    root = Path(root)
    if known is not None and category not in known:
        raise ValueError(f"unknown category {category!r}; choose from {', '.join(known)}")
    cat = root / category
    if not cat.is_dir():
        raise FileNotFoundError(f"category folder not found: {cat} (data root {root} should hold {category}/train, {category}/test)")
    for sub in ("train/good", "test"):
        if not (cat / sub).is_dir():
            raise FileNotFoundError(f"wrong layout: {cat / sub} is missing (expected the official MVTec AD layout)")
    train = [Sample(p, 0, "good") for p in _images(cat / "train" / "good")]
    test = []
    for d in sorted(x for x in (cat / "test").iterdir() if x.is_dir()):
        for p in _images(d):
            if d.name == "good":
                test.append(Sample(p, 0, "good"))
            else:
                mask = cat / "ground_truth" / d.name / f"{p.stem}_mask.png"
                if not mask.is_file():
                    raise FileNotFoundError(f"missing ground-truth mask {mask} for test image {p}")
                test.append(Sample(p, 1, d.name, mask_path=mask))
    if not train:
        raise FileNotFoundError(f"no training images in {cat / 'train' / 'good'}")
    return AnomalyDataset(name=f"mvtec/{category}", train=train, test=test)
