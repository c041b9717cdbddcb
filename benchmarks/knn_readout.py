"""Read-out choices of the kNN extension, compared on every data set we have (not a test).

The kNN extension (:mod:`apmask_lib.knn.scoring`) turns patch distances into pixel maps and image scores.
This benchmark measures its read-out choices on real MVTec bottle, the built-in demo textures and
the NIH subset, with the distances computed ONCE per (data set, input size) and cached, so each
read-out variant costs only the map/metric computation:

* ``sigma_at``: where the Gaussian (sigma 4 px) smooths the map -- at the image's stored
  resolution ("output", AnomalyDINO's ``dists2map``) or at the network input resolution ("input",
  PatchCore's / anomalib's convention);
* ``sizes``: which input sizes are averaged (the paper's multi-scale averaging applied to the kNN
  branch), e.g. 448 alone (AnomalyDINO), 224 + 448 (our default), the paper's six test scales;
* ``layers``: which blocks' patch tokens give the distances (``--layer-sets``, e.g. ``7 6,7,8``:
  maps and scores of several blocks averaged, as the sizes are).

The project's rule for defaults (issue 7): a change must help on bottle AND the demo textures AND
NIH. The table therefore shows every data set side by side, and the summary line says, for each
variant, on how many data sets it is at least as good as the current default on each metric.

Writes ``results/knn_readout.{md,json}`` (atomically) with the command, machine and versions.
Example (2 CPU cores: ~40 min for the two default sizes on all five data sets, most of it bottle
and NIH at 448 px; reruns with the cache take minutes)::

    .venv/bin/python -m benchmarks.knn_readout --device cpu
"""
from __future__ import annotations

import argparse
import datetime as dt
import itertools
import json
import os
import shlex
import sys
import time
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

ROOT = Path(__file__).resolve().parents[1]

from benchmarks.common import versions, machine  # noqa: E402

from apmask_lib.config import Config  # noqa: E402
from apmask_lib.data import build_dataset  # noqa: E402
from apmask_lib.data.ground_truth import pixel_ground_truth  # noqa: E402
from apmask_lib.knn.scoring import SIGMA_AT, KnnScorer, distance_map, top_fraction_mean  # noqa: E402
from apmask_lib.metrics import PixelMetrics, image_auroc  # noqa: E402
from apmask_lib.weights import build_backbone  # noqa: E402
from apmask_lib.core.files import atomic_write_text  # noqa: E402

DATA_ROOTS = {"mvtec": "../shared/data/mvtec_ad", "nih": "../shared/data/nih_cxr14", "demo": "/tmp/apmask_demo"}
DEFAULT_DATASETS = ("mvtec:bottle", "demo:brick", "demo:grass", "demo:gravel", "nih:all")


def cached_distances(ds, name: str, backbone, layer: int, size: int, device: torch.device, cache: Path,
                     batch_size: int) -> dict:
    """Patch distances of every test image at one input size (bank = all training images),
    computed once and cached in ``cache`` (torch.save of plain tensors, read with weights_only)."""
    sc = KnnScorer(backbone, layer, size, device=device)
    path = cache / f"{name.replace(':', '_')}_L{layer}_{sc.size}.pt"
    if path.is_file():
        return torch.load(path, weights_only=True)
    t0 = time.perf_counter()
    feats = []
    for s in tqdm(range(0, len(ds.train), batch_size), desc=f"{name} bank {sc.size}px", leave=False):
        feats += list(sc.features([ds.image(x) for x in ds.train[s:s + batch_size]]).cpu())
    sc.fit(feats)
    del feats
    dists = []
    for s in tqdm(range(0, len(ds.test), batch_size), desc=f"{name} test {sc.size}px", leave=False):
        dists.append(sc.bank.score(sc.features([ds.image(x) for x in ds.test[s:s + batch_size]]), sc.k).cpu())
    out = {"dists": torch.cat(dists), "grid": torch.tensor(sc.grid), "size": torch.tensor(sc.size),
           "seconds": torch.tensor(time.perf_counter() - t0)}
    cache.mkdir(parents=True, exist_ok=True)
    torch.save(out, str(path) + ".tmp")
    Path(str(path) + ".tmp").replace(path)
    return out


