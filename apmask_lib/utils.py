"""Small shared helpers: devices, seeds, schedules, atomic files, checkpoints, logs."""
from __future__ import annotations

import csv
import json
import math
import os
import random
import tempfile
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping

import numpy as np
import torch


def resolve_device(name: str = "auto") -> torch.device:
    """``auto`` -> cuda if available else cpu. ``cuda`` without a GPU is a clear error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(name)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(f"device={name!r} requested but no CUDA device is visible; use device='cpu' or 'auto'")
    return dev


ACCELERATED_ON_CPU_ENV = "APMASK_ACCELERATED_ON_CPU"


def accelerated(device: torch.device) -> bool:
    """Whether the GPU configuration (bf16 autocast, fused AdamW) is used on ``device``: on CUDA always;
    on the CPU only when the environment variable ``APMASK_ACCELERATED_ON_CPU=1`` is set, a seam that
    lets tests run those branches on a machine without a GPU (tests/test_accelerated_path.py)."""
    return device.type == "cuda" or (device.type == "cpu" and os.environ.get(ACCELERATED_ON_CPU_ENV) == "1")


def autocast_context(device: torch.device):
    """bf16 autocast where :func:`accelerated`, else a null context."""
    import contextlib

    return torch.autocast(device.type, dtype=torch.bfloat16) if accelerated(device) else contextlib.nullcontext()


def synchronize(device: torch.device) -> None:
    """Wait for the device's queued work (CUDA); a no-op on the CPU. For timing."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def rng_state() -> dict[str, Any]:
    """RNG state of python, numpy and torch (CPU + CUDA), storable with weights_only=True."""
    state = {
        "python": json.dumps(random.getstate()),
        "numpy": json.dumps([x.tolist() if isinstance(x, np.ndarray) else x for x in np.random.get_state()]),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.stack(torch.cuda.get_rng_state_all())
    return state


def set_rng_state(state: Mapping[str, Any]) -> None:
    py = json.loads(state["python"])
    random.setstate((py[0], tuple(py[1]), py[2]))
    npst = json.loads(state["numpy"])
    np.random.set_state((npst[0], np.asarray(npst[1], dtype=np.uint32), *npst[2:]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(list(state["cuda"]))


def cosine_scheduler(base: float, final: float, epochs: int, iters_per_epoch: int,
                     warmup_epochs: int = 0, start_warmup: float = 0.0) -> np.ndarray:
    """Per-iteration values: linear warm-up ``start_warmup -> base`` then cosine ``base -> final``
    (as facebookresearch/dino ``utils.cosine_scheduler``). Length ``epochs * iters_per_epoch``."""
    total = epochs * iters_per_epoch
    warm = min(warmup_epochs * iters_per_epoch, total)
    warmup = np.linspace(start_warmup, base, warm) if warm > 0 else np.array([])
    iters = np.arange(total - warm)
    cosine = final + 0.5 * (base - final) * (1 + np.cos(np.pi * iters / max(len(iters), 1)))
    return np.concatenate([warmup, cosine])


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
    _atomic_write(path, lambda f: torch.save(obj, f))


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def write_json(path: str | Path, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True, default=_json_default) + "\n")


def _json_default(o: Any) -> Any:
    if isinstance(o, (np.floating, np.integer)):
        return o.item()
    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


def save_checkpoint(path: str | Path, **objs: Any) -> None:
    """Atomically save named objects: modules/optimisers via ``state_dict()``, the rest as is
    (tensors, numbers, strings, plain dicts/lists). Loadable with ``weights_only=True``."""
    atomic_torch_save(path, {k: (v.state_dict() if hasattr(v, "state_dict") else v) for k, v in objs.items()})


def safe_torch_load(path: str | Path, what: str = "checkpoint", map_location: Any = "cpu") -> Any:
    """``torch.load(path, weights_only=True)``; any failure is a ValueError that names the file and
    says it is not a valid checkpoint. PyTorch's own message is not repeated: it advises re-running
    with ``weights_only=False``, which would execute whatever code a hostile file carries."""
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
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as f:
        f.write(json.dumps(obj, default=_json_default) + "\n")


class NonFiniteLoss(FloatingPointError):
    """Training stopped at a NaN/inf loss; the message is one line (step, loss terms, last checkpoint)."""


def check_finite(value: torch.Tensor | float, what: str, step: int, terms: Mapping[str, float] | None = None,
                 checkpoint: str | Path | None = None) -> None:
    """Stop a run whose loss went NaN/inf with a one-line error naming the step, the loss terms and
    the last good checkpoint (which stays intact)."""
    v = float(value)
    if math.isfinite(v):
        return
    parts = ", ".join(f"{k}={float(x):.6g}" for k, x in (terms or {what.split()[-1]: v}).items())
    where = "no checkpoint was written yet"
    if checkpoint is not None and Path(checkpoint).is_file():
        try:
            step_saved = torch.load(checkpoint, map_location="cpu", weights_only=True, mmap=True).get("step", "?")
        except Exception:  # noqa: BLE001
            step_saved = "?"
        where = f"the last good checkpoint is {checkpoint} (step {step_saved}), untouched"
    raise NonFiniteLoss(f"{what} is {v} at step {step} ({parts}); {where}. Lower the learning rate or check the inputs.")


def param_groups(model: torch.nn.Module) -> list[dict[str, Any]]:
    """AdamW groups [decayed, not decayed]: no weight decay on biases, norms (1-D tensors), the
    position embedding, the [CLS] token and SwAV prototypes (re-normalised every step, so decay
    would only fight the normalisation)."""
    decay, no_decay = [], []
    for name, prm in model.named_parameters():
        if not prm.requires_grad:
            continue
        skip = prm.ndim <= 1 or name.endswith(".bias") or "pos_embed" in name or "cls_token" in name \
            or "prototypes" in name
        (no_decay if skip else decay).append(prm)
    return [{"params": decay}, {"params": no_decay, "weight_decay": 0.0}]


def config_fingerprint(cfg: Any, ignored: Iterable[tuple[str, ...]]) -> dict[str, Any]:
    """The run config as a plain dict without the keys that do not change the weights
    (``ignored``: key paths such as ``("pretrain", "num_workers")``); compared on resume. Keys of
    :data:`apmask_lib.config.FINGERPRINT_OMIT_AT` are left out while they hold their listed value."""
    from .config import FINGERPRINT_OMIT_AT

    def parent(path: tuple[str, ...]) -> dict:
        node = d
        for k in path[:-1]:
            node = node.get(k, {}) if isinstance(node, dict) else {}
        return node if isinstance(node, dict) else {}

    d = json.loads(json.dumps(cfg.to_dict(), default=str))
    for path, value in FINGERPRINT_OMIT_AT.items():
        node = parent(path)
        if node.get(path[-1], object()) == value:
            node.pop(path[-1])
    for path in ignored:
        parent(path).pop(path[-1], None)
    return d


def dict_diff(a: Any, b: Any, prefix: str = "") -> list[str]:
    """Dotted key paths where two nested dicts differ."""
    if isinstance(a, dict) and isinstance(b, dict):
        return [x for k in sorted(set(a) | set(b)) for x in dict_diff(a.get(k), b.get(k), f"{prefix}{k}.")]
    return [] if a == b else [prefix.rstrip(".")]


def truncate_jsonl(path: str | Path, keep_epochs_below: int) -> None:
    """Drop JSON lines of epochs >= ``keep_epochs_below`` (written after the checkpoint we resume)."""
    path = Path(path)
    if not path.exists():
        return
    lines = [ln for ln in path.read_text().splitlines() if ln.strip()]
    kept = [ln for ln in lines if json.loads(ln).get("epoch", 0) < keep_epochs_below]
    atomic_write_text(path, "".join(ln + "\n" for ln in kept))


def load_resume_checkpoint(path: str | Path, fingerprint: Mapping[str, Any]) -> dict[str, Any]:
    """Read a training checkpoint to resume from, refusing one written with a configuration that
    changes the weights (the differing keys are named)."""
    ckpt = load_checkpoint(path)
    diff = dict_diff(json.loads(ckpt["config"]), dict(fingerprint))
    if diff:
        raise ValueError(f"{path} was written with a different configuration ({', '.join(diff)}); "
                         "use another out_dir, or retrain over it with --force (force=True)")
    return ckpt


def cpu_model() -> str:
    """The CPU's model name (for benchmark reports)."""
    import platform

    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"
