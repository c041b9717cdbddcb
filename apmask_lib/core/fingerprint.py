"""The configuration fingerprint of a training run: the config without the keys that do not change
the weights, stored in each checkpoint and compared when a run resumes (a differing key is named)."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Iterable, Mapping

from ..config import FINGERPRINT_OMIT_AT
from .files import load_checkpoint


def config_fingerprint(cfg: Any, ignored: Iterable[tuple[str, ...]]) -> dict[str, Any]:
    """The run config as a plain dict without the keys that do not change the weights
    (``ignored``: key paths such as ``("pretrain", "num_workers")``); compared on resume. Keys of
    :data:`apmask_lib.config.FINGERPRINT_OMIT_AT` are left out while they hold their listed value."""

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


def load_resume_checkpoint(path: str | Path, fingerprint: Mapping[str, Any]) -> dict[str, Any]:
    """Read a training checkpoint to resume from, refusing one written with a configuration that
    changes the weights (the differing keys are named)."""
    ckpt = load_checkpoint(path)
    diff = dict_diff(json.loads(ckpt["config"]), dict(fingerprint))
    if diff:
        raise ValueError(f"{path} was written with a different configuration ({', '.join(diff)}); "
                         "use another out_dir, or retrain over it with --force (force=True)")
    return ckpt


__all__ = ["config_fingerprint", "dict_diff", "load_resume_checkpoint"]
