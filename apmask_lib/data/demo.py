"""Built-in demo data set: real textures, synthetic defects, exact masks, MVTec layout.

Needs no download: the textures are real photographs that ship inside scikit-image's wheel
(``site-packages/skimage/data/{brick,grass,gravel}.png``, 512x512 grayscale, read from disk -- no
network fetcher is involved). Each category is one texture, tinted to a fixed colour so images are
genuinely RGB. Written in the MVTec AD layout so :func:`~apmask_lib.data.mvtec.load_mvtec` reads it::

    ROOT/CAT/train/good/000.png ...                   random normal crops
    ROOT/CAT/test/good/000.png ...                    more normal crops
    ROOT/CAT/test/<type>/000.png ...                  a normal crop with one defect
    ROOT/CAT/ground_truth/<type>/000_mask.png ...     its exact mask (0/255)
    ROOT/CAT/.apmask_demo.json                        marker: the generation parameters

Normal images: a random ``image_size`` crop of the texture, rotated by up to +-8 degrees, flipped
left-right / up-down with probability 1/2 each, with brightness gain in [0.92, 1.08] and offset in
[-8, 8] grey levels.

Defects (``DEFECT_TYPES``) are deliberately of kinds the fine-tuning anomaly generator never makes
(it pastes rectangular patches cut from the image itself):

* ``scratch``  an anti-aliased polyline (3-5 vertices, a drifting random walk), dark or bright,
               2-4 px thick at 256 px;
* ``hole``     a dark rotated ellipse with soft radial shading (darkest at the centre);
* ``stain``    a semi-transparent coloured blot (irregular blob, peak opacity 0.45-0.7, soft edge);
* ``foreign``  an irregular blob filled with a *different* texture of the set (in that texture's tint).

Every defect is blended with a per-pixel weight w in [0, 1] (w = the defect's opacity relative to its
full strength); the mask is exactly ``w >= 0.5``, so anti-aliased or soft edges are split at half
strength. Defect sizes scale with ``image_size``; a defect covering too little of the image is redrawn.

Determinism: every image has its own generator seeded from (seed, category, split, defect type,
index), so outputs are byte-identical for the same parameters and independent of generation order
or of which other categories are generated.

Idempotence: a category folder holding a marker with the same parameters is left alone; a folder
generated with other parameters is regenerated (written to a temporary folder, then swapped in);
a folder without a marker is never overwritten (it may be someone's data).

Defaults (3 categories x (40 train + 10 good + 4 types x 5 defective) at 256 px, about 2 s on one
CPU core) are sized for a CPU pipeline of a few minutes per category.
"""
from __future__ import annotations

import json
import logging
import math
import os
import shutil
import zlib
from functools import lru_cache
from pathlib import Path
from typing import Callable, Optional, Sequence

import cv2
import numpy as np

from .images import read_image

log = logging.getLogger("apmask")

DEMO_VERSION = 1                     # bump when the generator's output changes (forces regeneration)
MARKER = ".apmask_demo.json"
# category -> (file in skimage/data, RGB tint multiplied onto the grey texture)
TEXTURES: dict[str, tuple[str, tuple[float, float, float]]] = {
    "brick": ("brick.png", (1.10, 0.70, 0.52)),
    "grass": ("grass.png", (0.62, 0.95, 0.45)),
    "gravel": ("gravel.png", (0.95, 0.90, 0.80)),
}
DEMO_CATEGORIES = tuple(TEXTURES)
DEFECT_TYPES = ("scratch", "hole", "stain", "foreign")
# stain colours (RGB), far from every tint above
_STAIN_COLOURS = ((70, 40, 150), (30, 90, 200), (150, 20, 120), (20, 140, 150), (60, 30, 10))


def skimage_texture_path(filename: str) -> Path:
    """Path of a texture bundled in scikit-image's wheel (no network)."""
    import skimage

    path = Path(skimage.__file__).parent / "data" / filename
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: the demo data needs scikit-image's bundled textures "
                                "(reinstall scikit-image from its wheel)")
    return path


