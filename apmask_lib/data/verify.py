"""Check a whole data set in seconds, before any training: decode every image and mask once.

:func:`check_sample` decodes one sample's image (and mask, or boxes) and checks that they fit;
:func:`verify_split` runs it over the train and test splits and remembers each good sample by the
size and modification time of its files (a JSON file in the apmask cache, ``$APMASK_CACHE`` or
``~/.cache/apmask``), so re-running ``apmask data`` decodes only what changed.
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Optional

from tqdm.auto import tqdm

from ..core.files import cache_dir, write_json
from .images import ImageReadError
from .types import AnomalyDataset, Sample


def check_sample(s: Sample) -> None:
    """Decode ``s``'s image and ground truth; ImageReadError naming the file where one is bad (corrupt
    image, unreadable mask, mask/image size mismatch, box outside the image)."""
    img = AnomalyDataset.image(s)
    if s.has_pixel_gt and (s.mask_path is not None or s.boxes):
        AnomalyDataset.mask(s, img.shape[:2])
    for x, y, w, h in s.boxes:
        if x < 0 or y < 0 or w <= 0 or h <= 0 or x + w > img.shape[1] + 1 or y + h > img.shape[0] + 1:
            raise ImageReadError(f"box {(x, y, w, h)} of {s.path} lies outside its {img.shape[1]}x{img.shape[0]} image")


def _stamp(s: Sample) -> list:
    """(size, mtime_ns) of the sample's files, and its boxes: what makes a cached verdict stale."""
    out: list = []
    for p in (s.path, s.mask_path):
        if p is not None:
            st = os.stat(p)
            out += [st.st_size, st.st_mtime_ns]
    return out + [list(b) for b in s.boxes]


def default_cache(ds: AnomalyDataset) -> Path:
    first = str(Path(ds.train[0].path).resolve()) if ds.train else ds.name
    key = hashlib.sha1(f"{ds.name}|{first}".encode()).hexdigest()[:16]
    return cache_dir() / "verified" / f"{ds.name.replace('/', '_')}_{key}.json"


def verify_split(ds: AnomalyDataset, cache: Optional[Path] = None, progress: bool = True) -> tuple[int, int]:
    """Check every sample of ``ds`` (:func:`check_sample`), skipping those whose files are unchanged
    since they last passed (``cache``: a JSON file; None = :func:`default_cache`). Raises on the
    first bad file; returns (checked now, taken from the cache)."""
    cache = cache or default_cache(ds)
    try:
        known = json.loads(cache.read_text())
    except (OSError, ValueError):
        known = {}
    passed, checked, cached = {}, 0, 0
    try:
        for s in tqdm(ds.train + ds.val + ds.test, desc=f"verify {ds.name}", disable=not progress, leave=False):
            key, stamp = str(s.path), _stamp(s)
            if known.get(key) == stamp:
                cached += 1
            else:
                check_sample(s)
                checked += 1
            passed[key] = stamp
    finally:
        try:
            write_json(cache, {**known, **passed})
        except OSError:
            pass  # a read-only cache only costs the next run its shortcut
    return checked, cached


__all__ = ["check_sample", "verify_split", "default_cache"]
