"""Score your own images with a fine-tuned detector: a decision per image, heatmaps, predictions.csv.

``predict(model_path, inputs, out_dir)``: ``inputs`` is a folder, an image path, or a list of both.
Writes to ``out_dir`` (which must be empty or absent; ``force=True`` replaces earlier predict outputs,
``heatmaps/`` included, so no old heatmap is left mixed in):

  predictions.csv   one row per input, written as each batch finishes (a crash keeps what was done):
                    path, status, score, threshold, anomalous (0/1), score_map_max, vote, heatmap,
                    error, skip_reason.
  heatmaps/*.png    the image with the anomaly map over it (JET, 0..1) and the region with
                    map >= pixel threshold outlined in white.
  predict.json      the threshold used (and where it came from), scales, counts, model.

Decision: ``anomalous = score >= threshold``; the threshold and the score it applies to
(``det_mean``, the mean detection probability over scales, or ``map_max``) come from the
``threshold.json`` that ``apmask evaluate`` wrote (beside the model, or the run's ``evaluate/``; see
:mod:`apmask_lib.evaluate.threshold`), or from ``threshold=``; without either, 0.5 on det_mean, with a warning.
``vote`` is the paper's majority vote over scales (:mod:`apmask_lib.inference.multiscale`).

Every input appears in the result, nothing is dropped silently:

  status "ok"       scored.
  status "error"    the file could not be read (corrupt, not an image, missing, larger than
                    ``max_pixels`` -- read from the file header before decoding where possible):
                    ``error`` says why; a warning is logged and the file is listed again at the end.
                    The rest is processed.
  status "skipped"  found in a folder but not an image by its extension (or a sub-folder, which is
                    not searched): ``error`` is empty and ``skip_reason`` says why.

Files named explicitly are always attempted, whatever their extension.
"""
from __future__ import annotations

import csv
import logging
import shutil
import warnings
from pathlib import Path
from typing import Any, Iterable, Optional, Sequence

import numpy as np
from tqdm import tqdm

from ..config import EvaluateConfig
from ..data import ImageReadError, read_image
from ..data.mvtec import IMAGE_EXTS
from ..knn.model import load_model, model_kind, run_sizes
from ..inference.multiscale import predict_multiscale
from ..core.outputs import format_row, write_png
from ..evaluate.threshold import find_threshold_file, read_threshold
from ..core.devices import resolve_device
from ..core.files import write_json

log = logging.getLogger(__name__)

COLUMNS = ("path", "status", "score", "threshold", "anomalous", "score_map_max", "vote", "heatmap", "error",
           "skip_reason")
OUTPUTS = ("predictions.csv", "predict.json", "heatmaps")   # what force=True replaces
MAX_PIXELS = 64_000_000        # default size guard: 8000 x 8000
OUTLINE_COLOR = (255, 255, 255)


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


def header_size(path: Path) -> Optional[tuple[int, int]]:
    """(width, height) from the file header without decoding the pixels (Pillow reads lazily);
    None when Pillow cannot identify the file (it is then decoded and checked after decoding)."""
    from PIL import Image

    old = Image.MAX_IMAGE_PIXELS
    try:
        Image.MAX_IMAGE_PIXELS = None          # we apply our own limit; no decompression-bomb error here
        with Image.open(path) as im:
            return int(im.size[0]), int(im.size[1])
    except Exception:  # noqa: BLE001 - unidentifiable here; read_image gives the precise error
        return None
    finally:
        Image.MAX_IMAGE_PIXELS = old


def read_guarded(path: Path, max_pixels: int) -> np.ndarray:
    """:func:`read_image` with a size guard: an image above ``max_pixels`` pixels is refused (from its
    header before decoding where possible), naming the file, its size and the limit."""
    def refuse(w: int, h: int) -> ImageReadError:
        return ImageReadError(f"image too large: {path} is {w}x{h} = {w * h:,} pixels, above the limit of "
                              f"{max_pixels:,} (max_pixels / --max-pixels); downscale it or raise the limit")

    size = header_size(path) if path.is_file() else None
    if size is not None and size[0] * size[1] > max_pixels:
        raise refuse(*size)
    try:
        img = read_image(path)
    except MemoryError as e:
        raise ImageReadError(f"out of memory decoding {path}: {e}") from e
    if img.shape[0] * img.shape[1] > max_pixels:
        raise refuse(img.shape[1], img.shape[0])
    return img


