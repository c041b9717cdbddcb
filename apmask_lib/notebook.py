"""What the numbered notebooks call: papermill parameters -> a typed :class:`Config`,
and small display helpers. Notebooks stay thin; everything here is tested.
"""
from __future__ import annotations

import re
import warnings
from pathlib import Path
from typing import Any, Iterable, Optional

from .config import Config, load_params
from .files import atomic_write_text

# Every notebook imports this module, so its module-level imports run in every DVC stage (and are
# dependencies of each): the figure helpers at the bottom import the training and figure code they
# need where they use it, so that a change there re-runs only the stages that draw those figures.

# tqdm.auto in a kernel without ipywidgets warns "IProgress not found" (with the venv's absolute path)
# and falls back to the text bar, which is what we want: say nothing
warnings.filterwarnings("ignore", message="IProgress not found")

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


def project_root(start: str | Path | None = None) -> Path:
    """The folder holding ``pyproject.toml`` above ``start`` (default: the current folder).
    Notebooks ``chdir`` here first, so they run the same from JupyterLab (cwd notebooks/)
    and from papermill/DVC (cwd = project root)."""
    p = Path(start or Path.cwd()).resolve()
    for cand in (p, *p.parents):
        if (cand / "pyproject.toml").is_file() and (cand / "apmask_lib").is_dir():
            return cand
    raise FileNotFoundError(f"no apmask project (pyproject.toml + apmask_lib/) above {p}")


def executed_name(notebook: str, params: dict[str, Any]) -> str:
    """Executed copies are named after their parameters: ``01_pretrain__category=brick__seed=0``."""
    stem = Path(notebook).stem
    parts = [f"{k}={str(v).replace('/', '-')}" for k, v in sorted(params.items())
             if k not in ("params_file", "overrides", "out_dir")]
    return "__".join([stem, *parts])


def execute(notebook: str | Path, params: dict[str, Any], out_dir: str | Path = "runs/adhoc/notebooks",
            html: bool = True, name: str | None = None) -> Path:
    """Run a numbered notebook with papermill (parameters injected after its ``parameters``
    cell), save the executed copy under ``out_dir`` named after its parameters, and an
    nbconvert HTML report beside it (``name`` overrides the file name). Returns the executed notebook's path."""
    import papermill as pm

    root = project_root()
    nb = Path(notebook)
    if not nb.suffix:
        nb = root / "notebooks" / f"{nb.name}.ipynb"
    if not nb.is_file():
        raise FileNotFoundError(f"notebook not found: {nb}")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    out = out_dir / f"{name or executed_name(nb.name, params)}.ipynb"
    tmp = out.with_suffix(".tmp.ipynb")
    pm.execute_notebook(str(nb), str(tmp), parameters=params, cwd=str(root), progress_bar=False,
                        kernel_name="python3")
    import nbformat

    node = normalize_executed(nbformat.read(tmp, as_version=4), root)
    node.metadata.get("papermill", {})["output_path"] = str(out).replace(str(root) + "/", "")
    atomic_write_text(out, nbformat.writes(node) + "\n")
    tmp.unlink()
    if html:
        from nbconvert import HTMLExporter

        body, _ = HTMLExporter().from_notebook_node(node)
        atomic_write_text(out.with_suffix(".html"), body)
    return out


#: what makes two executions of the same notebook differ although their results are equal
_PROGRESS = re.compile(r"\d+%\|.*\|.*(it/s|s/it|\?it/s)")


def normalize_executed(nb, root: str | Path):
    """An executed notebook without what differs from run to run although the results do not:
    papermill's start/end times and durations and the random id of its injected cell, the kernel's
    execution timestamps, tqdm progress
    bars (their stderr text holds timings), and absolute paths under ``root`` (made relative). So
    the committed executed copies (and their HTML) are equal when the runs are, and ``git status``
    stays clean after a reproduced pipeline. Returns ``nb`` (modified in place)."""
    prefix = str(Path(root).resolve()) + "/"
    meta = nb.metadata.get("papermill", {})
    for key in ("start_time", "end_time", "duration", "environment_variables"):
        meta.pop(key, None)
    for key in ("input_path", "output_path"):
        if isinstance(meta.get(key), str):
            meta[key] = meta[key].replace(prefix, "")
    for cell in nb.cells:
        if "injected-parameters" in cell.metadata.get("tags", []):
            cell["id"] = "injected-parameters"  # papermill draws a random id for the cell it inserts
        cell.metadata.pop("execution", None)
        for key in ("start_time", "end_time", "duration"):
            cell.metadata.get("papermill", {}).pop(key, None)
        kept = []
        for o in cell.get("outputs", []):
            if o.get("output_type") == "stream":
                text = "".join(o.get("text", ""))
                lines = [ln for ln in re.split(r"[\r\n]", text) if ln.strip() and not _PROGRESS.search(ln)]
                if o.get("name") == "stderr" and not lines:
                    continue
                o["text"] = text.replace(prefix, "") if o.get("name") != "stderr" else "\n".join(lines).replace(prefix, "") + "\n"
            kept.append(o)
        if cell.cell_type == "code":
            cell.outputs = kept
    return nb


def tsne_from_run(run: str | Path, perplexity: float | None = None, seed: int = 0,
                  out_png: str | Path | None = None) -> Path:
    """Fig. 5 from a finished evaluation: t-SNE of ``evaluate/features.npz`` ([CLS] features
    before the heads), normal vs each defect type. Written to ``out_png``, by default
    ``runs/adhoc/figures/fig5_tsne__<run>.png`` (never into the run folder, a pipeline output)."""
    import numpy as np

    from .viz.tsne import fig_tsne

    feats = Path(run) / "evaluate" / "features.npz"
    if not feats.is_file():
        raise FileNotFoundError(f"{feats} not found: run the evaluation (03_evaluate / apmask evaluate) first")
    z = np.load(feats, allow_pickle=False)
    n = len(z["labels"])
    perp = min(perplexity or 30.0, max((n - 1) / 3.0, 1.0))
    default = Path("runs/adhoc/figures") / f"fig5_tsne__{'-'.join(Path(run).parts)}.png"
    return fig_tsne(z["cls"], z["labels"], z["defects"], out_png or default,
                    seed=seed, perplexity=perp)


def paper_figures(cfg: Config, figures_dir: str | Path, n_images: int = 4) -> list[Path]:
    """Fig. 1 (input | attention | APMask | attention-guided anomaly) and Fig. 4b (grid of
    synthetic anomalies of every kind) on ``n_images`` training images of the configured data."""
    from .anomalies import KINDS
    from .data import dataset_from_config, read_image
    from .finetune import resolve_blend, resolve_poisson
    from .viz.synthetic import fig_attention_panel, fig_synthetic_grid
    from .weights import build_backbone

    ds = dataset_from_config(cfg.data)
    step = max(len(ds.train) // max(n_images, 1), 1)
    images = [read_image(s.path) for s in ds.train[::step][:n_images]]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        backbone = build_backbone(cfg.backbone, seed=cfg.seed).eval()
    poisson = resolve_poisson(cfg)
    tag = cfg.data.category
    out = Path(figures_dir)
    return [
        fig_attention_panel(images, backbone, out / f"fig1_attention_{tag}.png", mask_ratio=cfg.pretrain.mask_ratio,
                            seed=cfg.seed, poisson=poisson),
        fig_synthetic_grid(images, list(KINDS), out / f"fig4b_synthetic_{tag}.png", backbone=backbone,
                           seed=cfg.seed, poisson=poisson, blend=resolve_blend(cfg)),
    ]
