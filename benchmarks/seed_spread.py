"""Run-to-run spread of the paper method: N seeds per setting, mean ± SD (a benchmark, not a test).

A single fine-tuning run of the paper method says little: on bottle with 48 training images a new
seed moved pixel AUROC by 24 points at 2 epochs. This benchmark fine-tunes the same setting with
several seeds (``--seeds``; the seed drives every random choice of the run: the image order, the
synthetic anomalies, the colour jitter and flips, the new heads' initialisation) and reports mean,
standard deviation and standard error per metric, so that a comparison between settings can be
read against the spread.

A **setting** is a data set (:data:`~benchmarks.common.DATASETS`), a fine-tuning budget
(``--epochs``, warm-up scaled from the paper's 10 of 100), a training-image cap (``--max-train``,
the validation slice held out first), test scales (``--scales``) and a named **variant**: a list of
config overrides on top of ``params-paper.yaml`` (:data:`VARIANTS`). Fine-tuning starts from the
offline backbone (no pre-training, the paper's "DINO" setting) unless the variant sets
``finetune.init``; ``apmask-pretrained`` variants start from a backbone written by
``benchmarks.pretrain_probe`` (its path is recorded in the row).

Every finished run is one row of ``results/seed_spread.json`` (written as it finishes, so an
interrupted sweep resumes where it stopped; a row measured again replaces the old one), with its
command, machine, load average and timings; ``--report`` renders ``results/seed_spread.md`` and
``results/figures/seed_spread.png``::

    nice -n 5 .venv/bin/python -m benchmarks.seed_spread --datasets bottle --variants paper --seeds 0 1 2 3 4
    .venv/bin/python -m benchmarks.seed_spread --report

Run folders live in ``runs/seed_spread/`` (git-ignored); their weights are deleted once a row is
written (``--keep-weights`` keeps them), the logs stay.
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import logging
import math
import os
import time
import warnings
from pathlib import Path
from typing import Iterable, Optional

from benchmarks.common import (DATASETS, METRICS, ROOT, command, data_root, ensure_data, iters_per_epoch, machine,
                               scaled_warmup, spread, versions)

from apmask_lib.core.files import atomic_write_text

JSON = ROOT / "results" / "seed_spread.json"
MD = ROOT / "results" / "seed_spread.md"
PNG = ROOT / "results" / "figures" / "seed_spread.png"
RUNS = ROOT / "runs" / "seed_spread"
BASE = "paper"
#: name -> config overrides on top of params-paper.yaml (the paper method as this project runs it)
VARIANTS: dict[str, list[str]] = {
    "paper": [],
    "bb0.1": ["finetune.backbone_lr_scale=0.1"],
    "bb0.3": ["finetune.backbone_lr_scale=0.3"],
    "ld0.75": ["finetune.layer_decay=0.75"],
    "ema0.9": ["finetune.ema=0.9"],
    "bb0.1+ema0.9": ["finetune.backbone_lr_scale=0.1", "finetune.ema=0.9"],
    "frozen": ["finetune.backbone_lr_scale=0.0"],
    "seg0.2": ["finetune.det_weight=0.8", "finetune.seg_weight=0.2"],
    "bb0.1+seg0.2": ["finetune.backbone_lr_scale=0.1", "finetune.det_weight=0.8", "finetune.seg_weight=0.2"],
}
#: the goal the stabilised defaults are held to (points, seed SD)
SD_GOAL = {"image_auroc": 1.0, "pixel_auroc": 2.0}


def variant_overrides(variant: str, init: Optional[str] = None) -> list[str]:
    """The overrides of ``variant``; ``init``: a backbone file to fine-tune from (``file:PATH``)."""
    if variant not in VARIANTS:
        raise ValueError(f"unknown variant {variant!r}; choose from {', '.join(VARIANTS)}")
    return list(VARIANTS[variant]) + ([f"finetune.init={init}"] if init else [])


def run_dir(dataset: str, variant: str, epochs: int, max_train: int, seed: int, tag: str = "") -> Path:
    return RUNS / dataset / (variant + (f"@{tag}" if tag else "")) / f"e{epochs}_n{max_train}" / f"s{seed}"


def run_config(dataset: str, variant: str, seed: int, epochs: int, max_train: int, scales: Iterable[int],
               backbone: str = "dinov2-s14-offline", device: str = "cpu", init: Optional[str] = None, tag: str = ""):
    """params-paper.yaml with the data set, the offline backbone (also the starting point unless ``init``),
    the budget with its scaled warm-up, the cap, the test scales and the variant's overrides."""
    from apmask_lib.config import load_params, replace

    kind, category = DATASETS[dataset]
    out = run_dir(dataset, variant, epochs, max_train, seed, tag)
    ov = [f"backbone={backbone}", f"device={device}", f"seed={seed}", f"out_dir={out}", f"data.dataset={kind}",
          f"data.root={data_root(kind)}", f"data.category={category}", f"data.max_train={max_train}",
          f"finetune.init={backbone}", f"finetune.epochs={epochs}", "finetune.num_workers=0",
          f"finetune.warmup_epochs={scaled_warmup('finetune', epochs)}", *variant_overrides(variant, init)]
    return replace(load_params(ROOT / "params-paper.yaml", ov), evaluate={"scales": tuple(scales)})