def ground_truth(ds) -> list[tuple[tuple[int, int], object]]:
    """(stored (H, W), bool mask or None) of every test image, read once per data set."""
    out = []
    for sample in ds.test:
        hw = tuple(ds.image(sample).shape[:2])
        out.append((hw, pixel_ground_truth(ds, sample, hw)))
    return out


def evaluate_variant(ds, truth, per_size: list[dict], sigma: float, sigma_at: str, bins) -> dict:
    """Image AUROC / pixel AUROC / AU-PRO (%) of maps and scores averaged over ``per_size``;
    ``truth`` from :func:`ground_truth`."""
    labels = np.array([s.label for s in ds.test])
    scores = sum(top_fraction_mean(d["dists"]).double().numpy() for d in per_size) / len(per_size)
    pix = PixelMetrics(bins=bins, value_range=(0.0, 2.0))
    for i, (hw, gt) in enumerate(truth):
        if gt is None:
            continue
        maps = [distance_map(d["dists"][i:i + 1], tuple(d["grid"].tolist()), hw, sigma, sigma_at,
                             (int(d["size"]),) * 2)[0].numpy() for d in per_size]
        pix.update(sum(maps) / len(maps), gt)
    img = image_auroc(scores, labels) if 0 < labels.sum() < len(labels) else float("nan")
    return {"image_auroc": 100 * img, "pixel_auroc": 100 * pix.pixel_auroc(), "au_pro": 100 * pix.au_pro()}


