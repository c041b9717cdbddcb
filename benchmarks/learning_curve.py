"""Learning curves of the paper method on real MVTec AD bottle (a benchmark, not a test).

The paper configuration (``params-paper.yaml``: 224 px, batch 16, attention-guided anomalies,
0.95 BCE + 0.05 Dice, six test scales) is fine-tuned in ONE run per curve, and the detector is
evaluated at chosen epochs of that run (``--at``, default 2 5 10 20): the run stops at each point
(``run_finetune(max_steps=...)``; the schedule stays that of the full ``--epochs`` run and the next
call continues it exactly), the detector is copied to ``model_e<E>.pt`` and evaluated.

Curves (``--curve``):

* ``dino``: fine-tuned from the backbone itself, no pre-training (the paper's "DINO" rows of
  Tables 2/3),
* ``apmask``: from APMask pre-training of ``--pretrain-epochs`` epochs on the same training images.

The backbone ``dinov2-s14-offline`` stands in for DINO ViT-S/16 (offline machine; docs/data.md,
"Backbones"). Warm-up epochs are scaled from the paper's (10 of 100 fine-tuning, 10 of 300
pre-training) and are at least 1 (``quality.scaled_warmup``).

Cost caps for a 2-core CPU (say so with the results): ``--max-train`` training images (the
held-out validation slice, ``finetune.val_fraction``, is taken first from all 209), intermediate
points at ``--scales`` (default 224 only), the last point at the paper's six scales.

Each call adds its points to ``results/learning_curve.json`` (per curve; a point measured again at the
same epoch and number of scales replaces the old one, the others are kept, each with its own command),
with the command, machine and load average; ``--report`` renders ``results/learning_curve.md`` and
``results/figures/learning_curve.png`` (paper's bottle 99.1 / 97.8 and the measured peers of
``results/peers.json`` as horizontal lines)::

    nice -n 5 .venv/bin/python -m benchmarks.learning_curve --curve dino
    nice -n 5 .venv/bin/python -m benchmarks.learning_curve --curve apmask
    .venv/bin/python -m benchmarks.learning_curve --report
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import logging
import os
import shlex
import shutil
import sys
import time
import warnings
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]

from benchmarks.common import METRICS, iters_per_epoch, scaled_warmup, spread_lines, versions, machine  # noqa: E402

from apmask_lib.config import load_params  # noqa: E402
from apmask_lib.core.devices import resolve_device  # noqa: E402
from apmask_lib.core.files import atomic_write_text  # noqa: E402

JSON = ROOT / "results" / "learning_curve.json"
MD = ROOT / "results" / "learning_curve.md"
PNG = ROOT / "results" / "figures" / "learning_curve.png"
PAPER_SCALES = (224, 320, 384, 416, 448, 512)


def curve_config(args, out_dir: Path, init: str):
    """params-paper.yaml with this machine's backbone/data/caps and the curve's schedule."""
    root = Path(args.data_root)
    root = root if root.is_absolute() else (ROOT / root).resolve()
    ov = [f"backbone={args.backbone}", f"device={args.device}", f"seed={args.seed}", f"out_dir={out_dir}",
          f"data.root={root}", f"data.category={args.category}", f"data.max_train={args.max_train}",
          f"finetune.epochs={args.epochs}", f"finetune.warmup_epochs={scaled_warmup('finetune', args.epochs)}",
          f"finetune.init={init}", f"finetune.num_workers={args.workers}",
          f"pretrain.epochs={args.pretrain_epochs}",
          f"pretrain.warmup_epochs={scaled_warmup('pretrain', args.pretrain_epochs)}",
          f"pretrain.num_workers={args.workers}"]
    return load_params(ROOT / "params-paper.yaml", ov)


def run_curve(args) -> dict:
    from apmask_lib.config import replace
    from apmask_lib.evaluate.stage import run_evaluate
    from apmask_lib.finetune.stage import run_finetune
    from apmask_lib.pretrain.stage import run_pretrain

    base = ROOT / args.runs / f"{args.category}_seed{args.seed}"
    times = {}
    if args.curve == "apmask":
        pcfg = curve_config(args, base / "apmask", args.backbone)
        t0 = time.perf_counter()
        pdir = run_pretrain(pcfg, resume=True, progress=args.progress)
        times["pretrain_s"] = time.perf_counter() - t0
        init = f"file:{pdir / 'backbone.pt'}"
    else:
        init = args.backbone
    cfg = curve_config(args, base / args.curve, init)
    iters = iters_per_epoch(cfg)
    fdir = Path(cfg.out_dir) / "finetune"
    points = []
    for e in sorted(args.at):
        load0 = os.getloadavg()
        t0 = time.perf_counter()
        run_finetune(cfg, max_steps=e * iters, resume=True, progress=args.progress)
        t_ft = time.perf_counter() - t0
        snap = fdir / f"model_e{e}.pt"
        shutil.copyfile(fdir / "model.pt", snap)
        scales = PAPER_SCALES if e == max(args.at) else tuple(args.scales)
        ecfg = replace(cfg, out_dir=str(base / f"{args.curve}_eval_e{e}"), evaluate={"scales": scales})
        t0 = time.perf_counter()
        m = run_evaluate(ecfg, model_path=snap)
        t_ev = time.perf_counter() - t0
        logs = [json.loads(x) for x in (fdir / "log.jsonl").read_text().splitlines()]
        last = logs[-1] if logs else {}
        point = {"epoch": e, "steps": e * iters, "scales": list(scales),
                 **{k: (None if m.get(k) is None else 100 * m[k]) for k in METRICS},
                 "train_acc": last.get("acc"), "val_acc": last.get("val_acc"), "val_auroc": last.get("val_auroc"),
                 "val_dice": last.get("val_dice"), "loss_det": last.get("loss_det"), "loss_seg": last.get("loss_seg"),
                 "finetune_s": t_ft, "evaluate_s": t_ev, "load_start": list(load0), "load_end": list(os.getloadavg())}
        points.append(point)
        print(f"{args.curve} epoch {e}: " + " / ".join("nan" if point[k] is None else f"{point[k]:.2f}" for k in METRICS)
              + f"  train acc {point['train_acc']}, val auroc {point['val_auroc']}, ft {t_ft:.0f} s, eval {t_ev:.0f} s, "
              f"load {load0[0]:.1f}", flush=True)
        save_curve(args, points, times, iters, cfg)
    return {"points": points}


def run_untrained(args) -> None:
    """Epoch 0 of the ``dino`` curve, one test scale at a time: the detector before any fine-tuning
    (segmentation = the backbone's last-layer [CLS] attention, log of the heads' geometric mean; detection
    head random). Does that attention carry the defects at some scale? Stored under curve ``untrained``."""
    from apmask_lib.config import replace
    from apmask_lib.evaluate.stage import run_evaluate
    from apmask_lib.finetune.stage import build_detector, initial_backbone
    from apmask_lib.weights import save_detector
    from apmask_lib.core.rng import seed_everything

    base = ROOT / args.runs / f"{args.category}_seed{args.seed}"
    cfg = curve_config(args, base / "untrained", args.backbone)
    seed_everything(cfg.seed)
    path = base / "untrained" / "model_e0.pt"
    path.parent.mkdir(parents=True, exist_ok=True)
    save_detector(path, build_detector(cfg, initial_backbone(cfg)), cfg.to_dict(), meta={"step": 0, "done": False})
    points = []
    for s_ in args.untrained_scales:
        load0 = os.getloadavg()
        t0 = time.perf_counter()
        m = run_evaluate(replace(cfg, out_dir=str(base / f"untrained_eval_{s_}"), evaluate={"scales": (s_,)}),
                         model_path=path)
        points.append({"epoch": 0, "steps": 0, "scales": [s_], **{k: (None if m.get(k) is None else 100 * m[k])
                                                                   for k in METRICS},
                       "train_acc": None, "val_acc": None, "val_auroc": None, "val_dice": None, "finetune_s": 0.0,
                       "evaluate_s": time.perf_counter() - t0, "load_start": list(load0),
                       "load_end": list(os.getloadavg())})
        print(f"untrained, scale {s_}: " + " / ".join(f"{points[-1][k]:.2f}" for k in METRICS), flush=True)
        args.curve = "untrained"
        save_curve(args, points, {}, 0, cfg)


def run_six_scales(args) -> None:
    """Re-evaluate the saved snapshot ``model_e<E>.pt`` of ``--curve`` at the paper's six scales (for a
    curve whose run was stopped before its last point) and add it to the curve's points."""
    from apmask_lib.config import replace
    from apmask_lib.evaluate.stage import run_evaluate

    e = args.six_scales_at
    base = ROOT / args.runs / f"{args.category}_seed{args.seed}"
    snap = base / args.curve / "finetune" / f"model_e{e}.pt"
    if not snap.is_file():
        raise SystemExit(f"{snap} not found: run the curve to epoch {e} first")
    data = json.loads(JSON.read_text())
    curve = data["curves"][args.curve]
    point = dict(next(p for p in curve["points"] if p["epoch"] == e))
    init = args.backbone if args.curve == "dino" else f"file:{base / 'apmask' / 'pretrain' / 'backbone.pt'}"
    cfg = curve_config(args, base / args.curve, init)
    load0 = os.getloadavg()
    t0 = time.perf_counter()
    m = run_evaluate(replace(cfg, out_dir=str(base / f"{args.curve}_eval_e{e}_six"), evaluate={"scales": PAPER_SCALES}),
                     model_path=snap)
    point.update({"scales": list(PAPER_SCALES), **{k: (None if m.get(k) is None else 100 * m[k]) for k in METRICS},
                  "finetune_s": 0.0, "evaluate_s": time.perf_counter() - t0, "load_start": list(load0),
                  "load_end": list(os.getloadavg())})
    # stored as its own entry "<curve>@6": a running curve process rewrites its own entry at every point
    data = json.loads(JSON.read_text())
    six = data["curves"].get(f"{args.curve}@6") or {**curve, "points": [], "times": {}}
    six["points"] = sorted([p for p in six["points"] if p["epoch"] != e] + [point], key=lambda p: p["epoch"])
    six["command"] = "nice -n 5 .venv/bin/python -m benchmarks.learning_curve " + " ".join(
        shlex.quote(a) for a in args.argv) + f"   (snapshot of: {curve['command']})"
    six["date"] = dt.datetime.now().isoformat(timespec="seconds")
    data["curves"][f"{args.curve}@6"] = six
    atomic_write_text(JSON, json.dumps(data, indent=1))
    print(f"{args.curve} epoch {e}, six scales: " + " / ".join(f"{point[k]:.2f}" for k in METRICS), flush=True)


