"""The training shell (apmask_lib/training/stage.py, loop.py, runfolder.RunFolder): progress lines where stderr is
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


# ----------------------------------------------------------------------------- the stage shell
class _Toy:
    """A stage of a few lines (a linear regression) in the shared shell: only what differs is said."""

    @staticmethod
    def make(out, nan_at=None):
        import torch

        from apmask_lib.core.files import atomic_torch_save
        from apmask_lib.core.optim import optimizer_step
        from apmask_lib.training.runfolder import RunFolder, resume_ignored
        from apmask_lib.training.stage import Stage

        class Toy(Stage):
            csv_columns = ("step", "epoch", "loss", "lr", "step_time", "images_per_s")
            what = "toy loss"
            export_every_save = True

            def build(self, dataset, ckpt, show_progress):
                g = torch.Generator().manual_seed(0)
                self.model = torch.nn.Linear(3, 1)
                with torch.no_grad():
                    self.model.weight.copy_(torch.randn(1, 3, generator=g))
                    self.model.bias.zero_()
                self.opt = torch.optim.SGD(self.model.parameters(), lr=0.05, momentum=0.9)
                self.x = torch.randn(6, 8, 3, generator=g)
                self.iters, self.total, self.log_every = 2, 6, 1

            def restore(self, ckpt):
                self.model.load_state_dict(ckpt["model"])
                self.opt.load_state_dict(ckpt["optimizer"])
                return {"loss": ckpt["epoch_losses"]}

            def step(self, step, item):
                x = self.x[step]
                loss = ((self.model(x) - x.sum(-1, keepdim=True)) ** 2).mean()
                if step == nan_at:
                    loss = loss * float("nan")
                optimizer_step(self.opt, loss, self.model, clip_grad=10.0)
                return {"loss": loss.detach()}, len(x), {"lr": 0.05}

            def state(self):
                return {"model": self.model, "optimizer": self.opt}, {"epoch_losses": list(self.loop.means["loss"])}

            def epoch_record(self, loop, epoch, step, secs):
                return {"epoch": epoch, "step": step, **loop.epoch_means()}

            def export(self, step):
                atomic_torch_save(self.run / "weights.pt", self.model.state_dict())

        cfg = replace(Config(), out_dir=str(out))
        return Toy(cfg, RunFolder(cfg.out_dir, "toy", ("weights.pt",), resume_ignored("toy")))


def test_the_stage_shell_resumes_exactly_and_does_not_retrain_a_finished_run(tmp_path):
    import json

    import torch

    whole = _Toy.make(tmp_path / "whole").train(None, None, True, False, False)
    for stop in (3, 5, None):  # stopped mid-epoch, at an odd step, then to the end
        parts = _Toy.make(tmp_path / "parts").train(None, stop, True, False, False)
    a, b = (torch.load(p / "weights.pt", weights_only=True) for p in (whole, parts))
    assert all(torch.equal(a[k], b[k]) for k in a)
    logs = [(p / "log.jsonl").read_text() for p in (whole, parts)]
    assert logs[0] == logs[1] and len(logs[0].splitlines()) == 3
    assert json.loads((parts / "done.json").read_text())["step"] == 6
    before = (parts / "log.csv").read_text()
    assert _Toy.make(tmp_path / "parts").train(None, None, True, False, False) == parts  # finished: nothing runs
    assert (parts / "log.csv").read_text() == before


def test_the_stage_shell_stops_on_a_nonfinite_loss(tmp_path):
    from apmask_lib.core.nonfinite import NonFiniteLoss

    with pytest.raises(NonFiniteLoss, match=r"toy loss is nan at step 3 .*checkpoint.pt \(step 2\), untouched"):
        _Toy.make(tmp_path, nan_at=3).train(None, None, True, False, False)
