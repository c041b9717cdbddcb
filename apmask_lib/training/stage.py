"""One training shell for both stages (pre-training, fine-tuning): a :class:`Stage` says what differs
(its model, its step, its exports, its checkpoint entries); :meth:`Stage.train` walks the steps
they share, in this order:

1. open the run folder (:meth:`~apmask_lib.training.runfolder.RunFolder.open`): resume from the
   checkpoint, or return at once where ``done.json`` covers the call;
2. :meth:`Stage.build` the run's data, models, optimiser and schedules (before any load);
3. from a checkpoint: check its steps per epoch, :meth:`Stage.restore` the weights, then the RNG
   state, the step and the running epoch lists;
4. :meth:`Stage.prepare` what must follow the load (compiled blocks, a DDP wrapper, autocast);
5. the logs (``log.csv``, ``log.jsonl``, the stage's :attr:`Stage.epoch_csvs`), ``config.json``
   (the config plus :meth:`Stage.run_info` under ``_run``);
6. the :class:`~apmask_lib.training.loop.TrainLoop` over :meth:`Stage.items`: one
   :meth:`Stage.step` a step, its values recorded (read back every ``log_every`` steps; a NaN/inf
   loss stops the run); at every epoch end :meth:`Stage.epoch_record` and a save, and a save
   where the call stops;
7. a save (:meth:`Stage.save`) = ``checkpoint.pt`` (:meth:`Stage.state` with the step, the steps
   per epoch, ``done``, the config fingerprint and the RNG state), then :meth:`Stage.export` (at
   every save when :attr:`Stage.export_every_save`, else where the call stops), then, where the
   call stops, ``done.json``;
8. when the checkpoint already covered the call (no step ran): the exports re-derived from it and
   ``done.json``; then :meth:`Stage.finish`.

The run folder's lock is the caller's (``run_pretrain``, ``run_finetune``: ``with run.locked():``).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Optional, Sequence

import torch

from .loop import BAR, TrainLoop, progress_mode
from .runfolder import RunFolder
from ..core.rng import set_rng_state


class Stage:
    """What one training stage says; the rest is :meth:`train` (module docstring).

    Class attributes:

    csv_columns:  ``log.csv``'s columns.
    keys:         the per-step device scalars :meth:`step` returns, the loss first (their epoch means go
                  to the epoch record); ``terms``: those the NaN/inf message lists; ``what``: the
                  loss's name in it.
    epoch_csvs:   per-epoch CSV logs besides ``log.jsonl`` (name -> columns), written by the stage.
    export_every_save: export the weights at every checkpoint (else only where the call stops).

    Attributes a subclass sets in :meth:`build`: ``iters`` (steps per epoch), ``total`` (steps of
    the whole schedule), ``log_every``. The shell sets ``logs`` (the open logs by file name), ``loop``
    and ``start``/``stop`` (this call's first and past-last step) for the hooks to read.
    """

    csv_columns: Sequence[str] = ()
    keys: Sequence[str] = ("loss",)
    terms: Sequence[str] = ()
    what: str = "loss"
    epoch_csvs: Mapping[str, Sequence[str]] = {}
    export_every_save: bool = False

    def __init__(self, cfg: Any, run: RunFolder):
        self.cfg, self.run = cfg, run
        self.iters = self.total = self.log_every = 0
        self.start = self.stop = 0
        self.logs: dict[str, Any] = {}
        self.loop: Optional[TrainLoop] = None

    # ------------------------------------------------------------------ hooks
    def build(self, dataset: Any, ckpt: Optional[dict], show_progress: bool) -> None:
        """Data, models, optimiser and schedules, before any checkpoint is loaded; ``show_progress``:
        whether a bar is shown (decoding images ...)."""
        raise NotImplementedError

    def restore(self, ckpt: dict) -> Mapping[str, Sequence[float]]:
        """Load the checkpoint's weights and optimiser state; returns the running epoch lists (by key)."""
        raise NotImplementedError

    def prepare(self) -> None:
        """After the checkpoint load, before the first step (compile, wrap, autocast)."""

    def run_info(self) -> dict[str, Any]:
        """What the run derived from the config (``config.json`` ``_run``)."""
        return {}

    def reduce(self) -> Optional[Callable[[torch.Tensor], torch.Tensor]]:
        """Averages the loop's read-back values across processes (DDP), or None."""
        return None

    def items(self) -> Optional[Iterable[Any]]:
        """What each step consumes (e.g. a data loader over steps ``start .. stop-1``), or None."""
        return None

    def step(self, step: int, item: Any) -> tuple[Mapping[str, torch.Tensor], int, dict[str, float]]:
        """One optimisation step: (device scalars named :attr:`keys`, images, plain numbers for ``log.csv``)."""
        raise NotImplementedError

    def state(self) -> tuple[dict[str, Any], dict[str, Any]]:
        """The checkpoint's entries: (weights, extras), stored before and after step, steps per
        epoch and ``done``."""
        raise NotImplementedError

    def epoch_record(self, loop: TrainLoop, epoch: int, step: int, secs: float) -> dict:
        """The stage's ``log.jsonl`` record of an epoch."""
        raise NotImplementedError

    def export(self, step: int) -> None:
        """The stage's weights files, as of ``step``."""
        raise NotImplementedError

    def finish(self) -> None:
        """After the last step of the call (e.g. a barrier across processes)."""

    # ------------------------------------------------------------------ the shell
    def save(self, step: int, done: bool, final: bool) -> None:
        """Checkpoint (every epoch end and where the call stops), the exports, and ``done.json``
        where the call stops (``final``)."""
        weights, extras = self.state()
        self.run.save_checkpoint(**weights, step=step, iters_per_epoch=self.iters, done=done, **extras)
        if self.export_every_save or final:
            self.export(step)
        if final:
            self.run.mark(step, self.total)

    def train(self, dataset: Any, max_steps: Optional[int], resume: bool, force: bool, progress: bool) -> Path:
        """Run (or continue) the stage up to ``max_steps`` (None: the whole schedule); returns the run folder."""
        run = self.run
        ckpt, finished = run.open(self.cfg, resume, force, max_steps)
        if finished:
            return run.path
        self.build(dataset, ckpt, progress_mode(progress and run.main) == BAR)
        self.stop = self.total if max_steps is None else min(self.total, max_steps)
        self.start, means = 0, {}
        if ckpt is not None:
            run.check_resume(ckpt, self.iters)
            means = self.restore(ckpt)
            set_rng_state(ckpt["rng"])
            self.start = int(ckpt["step"])
        self.prepare()
        self.logs = run.start_logs(self.csv_columns, None if ckpt is None else self.start, self.iters, self.epoch_csvs)
        run.write_config(self.cfg, self.run_info())
        self.loop = loop = TrainLoop(
            run, start=self.start, stop=self.stop, total=self.total, iters=self.iters, keys=self.keys,
            log=self.logs["log.csv"], log_every=self.log_every, what=self.what, epoch_record=self.epoch_record,
            save=self.save, progress=progress, means=means, terms=self.terms, reduce=self.reduce())
        for step, item in loop.steps(self.items()):
            values, n_images, extra = self.step(step, item)
            loop.record(step, values, n_images, **extra)
        loop.close()
        if self.start >= self.stop:  # nothing to train: the checkpoint covers this call; re-derive its exports
            self.export(self.start)
            run.mark(self.start, self.total)
        self.finish()
        return run.path


__all__ = ["Stage"]
