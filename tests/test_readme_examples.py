"""Every `apmask` / `papermill` example of README.md and docs/*.md runs as written.

The pages' commands are extracted (fenced ``bash`` blocks and inline code spans); each must be
listed below, either in ``EXAMPLES`` (run in that order, exactly as written, in a sandbox copy of
the project whose ``params.yaml`` is the demo profile shrunk to micro settings: tiny random ViT,
64 px, one epoch) or in ``NOT_COMMANDS`` (fragments the prose names, e.g. ``apmask notebook``).
A command of the README or of a docs page that is in neither list fails the test, so the two cannot
drift apart.
"""
from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
PREFIXES = ("apmask ", "papermill ")

#: run in this order; value = expected outcome ("ok" or a substring of the error output)
EXAMPLES: dict[str, str] = {
    "apmask --help": "ok",  # README "Configuration and command line"
    # docs/pipeline.md "Where runs go": an ad-hoc evaluation of a run that does not exist fails clearly, touching nothing
    "papermill notebooks/03_evaluate.ipynb out.ipynb -p category grass":
        "detector checkpoint not found: runs/adhoc/demo/grass/s0/finetune/model.pt",
    "papermill notebooks/01_pretrain.ipynb out.ipynb -p category grass": "ok",
    # docs/cli.md "Examples on the demo data"
    "apmask data -S data.category=grass": "ok",
    "apmask pretrain -S data.category=grass": "ok",
    "apmask finetune -S data.category=grass": "ok",
    "apmask evaluate -S data.category=grass": "ok",
    "apmask fit -S data.category=grass": "ok",     # both stages finished above: returns at once
    "apmask predict --model runs/adhoc/demo/grass/s0/finetune/model.pt --out runs/adhoc/predictions "
    "data/demo/grass/test/hole": "ok",
    "apmask export --model runs/adhoc/demo/grass/s0/finetune/model.pt --format onnx --out runs/adhoc/grass.onnx": "ok",
    "apmask tables --runs runs/adhoc --out runs/adhoc/tables": "ok",
    "apmask attention-figure": "ok",
    # docs/pipeline.md "Notebooks" table
    "apmask notebook 01_pretrain -p category grass -p mask random -p out_dir runs/random-mask/grass/s0": "ok",
    "apmask notebook 02_finetune -p category grass -p anomaly cutpaste -p out_dir runs/random-mask/grass/s0": "ok",
    "apmask notebook 03_evaluate -p category grass -p out_dir runs/random-mask/grass/s0 -p scales '[112, 168]'": "ok",
    "apmask notebook 04_tsne -p out_dir runs/random-mask/grass/s0": "ok",
    "apmask notebook 05_tables -p runs_dir runs/random-mask": "ok",
    "apmask notebook 06_figures -p category grass": "ok",
}
#: spans of the pages that name a command or a form, not a runnable example
NOT_COMMANDS = {
    "apmask notebook NAME --out results/notebooks -p key value ...",
    "apmask drop-resume-state",
    "apmask pretrain/finetune/evaluate",
    "apmask notebook",
    "apmask tables",
    "apmask attention-figure",   # also the last CLI example, run above
    "apmask COMMAND --help",
    "apmask data", "apmask pretrain", "apmask finetune", "apmask fit", "apmask evaluate", "apmask predict",
    "apmask demo",               # what `make demo` runs: the whole DVC pipeline (tests/test_pipeline.py, make demo)
    "apmask collect --stage",    # what the DVC training stages call
    "apmask ... --params params-folder.yaml",  # docs/pipeline.md: the form of the own-data commands
    # README "Your own images" / docs/own-data.md: on the user's folder data set; the same commands run end to
    # end on a folder data set built from real bottle images in tests/test_folder.py
    "apmask fit --params params-folder.yaml",  # needs the user's folder; the file loads and is checked in test_cli.py
    "apmask evaluate --params params-folder.yaml",
    "apmask predict --model runs/widget/finetune/model.pt --out predictions/ new_images/",
    "apmask export --model runs/widget/finetune/model.pt --format onnx --out widget.onnx",
    # the kNN model's rows of that table: fit -> evaluate -> predict -> export through the command line
    # on real bottle images in tests/test_knn_model.py
    "apmask fit --method knn", "apmask evaluate --method knn",
    "apmask predict --model runs/widget/knn/model.pt --out predictions/ new_images/",
    "apmask export --model runs/widget/knn/model.pt --format onnx --out widget_knn.onnx",
    "apmask <command>",  # docs/architecture.md: the form of cli.py's commands
}

