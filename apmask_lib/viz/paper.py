"""Figures 1 and 4b of the paper for a configured data set (the ``06_figures`` notebook): the
backbone's attention, the APMask view and the synthetic anomalies of every kind, on training images."""
from __future__ import annotations

import warnings
from pathlib import Path

from ..finetune.anomalies import KINDS
from ..data import dataset_from_config, read_image
from ..finetune.stage import resolve_blend, resolve_poisson
from ..weights import build_backbone
from .figure import RunLabel, backbone_name
from .synthetic import fig_attention_panel, fig_synthetic_grid


def paper_figures(cfg, figures_dir: str | Path, n_images: int = 4) -> list[Path]:
    """Fig. 1 (input | attention | APMask | attention-guided anomaly) and Fig. 4b (grid of
    synthetic anomalies of every kind) on ``n_images`` evenly spaced training images of the data set
    of ``cfg`` (a :class:`~apmask_lib.config.Config`), with the backbone ``cfg.backbone`` as
    initialised (before any pre-training). Written to ``figures_dir/fig1_attention_<category>.png``
    and ``fig4b_synthetic_<category>.png``."""
    ds = dataset_from_config(cfg.data)
    step = max(len(ds.train) // max(n_images, 1), 1)
    images = [read_image(s.path) for s in ds.train[::step][:n_images]]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        backbone = build_backbone(cfg.backbone, seed=cfg.seed).eval()
    poisson = resolve_poisson(cfg)
    run = (f"{RunLabel(cfg.data.dataset, cfg.data.category, cfg.seed)} · backbone {backbone_name(cfg.backbone)} "
           f"(before pre-training) · {len(images)} training images")
    tag = cfg.data.category
    out = Path(figures_dir)
    return [
        fig_attention_panel(images, backbone, out / f"fig1_attention_{tag}.png", mask_ratio=cfg.pretrain.mask_ratio,
                            seed=cfg.seed, poisson=poisson, run=run),
        fig_synthetic_grid(images, list(KINDS), out / f"fig4b_synthetic_{tag}.png", backbone=backbone,
                           seed=cfg.seed, poisson=poisson, blend=resolve_blend(cfg), run=run),
    ]


__all__ = ["paper_figures"]
