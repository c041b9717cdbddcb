"""A training stage's run folder (``<out_dir>/pretrain``, ``<out_dir>/finetune``): who may write it,
when it is finished, and what is never overwritten. Used by both stages, so they behave the same.

* **One run per folder** (:class:`RunLock`): ``.lock`` holds the PID and host of the run writing the
  folder, and an exclusive ``flock`` on it lives as long as that process. A second run is refused
  with the PID in the message. The kernel drops the ``flock`` when a process dies (even by
  ``kill -9``), so a lock left by a dead run is taken over without asking.
* **Done means done** (:func:`write_marker`, :func:`read_marker`): ``done.json`` is written *last*,
  after the checkpoint and the exported weights, and records each file's size and SHA-256. A run
  counts as finished only when the marker exists and every file still matches it; otherwise the
  stage re-derives its exports from ``checkpoint.pt`` (e.g. after a kill between the checkpoint and
  the export) before writing the marker again. The marker is removed before a run changes anything.
* **Nothing finished is overwritten** (:func:`guard`): a folder holding exported weights or a marker
  but no checkpoint to resume from (deleted, or ``resume=False``) is refused unless ``force``.
* **No stale temporaries** (:func:`sweep_temporaries`): ``*.tmp`` files left by killed atomic
  writes are removed when a run takes the folder (under its lock, so never a live run's).
* **Resume only what the configuration still describes** (:class:`RunFolder`): the checkpoint stores
  the run's configuration fingerprint (the config without the keys in :func:`resume_ignored`, which do
  not change the weights) and a resume with another fingerprint is refused, naming the differing keys.
  On resume the logs are cut back to the checkpoint's step; a fresh run deletes them.

Layout of ``<out_dir>/<stage>`` (:class:`RunFolder`): ``checkpoint.pt`` (resume state), the stage's
exports (``backbone.pt`` / ``model.pt``), ``log.csv`` (per step), ``log.jsonl`` (per epoch), any
per-epoch CSV (``validation.csv``), ``config.json`` (the config plus the run's derived sizes under
``_run``), ``done.json`` and ``.lock``.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import socket
from pathlib import Path
from typing import Any, Iterable, Iterator, Mapping, Optional, Sequence

log = logging.getLogger("apmask")

LOCK_NAME = ".lock"
MARKER_NAME = "done.json"

try:
    import fcntl
except ImportError:  # pragma: no cover - Windows: PID check only
    fcntl = None


class RunLocked(RuntimeError):
    """Another live process is writing this run folder."""


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class RunLock:
    """Exclusive lock on a run folder (``with RunLock(folder): ...``); see the module docstring."""

    def __init__(self, folder: str | Path):
        self.folder = Path(folder)
        self.path = self.folder / LOCK_NAME
        self._fd: Optional[int] = None

    def _holder(self) -> str:
        try:
            return self.path.read_text().strip() or "?"
        except OSError:
            return "?"

    def _refuse(self, holder: str) -> None:
        pid = holder.split()[0] if holder != "?" else "?"
        raise RunLocked(f"{self.folder} is in use by process {pid} ({self.path}: {holder}); wait for that run to "
                        "finish or stop it, or use another out_dir. If no such process runs, delete the lock file.")

    def acquire(self) -> "RunLock":
        self.folder.mkdir(parents=True, exist_ok=True)
        me = f"{os.getpid()} {socket.gethostname()}"
        for _ in range(10):
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            if fcntl is not None:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except OSError:
                    os.close(fd)
                    self._refuse(self._holder())
                try:  # the file we locked may have been unlinked by its releasing owner meanwhile
                    if os.fstat(fd).st_ino != os.stat(self.path).st_ino:
                        os.close(fd)
                        continue
                except FileNotFoundError:
                    os.close(fd)
                    continue
            else:  # pragma: no cover
                holder = self._holder().split()
                if holder and holder[0].isdigit() and int(holder[0]) != os.getpid() and _pid_alive(int(holder[0])):
                    os.close(fd)
                    self._refuse(" ".join(holder))
            old = os.read(fd, 200).decode(errors="replace").strip()
            if old:
                log.info("taking over the lock of a finished or killed run (%s) in %s", old, self.folder)
            os.ftruncate(fd, 0)
            os.lseek(fd, 0, os.SEEK_SET)
            os.write(fd, f"{me}\n".encode())
            self._fd = fd
            return self
        raise RunLocked(f"could not take the lock {self.path} (it keeps changing)")

    def release(self) -> None:
        if self._fd is None:
            return
        try:
            self.path.unlink(missing_ok=True)  # while still holding it: see the inode check in acquire
        finally:
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> "RunLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


def sweep_temporaries(folder: str | Path) -> list[Path]:
    """Remove ``*.tmp`` files (left by atomic writes that were killed) from ``folder``; returns them."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    stale = sorted(p for p in folder.iterdir() if p.is_file() and p.name.endswith(".tmp"))
    for p in stale:
        p.unlink(missing_ok=True)
    if stale:
        log.warning("removed %d temporary file(s) left by an interrupted save in %s: %s", len(stale), folder,
                    ", ".join(p.name for p in stale))
    return stale


