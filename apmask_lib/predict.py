"""Score your own images with a fine-tuned detector: a heatmap overlay per image + predictions.csv.

``predict(model_path, inputs, out_dir)``: ``inputs`` is a folder, an image path, or a list of both.
Every input appears in the result, nothing is dropped silently:

  status "ok"       scored: score (mean detection probability over scales, as evaluation's
                    det_mean), score_map_max, decision (majority vote over scales, ties ->
                    anomalous; see :mod:`apmask_lib.multiscale`), heatmap (PNG path).
  status "error"    the file could not be read (corrupt, not an image, missing): ``error`` says why;
                    a warning is logged and the file is listed again at the end. The rest is processed.
  status "skipped"  found in a folder but not an image by its extension (or a sub-folder, which is
                    not searched): ``error`` is empty and ``skip_reason`` says why.

Files named explicitly are always attempted, whatever their extension.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Iterable, Optional, Sequence

import cv2
import numpy as np
from tqdm import tqdm

from .config import EvaluateConfig
from .data import read_image
from .data.mvtec import IMAGE_EXTS
from .evaluate import write_csv
from .multiscale import model_patch_size, predict_multiscale, scale_sizes
from .utils import atomic_write_bytes, resolve_device

log = logging.getLogger(__name__)

COLUMNS = ("path", "status", "score", "score_map_max", "decision", "heatmap", "error", "skip_reason")


def collect_inputs(inputs: str | Path | Iterable[str | Path]) -> list[tuple[Path, Optional[str]]]:
    """Expand folders (not recursively, sorted) into files. Returns (path, skip reason or None) in
    input order; folder entries that are not images get a reason, explicit files never do."""
    items = [inputs] if isinstance(inputs, (str, Path)) else list(inputs)
    out: list[tuple[Path, Optional[str]]] = []
    for item in items:
        p = Path(item)
        if p.is_dir():
            for f in sorted(p.iterdir()):
                if f.is_dir():
                    out.append((f, "sub-folder (folders are not searched recursively; pass it explicitly)"))
                elif f.suffix.lower() not in IMAGE_EXTS:
                    out.append((f, f"not an image file (extension {f.suffix or 'none'!r}; "
                                   f"expected one of {', '.join(IMAGE_EXTS)})"))
                else:
                    out.append((f, None))
        else:
            out.append((p, None))
    return out


def heatmap_name(path: Path, used: set[str]) -> str:
    """``<stem>.png``, made unique with ``_2``, ``_3``... when stems repeat across folders."""
    name, k = f"{path.stem}.png", 1
    while name in used:
        k += 1
        name = f"{path.stem}_{k}.png"
    used.add(name)
    return name


def write_png(path: Path, rgb: np.ndarray) -> None:
    ok, buf = cv2.imencode(".png", np.ascontiguousarray(rgb[..., ::-1]))
    if not ok:
        raise RuntimeError(f"could not encode PNG for {path}")
    atomic_write_bytes(path, buf.tobytes())


def predict(model_path: str | Path, inputs: str | Path | Sequence[str | Path], out_dir: str | Path,
            scales: Sequence[int] = EvaluateConfig().scales, device: str = "auto",
            batch_size: int = 8) -> list[dict[str, Any]]:
    """Score images; writes ``out_dir/heatmaps/*.png`` and ``out_dir/predictions.csv``; returns the rows
    (see the module docstring). Raises only for a missing/unreadable model checkpoint."""
    from .models.detector import load_detector
    from .viz.localization import heatmap_overlay

    out_dir = Path(out_dir)
    model_path = Path(model_path)
    if not model_path.is_file():
        raise FileNotFoundError(f"detector checkpoint not found: {model_path} (the fine-tuning stage writes "
                                "OUT_DIR/finetune/model.pt)")
    dev = resolve_device(device)
    model = load_detector(model_path, map_location="cpu").to(dev).eval()
    sizes = scale_sizes(scales, model_patch_size(model))

    entries = collect_inputs(inputs)
    rows: list[dict[str, Any]] = [{"path": str(p), "status": "skipped" if why else "", "score": "",
                                   "score_map_max": "", "decision": "", "heatmap": "", "error": "",
                                   "skip_reason": why or ""} for p, why in entries]
    todo = [i for i, (_, why) in enumerate(entries) if why is None]
    used: set[str] = set()
    for start in tqdm(range(0, len(todo), batch_size), desc="predict", unit="batch", disable=None, leave=False):
        idx, images = [], []
        for i in todo[start:start + batch_size]:
            try:
                images.append(read_image(entries[i][0]))
                idx.append(i)
            except Exception as e:  # noqa: BLE001 - any unreadable file is reported, the rest go on
                rows[i].update(status="error", error=str(e))
                log.warning("skipping unreadable input %s: %s", entries[i][0], e)
        if not images:
            continue
        res = predict_multiscale(model, images, sizes, dev)
        for k, i in enumerate(idx):
            png = out_dir / "heatmaps" / heatmap_name(entries[i][0], used)
            write_png(png, heatmap_overlay(images[k], res.maps[k]))
            rows[i].update(status="ok", score=float(res.det_mean[k]), score_map_max=float(res.map_max[k]),
                           decision="anomalous" if res.vote[k] else "normal", heatmap=str(png))
    write_csv(out_dir / "predictions.csv", rows, COLUMNS)
    bad = [r for r in rows if r["status"] == "error"]
    skipped = [r for r in rows if r["status"] == "skipped"]
    log.info("predict: %d scored, %d unreadable, %d skipped -> %s", len(rows) - len(bad) - len(skipped),
             len(bad), len(skipped), out_dir / "predictions.csv")
    for r in bad:
        log.warning("unreadable: %s (%s)", r["path"], r["error"])
    for r in skipped:
        log.info("skipped: %s (%s)", r["path"], r["skip_reason"])
    return rows


__all__ = ["predict", "collect_inputs", "heatmap_name", "COLUMNS"]
