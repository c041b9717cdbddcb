"""Speed of the three stages on one device: step times, images/s and model FLOP utilisation (not a test).

What it measures, on real MVTec AD bottle images (``../shared/data/mvtec_ad/bottle``):

1. **Pre-training** with ``mask=none`` and ``mask=apmask`` (r = 0.3) in the same process:
   * full step (multi-crop on the device, teacher pass(es), student forward + backward, AdamW,
     prototype normalisation, EMA), timed over ``--steps`` steps after ``--warmup`` steps;
   * student step (forward + loss + backward + optimiser on precomputed views, keep indices and
     codes): the part APMask makes cheaper. The ratio apmask / none is what the paper's ~30 %
     saving is about (target on GPU: <= 0.75).
   ``--rank-image`` adds a third variant to the same alternating rounds: ``mask=apmask`` with
   ``pretrain.rank_source="image"`` (the ranking attention from one teacher pass over the whole
   image instead of one per student view size; reported as ``apmask_image``, ratios against
   ``none`` and against the view-ranked ``apmask``). The other figures keep their meaning.
2. **Fine-tuning**: the GPU step on pregenerated synthetic-anomaly batches, and separately the
   CPU data pipeline (anomaly generation in ``--workers`` processes) in batches/s.
3. **Evaluation** at the test scales (paper: 224, 320, 384, 416, 448, 512): test images/s of
   ``predict_multiscale`` (the detector at every scale + map averaging at the original size).
4. **Projection** of the paper's schedule for bottle (300 pre-training + 100 fine-tuning epochs
   of 209 images at batch 16, one 6-scale evaluation of the 83 test images) from those steady-state
   times, plus the measured one-off costs (model build, compilation); labelled as a projection.
   ``--e2e`` instead RUNS the whole schedule (``run_pretrain`` -> ``run_finetune`` -> ``run_evaluate``)
   and reports its wall time.

FLOPs are counted with ``torch.utils.flop_counter.FlopCounterMode`` on one eager step (matmuls,
convolutions, attention; forward and backward). Model FLOP utilisation = FLOPs per step / step time
/ the device's dense bf16 peak (table ``PEAK_BF16``; n/a on CPUs and unknown GPUs).

Presets: ``--size tiny`` (CPU check: random ViT-tiny/16, 64/32 px crops, scales 64-144 px) and
``--size full`` (the paper's sizes with the offline ViT-S/14; ``--backbone random:vit_s16`` times the
paper's ViT-S/16 architecture). Results are merged into ``results/benchmarks.json`` (one entry per
device kind and size) and rendered to ``results/benchmarks.md``, with the command and the machine::

    .venv/bin/python -m benchmarks.speed --device cpu --size tiny                     # ~2 min on 2 cores
    .venv/bin/python -m benchmarks.speed --device cuda --size full --compile reduce-overhead
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import shlex
import sys
import time
import warnings
from pathlib import Path
from typing import Callable

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]

from apmask_lib.finetune import stage as FT  # noqa: E402
from apmask_lib.pretrain import stage as PT  # noqa: E402
from apmask_lib.config import Config, replace  # noqa: E402
from apmask_lib.data import dataset_from_config  # noqa: E402
from apmask_lib.core.fastpath import COMPILE_MODES, compile_blocks  # noqa: E402
from apmask_lib.inference.multiscale import predict_multiscale, scale_sizes  # noqa: E402
from apmask_lib.pretrain.sinkhorn import sinkhorn, swapped_prediction_loss  # noqa: E402
from apmask_lib.core.devices import autocast_context, resolve_device, synchronize as sync  # noqa: E402
from apmask_lib.core.files import atomic_write_text  # noqa: E402
from apmask_lib.core.machine import cpu_model  # noqa: E402

# dense (no sparsity) bf16 tensor-core peak, FLOP/s, from the vendors' data sheets
PEAK_BF16 = {"H200": 989.4e12, "H100": 989.4e12, "A100": 312e12, "L40S": 362.05e12, "L4": 121e12,
             "A10": 125e12, "RTX 4090": 165.2e12, "RTX 3090": 71e12, "2080 Ti": 53.8e12}
PAPER = {"pretrain_epochs": 300, "finetune_epochs": 100}
PRESETS = {
    "tiny": {"backbone": "random:vit_tiny16", "global_size": 64, "local_size": 32, "image_size": 64,
             "scales": (64, 80, 96, 112, 128, 144), "hidden_dim": 256},
    "full": {"backbone": "dinov2-s14-offline", "global_size": 224, "local_size": 96, "image_size": 224,
             "scales": (224, 320, 384, 416, 448, 512), "hidden_dim": 2048},
}


def timed(fn: Callable[[int], object], n: int, warmup: int, device: torch.device) -> float:
    """Mean seconds per call of ``fn(i)`` over ``n`` calls after ``warmup`` calls (device synced)."""
    for i in range(warmup):
        fn(i)
    sync(device)
    t0 = time.perf_counter()
    for i in range(n):
        fn(warmup + i)
    sync(device)
    return (time.perf_counter() - t0) / max(n, 1)


def count_flops(fn: Callable[[], object]) -> float:
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        fn()
    return float(counter.get_total_flops())


def peak_flops(device: torch.device) -> tuple[float | None, str]:
    if device.type != "cuda":
        return None, "n/a (CPU)"
    name = torch.cuda.get_device_name(device)
    for key, val in PEAK_BF16.items():
        if key in name:
            return val, f"{val / 1e12:.0f} TFLOP/s dense bf16 ({key})"
    return None, f"unknown peak for {name}"


# the timed pre-training variants (pretrain overrides); apmask_image only with --rank-image
PRETRAIN_VARIANTS = {"none": {"mask": "none"}, "apmask": {"mask": "apmask"},
                     "apmask_image": {"mask": "apmask", "rank_source": "image"}}

# a stand-in with bottle's counts and stored size (209 training, 20 good + 64 defective test images,
# 512 px): timing does not depend on image content, and it needs no data on a lent GPU machine
BOTTLE_SHAPED_DEMO = {"image_size": 512, "n_train": 209, "n_test_good": 20, "n_test_defect_per_type": 16}


def make_dataset(args):
    """(dataset name, root, category) for ``--data``; generates the stand-in when asked."""
    if args.data == "demo-bottle-sized":
        from apmask_lib.data.demo import generate_demo

        root = Path(args.demo_root)
        generate_demo(root, ["brick"], **BOTTLE_SHAPED_DEMO)
        return "demo", str(root.resolve()), "brick"
    if not (Path(args.data_root) / "bottle").is_dir():
        raise SystemExit(f"MVTec AD bottle not found under {args.data_root}: pass --data-root (the folder that "
                         "holds bottle/), or --data demo-bottle-sized")
    return "mvtec", str(Path(args.data_root).resolve()), "bottle"


def make_config(args, data: tuple[str, str, str]) -> Config:
    pre = PRESETS[args.size]
    return replace(Config(), seed=0, device=args.device, backbone=args.backbone or pre["backbone"],
                   out_dir=str(ROOT / "runs" / "speed" / args.size),
                   data={"dataset": data[0], "root": data[1], "category": data[2],
                         "image_size": pre["image_size"]},
                   pretrain={"global_size": pre["global_size"], "local_size": pre["local_size"],
                             "hidden_dim": pre["hidden_dim"], "num_workers": args.workers, "compile": args.compile,
                             "batch_size": args.batch_size},
                   finetune={"num_workers": args.workers, "compile": args.compile, "batch_size": args.batch_size,
                             "init": args.backbone or pre["backbone"]},
                   evaluate={"scales": pre["scales"], "batch_size": args.eval_batch})


# ----------------------------------------------------------------------------- pre-training
def bench_pretrain(cfg: Config, dataset, device: torch.device, args) -> dict:
    autocast = autocast_context(device)
    bank = None  # the run's own setup (pretrain.build_pretrain_state) per variant; the images are decoded once

    def views_for(i: int):
        g = torch.Generator().manual_seed(i)
        idx = torch.randperm(len(bank), generator=g)[:B]
        return crops(bank.images[idx.to(device)], bank.sizes[idx], g), g

    steps: dict = {}
    variants = {k: v for k, v in PRETRAIN_VARIANTS.items() if k != "apmask_image" or args.rank_image}
    for name, over in variants.items():
        vcfg = replace(cfg, pretrain=over)
        pm = vcfg.pretrain
        mask = pm.mask
        state = PT.build_pretrain_state(vcfg, dataset, device, bank=bank)
        student, teacher, opt = state.student, state.teacher, state.optimizer
        bank, crops, B = state.bank, state.crops, state.global_batch  # the same for every variant

        def full_step(i: int, student=student, teacher=teacher, opt=opt, pm=pm) -> None:
            views, g = views_for(i)  # the training loop's step, as run_pretrain runs it
            PT.train_step(student, teacher, opt, views, pm, g, 0.996, autocast)

        # student-only: precomputed views / keep indices / codes, cycled
        pre = []
        for i in range(4):
            views, g = views_for(20_000 + i)
            with torch.no_grad(), autocast:
                t_scores, groups = PT.student_views(teacher, views, mask, pm.mask_ratio, g, pm.rank_source)
                q = sinkhorn(t_scores, eps=pm.sinkhorn_eps, iters=pm.sinkhorn_iters)
            pre.append((groups, (q / q.sum(dim=1, keepdim=True)).detach()))

        def student_step(i: int, student=student, opt=opt, pm=pm, pre=pre) -> None:
            groups, codes = pre[i % len(pre)]
            with autocast:
                loss = swapped_prediction_loss(codes, student(groups), pm.temperature)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()

        # FLOPs of one eager step (before compiling: the counter sees eager ops only)
        flops = count_flops(lambda: full_step(10_000))
        student_flops = count_flops(lambda: student_step(0))
        t0 = time.perf_counter()
        compile_blocks(student.backbone, args.compile)
        compile_blocks(teacher.backbone, args.compile)
        full_step(10_001)  # the first compiled call builds the graphs
        sync(device)
        build_s = time.perf_counter() - t0

        student_step(0)  # compiles the student-only shapes if any are new
        steps[name] = {"full": full_step, "student": student_step, "flops": flops, "build_s": build_s,
                       "student_flops": student_flops,
                       "kept_global_tokens": (int(pre[0][0][0][1].shape[1]) if pre[0][0][0][1] is not None
                                              else int(pre[0][0][0][0].shape[-1] // student.backbone.patch_size) ** 2)}

    out: dict = {"n_train": len(bank), "batch": B, "iters_per_epoch": state.iters}
    # timed in alternating rounds (none, apmask, none, ...) so drifts in machine load hit both alike;
    # the median of the round means is reported
    rounds = max(1, args.rounds)
    per_round = max(1, args.steps // rounds)
    times = {m: {"full": [], "student": []} for m in steps}
    for r in range(rounds):
        for m, st in steps.items():
            for kind in ("full", "student"):
                times[m][kind].append(timed(st[kind], per_round, args.warmup if r == 0 else 0, device))
    for m, st in steps.items():
        step_s, student_s = float(np.median(times[m]["full"])), float(np.median(times[m]["student"]))
        out[m] = {"step_ms": 1e3 * step_s, "student_step_ms": 1e3 * student_s, "flops_per_step": st["flops"],
                  "student_flops_per_step": st["student_flops"],
                  "images_per_s": B / step_s, "first_step_s": st["build_s"],
                  "kept_global_tokens": st["kept_global_tokens"], "rounds": rounds, "steps_per_round": per_round}
    out["student_ratio"] = out["apmask"]["student_step_ms"] / out["none"]["student_step_ms"]
    out["step_ratio"] = out["apmask"]["step_ms"] / out["none"]["step_ms"]
    if "apmask_image" in out:
        out["image_step_ratio"] = out["apmask_image"]["step_ms"] / out["none"]["step_ms"]
        out["image_vs_view_step_ratio"] = out["apmask_image"]["step_ms"] / out["apmask"]["step_ms"]
        out["image_vs_view_flops_ratio"] = out["apmask_image"]["flops_per_step"] / out["apmask"]["flops_per_step"]
    return out


# ----------------------------------------------------------------------------- fine-tuning
def bench_finetune(cfg: Config, dataset, device: torch.device, args) -> dict:
    f = cfg.finetune
    state = FT.build_finetune_state(cfg, dataset, device)  # the run's own setup (validation hold-out included)
    model, batches, opt = state.model, state.batches, state.optimizer
    autocast = autocast_context(device)

    # data pipeline alone (CPU workers), batches/s
    n_data = max(args.steps, 2 * max(1, f.num_workers))
    loader = FT.batch_loader(batches, 0, n_data + 2, f.num_workers, pin_memory=device.type == "cuda")
    it = iter(loader)
    cached = [next(it), next(it)]  # includes worker start-up
    t0 = time.perf_counter()
    for _ in range(n_data):
        next(it)
    data_s = (time.perf_counter() - t0) / n_data
    del it, loader

    flops = count_flops(lambda: FT.train_step(model, opt, cached[0], f, device, autocast))
    t0 = time.perf_counter()
    compile_blocks(model.backbone, args.compile)
    FT.train_step(model, opt, cached[1], f, device, autocast)
    sync(device)
    build_s = time.perf_counter() - t0
    step_s = timed(lambda i: FT.train_step(model, opt, cached[i % 2], f, device, autocast), args.steps, args.warmup,
                   device)
    B = batches.batch_size
    return {"step_ms": 1e3 * step_s, "data_ms_per_batch": 1e3 * data_s, "workers": f.num_workers,
            "flops_per_step": flops, "images_per_s": B / step_s, "first_step_s": build_s,
            "iters_per_epoch": batches.steps_per_epoch, "batch": B, "model": model}


# ----------------------------------------------------------------------------- evaluation
def bench_evaluate(cfg: Config, dataset, model, device: torch.device, args) -> dict:
    samples = list(dataset.test)
    images = [dataset.image(s) for s in samples]
    sizes = scale_sizes(cfg.evaluate.scales, model.backbone.patch_size)
    model.eval()
    bs = cfg.evaluate.batch_size
    run = lambda: [predict_multiscale(model, images[i:i + bs], sizes, device) for i in range(0, len(images), bs)]  # noqa: E731
    run()  # warm-up (allocator, cuDNN/kernels)
    sync(device)
    t0 = time.perf_counter()
    run()
    sync(device)
    secs = time.perf_counter() - t0
    return {"n_test": len(images), "scales": list(sizes), "batch": bs, "seconds": secs,
            "images_per_s": len(images) / secs}


# ----------------------------------------------------------------------------- report
def projection(res: dict) -> dict:
    pt, ft, ev = res["pretrain"], res["finetune"], res["evaluate"]
    pre_s = PAPER["pretrain_epochs"] * pt["iters_per_epoch"] * pt["apmask"]["step_ms"] / 1e3
    fin_s = PAPER["finetune_epochs"] * ft["iters_per_epoch"] * max(ft["step_ms"], ft["data_ms_per_batch"]) / 1e3
    one_off = pt["apmask"]["first_step_s"] + ft["first_step_s"]
    total = pre_s + fin_s + ev["seconds"] + one_off
    return {"pretrain_s": pre_s, "finetune_s": fin_s, "evaluate_s": ev["seconds"], "one_off_s": one_off,
            "total_s": total}


def mfu(flops: float, step_ms: float, peak: float | None) -> str:
    if peak is None:
        return "n/a"
    return f"{100 * flops / (step_ms / 1e3) / peak:.1f} %"


def render(entries: dict) -> str:
    lines = ["# Speed benchmarks", "",
             "Generated by `benchmarks/speed.py` (module docstring: what is timed and how). One section per device "
             "kind and size preset; each gives the command that produced it. Times are steady-state means after "
             "warm-up steps; the projection multiplies them by the paper's schedule for MVTec bottle (300 + 100 "
             "epochs, batch 16) and adds the measured one-off costs; it is a projection, not a run, unless the "
             "section says `--e2e`.", ""]
    for key in sorted(entries):
        e = entries[key]
        pt, ft, ev, pj = e["pretrain"], e["finetune"], e["evaluate"], e["projection"]
        lines += [f"## {key}", "", f"Command: `{e['command']}`", "",
                  f"Machine: {e['machine']}. Versions: {e['versions']}. Generated {e['when']}. Compile: "
                  f"`{e['compile']}`. Peak used for MFU: {e['peak']}.", "",
                  "| stage | time per step | images/s | GFLOP per step | MFU | notes |", "|---|---|---|---|---|---|"]
        for mask in [v for v in PRETRAIN_VARIANTS if v in pt]:
            m = pt[mask]
            label = "apmask, rank_source=image" if mask == "apmask_image" else mask
            lines.append(f"| pre-training step, mask={label} | {m['step_ms']:.1f} ms | {m['images_per_s']:.1f} | "
                         f"{m['flops_per_step'] / 1e9:.1f} | {e['mfu'][mask]} | student part {m['student_step_ms']:.1f} ms, "
                         f"{m['student_flops_per_step'] / 1e9:.1f} GFLOP; first step (incl. compiling) "
                         f"{m['first_step_s']:.1f} s |")
        lines.append(f"| fine-tuning step | {ft['step_ms']:.1f} ms | {ft['images_per_s']:.1f} | "
                     f"{ft['flops_per_step'] / 1e9:.1f} | {e['mfu']['finetune']} | data pipeline "
                     f"{ft['data_ms_per_batch']:.1f} ms/batch with {ft['workers']} workers |")
        lines.append(f"| evaluation, {len(ev['scales'])} scales {ev['scales'][0]}-{ev['scales'][-1]} px | — | "
                     f"{ev['images_per_s']:.1f} | — | — | {ev['n_test']} test images in {ev['seconds']:.1f} s |")
        lines += ["", f"APMask (r = 0.3) vs. no masking in the same run: student step ratio "
                      f"**{pt['student_ratio']:.3f}**, full step ratio **{pt['step_ratio']:.3f}** (the full step also "
                      "pays the teacher's ranking passes over the student views).", ""]
        if "apmask_image" in pt:
            lines += [(f"`rank_source=image` (ranking attention from one teacher pass over the whole image): full "
                       f"step ratio vs. no masking **{pt['image_step_ratio']:.3f}**, vs. view-ranked APMask "
                       f"**{pt['image_vs_view_step_ratio']:.3f}** (FLOPs {pt['image_vs_view_flops_ratio']:.3f})."), ""]
        if "e2e" in e:
            x = e["e2e"]
            lines.append(f"End to end (`--e2e`, measured): pre-training {x['pretrain_s']:.0f} s + fine-tuning "
                         f"{x['finetune_s']:.0f} s + evaluation {x['evaluate_s']:.0f} s = **{x['total_s']:.0f} s**; "
                         f"image / pixel AUROC {x.get('image_auroc', float('nan')):.1f} / {x.get('pixel_auroc', float('nan')):.1f} % "
                         f"({x['schedule']}).")
        lines.append(f"Projected paper schedule for bottle ({e['schedule']}): pre-training {pj['pretrain_s']:.0f} s + "
                     f"fine-tuning {pj['finetune_s']:.0f} s + evaluation {pj['evaluate_s']:.0f} s + one-off "
                     f"{pj['one_off_s']:.0f} s = **{pj['total_s'] / 60:.1f} min** (projection).")
        lines.append("")
    return "\n".join(lines)


def run_e2e(cfg: Config, args) -> dict:
    import shutil

    from apmask_lib.evaluate.stage import run_evaluate

    out = Path(cfg.out_dir) / "e2e"
    shutil.rmtree(out, ignore_errors=True)
    c = replace(cfg, out_dir=str(out), pretrain={"epochs": args.e2e_epochs[0]},
                finetune={"epochs": args.e2e_epochs[1]})
    t = {}
    t0 = time.perf_counter()
    PT.run_pretrain(c, progress=True)
    t["pretrain_s"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    FT.run_finetune(c, progress=True)
    t["finetune_s"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    m = run_evaluate(c)
    t["evaluate_s"] = time.perf_counter() - t0
    t["total_s"] = sum(t.values())
    t["image_auroc"], t["pixel_auroc"] = 100 * m["image_auroc"], 100 * m["pixel_auroc"]
    t["schedule"] = f"{args.e2e_epochs[0]} + {args.e2e_epochs[1]} epochs"
    return t


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="auto")
    ap.add_argument("--size", choices=sorted(PRESETS), default=None, help="default: full on CUDA, tiny on CPU")
    ap.add_argument("--backbone", default=None, help="override the preset's backbone source")
    ap.add_argument("--data", choices=("bottle", "demo-bottle-sized"), default="bottle",
                    help="real MVTec bottle, or generated images with bottle's counts and size (no data needed)")
    ap.add_argument("--data-root", default=str(ROOT.parent / "shared" / "data" / "mvtec_ad"))
    ap.add_argument("--demo-root", default="/tmp/apmask_speed_demo", help="where --data demo-bottle-sized writes")
    ap.add_argument("--compile", choices=COMPILE_MODES, default="none")
    ap.add_argument("--batch-size", type=int, default=16, help="training batch (paper: 16)")
    ap.add_argument("--eval-batch", type=int, default=None, help="test images per forward (default 32 CUDA, 8 CPU; "
                    "does not change results)")
    ap.add_argument("--steps", type=int, default=None, help="timed steps (default 30 CUDA, 5 CPU)")
    ap.add_argument("--rounds", type=int, default=None, help="alternating timing rounds (default 3 CUDA, 3 CPU)")
    ap.add_argument("--warmup", type=int, default=None, help="untimed steps first (default 10 CUDA, 1 CPU)")
    ap.add_argument("--workers", type=int, default=None, help="data workers (default: min(8, cores - 1))")
    ap.add_argument("--e2e", action="store_true", help="also RUN the schedule end to end (see --e2e-epochs)")
    ap.add_argument("--e2e-epochs", type=int, nargs=2, default=None, metavar=("PRETRAIN", "FINETUNE"),
                    help="end-to-end schedule (default: the paper's 300 100)")
    ap.add_argument("--rank-image", action="store_true", help="also time mask=apmask with pretrain.rank_source=image "
                    "(ranking attention from one teacher pass over the whole image) in the same alternating rounds")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's; 1 gives steadier "
                    "timings on a shared machine)")
    ap.add_argument("--results", default="results/benchmarks.json")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore", category=UserWarning)
    device = resolve_device(args.device)
    cuda = device.type == "cuda"
    args.device = str(device)
    args.size = args.size or ("full" if cuda else "tiny")
    args.steps = args.steps or (60 if cuda else 6)
    args.rounds = args.rounds or 3
    args.eval_batch = args.eval_batch or (32 if cuda else 8)
    args.warmup = args.warmup if args.warmup is not None else (10 if cuda else 1)
    args.workers = args.workers if args.workers is not None else max(0, min(8, (os.cpu_count() or 1) - 1))
    args.e2e_epochs = args.e2e_epochs or [PAPER["pretrain_epochs"], PAPER["finetune_epochs"]]
    if cuda:
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    cfg = make_config(args, make_dataset(args))
    dataset = dataset_from_config(cfg.data)
    import timm

    machine = (f"{torch.cuda.get_device_name(device)}, " if cuda else "") + \
        f"{cpu_model()}, {os.cpu_count()} CPU cores, torch threads {torch.get_num_threads()}, " \
        f"load average at start {os.getloadavg()[0]:.1f}"
    versions = f"python {platform.python_version()}, torch {torch.__version__}, timm {timm.__version__}"
    print(f"speed: {args.size} on {machine}; backbone {cfg.backbone}; compile {args.compile}", flush=True)
    t_all = time.perf_counter()
    res = {"pretrain": bench_pretrain(cfg, dataset, device, args)}
    print("  pretrain: " + ", ".join(f"{m} {res['pretrain'][m]['step_ms']:.1f} ms (student "
                                       f"{res['pretrain'][m]['student_step_ms']:.1f})"
                                       for m in PRETRAIN_VARIANTS if m in res["pretrain"])
          + f"; student ratio {res['pretrain']['student_ratio']:.3f}", flush=True)
    ft = bench_finetune(cfg, dataset, device, args)
    model = ft.pop("model")
    res["finetune"] = ft
    print(f"  finetune: {ft['step_ms']:.1f} ms/step, data {ft['data_ms_per_batch']:.1f} ms/batch", flush=True)
    res["evaluate"] = bench_evaluate(cfg, dataset, model, device, args)
    print(f"  evaluate: {res['evaluate']['images_per_s']:.1f} images/s at {res['evaluate']['scales']}", flush=True)
    peak, peak_txt = peak_flops(device)
    res["mfu"] = {m: mfu(res["pretrain"][m]["flops_per_step"], res["pretrain"][m]["step_ms"], peak)
                  for m in PRETRAIN_VARIANTS if m in res["pretrain"]}
    res["mfu"]["finetune"] = mfu(ft["flops_per_step"], ft["step_ms"], peak)
    res["projection"] = projection(res)
    if args.e2e:
        res["e2e"] = run_e2e(cfg, args)
    argv_list = sys.argv[1:] if argv is None else list(argv)
    res.update(command=".venv/bin/python -m benchmarks.speed " + " ".join(shlex.quote(a) for a in argv_list),
               machine=machine, versions=versions, when=dt.datetime.now().isoformat(timespec="seconds"),
               compile=args.compile, peak=peak_txt, backbone=cfg.backbone, wall_s=time.perf_counter() - t_all,
               data=args.data,
               schedule=f"{PAPER['pretrain_epochs']} + {PAPER['finetune_epochs']} epochs, batch {args.batch_size}, "
                        f"{res['pretrain']['n_train']} training / {res['evaluate']['n_test']} test images"
                        + (" of the bottle-sized demo stand-in" if args.data != "bottle" else " of bottle"))
    json_path = ROOT / args.results
    entries = json.loads(json_path.read_text()) if json_path.is_file() else {}
    key = f"{'cuda' if cuda else 'cpu'} / {args.size} / {cfg.backbone} / compile={args.compile} / {args.data}"
    entries[key] = res
    atomic_write_text(json_path, json.dumps(entries, indent=1))
    md = render(entries)
    atomic_write_text(json_path.with_suffix(".md"), md)
    print(f"  projection ({res['schedule']}): {res['projection']['total_s'] / 60:.1f} min; "
          f"benchmark wall time {res['wall_s']:.0f} s; wrote {json_path.with_suffix('.md')}",
          flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
