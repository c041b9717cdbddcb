"""What the benchmarks share: the project root and data roots, the shortened-schedule run config
with its scaled warm-up, the recorded command, the machine/versions line and number formatting.

Imports only ``apmask_lib`` (never another benchmark), so any benchmark can import it."""
from __future__ import annotations

import math
import os
import shlex
import sys
from pathlib import Path
from typing import Sequence

from apmask_lib.config import Config, replace
from apmask_lib.core.machine import machine_line, versions_line

ROOT = Path(__file__).resolve().parents[1]
#: default data roots, relative to the project root (``--data-root`` overrides MVTec's)
DATA_ROOTS = {"mvtec": "../shared/data/mvtec_ad", "nih": "../shared/data/nih_cxr14", "demo": "/tmp/apmask_demo"}
PAPER_EPOCHS = {"pretrain": (300, 10), "finetune": (100, 10)}  # (epochs, warm-up epochs) in the paper
METRICS = ("image_auroc", "pixel_auroc", "au_pro")
#: the real and generated data sets the studies run on: name -> (dataset kind, category)
DATASETS = {"bottle": ("mvtec", "bottle"), "brick": ("demo", "brick"), "nih": ("nih", "all"),
            "grass": ("demo", "grass"), "gravel": ("demo", "gravel")}


def data_root(dataset: str, override: str | None = None) -> str:
    """Absolute root of ``dataset``: ``override`` for MVTec when given, else :data:`DATA_ROOTS`."""
    root = override if dataset == "mvtec" and override else DATA_ROOTS[dataset]
    return str((ROOT / root).resolve()) if not os.path.isabs(root) else root


def ensure_data(dataset: str) -> None:
    """Generate a demo category of :data:`DATASETS` when missing (deterministic, the demo defaults);
    real data sets must be where :data:`DATA_ROOTS` says."""
    kind, category = DATASETS[dataset]
    if kind == "demo":
        from apmask_lib.data.demo import generate_demo

        generate_demo(data_root("demo"), [category])


def scaled_warmup(stage: str, epochs: int) -> int:
    """Warm-up epochs scaled with the shortened schedule (paper ratio, rounded), at least 1 when the
    run has 2 or more epochs (rounding alone gave 0 for every schedule under 50 / 150 epochs, i.e. no
    warm-up at all); 0 for a 1-epoch run, which cannot warm up and then decay."""
    paper_epochs, paper_warm = PAPER_EPOCHS[stage]
    if epochs < 2:
        return 0
    return max(1, int(round(epochs * paper_warm / paper_epochs)))


