"""Every figure reads on its own (issue 12 item 6): its title names the data set, category, seed and
the run folder (project-relative, never absolute); heatmaps carry a colourbar that says what the
colour means; the t-SNE figure has a legend and a caption saying what is plotted.

The figure functions save and close their figure; a fixture wraps ``save_figure`` in each viz
module to keep the Figure object for inspection. Everything here is tiny (< 1 s per figure but
t-SNE's first import)."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from matplotlib.text import Text

from apmask_lib.viz import backbone as viz_backbone
from apmask_lib.viz import curves, localization, roc, synthetic, tsne
from apmask_lib.viz.figure import RunLabel, project_relative

ROOT = Path(__file__).resolve().parents[1]
RUN = RunLabel("demo", "grass", 3, "runs/demo/grass/s3")


@pytest.fixture
def saved(monkeypatch):
    """Figures passed to save_figure by the viz modules, in order."""
    figs = []
    for mod in (localization, roc, tsne, synthetic, viz_backbone):
        orig = mod.save_figure

        def keep(fig, out_png, *a, _orig=orig, **k):
            figs.append(fig)
            return _orig(fig, out_png, *a, **k)

        monkeypatch.setattr(mod, "save_figure", keep)
    return figs


def texts(fig) -> list[str]:
    return [t.get_text() for t in fig.findobj(Text) if t.get_text()]


def assert_names_run(fig, run: RunLabel = RUN, tmp: Path | None = None):
    """The suptitle names dataset, category, seed and run folder; no text holds an absolute path."""
    title = fig.get_suptitle()
    for part in (run.dataset, run.category, f"seed {run.seed}", run.run):
        assert part in title, f"{part!r} missing from the title {title!r}"
    for t in texts(fig):
        assert not t.lstrip().startswith("/"), f"absolute path in figure text {t!r}"
        assert tmp is None or str(tmp) not in t, f"absolute path in figure text {t!r}"
        assert str(ROOT) not in t, f"absolute project path in figure text {t!r}"


def colorbars(fig):
    return [ax._colorbar for ax in fig.axes if getattr(ax, "_colorbar", None) is not None]


def assert_colorbar_beside(fig, heat_axes, words: str):
    """One colourbar labelled with ``words`` lies right of (or under) all ``heat_axes``, overlapping
    them along its long side."""
    fig.canvas.draw()
    cbs = colorbars(fig)
    assert cbs, "no colourbar on a heatmap figure"
    boxes = [ax.get_position() for ax in heat_axes]
    for cb in cbs:
        label = cb.ax.get_ylabel() or cb.ax.get_xlabel()
        p = cb.ax.get_position()
        right = p.x0 >= max(b.x1 for b in boxes) - 1e-6 and p.y1 > min(b.y0 for b in boxes) and p.y0 < max(b.y1 for b in boxes)
        below = p.y1 <= min(b.y0 for b in boxes) + 1e-6 and p.x1 > min(b.x0 for b in boxes) and p.x0 < max(b.x1 for b in boxes)
        if words in label and (right or below):
            return cb
    raise AssertionError(f"no colourbar labelled {words!r} beside the heatmaps; found "
                         f"{[(cb.ax.get_ylabel() or cb.ax.get_xlabel(), cb.ax.get_position()) for cb in cbs]}")


def _tiny_vit(seed: int):
    """A random tiny ViT (built directly: where build_backbone lives is being reorganised)."""
    import torch

    from apmask_lib.models.vit import ARCHS, VisionTransformer

    torch.manual_seed(seed)
    return VisionTransformer(ARCHS["vit_tiny16"]).eval()


def _images(n=3, size=64, seed=0):
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 255, (size, size, 3), dtype=np.uint8) for _ in range(n)]


# --------------------------------------------------------------------------------------------
def test_run_label_relative_paths(tmp_path, monkeypatch):
    monkeypatch.chdir(ROOT)
    assert project_relative(ROOT / "runs" / "demo" / "brick" / "s0") == "runs/demo/brick/s0"
    assert project_relative("runs/demo/brick/s0") == "runs/demo/brick/s0"
    outside = project_relative(tmp_path / "a" / "run")
    assert outside == "…/a/run" and not outside.startswith("/")
    from apmask_lib.config import Config

    cfg = Config()
    cfg.out_dir, cfg.seed = str(ROOT / "runs/x/y/s2"), 2
    label = RunLabel.from_config(cfg)
    assert (label.dataset, label.category, label.seed, label.run) == (cfg.data.dataset, cfg.data.category, 2, "runs/x/y/s2")
    assert str(label) == f"{cfg.data.dataset} / {cfg.data.category} / seed 2 · run folder runs/x/y/s2"


def test_run_label_from_run_folder_and_stage_folder(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    run = Path("runs/demo/gravel/s1")
    (run / "finetune").mkdir(parents=True)
    (run / "finetune" / "config.json").write_text(json.dumps(
        {"data": {"dataset": "demo", "category": "gravel"}, "seed": 1, "out_dir": str(tmp_path / run)}))
    for where in (run, run / "finetune"):
        assert str(RunLabel.from_run(where)) == "demo / gravel / seed 1 · run folder runs/demo/gravel/s1"
    with pytest.raises(FileNotFoundError, match="config.json"):
        RunLabel.from_run(tmp_path / "nothing")


@pytest.mark.slow
def test_localization_names_run_and_has_colorbar(tmp_path, saved):
    ims = _images()
    maps = [np.linspace(0.2, 0.7, 64 * 64).reshape(64, 64) for _ in ims]
    gts = [None, np.zeros((64, 64), bool), np.pad(np.ones((8, 8), bool), 28)]
    localization.fig_localization(ims, maps, gts, tmp_path / "loc.png", ["a", "b", "c"], run=RUN,
                                  method="kNN extension", colour_label="kNN anomaly score")
    fig = saved[-1]
    assert_names_run(fig, tmp=tmp_path)
    assert "kNN extension" in fig.get_suptitle()
    heat = fig.axes[3:6]  # second row: the anomaly maps
    cb = assert_colorbar_beside(fig, heat, "kNN anomaly score")
    assert cb.norm.vmin == pytest.approx(0.2) and cb.norm.vmax == pytest.approx(0.7)
    assert (tmp_path / "loc.png").stat().st_size > 0


def test_roc_names_run(tmp_path, saved):
    c = roc.RocCurve("image level", np.array([0, 0.5, 1.0]), np.array([0, 0.8, 1.0]), 0.7)
    roc.fig_roc([c], tmp_path / "roc.png", run=RUN)
    assert_names_run(saved[-1], tmp=tmp_path)
    assert any("AUROC = 0.7000" in t for t in texts(saved[-1]))


@pytest.mark.slow
def test_tsne_caption_legend_and_run(tmp_path, saved):
    rng = np.random.default_rng(0)
    feats = rng.normal(size=(12, 8)).astype(np.float32)
    labels = np.array([0] * 4 + [1] * 8)
    defects = ["good"] * 4 + ["hole"] * 4 + ["scratch"] * 4
    tsne.fig_tsne(feats, labels, defects, tmp_path / "t.png", seed=5, perplexity=30, run=RUN, size=224)
    fig = saved[-1]
    assert_names_run(fig, tmp=tmp_path)
    legend = [t.get_text() for ax in fig.axes if ax.get_legend() for t in ax.get_legend().get_texts()]
    assert legend == ["normal (n=4)", "hole (n=4)", "scratch (n=4)"]
    caption = " ".join(texts(fig)).replace("\n", " ")
    for words in ("[CLS] token", "before the detection and segmentation heads", "12 test images", "4 normal",
                  "8 defective of 2 types", "224 px", "perplexity 3.67 (requested 30, capped", "seed 5", "L2-normalised"):
        assert words in caption, f"{words!r} missing from the t-SNE caption"


@pytest.mark.slow
def test_tsne_from_run_reads_the_run(tmp_path, monkeypatch, saved):
    monkeypatch.chdir(tmp_path)
    run = Path("runs/demo/brick/s0")
    (run / "evaluate").mkdir(parents=True)
    rng = np.random.default_rng(1)
    np.savez(run / "evaluate" / "features.npz", cls=rng.normal(size=(6, 4)), labels=np.array([0, 0, 0, 1, 1, 1]),
             defects=np.array(["good"] * 3 + ["hole"] * 3), size=np.array(160))
    (run / "evaluate" / "config.json").write_text(json.dumps(
        {"data": {"dataset": "demo", "category": "brick"}, "seed": 0, "out_dir": str(tmp_path / run)}))
    out = tsne.tsne_from_run(run, perplexity=10, out_png=tmp_path / "t.png")
    assert out.is_file()
    assert_names_run(saved[-1], RunLabel("demo", "brick", 0, "runs/demo/brick/s0"), tmp=tmp_path)
    assert "160 px" in " ".join(texts(saved[-1])).replace("\n", " ")


@pytest.mark.slow
def test_attention_panel_and_synthetic_grid(tmp_path, saved):
    bb = _tiny_vit(0)
    ims = _images(2)
    run = f"{RunLabel('demo', 'grass', 3)} · backbone random"
    synthetic.fig_attention_panel(ims, bb, tmp_path / "f1.png", size=64, run=run)
    fig = saved[-1]
    assert "demo / grass / seed 3" in fig.get_suptitle()
    assert_colorbar_beside(fig, [fig.axes[1], fig.axes[5]], "attention")  # column 2 of 4: the attention
    synthetic.fig_synthetic_grid(ims, ["attention", "cutpaste"], tmp_path / "f4b.png", backbone=bb, size=64, run=run)
    fig = saved[-1]
    assert "demo / grass / seed 3" in fig.get_suptitle()
    assert [ax.get_title() for ax in fig.axes[:4]] == ["input", "attention (guides 'attention')", "attention", "cutpaste"]
    assert_colorbar_beside(fig, [fig.axes[1], fig.axes[5]], "attention")
    # without an attention kind there is no heatmap, hence no colourbar
    synthetic.fig_synthetic_grid(ims, ["cutpaste"], tmp_path / "f4b2.png", size=64, run=run)
    assert not colorbars(saved[-1])


@pytest.mark.slow
def test_backbone_attention(tmp_path, saved):
    bbs = {"random": _tiny_vit(0), f"file:{tmp_path}/b.pt": _tiny_vit(1)}
    viz_backbone.fig_backbone_attention(_images(2), bbs, tmp_path / "b.png", size=64,
                                        titles=["bottle/broken_large", "bottle/good"])
    fig = saved[-1]
    title = fig.get_suptitle()
    assert "bottle (1 defective, 1 good)" in title and "random" in title
    assert all(str(tmp_path) not in t for t in texts(fig))
    assert viz_backbone.images_source(["demo/brick/hole", "demo/brick/good"]) == "images: demo/brick (1 defective, 1 good)"
    assert_colorbar_beside(fig, fig.axes[2:6], "attention")


def test_training_curves_name_run(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    run = Path("runs/demo/brick/s4")
    for stage in ("pretrain", "finetune"):
        (run / stage).mkdir(parents=True)
        (run / stage / "log.csv").write_text("step,loss,loss_det,loss_seg\n0,1.0,0.7,0.9\n1,0.9,0.6,0.8\n")
        (run / stage / "config.json").write_text(json.dumps(
            {"data": {"dataset": "demo", "category": "brick"}, "seed": 4, "out_dir": str(tmp_path / run)}))
    (run / "finetune" / "validation.csv").write_text("epoch,acc,val_acc,val_auroc,val_dice\n0,0.5,0.5,0.6,0.1\n")
    label = RunLabel("demo", "brick", 4, "runs/demo/brick/s4")
    fig = curves.loss_curve(run / "pretrain" / "log.csv", ["loss"])
    assert_names_run(fig, label, tmp=tmp_path)
    assert "pretrain" in fig.get_suptitle()
    assert_names_run(curves.finetune_curves(run), label, tmp=tmp_path)


@pytest.mark.slow
def test_evaluation_figures_name_run_per_method(tmp_path, saved):
    """write_figures (the evaluation's figures, moved out of evaluate.py): Fig. 4a for the paper
    method and each extension method with its own colourbar label, ROC and t-SNE, all naming the run."""
    from apmask_lib.metrics import PixelMetrics
    from apmask_lib.viz.evaluation import MAP_METHODS, write_figures

    rng = np.random.default_rng(0)
    ims = _images(4, 32)
    gts = [np.zeros((32, 32), bool)] * 2 + [np.pad(np.ones((8, 8), bool), 12)] * 2
    maps = [rng.random((32, 32)).astype(np.float32) + g for g in gts]
    pix = PixelMetrics(bins=None)
    for m, g in zip(maps, gts):
        pix.update(m, g)
    labels = np.array([0, 0, 1, 1])
    rows = [{"score": s} for s in (0.1, 0.3, 0.2, 0.9)]
    items = [(im, m, g, f"t{i}") for i, (im, m, g) in enumerate(zip(ims, maps, gts))]
    figures = write_figures(tmp_path, items, rows, labels, pix, rng.normal(size=(4, 6)), ["good", "good", "hole", "hole"],
                            0, run=RUN, size=224, ext_items={"knn": items})
    assert set(figures) == {"localization", "roc", "tsne", "localization_knn"}
    assert all(Path(p).is_file() for p in figures.values())
    assert len(saved) == 4
    for fig in saved:
        assert_names_run(fig, tmp=tmp_path)
    paper, knn = saved[0], saved[3]
    assert "paper method" in paper.get_suptitle() and "kNN extension" in knn.get_suptitle()
    assert_colorbar_beside(paper, paper.axes[4:8], "detector probability")
    assert_colorbar_beside(knn, knn.axes[4:8], MAP_METHODS["knn"][1])


def test_evaluation_figures_name_the_method_that_made_the_maps(tmp_path, saved):
    from apmask_lib.metrics import PixelMetrics
    from apmask_lib.viz.evaluation import write_figures

    ims = _images(2, 32)
    items = [(im, np.full((32, 32), 0.1 * i, np.float32), None, f"t{i}") for i, im in enumerate(ims)]
    with pytest.warns(UserWarning, match="no ROC figure|no t-SNE figure"):
        write_figures(tmp_path, items, [{"score": 0.1}, {"score": 0.2}], np.array([0, 0]), PixelMetrics(bins=None),
                      np.zeros((2, 4)), ["good", "good"], 0, run=RUN, method="knn_model", features_desc="kNN features")
    (fig,) = saved  # one class only: no ROC, < 4 images: no t-SNE
    assert "kNN model" in fig.get_suptitle() and "paper method" not in fig.get_suptitle()
    assert_colorbar_beside(fig, fig.axes[2:4], "cosine distance")
