"""Speed and scaling of the kNN extension on a plain CPU, against anomalib's AnomalyDINO (not a test).

Measures, on MVTec bottle, the wall time of *bank + inference* (images read and resized, patch
features of every training image, memory bank, patch features + nearest-neighbour search + pixel
maps of every test image; the metrics are computed afterwards and not timed) for

* ``ours``: the kNN extension as ``knn_fusion.KnnExtension`` runs it with ``fusion="knn"`` (offline
  ViT-S/14 block 7, sizes 224 + 448, k = 1, exact fp32 search, maps bilinear + Gaussian sigma 4 px
  at the stored resolution, scores and maps averaged over the sizes), with its phases timed
  separately (the profile);
* ``anomalydino``: anomalib's ``AnomalyDINOModel`` exactly as ``benchmarks/peers.py`` builds it
  (offline ViT-S/14 block 7, 252 px, k = 1, fit = training-mode forward + ``fit``, inference =
  eval-mode forward), its images read and resized inside the timed region as ours are.

Each measurement runs in a fresh child process (``--child``), so its peak resident memory
(``ru_maxrss``) is its own. The two methods alternate in ``--rounds`` rounds and every row records
the load averages before and after it: the CPU is shared with other jobs, so compare the ratio
within a round, not absolute seconds across runs.

Scaling (``--scaling N ...``): ours with N training images (the first N of bottle's 209; N > 209
adds horizontally flipped copies of the training images, a larger bank of the same kind) at a
fixed test set (the first ``--scaling-test`` test images). Feature extraction costs the same for
every image, so it is measured ONCE per image (one process extracts and times the features of all
max(N) training and the test images at both sizes and caches them in ``--cache``); then each N runs
in its own process: bank fit on the first N images' cached features + NN search + maps of the test
images, timed, with its peak memory. Time(N) = N x (mean measured feature seconds per training
image) + test features + fit(N) + search(N) + maps: the feature term is linear by construction,
what the table tests is that the search and the memory grow no faster than the bank.

Writes ``results/knn_speed.{md,json}`` (atomically). Example (2 CPU cores shared with other jobs, ~30 min)::

    .venv/bin/python -m benchmarks.knn_speed --rounds 1 --train 50 --scaling 50 100 209 418 --scaling-test 20
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import resource
import shlex
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]

from apmask_lib.core.files import atomic_write_text  # noqa: E402
from apmask_lib.core.machine import cpu_flags, cpu_model  # noqa: E402

DATA_ROOT = "../shared/data/mvtec_ad"


def training_images(ds, n: int) -> list:
    """The first ``n`` training samples as (sample, flipped) pairs: n > len(train) appends
    horizontally flipped copies (a larger bank of the same kind of patches)."""
    base = list(ds.train)
    if not 1 <= n <= 2 * len(base):
        raise ValueError(f"--train/--scaling must lie in [1, {2 * len(base)}] for {len(base)} training images, got {n}")
    return [(s, False) for s in base[:n]] + [(s, True) for s in base[:max(0, n - len(base))]]


def load(ds, item) -> np.ndarray:
    sample, flip = item
    im = ds.image(sample)
    return np.ascontiguousarray(im[:, ::-1]) if flip else im


def batches(items: Sequence, size: int):
    for i in range(0, len(items), size):
        yield items[i:i + size]


def run_ours(ds, train, test, sizes=(224, 448), batch_size: int = 8, feature_bf16: bool = False,
             search: str = "exact") -> dict[str, Any]:
    """Bank + inference of the kNN extension; returns timings per phase, scores and maps."""
    from apmask_lib.knn.scoring import KnnScorer, average_outputs
    from apmask_lib.weights import build_backbone

    backbone = build_backbone("dinov2-s14-offline").eval()
    t = {"train_features_s": 0.0, "fit_s": 0.0, "test_features_s": 0.0, "search_s": 0.0, "readout_s": 0.0}
    outputs, banks = [], {}
    t_all = time.perf_counter()
    for size in sizes:
        sc = KnnScorer(backbone, 7, size, feature_bf16=feature_bf16, search=search)
        t0 = time.perf_counter()
        feats = [sc.features([load(ds, it) for it in chunk]) for chunk in batches(train, batch_size)]
        t["train_features_s"] += time.perf_counter() - t0
        t0 = time.perf_counter()
        sc.fit(feats)
        del feats
        t["fit_s"] += time.perf_counter() - t0
        banks[sc.size] = len(sc.bank)
        outs = []
        for chunk in batches(test, batch_size):
            images = [load(ds, (s, False)) for s in chunk]
            t0 = time.perf_counter()
            f = sc.features(images)
            t1 = time.perf_counter()
            d = sc.bank.score(f, sc.k)
            t2 = time.perf_counter()
            outs.append(sc.readout(d, [im.shape[:2] for im in images]))
            t["test_features_s"] += t1 - t0
            t["search_s"] += t2 - t1
            t["readout_s"] += time.perf_counter() - t2
        outputs.append(outs)
        del sc
    merged = [average_outputs([o[j] for o in outputs]) for j in range(len(outputs[0]))]
    t["total_s"] = time.perf_counter() - t_all
    t["other_s"] = t["total_s"] - sum(v for k, v in t.items() if k != "total_s")  # image reading and resizing
    scores = np.concatenate([m.scores for m in merged])
    maps = [mp for m in merged for mp in m.maps]
    return {"timings": t, "bank_patches": banks, "scores": scores, "maps": maps}


def run_anomalydino(ds, train, test, size: int = 252, batch_size: int = 8) -> dict[str, Any]:
    """Bank + inference of anomalib's AnomalyDINO as benchmarks/peers.py configures it."""
    from benchmarks.peers import build_anomalydino

    peer = build_anomalydino(7, size)
    t_all = time.perf_counter()
    with torch.no_grad():
        peer.model.train()
        for chunk in batches(train, batch_size):
            peer.model(peer.preprocess([load(ds, it) for it in chunk]))
        peer.finish_fit()
        t_fit = time.perf_counter() - t_all
        peer.model.eval()
        scores, maps = [], []
        for s in test:  # one image at a time, as peers.py (the (patches x bank) matrix per image)
            out = peer.model(peer.preprocess([load(ds, (s, False))]))
            scores.append(float(out.pred_score.reshape(-1)[0]))
            maps.append(out.anomaly_map.reshape(out.anomaly_map.shape[-2:]).float().numpy())
    total = time.perf_counter() - t_all
    return {"timings": {"fit_s": t_fit, "inference_s": total - t_fit, "total_s": total},
            "bank_patches": {size: int(peer.model.memory_bank.shape[0])}, "scores": np.array(scores), "maps": maps}