def iters_per_epoch(cfg) -> int:
    """Fine-tuning steps per epoch, as run_finetune computes them (after the held-out validation slice)."""
    from apmask_lib.data import build_dataset
    from apmask_lib.finetune.validation import holdout_indices

    ds = build_dataset(cfg.data.dataset, cfg.data.root, cfg.data.category)
    keep, _ = holdout_indices(len(ds.train), cfg.finetune.val_fraction, cfg.finetune.val_max_images)
    n = len(keep) if cfg.data.max_train is None else min(len(keep), cfg.data.max_train)
    return max(1, n // min(cfg.finetune.batch_size, n))


def schedule_config(args, dataset: str, category: str, seed: int, out_dir: Path) -> Config:
    """The run config the quality and ablation benchmarks share: data, backbone, device, the (shortened)
    schedule with its scaled warm-up, data-loader workers; everything else at the defaults."""
    return replace(Config(), seed=seed, device=args.device, backbone=args.backbone, out_dir=str(out_dir),
                   data={"dataset": dataset, "root": data_root(dataset, args.data_root), "category": category},
                   pretrain={"epochs": args.pretrain_epochs, "num_workers": args.workers,
                             "warmup_epochs": scaled_warmup("pretrain", args.pretrain_epochs)},
                   finetune={"epochs": args.finetune_epochs, "num_workers": args.workers,
                             "warmup_epochs": scaled_warmup("finetune", args.finetune_epochs)})


def spread(values: Sequence[float]) -> dict:
    """n, mean, SD (ddof 1), SE = SD / sqrt(n), min, max of the finite ``values`` (SD/SE None below 2)."""
    import numpy as np

    x = np.array([float(v) for v in values if v is not None and math.isfinite(float(v))])
    n = len(x)
    if not n:
        return {"n": 0, "mean": None, "sd": None, "se": None, "min": None, "max": None}
    sd = float(x.std(ddof=1)) if n >= 2 else None
    return {"n": n, "mean": float(x.mean()), "sd": sd, "se": None if sd is None else sd / math.sqrt(n),
            "min": float(x.min()), "max": float(x.max())}


def relative_change(a: dict, b: dict) -> float:
    """||a − b|| / ||b|| over every floating tensor of two state dicts (integer entries are left out)."""
    import torch

    num = den = 0.0
    for k, v in b.items():
        if torch.is_floating_point(v):
            num += float((a[k].double() - v.double()).pow(2).sum())
            den += float(v.double().pow(2).sum())
    return math.sqrt(num / den) if den else float("nan")


def spread_lines(dataset: str, epochs: int, max_train: int, scales: Sequence[int] = (224,), variant: str = "paper",
                 path: Path | None = None) -> list[str]:
    """Markdown lines quoting the measured seed spread of the paper method (``results/seed_spread.json``,
    :mod:`benchmarks.seed_spread`) for one setting, per evaluated epoch, for reports whose rows are single
    runs; [] when that setting has not been measured. Two single runs differ beyond their spread when
    the difference exceeds 2·√2·SD (the 2-SE rule of ``seed_spread`` with n = 1 per side)."""
    import json

    path = path or ROOT / "results" / "seed_spread.json"
    if not path.is_file():
        return []
    rows = [r for r in json.loads(path.read_text())["rows"]
            if (r["dataset"], r["variant"], r.get("tag", ""), r["epochs"], r["max_train"], list(r["scales"]))
            == (dataset, variant, "", epochs, max_train, list(scales))]
    if not rows:
        return []
    cells = []
    for at in sorted({r["at"] for r in rows}):
        stats = [spread([r[m] for r in rows if r["at"] == at]) for m in METRICS]
        n = min(st["n"] for st in stats)
        if n < 2:
            continue
        cells.append(f"epoch {at}: " + " / ".join(f"{st['mean']:.1f} ± {st['sd']:.1f}" for st in stats) + f" (n = {n})")
    if not cells:
        return []
    return [f"**Seed spread of this setting** (`results/seed_spread.md`: {dataset}, {max_train} training images, "
            f"{epochs}-epoch schedule, test scales {'+'.join(map(str, scales))}; mean ± SD over seeds of image AUROC / "
            f"pixel AUROC / AU-PRO): " + "; ".join(cells) + ". A difference between two single runs counts only "
            "beyond 2·√2·SD of its metric; smaller ones are no finding.", ""]


def command(module: str, argv: Sequence[str] | None = None) -> str:
    """The command to record in a report: ``.venv/bin/python -m benchmarks.<module> <args>``, run from
    the project root (``argv``: the arguments, default ``sys.argv[1:]``)."""
    args = sys.argv[1:] if argv is None else argv
    return " ".join([".venv/bin/python -m", f"benchmarks.{module}", *(shlex.quote(a) for a in args)])


def machine(device=None, load: bool = False) -> str:
    """The machine line of every report (:func:`apmask_lib.core.machine.machine_line`)."""
    return machine_line(device, load)


def versions() -> str:
    """``python X, torch Y, timm Z`` (:func:`apmask_lib.core.machine.versions_line`)."""
    return versions_line("timm")


def fmt(stat: dict | None, scale: float = 100.0, digits: int = 1) -> str:
    """``mean ± se`` of an :func:`apmask_lib.metrics.aggregate_seeds` entry, scaled; — when missing."""
    if not stat or stat.get("mean") is None or not math.isfinite(stat["mean"]):
        return "—"
    se = stat.get("se")
    return f"{scale * stat['mean']:.{digits}f}" + (f" ± {scale * se:.{digits}f}" if se is not None else "")


__all__ = ["ROOT", "DATA_ROOTS", "PAPER_EPOCHS", "METRICS", "DATASETS", "ensure_data", "iters_per_epoch", "data_root", "scaled_warmup", "schedule_config",
           "command", "spread", "relative_change", "spread_lines", "machine", "versions", "fmt"]