def resolve_threshold(model_path: Path, threshold: str | Path | float | None, kind: str = "detector") -> dict[str, Any]:
    """The threshold record to decide with: a number (on det_mean; pixel threshold 0.5), a
    ``threshold.json`` path, or None = the file ``apmask evaluate`` wrote for this model
    (:func:`~apmask_lib.evaluate.threshold.find_threshold_file`), else 0.5 on det_mean with a warning."""
    if isinstance(threshold, (int, float)) and not isinstance(threshold, bool):
        return {"image_threshold": float(threshold), "image_score": "det_mean", "pixel_threshold": 0.5,
                "source": "given on the command line (pixel threshold: default 0.5)"}
    path = Path(threshold) if threshold is not None else find_threshold_file(model_path, kind)
    if path is None:
        warnings.warn(f"no threshold.json beside {model_path} or in its run's evaluate/ folder: deciding with "
                      "det_mean >= 0.5; run `apmask evaluate` to choose a threshold on your data", stacklevel=3)
        return {"image_threshold": 0.5, "image_score": "det_mean", "pixel_threshold": 0.5,
                "source": "default 0.5 (no threshold.json found; run apmask evaluate)"}
    if not path.is_file():
        raise FileNotFoundError(f"threshold file not found: {path}")
    return {**read_threshold(path), "source": str(path)}


def prepare_out_dir(out_dir: Path, force: bool) -> None:
    """Refuse a non-empty ``out_dir`` unless ``force``; with ``force`` remove earlier predict outputs
    (:data:`OUTPUTS`) so nothing old is left mixed in (other files are left alone)."""
    if out_dir.exists() and not out_dir.is_dir():
        raise FileExistsError(f"output path {out_dir} exists and is not a folder")
    if out_dir.is_dir() and any(out_dir.iterdir()):
        if not force:
            raise FileExistsError(f"output folder {out_dir} is not empty; choose a new --out folder, or pass "
                                  "--force to replace earlier predictions (predictions.csv, predict.json, heatmaps/)")
        for name in OUTPUTS:
            p = out_dir / name
            if p.is_dir():
                shutil.rmtree(p)
            elif p.exists():
                p.unlink()
    out_dir.mkdir(parents=True, exist_ok=True)