@lru_cache(maxsize=None)
def _texture(category: str) -> np.ndarray:
    """Grey texture of ``category`` as float32 (T, T) in [0, 255]."""
    return read_image(skimage_texture_path(TEXTURES[category][0]))[:, :, 0].astype(np.float32)


def _rng(seed: int, category: str, split: str, kind: str, index: int) -> np.random.Generator:
    return np.random.default_rng([seed, zlib.crc32(category.encode()), zlib.crc32(split.encode()),
                                  zlib.crc32(kind.encode()), index])


def _tint(grey: np.ndarray, category: str) -> np.ndarray:
    return grey[:, :, None] * np.asarray(TEXTURES[category][1], dtype=np.float32)


def _grey_crop(tex: np.ndarray, size: int, rng: np.random.Generator, max_angle: float = 8.0) -> np.ndarray:
    """Random ``size`` crop of ``tex`` rotated by up to ``max_angle`` degrees and randomly flipped."""
    c = int(math.ceil(size * 1.25))  # room for the rotation: size * (cos 8 + sin 8) < 1.13 size
    if c > min(tex.shape):
        f = c / min(tex.shape) * 1.01
        tex = cv2.resize(tex, (int(math.ceil(tex.shape[1] * f)), int(math.ceil(tex.shape[0] * f))),
                         interpolation=cv2.INTER_CUBIC)
    y0 = int(rng.integers(0, tex.shape[0] - c + 1))
    x0 = int(rng.integers(0, tex.shape[1] - c + 1))
    patch = np.ascontiguousarray(tex[y0:y0 + c, x0:x0 + c])
    rot = cv2.getRotationMatrix2D((c / 2, c / 2), float(rng.uniform(-max_angle, max_angle)), 1.0)
    patch = cv2.warpAffine(patch, rot, (c, c), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REFLECT)
    off = (c - size) // 2
    patch = patch[off:off + size, off:off + size]
    if rng.random() < 0.5:
        patch = patch[:, ::-1]
    if rng.random() < 0.5:
        patch = patch[::-1, :]
    return np.ascontiguousarray(patch)


def normal_image(category: str, size: int, rng: np.random.Generator) -> np.ndarray:
    """A defect-free float32 (size, size, 3) image in [0, 255]."""
    grey = _grey_crop(_texture(category), size, rng)
    gain, offset = rng.uniform(0.92, 1.08), rng.uniform(-8.0, 8.0)
    return np.clip(_tint(grey, category) * gain + offset, 0, 255)


def _blend(img: np.ndarray, fill: np.ndarray, w: np.ndarray) -> np.ndarray:
    w3 = w[:, :, None].astype(np.float32)
    return img * (1 - w3) + fill * w3


def _blob(size: int, rng: np.random.Generator, r_range: tuple[float, float]) -> np.ndarray:
    """Irregular smooth blob: float32 (size, size) field in [0, 1]; its 0.5 level set is the outline."""
    r = size * rng.uniform(*r_range)
    cx, cy = rng.uniform(0.25, 0.75, size=2) * size
    n = int(rng.integers(7, 12))
    ang = np.sort(rng.uniform(0, 2 * np.pi, n))
    rad = r * rng.uniform(0.6, 1.3, n)
    pts = np.stack([cx + rad * np.cos(ang), cy + rad * np.sin(ang)], axis=1)
    canvas = np.zeros((size, size), np.uint8)
    cv2.fillPoly(canvas, [np.round(pts * 16).astype(np.int32)], 255, lineType=cv2.LINE_AA, shift=4)
    sigma = max(r * 0.2, 1.0)
    return cv2.GaussianBlur(canvas.astype(np.float32) / 255.0, (0, 0), sigma)


