"""Notebooks and the DVC pipeline: clean sources, parameters, and a micro run of every stage
on real bottle images with the same commands the stages run (``apmask notebook`` / ``collect``)."""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import nbformat
import papermill as pm
import pytest
import yaml

from apmask_lib.config import load_params
from apmask_lib.notebook import COMMON, execute, executed_name, notebook_config, project_root

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.ipynb"))


def test_notebooks_exist():
    names = [p.stem for p in NOTEBOOKS]
    for n in ("01_pretrain", "02_finetune", "03_evaluate", "04_tsne", "05_tables", "06_figures"):
        assert n in names


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_source_notebooks_have_no_outputs_and_a_parameters_cell(path):
    nb = nbformat.read(path, as_version=4)
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert all(not c.outputs and c.execution_count is None for c in code), f"{path.name} has outputs: clear them"
    tagged = [c for c in code if "parameters" in c.metadata.get("tags", [])]
    assert len(tagged) == 1, f"{path.name} needs exactly one cell tagged 'parameters'"


@pytest.mark.parametrize("name,expected", [
    ("01_pretrain", {"dataset", "data_root", "category", "backbone", "epochs", "batch_size", "seed", "device",
                     "out_dir", "mask", "mask_ratio"}),
    ("02_finetune", {"dataset", "data_root", "category", "backbone", "epochs", "batch_size", "seed", "device",
                     "out_dir", "init", "anomaly", "poisson"}),
    ("03_evaluate", {"dataset", "data_root", "category", "backbone", "seed", "device", "out_dir", "model", "scales"}),
])
def test_papermill_sees_the_documented_parameters(name, expected):
    params = pm.inspect_notebook(str(ROOT / "notebooks" / f"{name}.ipynb"))
    assert expected <= set(params)
    assert all(p["help"] for p in params.values()), "every parameter carries a comment"


def test_notebook_config_maps_parameters(tmp_path):
    p = tmp_path / "params.yaml"
    p.write_text(yaml.safe_dump({"pretrain": {"epochs": 7}, "pipeline": {"categories": ["a"]}}))
    cfg = notebook_config("pretrain", str(p), ["data.max_train: 3"], category="bottle", epochs=None,
                          batch_size=4, mask="random", scales=[224, 320])
    assert cfg.pretrain.epochs == 7 and cfg.pretrain.batch_size == 4 and cfg.pretrain.mask == "random"
    assert cfg.data.category == "bottle" and cfg.data.max_train == 3 and cfg.evaluate.scales == (224, 320)
    assert set(COMMON) >= {"dataset", "data_root", "category", "backbone", "seed", "device", "out_dir"}
    with pytest.raises(ValueError, match="unknown notebook parameter"):
        notebook_config("pretrain", str(p), [], colour="red")


def test_executed_names_follow_parameters():
    assert executed_name("01_pretrain.ipynb", {"seed": 0, "category": "brick", "out_dir": "x"}) == \
        "01_pretrain__category=brick__seed=0"


#: what the demo profile may change from the paper's: data, backbone, where runs go, schedule and sizes
SCALE_KEYS = {"backbone", "out_dir", "data.dataset", "data.root", "data.category", "data.image_size",
              "pretrain.epochs", "pretrain.batch_size", "pretrain.n_local", "pretrain.global_size", "pretrain.local_size",
              "pretrain.warmup_epochs", "pretrain.num_workers", "finetune.epochs", "finetune.batch_size",
              "finetune.warmup_epochs", "finetune.num_workers", "evaluate.scales"}


def _flat(obj, prefix=""):
    out = {}
    for f in dataclasses.fields(obj):
        v = getattr(obj, f.name)
        out.update(_flat(v, f"{prefix}{f.name}.") if dataclasses.is_dataclass(v) else {f"{prefix}{f.name}": v})
    return out


def test_params_files_are_valid():
    """Both profiles load, and the demo is the paper's method at a small scale: every key outside
    data, backbone, schedule and sizes (masking, anomalies, losses, learning rates, ...) is the paper's."""
    demo, paper = _flat(load_params(ROOT / "params.yaml")), _flat(load_params(ROOT / "params-paper.yaml"))
    differ = {k for k in paper if demo[k] != paper[k]}
    assert differ <= SCALE_KEYS, f"params.yaml changes the method, not only the scale: {sorted(differ - SCALE_KEYS)}"
    assert (paper["pretrain.mask"], paper["pretrain.mask_ratio"], paper["finetune.anomaly"]) == ("apmask", 0.3, "attention")
    paper = load_params(ROOT / "params-paper.yaml")
    assert (paper.pretrain.epochs, paper.finetune.epochs, paper.pretrain.batch_size) == (300, 100, 16)
    assert paper.evaluate.scales == (224, 320, 384, 416, 448, 512)