MICRO = {
    "backbone": "random:vit_tiny16", "device": "cpu",
    "data": {"image_size": 64, "max_train": 4, "max_test": 1},
    "pretrain": {"epochs": 1, "batch_size": 4, "global_size": 64, "local_size": 32, "n_local": 2, "hidden_dim": 64,
                 "num_workers": 0, "warmup_epochs": 0},
    "finetune": {"epochs": 1, "batch_size": 4, "num_workers": 0, "warmup_epochs": 0},
    "evaluate": {"scales": [64], "batch_size": 4},
}


def readme_commands(text: str) -> list[str]:
    """`apmask`/`papermill` commands of the README: lines of ``bash`` blocks (comments stripped)
    and inline code spans outside blocks, in order of appearance."""
    cmds = []
    for block in re.findall(r"```bash\n(.*?)```", text, re.S):
        for line in block.splitlines():
            line = re.sub(r"\s+#.*$", "", line).strip()
            if line.startswith(PREFIXES):
                cmds.append(line)
    prose = re.sub(r"```.*?```", "", text, flags=re.S)
    cmds += [s for s in re.findall(r"`([^`\n]+)`", prose) if s.startswith(PREFIXES)]
    return cmds


def test_every_readme_command_is_listed():
    cmds = {c for p in PAGES for c in readme_commands(p.read_text())}
    unknown = cmds - set(EXAMPLES) - NOT_COMMANDS
    assert not unknown, f"README/docs commands the example test does not know (add them to EXAMPLES): {sorted(unknown)}"
    stale = (set(EXAMPLES) | NOT_COMMANDS) - cmds
    assert not stale, f"listed commands no longer in the README or docs/: {sorted(stale)}"


def _merge(base: dict, upd: dict) -> dict:
    for k, v in upd.items():
        base[k] = _merge(base.get(k, {}), v) if isinstance(v, dict) else v
    return base


@pytest.fixture(scope="module")
def sandbox(tmp_path_factory) -> Path:
    """A project folder: the package and notebooks linked, params.yaml = demo profile at micro size."""
    box = tmp_path_factory.mktemp("project")
    (box / "apmask_lib").symlink_to(ROOT / "apmask_lib", target_is_directory=True)
    shutil.copytree(ROOT / "notebooks", box / "notebooks")
    shutil.copy(ROOT / "pyproject.toml", box / "pyproject.toml")
    params = _merge(yaml.safe_load((ROOT / "params.yaml").read_text()), MICRO)
    (box / "params.yaml").write_text(yaml.safe_dump(params))
    return box


@pytest.mark.slow
def test_readme_examples_run_as_written(sandbox):
    bin_dir = Path(sys.executable).parent
    env = dict(os.environ, PATH=f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}",
               PYTHONPATH=f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}")
    for cmd, expected in EXAMPLES.items():
        r = subprocess.run(shlex.split(cmd), cwd=sandbox, env=env, capture_output=True, text=True, timeout=600)
        out = r.stdout + r.stderr
        if expected == "ok":
            assert r.returncode == 0, f"`{cmd}` failed:\n{out[-3000:]}"
        else:
            assert r.returncode != 0 and expected in out, f"`{cmd}` should fail saying {expected!r}:\n{out[-3000:]}"
    run = sandbox / "runs" / "adhoc" / "demo" / "grass" / "s0"
    assert (run / "pretrain" / "backbone.pt").is_file() and (run / "evaluate" / "metrics.json").is_file()
    assert (sandbox / "runs" / "random-mask" / "grass" / "s0" / "evaluate" / "metrics.json").is_file()
    assert (sandbox / "runs" / "adhoc" / "predictions" / "predictions.csv").is_file()
    assert (sandbox / "runs" / "adhoc" / "figures" / "backbone_attention.png").is_file()
    assert len(list((sandbox / "runs" / "adhoc" / "notebooks").glob("*.html"))) == 6
    assert not (sandbox / "results").exists(), "an ad-hoc example wrote into results/ (pipeline outputs)"
