"""Result files written by evaluation and prediction, each atomically (a temp file beside, then a
rename: an interrupted run never leaves a half-written file).

* :func:`format_row` / :func:`write_csv` -- CSV rows, floats with 8 significant digits.
* :func:`save_npz` / :func:`save_npy` -- numpy arrays (features, maps).
* :func:`write_png` -- an RGB image (heatmaps).

JSON goes through :func:`apmask_lib.core.files.write_json` (sorted keys, numpy scalars as numbers).
"""
from __future__ import annotations

import csv
import io
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from .files import atomic_write_bytes, atomic_write_text


def format_row(row: Mapping[str, Any]) -> dict[str, Any]:
    """A CSV row with floats written as ``%.8g`` (the rest as ``str`` would)."""
    return {k: (f"{v:.8g}" if isinstance(v, float) else v) for k, v in row.items()}


def write_csv(path: Path, rows: Sequence[Mapping[str, Any]], columns: Sequence[str]) -> None:
    """``rows`` under the header ``columns`` (keys not among them are left out)."""
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=list(columns), extrasaction="ignore", lineterminator="\n")
    w.writeheader()
    for r in rows:
        w.writerow(format_row(r))
    atomic_write_text(path, buf.getvalue())


def save_npz(path: Path, **arrays: np.ndarray) -> None:
    """Compressed ``.npz`` of named arrays."""
    buf = io.BytesIO()
    np.savez_compressed(buf, **arrays)
    atomic_write_bytes(path, buf.getvalue())


def save_npy(path: Path, array: np.ndarray) -> None:
    """One array as ``.npy``."""
    buf = io.BytesIO()
    np.save(buf, array)
    atomic_write_bytes(path, buf.getvalue())


def write_png(path: Path, rgb: np.ndarray) -> None:
    """An RGB uint8 (H, W, 3) image as PNG."""
    import cv2

    ok, buf = cv2.imencode(".png", np.ascontiguousarray(rgb[..., ::-1]))
    if not ok:
        raise RuntimeError(f"could not encode PNG for {path}")
    atomic_write_bytes(path, buf.tobytes())


__all__ = ["format_row", "write_csv", "save_npz", "save_npy", "write_png"]