def render(res: dict, args, cmd: str, machine: str) -> str:
    names = list(res["datasets"])
    default = res["default"]
    lines = ["# kNN extension: read-out choices on every data set", "",
             f"Generated {res['date']} by `benchmarks/knn_readout.py` (total {res['total_s']:.0f} s).", "",
             f"Command: `{cmd}`", "", f"Machine: {machine}. Versions: {res['versions']}.", "",
             f"Backbone `{res['backbone']}`, block(s) {' / '.join('+'.join(map(str, ls)) for ls in res['layer_sets'])} "
             "tokens (0-based, final LayerNorm), k = 1, image score = mean of the "
             "top 1 % patch distances, maps bilinear + Gaussian sigma 4 px, one bank of ALL training patches per input size; "
             "pixel metrics at each image's stored resolution, histogram of "
             f"{res['pixel_bins']} bins over [0, 2]. Distances are computed once per (data set, size) and cached; "
             "the variants differ only in the read-out. Sizes are the requested ones; the network input is snapped to "
             "the nearest multiple of the patch size (14: 320 -> 322, 384 -> 378, 416 -> 420, 512 -> 518; the seconds "
             "line below names the snapped sizes). Image AUROC / pixel AUROC / AU-PRO (FPR <= 0.3), %.", "",
             f"Current default: **{default}**. A variant counts as *no worse* on a data set when it is at least the "
             "default's value minus 0.05 points on that metric.", "",
             "| variant | " + " | ".join(names) + " | no worse than default (img / pix / pro) |",
             "|---|" + "---|" * len(names) + "---|"]
    for v, per in res["variants"].items():
        cells = []
        for n in names:
            m = per[n]
            cells.append(f"{m['image_auroc']:.2f} / {m['pixel_auroc']:.2f} / {m['au_pro']:.2f}")
        nw = res["no_worse"].get(v)
        tag = f"**{v}**" if v == default else v
        nw_cell = (f"{nw['image_auroc']}/{len(names)} · {nw['pixel_auroc']}/{len(names)} · {nw['au_pro']}/{len(names)}"
                   if nw else "(default not among the variants)")
        lines.append(f"| {tag} | " + " | ".join(cells) + f" | {nw_cell} |")
    lines += ["", "Distance computation per (data set, size), seconds (first run, on a CPU shared with other jobs, so "
              "indicative only; cached afterwards): " +
              ", ".join(f"{k} {v:.0f}" for k, v in res["seconds"].items()) + "."]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--datasets", nargs="+", default=list(DEFAULT_DATASETS), help="dataset:category items")
    ap.add_argument("--sizes", nargs="+", type=int, default=[224, 448], help="input sizes to compute distances at")
    ap.add_argument("--size-sets", nargs="+", default=None,
                    help="size subsets to compare, comma-separated, e.g. 448 224,448 (default: each size alone + all)")
    ap.add_argument("--layer-sets", nargs="+", default=["7"],
                    help="block subsets (0-based) to compare, comma-separated, e.g. 7 6,7,8 (default: 7)")
    ap.add_argument("--sigma-at", nargs="+", choices=SIGMA_AT, default=list(SIGMA_AT))
    ap.add_argument("--backbone", default="dinov2-s14-offline")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--cache", type=Path, default=ROOT / "runs" / "knn_readout")
    ap.add_argument("--out", type=Path, default=ROOT / "results" / "knn_readout.md")
    args = ap.parse_args(argv)
    t_start = time.perf_counter()
    device = torch.device(args.device)
    bins = Config().evaluate.pixel_bins
    backbone = build_backbone(args.backbone).to(device).eval()
    size_sets = ([tuple(int(x) for x in s.split(",")) for s in args.size_sets] if args.size_sets
                 else [(s,) for s in args.sizes] + ([tuple(args.sizes)] if len(args.sizes) > 1 else []))
    default_sizes = tuple(Config().evaluate.knn_sizes)
    layer_sets = [tuple(int(x) for x in s.split(",")) for s in args.layer_sets]
    multi_layer = layer_sets != [(7,)]

    def vname(ls, ss, at):
        return (f"blocks {'+'.join(map(str, ls))}, " if multi_layer else "") + \
            f"sizes {'+'.join(map(str, ss))}, sigma at {at}"

    default = vname((7,), default_sizes, "output")
    variants = {vname(ls, ss, at): (ls, ss, at)
                for ls, ss, at in itertools.product(layer_sets, size_sets, args.sigma_at)}
    per_variant: dict = {v: {} for v in variants}
    seconds = {}
    for item in args.datasets:
        kind, cat = item.split(":")
        ds = build_dataset(kind, DATA_ROOTS[kind], cat)
        cache = {}
        for layer in sorted({b for ls in layer_sets for b in ls}):
            for size in sorted({s for ss in size_sets for s in ss}):
                d = cached_distances(ds, item, backbone, layer, size, device, args.cache, args.batch_size)
                cache[layer, size] = d
                seconds[f"{item}@{int(d['size'])}" + (f"/block{layer}" if multi_layer else "")] = float(d["seconds"])
        truth = ground_truth(ds)
        for v, (ls, ss, at) in variants.items():
            per_variant[v][item] = evaluate_variant(ds, truth, [cache[b, s] for b in ls for s in ss], 4.0, at, bins)
            m = per_variant[v][item]
            print(f"{item:14s} {v:40s} {m['image_auroc']:6.2f} {m['pixel_auroc']:6.2f} {m['au_pro']:6.2f}", flush=True)
    no_worse = {}
    if default in per_variant:
        for v, per in per_variant.items():
            no_worse[v] = {k: sum(per[n][k] >= per_variant[default][n][k] - 0.05 for n in per)
                           for k in ("image_auroc", "pixel_auroc", "au_pro")}
    res = {"date": dt.datetime.now().isoformat(timespec="seconds"), "total_s": time.perf_counter() - t_start,
           "datasets": args.datasets, "variants": per_variant, "default": default, "no_worse": no_worse,
           "seconds": seconds, "backbone": args.backbone, "layer_sets": layer_sets, "pixel_bins": bins,
           "versions": versions()}
    cmd = ".venv/bin/python -m benchmarks.knn_readout " + " ".join(
        shlex.quote(a) for a in (argv if argv is not None else sys.argv[1:]))
    machine_text = machine(device)
    atomic_write_text(args.out.with_suffix(".json"), json.dumps(res, indent=2) + "\n")
    doc = render(res, args, cmd, machine_text)
    atomic_write_text(args.out, doc)
    print(doc)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