def merge_points(old: list[dict], new: list[dict], old_command: str | None) -> list[dict]:
    """A curve's points after a call: the new ones, plus every earlier one whose (epoch, number of scales)
    the call did not measure again (a later call ``--at 15 20`` keeps epochs 2/5/10 of an earlier one).
    Earlier points without their own ``command`` get the curve's earlier command, so each point keeps
    the command that produced it. Sorted by (epoch, number of scales)."""
    seen = {(p["epoch"], len(p["scales"])) for p in new}
    kept = [{**p, "command": p.get("command", old_command)} for p in old
            if (p["epoch"], len(p["scales"])) not in seen]
    return sorted(new + kept, key=lambda p: (p["epoch"], len(p["scales"])))


def save_curve(args, points, times, iters, cfg) -> None:
    data = json.loads(JSON.read_text()) if JSON.is_file() else {"curves": {}}
    cmd = "nice -n 5 .venv/bin/python -m benchmarks.learning_curve " + " ".join(shlex.quote(a) for a in args.argv)
    old = data["curves"].get(args.curve, {})
    points = [{**p, "command": p.get("command", cmd)} for p in points]
    data["curves"][args.curve] = {
        "command": cmd, "extra_commands": old.get("extra_commands", []),
        "points": merge_points(old.get("points", []), points, old.get("command")), "times": {**old.get("times", {}), **times},
        "iters_per_epoch": iters,
        "setting": {"category": args.category, "seed": args.seed, "epochs": args.epochs, "max_train": args.max_train,
                    "pretrain_epochs": args.pretrain_epochs if args.curve == "apmask" else 0,
                    "backbone": args.backbone, "intermediate_scales": list(args.scales),
                    "val_fraction": cfg.finetune.val_fraction, "val_max_images": cfg.finetune.val_max_images,
                    "finetune_lr": cfg.finetune.lr, "seg_weight": cfg.finetune.seg_weight,
                    "warmup_epochs": cfg.finetune.warmup_epochs},
        "machine": machine(resolve_device(args.device)),
        "versions": versions(), "date": dt.datetime.now().isoformat(timespec="seconds")}
    JSON.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(JSON, json.dumps(data, indent=1))