def validation_at(fdir: Path, epoch: int) -> dict:
    """The label-free validation signal at the end of ``epoch`` (1-based; ``log.jsonl``)."""
    recs = [json.loads(x) for x in (fdir / "log.jsonl").read_text().splitlines() if x.strip()]
    rec = next((r for r in recs if r.get("epoch") == epoch - 1), {})
    return {k: rec.get(k) for k in ("acc", "val_acc", "val_auroc", "val_dice")}


def run_one(dataset: str, variant: str, seed: int, args) -> list[dict]:
    """Fine-tune one (data set, variant, seed) and evaluate it at each epoch of ``args.at`` (the run stops
    there, the detector is evaluated, the run continues: the schedule stays that of ``args.epochs``);
    one row per evaluated epoch."""
    from apmask_lib.config import replace
    from apmask_lib.evaluate.stage import run_evaluate
    from apmask_lib.finetune.stage import run_finetune

    cfg = run_config(dataset, variant, seed, args.epochs, args.max_train, args.scales, args.backbone,
                     init=args.init, tag=args.tag)
    iters = iters_per_epoch(cfg)
    fdir = Path(cfg.out_dir) / "finetune"
    argv = ["--datasets", dataset, "--variants", variant, "--seeds", str(seed), "--epochs", str(args.epochs),
            "--at", *map(str, args.at), "--max-train", str(args.max_train), "--scales", *map(str, args.scales)]
    argv += (["--init", args.init] if args.init else []) + (["--tag", args.tag] if args.tag else [])
    rows, t_ft, info = [], 0.0, None
    for at in sorted(args.at):
        load0 = os.getloadavg()
        t0 = time.perf_counter()
        run_finetune(cfg, max_steps=at * iters, resume=True, progress=args.progress)
        t_ft += time.perf_counter() - t0
        if info is None:  # the run's facts (training images, steps per epoch), written by its first call
            info = json.loads((fdir / "config.json").read_text()).get("_run", {})
        t0 = time.perf_counter()
        m = run_evaluate(replace(cfg, out_dir=str(Path(cfg.out_dir) / f"eval_e{at}")), model_path=fdir / "model.pt")
        t_ev = time.perf_counter() - t0
        rows.append({"dataset": dataset, "variant": variant, "tag": args.tag,
                     "overrides": variant_overrides(variant, args.init), "seed": seed, "epochs": args.epochs, "at": at,
                     "max_train": args.max_train, "scales": list(args.scales), "n_train": info.get("n_train"),
                     "iters_per_epoch": info.get("iters_per_epoch"),
                     **{k: (None if m.get(k) is None else 100 * m[k]) for k in METRICS}, **validation_at(fdir, at),
                     "finetune_s": round(t_ft, 1), "evaluate_s": round(t_ev, 1),
                     "load_start": [round(x, 2) for x in load0], "load_end": [round(x, 2) for x in os.getloadavg()],
                     "command": command("seed_spread", argv), "machine": machine("cpu"), "versions": versions(),
                     "date": dt.datetime.now().isoformat(timespec="seconds")})
    if not args.keep_weights:
        for f in ("checkpoint.pt", "model.pt"):
            (fdir / f).unlink(missing_ok=True)
    return rows


