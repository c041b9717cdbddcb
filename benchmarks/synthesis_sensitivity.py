"""Why does a 2e-6 change of the starting weights act like a new seed? The synthetic anomalies (a benchmark).

Fine-tuning pastes its synthetic anomalies where the INITIAL backbone's [CLS] attention says
(``finetune.anomaly = attention``): a categorical draw from the attention map, then a rejection loop
that retries until a candidate passes its checks (:func:`apmask_lib.finetune.anomalies.make_anomaly`). A draw
near a boundary of the cumulative distribution, or a retry that now passes or fails, changes which
random numbers the rest of the batch consumes. So a change of the weights far below float16
resolution can change the training data, not just the arithmetic.

This measures it without training: the fine-tuning batches of one seed (params-paper.yaml, bottle,
``--max-train`` images, the first ``--steps`` steps) made from the attention maps of the backbone and
of the same backbone with every weight tensor perturbed by Gaussian noise of relative size ``--eps``
(the relative L2 change 6 APMask pre-training steps make), against a control with another seed.
Per step: whether the batch's synthetic masks are identical, and the IoU of the pasted regions.
Writes ``results/synthesis_sensitivity.{json,md}``::

    nice -n 5 .venv/bin/python -m benchmarks.synthesis_sensitivity
"""
from __future__ import annotations

import argparse
import copy
import datetime as dt
import json
import warnings

import numpy as np
import torch

from benchmarks.common import ROOT, command, data_root, machine, versions

from apmask_lib.core.files import atomic_write_text

JSON = ROOT / "results" / "synthesis_sensitivity.json"
MD = ROOT / "results" / "synthesis_sensitivity.md"


def perturbed(module: torch.nn.Module, eps: float, seed: int = 0) -> tuple[torch.nn.Module, float]:
    """A copy of ``module`` with each floating tensor w moved by eps·rms(w)·N(0, 1); and the relative L2
    change of all weights together."""
    out = copy.deepcopy(module)
    g = torch.Generator().manual_seed(seed)
    num = den = 0.0
    with torch.no_grad():
        for p in out.parameters():
            noise = torch.randn(p.shape, generator=g) * eps * p.detach().pow(2).mean().sqrt()
            num += float(noise.double().pow(2).sum())
            den += float(p.detach().double().pow(2).sum())
            p.add_(noise)
    return out, (num / den) ** 0.5


def mask_iou(a: torch.Tensor, b: torch.Tensor) -> float:
    """IoU of two batches' synthetic masks (1.0 when both are empty)."""
    a, b = a.bool(), b.bool()
    union = (a | b).sum().item()
    return 1.0 if union == 0 else (a & b).sum().item() / union


def compare_batches(x, y, steps: int) -> dict:
    same = [bool(torch.equal(x[t]["masks"], y[t]["masks"]) and torch.equal(x[t]["images"], y[t]["images"]))
            for t in range(steps)]
    ious = [mask_iou(x[t]["masks"], y[t]["masks"]) for t in range(steps)]
    return {"identical_steps": int(sum(same)), "first_different": next((t for t, s in enumerate(same) if not s), None),
            "mean_mask_iou": float(np.mean(ious))}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--max-train", type=int, default=48)
    ap.add_argument("--steps", type=int, default=60, help="fine-tuning steps compared (20 epochs x 3 at 48 images)")
    ap.add_argument("--eps", type=float, nargs="+", default=[2e-6, 1e-8])
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    warnings.filterwarnings("ignore", category=UserWarning)
    from apmask_lib.config import load_params, replace
    from apmask_lib.finetune.stage import build_finetune_state, make_batches
    from apmask_lib.finetune.batches import attention_maps

    cfg = load_params(ROOT / "params-paper.yaml", [
        "backbone=dinov2-s14-offline", "device=cpu", f"seed={args.seed}", "finetune.init=dinov2-s14-offline",
        f"data.root={data_root('mvtec')}", f"data.max_train={args.max_train}", "finetune.num_workers=0",
        "out_dir=runs/synthesis_sensitivity"])
    st = build_finetune_state(cfg, device="cpu")
    n = len(st.images)
    # every map set below comes from the same call on the same images (batching changes the last bits)
    att = attention_maps(st.model.backbone, st.images, torch.device("cpu"), progress=False)
    base = make_batches(cfg, st.images, att)
    rows = []
    for eps in args.eps:
        bb, rel = perturbed(st.model.backbone, eps)
        att_p = attention_maps(bb, st.images, torch.device("cpu"), progress=False)
        other = make_batches(cfg, st.images, att_p)
        rows.append({"change": f"weights x (1 + {eps:g} noise)", "relative_l2": rel,
                     "attention_max_rel_diff": float(np.abs(att_p - att).max() / np.abs(att).max()),
                     **compare_batches(base, other, args.steps)})
    rows.append({"change": f"same weights, seed {args.seed + 1}", "relative_l2": 0.0, "attention_max_rel_diff": 0.0,
                 **compare_batches(base, make_batches(replace(cfg, seed=args.seed + 1), st.images, att), args.steps)})
    rows.append({"change": "same weights, same seed (control)", "relative_l2": 0.0, "attention_max_rel_diff": 0.0,
                 **compare_batches(base, make_batches(cfg, st.images, att), args.steps)})
    info = {"command": command("synthesis_sensitivity", argv), "machine": machine("cpu"), "versions": versions(),
            "date": dt.datetime.now().isoformat(timespec="seconds"), "max_train": n, "steps": args.steps,
            "batch_size": base.batch_size, "seed": args.seed, "rows": rows}
    atomic_write_text(JSON, json.dumps(info, indent=1) + "\n")
    lines = ["# Sensitivity of the synthetic anomalies to the starting weights (no training)", "",
             f"Generated {info['date']} by `{info['command']}`; {info['machine']}; {info['versions']}.", "",
             f"The first {args.steps} fine-tuning batches (batch {base.batch_size}, {n} bottle training images, seed "
             f"{args.seed}, params-paper.yaml, anomalies placed by the initial backbone's attention) made from the offline "
             "backbone's attention maps, against those made from a perturbed backbone's maps and from another seed.", "",
             "| against the batches of the offline backbone, seed 0 | relative L2 change of the weights | max relative "
             "change of the attention maps | identical batches | first different step | mean IoU of the pasted regions |",
             "|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['change']} | {r['relative_l2']:.1e} | {r['attention_max_rel_diff']:.1e} | "
                     f"{r['identical_steps']} / {args.steps} | {r['first_different'] if r['first_different'] is not None else '—'} | "
                     f"{r['mean_mask_iou']:.3f} |")
    atomic_write_text(MD, "\n".join(lines) + "\n")
    print(MD.read_text())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