def quality(ds, test, scores, maps, method: str) -> dict[str, float]:
    """Image AUROC / pixel AUROC / AU-PRO (%) as knn_readout.py (ours) and peers.py (anomalib) score them."""
    from apmask_lib.config import Config
    from apmask_lib.data.ground_truth import pixel_ground_truth
    from apmask_lib.metrics import PixelMetrics, image_auroc

    labels = np.array([s.label for s in test])
    if method == "anomalydino":
        from benchmarks.peers import peer_metrics

        import copy

        shapes = [ds.image(s).shape[:2] for s in test]
        sub = copy.copy(ds)
        sub.test = list(test)
        m = peer_metrics(sub, scores, maps, shapes)
        return {k: m[k] for k in ("image_auroc", "pixel_auroc", "au_pro")}
    pix = PixelMetrics(bins=Config().evaluate.pixel_bins, value_range=(0.0, 2.0))
    for s, mp in zip(test, maps):
        gt = pixel_ground_truth(ds, s, mp.shape)
        if gt is not None:
            pix.update(mp, gt)
    img = image_auroc(scores, labels) if 0 < labels.sum() < len(labels) else float("nan")
    return {"image_auroc": 100 * img, "pixel_auroc": 100 * pix.pixel_auroc(), "au_pro": 100 * pix.au_pro()}


