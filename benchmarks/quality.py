"""Quality on real MVTec AD bottle: the paper method vs. the kNN extension (not a test).

Rows (each mean ± SE over ``--seeds``, image AUROC / pixel AUROC / AU-PRO in %, timings):

1. **paper method**: APMask pre-training + fine-tuning on attention-guided synthetic anomalies +
   6-scale evaluation with the paper's hyper-parameters, but a SHORTENED schedule
   (``--pretrain-epochs``, ``--finetune-epochs``; the paper trains 300 + 100 epochs, which needs a
   GPU). Warm-up epochs are scaled by the same factor (paper: 10 of 300 and 10 of 100).
2. **kNN (training-free)**: AnomalyDINO-style patch kNN inside our pipeline, on the untrained
   offline backbone's block ``--knn-layer`` tokens at ``--knn-size`` px
   (``evaluate.knn_backbone=init``; :mod:`apmask_lib.knn.scoring`).
3. **apmask + kNN fused** (the EXTENSION): z-normalised kNN + fine-tuned detector, statistics from
   held-out NORMAL training images only (:mod:`apmask_lib.evaluate.stage`, ``evaluate.fusion=fused``).

All three come from ONE evaluation per seed (``evaluate.knn_layer`` set): the paper row is that
evaluation's ``methods.paper`` entry, identical to an evaluation without the extension
(tests/test_knn.py checks this). Peer and paper figures are quoted for reference, not re-measured.

Prints the table and writes it, with the exact command, the machine and the versions, to
``results/quality.md`` (atomically). Runs go to ``runs/quality/<dataset>_<category>/seed<k>``
(git-ignored). Example (one seed, ~15-20 min on 2 shared CPU cores)::

    .venv/bin/python -m benchmarks.quality --device cpu --seeds 0

Also on the built-in demo textures and the NIH subset: ``--datasets demo:brick nih:all``.
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import logging
import time
import warnings
from pathlib import Path

import torch

from apmask_lib.config import Config, replace
from apmask_lib.core.devices import resolve_device
from apmask_lib.evaluate.stage import run_evaluate
from apmask_lib.core.files import atomic_write_text
from apmask_lib.finetune.stage import run_finetune
from apmask_lib.metrics import aggregate_seeds
from apmask_lib.pretrain.stage import run_pretrain
from apmask_lib.report.reference import PAPER_TABLE1_MVTEC
from benchmarks.ablations import BY_NAME, run_dirs
from benchmarks.common import METRICS, ROOT, command, data_root, fmt, machine, schedule_config, versions
from benchmarks.peers import run_peers

ROWS = (("paper", "paper method (shortened schedule)"),
        ("knn", "kNN (training-free, offline backbone block {layer}, {sizes} px)"),
        ("fused", "apmask + kNN fused (extension)"))
# peer rows: measured in this run with --peers (benchmarks/peers.py, optional extra "peers"), else read
# from the last `benchmarks/peers.py` run (results/peers.json); never typed in by hand
PEERS_JSON = ROOT / "results" / "peers.json"



def run_config(args, dataset: str, category: str, seed: int) -> Config:
    out = ROOT / args.runs / f"{dataset}_{category}" / f"seed{seed}"
    return replace(schedule_config(args, dataset, category, seed, out),
                   evaluate={"knn_layer": args.knn_layer, "knn_backbone": "init", "fusion": "fused",
                             **({"knn_sizes": tuple(args.knn_sizes)} if args.knn_sizes else {})})


def trained_by_ablations(args, dataset: str, category: str, seed: int) -> tuple[Path, dict]:
    """The paper-configuration detector that ``benchmarks/ablations.py`` trained (row "apmask") for this
    seed and schedule, and its training times read from the runs' per-epoch logs."""
    pdir, fdir = run_dirs(ROOT / args.trained_runs, BY_NAME["apmask"], dataset, category, seed)
    times = {}
    for stage, d, epochs in (("pretrain", pdir, args.pretrain_epochs), ("finetune", fdir, args.finetune_epochs)):
        if not (d / "config.json").is_file() or not (d / "log.jsonl").is_file():
            raise SystemExit(f"{d} has no finished run: run `python -m benchmarks.ablations --only apmask` with the same "
                             "schedule first, or drop --trained-runs")
        ran = json.loads((d / "config.json").read_text())[stage]["epochs"]
        if ran != epochs:
            raise SystemExit(f"{d} was trained for {ran} {stage} epochs, not --{stage}-epochs {epochs}")
        times[f"{stage}_s"] = sum(json.loads(line)["time_s"] for line in (d / "log.jsonl").read_text().splitlines())
    if not (fdir / "model.pt").is_file():
        raise SystemExit(f"{fdir / 'model.pt'} not found")
    return fdir / "model.pt", times


