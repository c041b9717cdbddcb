"""The training loop both stages share (pre-training, fine-tuning): step logs, epoch logs, saving,
progress.

The stage shell (:meth:`apmask_lib.training.stage.Stage.train`) builds the stage's state (models,
optimiser, schedules, data: ``build_pretrain_state`` / ``build_finetune_state``), opens its
:class:`~apmask_lib.training.runfolder.RunFolder`, and runs

.. code-block:: python

    loop = TrainLoop(run, ...)
    for step, item in loop.steps(items):
        values = train_step(...)             # detached device scalars: loss, ...
        loop.record(step, values, n_images, lr=...)
    loop.close()

:meth:`TrainLoop.record` keeps the step's values on the device and reads them back every
``log_every`` steps and at every epoch end (:meth:`TrainLoop.flush`: one host sync, a NaN/inf loss
stops the run with a one-line error, ``log.csv`` rows, epoch means); at an epoch end it appends the
stage's epoch record to ``log.jsonl`` and saves; where the call stops (``max_steps``) it saves too.

**Progress** (:func:`progress_mode`): on a terminal a tqdm bar per stage; where stderr is not a
terminal (DVC, CI, a log file) one line per epoch instead (stage, epoch/total, loss, seconds, ETA);
inside a Jupyter kernel (papermill, ``apmask notebook``) the same line goes to the kernel process's
own stderr, i.e. the console that runs the notebook, and the notebook records nothing.
"""
from __future__ import annotations

import os
import sys
import time
from typing import Any, Callable, Iterable, Iterator, Mapping, Optional, Sequence

import numpy as np
import torch
from tqdm.auto import tqdm

from .runfolder import RunFolder
from ..core.files import append_jsonl
from ..core.nonfinite import check_finite

BAR, LINES, OFF = "bar", "lines", "off"


def _in_kernel() -> bool:
    return type(sys.stderr).__module__.startswith("ipykernel")


def progress_mode(progress: bool) -> str:
    """How a training stage shows progress: ``"off"`` when not asked, ``"bar"`` (tqdm) when stderr is
    a terminal, ``"lines"`` (one line per epoch, :func:`emit_line`) otherwise, Jupyter kernels included."""
    if not progress:
        return OFF
    if _in_kernel():
        return LINES
    try:
        return BAR if sys.stderr.isatty() else LINES
    except (AttributeError, ValueError):
        return LINES


def emit_line(line: str) -> None:
    """Write one progress line to stderr. In a Jupyter kernel: to the process's own stderr (what
    ``OutStream.fileno()`` returns), which reaches the console running the notebook but not the
    notebook, so executed notebooks stay free of timings."""
    if _in_kernel():
        try:
            os.write(sys.stderr.fileno(), (line + "\n").encode())
            return
        except (OSError, AttributeError, ValueError):
            pass  # no process stream to write to: say nothing rather than fill the notebook
        return
    print(line, file=sys.stderr, flush=True)