def file_sha256(path: str | Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def write_marker(folder: str | Path, files: Iterable[str], **info: Any) -> Path:
    """Write ``done.json`` (last, after ``files``): ``info`` (step, total_steps, done ...) and each
    file's size and SHA-256."""
    from ..core.files import write_json

    folder = Path(folder)
    record = {name: {"size": (folder / name).stat().st_size, "sha256": file_sha256(folder / name)} for name in files}
    path = folder / MARKER_NAME
    write_json(path, {**info, "files": record})
    return path


def read_marker(folder: str | Path, files: Iterable[str]) -> Optional[dict[str, Any]]:
    """The marker of ``folder`` if it exists, lists every one of ``files`` and each still has the
    recorded size and SHA-256; None otherwise (never written, or an output changed since)."""
    import json

    folder = Path(folder)
    try:
        marker = json.loads((folder / MARKER_NAME).read_text())
        for name in files:
            rec, path = marker["files"][name], folder / name
            if path.stat().st_size != rec["size"] or file_sha256(path) != rec["sha256"]:
                log.warning("%s changed after the run finished (%s no longer matches); re-deriving it from the "
                            "checkpoint", path, MARKER_NAME)
                return None
        return marker
    except (OSError, ValueError, KeyError, TypeError):
        return None


def clear_marker(folder: str | Path) -> None:
    (Path(folder) / MARKER_NAME).unlink(missing_ok=True)


def finished(marker: Optional[dict[str, Any]], max_steps: Optional[int]) -> bool:
    """Whether a (valid) marker covers this call: the whole schedule, or at least ``max_steps`` steps."""
    if marker is None:
        return False
    return bool(marker.get("done")) or (max_steps is not None and int(marker.get("step", -1)) >= max_steps)


def guard(folder: str | Path, exports: Iterable[str], force: bool) -> None:
    """Before a run starts from scratch in ``folder``: refuse when it holds finished outputs
    (``exports`` or the marker) unless ``force``; with ``force`` remove them (and the checkpoint)."""
    folder = Path(folder)
    present = [n for n in (*exports, MARKER_NAME) if (folder / n).exists()]
    if present and not force:
        raise FileExistsError(
            f"{folder} holds the outputs of an earlier run ({', '.join(present)}) and no checkpoint.pt to resume "
            "from; they are not overwritten. Retrain over them with --force (force=True), or use another out_dir.")
    if force:
        for n in (*exports, MARKER_NAME, "checkpoint.pt"):
            (folder / n).unlink(missing_ok=True)


#: config keys that never change a stage's weights, whatever the stage (compared on resume without them)
ALWAYS_IGNORED = frozenset({("device",), ("out_dir",), ("evaluate",), ("data", "max_test")})
#: keys of a training section that change speed or logging only
NO_WEIGHT_KEYS = ("num_workers", "log_every", "compile")


def resume_ignored(*sections: str, whole: Sequence[str] = ()) -> set[tuple[str, ...]]:
    """Config key paths a resume may change: :data:`ALWAYS_IGNORED`, :data:`NO_WEIGHT_KEYS` of the
    training ``sections`` (e.g. "pretrain", "finetune") and the ``whole`` sections (a stage that never
    reads them)."""
    return set(ALWAYS_IGNORED) | {(s, k) for s in sections for k in NO_WEIGHT_KEYS} | {(w,) for w in whole}


class RunFolder:
    """``<out_dir>/<stage>`` of one training stage: its files (module docstring), lock, resume check,
    logs, ``config.json``, checkpoint and ``done.json``. ``exports``: the weights files the stage writes
    besides ``checkpoint.pt`` (``done.json`` vouches for both); ``ignored``: :func:`resume_ignored`;
    ``main``: whether this process writes files (rank 0 under DDP)."""

    CHECKPOINT = "checkpoint.pt"

    def __init__(self, out_dir: str | Path, stage: str, exports: Sequence[str], ignored: Iterable[tuple[str, ...]],
                 main: bool = True):
        self.path = Path(out_dir) / stage
        self.stage = stage
        self.exports = tuple(exports)
        self.outputs = (self.CHECKPOINT, *self.exports)
        self.ignored = set(ignored)
        self.main = main
        self.checkpoint = self.path / self.CHECKPOINT
        self.fingerprint: Optional[dict[str, Any]] = None

    def __truediv__(self, name: str) -> Path:
        return self.path / name

    @contextlib.contextmanager
    def locked(self) -> Iterator["RunFolder"]:
        """Hold the folder's :class:`RunLock` (main process only) and sweep stale temporaries."""
        if not self.main:
            yield self
            return
        with RunLock(self.path):
            sweep_temporaries(self.path)
            yield self

    def open(self, cfg: Any, resume: bool, force: bool, max_steps: Optional[int]) -> tuple[Optional[dict], bool]:
        """Before training: ``(checkpoint or None, finished)``. Resumes from ``checkpoint.pt`` when
        ``resume`` and it exists (refused when written with another configuration fingerprint);
        ``finished`` when ``done.json`` still vouches for the outputs and covers this call. Starting
        afresh over finished outputs is refused unless ``force`` (:func:`guard`). Unless finished, the
        marker is removed before anything in the folder changes."""
        from ..core.fingerprint import config_fingerprint, load_resume_checkpoint

        self.fingerprint = config_fingerprint(cfg, self.ignored)
        ckpt = None
        if resume and self.checkpoint.is_file():
            ckpt = load_resume_checkpoint(self.checkpoint, self.fingerprint)
            if finished(read_marker(self.path, self.outputs), max_steps):
                return ckpt, True
            # not finished, or its exports do not match done.json (e.g. killed between the checkpoint and the
            # export): go on from the checkpoint; when it already covers this call, no step runs and the
            # exports are re-derived from it
        elif self.main:
            guard(self.path, self.exports, force)
        if self.main:
            clear_marker(self.path)
        return ckpt, False

    def start_logs(self, step_columns: Sequence[str], start: Optional[int], iters_per_epoch: int,
                   epoch_csvs: Mapping[str, Sequence[str]] = {}) -> dict[str, Any]:
        """The logs: ``log.csv`` (per step, ``step_columns``), ``log.jsonl`` and the per-epoch CSVs
        ``epoch_csvs`` (name -> columns, rows keyed by "epoch"). A fresh run (``start`` None) deletes old
        ones; a resumed one cuts them back to the checkpoint's ``start`` step. Returns the
        :class:`~apmask_lib.core.files.CSVLog` objects by file name."""
        from ..core.files import CSVLog, truncate_jsonl

        logs = {"log.csv": CSVLog(self.path / "log.csv", step_columns)}
        logs.update({name: CSVLog(self.path / name, cols) for name, cols in epoch_csvs.items()})
        if not self.main:
            return logs
        self.path.mkdir(parents=True, exist_ok=True)
        if start is None:
            for name in (*logs, "log.jsonl"):
                (self.path / name).unlink(missing_ok=True)
        else:
            logs["log.csv"].truncate_after(start)
            truncate_jsonl(self.path / "log.jsonl", start // iters_per_epoch)
            for name in epoch_csvs:
                logs[name].truncate_after(start // iters_per_epoch, key="epoch")
        return logs

    def write_config(self, cfg: Any, run: Mapping[str, Any]) -> None:
        """``config.json``: the full config plus what the run derived from it (``_run``: sizes, device ...)."""
        from ..core.files import write_json

        if self.main:
            write_json(self.path / "config.json", {**cfg.to_dict(), "_run": dict(run)})

    def check_resume(self, ckpt: Mapping[str, Any], iters_per_epoch: int) -> None:
        """A checkpoint is resumed with the same number of iterations per epoch only."""
        if ckpt["iters_per_epoch"] != iters_per_epoch:
            raise ValueError(f"{self.checkpoint}: {ckpt['iters_per_epoch']} iterations per epoch, now {iters_per_epoch} "
                             "(training set or batch size changed); use another out_dir")

    def save_checkpoint(self, **state: Any) -> None:
        """``checkpoint.pt`` (atomic; main process only): ``state`` (modules/optimisers as state dicts,
        ``step``, ``iters_per_epoch``, ``done`` and the stage's own entries), with the configuration
        fingerprint under ``config`` and the RNG state under ``rng`` (stored right after ``done``)."""
        from ..core.files import save_checkpoint
        from ..core.rng import rng_state

        if not self.main:
            return
        items = list(state.items())
        cut = [k for k, _ in items].index("done") + 1
        save_checkpoint(self.checkpoint, **dict(items[:cut]), config=json.dumps(self.fingerprint), rng=rng_state(),
                        **dict(items[cut:]))

    def mark(self, step: int, total_steps: int) -> None:
        """``done.json`` (last): where this call stops, vouching for the checkpoint and the exports."""
        if self.main:
            write_marker(self.path, self.outputs, stage=self.stage, step=step, total_steps=total_steps,
                         done=step >= total_steps)


__all__ = ["RunLock", "RunLocked", "sweep_temporaries", "write_marker", "read_marker", "clear_marker", "finished",
           "guard", "file_sha256", "LOCK_NAME", "MARKER_NAME", "RunFolder", "resume_ignored", "ALWAYS_IGNORED",
           "NO_WEIGHT_KEYS"]
