"""What the numbered notebooks call: papermill parameters -> a typed :class:`Config`,
and small display helpers. Notebooks stay thin; everything here is tested.
"""
from __future__ import annotations

import re
import warnings
from pathlib import Path
from typing import Any, Iterable, Optional

from .config import Config, load_params
from .core.files import atomic_write_text

# Every notebook imports this module, so its module-level imports run in every DVC stage (and are
# dependencies of each): keep them light. The figure helpers live in apmask_lib/viz (curves, tsne,
# paper), imported by the notebooks that draw those figures.

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