def _clock(seconds: float) -> str:
    s = int(round(max(seconds, 0.0)))
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}" if s >= 3600 else f"{s // 60}:{s % 60:02d}"


def progress_line(stage: str, epoch: int, epochs: int, loss: float, seconds: float, eta_s: float) -> str:
    """``pretrain epoch 3/10: loss 5.1234, 12.3 s, ETA 1:26`` (``epoch`` counted from 1)."""
    return f"{stage} epoch {epoch}/{epochs}: loss {loss:.4f}, {seconds:.1f} s, ETA {_clock(eta_s)}"


class TrainLoop:
    """The save/flush/epoch-log loop of one call of a training stage (module docstring).

    run:       the stage's :class:`~apmask_lib.training.runfolder.RunFolder` (``main`` decides who writes).
    start, stop, total, iters: first and past-last step of this call, steps of the whole schedule,
               steps per epoch.
    keys:      names of the per-step device scalars (``"loss"`` first); their epoch means go to the
               epoch record; ``means`` restores the running lists of a resumed epoch.
    log:       the step :class:`~apmask_lib.core.files.CSVLog`; ``log_every``: read-back period (steps).
    what, terms: the NaN/inf message (``check_finite``): the loss's name and the keys it lists.
    epoch_record(loop, epoch, step, seconds) -> dict: the stage's ``log.jsonl`` record.
    save(step, done, final): checkpoint at every epoch end and where the call stops (``final``).
    reduce:    averages the (n, len(keys)) read-back across processes (DDP), or None.
    """

    def __init__(self, run: RunFolder, *, start: int, stop: int, total: int, iters: int, keys: Sequence[str],
                 log, log_every: int, what: str, epoch_record: Callable[..., dict],
                 save: Callable[[int, bool, bool], None], progress: bool = True,
                 means: Optional[Mapping[str, Sequence[float]]] = None, terms: Sequence[str] = (),
                 reduce: Optional[Callable[[torch.Tensor], torch.Tensor]] = None):
        self.run, self.start, self.stop, self.total, self.iters = run, start, stop, total, iters
        self.keys, self.log, self.log_every = tuple(keys), log, max(1, int(log_every))
        self.what, self.terms, self.reduce = what, tuple(terms), reduce
        self.epoch_record, self.save = epoch_record, save
        self.means: dict[str, list[float]] = {k: [] for k in self.keys}
        self.means.update({k: list(v) for k, v in (means or {}).items()})
        self.pending: list[dict[str, Any]] = []
        self.last: dict[str, Any] = {}
        self.mode = progress_mode(progress and run.main)
        self.bar = tqdm(total=stop, initial=start, desc=run.stage, disable=self.mode != BAR, dynamic_ncols=True)
        self.t0 = self.epoch_t0 = self.t_last = time.perf_counter()
        self.epoch_steps = 0

    @property
    def epochs(self) -> int:
        return self.total // self.iters

    def steps(self, items: Optional[Iterable[Any]] = None) -> Iterator[tuple[int, Any]]:
        """(step, item) for the steps of this call; ``items`` (e.g. a data loader) is zipped in."""
        self.t0 = self.epoch_t0 = self.t_last = time.perf_counter()
        rng = range(self.start, self.stop)
        yield from (((s, None) for s in rng) if items is None else zip(rng, items))

    def record(self, step: int, values: Mapping[str, torch.Tensor], n_images: int, **extra: Any) -> None:
        """Log one finished step: ``values`` (device scalars named :attr:`keys`, read back later),
        ``extra`` plain numbers for ``log.csv`` (lr ...); at the epoch end the epoch record and a save."""
        now = time.perf_counter()
        dt, self.t_last = now - self.t_last, now
        epoch, it = divmod(step, self.iters)
        row = {"step": step, "epoch": epoch, **values, **extra, "step_time": dt, "images_per_s": n_images / max(dt, 1e-9)}
        self.pending.append(row)
        self.last = row
        self.bar.update(1)
        self.epoch_steps += 1
        end_of_epoch = it == self.iters - 1
        if len(self.pending) >= self.log_every or end_of_epoch or step == self.stop - 1:
            self.flush()
        if end_of_epoch:
            secs = time.perf_counter() - self.epoch_t0
            rec = self.epoch_record(self, epoch, step + 1, secs)
            if self.run.main:
                append_jsonl(self.run / "log.jsonl", rec)
            if self.mode == LINES:
                done = step + 1 - self.start
                eta = (time.perf_counter() - self.t0) / max(done, 1) * (self.stop - step - 1)
                emit_line(progress_line(self.run.stage, epoch + 1, self.epochs, rec["loss"], secs, eta))
            for v in self.means.values():
                v.clear()
            self.epoch_t0, self.epoch_steps = time.perf_counter(), 0
            self.save(step + 1, step + 1 == self.total, step == self.stop - 1)
        elif step == self.stop - 1:
            self.save(step + 1, False, True)

    def flush(self) -> None:
        """Read the pending steps' values back (one sync), check them, write their ``log.csv`` rows."""
        if not self.pending:
            return
        vals = torch.stack([torch.stack([r[k].float() for k in self.keys]) for r in self.pending])
        if self.reduce is not None:
            vals = self.reduce(vals)
        for r, v in zip(self.pending, vals.cpu().tolist()):
            r.update(zip(self.keys, v))
            check_finite(r[self.keys[0]], self.what, r["step"],
                         terms={k: r[k] for k in self.terms} if self.terms else None, checkpoint=self.run.checkpoint)
            for k in self.keys:
                self.means.setdefault(k, []).append(r[k])
            if self.run.main:
                self.log.write(r)
        self.bar.set_postfix(loss=f"{self.pending[-1][self.keys[0]]:.4f}")
        self.pending.clear()

    def epoch_means(self) -> dict[str, float]:
        """Means of :attr:`keys` over the epoch's logged steps."""
        return {k: float(np.mean(v)) for k, v in self.means.items()}

    def close(self) -> None:
        self.bar.close()


__all__ = ["TrainLoop", "progress_mode", "progress_line", "emit_line", "BAR", "LINES", "OFF"]
