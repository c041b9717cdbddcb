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
"""
from __future__ import annotations

import hashlib
import logging
import os
import socket
from pathlib import Path
from typing import Any, Iterable, Optional

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
    from .files import write_json

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


__all__ = ["RunLock", "RunLocked", "sweep_temporaries", "write_marker", "read_marker", "clear_marker", "finished",
           "guard", "file_sha256", "LOCK_NAME", "MARKER_NAME"]