def predict(model_path: str | Path, inputs: str | Path | Sequence[str | Path], out_dir: str | Path,
            scales: Sequence[int] = EvaluateConfig().scales, device: str = "auto", batch_size: int = 8,
            threshold: str | Path | float | None = None, force: bool = False,
            max_pixels: int = MAX_PIXELS) -> list[dict[str, Any]]:
    """Score images; writes ``out_dir/{predictions.csv, predict.json, heatmaps/}``; returns the rows
    (module docstring). Raises for a missing/unreadable/non-finite model checkpoint, a bad threshold
    file, or a non-empty ``out_dir`` without ``force``."""
    from ..viz.localization import heatmap_overlay, outline_mask

    out_dir = Path(out_dir)
    model_path = Path(model_path)
    if not model_path.is_file():
        raise FileNotFoundError(f"detector checkpoint not found: {model_path} (the fine-tuning stage writes "
                                "OUT_DIR/finetune/model.pt)")
    dev = resolve_device(device)
    model = load_model(model_path, map_location="cpu").to(dev).eval()   # the fine-tuned detector or a kNN model
    kind = model_kind(model)
    thr = resolve_threshold(model_path, threshold, kind)
    t_img, t_pix, score_name = float(thr["image_threshold"]), float(thr["pixel_threshold"]), thr["image_score"]
    sizes = run_sizes(model, scales)
    prepare_out_dir(out_dir, force)

    entries = collect_inputs(inputs)
    rows: list[dict[str, Any]] = [{"path": str(p), "status": "skipped" if why else "", "score": "", "threshold": "",
                                   "anomalous": "", "score_map_max": "", "vote": "", "heatmap": "", "error": "",
                                   "skip_reason": why or ""} for p, why in entries]
    n_images = sum(why is None for _, why in entries)
    used: set[str] = set()
    csv_path = out_dir / "predictions.csv"
    with csv_path.open("w", newline="") as f, \
            tqdm(total=n_images, desc="predict", unit="img", disable=None, leave=False) as bar:
        writer = csv.DictWriter(f, fieldnames=list(COLUMNS), extrasaction="ignore", lineterminator="\n")
        writer.writeheader()
        f.flush()
        start = 0
        while start < len(entries):
            # a chunk: up to batch_size readable candidates plus the skipped entries between them
            idx, images, stop = [], [], start
            while stop < len(entries) and len(idx) < batch_size:
                if entries[stop][1] is None:
                    try:
                        images.append(read_guarded(entries[stop][0], max_pixels))
                        idx.append(stop)
                    except Exception as e:  # noqa: BLE001 - any unreadable file is reported, the rest go on
                        rows[stop].update(status="error", error=str(e))
                        log.warning("skipping unreadable input %s: %s", entries[stop][0], e)
                        bar.update(1)
                stop += 1
            if images:
                res = predict_multiscale(model, images, sizes, dev)
                scores = res.det_mean if score_name == "det_mean" else res.map_max
                for k, i in enumerate(idx):
                    png = out_dir / "heatmaps" / heatmap_name(entries[i][0], used)
                    over = heatmap_overlay(images[k], res.maps[k])
                    write_png(png, outline_mask(over, res.maps[k] >= t_pix, color=OUTLINE_COLOR))
                    rows[i].update(status="ok", score=float(scores[k]), threshold=t_img,
                                   anomalous=int(scores[k] >= t_img), score_map_max=float(res.map_max[k]),
                                   vote=int(res.vote[k]), heatmap=str(png))
                bar.update(len(idx))
                del images, res
            for i in range(start, stop):
                writer.writerow(format_row(rows[i]))
            f.flush()
            start = stop

    ok = [r for r in rows if r["status"] == "ok"]
    bad = [r for r in rows if r["status"] == "error"]
    skipped = [r for r in rows if r["status"] == "skipped"]
    n_anom = sum(r["anomalous"] for r in ok)
    summary = (f"{len(ok)} images scored: {n_anom} anomalous, {len(ok) - n_anom} normal at {score_name} >= "
               f"{t_img:.6g} (threshold from {thr['source']}"
               + (f"; chosen on {thr['chosen_on']}" if thr.get("chosen_on") else "")
               + f"); {len(bad)} failed, {len(skipped)} skipped -> {csv_path}")
    write_json(out_dir / "predict.json", {"model": str(model_path), "model_kind": kind, "threshold": thr, "sizes": list(sizes),
                                          "n_ok": len(ok), "n_anomalous": n_anom, "n_error": len(bad),
                                          "n_skipped": len(skipped), "summary": summary})
    log.info("predict: %s", summary)
    for r in bad:
        log.warning("unreadable: %s (%s)", r["path"], r["error"])
    for r in skipped:
        log.info("skipped: %s (%s)", r["path"], r["skip_reason"])
    return rows


def summary_line(out_dir: str | Path) -> str:
    """The one-line summary ``predict`` wrote to ``out_dir/predict.json``."""
    import json

    return json.loads((Path(out_dir) / "predict.json").read_text())["summary"]


__all__ = ["predict", "collect_inputs", "heatmap_name", "header_size", "read_guarded", "resolve_threshold",
           "prepare_out_dir", "summary_line", "COLUMNS", "MAX_PIXELS"]