# ----------------------------------------------------------------------------- the result store
def cpu_of(r: dict) -> str:
    """The CPU a row ran on, from its machine line (``"AMD EPYC, 2 cores, ..."`` -> ``"AMD EPYC"``).

    Part of a setting: a change of CPU vendor changes the numerics (docs/reproducibility.md, "Intel vs AMD")
    and acts on fine-tuning like a reseed, so seeds from two CPUs are not pooled and a comparison pairs
    settings measured on the same CPU."""
    return r["machine"].split(",")[0].replace("(R)", "").replace(" Processor", "").strip()


def row_key(r: dict) -> tuple:
    return (r["dataset"], r["variant"], r.get("tag", ""), r["epochs"], r["at"], r["max_train"], tuple(r["scales"]),
            cpu_of(r), r["seed"])


def group_key(r: dict) -> tuple:
    """A setting: everything of :func:`row_key` but the seed."""
    return row_key(r)[:-1]


def merge_rows(old: list[dict], new: list[dict]) -> list[dict]:
    keys = {row_key(r) for r in new}
    rows = [r for r in old if row_key(r) not in keys] + list(new)
    order_d, order_v = list(DATASETS), list(VARIANTS)
    return sorted(rows, key=lambda r: (order_d.index(r["dataset"]), r["epochs"], r["max_train"], len(r["scales"]), r["at"],
                                       order_v.index(r["variant"]) if r["variant"] in order_v else len(order_v),
                                       r.get("tag", ""), cpu_of(r), r["seed"]))


def load_rows(path: Path = JSON) -> list[dict]:
    return json.loads(path.read_text())["rows"] if path.is_file() else []


def save_rows(new: list[dict], path: Path = JSON) -> None:
    rows = merge_rows(load_rows(path), new)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, json.dumps({"rows": rows}, indent=1) + "\n")


def summarise(rows: list[dict]) -> list[dict]:
    """One entry per setting: its seeds and :func:`spread` per metric."""
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        groups.setdefault(group_key(r), []).append(r)
    out = []
    for k, rs in groups.items():
        out.append({"key": k, "dataset": k[0], "variant": k[1], "tag": k[2], "epochs": k[3], "at": k[4], "max_train": k[5],
                    "scales": list(k[6]), "cpu": k[7],
                    "seeds": [r["seed"] for r in rs], **{m: spread([r[m] for r in rs]) for m in METRICS},
                    "val_auroc": spread([None if r.get("val_auroc") is None else 100 * r["val_auroc"] for r in rs]),
                    "finetune_s": spread([r["finetune_s"] for r in rs])})
    return out


def difference(a: dict, b: dict) -> Optional[dict]:
    """Mean difference a − b (points) with its standard error sqrt(se_a² + se_b²); ``beyond``: |Δ| > 2 SE
    (about a 95 % interval that excludes 0), the rule by which a difference counts as a finding."""
    if a["mean"] is None or b["mean"] is None or a["se"] is None or b["se"] is None:
        return None
    d = a["mean"] - b["mean"]
    se = math.sqrt(a["se"] ** 2 + b["se"] ** 2)
    return {"delta": d, "se": se, "beyond": abs(d) > 2 * se}


def _against(summary: list[dict], base_key) -> list[dict]:
    """Each setting against the setting ``base_key(s)`` names (skipped where that is None or not measured)."""
    by = {s["key"]: s for s in summary}
    out = []
    for s in summary:
        b = by.get(base_key(s))
        if b is None:
            continue
        out.append({"dataset": s["dataset"], "variant": s["variant"], "tag": s["tag"], "epochs": s["epochs"], "at": s["at"],
                    "max_train": s["max_train"], "scales": s["scales"], "cpu": s["cpu"],
                    **{m: difference(s[m], b[m]) for m in METRICS}})
    return out


