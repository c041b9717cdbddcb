"""Writing and reading files safely: atomic writes (bytes, text, JSON, torch archives), checkpoints
read with ``weights_only=True`` only, append-only training logs (CSV, JSON lines) that can be cut
back to the checkpoint a run resumes from, and the cache folder.

torch is imported by the two functions that need it only, so that the data layer and the table
writers (which use the atomic writes) start without it."""
from __future__ import annotations

import csv
import json
import os
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterable, Mapping

import numpy as np

if TYPE_CHECKING:
    import torch


def cache_dir() -> Path:
    """``$APMASK_CACHE`` or ``~/.cache/apmask``: converted backbones, data verification records."""
    return Path(os.environ.get("APMASK_CACHE", Path.home() / ".cache" / "apmask"))


# ---- atomic writes -----------------------------------------------------------------------------
def _umask() -> int:
    """The process umask, read without changing it where Linux shows it (/proc/self/status)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)  # elsewhere: set and restore at once
    os.umask(mask)
    return mask


def _temp_beside(path: Path) -> tuple[int, str]:
    """A temporary file next to ``path`` (same file system, so ``os.replace`` is atomic) with the
    mode a plain ``open`` would give (0666 minus the umask; ``mkstemp`` alone makes it 0600)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.fchmod(fd, 0o666 & ~_umask())
    return fd, tmp


def _atomic_write(path: str | Path, write: Callable[[Any], None]) -> None:
    """Call ``write(f)`` on a temporary file beside ``path``, fsync it, then rename it over ``path``:
    readers see the old file or the new one, never a part. Mode as a plain ``open`` (umask respected)."""
    path = Path(path)
    fd, tmp = _temp_beside(path)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically (:func:`_atomic_write`)."""
    _atomic_write(path, lambda f: f.write(data))


def atomic_torch_save(path: str | Path, obj: Any) -> None:
    """``torch.save(obj, path)`` atomically (:func:`_atomic_write`). Through the file object:
    ``torch.save(obj, <path>)`` names the archive's records after the (random) temporary file, so
    equal checkpoints would differ in bytes (and in dvc.lock)."""
    import torch

    _atomic_write(path, lambda f: torch.save(obj, f))


def atomic_write_text(path: str | Path, text: str) -> None:
    """Write UTF-8 ``text`` to ``path`` atomically."""
    atomic_write_bytes(path, text.encode("utf-8"))


def write_json(path: str | Path, obj: Any) -> None:
    """Indented, key-sorted JSON (numpy numbers/arrays and paths converted), written atomically."""
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True, default=_json_default) + "\n")


def _json_default(o: Any) -> Any:
    if isinstance(o, (np.floating, np.integer)):
        return o.item()
    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


# ---- checkpoints -------------------------------------------------------------------------------
def save_checkpoint(path: str | Path, **objs: Any) -> None:
    """Atomically save named objects: modules/optimisers via ``state_dict()``, the rest as is
    (tensors, numbers, strings, plain dicts/lists). Loadable with ``weights_only=True``."""
    atomic_torch_save(path, {k: (v.state_dict() if hasattr(v, "state_dict") else v) for k, v in objs.items()})


def safe_torch_load(path: str | Path, what: str = "checkpoint", map_location: Any = "cpu") -> Any:
    """``torch.load(path, weights_only=True)``; any failure is a ValueError that names the file and
    says it is not a valid checkpoint. PyTorch's own message is not repeated: it advises re-running
    with ``weights_only=False``, which would execute whatever code a hostile file carries."""
    import torch

    path = Path(path)
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # noqa: BLE001
        text = str(e)
        reason = type(e).__name__ if ("weights_only" in text or "Weights only" in text) else \
            f"{type(e).__name__}: {text.splitlines()[0] if text else ''}"
        raise ValueError(f"{path} is not a valid {what} ({reason}): it is corrupt, truncated, not a torch file, or "
                         "holds objects other than tensors and plain data, which apmask never unpickles") from None


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Read a checkpoint safely (``weights_only=True``); names the file on failure."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    return safe_torch_load(path, "checkpoint", map_location)


def restore(ckpt: Mapping[str, Any], **objs: Any) -> None:
    """Load ``state_dict``s of the named objects from a checkpoint dict (strict)."""
    for name, obj in objs.items():
        if name not in ckpt:
            raise KeyError(f"checkpoint has no {name!r} (has {sorted(ckpt)})")
        obj.load_state_dict(ckpt[name])


# ---- training logs -----------------------------------------------------------------------------
class CSVLog:
    """Append rows to a CSV file (header on first write). Resume-safe: on resume call
    ``truncate_after(step)`` to drop rows written after the last checkpoint."""

    def __init__(self, path: str | Path, columns: Iterable[str]):
        self.path = Path(path)
        self.columns = list(columns)
        self.path.parent.mkdir(parents=True, exist_ok=True)

    def write(self, row: Mapping[str, Any]) -> None:
        new = not self.path.exists()
        with self.path.open("a", newline="") as f:
            w = csv.DictWriter(f, fieldnames=self.columns, extrasaction="ignore")
            if new:
                w.writeheader()
            w.writerow({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in row.items()})

    def truncate_after(self, step: int, key: str = "step") -> None:
        if not self.path.exists():
            return
        with self.path.open(newline="") as f:
            rows = [r for r in csv.DictReader(f) if int(r[key]) < step]
        text = ",".join(self.columns) + "\n" + "".join(",".join(r.get(c, "") for c in self.columns) + "\n" for r in rows)
        atomic_write_text(self.path, text)


def append_jsonl(path: str | Path, obj: Mapping[str, Any]) -> None:
    """Append one JSON line (numpy values converted) to ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as f:
        f.write(json.dumps(obj, default=_json_default) + "\n")


def truncate_jsonl(path: str | Path, keep_epochs_below: int) -> None:
    """Drop JSON lines of epochs >= ``keep_epochs_below`` (written after the checkpoint we resume)."""
    path = Path(path)
    if not path.exists():
        return
    lines = [ln for ln in path.read_text().splitlines() if ln.strip()]
    kept = [ln for ln in lines if json.loads(ln).get("epoch", 0) < keep_epochs_below]
    atomic_write_text(path, "".join(ln + "\n" for ln in kept))


__all__ = ["cache_dir", "atomic_write_bytes", "atomic_torch_save", "atomic_write_text", "write_json",
           "save_checkpoint", "safe_torch_load", "load_checkpoint", "restore", "CSVLog", "append_jsonl",
           "truncate_jsonl"]