def test_dvc_stages_run_the_notebooks():
    dvc = yaml.safe_load((ROOT / "dvc.yaml").read_text())
    cmds = json.dumps(dvc)
    for n in ("01_pretrain", "02_finetune", "03_evaluate", "05_tables", "06_figures"):
        assert f"apmask notebook {n}" in cmds
    assert "metrics" in dvc["stages"]["evaluate"] and "plots" in dvc["stages"]["evaluate"]


@pytest.mark.slow
def test_every_notebook_runs_at_micro_scale_on_real_bottle(tmp_path, mvtec_root):
    """The stages' own commands, micro-sized: tiny backbone, 4 training images, 64 px."""
    from apmask_lib.report.collect import collect_run

    params = {
        "seed": 0, "device": "cpu", "backbone": "random:vit_tiny16",
        "data": {"dataset": "mvtec", "root": str(mvtec_root), "category": "bottle", "image_size": 64,
                 "max_train": 4, "max_test": 1},
        "pretrain": {"epochs": 1, "batch_size": 4, "global_size": 64, "local_size": 32, "n_local": 2,
                     "hidden_dim": 64, "num_workers": 0, "warmup_epochs": 0},
        "finetune": {"epochs": 1, "batch_size": 4, "num_workers": 0, "warmup_epochs": 0},
        "evaluate": {"scales": [64], "batch_size": 4},
    }
    pfile = tmp_path / "params.yaml"
    pfile.write_text(yaml.safe_dump(params))
    run = tmp_path / "runs" / "bottle" / "s0"
    nbs = tmp_path / "notebooks"
    common = {"params_file": str(pfile), "out_dir": str(run)}
    for name in ("01_pretrain", "02_finetune", "03_evaluate"):
        out = execute(name, {**common, "category": "bottle", "seed": 0}, out_dir=nbs)
        assert out.is_file() and out.with_suffix(".html").is_file()
    assert (run / "pretrain" / "backbone.pt").is_file()
    assert (run / "finetune" / "model.pt").is_file()
    metrics = json.loads((run / "evaluate" / "metrics.json").read_text())
    assert 0.0 <= metrics["image_auroc"] <= 1.0
    execute("04_tsne", {"out_dir": str(run), "perplexity": 2.0, "out_png": str(tmp_path / "tsne.png")}, out_dir=nbs,
            html=False)
    assert (tmp_path / "tsne.png").is_file()
    execute("05_tables", {"runs_dir": str(tmp_path / "runs"), "tables_dir": str(tmp_path / "tables")},
            out_dir=nbs, html=False)
    table1 = (tmp_path / "tables" / "table1.md").read_text()
    assert "| bottle | 1 |" in table1
    execute("06_figures", {**common, "category": "bottle", "figures_dir": str(tmp_path / "figs"), "n_images": 2},
            out_dir=nbs, html=False)
    assert (tmp_path / "figs" / "fig1_attention_bottle.png").is_file()
    assert (tmp_path / "figs" / "fig4b_synthetic_bottle.png").is_file()
    written = collect_run(run, "bottle_s0", tmp_path / "results")
    assert set(written) == {"metrics", "info", "pretrain_loss", "finetune_loss", "finetune_validation", "roc"}
    numbers = json.loads(Path(written["metrics"]).read_text())
    assert numbers and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in numbers.values()
                           if not isinstance(v, dict)), "DVC metrics file holds numbers only"
    assert "model_path" in json.loads(Path(written["info"]).read_text())
    val = (tmp_path / "results" / "plots" / "bottle_s0" / "finetune_validation.csv").read_text().splitlines()
    assert val[0] == "epoch,acc,val_acc,val_auroc,val_dice,val_loss" and len(val) >= 2
    assert project_root() == ROOT


# ---------------------------------------------------------------- ad-hoc runs vs pipeline outputs
def test_adhoc_runs_get_a_folder_derived_from_their_parameters():
    from apmask_lib.config import adhoc_out_dir

    cfg = load_params(ROOT / "params.yaml", ["data.category=grass", "seed=3"])
    assert cfg.out_dir == "runs/adhoc/demo/grass/s3" == adhoc_out_dir(cfg)
    assert load_params(ROOT / "params.yaml", ["out_dir=runs/x"]).out_dir == "runs/x"
    assert "out_dir" not in yaml.safe_load((ROOT / "params.yaml").read_text()), \
        "params.yaml must not name one run's folder: every ad-hoc run would write there"
    nb = notebook_config("evaluate", str(ROOT / "params.yaml"), [], category="gravel")
    assert nb.out_dir == "runs/adhoc/demo/gravel/s0"


