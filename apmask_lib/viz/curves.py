"""Training curves: per-step losses, fine-tuning loss beside the label-free validation signal, and learning curves
(test metrics against fine-tuning epochs) with reference lines."""
from __future__ import annotations

from pathlib import Path
from typing import Iterable, Mapping, Optional, Sequence

from .figure import RunLabel, project_relative, pyplot, run_title

METRIC_LABELS = {"image_auroc": "image AUROC", "pixel_auroc": "pixel AUROC", "au_pro": "AU-PRO"}


def _label(stage_dir: Path) -> RunLabel | str:
    """The run of a stage folder, or its project-relative path when it has no config.json."""
    try:
        return RunLabel.from_run(stage_dir)
    except FileNotFoundError:
        return f"run {project_relative(stage_dir)}"


def loss_curve(csv_path: str | Path, columns: Iterable[str] = ("loss",), out_png: str | Path | None = None):
    """Per-step columns of a training log (``<run>/pretrain/log.csv`` or ``finetune/log.csv``) with
    the run in the title; returns the matplotlib figure."""
    import pandas as pd

    csv_path = Path(csv_path)
    plt = pyplot()
    df = pd.read_csv(csv_path)
    fig, ax = plt.subplots(figsize=(6, 3.4), layout="constrained")
    for c in columns:
        if c in df:
            ax.plot(df["step"], df[c], label=c)
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.grid(alpha=0.3)
    ax.legend()
    run_title(fig, f"{csv_path.parent.name}: training loss per step", _label(csv_path.parent))
    if out_png:
        Path(out_png).parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(out_png, dpi=100)
    return fig


def finetune_curves(run: str | Path, out_png: str | Path | None = None):
    """Fine-tuning of run folder ``run`` (``<out_dir>/finetune`` or its parent): left, the per-step losses
    (``log.csv``); right, per epoch the training accuracy and the validation signal of
    ``validation.csv`` (AUROC, accuracy and Dice on synthetic anomalies of held-out normal images,
    :mod:`apmask_lib.finetune.validation`). Returns the figure."""
    import pandas as pd

    run = Path(run)
    run = run / "finetune" if (run / "finetune").is_dir() else run
    plt = pyplot()
    fig, (ax0, ax1) = plt.subplots(1, 2, figsize=(10, 3.8), layout="constrained")
    log = pd.read_csv(run / "log.csv")
    for c in ("loss", "loss_det", "loss_seg"):
        if c in log:
            ax0.plot(log["step"], log[c], label=c)
    ax0.set_xlabel("step")
    ax0.set_title("training loss")
    ax0.legend()
    val = run / "validation.csv"
    if val.is_file():
        v = pd.read_csv(val)
        for c, style in (("acc", "--"), ("val_acc", "-"), ("val_auroc", "-"), ("val_dice", "-")):
            if c in v:
                ax1.plot(v["epoch"] + 1, v[c], style, marker="o", ms=3, label="train_acc" if c == "acc" else c)
        ax1.set_ylim(0, 1.02)
        ax1.set_title("per epoch; val_* = held-out normals + synthetic")
        ax1.legend(fontsize=8)
    else:
        ax1.text(0.5, 0.5, "no validation.csv\n(finetune.val_fraction = 0?)", ha="center", va="center")
    ax1.set_xlabel("epoch")
    run_title(fig, "fine-tuning: losses and validation signal", _label(run))
    if out_png:
        Path(out_png).parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(out_png, dpi=100)
    return fig


def learning_curve_figure(curves: Mapping[str, Mapping], paper: Mapping[str, Optional[float]],
                          peers: Sequence[Mapping], out_png: str | Path | None = None,
                          metrics: Sequence[str] = ("image_auroc", "pixel_auroc", "au_pro")):
    """One panel per metric: each curve's points (``curves[name]["points"]``: epoch + metrics in %;
    hollow markers where a point used fewer than the paper's six test scales), the paper's
    figure (``paper[metric]``, %) as a black dashed line and every peer (name + metrics, %) as a
    dotted line. Returns the figure."""
    plt = pyplot()
    fig, axes = plt.subplots(1, len(metrics), figsize=(5 * len(metrics), 4.2), sharex=True)
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    peer_colours = ["tab:gray", "tab:olive", "tab:cyan", "tab:pink", "tab:brown"]
    for ax, m in zip(axes, metrics):
        for i, (name, c) in enumerate(curves.items()):
            pts = [p for p in c["points"] if p.get(m) is not None]
            if not pts:
                continue
            full = 6  # the paper's six test scales; fewer = hollow marker
            col = colours[i % len(colours)]
            if all(p["epoch"] == pts[0]["epoch"] for p in pts):  # one epoch, several single scales: markers only
                for p, mk in zip(pts, "sD^v<>"):
                    sc = f"{p['scales'][0]} px" if len(p["scales"]) == 1 else f"{len(p['scales'])} scales"
                    ax.plot(p["epoch"], p[m], mk, color=col, ms=8, label=f"{name} ({sc})")
                continue
            ax.plot([p["epoch"] for p in pts], [p[m] for p in pts], "-", color=col, label=name)
            for p in pts:
                ax.plot(p["epoch"], p[m], "o", color=col, mfc=col if len(p["scales"]) == full else "white")
        if paper.get(m) is not None:
            ax.axhline(paper[m], color="k", ls="--", lw=1, label=f"paper (APMask) {paper[m]}")
        for j, p in enumerate(peers):
            if p.get(m) is not None:
                ax.axhline(p[m], color=peer_colours[j % len(peer_colours)], ls=":", lw=1.2,
                           label=f"{p['name'][:38]} {p[m]:.1f}")
        ax.set_title(METRIC_LABELS.get(m, m) + " (%)")
        ax.set_xlabel("fine-tuning epoch")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7, loc="lower right")
    fig.suptitle("Paper method on MVTec AD bottle, CPU-capped schedule (hollow: fewer test scales)", fontsize=10)
    fig.tight_layout()
    if out_png:
        Path(out_png).parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(out_png, dpi=110)
    return fig


__all__ = ["loss_curve", "finetune_curves", "learning_curve_figure"]