def extract_cache(ds, train, test, path: Path, sizes=(224, 448), batch_size: int = 8) -> dict[str, Any]:
    """Features of ``train`` and ``test`` at every size, timed per image and saved to ``path``."""
    from apmask_lib.knn.scoring import KnnScorer
    from apmask_lib.weights import build_backbone

    backbone = build_backbone("dinov2-s14-offline").eval()
    out: dict[str, Any] = {"train_s": [], "test_s": [], "shapes": [list(ds.image(s).shape[:2]) for s in test]}
    for size in sizes:
        sc = KnnScorer(backbone, 7, size)
        for part, items in (("train", train), ("test", [(s, False) for s in test])):
            feats, secs = [], []
            for chunk in batches(items, batch_size):
                t0 = time.perf_counter()
                feats.append(sc.features([load(ds, it) for it in chunk]))
                secs += [(time.perf_counter() - t0) / len(chunk)] * len(chunk)
            out[f"{part}_{sc.size}"] = torch.cat(feats)
            out[f"{part}_s"].append(secs)
    out["train_s"] = np.sum(out["train_s"], axis=0).tolist()  # per image, both sizes together
    out["test_s"] = np.sum(out["test_s"], axis=0).tolist()
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({k: v for k, v in out.items() if torch.is_tensor(v)}, str(path) + ".tmp")
    Path(str(path) + ".tmp").replace(path)
    return {k: v for k, v in out.items() if not torch.is_tensor(v)}


def search_cached(path: Path, n: int, shapes: Sequence[tuple[int, int]], sizes=(224, 448), batch_size: int = 8) -> dict[str, Any]:
    """Bank fit on the first ``n`` cached training images + search + maps of the cached test images."""
    from apmask_lib.knn.scoring import KnnScorer
    from apmask_lib.weights import build_backbone

    cache = torch.load(path, weights_only=True, mmap=True)
    backbone = build_backbone("dinov2-s14-offline").eval()
    t = {"fit_s": 0.0, "search_s": 0.0, "readout_s": 0.0}
    banks = {}
    for size in sizes:
        sc = KnnScorer(backbone, 7, size)
        train = cache[f"train_{sc.size}"]
        if n > train.shape[0]:
            raise ValueError(f"{path} holds {train.shape[0]} training images, {n} requested")
        t0 = time.perf_counter()
        sc.fit(train[:n].clone())
        t["fit_s"] += time.perf_counter() - t0
        banks[sc.size] = len(sc.bank)
        test = cache[f"test_{sc.size}"].clone()
        for i in range(0, test.shape[0], batch_size):
            t0 = time.perf_counter()
            d = sc.bank.score(test[i:i + batch_size], sc.k)
            t1 = time.perf_counter()
            sc.readout(d, shapes[i:i + d.shape[0]])
            t["search_s"] += t1 - t0
            t["readout_s"] += time.perf_counter() - t1
    return {"timings": t, "bank_patches": banks}


def backbone_bench(sizes=(224, 448), batch_size: int = 8, repeats: int = 3) -> dict[str, Any]:
    """Milliseconds per image of the block-7 features (offline ViT-S/14, batch ``batch_size``, random
    inputs) at each size: fp32, bf16 autocast, and the bf16 copy of the backbone that
    ``KnnScorer(feature_bf16=True)`` uses on the CPU (median of ``repeats`` timed batches after one
    warm-up batch)."""
    from apmask_lib.knn.scoring import bf16_copy, patch_features
    from apmask_lib.weights import build_backbone

    backbone = build_backbone("dinov2-s14-offline").eval()
    out: dict[str, Any] = {}
    for size in sizes:
        x = torch.rand(batch_size, 3, size, size, generator=torch.Generator().manual_seed(0))
        runs = {"fp32": lambda: patch_features(backbone, x, 7),
                "bf16 autocast": lambda: _autocast(lambda: patch_features(backbone, x, 7)),
                "bf16 copy": lambda: patch_features(bf16_copy(backbone), x.bfloat16(), 7)}
        for name, fn in runs.items():
            fn()
            secs = []
            for _ in range(repeats):
                t0 = time.perf_counter()
                fn()
                secs.append(time.perf_counter() - t0)
            out[f"{name} @ {size}"] = 1000.0 * float(np.median(secs)) / batch_size
    return out


