"""Small grey images of varying, non-square sizes: the kNN read-out stretched to a square vs at the
images' own aspect ratio (not a test).

Builds a grey, non-square copy of a demo texture category (apmask_lib/data/demo.py): every image
(and its mask) is cropped to a seeded random window of 112-256 px per side with an aspect ratio of
at least 1.4 (portrait or landscape at random; a defective image's window contains its defect's
centre), converted to one grey channel and written in the MVTec layout under ``--root``. Then scores

* ``RGB square`` -- the original 256 x 256 RGB category (reference),
* ``grey, stretched`` -- the grey crops, each resized to a square input (``aspect="square"``, the
  default: a 112 x 256 crop is stretched 2.3x along one axis),
* ``grey, own aspect`` -- the grey crops at their own aspect ratio (``aspect="keep"``, about the
  same number of patches, :func:`apmask_lib.knn.scoring.input_shape`),

with the default read-out (offline ViT-S/14 block 7, sizes 224 + 448 averaged, k = 1, top 1 %
score, sigma 4 px at the stored size), metrics at each image's stored size. Grey files are read as
three equal channels (``read_image``). Writes ``results/knn_aspect.{md,json}``::

    .venv/bin/python -m benchmarks.knn_aspect --categories brick grass gravel
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import shlex
import sys
import time
from pathlib import Path

import cv2
import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]

from benchmarks.common import machine  # noqa: E402
from apmask_lib.config import Config  # noqa: E402
from apmask_lib.data import build_dataset  # noqa: E402
from apmask_lib.data.mvtec import load_mvtec  # noqa: E402
from apmask_lib.data.ground_truth import pixel_ground_truth  # noqa: E402
from apmask_lib.knn.scoring import KnnScorer, average_outputs  # noqa: E402
from apmask_lib.metrics import PixelMetrics, image_auroc  # noqa: E402
from apmask_lib.weights import build_backbone  # noqa: E402
from apmask_lib.core.files import atomic_write_text  # noqa: E402


def crop_window(hw: tuple[int, int], rng: np.random.Generator, centre=None, lo: int = 112,
                min_ratio: float = 1.4) -> tuple[int, int, int, int]:
    """(y0, x0, h, w): a window of ``hw`` with sides in [lo, min(hw)] and long/short >= min_ratio,
    containing ``centre`` (y, x) when given."""
    H, W = hw
    long_ = int(rng.integers(int(np.ceil(lo * min_ratio)), min(H, W) + 1))
    short = int(rng.integers(lo, int(long_ / min_ratio) + 1))
    h, w = (long_, short) if rng.random() < 0.5 else (short, long_)
    if centre is None:
        y0, x0 = int(rng.integers(0, H - h + 1)), int(rng.integers(0, W - w + 1))
    else:
        cy, cx = centre
        y0 = int(np.clip(cy - rng.integers(h // 4, 3 * h // 4 + 1), 0, H - h))
        x0 = int(np.clip(cx - rng.integers(w // 4, 3 * w // 4 + 1), 0, W - w))
    return y0, x0, h, w


def make_grey_nonsquare(src, dst: Path, seed: int = 0) -> None:
    """Write the grey, non-square copy of dataset ``src`` (MVTec layout) to ``dst``."""
    rng = np.random.default_rng(seed)
    for split, samples in (("train", src.train), ("test", src.test)):
        for i, s in enumerate(samples):
            img = src.image(s)
            centre = None
            mask = None
            if s.label:
                mask = src.mask(s, img.shape[:2])
                ys, xs = np.nonzero(mask)
                centre = (int(ys.mean()), int(xs.mean()))
            y0, x0, h, w = crop_window(img.shape[:2], rng, centre)
            grey = cv2.cvtColor(np.ascontiguousarray(img[y0:y0 + h, x0:x0 + w]), cv2.COLOR_RGB2GRAY)
            kind = s.defect if split == "test" else "good"
            out = dst / split / kind / f"{i:03d}.png"
            out.parent.mkdir(parents=True, exist_ok=True)
            cv2.imwrite(str(out), grey)
            if mask is not None:
                m = dst / "ground_truth" / kind / f"{i:03d}_mask.png"
                m.parent.mkdir(parents=True, exist_ok=True)
                cv2.imwrite(str(m), (mask[y0:y0 + h, x0:x0 + w] * 255).astype(np.uint8))


def evaluate(ds, backbone, sizes, aspect: str, batch_size: int = 8) -> dict:
    """Image AUROC / pixel AUROC / AU-PRO (%) of the default read-out with ``aspect``."""
    per_size = []
    for size in sizes:
        sc = KnnScorer(backbone, 7, size, aspect=aspect)
        feats = []
        for i in range(0, len(ds.train), batch_size):
            feats += sc.features_list([ds.image(s) for s in ds.train[i:i + batch_size]])
        sc.fit(feats)
        per_size.append([sc.predict([ds.image(s) for s in ds.test[i:i + batch_size]])
                         for i in range(0, len(ds.test), batch_size)])
    outs = [average_outputs([p[j] for p in per_size]) for j in range(len(per_size[0]))]
    scores = np.concatenate([o.scores for o in outs])
    maps = [m for o in outs for m in o.maps]
    labels = np.array([s.label for s in ds.test])
    pix = PixelMetrics(bins=Config().evaluate.pixel_bins, value_range=(0.0, 2.0))
    for s, m in zip(ds.test, maps):
        gt = pixel_ground_truth(ds, s, m.shape)
        if gt is not None:
            pix.update(m, gt)
    return {"image_auroc": 100 * image_auroc(scores, labels), "pixel_auroc": 100 * pix.pixel_auroc(),
            "au_pro": 100 * pix.au_pro()}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--categories", nargs="+", default=["brick", "grass", "gravel"])
    ap.add_argument("--sizes", nargs="+", type=int, default=[224, 448])
    ap.add_argument("--demo-root", default="/tmp/apmask_demo")
    ap.add_argument("--root", type=Path, default=Path("/tmp/apmask_grey_nonsquare"))
    ap.add_argument("--out", type=Path, default=ROOT / "results" / "knn_aspect.md")
    ap.add_argument("--keep-previous", action="store_true",
                    help="keep the rows of categories not run now from the existing JSON (with their command)")
    args = ap.parse_args(argv)
    t0 = time.perf_counter()
    backbone = build_backbone("dinov2-s14-offline").eval()
    rows: dict = {}
    for cat in args.categories:
        rgb = build_dataset("demo", args.demo_root, cat)
        make_grey_nonsquare(rgb, args.root / cat)
        grey = load_mvtec(args.root, cat, name="grey-nonsquare")
        shapes = sorted({tuple(grey.image(s).shape[:2]) for s in list(grey.train) + list(grey.test)})
        rows[cat] = {"shapes": len(shapes), "min_side": min(min(s) for s in shapes),
                     "max_ratio": max(max(s) / min(s) for s in shapes)}
        for name, ds, aspect in (("RGB square", rgb, "square"), ("grey, stretched", grey, "square"),
                                 ("grey, own aspect", grey, "keep")):
            rows[cat][name] = evaluate(ds, backbone, args.sizes, aspect)
            m = rows[cat][name]
            print(f"{cat:8s} {name:18s} {m['image_auroc']:6.2f} {m['pixel_auroc']:6.2f} {m['au_pro']:6.2f} "
                  f"load {os.getloadavg()[0]:.1f}", flush=True)
    cmd = ".venv/bin/python -m benchmarks.knn_aspect " + " ".join(
        shlex.quote(a) for a in (argv if argv is not None else sys.argv[1:]))
    for r in rows.values():
        r["command"] = cmd
    commands = [cmd]
    if args.keep_previous and args.out.with_suffix(".json").is_file():
        prev = json.loads(args.out.with_suffix(".json").read_text())
        kept = {c: r for c, r in prev["rows"].items() if c not in rows}
        rows = {**kept, **rows}
        commands = list(dict.fromkeys([r["command"] for r in rows.values()]))
    res = {"date": dt.datetime.now().isoformat(timespec="seconds"), "total_s": time.perf_counter() - t0,
           "command": "; ".join(commands), "rows": rows, "sizes": args.sizes}
    variants = ("RGB square", "grey, stretched", "grey, own aspect")
    lines = ["# kNN extension: small grey non-square images", "",
             f"Generated {res['date']} by `benchmarks/knn_aspect.py` (total {res['total_s']:.0f} s).", "",
             "Command(s) (each row's in results/knn_aspect.json): `" + "`; `".join(commands) + "`", "", f"Machine: {machine('cpu')}.", "",
             "Data: each demo category cropped to seeded random non-square windows (112-256 px per side, aspect "
             "ratio >= 1.4, portrait or landscape) and converted to grey (benchmarks/knn_aspect.py docstring). "
             "Read-out: the default (block 7, sizes " + " + ".join(map(str, args.sizes)) + " averaged, k = 1, "
             "top 1 % score, sigma 4 px at the stored size). Image AUROC / pixel AUROC / AU-PRO (FPR <= 0.3), %.", "",
             "| category (distinct sizes, max aspect ratio) | " + " | ".join(variants) + " |",
             "|---|" + "---|" * len(variants)]
    for cat, r in rows.items():
        cells = [f"{r[v]['image_auroc']:.2f} / {r[v]['pixel_auroc']:.2f} / {r[v]['au_pro']:.2f}" for v in variants]
        lines.append(f"| {cat} ({r['shapes']}, {r['max_ratio']:.1f}) | " + " | ".join(cells) + " |")
    atomic_write_text(args.out.with_suffix(".json"), json.dumps(res, indent=2) + "\n")
    atomic_write_text(args.out, "\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