def compare(summary: list[dict], base: str = BASE) -> list[dict]:
    """Each setting against the ``base`` variant of the same data set, budget, cap, scales and CPU."""
    return _against(summary, lambda s: None if s["variant"] == base and not s["tag"]
                    else (s["dataset"], base, "") + s["key"][3:])


def compare_start(summary: list[dict]) -> list[dict]:
    """Each setting that starts from a pre-trained backbone (a tag) against the same variant, budget, cap and
    scales on the same CPU from the untouched backbone: Table 4's question (does pre-training help?) under the seed spread."""
    return _against(summary, lambda s: s["key"][:2] + ("",) + s["key"][3:] if s["tag"] else None)


def _delta_rows(comps: list[dict]) -> list[str]:
    """Table rows of differences: ``Δ ± SE`` per metric, **beyond** where the spread does not swallow it."""
    lines = []
    for c in comps:
        cells = ["—" if d is None else f"{d['delta']:+.1f} ± {d['se']:.1f}" + (" **beyond**" if d["beyond"] else "")
                 for d in (c[m] for m in METRICS)]
        lines.append(f"| {c['dataset']} | {c['at']} of {c['epochs']} | {'+'.join(map(str, c['scales']))} | {_name(c)} | "
                     + " | ".join(cells) + f" | {c['cpu']} |")
    return lines


def meets_goal(s: dict) -> bool:
    """Seed SD within :data:`SD_GOAL` for every metric it names (at least 5 seeds)."""
    return all(s[m]["sd"] is not None and s[m]["n"] >= 5 and s[m]["sd"] <= g for m, g in SD_GOAL.items())


# ----------------------------------------------------------------------------- the report
def _f(v, digits: int = 1) -> str:
    return "—" if v is None else f"{v:.{digits}f}"


def _ms(st: dict) -> str:
    """``mean ± SD``."""
    return "—" if st["mean"] is None else f"{st['mean']:.1f} ± {_f(st['sd'])}"


def _name(s: dict) -> str:
    return s["variant"] + (f" @ {s['tag']}" if s.get("tag") else "")


