"""Memory-bank size and precision of the kNN extension: quality and time of coresets and fp16 banks
(a benchmark, not a test).

Patch features (block 7 of the offline ViT-S/14, as :class:`apmask_lib.knn.scoring.KnnScorer` computes
them, every training and test image, each size of ``--sizes``) are computed once per data set and cached
in ``--cache``; each bank variant then costs its coreset selection and its nearest-neighbour search.
Read-out as the extension's default (k = 1, top-1 % image score, maps bilinear + Gaussian sigma 4 px at
the stored size, averaged over the sizes), metrics by the evaluation's own code. Variants
(:data:`VARIANTS`): the full fp32 bank (reference), the full bank stored in fp16, greedy coresets of a
fraction of the patches (PatchCore: 1-10 %), a random sample for contrast, and caps on the patches per
bank (``evaluate.knn_bank_max``: small banks stay whole, large ones are cut to the cap).

Rows go to ``results/knn_bank.json`` per data set as they finish (resumable: a data set already there is
skipped unless ``--redo``); ``--report`` renders ``results/knn_bank.md``::

    .venv/bin/python -m benchmarks.knn_bank --datasets bottle brick nih
    .venv/bin/python -m benchmarks.knn_bank --report
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import time
from pathlib import Path

import torch

from benchmarks.common import DATASETS, ROOT, command, data_root, ensure_data, machine, versions
from benchmarks.knn_quality import metrics
from benchmarks.knn_readout import ground_truth

from apmask_lib.config import Config
from apmask_lib.core.files import atomic_write_text
from apmask_lib.data import build_dataset
from apmask_lib.knn.bank import MemoryBank
from apmask_lib.knn.model import DEFAULT_LAYER, truncated_backbone
from apmask_lib.knn.scoring import KnnScorer, top_fraction_mean
from apmask_lib.weights import build_backbone

JSON = ROOT / "results" / "knn_bank.json"
MD = ROOT / "results" / "knn_bank.md"
CACHE = ROOT / "runs" / "knn_bank"
#: name -> MemoryBank settings (coreset fraction, method, cap, dtype)
VARIANTS = {
    "full, fp32 (reference)": dict(coreset=1.0, max_patches=None, dtype="fp32"),
    "full, fp16": dict(coreset=1.0, max_patches=None, dtype="fp16"),
    "greedy 25 %, fp16": dict(coreset=0.25, max_patches=None, dtype="fp16"),
    "greedy 10 %, fp16": dict(coreset=0.1, max_patches=None, dtype="fp16"),
    "greedy 1 %, fp16": dict(coreset=0.01, max_patches=None, dtype="fp16"),
    "random 10 %, fp16": dict(coreset=0.1, coreset_method="random", max_patches=None, dtype="fp16"),
    "cap 50k, fp16": dict(coreset=1.0, max_patches=50_000, dtype="fp16"),
    "cap 20k, fp16": dict(coreset=1.0, max_patches=20_000, dtype="fp16"),
    "cap 10k, fp16": dict(coreset=1.0, max_patches=10_000, dtype="fp16"),
}
KEYS = ("image_auroc", "pixel_auroc", "au_pro")


@torch.no_grad()
def features(ds, name: str, backbone, size: int, batch_size: int = 8) -> dict:
    """{"train": (n, N, C), "test": (m, N, C), "grid", "size", "seconds"} at one size, cached."""
    sc = KnnScorer(backbone, DEFAULT_LAYER, size)
    path = CACHE / f"{name}_{len(ds.train)}_{len(ds.test)}_{sc.size}.pt"
    if path.is_file():
        return torch.load(path, weights_only=True)
    t0 = time.perf_counter()
    out = {"grid": torch.tensor(sc.grid), "size": torch.tensor(sc.size)}
    for part, samples in (("train", list(ds.train)), ("test", list(ds.test))):
        out[part] = torch.cat([sc.features([ds.image(s) for s in samples[i:i + batch_size]])
                               for i in range(0, len(samples), batch_size)])
    out["seconds"] = torch.tensor(time.perf_counter() - t0)
    CACHE.mkdir(parents=True, exist_ok=True)
    torch.save(out, str(path) + ".tmp")
    Path(str(path) + ".tmp").replace(path)
    return out


def run_variant(per_size: list[dict], settings: dict, seed: int = 0) -> tuple[list, dict]:
    """Fit the bank of every size with ``settings``, search the test patches; the distances per size and
    the timings / bank sizes."""
    out, info = [], {"fit_s": 0.0, "search_s": 0.0, "bank_patches": [], "bank_mb": 0.0}
    for c in per_size:
        t0 = time.perf_counter()
        bank = MemoryBank(seed=seed, **settings).fit(c["train"])
        info["fit_s"] += time.perf_counter() - t0
        t0 = time.perf_counter()
        d = torch.cat([bank.score(c["test"][i:i + 8]) for i in range(0, c["test"].shape[0], 8)])
        info["search_s"] += time.perf_counter() - t0
        info["bank_patches"].append(len(bank))
        info["bank_mb"] += bank.features.numel() * bank.features.element_size() / 2**20
        out.append((d, tuple(c["grid"].tolist())))
    return out, info


def run_dataset(name: str, sizes, backbone, bins) -> dict:
    kind, category = DATASETS[name]
    ensure_data(name)
    ds = build_dataset(kind, data_root(kind), category)
    t0 = time.perf_counter()
    per_size = [features(ds, name, backbone, s) for s in sizes]
    row = {"dataset": name, "train": len(ds.train), "test": len(ds.test), "sizes": [int(c["size"]) for c in per_size],
           "bank_fitted": [int(c["train"].shape[0] * c["train"].shape[1]) for c in per_size],
           "features_s": float(sum(float(c["seconds"]) for c in per_size)), "variants": {},
           "load_before": os.getloadavg()}
    truth = ground_truth(ds)
    for v, settings in VARIANTS.items():
        dists, info = run_variant(per_size, settings)
        scores = (sum(top_fraction_mean(d).double() for d, _ in dists) / len(dists)).numpy()
        info.update(metrics(ds, truth, dists, scores, bins))
        row["variants"][v] = info
        print(f"{name:8s} {v:26s} " + " ".join(f"{info[k]:6.2f}" for k in KEYS) +
              f"  fit {info['fit_s']:6.1f} s  search {info['search_s']:6.1f} s  {info['bank_patches']}", flush=True)
    row.update(seconds=time.perf_counter() - t0, load_after=os.getloadavg(),
               date=dt.datetime.now().isoformat(timespec="seconds"))
    return row


def render(res: dict) -> str:
    rows = res["rows"]
    names = [r["dataset"] for r in rows]
    lines = ["# kNN extension: bank size and precision (coreset, fp16)", "",
             f"Command(s): {'; '.join(f'`{c}`' for c in res['commands'])}", "",
             f"Machine: {res['machine']}; {res['versions']}.", "",
             "Block 7 of the offline ViT-S/14, sizes " + " + ".join(map(str, rows[0]["sizes"])) + " px averaged, "
             "k = 1, exact search in fp32 arithmetic, maps bilinear + Gaussian sigma 4 px at the stored size. All "
             "training and test images: " + ", ".join(f"{r['dataset']} {r['train']} / {r['test']}" for r in rows) +
             "; bank patches before any coreset (per size): " + ", ".join(
                 f"{r['dataset']} {' / '.join(map(str, r['bank_fitted']))}" for r in rows) + ". Image AUROC / pixel "
             "AUROC / AU-PRO (FPR <= 0.3), %; Δ = the largest drop of the three against the full fp32 bank "
             "(points). Fit = coreset selection + storage, search = all test patches against the bank, seconds "
             "(features not included: " + ", ".join(f"{r['dataset']} {r['features_s']:.0f} s" for r in rows) +
             ", computed once and cached).", "",
             "| bank | " + " | ".join(names) + " | worst Δ | MB (per data set) |",
             "|---|" + "---|" * len(names) + "---|---|"]
    for v in VARIANTS:
        cells, worst, mbs = [], 0.0, []
        for r in rows:
            m, ref = r["variants"][v], r["variants"]["full, fp32 (reference)"]
            drop = max(ref[k] - m[k] for k in KEYS)
            worst = max(worst, drop)
            cells.append(" / ".join(f"{m[k]:.2f}" for k in KEYS) +
                         f" (Δ {drop:+.2f}; fit {m['fit_s']:.1f} s, search {m['search_s']:.1f} s)")
            mbs.append(f"{m['bank_mb']:.0f}")
        lines.append(f"| {v} | " + " | ".join(cells) + f" | {worst:.2f} | {' / '.join(mbs)} |")
    lines += ["", "Load average (1 min) before → after each data set: " + ", ".join(
        f"{r['dataset']} {r['load_before'][0]:.1f} → {r['load_after'][0]:.1f}" for r in rows) +
        " (2 = this benchmark's own two threads)."]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--datasets", nargs="+", default=["bottle", "brick", "nih"], choices=list(DATASETS))
    ap.add_argument("--sizes", nargs="+", type=int, default=list(Config().evaluate.knn_sizes))
    ap.add_argument("--redo", action="store_true", help="measure data sets already in the JSON again")
    ap.add_argument("--report", action="store_true", help="only render results/knn_bank.md from the JSON")
    args = ap.parse_args(argv)
    res = json.loads(JSON.read_text()) if JSON.is_file() else {"rows": [], "commands": []}
    if not args.report:
        torch.manual_seed(0)
        backbone = truncated_backbone(build_backbone("dinov2-s14-offline"), DEFAULT_LAYER)
        res["commands"] = list(dict.fromkeys(res["commands"] + [command("knn_bank", argv)]))
        res.update(machine=machine("cpu"), versions=versions())
        for name in args.datasets:
            if not args.redo and any(r["dataset"] == name for r in res["rows"]):
                print(f"{name}: in {JSON.name} already (--redo measures it again)")
                continue
            row = run_dataset(name, args.sizes, backbone, Config().evaluate.pixel_bins)
            res["rows"] = [r for r in res["rows"] if r["dataset"] != name] + [row]
            atomic_write_text(JSON, json.dumps(res, indent=1) + "\n")
    atomic_write_text(MD, render(res))
    print(f"wrote {MD}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
