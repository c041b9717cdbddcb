"""The command line: data indexing, clear errors, tables."""
from __future__ import annotations

import json

import pytest

from apmask_lib.cli import main


@pytest.mark.slow
def test_data_generates_demo_and_writes_an_index(tmp_path, capsys):
    index = tmp_path / "index.json"
    with pytest.raises(SystemExit, match="params file not found"):
        main(["data", "--params", "none.yaml"])
    main(["data", "-S", f"data.root={tmp_path / 'demo'}", "-S", "data.category=gravel",
          "--index", str(index)])
    assert "demo/gravel" in capsys.readouterr().out
    idx = json.loads(index.read_text())
    assert idx["n_train"] == len(idx["train"]) > 0 and idx["n_test"] == len(idx["test"]) > 0


def test_errors_name_the_problem(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        main(["evaluate", "-S", f"out_dir={tmp_path / 'nothing'}", "-S", f"data.root={tmp_path / 'demo'}"])
    assert e.value.code == 2
    assert "model.pt" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["pretrain", "-S", "pretrain.epochs=many"])
    assert "pretrain.epochs" in capsys.readouterr().err


def test_tables(tmp_path, capsys):
    with pytest.raises(SystemExit):
        main(["tables", "--runs", str(tmp_path / "missing"), "--out", str(tmp_path / "tables")])
    assert "missing" in capsys.readouterr().err
    (tmp_path / "runs").mkdir()
    main(["tables", "--runs", str(tmp_path / "runs"), "--out", str(tmp_path / "tables")])
    assert "—" in (tmp_path / "tables" / "table1.md").read_text()


def _help(argv, capsys) -> str:
    with pytest.raises(SystemExit):
        main(argv)
    return capsys.readouterr().out


def test_every_command_is_named_and_every_option_has_a_help_text(capsys, monkeypatch):
    import argparse
    import re

    top = _help(["--help"], capsys)
    commands = re.search(r"\{([a-z,-]+)\}", top).group(1).split(",")
    for name in commands:
        assert re.search(rf"\b{re.escape(name)}\b", top.split("positional arguments")[0]), f"{name} not in the overview"
    # every option of every sub-command carries a help text: capture the parsers main() builds
    parsers = []
    orig = argparse.ArgumentParser.parse_args

    def spy(self, *a, **k):
        parsers.append(self)
        return orig(self, *a, **k)

    monkeypatch.setattr(argparse.ArgumentParser, "parse_args", spy)
    _help(["--help"], capsys)
    sub = next(a for a in parsers[0]._actions if isinstance(a, argparse._SubParsersAction))
    missing = [f"{name} {opt.option_strings or opt.dest}" for name, sp in sub.choices.items() for opt in sp._actions
               if not isinstance(opt, argparse._HelpAction) and not opt.help]
    assert not missing, f"options without help: {missing}"
    assert "evaluate_knn" in _help(["predict", "--help"], capsys)
    assert "kNN model" in _help(["export", "--help"], capsys)


def test_fit_warns_about_the_demo_micro_schedule_on_other_data():
    from apmask_lib.cli import micro_schedule_warning
    from apmask_lib.config import Config, load_params, replace
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    demo = load_params(root / "params.yaml")
    assert micro_schedule_warning(demo) is None  # the demo itself
    inherited = replace(demo, data={"dataset": "folder", "normal_dir": "good"})
    w = micro_schedule_warning(inherited)
    assert w and "data.image_size=112" in w and "finetune.epochs=15" in w and "params-folder.yaml" in w
    own = load_params(root / "params-folder.yaml")  # the own-data starting point: no warning
    assert own.data.dataset == "folder" and micro_schedule_warning(own) is None
    assert own.finetune.init == own.backbone and own.evaluate.scales == (224,)
    assert micro_schedule_warning(replace(Config(), data={"dataset": "mvtec"})) is None  # the paper's defaults