def _scratch(img, size, rng, category):
    n = int(rng.integers(3, 6))
    p = rng.uniform(0.15, 0.85, size=2) * size
    theta = rng.uniform(0, 2 * np.pi)
    pts = [p.copy()]
    for _ in range(n - 1):
        theta += rng.uniform(-0.6, 0.6)
        p = np.clip(p + size * rng.uniform(0.1, 0.2) * np.array([np.cos(theta), np.sin(theta)]), 2, size - 3)
        pts.append(p.copy())
    thick = max(2, int(round(rng.integers(2, 5) * size / 256)))
    canvas = np.zeros((size, size), np.uint8)
    cv2.polylines(canvas, [np.round(np.array(pts) * 16).astype(np.int32)], False, 255, thick, cv2.LINE_AA, 4)
    w = canvas.astype(np.float32) / 255.0
    colour = rng.uniform(15, 45) if rng.random() < 0.5 else rng.uniform(215, 250)
    return _blend(img, np.float32(colour), w), w


def _hole(img, size, rng, category):
    a, b = size * rng.uniform(0.06, 0.13, size=2)
    cx, cy = rng.uniform(0.2, 0.8, size=2) * size
    phi = rng.uniform(0, np.pi)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) + 0.5
    u = (xx - cx) * np.cos(phi) + (yy - cy) * np.sin(phi)
    v = -(xx - cx) * np.sin(phi) + (yy - cy) * np.cos(phi)
    r = np.sqrt((u / a) ** 2 + (v / b) ** 2)
    w = np.clip((1.0 - r) * min(a, b) + 0.5, 0, 1)  # 1 inside, ramps to 0 over ~1 px at the rim
    shade = 0.08 + 0.45 * np.clip(r, 0, 1) ** 2      # darkest at the centre, lighter towards the rim
    depth = rng.uniform(0.7, 1.0)
    fill = img * (shade[:, :, None] * depth + (1 - depth) * 0.5)
    return _blend(img, fill, w), w


def _stain(img, size, rng, category):
    f = _blob(size, rng, (0.08, 0.16))
    peak = rng.uniform(0.45, 0.7)
    w = np.clip((f - 0.2) / 0.6, 0, 1)  # relative opacity; 0.5 exactly where f = 0.5
    colour = np.asarray(_STAIN_COLOURS[int(rng.integers(len(_STAIN_COLOURS)))], np.float32)
    out = img * (1 - peak * w[:, :, None]) + colour * (peak * w[:, :, None])
    return out, w


def _foreign(img, size, rng, category):
    other = [c for c in DEMO_CATEGORIES if c != category]
    src = other[int(rng.integers(len(other)))]
    fill = _tint(_grey_crop(_texture(src), size, rng, max_angle=180.0), src)
    f = _blob(size, rng, (0.08, 0.15))
    w = np.clip((f - 0.5) * 4.0 + 0.5, 0, 1)  # near-hard edge, 0.5 exactly where f = 0.5
    return _blend(img, fill, w), w


_DEFECTS: dict[str, Callable] = {"scratch": _scratch, "hole": _hole, "stain": _stain, "foreign": _foreign}
_MIN_AREA = {"scratch": 0.002, "hole": 0.006, "stain": 0.006, "foreign": 0.006}


