"""Quality candidates for the kNN extension, on every data set we have (not a test; issue 16).

Patch features are computed ONCE per (data set, input size) -- blocks 6, 7 and 8 of the offline
ViT-S/14 in one pass (``VisionTransformer.forward_intermediates``, final LayerNorm, l2-normalised),
for the training images, their horizontal flips and the test images -- and cached in ``--cache``;
every candidate then costs only its nearest-neighbour search and read-out. Candidates, each with the
reason it might help:

* ``default``: today's read-out (block 7, sizes 224 + 448, k = 1, bank of all training patches,
  image score = mean of the top 1 % patch distances, maps bilinear + Gaussian sigma 4 px at the
  stored size, averaged over the sizes);
* ``blocks 6+7+8 concatenated``: PatchCore's mid-level aggregation (features of several blocks
  side by side, each l2-normalised, so the similarity is the mean of the three blocks'
  similarities to ONE bank patch; unlike averaging the three blocks' distances, tried before in
  results/knn_readout_blocks.md);
* ``block 7, 3x3 neighbourhood average``: PatchCore's locally aware patch features (each token
  averaged with its 3 x 3 grid neighbours before normalising; the bank likewise);
* ``flip-augmented bank``: the bank also holds the patches of the horizontally flipped training
  images (d = min over both banks);
* ``PatchCore re-weighted image score``: score = w * max_p d_p (Euclidean distance of unit
  vectors, sqrt(2 d)), w = 1 - softmax over the 9 bank neighbours m of the max patch's nearest bank
  patch m* of -||x - m||... exactly anomalib's ``compute_anomaly_score``: ``1 - softmax(dists)[0]``;
  maps unchanged;
* ``background masking``: AnomalyDINO's zero-shot masking for objects, here from each test image's
  own block-7 features: the first principal component split at 0, the side holding most of the
  central patches kept as foreground, dilated by one patch; distances of background patches set to
  0 (score and map). AnomalyDINO applies it to object categories only; it is measured on all.

Rule for a new default (issue 16): it must help on every data set. Training images are subsampled
with ``--max-train`` (first N; the test sets are complete). Writes ``results/knn_quality.{md,json}``.
Example (2 CPU cores shared with other jobs)::

    .venv/bin/python -m benchmarks.knn_quality --max-train 50
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

import numpy as np
import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]

from benchmarks.knn_readout import DATA_ROOTS, ground_truth  # noqa: E402

from benchmarks.common import machine  # noqa: E402
from apmask_lib.config import Config  # noqa: E402
from apmask_lib.data import build_dataset  # noqa: E402
from apmask_lib.knn.scoring import KnnScorer, MemoryBank, distance_map, top_fraction_mean  # noqa: E402
from apmask_lib.metrics import PixelMetrics, image_auroc  # noqa: E402
from apmask_lib.weights import build_backbone  # noqa: E402
from apmask_lib.core.files import atomic_write_text  # noqa: E402

DATASETS = ("mvtec:bottle", "demo:brick", "demo:grass", "demo:gravel", "nih:all")
BLOCKS = (6, 7, 8)
VARIANTS = ("default", "blocks 6+7+8 concatenated", "block 7, 3x3 neighbourhood average", "flip-augmented bank",
            "PatchCore re-weighted image score", "background masking")


def unit(x: torch.Tensor) -> torch.Tensor:
    return F.normalize(x.float(), dim=-1)


@torch.no_grad()
def cached_features(ds, name: str, train, backbone, size: int, cache: Path, batch_size: int = 8) -> dict:
    """{"train"|"flip"|"test": {block: (n, N, C)}} l2-normalised tokens of blocks 6-8 at one size, as
    KnnScorer.features computes them (block 7 is bit-identical to it), cached on disk."""
    sc = KnnScorer(backbone, 7, size)
    path = cache / f"{name.replace(':', '_')}_{len(train)}_{sc.size}.pt"
    if path.is_file():
        return torch.load(path, weights_only=True)
    t0 = time.perf_counter()
    out: dict = {"grid": torch.tensor(sc.grid), "size": torch.tensor(sc.size)}
    parts = {"train": [ds.image(s) for s in train], "test": None}
    parts["flip"] = [np.ascontiguousarray(im[:, ::-1]) for im in parts["train"]]
    for part in ("train", "flip", "test"):
        samples = parts[part] if part != "test" else None
        n = len(train) if part != "test" else len(ds.test)
        acc = {b: [] for b in BLOCKS}
        for s in range(0, n, batch_size):
            images = samples[s:s + batch_size] if samples is not None else [ds.image(x) for x in ds.test[s:s + batch_size]]
            toks = backbone.forward_intermediates(sc.batch(images), list(BLOCKS), norm=True)
            for b, t in zip(BLOCKS, toks):
                acc[b].append(unit(unit(t)))  # patch_features, then KnnScorer.features: normalised twice
        out[part] = {b: torch.cat(v) for b, v in acc.items()}
    out["seconds"] = torch.tensor(time.perf_counter() - t0)
    cache.mkdir(parents=True, exist_ok=True)
    torch.save(out, str(path) + ".tmp")
    Path(str(path) + ".tmp").replace(path)
    return out


def local_average(f: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """(n, h*w, C) -> each token averaged with its 3 x 3 grid neighbours (borders: the existing
    ones), l2-normalised (PatchCore's locally aware features)."""
    n, _, c = f.shape
    x = f.reshape(n, *grid, c).permute(0, 3, 1, 2)
    x = F.avg_pool2d(x, 3, stride=1, padding=1, count_include_pad=False)
    return unit(x.permute(0, 2, 3, 1).reshape(n, -1, c))


def search(bank_feats: torch.Tensor, test_feats: torch.Tensor) -> torch.Tensor:
    """(n_test, N) k = 1 cosine distances of every test patch to the bank (exact fp32)."""
    bank = MemoryBank().fit(bank_feats.reshape(-1, bank_feats.shape[-1]))
    return torch.cat([bank.score(test_feats[i:i + 8]) for i in range(0, test_feats.shape[0], 8)])


def patchcore_score(test: torch.Tensor, dists: torch.Tensor, bank: torch.Tensor, b: int = 9) -> torch.Tensor:
    """anomalib's PatchCore image score per test image: the max patch's Euclidean distance times
    1 - softmax(distances to the b bank neighbours of its nearest bank patch)[0]."""
    bank = bank.reshape(-1, bank.shape[-1])
    out = []
    for f, d in zip(test, dists):
        p = int(d.argmax())
        q = f[p]
        m_star = int((bank @ q).argmax())
        support = (bank @ bank[m_star]).topk(min(b, bank.shape[0])).indices  # m* first (its own nearest)
        eu = (2.0 - 2.0 * (bank[support] @ q)).clamp_min(0.0).sqrt()
        w = 1.0 - torch.softmax(eu, 0)[0]
        out.append(float(w) * float((2.0 * d[p]).clamp_min(0.0).sqrt()))
    return torch.tensor(out, dtype=torch.float64)


def foreground(test7: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """(n, h*w) bool foreground patches per image (module docstring: first principal component of
    the image's own block-7 features, centre side kept, dilated by one patch)."""
    h, w = grid
    centre = torch.zeros(h, w, dtype=torch.bool)
    centre[h // 4:h - h // 4, w // 4:w - w // 4] = True
    masks = []
    for f in test7:
        x = f - f.mean(0)
        pc = torch.linalg.svd(x, full_matrices=False).Vh[0]
        m = (x @ pc > 0).reshape(h, w)
        if m[centre].float().mean() < 0.5:
            m = ~m
        m = F.max_pool2d(m[None, None].float(), 3, stride=1, padding=1)[0, 0] > 0
        masks.append(m.reshape(-1))
    return torch.stack(masks)


def metrics(ds, truth, per_size: list[tuple[torch.Tensor, tuple[int, int]]], scores: np.ndarray, bins) -> dict:
    """Image AUROC / pixel AUROC / AU-PRO (%): maps of every size (bilinear + sigma 4 px at the stored
    size) averaged, as evaluate does."""
    labels = np.array([s.label for s in ds.test])
    pix = PixelMetrics(bins=bins, value_range=(0.0, 2.0))
    for i, (hw, gt) in enumerate(truth):
        if gt is None:
            continue
        maps = [distance_map(d[i:i + 1], grid, hw, 4.0)[0].numpy() for d, grid in per_size]
        pix.update(sum(maps) / len(maps), gt)
    img = image_auroc(scores, labels) if 0 < labels.sum() < len(labels) else float("nan")
    return {"image_auroc": 100 * img, "pixel_auroc": 100 * pix.pixel_auroc(), "au_pro": 100 * pix.au_pro()}


def evaluate_dataset(item: str, backbone, sizes, max_train, cache: Path, bins) -> tuple[dict, dict]:
    kind, cat = item.split(":")
    ds = build_dataset(kind, DATA_ROOTS[kind], cat)
    train = list(ds.train)[:max_train] if max_train else list(ds.train)
    truth = ground_truth(ds)
    per: dict = {v: [] for v in VARIANTS}  # variant -> [(dists, grid, scores)] per size
    info = {"train": len(train), "test": len(ds.test), "seconds": {}}
    for size in sizes:
        c = cached_features(ds, item, train, backbone, size, cache)
        grid = tuple(c["grid"].tolist())
        t0 = time.perf_counter()
        tr7, te7 = c["train"][7], c["test"][7]
        d = search(tr7, te7)
        per["default"].append((d, grid, top_fraction_mean(d).double()))
        cat_tr = torch.cat([c["train"][b] for b in BLOCKS], -1)
        cat_te = torch.cat([c["test"][b] for b in BLOCKS], -1)
        dc = search(cat_tr, cat_te)
        per["blocks 6+7+8 concatenated"].append((dc, grid, top_fraction_mean(dc).double()))
        dl = search(local_average(tr7, grid), local_average(te7, grid))
        per["block 7, 3x3 neighbourhood average"].append((dl, grid, top_fraction_mean(dl).double()))
        df = torch.minimum(d, search(c["flip"][7], te7))
        per["flip-augmented bank"].append((df, grid, top_fraction_mean(df).double()))
        per["PatchCore re-weighted image score"].append((d, grid, patchcore_score(te7, d, unit(tr7))))
        dm = d * foreground(te7, grid)
        per["background masking"].append((dm, grid, top_fraction_mean(dm).double()))
        info["seconds"][int(c["size"])] = {"features": float(c["seconds"]), "searches": time.perf_counter() - t0}
        del c
    res = {}
    for v, rows in per.items():
        scores = (sum(r[2] for r in rows) / len(rows)).numpy()
        res[v] = metrics(ds, truth, [(r[0], r[1]) for r in rows], scores, bins)
        m = res[v]
        print(f"{item:14s} {v:40s} {m['image_auroc']:6.2f} {m['pixel_auroc']:6.2f} {m['au_pro']:6.2f}", flush=True)
    return res, info


KEYS = ("image_auroc", "pixel_auroc", "au_pro")


def matching_peers(res: dict, peer_rows: list[dict]) -> dict[str, list[dict]]:
    """Per data set of ``res``: the rows of ``results/peers.json`` measured on the same images (same data
    set kind and category, same number of training images, all test images)."""
    out: dict[str, list[dict]] = {}
    for item in res["datasets"]:
        kind, cat = item.split(":")
        out[item] = [r for r in peer_rows if r.get("dataset_kind", "mvtec") == kind and r["category"] == cat
                     and r["settings"]["train_images"] == res["info"][item]["train"]]
    return out


def peer_section(res: dict, peer_rows: list[dict]) -> list[str]:
    """Markdown: today's default beside each peer on every data set where the peer was measured on the same
    images, and per peer, on how many data sets the default is ahead (no metric more than 0.05 points below,
    one more than 0.05 above) and where it is behind (one more than 0.05 below). Empty when no peer row matches."""
    per = matching_peers(res, peer_rows)
    names = [n for n in res["datasets"] if per[n]]
    if not names:
        return []
    peers = list(dict.fromkeys(r["name"] for n in names for r in per[n]))
    base = res["variants"]["default"]
    lines = ["", "## Today's default beside the training-free peers", "",
             "Peer rows from `results/peers.json` (`benchmarks/peers.py`, anomalib's models with our metric code; "
             "each row's command and machine are there), matched to these data sets by kind, category and number "
             "of training images; measured in their own runs, not in this one. Image / pixel AUROC / AU-PRO, %; "
             "'ahead' = no metric more than 0.05 points below the peer's and one more than 0.05 above (the rule "
             "for a new default, above); 'behind' = one more than 0.05 below; otherwise a tie.", "",
             "| method | " + " | ".join(names) + " |", "|---|" + "---|" * len(names),
             "| **ours, default** | " + " | ".join(
                 f"{base[n]['image_auroc']:.2f} / {base[n]['pixel_auroc']:.2f} / {base[n]['au_pro']:.2f}"
                 for n in names) + " |"]
    verdicts = []
    for p in peers:
        cells, ahead, behind = [], [], []
        for n in names:
            r = next((r for r in per[n] if r["name"] == p), None)
            if r is None:
                cells.append("not run")
                continue
            cells.append(" / ".join(f"{r[k]:.2f}" for k in KEYS))
            b = base[n]
            if all(b[k] >= r[k] - 0.05 for k in KEYS) and any(b[k] > r[k] + 0.05 for k in KEYS):
                ahead.append(n)
            if any(b[k] < r[k] - 0.05 for k in KEYS):
                behind.append(n)
        lines.append(f"| {p} | " + " | ".join(cells) + " |")
        verdicts.append(f"- against {p}: ahead on {len(ahead)} of "
                        f"{sum(1 for n in names if any(r['name'] == p for r in per[n]))} data sets"
                        f"{' (' + ', '.join(ahead) + ')' if ahead else ''}; behind on at least one metric on "
                        f"{', '.join(behind) if behind else 'none'}.")
    return lines + [""] + verdicts


def render(res: dict, peer_rows: list[dict] | None = None) -> str:
    names = list(res["datasets"])
    lines = ["# kNN extension: quality candidates on every data set (issue 16)", "",
             f"Generated {res['date']} by `benchmarks/knn_quality.py` (total {res['total_s']:.0f} s).", "",
             f"Command: `{res['command']}`", "", f"Machine: {res['machine']}; load average (1 min) "
             f"{res['load_before'][0]:.1f} at start, {res['load_after'][0]:.1f} at the end.", "",
             "Backbone `dinov2-s14-offline`, sizes " + " + ".join(map(str, res["sizes"])) + " px averaged, k = 1, exact "
             "fp32 search, maps bilinear + Gaussian sigma 4 px at the stored size. Training images: " +
             ", ".join(f"{n} {i['train']}" for n, i in res["info"].items()) + " (first N); test images: all (" +
             ", ".join(f"{n} {i['test']}" for n, i in res["info"].items()) + "). Candidates: module docstring of "
             "`benchmarks/knn_quality.py`. Image AUROC / pixel AUROC / AU-PRO (FPR <= 0.3), %. A candidate "
             "*helps* on a data set when no metric drops by more than 0.05 points and at least one rises by more.", "",
             "| candidate | " + " | ".join(names) + " | helps on |", "|---|" + "---|" * len(names) + "---|"]
    base = res["variants"]["default"]
    for v, per in res["variants"].items():
        cells, helps = [], 0
        for n in names:
            m, b = per[n], base[n]
            cells.append(f"{m['image_auroc']:.2f} / {m['pixel_auroc']:.2f} / {m['au_pro']:.2f}")
            keys = ("image_auroc", "pixel_auroc", "au_pro")
            helps += all(m[k] >= b[k] - 0.05 for k in keys) and any(m[k] > b[k] + 0.05 for k in keys)
        lines.append(f"| {'**default**' if v == 'default' else v} | " + " | ".join(cells) +
                     f" | {'—' if v == 'default' else f'{helps}/{len(names)}'} |")
    lines += ["", "Seconds per (data set, size): features of blocks 6-8 for train + flipped train + test (cached "
              "afterwards), then all candidates' searches: " + "; ".join(
                  f"{n}@{s} {t['features']:.0f} + {t['searches']:.0f}" for n, i in res["info"].items()
                  for s, t in i["seconds"].items()) + "."]
    lines += peer_section(res, peer_rows or [])
    return "\n".join(lines) + "\n"


def load_peer_rows(path: Path) -> list[dict]:
    """Rows of ``results/peers.json`` (none when the file is absent)."""
    return json.loads(path.read_text())["rows"] if path.is_file() else []


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--datasets", nargs="+", default=list(DATASETS))
    ap.add_argument("--sizes", nargs="+", type=int, default=list(Config().evaluate.knn_sizes))
    ap.add_argument("--max-train", type=int, default=None, help="first N training images of each data set")
    ap.add_argument("--cache", type=Path, default=ROOT / "runs" / "knn_quality")
    ap.add_argument("--out", type=Path, default=ROOT / "results" / "knn_quality.md")
    ap.add_argument("--peers-json", type=Path, default=ROOT / "results" / "peers.json",
                    help="peer rows to show beside the default (benchmarks/peers.py)")
    ap.add_argument("--report", action="store_true",
                    help="re-render the Markdown from the JSON beside --out and --peers-json; computes nothing")
    args = ap.parse_args(argv)
    if args.report:
        res = json.loads(args.out.with_suffix(".json").read_text())
        atomic_write_text(args.out, render(res, load_peer_rows(args.peers_json)))
        print(f"wrote {args.out}")
        return 0
    t_start = time.perf_counter()
    load_before = os.getloadavg()
    backbone = build_backbone("dinov2-s14-offline").eval()
    bins = Config().evaluate.pixel_bins
    res: dict = {"datasets": [], "variants": {v: {} for v in VARIANTS}, "info": {}, "sizes": args.sizes,
                 "load_before": load_before,
                 "command": ".venv/bin/python -m benchmarks.knn_quality " + " ".join(
                     shlex.quote(a) for a in (argv if argv is not None else sys.argv[1:])),
                 "machine": machine("cpu")}
    for item in args.datasets:
        per, info = evaluate_dataset(item, backbone, args.sizes, args.max_train, args.cache, bins)
        res["datasets"].append(item)
        res["info"][item] = info
        for v, m in per.items():
            res["variants"][v][item] = m
        res.update(date=dt.datetime.now().isoformat(timespec="seconds"), total_s=time.perf_counter() - t_start,
                   load_after=os.getloadavg())
        atomic_write_text(args.out.with_suffix(".json"), json.dumps(res, indent=2) + "\n")
        atomic_write_text(args.out, render(res, load_peer_rows(args.peers_json)))
    print(render(res, load_peer_rows(args.peers_json)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
