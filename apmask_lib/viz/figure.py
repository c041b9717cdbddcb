"""What every figure carries, so that a PNG read on its own says what it shows: the run it comes
from (:class:`RunLabel`: dataset / category / seed and the run folder relative to the project,
never an absolute path), a colourbar that names what the colour of a heatmap means
(:func:`add_colorbar`), and the plumbing (Agg pyplot, atomic PNG write)."""
from __future__ import annotations

import io
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence

import numpy as np

from ..core.files import atomic_write_bytes

def pyplot():
    """matplotlib.pyplot with the non-interactive Agg backend."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig, out_png: str | Path, dpi: int = 110) -> Path:
    """Write a matplotlib figure as PNG atomically and close it (pyplot figures are closed,
    figures built with ``matplotlib.figure.Figure`` are simply dropped)."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi)
    if fig.canvas.manager is not None:  # created through pyplot
        pyplot().close(fig)
    out_png = Path(out_png)
    atomic_write_bytes(out_png, buf.getvalue())
    return out_png


def project_relative(path: str | Path, root: str | Path | None = None) -> str:
    """``path`` as a string relative to the project (the folder holding ``pyproject.toml`` and
    ``apmask_lib/`` above it, else ``root``/the current folder). A path outside the project is
    shortened to ``…/<last two parts>`` so that no absolute path lands in a figure."""
    p = Path(path)
    ap = (Path.cwd() / p).resolve()  # an absolute p stays itself
    bases = [Path(root).resolve()] if root is not None else []
    bases += [c for c in (ap, *ap.parents) if (c / "pyproject.toml").is_file() and (c / "apmask_lib").is_dir()]
    bases.append(Path.cwd().resolve())
    for base in bases:
        try:
            return ap.relative_to(base).as_posix() or "."
        except ValueError:
            continue
    return "…/" + "/".join(ap.parts[-2:])


def backbone_name(source: str) -> str:
    """A backbone source string for a figure: ``file:PATH`` with PATH made project-relative."""
    return f"file:{project_relative(source[5:])}" if str(source).startswith("file:") else str(source)


#: the stage folders of a run folder
STAGES = ("pretrain", "finetune", "evaluate")


@dataclass(frozen=True)
class RunLabel:
    """Which run a figure comes from. ``str(label)`` reads ``"demo / brick / seed 0 · run folder runs/demo/brick/s0"``."""

    dataset: str
    category: str
    seed: Optional[int] = None
    run: Optional[str] = None  # run folder, relative to the project

    @classmethod
    def from_config(cls, cfg, run_dir: str | Path | None = None) -> "RunLabel":
        """From a :class:`~apmask_lib.config.Config` (its ``out_dir`` unless ``run_dir`` is given)."""
        run = run_dir if run_dir is not None else cfg.out_dir
        return cls(str(cfg.data.dataset), str(cfg.data.category), int(cfg.seed),
                   project_relative(run) if run else None)

    @classmethod
    def from_dict(cls, config: Mapping[str, Any], run_dir: str | Path | None = None) -> "RunLabel":
        """From a run's ``config.json`` contents (``Config.to_dict()``)."""
        data = config.get("data", {})
        run = run_dir if run_dir is not None else config.get("out_dir")
        seed = config.get("seed")
        return cls(str(data.get("dataset", "?")), str(data.get("category", "?")),
                   None if seed is None else int(seed), project_relative(run) if run else None)

    @classmethod
    def from_run(cls, run_dir: str | Path) -> "RunLabel":
        """From a run folder (or one of its stage folders): the first ``config.json`` of its
        evaluate / finetune / pretrain stage (or the folder itself). Raises FileNotFoundError naming the folders searched."""
        run_dir = Path(run_dir)
        if run_dir.name in STAGES and (run_dir / "config.json").is_file():  # a stage folder: its parent is the run
            return cls.from_dict(json.loads((run_dir / "config.json").read_text()), run_dir.parent)
        cands = [run_dir / s / "config.json" for s in ("evaluate", "finetune", "pretrain")] + [run_dir / "config.json"]
        for c in cands:
            if c.is_file():
                return cls.from_dict(json.loads(c.read_text()), run_dir)
        raise FileNotFoundError(f"no config.json in {run_dir} or its evaluate/finetune/pretrain folders: "
                                "is it a run folder (out_dir)?")

    def __str__(self) -> str:
        parts = [self.dataset, self.category] + ([f"seed {self.seed}"] if self.seed is not None else [])
        return " / ".join(parts) + (f" · run folder {self.run}" if self.run else "")


def run_title(fig, what: str, run: RunLabel | str | None, fontsize: float = 9, y: float | None = None) -> None:
    """Suptitle of two lines: ``what`` the figure shows, then the run (a :class:`RunLabel` or a
    free text such as the images' source)."""
    text = what if run is None else f"{what}\n{run}"
    kw = {} if y is None else {"y": y}
    fig.suptitle(text, fontsize=fontsize, **kw)


def cv2_jet():
    """OpenCV's COLORMAP_JET as a matplotlib colormap, so a colourbar shows exactly the colours
    :func:`cv2.applyColorMap` painted (they differ slightly from matplotlib's own ``jet``)."""
    import cv2
    from matplotlib.colors import ListedColormap

    lut = cv2.applyColorMap(np.arange(256, dtype=np.uint8).reshape(-1, 1), cv2.COLORMAP_JET)[:, 0, ::-1]
    return ListedColormap(lut / 255.0, name="cv2_jet")


def add_colorbar(fig, axes: Sequence, label: str, vmin: float = 0.0, vmax: float = 1.0, cmap=None,
                 ticks: Optional[Sequence[float]] = None, location: str = "right"):
    """One colourbar beside ``axes`` (the heatmap axes it describes; ``location`` right or bottom)
    from ``vmin`` to ``vmax`` in ``cmap`` (default :func:`cv2_jet`), labelled ``label`` (what the
    colour means and its unit/range). Returns the colourbar (the label is its long axis' label)."""
    from matplotlib.cm import ScalarMappable
    from matplotlib.colors import Normalize

    sm = ScalarMappable(norm=Normalize(vmin=vmin, vmax=vmax), cmap=cmap or cv2_jet())
    sm.set_array([])
    ax_list = list(np.ravel(axes))
    if location == "bottom":
        cb = fig.colorbar(sm, ax=ax_list, location="bottom", fraction=0.03, pad=0.01, shrink=0.9,
                          aspect=12, ticks=ticks)
    else:
        cb = fig.colorbar(sm, ax=ax_list, location=location, fraction=0.025 if len(ax_list) > 1 else 0.046,
                          pad=0.02, ticks=ticks)
    cb.set_label(label, fontsize=8)
    cb.ax.tick_params(labelsize=7)
    return cb


__all__ = ["pyplot", "save_figure", "project_relative", "backbone_name", "RunLabel", "run_title", "cv2_jet", "add_colorbar"]