def one_seed(args, dataset: str, category: str, seed: int) -> dict:
    """Pre-train, fine-tune, evaluate (with the extension) one seed; per-row metrics + timings."""
    cfg = run_config(args, dataset, category, seed)
    times = {}
    model_path = None
    if args.trained_runs:
        model_path, times = trained_by_ablations(args, dataset, category, seed)
    else:
        t0 = time.perf_counter()
        run_pretrain(cfg, resume=args.reuse, force=not args.reuse, progress=args.progress)
        times["pretrain_s"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        run_finetune(cfg, resume=args.reuse, force=not args.reuse, progress=args.progress)
        times["finetune_s"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    m = run_evaluate(cfg, model_path=model_path)
    times["evaluate_s"] = time.perf_counter() - t0
    ext = m["extension"]["timings"]
    times["paper_inference_s"] = m["timings"]["inference_s"]
    times["knn_s"] = ext["bank_features_s"] + ext["bank_fit_s"] + ext["inference_s"]
    times["fusion_stats_s"] = ext["fusion_stats_s"]
    rows = {name: {k: m["methods"][name][k] for k in METRICS} for name, _ in ROWS}
    sizes = m["extension"]["knn_sizes"]
    print(f"  {dataset}/{category} seed {seed}: " + "; ".join(
        f"{name} " + "/".join(f"{100 * v:.1f}" if v is not None else "nan" for v in r.values())
        for name, r in rows.items()) + f"  ({sum(times[k] for k in ('pretrain_s', 'finetune_s', 'evaluate_s')):.0f} s)",
        flush=True)
    return {"rows": rows, "times": times, "run_dir": cfg.out_dir, "n_images": m["n_images"], "knn_sizes": sizes,
            "extension": {k: m["extension"][k] for k in ("knn_layer", "knn_sizes", "knn_grids", "bank_patches",
                                                          "holdout_images", "fusion_stats")}}


def load_peers(args, dataset: str, category: str) -> dict | None:
    """Peer rows for an MVTec category: run now (``--peers``) or the last results/peers.json."""
    if dataset != "mvtec":
        return None
    if args.peers:
        root = data_root("mvtec", args.data_root)
        return {"same_run": True, "rows": run_peers(root, category, device=args.device)}  # metrics in %
    if not PEERS_JSON.is_file():
        return None
    d = json.loads(PEERS_JSON.read_text())
    rows = d.get("rows", [])  # metrics in %
    when = d.get("generated", "details in results/peers.md")
    return {"same_run": False, "rows": rows, "command": d.get("command", "benchmarks/peers.py"), "when": when}


def table(dataset: str, category: str, results: list[dict], args, peers: dict | None = None) -> str:
    n = len(results)
    times = aggregate_seeds([r["times"] for r in results])
    lines = [f"### {dataset}/{category} ({n} seed{'s' if n != 1 else ''}: "
             f"{', '.join(str(s) for s in args.seeds)}; {results[0]['n_images']} test images)", "",
             "| method | image AUROC | pixel AUROC | AU-PRO (FPR ≤ 0.3) | time |", "|---|---|---|---|---|"]
    tcol = {"paper": f"pretrain {fmt(times['pretrain_s'], 1, 0)} s + finetune {fmt(times['finetune_s'], 1, 0)} s "
                     f"+ 6-scale inference {fmt(times['paper_inference_s'], 1, 0)} s",
            "knn": f"bank + kNN inference {fmt(times['knn_s'], 1, 0)} s",
            "fused": f"both + fusion statistics {fmt(times['fusion_stats_s'], 1, 0)} s"}
    for name, label in ROWS:
        agg = aggregate_seeds([r["rows"][name] for r in results])
        lines.append(f"| {label.format(layer=args.knn_layer, sizes=' + '.join(map(str, results[0]['knn_sizes'])))} | " + " | ".join(fmt(agg.get(k)) for k in METRICS)
                     + f" | {tcol[name]} |")
    if dataset == "mvtec" and peers:
        src = "measured in this run" if peers["same_run"] else f"from `{peers['command']}` ({peers['when']})"
        lines.append(f"| *peers, same images, metrics by apmask_lib.metrics ({src}):* | | | | |")
        for r in peers["rows"]:
            if r.get("category") == category:
                lines.append(f"| {r['name']} | " + " | ".join(f"{r[k]:.1f}" for k in METRICS)
                             + f" | fit {r['fit_s']:.0f} s + inference {r['infer_s']:.0f} s |")
    if dataset == "mvtec" and category == "bottle":
        img, pix = PAPER_TABLE1_MVTEC["bottle"]
        lines.append(f"| paper (Table 1, full schedule, DINO ViT-S/16, 900 px originals) | {img:.1f} | {pix:.1f} | — | |")
    lines.append("")
    lines.append(f"Mean ± SE over seeds (SE = std/√n; — with one seed). Total wall time per seed "
                 f"{fmt(aggregate_seeds([{'t': sum(r['times'][k] for k in ('pretrain_s', 'finetune_s', 'evaluate_s'))} for r in results])['t'], 1, 0)} s. "
                 f"Runs: {', '.join(str(Path(r['run_dir']).relative_to(ROOT)) if Path(r['run_dir']).is_relative_to(ROOT) else r['run_dir'] for r in results)}.")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--datasets", nargs="+", default=["mvtec:bottle"],
                    help="dataset:category items, e.g. mvtec:bottle demo:brick nih:all")
    ap.add_argument("--data-root", default=None, help="MVTec root (default ../shared/data/mvtec_ad)")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0])
    ap.add_argument("--pretrain-epochs", type=int, default=1, help="SHORTENED (paper: 300)")
    ap.add_argument("--finetune-epochs", type=int, default=2, help="SHORTENED (paper: 100)")
    ap.add_argument("--knn-layer", type=int, default=7, help="block (0-based) of the kNN features")
    ap.add_argument("--knn-sizes", type=int, nargs="+", default=None,
                    help="kNN input sizes (default: evaluate.knn_sizes, 224 448); 448 alone = AnomalyDINO")
    ap.add_argument("--backbone", default="dinov2-s14-offline")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--workers", type=int, default=0, help="data-loader workers for training")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    ap.add_argument("--runs", default="runs/quality")
    ap.add_argument("--results", default="results/quality.md")
    ap.add_argument("--reuse", action="store_true", help="reuse finished pre-training/fine-tuning in --runs "
                    "(their times are then ~0); default: train afresh")
    ap.add_argument("--progress", action="store_true", help="progress bars for the training stages")
    ap.add_argument("--trained-runs", default=None, metavar="RUNS",
                    help="evaluate the paper-configuration detector trained by benchmarks/ablations.py under RUNS "
                         "(e.g. runs/ablations; same schedule) instead of training again; times from its logs")
    ap.add_argument("--render-only", action="store_true", help="re-render results/quality.md from the last run's "
                    "quality.json (same --datasets/--runs and options) with the current peer rows")
    ap.add_argument("--peers", action="store_true", help="also run the peers (anomalib PatchCore, AnomalyDINO; "
                    "pip install -e '.[peers]') in this run; default: quote the last benchmarks/peers.py run")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    logging.basicConfig(level=logging.WARNING)
    warnings.filterwarnings("ignore", category=UserWarning)
    device = resolve_device(args.device)
    cmd = command("quality", argv)
    machine_text = machine(device)
    shortened = (f"SHORTENED schedule: pre-training {args.pretrain_epochs} epoch(s) (paper 300), fine-tuning "
                 f"{args.finetune_epochs} epoch(s) (paper 100); warm-up scaled. The full 300 + 100-epoch schedule "
                 "needs a GPU (device checks are done in another session); the paper-method row is therefore NOT "
                 "the paper's setting and is expected to be far below the paper's numbers.")
    print(shortened, flush=True)
    t_all = time.perf_counter()
    generated = dt.datetime.now().isoformat(timespec="seconds")
    rerendered = ""
    sections = []
    for item in args.datasets:
        dataset, _, category = item.partition(":")
        json_path = ROOT / args.runs / f"{dataset}_{category or 'all'}" / "quality.json"
        if args.render_only:  # re-render a finished run (e.g. after peers.json gained a row); nothing re-measured
            if not json_path.is_file():
                raise SystemExit(f"{json_path} not found: run without --render-only first")
            saved = json.loads(json_path.read_text())
            results = saved["results"]
            cmd, machine_text, generated = saved["command"], saved["machine"], saved["generated"]
            rerendered = (f" (total {saved['total_s']:.0f} s). Re-rendered {dt.datetime.now().isoformat(timespec='seconds')} with `--render-only`: "
                          "peer rows re-read from results/peers.json, nothing else re-measured.")
        else:
            results = [one_seed(args, dataset, category or "all", s) for s in args.seeds]
            atomic_write_text(json_path, json.dumps({"command": cmd, "machine": machine_text, "generated": generated,
                                                     "total_s": time.perf_counter() - t_all, "results": results},
                                                    indent=1, default=str))
        sections.append(table(dataset, category or "all", results, args, load_peers(args, dataset, category or "all")))
    body = "\n\n".join(sections)
    print("\n" + body, flush=True)
    doc = "\n".join([
        "# Quality: paper method vs. kNN extension", "",
        f"Generated {generated} by `python -m benchmarks.quality`"
        + (rerendered if rerendered else f" (total {time.perf_counter() - t_all:.0f} s)."), "",
        f"Command: `{cmd}`", "",
        f"Machine: {machine_text}. Versions: {versions()}.", "",
        f"**{shortened}**", "",
        *([f"Training: the paper-method detector of each seed is the one `benchmarks/ablations.py` trained for its "
           f"\"apmask\" row (`--trained-runs {args.trained_runs}`: same data, seed, schedule and defaults); its "
           "training times are read from that run's per-epoch logs; only the evaluation ran here.", ""]
          if args.trained_runs else []),
        "Rows 1-3 come from one evaluation per seed (`evaluate.knn_layer` set, `evaluate.fusion=fused`, "
        "`evaluate.knn_backbone=init`): the paper row is its `methods.paper` entry (identical to an evaluation "
        "without the extension); kNN = AnomalyDINO read-out (k = 1, mean of the top 1 % patch distances, "
        f"bilinear + Gaussian sigma 4 px maps) on block {args.knn_layer} tokens, one bank of all training patches per "
        "input size, maps and scores averaged over the sizes (the paper's multi-scale averaging; 448 alone = "
        "AnomalyDINO); fused = z_kNN + z_detector with statistics from held-out normal TRAINING images "
        "(apmask_lib/knn/fusion.py docstring). Pixel metrics at the images' stored resolution (bottle: 512 px, "
        "downscaled from 900 px). Peer rows (anomalib PatchCore / AnomalyDINO on the same images, their raw "
        "scores and maps scored with our metric code) come from `benchmarks/peers.py`: run in this process with "
        "`--peers`, else quoted from its last run (results/peers.json, command and date in the row header).", "",
        body, ""])
    out = ROOT / args.results
    atomic_write_text(out, doc)
    print(f"\nwrote {out.relative_to(ROOT) if out.is_relative_to(ROOT) else out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