def peer_lines(peers_json: Path = ROOT / "results" / "peers.json", category: str = "bottle") -> list[dict]:
    """Measured peers (benchmarks/peers.py) for the horizontal lines: name + the three metrics, of the runs on
    the whole training set (rows with a ``max_train`` cap are other settings)."""
    if not peers_json.is_file():
        return []
    rows = json.loads(peers_json.read_text()).get("rows", [])
    return [{"name": r["name"], **{k: r.get(k) for k in METRICS}} for r in rows
            if r.get("category") == category and r.get("max_train") is None]


def report() -> None:
    from apmask_lib.report.reference import OURS, paper_value
    from apmask_lib.viz.curves import learning_curve_figure

    data = json.loads(JSON.read_text())
    paper = {k: paper_value(1, OURS, "bottle", k) for k in METRICS}
    peers = peer_lines()
    PNG.parent.mkdir(parents=True, exist_ok=True)
    learning_curve_figure(data["curves"], paper, peers, PNG)
    lines = ["# Learning curves of the paper method on MVTec AD bottle (CPU)", "",
             f"Generated {dt.datetime.now().isoformat(timespec='seconds')} by `benchmarks/learning_curve.py --report` "
             "from `results/learning_curve.json`; figure `results/figures/learning_curve.png`.", "",
             "Backbone `dinov2-s14-offline` (DINOv2 ViT-S/14 offline) **stands in for the paper's DINO ViT-S/16**. "
             "Metrics in % (image AUROC / pixel AUROC / AU-PRO at FPR ≤ 0.3) on the full bottle test set "
             "(83 images). Each curve is ONE fine-tuning run evaluated at the listed epochs; the schedule "
             "(warm-up, cosine) is that of the whole run.", ""] + spread_lines("bottle", 20, 48)
    for name, c in data["curves"].items():
        s = c["setting"]
        titles = {"dino": "fine-tuned from the backbone, no pre-training (paper's 'DINO' setting)",
                  "apmask": f"APMask pre-training {s['pretrain_epochs']} epoch(s), then fine-tuned",
                  "untrained": "the detector before fine-tuning (backbone attention as the map), one scale per row"}
        title = titles.get(name) or f"snapshots of the {name[:-2]} curve re-evaluated at the six paper scales"
        by_cmd: dict[str, list[int]] = {}
        for p in c["points"]:
            by_cmd.setdefault(p.get("command", c["command"]), []).append(p["epoch"])
        cmds = [f"Command: `{x}`" + ("" if len(by_cmd) == 1 else f" (epochs {', '.join(map(str, e))})") + "  "
                for x, e in by_cmd.items()]
        lines += [f"## {name}: {title}", ""] + cmds + [f"Six-scale re-evaluation of a snapshot: `{x}`  "
                                                           for x in c.get("extra_commands", [])] + [ f"Machine: {c['machine']}; {c['versions']}; {c['date']}.  ",
                  f"Setting: seed {s['seed']}, {s['epochs']} fine-tuning epochs in the run ({c['iters_per_epoch']} steps "
                  f"of 16 per epoch), **training images capped at {s['max_train']}** (of 209; the validation slice "
                  f"val_fraction={s['val_fraction']} / ≤ {s['val_max_images']} images is held out first), "
                  f"peak LR {s['finetune_lr']}, λ_seg {s['seg_weight']}, warm-up {s['warmup_epochs']} epoch(s); "
                  f"intermediate points at scales {s['intermediate_scales']}, the last at the six paper scales."
                  + (f" Pre-training took {c['times'].get('pretrain_s', 0):.0f} s." if c["times"] else ""), "",
                  "| epoch | steps | scales | image AUROC | pixel AUROC | AU-PRO | train acc | val acc | val AUROC | "
                  "val Dice | fine-tune s (this segment) | eval s | load avg (1 min) start/end |",
                  "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
        for p in c["points"]:
            f2 = lambda v, m=1.0: "—" if v is None else f"{m * v:.2f}"  # noqa: E731
            lines.append(f"| {p['epoch']} | {p['steps']} | {len(p['scales'])} | " + " | ".join(f2(p[k]) for k in METRICS)
                         + f" | {f2(p['train_acc'], 100)} | {f2(p['val_acc'], 100)} | {f2(p['val_auroc'], 100)} | "
                         f"{f2(p['val_dice'], 100)} | {p['finetune_s']:.0f} | {p['evaluate_s']:.0f} | "
                         f"{p['load_start'][0]:.1f} / {p['load_end'][0]:.1f} |")
        lines.append("")
    lines += ["Reference lines: the paper's Table 1 bottle figures for APMask ("
              + " / ".join("—" if paper[k] is None else f"{paper[k]}" for k in METRICS) + ") and the peers measured by "
              "`benchmarks/peers.py` (`results/peers.json`):", ""]
    lines += [f"- {p['name']}: " + " / ".join("—" if p[k] is None else f"{p[k]:.2f}" for k in METRICS) for p in peers]
    atomic_write_text(MD, "\n".join(lines) + "\n")
    print("\n".join(lines))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--curve", choices=("dino", "apmask"))
    ap.add_argument("--report", action="store_true", help="render the table and figure from the JSON only")
    ap.add_argument("--category", default="bottle")
    ap.add_argument("--data-root", default="../shared/data/mvtec_ad")
    ap.add_argument("--epochs", type=int, default=20, help="fine-tuning epochs of the run (its schedule)")
    ap.add_argument("--at", type=int, nargs="+", default=[2, 5, 10, 20], help="epochs evaluated")
    ap.add_argument("--pretrain-epochs", type=int, default=3)
    ap.add_argument("--max-train", type=int, default=48)
    ap.add_argument("--scales", type=int, nargs="+", default=[224], help="test scales of the intermediate points")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--backbone", default="dinov2-s14-offline")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--workers", type=int, default=0)
    ap.add_argument("--runs", default="runs/learning_curve")
    ap.add_argument("--progress", action="store_true")
    ap.add_argument("--six-scales-at", type=int, default=None,
                    help="with --curve: re-evaluate that curve's saved snapshot of this epoch at the six scales")
    ap.add_argument("--untrained-scales", type=int, nargs="+", default=None,
                    help="instead of a curve: evaluate the detector before fine-tuning, one scale at a time")
    args = ap.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(level=logging.WARNING)
    warnings.filterwarnings("ignore", category=UserWarning)
    if args.report:
        report()
        return 0
    if args.six_scales_at is not None:
        run_six_scales(args)
        return 0
    if args.untrained_scales:
        run_untrained(args)
        return 0
    if not args.curve:
        ap.error("--curve, --untrained-scales or --report")
    if max(args.at) > args.epochs:
        ap.error("--at epochs must not exceed --epochs")
    run_curve(args)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