def test_dvc_stages_name_their_outputs_explicitly():
    """Defaults of `apmask notebook`, tables and figures point to runs/adhoc; every stage passes results/."""
    stages = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
    for name, st in stages.items():
        for cmd in [st["cmd"]] if isinstance(st["cmd"], str) else st["cmd"]:
            if cmd.startswith("apmask notebook"):
                assert "--out results/notebooks" in cmd, name
                assert "out_dir" in cmd or name in ("tables", "figures"), f"{name}: pass the run folder"
    assert "figures_dir results/figures" in stages["figures"]["cmd"]
    assert "--out results/figures/" in stages["attention"]["cmd"]


def test_pipeline_root_is_found_from_the_current_folder(tmp_path, monkeypatch):
    from apmask_lib.cli import pipeline_root

    (tmp_path / "proj" / "sub").mkdir(parents=True)
    (tmp_path / "proj" / "dvc.yaml").write_text("stages: {}\n")
    monkeypatch.chdir(tmp_path / "proj" / "sub")
    assert pipeline_root() == (tmp_path / "proj").resolve()
    monkeypatch.chdir(tmp_path)
    with pytest.raises(FileNotFoundError, match="inside the apmask project"):
        pipeline_root()


def test_drop_resume_state_keeps_unfinished_runs(tmp_path):
    from apmask_lib.cli import main
    from apmask_lib.core.files import save_checkpoint

    done, running = tmp_path / "done", tmp_path / "running"
    save_checkpoint(done / "checkpoint.pt", step=4, done=True)
    save_checkpoint(running / "checkpoint.pt", step=2, done=False)
    main(["drop-resume-state", str(done), str(running), str(tmp_path / "absent")])
    assert not (done / "checkpoint.pt").exists() and (running / "checkpoint.pt").is_file()


def test_metrics_split_into_numbers_and_info():
    from apmask_lib.report.collect import split_metrics

    numbers, info = split_metrics({"image_auroc": 0.9, "n_images": 30, "model_path": "runs/x/model.pt",
                                   "max_test": None, "flag": True, "methods": {"knn": {"image_auroc": 1.0, "name": "k"}},
                                   "timings": {"total_s": 3.1}})
    assert numbers == {"image_auroc": 0.9, "n_images": 30, "methods": {"knn": {"image_auroc": 1.0}}}
    assert info == {"model_path": "runs/x/model.pt", "max_test": None, "flag": True, "methods": {"knn": {"name": "k"}}}


def test_pinned_environment():
    from apmask_lib.core import repro

    env = repro.pipeline_env({"OMP_NUM_THREADS": "16", "ATEN_CPU_CAPABILITY": "avx512"})
    assert env["OMP_NUM_THREADS"] == str(repro.THREADS) and env["ATEN_CPU_CAPABILITY"] == "avx2"
    assert env["MKL_CBWR"] == "AVX2"
    native = repro.pipeline_env({"APMASK_NUMERICS": "native", "OMP_NUM_THREADS": "16"})
    assert native["OMP_NUM_THREADS"] == "16" and "MKL_CBWR" not in native


def test_source_notebooks_pin_the_numerics_before_importing_torch():
    for path in NOTEBOOKS:
        nb = nbformat.read(path, as_version=4)
        first = next(c for c in nb.cells if c.cell_type == "code")
        assert "pin_process()" in first.source, f"{path.name}: first code cell must call pin_process()"
        assert "import torch" not in first.source


def test_executed_notebooks_are_normalized():
    """Timings, progress bars and absolute paths are dropped, so equal runs give equal files."""
    from apmask_lib.notebook import normalize_executed

    nb = nbformat.v4.new_notebook()
    nb.metadata["papermill"] = {"start_time": "t0", "end_time": "t1", "duration": 3.2,
                                "input_path": "/x/proj/notebooks/a.ipynb", "parameters": {"seed": 0}}
    injected = nbformat.v4.new_code_cell("seed = 0")
    injected.metadata["tags"] = ["injected-parameters"]
    nb.cells.append(injected)
    cell = nbformat.v4.new_code_cell("run()")
    cell.metadata["execution"] = {"iopub.status.busy": "t"}
    cell.metadata["papermill"] = {"duration": 1.0, "status": "completed"}
    cell.outputs = [
        nbformat.v4.new_output("stream", name="stderr", text="pretrain:  40%|####      | 10/25 [00:13<00:19,  1.30s/it]\r"),
        nbformat.v4.new_output("stream", name="stderr", text="UserWarning: real warning\n"),
        nbformat.v4.new_output("stream", name="stdout", text="wrote /x/proj/runs/a.png\n")]
    nb.cells.append(cell)
    out = normalize_executed(nb, "/x/proj")
    assert out.metadata["papermill"] == {"input_path": "notebooks/a.ipynb", "parameters": {"seed": 0}}
    assert "execution" not in cell.metadata and cell.metadata["papermill"] == {"status": "completed"}
    assert [o["text"] for o in cell.outputs] == ["UserWarning: real warning\n", "wrote runs/a.png\n"]
    assert injected["id"] == "injected-parameters"
