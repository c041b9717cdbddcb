"""Does APMask pre-training collapse, and which change stops it? (issue 13 §2b; a benchmark, not a test)

Short pre-trainings at the demo's small settings (``params.yaml``: 112 px, batch 8, 4 local crops of
56 px; ``--epochs`` 3 and ``--max-train`` 24 images per data set, so every data set gets the same 9 steps)
for each variant of the SwAV objective, on the demo textures, MVTec AD bottle and the NIH subset
(``../shared/data``). Per epoch, the collapse diagnostics that pre-training logs
(``pretrain/log.jsonl``; :mod:`apmask_lib.pretrain.collapse`) are tabulated into ``results/collapse.json`` /
``results/collapse.md`` with the command, machine and load average.

Variants (``--variants``; config overrides of ``pretrain``):

* ``base``: today's defaults (``sinkhorn_eps`` 0.05, ``n_prototypes`` 20, no queue),
* ``eps0.02`` / ``eps0.01`` / ``eps0.003``: a smaller Sinkhorn ε (sharper codes for the same teacher
  scores; the teacher's scores differ between images by ~0.015, so ε must approach that to matter),
* ``K8``: K = 8 prototypes = the batch size (K ≤ B),
* ``queue32``: SwAV's queue of the last 32 teacher embeddings in Sinkhorn (``pretrain.queue_length``),
* ``eps0.01+queue32`` / ``eps0.003+queue32``: both,
* ``bn``: a BatchNorm1d after every hidden layer of the projection head (``pretrain.head_norm``, SwAV's
  head): the batch mean of the [CLS] features, common to one category's images, is removed before
  the prototypes, so the teacher's scores can differ between images from the first step,
* ``freeze3`` / ``freeze5``: the prototypes frozen for the first 3 / 5 steps, i.e. the first epoch of the
  short / long runs (``pretrain.freeze_prototypes_iters``, SwAV's ``freeze_prototypes_niters`` = 1 epoch),
* ``bn+freeze3``, ``bn+freeze5``, ``bn+queue32``, ``bn+eps0.01+queue32``: combinations,
* ``same-view``: ``pretrain.teacher_view: same`` (the student's global view is the teacher's own crop, masked);
  the control of ``--init``'s own-image retrieval, which must then be high for the global views.

``--init`` measures instead, without training, the collapse statistics of epoch 0's batches (the run's own
views, the freshly initialised networks) for each variant, plus how much of the [CLS] features' and of the
projection outputs' energy varies across the batch (``centred_fraction`` = mean ‖f_b − f̄‖² / mean ‖f_b‖²):
the test of the hypothesis that a category's images share a large common [CLS] component that the
un-normalised head passes on to the prototype scores; and whether a student view finds its own image among
the teacher views (``own_image_retrieval``): is there anything for the swapped prediction to learn?

What counts as a fix (docs/experiments.md): on EVERY data set the teacher spread grows over the epochs (instead of
shrinking) or the agreement of the student's arg-max with the codes rises above chance (1/K).

    OMP_NUM_THREADS=1 nice -n 19 .venv/bin/python -m benchmarks.collapse --variants base bn   # runs, then --report
    OMP_NUM_THREADS=1 nice -n 19 .venv/bin/python -m benchmarks.collapse --init --max-train 40 # step 0 only
    .venv/bin/python -m benchmarks.collapse --report
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import logging
import os
import shlex
import sys
import time
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]

from benchmarks.common import machine, scaled_warmup, versions  # noqa: E402

from apmask_lib.pretrain.collapse import STAT_COLUMNS  # noqa: E402
from apmask_lib.config import load_params  # noqa: E402
from apmask_lib.core.files import atomic_write_text  # noqa: E402

JSON = ROOT / "results" / "collapse.json"
MD = ROOT / "results" / "collapse.md"

VARIANTS = {
    "base": {},
    "eps0.02": {"sinkhorn_eps": 0.02},
    "eps0.01": {"sinkhorn_eps": 0.01},
    "K8": {"n_prototypes": 8},
    "queue32": {"queue_length": 32},
    "eps0.01+queue32": {"sinkhorn_eps": 0.01, "queue_length": 32},
    "eps0.003": {"sinkhorn_eps": 0.003},
    "eps0.003+queue32": {"sinkhorn_eps": 0.003, "queue_length": 32},
    "bn": {"head_norm": "batchnorm"},
    "freeze3": {"freeze_prototypes_iters": 3},
    "freeze5": {"freeze_prototypes_iters": 5},
    "bn+freeze3": {"head_norm": "batchnorm", "freeze_prototypes_iters": 3},
    "bn+freeze5": {"head_norm": "batchnorm", "freeze_prototypes_iters": 5},
    "bn+queue32": {"head_norm": "batchnorm", "queue_length": 32},
    "bn+eps0.01+queue32": {"head_norm": "batchnorm", "sinkhorn_eps": 0.01, "queue_length": 32},
    "same-view": {"teacher_view": "same"},  # control for --init: the student's global view is the teacher's crop, masked
}
# --profile -> (params file, what it sets); "paper" runs with the warm-up scaled to --epochs
PROFILES = {"demo": ("params.yaml", "params.yaml (demo: 112 px, batch 8, 4 local crops of 56 px, apmask r=0.3)"),
            "paper": ("params-paper.yaml", "params-paper.yaml (paper: 224 px, batch 16, 8 local crops of 96 px, "
                      "apmask r=0.3; warm-up scaled to the short run; backbone dinov2-s14-offline as the demo)")}
# name -> (dataset, root relative to the project, category)
DATASETS = {
    "brick": ("demo", "data/demo", "brick"),
    "grass": ("demo", "data/demo", "grass"),
    "gravel": ("demo", "data/demo", "gravel"),
    "bottle": ("mvtec", "../shared/data/mvtec_ad", "bottle"),
    "nih": ("nih", "../shared/data/nih_cxr14", "all"),
}


def variant_config(args, data: str, variant: str):
    """``params.yaml`` (the demo profile) with the data set, the image cap, the epochs and the variant's
    ``pretrain`` overrides; the run folder is ``<runs>/<data>/<variant>_e<epochs>_n<max_train>``."""
    kind, root, cat = DATASETS[data]
    root = Path(root) if Path(root).is_absolute() else (ROOT / root).resolve()
    tag = "" if args.profile == "demo" else f"_{args.profile}"
    ov = [f"data.dataset={kind}", f"data.root={root}", f"data.category={cat}", f"data.max_train={args.max_train}",
          f"pretrain.epochs={args.epochs}", "device=cpu", f"seed={args.seed}",
          f"out_dir={ROOT / args.runs / data / f'{variant}_e{args.epochs}_n{args.max_train}{tag}'}"]
    if args.profile == "paper":  # the paper's 10 warm-up epochs scaled to the short run (benchmarks.common); the
        # offline backbone of the demo runs (the paper's DINO ViT-S/16 needs a download)
        ov += [f"pretrain.warmup_epochs={scaled_warmup('pretrain', args.epochs)}", "backbone=dinov2-s14-offline"]
    ov += [f"pretrain.{k}={v}" for k, v in VARIANTS[variant].items()]
    return load_params(ROOT / PROFILES[args.profile][0], ov)


def run_one(args, data: str, variant: str) -> dict:
    from apmask_lib.pretrain.stage import run_pretrain

    cfg = variant_config(args, data, variant)
    load0 = os.getloadavg()
    t0 = time.perf_counter()
    out = run_pretrain(cfg, resume=True, progress=False)
    secs = time.perf_counter() - t0
    epochs = [json.loads(x) for x in (out / "log.jsonl").read_text().splitlines()]
    run = json.loads((out / "config.json").read_text())["_run"]
    return {"data": data, "variant": variant, "overrides": VARIANTS[variant], "k": cfg.pretrain.n_prototypes,
            "epochs_run": args.epochs, "max_train": args.max_train, "profile": args.profile,
            "n_train": run["n_train"], "batch": run["global_batch"], "iters_per_epoch": run["iters_per_epoch"],
            "epochs": [{k: e.get(k) for k in ("epoch", "loss") + STAT_COLUMNS} for e in epochs],
            "seconds": secs, "load_start": list(load0), "load_end": list(os.getloadavg())}


def centred_fraction(f: torch.Tensor) -> float:
    """mean_b ‖f_b − f̄‖² / mean_b ‖f_b‖² of (B, D) rows: the share of their energy that varies across the
    batch (0 = all rows equal, 1 = zero batch mean)."""
    f = f.float()
    return float(((f - f.mean(0)) ** 2).sum(1).mean() / (f ** 2).sum(1).mean().clamp_min(1e-12))


def own_image_retrieval(student: torch.Tensor, teacher: torch.Tensor) -> float:
    """Fraction of student rows (view-major: row v·B + b belongs to image b) whose most similar teacher row
    (cosine after subtracting the teacher rows' mean) is their own image's; chance 1/B. Does the feature
    tell the images of one batch apart across views at all?"""
    B = teacher.shape[0]
    mu = teacher.float().mean(0)
    sim = F.normalize(student.float() - mu, dim=1) @ F.normalize(teacher.float() - mu, dim=1).t()
    target = torch.arange(student.shape[0]) % B
    return float((sim.argmax(1) == target).float().mean())


def init_one(args, data: str, variant: str) -> dict:
    """Before any training: for every batch of epoch 0 (the run's own images, views and masks, seed 0)
    through the freshly built student/teacher, no update: the collapse statistics; the centred fractions
    of the teacher's [CLS] features and projection outputs; own-image retrieval
    (:func:`own_image_retrieval`) from the student's global / local views to the teacher views, on the
    [CLS] features and on the projections; the agreement of the student's arg-max prototype with the
    code's, per view kind. Each value is the mean over the epoch's batches."""
    from apmask_lib.pretrain.stage import build_pretrain_state, pretrain_loss, _epoch_order, _step_generator
    from apmask_lib.pretrain.sinkhorn import sinkhorn

    cfg = variant_config(args, data, variant)
    torch.manual_seed(cfg.seed)
    st = build_pretrain_state(cfg, device="cpu")
    B = st.global_batch
    perm = _epoch_order(cfg.seed, 0, st.n)
    cap: dict[str, torch.Tensor] = {}

    def keep(name):
        def hook(module, inputs, output) -> None:  # each head runs once per step (teacher: its B views)
            cap[name + "_in"], cap[name + "_out"] = inputs[0].detach(), output.detach()
        return hook

    hooks = [st.teacher.head.projection.register_forward_hook(keep("t")),
             st.student.head.projection.register_forward_hook(keep("s"))]
    load0 = os.getloadavg()
    rows = []
    try:
        for it in range(st.iters):
            idx = perm[it * B:(it + 1) * B]
            gen = _step_generator(cfg.seed, 0, it)
            views = st.crops(st.bank.images[idx], st.bank.sizes[idx], gen)
            stats: dict[str, torch.Tensor] = {}
            with torch.no_grad():
                loss = pretrain_loss(st.student, st.teacher, views, cfg.pretrain, gen, stats)
                codes = sinkhorn(st.teacher.head.prototypes(cap["t_out"]), cfg.pretrain.sinkhorn_eps,
                                 cfg.pretrain.sinkhorn_iters)
                s_arg = st.student.head.prototypes(cap["s_out"]).argmax(1)
            own = codes.argmax(1).repeat(s_arg.shape[0] // B)
            glob, loc = slice(0, B), slice(B, None)
            rows.append({"loss": float(loss), **{k: float(v) for k, v in stats.items()},
                         "cls_centred_fraction": centred_fraction(cap["t_in"]),
                         "z_centred_fraction": centred_fraction(cap["t_out"]),
                         "retrieval_cls_global": own_image_retrieval(cap["s_in"][glob], cap["t_in"]),
                         "retrieval_cls_local": own_image_retrieval(cap["s_in"][loc], cap["t_in"]),
                         "retrieval_z_global": own_image_retrieval(cap["s_out"][glob], cap["t_out"]),
                         "retrieval_z_local": own_image_retrieval(cap["s_out"][loc], cap["t_out"]),
                         "agreement_global": float((s_arg[glob] == own[glob]).float().mean()),
                         "agreement_local": float((s_arg[loc] == own[loc]).float().mean())})
    finally:
        for h in hooks:
            h.remove()
    return {"data": data, "variant": variant, "overrides": VARIANTS[variant], "k": cfg.pretrain.n_prototypes,
            "batch": B, "batches": len(rows), "n_train": st.n, "profile": args.profile,
            **{k: sum(r[k] for r in rows) / len(rows) for k in rows[0]}, "load": list(load0)}


def save_init(args, results: list[dict]) -> None:
    """Merge step-0 measurements into ``results/collapse.json`` (key ``init``, one row per data set and variant)."""
    data = json.loads(JSON.read_text()) if JSON.is_file() else {"runs": []}
    env = f"OMP_NUM_THREADS={os.environ['OMP_NUM_THREADS']} " if "OMP_NUM_THREADS" in os.environ else ""
    cmd = env + f"nice -n {os.getpriority(os.PRIO_PROCESS, 0)} .venv/bin/python -m benchmarks.collapse " + \
        " ".join(shlex.quote(a) for a in args.argv)
    def key(r: dict) -> tuple:
        return r["data"], r["variant"], r.get("n_train"), r.get("profile", "demo")

    new = {key(r) for r in results}
    data["init"] = [r for r in data.get("init", []) if key(r) not in new] + \
        [{**r, "command": cmd, "machine": machine("cpu"), "date": dt.datetime.now().isoformat(timespec="seconds")}
         for r in results]
    atomic_write_text(JSON, json.dumps(data, indent=1))


def verdict(r: dict) -> dict:
    """Per run: does the teacher spread grow (last epoch > first) and is the agreement above chance
    (mean of the last two epochs > 1/K + 0.05)? Both from the logged per-epoch means."""
    e = r["epochs"]
    chance = 1.0 / r["k"]
    agree = sum(x["agreement"] for x in e[-2:]) / len(e[-2:])
    return {"spread_grows": e[-1]["teacher_spread"] > e[0]["teacher_spread"],
            "agreement_above_chance": agree > chance + 0.05, "chance": chance, "late_agreement": agree}


def _key(r: dict) -> tuple:
    """A run's identity in the JSON: data set, variant, epochs, image cap."""
    return r["data"], r["variant"], r.get("epochs_run"), r.get("max_train"), r.get("profile", "demo")


def _name(r: dict) -> str:
    """The variant as the report names it; runs of another profile than the demo's are marked."""
    prof = r.get("profile", "demo")
    return r["variant"] + ("" if prof == "demo" else f" [{prof} profile, batch {r['batch']}]")


def save(args, results: list[dict]) -> None:
    data = json.loads(JSON.read_text()) if JSON.is_file() else {"runs": []}
    env = f"OMP_NUM_THREADS={os.environ['OMP_NUM_THREADS']} " if "OMP_NUM_THREADS" in os.environ else ""
    cmd = env + f"nice -n {os.getpriority(os.PRIO_PROCESS, 0)} .venv/bin/python -m benchmarks.collapse " + \
        " ".join(shlex.quote(a) for a in args.argv)
    old_setting = data.get("setting", {})
    data["runs"] = [{"epochs_run": old_setting.get("epochs"), "max_train": old_setting.get("max_train"), **r,
                     "command": r.get("command", data.get("command"))} for r in data["runs"]]
    new = {_key(r) for r in results}
    data["runs"] = [r for r in data["runs"] if _key(r) not in new] + [{**r, "command": cmd} for r in results]
    data.update({"command": cmd,
                 "machine": machine("cpu"),
                 "versions": versions(), "date": dt.datetime.now().isoformat(timespec="seconds"),
                 "setting": {"profile": "params.yaml (demo: 112 px, batch 8, 4 local crops of 56 px, apmask r=0.3)",
                             "epochs": args.epochs, "max_train": args.max_train, "seed": args.seed}})
    JSON.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(JSON, json.dumps(data, indent=1))


def report() -> None:
    data = json.loads(JSON.read_text())
    s = data["setting"]
    lines = ["# Pre-training collapse: variants of the SwAV objective (issue 13 §2b)", "",
             f"Generated {dt.datetime.now().isoformat(timespec='seconds')} by `benchmarks/collapse.py --report` from "
             "`results/collapse.json`.", "",
             "Commands (each run's own in the JSON): " + "; ".join(
                 f"`{c}`" for c in dict.fromkeys(r.get("command", data["command"]) for r in data["runs"])) + "  ",
             f"Machine: {data['machine']}; {data['versions']}; {data['date']}.  ",
             f"Setting: {PROFILES['demo'][1]}; runs marked [paper profile]: {PROFILES['paper'][1]}; "
             "epochs and the training-image cap per run (below), "
             f"seed {s['seed']}; backbone `dinov2-s14-offline`. Columns are per-epoch means of the per-step "
             "diagnostics of `apmask_lib/pretrain/collapse.py` (code entropy: ln K = uniform codes; teacher spread: std over "
             "the batch of the teacher's prototype scores; proto perplexity: K = all prototypes used equally; "
             "agreement: student arg-max = code arg-max, chance = 1/K).", "",
             "A variant fixes the collapse if, on every data set, the teacher spread grows from the first to the "
             "last epoch or the agreement of the last two epochs is above chance + 0.05.", "",
             "## Verdict per run", "",
             "| data | variant | epochs × steps | K | ln K | loss first → last | code entropy last | teacher spread first → last | "
             "agreement last 2 (chance) | spread grows | agreement > chance | s | load 1 min start/end |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    import math
    for r in data["runs"]:
        v, e = verdict(r), r["epochs"]
        lines.append(f"| {r['data']} | {_name(r)} | {r.get('epochs_run', s['epochs'])} × {r['iters_per_epoch']} | {r['k']} | {math.log(r['k']):.3f} | {e[0]['loss']:.3f} → "
                     f"{e[-1]['loss']:.3f} | {e[-1]['code_entropy']:.3f} | {e[0]['teacher_spread']:.4f} → "
                     f"{e[-1]['teacher_spread']:.4f} | {v['late_agreement']:.2f} ({v['chance']:.2f}) | "
                     f"{'yes' if v['spread_grows'] else 'no'} | {'yes' if v['agreement_above_chance'] else 'no'} | "
                     f"{r['seconds']:.0f} | {r['load_start'][0]:.1f} / {r['load_end'][0]:.1f} |")
    init = data.get("init", [])
    if init:
        lines += ["", "## Step 0, before any training (`--init`)", "",
                  "Every batch of epoch 0 of each data set (its own images, views and masks at seed 0) through the freshly "
                  "built student and teacher, no update; means over the batches. Centred fraction: mean ‖f_b − f̄‖² / mean ‖f_b‖² over the batch, "
                  "of the teacher's [CLS] features (the head's input) and of its l2-normalised projection outputs z (what "
                  "the prototypes score); 0 = every image alike. Commands: " + "; ".join(
                      f"`{c}`" for c in dict.fromkeys(r["command"] for r in init)) + f"; machine {init[-1]['machine']}.", "",
                  "| data | variant | images (B × batches) | [CLS] centred fraction | z centred fraction | teacher spread | code entropy (ln K) | "
                  "loss | own image found from global / local views: [CLS] | z | agreement global / local | load 1 min |",
                  "|---|---|---|---|---|---|---|---|---|---|---|---|"]
        for r in init:
            ret = (f"{r['retrieval_cls_global']:.2f} / {r['retrieval_cls_local']:.2f} | {r['retrieval_z_global']:.2f} / "
                   f"{r['retrieval_z_local']:.2f} | {r['agreement_global']:.2f} / {r['agreement_local']:.2f}"
                   if "retrieval_cls_global" in r else "— | — | —")
            lines.append(f"| {r['data']} | {_name(r)} | {r.get('n_train', r['batch'])} ({r['batch']} × {r.get('batches', 1)}) | {r['cls_centred_fraction']:.3f} | "
                         f"{r['z_centred_fraction']:.3f} | {r['teacher_spread']:.4f} | {r['code_entropy']:.3f} "
                         f"({math.log(r['k']):.3f}) | {r.get('loss', float('nan')):.3f} | {ret} | {r['load'][0]:.1f} |")
        lines.append("")
        lines.append("Own-image retrieval: the fraction of the student's views whose most similar teacher view (cosine, "
                     "centred on the teacher views' mean) is of the same image, chance 1/B; agreement: the student's "
                     "arg-max prototype = the image's arg-max code, chance 1/K.")
    lines += ["", "## Per epoch", ""]
    for r in data["runs"]:
        lines += [f"### {r['data']} / {_name(r)}, {r.get('epochs_run', s['epochs'])} epochs (overrides {r['overrides'] or 'none'}; {r['n_train']} images, "
                  f"batch {r['batch']}, {r['iters_per_epoch']} steps per epoch)", "",
                  "| epoch | loss | code entropy | student entropy | teacher spread | proto perplexity | protos used | "
                  "agreement |", "|---|---|---|---|---|---|---|---|"]
        for x in r["epochs"]:
            lines.append(f"| {x['epoch']} | {x['loss']:.3f} | {x['code_entropy']:.3f} | {x['student_entropy']:.3f} | "
                         f"{x['teacher_spread']:.4f} | {x['proto_perplexity']:.1f} | {x['protos_used']:.1f} | "
                         f"{x['agreement']:.2f} |")
        lines.append("")
    atomic_write_text(MD, "\n".join(lines) + "\n")
    print("\n".join(lines[:16 + len(data["runs"])]))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data", nargs="+", default=["brick", "bottle", "nih"], choices=sorted(DATASETS))
    ap.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--max-train", type=int, default=24, help="training images per data set (the demo has 40; 24 = 3 steps per epoch)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--profile", choices=sorted(PROFILES), default="demo",
                    help="demo = params.yaml's small settings; paper = params-paper.yaml (224 px, batch 16)")
    ap.add_argument("--runs", default="runs/collapse")
    ap.add_argument("--report", action="store_true", help="render results/collapse.md from the JSON only")
    ap.add_argument("--init", action="store_true", help="measure step 0 without training (module docstring), then --report")
    args = ap.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(level=logging.WARNING)
    warnings.filterwarnings("ignore", category=UserWarning)
    if args.init and not args.report:
        rows = []
        for variant in args.variants:
            for data in args.data:
                r = init_one(args, data, variant)
                print(f"step 0 {data} / {variant}: [CLS] centred {r['cls_centred_fraction']:.3f}, z centred "
                      f"{r['z_centred_fraction']:.3f}, spread {r['teacher_spread']:.4f}, code entropy "
                      f"{r['code_entropy']:.3f}", flush=True)
                rows.append(r)
        save_init(args, rows)
    elif not args.report:
        for variant in args.variants:  # variant-major: an interrupted call still covers every data set per variant
            for data in args.data:
                r = run_one(args, data, variant)
                v = verdict(r)
                print(f"{data} / {variant}: loss {r['epochs'][0]['loss']:.3f} -> {r['epochs'][-1]['loss']:.3f}, spread "
                      f"{r['epochs'][0]['teacher_spread']:.4f} -> {r['epochs'][-1]['teacher_spread']:.4f}, agreement "
                      f"{v['late_agreement']:.2f} (chance {v['chance']:.2f}), {r['seconds']:.0f} s, "
                      f"load {r['load_start'][0]:.1f}", flush=True)
                save(args, [r])
    report()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