def _autocast(fn):
    with torch.autocast("cpu", dtype=torch.bfloat16):
        return fn()


def child(spec: dict[str, Any]) -> dict[str, Any]:
    """One measurement in this (fresh) process; ``spec``: method, train, test, metrics, feature_bf16."""
    from apmask_lib.data import build_dataset

    ds = build_dataset("mvtec", DATA_ROOT, "bottle")
    train = training_images(ds, spec["train"])
    test = list(ds.test)[:spec["test"]] if spec.get("test") else list(ds.test)
    load_before = os.getloadavg()
    if spec["method"] == "backbone":
        res = {"timings": backbone_bench(), "bank_patches": {}}
    elif spec["method"] == "extract":
        res = {"timings": extract_cache(ds, train, test, Path(spec["cache"])), "bank_patches": {}}
    elif spec["method"] == "search":
        res = search_cached(Path(spec["cache"]), spec["n"], [ds.image(s).shape[:2] for s in test])
    elif spec["method"] == "ours":
        res = run_ours(ds, train, test, feature_bf16=spec.get("feature_bf16", False), search=spec.get("search", "exact"))
    else:
        res = run_anomalydino(ds, train, test)
    row = {**spec, "n_train": len(train), "n_test": len(test), "timings": res["timings"],
           "bank_patches": res["bank_patches"], "load_before": load_before, "load_after": os.getloadavg(),
           "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0,
           "torch_threads": torch.get_num_threads()}
    if spec.get("metrics"):
        row["quality"] = quality(ds, test, res["scores"], res["maps"], spec["method"])
    return row


def measure(spec: dict[str, Any]) -> dict[str, Any]:
    """Run :func:`child` in a fresh process (own peak memory); returns its row."""
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    if spec.get("pinned"):  # the numerics `apmask` runs under by default (apmask_lib/core/repro.py: AVX2, 2 threads)
        from apmask_lib.core.repro import pipeline_env

        env = pipeline_env({k: v for k, v in env.items() if k != "APMASK_NUMERICS"})
    proc = subprocess.run([sys.executable, "-m", "benchmarks.knn_speed", "--child", json.dumps(spec)],
                          cwd=ROOT, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"child {spec} failed:\n{proc.stderr[-4000:]}")
    row = json.loads(proc.stdout.strip().splitlines()[-1])
    brief = {k: row[k] for k in ("method", "n_train", "n_test", "peak_rss_mb", "load_before", "load_after")}
    if row["method"] not in ("extract", "backbone"):
        brief |= {"timings": row["timings"], **({"quality": row["quality"]} if "quality" in row else {})}
    print(json.dumps(brief), flush=True)
    return row


def cpu_bf16_units() -> str:
    """The CPU's AVX-512 / bf16 matrix and vector units as /proc/cpuinfo lists them."""
    flags = cpu_flags()
    if not flags:
        return "CPU flags unknown"
    have = [f for f in ("avx512f", "avx512_bf16", "amx_bf16", "amx_tile") if f in flags]
    return "flags " + (", ".join(have) if have else "no AVX-512 / bf16 units")


def fmt_load(row) -> str:
    return f"{row['load_before'][0]:.1f} → {row['load_after'][0]:.1f}"


def variant(row) -> str:
    """How a row of ours ran: features fp32 / bf16 autocast, search exact fp32 / bf16-chosen."""
    return ("224 + 448 px, " + ("bf16 features (bf16 copy of the backbone)" if row.get("feature_bf16") else "fp32 features") + ", "
            + ("bf16 search + fp32 re-rank" if row.get("search") == "bf16" else "exact fp32 search"))


