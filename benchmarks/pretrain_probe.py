"""Does APMask pre-training move the backbone, and for the better? A training-free probe along one
pre-training run per learning-rate reading (a benchmark, not a test).

For each data set and each reading of the pre-training learning rate (``--lr-scaling``: ``absolute`` =
``pretrain.lr`` 5e-4 as written, what this project ran so far; ``linear`` = DINO's rule lr × batch / 256,
3.1e-5 at the paper's batch 16, 1.6e-5 at the demo's 8), ONE APMask pre-training run (the demo profile's
pre-training settings of ``params.yaml``: 112 px global / 56 px local crops, 4 local crops, batch 8,
r = 0.3, with enough epochs for the largest ``--steps`` and the warm-up scaled from the paper's 10 of 300)
is stopped at each of ``--steps`` (the schedule stays that of the whole run; the next call continues it
exactly), and the exported EMA teacher is probed without any training (:mod:`apmask_lib.evaluate.probe`: kNN on
block 7 and on the last block, the [CLS] attention as the map) at ``--probe-size``, beside the collapse
diagnostics of the pre-training log and the relative L2 change of the teacher's weights from the start.

Rows (one per data set, reading and step) go to ``results/pretrain_probe.json`` as they finish, with
command, machine and load; ``--report`` renders ``results/pretrain_probe.md`` and
``results/figures/pretrain_probe.png``::

    nice -n 5 .venv/bin/python -m benchmarks.pretrain_probe --datasets bottle --steps 0 100 300 1000
    .venv/bin/python -m benchmarks.pretrain_probe --report

Runs live in ``runs/pretrain_probe/`` (git-ignored) and resume where they stopped.
"""
from __future__ import annotations

import argparse
import csv
import datetime as dt
import json
import logging
import math
import os
import shutil
import time
import warnings
from pathlib import Path

from benchmarks.common import DATASETS, ROOT, command, data_root, ensure_data, machine, relative_change, versions

from apmask_lib.evaluate.probe import METRICS, READOUTS as PROBE_KEYS
from apmask_lib.pretrain.collapse import STAT_COLUMNS
from apmask_lib.core.files import atomic_write_text

JSON = ROOT / "results" / "pretrain_probe.json"
MD = ROOT / "results" / "pretrain_probe.md"
PNG = ROOT / "results" / "figures" / "pretrain_probe.png"
RUNS = ROOT / "runs" / "pretrain_probe"
READINGS = ("absolute", "linear")


