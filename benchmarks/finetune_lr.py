"""Fine-tuning peak LR check on the demo data (docs/method.md, "Fine-tuning learning rate").

Fine-tunes one demo category from an existing pre-trained backbone with a given peak LR and
epoch count, evaluates it, and prints image / pixel AUROC, AU-PRO and the loss per epoch.

    python -m benchmarks.finetune_lr --backbone runs/demo/brick/s0/pretrain/backbone.pt --lr 5e-4 --epochs 30
    python -m benchmarks.finetune_lr --backbone runs/demo/brick/s0/pretrain/backbone.pt --lr 5e-5 --epochs 15
"""
from __future__ import annotations

import argparse
import time

import pandas as pd

from apmask_lib.config import load_params
from apmask_lib.evaluate.stage import run_evaluate
from apmask_lib.finetune.stage import run_finetune


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--backbone", required=True, help="pre-trained backbone.pt")
    ap.add_argument("--lr", type=float, required=True)
    ap.add_argument("--epochs", type=int, required=True)
    ap.add_argument("--category", default="brick")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    out = args.out or f"runs/lr_check/{args.category}_lr{args.lr:g}_e{args.epochs}"
    cfg = load_params("params.yaml", [f"out_dir={out}", f"data.category={args.category}",
                                      f"finetune.epochs={args.epochs}", f"finetune.lr={args.lr}",
                                      f"finetune.init=file:{args.backbone}"])
    t = time.time()
    run = run_finetune(cfg, progress=False)
    m = run_evaluate(cfg)
    log = pd.read_csv(run / "log.csv").groupby("epoch")[["loss", "loss_det", "loss_seg"]].mean()
    print(log.round(3).to_string())
    print(f"lr={args.lr:g} epochs={args.epochs} category={args.category}: image AUROC {100 * m['image_auroc']:.1f}, "
          f"pixel AUROC {100 * m['pixel_auroc']:.1f}, AU-PRO {100 * m['au_pro']:.1f} ({time.time() - t:.0f} s)")


if __name__ == "__main__":
    main()
