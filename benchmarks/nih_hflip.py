"""Horizontal flips for chest X-rays: fine-tuning on the NIH subset with ``finetune.hflip`` 0 vs 0.5.

Issue 13 asked to measure what the anatomical argument decided (a mirrored X-ray puts the heart on
the other side, which no test image shows): ``finetune.hflip`` null resolves to 0 for NIH and 0.5
elsewhere. Each (hflip, seed) is one fine-tuning from the offline backbone (no pre-training, the
paper's "DINO" setting) of ``--epochs`` epochs on the subset's normal training images with the paper's
other settings (``params-paper.yaml``: 224 px, batch 16, attention-guided anomalies, 0.95 BCE + 0.05
Dice, six test scales), then ``apmask evaluate``. Runs go to ``runs/nih_hflip/h<hflip>/s<seed>``
(git-ignored); the table with each run's command, machine and load goes to ``results/nih_hflip.md``::

    .venv/bin/python -m benchmarks.nih_hflip --seeds 0 1 --epochs 10
    .venv/bin/python -m benchmarks.nih_hflip --render-only      # the table from finished runs
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import shlex
import subprocess
import time
from pathlib import Path

import numpy as np

from apmask_lib.core.files import atomic_write_text
from benchmarks.common import ROOT, machine

RUNS = Path("runs/nih_hflip")
MD = ROOT / "results" / "nih_hflip.md"
METRICS = (("image_auroc", "image AUROC"), ("pixel_auroc", "pixel AUROC"), ("au_pro", "AU-PRO"))


def settings(hflip: str, seed: int, epochs: int) -> list[str]:
    """The ``-S`` overrides of one run (on top of params-paper.yaml)."""
    sets = ["data.dataset=nih", "data.root=../shared/data/nih_cxr14", "data.category=all", f"seed={seed}",
            "backbone=dinov2-s14-offline", "finetune.init=dinov2-s14-offline", f"finetune.epochs={epochs}",
            "finetune.warmup_epochs=1", "finetune.num_workers=0", f"finetune.hflip={hflip}",
            f"out_dir={RUNS}/h{hflip}/s{seed}", "device=cpu"]
    return [a for s in sets for a in ("-S", s)]


def run(hflip: str, seed: int, epochs: int) -> None:
    out = ROOT / RUNS / f"h{hflip}" / f"s{seed}"
    info = {"load_before": os.getloadavg()[0]}
    for stage in ("finetune", "evaluate"):
        cmd = ["apmask", stage, "--params", "params-paper.yaml", *settings(hflip, seed, epochs)]
        t0 = time.perf_counter()
        subprocess.run(cmd, cwd=ROOT, check=True)
        info[f"{stage}_s"] = round(time.perf_counter() - t0, 1)
    info.update(load_after=os.getloadavg()[0], machine=machine("cpu"),
                command=" ".join(shlex.quote(c) for c in ["apmask", "finetune|evaluate", "--params",
                                                          "params-paper.yaml", *settings(hflip, seed, epochs)]))
    (out / "benchmark.json").write_text(json.dumps(info, indent=1) + "\n")


def _load(info: dict, key: str) -> str:
    return f"{info[key]:.1f}" if isinstance(info.get(key), (int, float)) else "—"


def render() -> str:
    rows, notes = [], []
    runs = sorted((ROOT / RUNS).glob("h*/s*/evaluate/metrics.json"))
    if not runs:
        raise SystemExit(f"no finished runs under {RUNS}/: run without --render-only first")
    by_h: dict[str, list[dict]] = {}
    for p in runs:
        h, s = p.parts[-4][1:], p.parts[-3][1:]
        m = json.loads(p.read_text())
        info_p = p.parents[1] / "benchmark.json"
        info = json.loads(info_p.read_text()) if info_p.is_file() else {}
        val = p.parents[1] / "finetune" / "validation.csv"
        last_val = val.read_text().strip().splitlines()[-1] if val.is_file() else ""
        by_h.setdefault(h, []).append(m)
        rows.append(f"| {h} | {s} | " + " | ".join(f"{100 * m[k]:.2f}" for k, _ in METRICS)
                    + f" | {info.get('finetune_s', '—')} | {info.get('evaluate_s', '—')} | "
                    f"{_load(info, 'load_before')} / {_load(info, 'load_after')} |")
        notes.append(f"- h{h}/s{s}: `{info.get('command', 'apmask finetune/evaluate, see runs/ folder config.json')}`"
                     + (f"; last validation row `{last_val}`" if last_val else ""))
        mach = info.get("machine", "")
    mean = [f"| {h} (mean of {len(ms)}) | — | " + " | ".join(
        f"{100 * np.mean([m[k] for m in ms]):.2f} ± {100 * np.std([m[k] for m in ms]):.2f}" for k, _ in METRICS)
        + " | | | |" for h, ms in sorted(by_h.items())]
    head = ["# Horizontal flips on the NIH ChestX-ray14 subset (fine-tuning, CPU)", "",
            f"Generated {dt.datetime.now().isoformat(timespec='seconds')} by `python -m benchmarks.nih_hflip` "
            "from the runs under `runs/nih_hflip/`. Machine: " + mach + ".", "",
            "Fine-tuned from the offline DINOv2 ViT-S/14 (no pre-training), params-paper.yaml otherwise (224 px, "
            "batch 16, six test scales); 36 normal training images (10 % held out for the validation signal), "
            "test 54 images (20 normal, 34 anomalous; pixel metrics on the 10 anomalous images with a bounding "
            "box + the 20 normal ones). Metrics in %; mean ± std over seeds. A short schedule on a tiny set: "
            "differences of a few points are within seed noise.", "",
            "| hflip | seed | " + " | ".join(n for _, n in METRICS) + " | fine-tune s | evaluate s | load start / end |",
            "|---|---|---|---|---|---|---|---|"]
    tail = ["", "Commands (each run: `apmask finetune` then `apmask evaluate` with the same arguments; last "
            "row of the run's `finetune/validation.csv`: epoch, step, loss, acc, val_loss, val_acc, val_auroc, "
            "val_dice):", ""] + notes
    if "—" in "".join(rows):
        tail += ["", "Load \"—\": those runs were made by a shell loop issuing the listed commands in the same "
                 "order before this script's run mode existed (its timings read from `/usr/bin/time`); the run "
                 "mode records the load."]
    return "\n".join(head + rows + mean + tail) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    ap.add_argument("--hflips", nargs="+", default=["0", "0.5"])
    ap.add_argument("--epochs", type=int, default=10)
    ap.add_argument("--render-only", action="store_true")
    args = ap.parse_args(argv)
    if not args.render_only:
        for seed in args.seeds:
            for h in args.hflips:
                run(h, seed, args.epochs)
    text = render()
    atomic_write_text(MD, text)
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