def render(res: dict[str, Any], cmd: str, machine: str) -> str:
    lines = ["# kNN extension: speed and scaling on the CPU", "",
             f"Generated {res['date']} by `python -m benchmarks.knn_speed` (total {res['total_s']:.0f} s for the last command).", "",
             f"Command(s), in order (each round's row records its own): `{cmd}`", "", f"Machine: {machine}.", "",
             "Bank + inference = wall time of reading and resizing the images, patch features of every training "
             "image, the memory bank, and features + nearest-neighbour search + pixel maps of every test image "
             "(metrics afterwards, not timed). Each row is a fresh process (peak memory = its `ru_maxrss`). "
             "Load averages (1 min, before → after) are given per row (about 2 = this benchmark's own two "
             "threads); ratios are taken within a round (the two methods run back to back).", ""]
    lines += [f"Note: {n}" for n in res.get("notes", [])] + ([""] if res.get("notes") else [])
    if res["rounds"]:
        r0 = res["rounds"][0][0]
        lines += [f"## Ours vs AnomalyDINO (anomalib), bottle, {r0['n_train']} training images, {r0['n_test']} test images",
                  "",
                  "| round | method | bank + inference | ratio ours / AnomalyDINO | image AUROC | pixel AUROC | AU-PRO | "
                  "each metric within 0.05 of exact | peak memory | load |", "|---|---|---|---|---|---|---|---|---|---|"]
        for i, rnd in enumerate(res["rounds"], 1):
            ad = next(r for r in rnd if r["method"] == "anomalydino")
            exact = next((r for r in rnd if r["method"] == "ours" and not r.get("feature_bf16")
                          and r.get("search", "exact") == "exact"), None)
            for r in rnd:
                q = r.get("quality", {})
                ratio = r["timings"]["total_s"] / ad["timings"]["total_s"]
                name = "AnomalyDINO (anomalib 2.7, 252 px)" if r["method"] == "anomalydino" else f"ours ({variant(r)})"
                same = "—" if r["method"] != "ours" or exact is None else (
                    "yes" if all(abs(q[k] - exact["quality"][k]) <= 0.05 for k in ("image_auroc", "pixel_auroc", "au_pro"))
                    else "no")
                lines.append(f"| {i} | {name} | {r['timings']['total_s']:.1f} s | {ratio:.2f} | "
                             f"{q.get('image_auroc', float('nan')):.2f} | {q.get('pixel_auroc', float('nan')):.2f} | "
                             f"{q.get('au_pro', float('nan')):.2f} | {same} | {r['peak_rss_mb']:.0f} MB | {fmt_load(r)} |")
        lines += ["", "Profile of ours (seconds per phase, from the rows above):", "",
                  "| round | train features | bank fit | test features | NN search | maps | image I/O + resize | total |",
                  "|---|---|---|---|---|---|---|---|"]
        for i, rnd in enumerate(res["rounds"], 1):
            for r in rnd:
                if r["method"] == "ours":
                    t = r["timings"]
                    lines.append(f"| {i}, {variant(r)} | "
                                 f"{t['train_features_s']:.1f} | {t['fit_s']:.2f} | {t['test_features_s']:.1f} | "
                                 f"{t['search_s']:.1f} | {t['readout_s']:.1f} | {t['other_s']:.1f} | {t['total_s']:.1f} |")
        lines.append("")
    if res.get("backbone"):
        runs = [("native (as above: AVX-512, AMX)", res["backbone"])]
        if res.get("backbone_pinned"):
            runs.append(("pinned (what `apmask` runs under by default: ATen / MKL / oneDNN on AVX2, "
                          "apmask_lib/core/repro.py)", res["backbone_pinned"]))
        t0 = runs[0][1]["timings"]
        sizes = sorted({int(k.rsplit("@", 1)[1]) for k in t0})
        names = list(dict.fromkeys(k.rsplit(" @", 1)[0] for k in t0))
        lines += ["## The backbone alone: block-7 features per image (offline ViT-S/14, batch 8, random inputs)", "",
                  "Milliseconds per image, median of 3 batches after a warm-up, one fresh process per numerics "
                  "setting (load " + ", ".join(fmt_load(b) for _, b in runs) + ").", "",
                  "| numerics | precision | " + " | ".join(f"{z} px" for z in sizes) + " |",
                  "|---|---|" + "---|" * len(sizes)]
        for label, b in runs:
            for n in names:
                lines.append(f"| {label} | {n} | " + " | ".join(f"{b['timings'][f'{n} @ {z}']:.0f} ms" for z in sizes) + " |")
        lines.append("")
    if res["scaling"]:
        n_test = res["scaling"][0]["n_test"]
        ext = res["scaling_features"]
        per_image = float(np.mean(ext["timings"]["train_s"]))
        lines += [f"## Scaling of ours with the number of training images (fixed test set: first {n_test} test images)",
                  "", f"Features (224 + 448 px) measured once per image: {per_image:.2f} s per training image "
                  f"(mean over {len(ext['timings']['train_s'])} images), {np.sum(ext['timings']['test_s']):.0f} s for the "
                  f"{n_test} test images (extraction process: peak memory {ext['peak_rss_mb']:.0f} MB, load "
                  f"{fmt_load(ext)}). Bank fit + NN search + maps measured per N in its own process; total = "
                  "N x features per image + test features + fit + search + maps.", "",
                  "| training images | bank patches (224 / 448 px) | total | features | bank fit | NN search | "
                  "search per bank patch | maps | peak memory (fit + search process) | load |",
                  "|---|---|---|---|---|---|---|---|---|---|"]
        for r in res["scaling"]:
            t = r["timings"]
            banks = list(r["bank_patches"].values())
            lines.append(f"| {r['n_train']}{' (209 + flips)' if r['n_train'] > 209 else ''} | "
                         f"{' / '.join(map(str, banks))} | {t['total_s']:.0f} s | "
                         f"{t['train_features_s'] + t['test_features_s']:.0f} s | {t['fit_s']:.1f} s | "
                         f"{t['search_s']:.1f} s | {1e6 * t['search_s'] / sum(banks):.1f} µs | {t['readout_s']:.1f} s | "
                         f"{r['peak_rss_mb']:.0f} MB | {fmt_load(r)} |")
        lines.append("")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--rounds", type=int, default=1, help="alternating rounds of ours vs AnomalyDINO (full bottle)")
    ap.add_argument("--train", type=int, default=209, help="training images in the rounds (subset: first N)")
    ap.add_argument("--bf16-features", action="store_true", help="also run ours with bf16 autocast features per round")
    ap.add_argument("--bf16-search", action="store_true",
                    help="also run ours with bf16 features AND the bf16 neighbour search (knn_distances search='bf16')")
    ap.add_argument("--note", default=None, help="a sentence about the conditions of this run, kept in the report")
    ap.add_argument("--backbone-bench", action="store_true",
                    help="also time the backbone alone per image: fp32, bf16 autocast, bf16 copy (224 and 448 px)")
    ap.add_argument("--scaling", nargs="*", type=int, default=[], help="training-set sizes for the scaling table")
    ap.add_argument("--scaling-test", type=int, default=20, help="fixed number of test images in the scaling table")
    ap.add_argument("--cache", type=Path, default=ROOT / "runs" / "knn_speed", help="scaling feature cache folder")
    ap.add_argument("--out", type=Path, default=ROOT / "results" / "knn_speed.md")
    ap.add_argument("--keep-scaling", action="store_true",
                    help="start the rounds afresh but keep the scaling table (and its command) of the existing JSON")
    ap.add_argument("--append", action="store_true",
                    help="keep the rounds (and, unless --scaling is given, the scaling rows) of the existing JSON and "
                         "add this run's rounds after them (odd-numbered rounds run ours first)")
    args = ap.parse_args(argv)
    if args.child is not None:
        print(json.dumps(child(json.loads(args.child)), default=float))
        return 0
    t_start = time.perf_counter()
    cmd = ".venv/bin/python -m benchmarks.knn_speed " + " ".join(
        shlex.quote(a) for a in (argv if argv is not None else sys.argv[1:]))
    machine = (f"{cpu_model()}, {os.cpu_count()} cores ({cpu_bf16_units()}), torch threads {torch.get_num_threads()}, "
               f"ATen CPU capability {torch.backends.cpu.get_cpu_capability()} (not pinned), device cpu")
    res: dict[str, Any] = {"rounds": [], "scaling": []}
    commands = [cmd]
    if args.append and args.out.with_suffix(".json").is_file():
        prev = json.loads(args.out.with_suffix(".json").read_text())
        res["rounds"] = prev["rounds"]
        if prev.get("backbone") and not args.backbone_bench:
            res["backbone"], res["backbone_pinned"] = prev["backbone"], prev.get("backbone_pinned")
        if not args.scaling:
            res["scaling"], res["scaling_features"] = prev["scaling"], prev.get("scaling_features")
        commands = prev.get("commands", [prev["command"]]) + [cmd]
    elif args.keep_scaling and args.out.with_suffix(".json").is_file():
        prev = json.loads(args.out.with_suffix(".json").read_text())
        res["scaling"], res["scaling_features"] = prev["scaling"], prev.get("scaling_features")
        commands = [c for c in prev.get("commands", [prev["command"]]) if "--scaling" in c] + [cmd]

    if args.append and args.out.with_suffix(".json").is_file():
        res["notes"] = json.loads(args.out.with_suffix(".json").read_text()).get("notes", [])
    if args.note:
        res.setdefault("notes", []).append(args.note)

    def write():
        res.update(date=dt.datetime.now().isoformat(timespec="seconds"), total_s=time.perf_counter() - t_start,
                   command=cmd, commands=commands, machine=machine)
        atomic_write_text(args.out.with_suffix(".json"), json.dumps(res, indent=2, default=float) + "\n")
        atomic_write_text(args.out, render(res, "`; `".join(commands), machine))

    for _ in range(args.rounds):
        i = len(res["rounds"])
        specs = [{"method": "anomalydino", "train": args.train, "metrics": True},
                 {"method": "ours", "train": args.train, "metrics": True}]
        if args.bf16_features:
            specs.append({"method": "ours", "train": args.train, "metrics": True, "feature_bf16": True})
        if args.bf16_search:
            specs.append({"method": "ours", "train": args.train, "metrics": True, "feature_bf16": True, "search": "bf16"})
        if i % 2:
            specs.reverse()
        res["rounds"].append([dict(measure(s), command=cmd) for s in specs])
        write()
    if args.backbone_bench:
        res["backbone"] = measure({"method": "backbone", "train": 1})
        res["backbone_pinned"] = measure({"method": "backbone", "train": 1, "pinned": True})
        write()
    if args.scaling:
        cache_path = (args.cache / "bottle_scaling.pt").resolve()
        # recorded in the rows: relative to the project root (the child runs there), so no machine path is committed
        cache = str(cache_path.relative_to(ROOT)) if cache_path.is_relative_to(ROOT) else str(cache_path)
        ext = measure({"method": "extract", "train": max(args.scaling), "test": args.scaling_test, "cache": cache})
        res["scaling_features"] = ext
        per_image = float(np.mean(ext["timings"]["train_s"]))
        test_s = float(np.sum(ext["timings"]["test_s"]))
        for n in args.scaling:
            row = measure({"method": "search", "train": n, "n": n, "test": args.scaling_test, "cache": cache})
            t = row["timings"]
            t["train_features_s"] = n * per_image
            t["test_features_s"] = test_s
            t["total_s"] = t["train_features_s"] + test_s + t["fit_s"] + t["search_s"] + t["readout_s"]
            res["scaling"].append(row)
            write()
    write()
    print(render(res, "`; `".join(commands), machine))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