def defect_image(category: str, kind: str, size: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """A normal image with one ``kind`` defect: (float32 (size, size, 3) in [0, 255], bool mask (size, size))."""
    base = normal_image(category, size, rng)
    for _ in range(20):
        img, w = _DEFECTS[kind](base, size, rng, category)
        mask = w >= 0.5
        if mask.mean() >= _MIN_AREA[kind]:
            return np.clip(img, 0, 255), mask
    raise RuntimeError(f"could not draw a {kind} defect covering {_MIN_AREA[kind]:.1%} of a {size}px image")


def _write_png(path: Path, arr: np.ndarray) -> None:
    if arr.ndim == 3:
        arr = cv2.cvtColor(arr, cv2.COLOR_RGB2BGR)
    ok, buf = cv2.imencode(".png", arr)
    if not ok:
        raise OSError(f"cannot encode {path}")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(buf.tobytes())


def _to_u8(img: np.ndarray) -> np.ndarray:
    return np.clip(np.round(img), 0, 255).astype(np.uint8)


def _params(seed, image_size, n_train, n_test_good, n_test_defect_per_type, defect_types) -> dict:
    return {"generator": "apmask_lib.data.demo", "version": DEMO_VERSION, "seed": int(seed),
            "image_size": int(image_size), "n_train": int(n_train), "n_test_good": int(n_test_good),
            "n_test_defect_per_type": int(n_test_defect_per_type), "defect_types": list(defect_types)}


def _read_marker(folder: Path) -> Optional[dict]:
    try:
        return json.loads((folder / MARKER).read_text())
    except (OSError, ValueError):
        return None


def _generate_category(root: Path, category: str, params: dict) -> None:
    size, seed = params["image_size"], params["seed"]
    tmp = root / f".{category}.partial-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        for i in range(params["n_train"]):
            _write_png(tmp / "train" / "good" / f"{i:03d}.png",
                       _to_u8(normal_image(category, size, _rng(seed, category, "train", "good", i))))
        for i in range(params["n_test_good"]):
            _write_png(tmp / "test" / "good" / f"{i:03d}.png",
                       _to_u8(normal_image(category, size, _rng(seed, category, "test", "good", i))))
        for kind in params["defect_types"]:
            for i in range(params["n_test_defect_per_type"]):
                img, mask = defect_image(category, kind, size, _rng(seed, category, "test", kind, i))
                _write_png(tmp / "test" / kind / f"{i:03d}.png", _to_u8(img))
                _write_png(tmp / "ground_truth" / kind / f"{i:03d}_mask.png", mask.astype(np.uint8) * 255)
        (tmp / MARKER).write_text(json.dumps(params, indent=1, sort_keys=True))
        dest = root / category
        if dest.exists():
            shutil.rmtree(dest)
        os.replace(tmp, dest)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def generate_demo(root: str | Path, categories: Optional[Sequence[str]] = None, seed: int = 0,
                  image_size: int = 256, n_train: int = 40, n_test_good: int = 10,
                  n_test_defect_per_type: int = 5, defect_types: Sequence[str] = DEFECT_TYPES) -> list[str]:
    """Write the demo data set under ``root`` (MVTec layout) and return the category names.

    Categories already generated with the same parameters are skipped (marker file); see the module
    docstring for what is generated. Raises FileExistsError rather than overwrite a category folder
    that this function did not write."""
    root = Path(root)
    cats = list(DEMO_CATEGORIES if categories is None else categories)
    unknown = [c for c in cats if c not in TEXTURES]
    if unknown:
        raise ValueError(f"unknown demo categories {unknown}; choose from {', '.join(DEMO_CATEGORIES)}")
    bad = [k for k in defect_types if k not in _DEFECTS]
    if bad or not defect_types:
        raise ValueError(f"unknown defect types {bad or '(none given)'}; choose from {', '.join(DEFECT_TYPES)}")
    if image_size < 32:
        raise ValueError(f"image_size must be >= 32, got {image_size}")
    if min(n_train, n_test_good, n_test_defect_per_type) < 1:
        raise ValueError("n_train, n_test_good and n_test_defect_per_type must all be >= 1")
    params = _params(seed, image_size, n_train, n_test_good, n_test_defect_per_type, defect_types)
    root.mkdir(parents=True, exist_ok=True)
    for cat in cats:
        folder = root / cat
        marker = _read_marker(folder)
        if marker == params:
            continue
        if folder.exists() and marker is None:
            raise FileExistsError(f"{folder} exists but was not written by generate_demo (no {MARKER}); "
                                  "refusing to overwrite it -- choose another data.root for the demo data")
        log.info("generating demo category %s in %s (%s)", cat, folder, params)
        _generate_category(root, cat, params)
    return cats


def ensure_demo(root: str | Path, category: str) -> None:
    """Generate ``category`` with the default parameters unless ``root/category`` already holds a marker
    (whatever its parameters: a custom generation is kept)."""
    if _read_marker(Path(root) / category) is None:
        if category not in TEXTURES:
            raise ValueError(f"unknown demo category {category!r}; choose from {', '.join(DEMO_CATEGORIES)}")
        generate_demo(root, [category])