def pretrain_config(dataset: str, reading: str, max_steps: int, max_train: int, backbone: str, seed: int = 0):
    """params.yaml's pre-training (the demo profile) on ``dataset`` with ``reading``, long enough for
    ``max_steps`` steps (epochs = ceil(steps / steps per epoch)), warm-up 10 / 300 of them (at least 1)."""
    from apmask_lib.config import load_params

    kind, category = DATASETS[dataset]
    cfg = load_params(ROOT / "params.yaml", [f"backbone={backbone}", "device=cpu", f"seed={seed}",
                                            f"data.dataset={kind}", f"data.root={data_root(kind)}",
                                            f"data.category={category}", f"data.max_train={max_train}",
                                            "data.image_size=224", f"pretrain.lr_scaling={reading}",
                                            "pretrain.num_workers=0",
                                            f"out_dir={RUNS / dataset / reading}"])
    batch = min(cfg.pretrain.batch_size, max_train)
    iters = max(1, max_train // batch)
    epochs = max(1, math.ceil(max_steps / iters))
    from apmask_lib.config import replace

    return replace(cfg, pretrain={"epochs": epochs, "warmup_epochs": max(1, round(epochs * 10 / 300))}), iters


def diagnostics_at(run: Path, step: int) -> dict:
    """Collapse diagnostics (:data:`~apmask_lib.pretrain.collapse.STAT_COLUMNS`) and loss of the last logged
    step before ``step``, and the learning rate applied there (log.csv)."""
    path = run / "log.csv"
    if step == 0 or not path.is_file():
        return {}
    with open(path, newline="") as f:
        rows = [r for r in csv.DictReader(f) if int(r["step"]) < step]
    if not rows:
        return {}
    last = rows[-1]
    out = {k: float(last[k]) for k in ("loss", *STAT_COLUMNS) if last.get(k) not in (None, "")}
    out["lr_peak_so_far"] = max(float(r["lr"]) for r in rows)
    return out


def run_reading(dataset: str, reading: str, args, start_probes: dict | None = None) -> list[dict]:
    """One pre-training run, probed at each step of ``args.steps``; the rows. ``start_probes``: the
    step-0 probe per data set (the backbone before pre-training, the same for every reading), filled
    by the first reading and reused by the others."""
    import torch

    from apmask_lib.config import replace
    from apmask_lib.pretrain.stage import peak_lr, run_pretrain
    from apmask_lib.evaluate.probe import probe_backbone
    from apmask_lib.weights import build_backbone

    start_probes = {} if start_probes is None else start_probes
    cfg, iters = pretrain_config(dataset, reading, args.schedule_steps or max(args.steps), args.max_train, args.backbone)
    run = Path(cfg.out_dir) / "pretrain"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        start = build_backbone(args.backbone).state_dict()
    probe_cfg = replace(cfg, data={"max_test": args.max_test})
    rows, t_pre = [], 0.0
    for step in sorted(args.steps):
        load0 = os.getloadavg()
        if step == 0:
            source, change = args.backbone, 0.0
        else:
            t0 = time.perf_counter()
            run_pretrain(cfg, max_steps=step, resume=True, progress=args.progress)
            t_pre += time.perf_counter() - t0
            snap = run / f"backbone_s{step}.pt"
            shutil.copyfile(run / "backbone.pt", snap)
            source = f"file:{snap}"
            change = relative_change(torch.load(snap, weights_only=True), start)
        t0 = time.perf_counter()
        if step == 0 and dataset in start_probes:
            probe = start_probes[dataset]
        else:
            probe = probe_backbone(probe_cfg, source, RUNS / dataset / reading / f"probe_s{step}", size=args.probe_size)
            if step == 0:
                start_probes[dataset] = probe
        t_probe = time.perf_counter() - t0
        argv = ["--datasets", dataset, "--lr-scaling", reading, "--steps", *map(str, args.steps),
                "--max-train", str(args.max_train), "--probe-size", str(args.probe_size)]
        argv += ["--max-test", str(args.max_test)] if args.max_test else []
        argv += ["--schedule-steps", str(args.schedule_steps)] if args.schedule_steps else []
        rows.append({"dataset": dataset, "reading": reading, "step": step, "steps_per_epoch": iters,
                     "epochs": cfg.pretrain.epochs, "warmup_epochs": cfg.pretrain.warmup_epochs,
                     "peak_lr": peak_lr(cfg.pretrain, min(cfg.pretrain.batch_size, args.max_train)),
                     "max_train": args.max_train, "max_test": args.max_test, "probe_size": args.probe_size,
                     "probe": probe, "teacher_change": change, "diagnostics": diagnostics_at(run, step),
                     "pretrain_s": round(t_pre, 1), "probe_s": round(t_probe, 1),
                     "load_start": [round(x, 2) for x in load0], "load_end": [round(x, 2) for x in os.getloadavg()],
                     "command": command("pretrain_probe", argv), "machine": machine("cpu"), "versions": versions(),
                     "date": dt.datetime.now().isoformat(timespec="seconds")})
        save_rows(rows[-1:])
        print(f"{dataset} {reading} step {step}: " + "  ".join(
            f"{k} {' / '.join('—' if probe[k][m] is None else f'{probe[k][m]:.1f}' for m in METRICS)}" for k in probe)
            + f"  change {change:.2e}", flush=True)
    return rows


def row_key(r: dict) -> tuple:
    return (r["dataset"], r["reading"], r["max_train"], r["probe_size"], r["step"])


def save_rows(new: list[dict]) -> None:
    old = json.loads(JSON.read_text())["rows"] if JSON.is_file() else []
    keys = {row_key(r) for r in new}
    rows = [r for r in old if row_key(r) not in keys] + list(new)
    rows.sort(key=lambda r: (list(DATASETS).index(r["dataset"]), READINGS.index(r["reading"]), r["max_train"],
                             r["probe_size"], r["step"]))
    JSON.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(JSON, json.dumps({"rows": rows}, indent=1) + "\n")


def _f(v, digits: int = 1) -> str:
    return "—" if v is None else f"{v:.{digits}f}"


def render(rows: list[dict]) -> str:
    """The Markdown report (pure)."""
    lines = ["# APMask pre-training probed without training (CPU)", "",
             f"Generated {dt.datetime.now().isoformat(timespec='seconds')} by `benchmarks/pretrain_probe.py --report` "
             "from `results/pretrain_probe.json`; figure `results/figures/pretrain_probe.png`. One APMask pre-training "
             "run per data set and learning-rate reading (`params.yaml`'s pre-training: 112 / 56 px crops, 4 local "
             "crops, batch 8, r = 0.3; offline backbone `dinov2-s14-offline` as the start), stopped at each step and "
             "its exported EMA teacher probed with no training: kNN on block 7 and on the last block (banks of the "
             "training images) and the last-layer [CLS] attention as the anomaly map (image score = map max), at one "
             "input size. Metrics in % (image AUROC / pixel AUROC / AU-PRO). Step 0 = the backbone before "
             "pre-training. `absolute`: peak LR = pretrain.lr as written; `linear`: DINO's lr × batch / 256. "
             "One run per reading: no seed spread (a probe with no training has no seed but the pre-training's).", "",
             "| data set | reading | peak LR | step | teacher change (rel. L2) | kNN block 7 | kNN last block | "
             "attention map | loss | code entropy | agreement | pre-train s (cum.) | probe s | load |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        p, d = r["probe"], r["diagnostics"]
        cells = [" / ".join(_f(p[k][m]) for m in METRICS) if k in p else "—" for k in PROBE_KEYS]
        lines.append(f"| {r['dataset']} | {r['reading']} | {r['peak_lr']:.3g} | {r['step']} | {r['teacher_change']:.2e} | "
                     + " | ".join(cells) + f" | {_f(d.get('loss'), 3)} | {_f(d.get('code_entropy'), 3)} | "
                     f"{_f(d.get('agreement'), 3)} | {r['pretrain_s']:.0f} | {r['probe_s']:.0f} | "
                     f"{r['load_start'][0]:.1f} / {r['load_end'][0]:.1f} |")
    lines += ["", "## Commands and machines", ""]
    seen = set()
    for r in rows:
        k = (r["dataset"], r["reading"])
        if k in seen:
            continue
        seen.add(k)
        lines.append(f"- {r['dataset']} / {r['reading']} ({r['date']}): `nice -n 5 {r['command']}`; {r['machine']}; "
                     f"{r['versions']}")
    return "\n".join(lines) + "\n"


def plot(rows: list[dict]) -> None:
    """Per data set: pixel AUROC of each probe against the step, one line per reading."""
    from apmask_lib.viz.figure import pyplot, save_figure

    plt = pyplot()

    sets = [d for d in DATASETS if any(r["dataset"] == d for r in rows)]
    if not sets:
        return
    fig, axes = plt.subplots(1, len(sets), figsize=(4.2 * len(sets), 3.4), squeeze=False)
    for ax, ds in zip(axes[0], sets):
        for reading, style in zip(READINGS, ("-", "--")):
            rs = [r for r in rows if r["dataset"] == ds and r["reading"] == reading]
            for k in PROBE_KEYS:
                pts = [(r["step"], r["probe"][k]["pixel_auroc"]) for r in rs if r["probe"].get(k, {}).get("pixel_auroc") is not None]
                if pts:
                    ax.plot(*zip(*pts), style, marker="o", ms=3, label=f"{k} ({reading})")
        ax.set_title(f"{ds}: pixel AUROC of the probes", fontsize=9)
        ax.set_xlabel("pre-training step")
        ax.set_ylabel("%")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=6)
    fig.suptitle("Training-free probe along APMask pre-training. " + sorted({r["machine"] for r in rows})[0].split(";")[0],
                 fontsize=8)
    fig.tight_layout()
    PNG.parent.mkdir(parents=True, exist_ok=True)
    save_figure(fig, PNG)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--datasets", nargs="+", default=["bottle"], choices=list(DATASETS))
    ap.add_argument("--lr-scaling", nargs="+", default=list(READINGS), choices=READINGS)
    ap.add_argument("--steps", type=int, nargs="+", default=[0, 100, 300, 1000])
    ap.add_argument("--schedule-steps", type=int, default=None,
                    help="length of the pre-training schedule (default: the largest --steps); a run stopped "
                         "early with the same value continues exactly where it stopped")
    ap.add_argument("--max-train", type=int, default=48)
    ap.add_argument("--max-test", type=int, default=None, help="test images per defect type (None = all)")
    ap.add_argument("--probe-size", type=int, default=224)
    ap.add_argument("--backbone", default="dinov2-s14-offline")
    ap.add_argument("--progress", action="store_true")
    ap.add_argument("--report", action="store_true")
    args = ap.parse_args(argv)
    if args.schedule_steps is not None and args.schedule_steps < max(args.steps):
        ap.error("--schedule-steps must be at least the largest --steps")
    logging.basicConfig(level=logging.WARNING)
    warnings.filterwarnings("ignore", category=UserWarning)
    if not args.report:
        start_probes: dict = {}
        for ds in args.datasets:
            ensure_data(ds)
            for reading in args.lr_scaling:
                run_reading(ds, reading, args, start_probes)
    rows = json.loads(JSON.read_text())["rows"] if JSON.is_file() else []
    atomic_write_text(MD, render(rows))
    plot(rows)
    print(MD.read_text())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
