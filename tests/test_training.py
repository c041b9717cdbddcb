"""The training shell (apmask_lib/training/loop.py, runfolder.RunFolder): progress lines where stderr is
not a terminal, no bar text there, the line's way out of a Jupyter kernel, the resume keys."""
from __future__ import annotations

import io
import os
import re

import pytest

from apmask_lib.training import loop as training
from apmask_lib.config import Config, replace
from apmask_lib.data.types import cap_train

pytestmark = pytest.mark.filterwarnings("ignore:backbone .random")

LINE = re.compile(r"^(pretrain|finetune) epoch (\d+)/(\d+): loss \d+\.\d{4}, \d+\.\d s, ETA \d+:\d\d$")


def tiny(root, out_dir) -> Config:
    return replace(Config(), seed=0, backbone="random:vit_tiny16", device="cpu", out_dir=str(out_dir),
                   data={"dataset": "mvtec", "root": str(root), "category": "bottle", "image_size": 64, "max_train": 8},
                   pretrain={"global_size": 64, "local_size": 32, "n_local": 2, "hidden_dim": 64, "batch_size": 4,
                             "epochs": 3, "warmup_epochs": 1, "log_every": 1, "num_workers": 0, "bottleneck_dim": 32},
                   finetune={"init": "random:vit_tiny16", "batch_size": 4, "epochs": 2, "warmup_epochs": 1,
                             "num_workers": 0, "log_every": 1})


class _Stream(io.StringIO):
    def __init__(self, tty: bool):
        super().__init__()
        self.tty = tty

    def isatty(self) -> bool:
        return self.tty


def test_progress_mode_follows_the_terminal(monkeypatch):
    monkeypatch.setattr("sys.stderr", _Stream(tty=True))
    assert training.progress_mode(True) == training.BAR
    assert training.progress_mode(False) == training.OFF
    monkeypatch.setattr("sys.stderr", _Stream(tty=False))
    assert training.progress_mode(True) == training.LINES


def test_progress_line_format():
    assert training.progress_line("pretrain", 3, 10, 5.12345, 12.34, 86) == \
        "pretrain epoch 3/10: loss 5.1235, 12.3 s, ETA 1:26"
    assert training.progress_line("finetune", 1, 2, 0.5, 1.0, 3725).endswith("ETA 1:02:05")


@pytest.mark.slow
def test_one_line_per_epoch_and_no_bars_when_not_a_terminal(mvtec_root, tmp_path, capsys):
    """Under DVC/CI (stderr not a TTY) each stage prints one line per epoch and no tqdm bar text."""
    from apmask_lib.finetune.stage import run_finetune
    from apmask_lib.pretrain.stage import run_pretrain

    cfg = tiny(mvtec_root, tmp_path)
    run_pretrain(cfg)
    pre = capsys.readouterr()
    run_finetune(cfg)
    fin = capsys.readouterr()
    for out, stage, epochs in ((pre, "pretrain", 3), (fin, "finetune", 2)):
        lines = [ln for ln in out.err.splitlines() if ln.strip()]
        matched = [LINE.match(ln) for ln in lines]
        assert all(matched), lines  # nothing else on stderr: no bars, no "it/s"
        assert [(m[1], int(m[2]), int(m[3])) for m in matched] == [(stage, e, epochs) for e in range(1, epochs + 1)]
        assert out.out == ""
    # progress=False: silent
    run_pretrain(replace(cfg, out_dir=str(tmp_path / "quiet")), progress=False)
    assert capsys.readouterr().err == ""


def test_in_a_kernel_the_line_goes_to_the_process_stream_not_the_notebook(monkeypatch):
    """ipykernel's OutStream.fileno() is the kernel process's own stderr (the console running papermill);
    what is written there never enters the notebook."""
    r, w = os.pipe()

    class KernelStream(_Stream):
        def fileno(self) -> int:
            return w

    stream = KernelStream(tty=False)
    monkeypatch.setattr("sys.stderr", stream)
    monkeypatch.setattr(training, "_in_kernel", lambda: True)
    assert training.progress_mode(True) == training.LINES
    training.emit_line("finetune epoch 1/2: loss 0.5000, 1.0 s, ETA 0:01")
    os.close(w)
    assert os.read(r, 1000).decode() == "finetune epoch 1/2: loss 0.5000, 1.0 s, ETA 0:01\n"
    os.close(r)
    assert stream.getvalue() == ""  # the notebook's stream got nothing


def test_resume_keys_are_those_that_do_not_change_the_weights():
    """A resume may change these keys and no other (the checkpoint's fingerprint leaves them out)."""
    from apmask_lib.finetune import stage as finetune
    from apmask_lib.pretrain import stage as pretrain

    common = {("device",), ("out_dir",), ("evaluate",), ("data", "max_test")}
    speed = lambda s: {(s, "num_workers"), (s, "log_every"), (s, "compile")}  # noqa: E731
    assert pretrain._RESUME_IGNORED == common | speed("pretrain") | {("finetune",)}
    assert finetune._RESUME_IGNORED == common | speed("pretrain") | speed("finetune")


def test_cap_train():
    assert cap_train(range(5), None) == [0, 1, 2, 3, 4]
    assert cap_train(range(5), 2) == [0, 1]
