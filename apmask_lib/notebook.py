"""What the numbered notebooks call: papermill parameters -> a typed :class:`Config`,
and small display helpers. Notebooks stay thin; everything here is tested.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Iterable, Optional

from .config import Config, load_params

#: papermill parameter name -> config field, shared by all notebooks
COMMON = {
    "dataset": "data.dataset",
    "data_root": "data.root",
    "category": "data.category",
    "backbone": "backbone",
    "seed": "seed",
    "device": "device",
    "out_dir": "out_dir",
    "mask": "pretrain.mask",
    "mask_ratio": "pretrain.mask_ratio",
    "init": "finetune.init",
    "anomaly": "finetune.anomaly",
    "poisson": "finetune.poisson",
    "scales": "evaluate.scales",
}
#: parameters whose section depends on the notebook's stage
PER_STAGE = ("epochs", "batch_size")


def notebook_config(stage: str, params_file: Optional[str] = "params.yaml", overrides: Iterable[str] = (),
                    **params: Any) -> Config:
    """Build the run's config: ``params_file`` (if it exists), then ``overrides``
    (``"section.key=value"`` strings), then the notebook's named parameters
    (None = keep the file's value). ``stage`` (pretrain | finetune | evaluate) says
    which section ``epochs``/``batch_size`` belong to."""
    sets = list(overrides)
    for name, value in params.items():
        if value is None:
            continue
        if name in COMMON:
            key = COMMON[name]
        elif name in PER_STAGE:
            key = f"{stage}.{name}"
        else:
            raise ValueError(f"unknown notebook parameter {name!r}; known: {sorted(COMMON) + list(PER_STAGE)}")
        sets.append(f"{key}={_yaml(value)}")
    path = params_file if params_file and Path(params_file).is_file() else None
    return load_params(path, sets)


def _yaml(value: Any) -> str:
    import yaml

    return yaml.safe_dump(value, default_flow_style=True).strip().removesuffix("...").strip()


def run_dir(cfg: Config) -> Path:
    return Path(cfg.out_dir)


def loss_curve(csv_path: str | Path, columns: Iterable[str] = ("loss",), out_png: str | Path | None = None):
    """Plot per-step columns of a training log; returns the matplotlib figure."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import pandas as pd

    df = pd.read_csv(csv_path)
    fig, ax = plt.subplots(figsize=(5, 3))
    for c in columns:
        if c in df:
            ax.plot(df["step"], df[c], label=c)
    ax.set_xlabel("step")
    ax.legend()
    fig.tight_layout()
    if out_png:
        Path(out_png).parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(out_png, dpi=100)
    return fig