def render(rows: list[dict]) -> str:
    """The Markdown report of the rows (pure: reads no files)."""
    summary = summarise(rows)
    lines = ["# Run-to-run spread of the paper method (CPU)", "",
             f"Generated {dt.datetime.now().isoformat(timespec='seconds')} by `benchmarks/seed_spread.py --report` from "
             "`results/seed_spread.json`; figure `results/figures/seed_spread.png`. Each setting is fine-tuned with "
             "several seeds (the seed drives the image order, the synthetic anomalies, flips and jitter and the new "
             "heads' initialisation) from the offline backbone `dinov2-s14-offline` (no pre-training unless the "
             "variant says so), `params-paper.yaml` otherwise (224 px, batch 16, attention-guided anomalies, "
             "0.95·BCE + 0.05·Dice), warm-up scaled from the paper's 10 of 100 epochs, training images capped after "
             "the validation slice is held out, evaluated on the full test set at the listed scales. Metrics in % "
             "(image AUROC / pixel AUROC / AU-PRO at FPR ≤ 0.3) as **mean ± SD over seeds** (SE = SD/√n in the "
             "comparison). Goal for a stabilised setting: seed SD ≤ "
             f"{SD_GOAL['image_auroc']:g} point image AUROC and ≤ {SD_GOAL['pixel_auroc']:g} points pixel AUROC "
             "over ≥ 5 seeds.", "",
             "Variants (overrides on `params-paper.yaml`): "
             + "; ".join(f"`{k}` = {' '.join(v) or 'none (the paper as this project runs it)'}" for k, v in VARIANTS.items()
                         if any(s["variant"] == k for s in summary)) + ".", "",
             "| data set | epoch of schedule (steps/epoch) | train images | scales | variant | seeds | image AUROC | pixel AUROC | AU-PRO | "
             "image min–max | pixel min–max | val AUROC | SD goal | fine-tune s (mean) | CPU |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    steps = {group_key(r): r.get("iters_per_epoch") for r in rows}
    ntr = {group_key(r): r.get("n_train") for r in rows}
    for s in summary:
        k = s["key"]
        im, px = s["image_auroc"], s["pixel_auroc"]
        lines.append(f"| {s['dataset']} | {s['at']} of {s['epochs']} ({steps.get(k) or '—'}) | {ntr.get(k) or '—'} | "
                     f"{'+'.join(map(str, s['scales']))} | {_name(s)} | {len(s['seeds'])} | "
                     + " | ".join(_ms(s[m]) for m in METRICS)
                     + f" | {_f(im['min'])}–{_f(im['max'])} | {_f(px['min'])}–{_f(px['max'])} | {_ms(s['val_auroc'])} | "
                     f"{'met' if meets_goal(s) else 'not met'} | {_f(s['finetune_s']['mean'], 0)} | {s['cpu']} |")
    comps = compare(summary)
    if comps:
        lines += ["", f"## Against `{BASE}` in the same setting (Δ mean ± SE of the difference, points)", "",
                  "**beyond** = |Δ| > 2 SE: a difference the seed spread does not swallow. Anything else is no finding. "
                  "Both sides ran on the same CPU (seeds from two CPUs are two settings: `cpu_of`).", "",
                  "| data set | epoch of schedule | scales | variant | Δ image | Δ pixel | Δ AU-PRO | CPU |",
                  "|---|---|---|---|---|---|---|---|"]
        lines += _delta_rows(comps)
    starts = compare_start(summary)
    if starts:
        lines += ["", "## Pre-trained start against the untouched backbone (same variant; Δ mean ± SE, points)", "",
                  "`@ TAG` = fine-tuning started from the backbone that TAG names (an APMask pre-training run of "
                  "`benchmarks/pretrain_probe.py`, e.g. `apmask-linear300` = 300 steps with DINO's linear LR rule) "
                  "instead of the offline backbone; everything else equal, both sides on the same CPU. **beyond** as above.", "",
                  "| data set | epoch of schedule | scales | variant | Δ image | Δ pixel | Δ AU-PRO | CPU |",
                  "|---|---|---|---|---|---|---|---|"]
        lines += _delta_rows(starts)
    lines += ["", "## Per seed", "", "| data set | epoch of schedule | variant | seed | image | pixel | AU-PRO | val AUROC | fine-tune s | "
              "eval s | load start / end | CPU |", "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        va = r.get("val_auroc")
        lines.append(f"| {r['dataset']} | {r['at']} of {r['epochs']} | {_name(r)} | {r['seed']} | "
                     + " | ".join(_f(r[m], 2) for m in METRICS)
                     + f" | {_f(None if va is None else 100 * va, 2)} | {r['finetune_s']:.0f} | {r['evaluate_s']:.0f} | "
                     f"{r['load_start'][0]:.1f} / {r['load_end'][0]:.1f} | {cpu_of(r)} |")
    lines += ["", "## Commands and machines", ""]
    seen = set()
    for r in rows:
        key = (r["machine"], r["versions"])
        if key not in seen:
            seen.add(key)
            lines.append(f"- {r['machine']}; {r['versions']}")
    lines += ["", "Each row's command (`nice -n 5` in front when run beside other work):", ""]
    lines += [f"- {r['dataset']} / {_name(r)} / seed {r['seed']} ({r['date']}): `{r['command']}`"
              for r in rows if r["at"] == max(x["at"] for x in rows if row_key(x)[:4] + row_key(x)[7:8] == row_key(r)[:4] + row_key(r)[7:8])]
    return "\n".join(lines) + "\n"


def plot(rows: list[dict], path: Path = PNG) -> None:
    """Per data set and budget: every seed's image and pixel AUROC per variant (dots), mean ± SD (bar)."""
    from apmask_lib.viz.figure import pyplot, save_figure

    plt = pyplot()

    summary = summarise(rows)
    panels = sorted({(s["dataset"], s["epochs"], s["at"], tuple(s["scales"])) for s in summary},
                    key=lambda p: (list(DATASETS).index(p[0]), p[1], p[2], len(p[3])))
    if not panels:
        return
    fig, axes = plt.subplots(len(panels), 2, figsize=(11, 2.6 * len(panels) + 0.6), squeeze=False)
    for row_axes, (ds, ep, at, sc) in zip(axes, panels):
        ss = [s for s in summary if (s["dataset"], s["epochs"], s["at"], tuple(s["scales"])) == (ds, ep, at, sc)]
        for ax, m in zip(row_axes, ("image_auroc", "pixel_auroc")):
            for i, s in enumerate(ss):
                vals = [r[m] for r in rows if group_key(r) == s["key"] and r[m] is not None]
                ax.scatter([i] * len(vals), vals, s=14, alpha=0.7)
                if s[m]["sd"] is not None:
                    ax.errorbar([i + 0.15], [s[m]["mean"]], yerr=[s[m]["sd"]], fmt="o", color="black", capsize=3, ms=3)
            two_cpus = len({s["cpu"] for s in ss}) > 1
            ax.set_xticks(range(len(ss)), [_name(s) + (f"\n{s['cpu']}" if two_cpus else "") for s in ss],
                          rotation=20, fontsize=7)
            ax.set_xlim(-0.5, len(ss) - 0.5)
            ax.set_title(f"{ds}, epoch {at} of {ep}, scales {'+'.join(map(str, sc))}: {m.replace('_', ' ')}", fontsize=8)
            ax.set_ylabel("%")
            ax.grid(alpha=0.3)
    machines = sorted({r["machine"].split(";")[0] for r in rows})
    fig.suptitle("Seed spread of the paper method (dots: seeds; black: mean ± SD). " + " / ".join(machines), fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    save_figure(fig, path)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--datasets", nargs="+", default=["bottle"], choices=list(DATASETS))
    ap.add_argument("--variants", nargs="+", default=[BASE], choices=list(VARIANTS))
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    ap.add_argument("--epochs", type=int, default=20, help="fine-tuning epochs (the schedule)")
    ap.add_argument("--at", type=int, nargs="+", default=None,
                    help="epochs at which the run is evaluated (default: the last); the schedule stays that of --epochs")
    ap.add_argument("--max-train", type=int, default=48, help="training images (after the held-out slice)")
    ap.add_argument("--scales", type=int, nargs="+", default=[224], help="test scales")
    ap.add_argument("--backbone", default="dinov2-s14-offline")
    ap.add_argument("--init", default=None, help="fine-tune from this backbone (file:PATH) instead of --backbone")
    ap.add_argument("--tag", default="", help="names the starting point given by --init in the report")
    ap.add_argument("--keep-weights", action="store_true", help="keep checkpoint.pt / model.pt of each run")
    ap.add_argument("--progress", action="store_true")
    ap.add_argument("--report", action="store_true", help="only render the report and figure from the JSON")
    args = ap.parse_args(argv)
    args.at = sorted(set(args.at or [args.epochs]))
    if not all(1 <= a <= args.epochs for a in args.at):
        ap.error(f"--at epochs must lie in 1..{args.epochs}")
    if args.init and not args.tag:
        ap.error("--init needs --tag (how the report names that starting point)")
    logging.basicConfig(level=logging.WARNING)
    warnings.filterwarnings("ignore", category=UserWarning)
    if not args.report:
        done = {row_key(r) for r in load_rows()}
        here = cpu_of({"machine": machine("cpu")})
        for dataset in args.datasets:
            ensure_data(dataset)
            for variant in args.variants:
                for seed in args.seeds:
                    keys = {(dataset, variant, args.tag, args.epochs, at, args.max_train, tuple(args.scales), here, seed)
                            for at in args.at}
                    if keys <= done:
                        continue
                    rows = run_one(dataset, variant, seed, args)
                    save_rows(rows)
                    for row in rows:
                        print(f"{dataset} {variant} epoch {row['at']}/{args.epochs} s{seed}: "
                              + " / ".join(_f(row[m], 2) for m in METRICS)
                              + f"  ({row['finetune_s']:.0f} + {row['evaluate_s']:.0f} s, load {row['load_start'][0]:.1f})",
                              flush=True)
    rows = load_rows()
    atomic_write_text(MD, render(rows))
    plot(rows)
    print(MD.read_text())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
