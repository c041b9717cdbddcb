"""How much cheaper does APMask make the student? (paper Sec. 3.1: dropping r = 30 % of the patch
tokens leaves ~70 % of the compute).

Times, per training step of B images with 1 global + ``n_local`` local views (not a test):

1. **student** forward + backward (projection + prototypes included) with ``r`` of every view's
   patch tokens removed vs. no masking -- the quantity the paper's claim is about;
2. **full step** without the optimiser: teacher pass(es) + token selection + student forward +
   backward, for ``mask=none``, ``mask=apmask`` with the teacher seeing a second global crop
   (default; the teacher then runs on every student view to rank its patches) and with
   ``teacher_view=same`` (one teacher pass gives codes and the global view's ranking).

Prints a table and appends it, with the command and the machine, to
``results/benchmarks_masking.md``. Random inputs (timing does not depend on pixels) and random
weights by default. Example (CPU, ~1-2 min on 2 cores)::

    .venv/bin/python -m benchmarks.masking_speed --device cpu --batch-size 2 --steps 3
"""
from __future__ import annotations

import argparse
import datetime as dt
import statistics
import time
import warnings
from pathlib import Path

import torch

from apmask_lib.pretrain import stage as P
from apmask_lib.config import Config, replace
from apmask_lib.core.devices import resolve_device, synchronize as sync
from apmask_lib.core.machine import versions_line
from apmask_lib.pretrain.multicrop import MultiCropViews
from benchmarks.common import ROOT, command, machine

def timed(fn, steps: int, warmup: int, device: torch.device) -> list[float]:
    for _ in range(warmup):
        fn()
    sync(device)
    out = []
    for _ in range(steps):
        t = time.perf_counter()
        fn()
        sync(device)
        out.append(time.perf_counter() - t)
    return out


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    ap.add_argument("--steps", type=int, default=5, help="timed steps per condition")
    ap.add_argument("--warmup", type=int, default=1, help="untimed steps per condition")
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--backbone", default="random:vit_s16", help="any build_backbone source")
    ap.add_argument("--ratio", type=float, default=0.3, help="mask ratio r")
    ap.add_argument("--global-size", type=int, default=224)
    ap.add_argument("--local-size", type=int, default=96)
    ap.add_argument("--n-local", type=int, default=8)
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: leave as is)")
    ap.add_argument("--no-full-step", action="store_true", help="only time the student")
    ap.add_argument("--out", default=str(ROOT / "results" / "benchmarks_masking.md"))
    args = ap.parse_args(argv)

    if args.threads:
        torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        cfg = replace(Config(), backbone=args.backbone, seed=0,
                      pretrain={"global_size": args.global_size, "local_size": args.local_size,
                                "n_local": args.n_local, "mask_ratio": args.ratio, "batch_size": args.batch_size})
        student = P.build_student(cfg).to(device)
        teacher = P.build_student(cfg).to(device).eval()
    for prm in teacher.parameters():
        prm.requires_grad_(False)
    autocast = (lambda: torch.autocast("cuda", dtype=torch.bfloat16)) if device.type == "cuda" else \
        (lambda: torch.autocast("cpu", enabled=False))

    B, G, L, V = args.batch_size, args.global_size, args.local_size, args.n_local
    g = torch.Generator().manual_seed(0)
    views = MultiCropViews(torch.rand(B, 3, G, G, generator=g).to(device), torch.rand(B, 3, G, G, generator=g).to(device),
                           torch.rand(V * B, 3, L, L, generator=g).to(device))
    views_same = MultiCropViews(views.teacher, views.teacher, views.local)

    # student only: keep_idx fixed beforehand (selection kind does not change the cost)
    bb = student.backbone
    with torch.no_grad():
        _, groups_masked = P.student_views(teacher, views, "apmask", args.ratio, g)
    groups_full = [(x, None) for x, _ in groups_masked]
    def tokens(groups) -> int:
        n = 0
        for x, keep in groups:
            h, w = bb.grid_size(*x.shape[-2:])
            n += x.shape[0] * (1 + (keep.shape[1] if keep is not None else h * w))
        return n

    n_tokens = {"masked": tokens(groups_masked), "full": tokens(groups_full)}

    def student_step(groups):
        def run():
            student.zero_grad(set_to_none=True)
            with autocast():
                loss = sum(s.float().logsumexp(-1).mean() for s in student(groups))
            loss.backward()
        return run

    def full_step(mask, v):
        p = replace(cfg, pretrain={"mask": mask}).pretrain

        def run():
            student.zero_grad(set_to_none=True)
            with autocast():
                loss = P.pretrain_loss(student, teacher, v, p, torch.Generator().manual_seed(0))
            loss.backward()
        return run

    rows = []
    for name, fn in [(f"student, r={args.ratio}", student_step(groups_masked)), ("student, no masking", student_step(groups_full))]:
        rows.append((name, timed(fn, args.steps, args.warmup, device)))
    if not args.no_full_step:
        for name, fn in [("full step, mask=none", full_step("none", views)),
                         (f"full step, apmask r={args.ratio}, teacher_view=second", full_step("apmask", views)),
                         (f"full step, apmask r={args.ratio}, teacher_view=same", full_step("apmask", views_same))]:
            rows.append((name, timed(fn, args.steps, args.warmup, device)))

    med = {name: statistics.median(t) for name, t in rows}
    student_ratio = med[rows[0][0]] / med[rows[1][0]]
    token_ratio = n_tokens["masked"] / n_tokens["full"]
    cmd = command("masking_speed", argv)
    lines = [f"## {dt.datetime.now().isoformat(timespec='seconds')}", "",
             f"- command: `{cmd}`", f"- machine: {machine(device)}; {versions_line()}",
             f"- setting: backbone {args.backbone}, batch {B}, 1 global {G}px + {V} local {L}px views, "
             f"{args.steps} timed steps (+{args.warmup} warm-up), median reported",
             f"- tokens through the student per step: {n_tokens['masked']} masked vs {n_tokens['full']} "
             f"unmasked (ratio {token_ratio:.3f})",
             f"- **student step time ratio masked / unmasked: {student_ratio:.3f}** (paper: ~0.7)", "",
             "| condition | median s/step | min | max | vs. unmasked |", "|---|---|---|---|---|"]
    for name, t in rows:
        ref = med[rows[1][0]] if name.startswith("student") else med[rows[2][0]]
        lines.append(f"| {name} | {med[name]:.4f} | {min(t):.4f} | {max(t):.4f} | {med[name] / ref:.3f} |")
    text = "\n".join(lines) + "\n"
    print(text)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    header = "" if out.exists() else ("# APMask: student cost with and without token dropping\n\n"
                                      "Appended by `benchmarks/masking_speed.py` (one section per run).\n\n")
    with out.open("a") as f:
        f.write(header + text + "\n")
    print(f"appended to {out}")


if __name__ == "__main__":
    main()
