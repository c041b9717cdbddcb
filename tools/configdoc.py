"""docs/configuration.md's key tables, generated from apmask_lib/config.py (``python -m tools.docs``).

Every field of ``Config`` and its sections, in source order: the key, its default, what it accepts (its
type, the ``Literal`` choices, the ``CONSTRAINTS`` rule) and its source comment. Comments that point at
README sections are pointed at the docs page that now holds them.
"""
from __future__ import annotations

import ast
import dataclasses
import io
import tokenize
import typing
from pathlib import Path

from apmask_lib import config as C

SOURCE = Path(C.__file__)
SECTIONS = [("", C.Config), ("data", C.DataConfig), ("pretrain", C.PretrainConfig), ("finetune", C.FinetuneConfig),
            ("evaluate", C.EvaluateConfig)]
RULES = {"int>0": "integer > 0", "int>=0": "integer ≥ 0", "num>0": "number > 0", "num>=0": "number ≥ 0",
         "[0,1]": "in [0, 1]", "[0,1)": "in [0, 1)", "(0,1]": "in (0, 1]", "sizes>0": "list of sizes > 0",
         "range(0,1]": "[low, high], 0 < low ≤ high ≤ 1"}
#: README sections the source comments name -> the page that holds that text now
MOVED = {'README "Your own images"': "docs/own-data.md", 'README, "Fine-tuning learning rate"': "docs/method.md",
         'README "Where we differ"': "docs/method.md", 'README "Is pre-training learning?"': "docs/experiments.md",
         'README "Design choices"': "docs/method.md", 'README "Run-to-run spread"': "docs/reproducibility.md",
         "README, \"Fine-tuning learning rate\"": "docs/method.md"}

#: keys whose source line carries no comment
UNCOMMENTED = {
    "seed": "training seed: image order, augmentations, synthetic anomalies, new heads' initialisation",
    "pretrain.global_size": "side of the global crops (px)", "pretrain.local_size": "side of the local crops (px)",
    "pretrain.global_scale": "area range of the global crops (DINO)", "pretrain.local_scale": "area range of the local crops (DINO)",
    "pretrain.hidden_dim": "projection head hidden width", "pretrain.bottleneck_dim": "projection head bottleneck width",
    "pretrain.sinkhorn_eps": "Sinkhorn-Knopp entropy ε (SwAV)", "pretrain.sinkhorn_iters": "Sinkhorn-Knopp iterations",
    "pretrain.warmup_epochs": "linear warm-up from start_lr to lr", "pretrain.weight_decay_end": "weight decay at the end (cosine)",
    "pretrain.clip_grad": "gradient-norm clipping; 0 = off", "pretrain.num_workers": "DataLoader workers (results do not depend on it)",
    "finetune.batch_size": "images per step (half of them made anomalous: anomaly_fraction)",
    "finetune.det_weight": "weight of the image BCE loss", "finetune.seg_weight": "λ_seg, weight of the Dice loss",
    "finetune.start_lr": "warm-up start", "finetune.min_lr": "cosine floor", "finetune.warmup_epochs": "linear warm-up epochs",
    "finetune.weight_decay": "AdamW weight decay", "finetune.clip_grad": "gradient-norm clipping; 0 = off",
    "finetune.num_workers": "DataLoader workers (results do not depend on it)",
    "evaluate.scales": "test scales (px); maps averaged at the original resolution, majority vote per image",
    "evaluate.batch_size": "images per forward pass", "evaluate.pro_fpr_limit": "AU-PRO integrates up to this false-positive rate",
}


def comments() -> dict[tuple[str, str], str]:
    """(class name, field) -> the field's comment: its own line's plus the comment-only lines below it
    that are indented further (continuations); ``# --- heading ---`` lines become ("class", "--- n") entries."""
    src = SOURCE.read_text()
    by_line = {t.start[0]: (t.start[1], t.string.lstrip("# ").rstrip())
               for t in tokenize.generate_tokens(io.StringIO(src).readline) if t.type == tokenize.COMMENT}
    lines = src.splitlines()
    out: dict[tuple[str, str], str] = {}
    for cls in (n for n in ast.parse(src).body if isinstance(n, ast.ClassDef)):
        for node in cls.body:
            if not (isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name)):
                continue
            head = node.lineno - 1
            if head in by_line and lines[head - 1].strip().startswith("# ---"):
                out[(cls.name, "--- " + node.target.id)] = by_line[head][1].strip("- ")
            parts, ln = [], node.end_lineno
            if ln in by_line:
                parts.append(by_line[ln][1])
                while ln + 1 in by_line and not lines[ln].split("#")[0].strip() and by_line[ln + 1][0] > node.col_offset:
                    ln += 1
                    parts.append(by_line[ln][1])
            out[(cls.name, node.target.id)] = " ".join(parts)
    return out


def _type(tp) -> str:
    inner, optional = C._optional(tp)
    if C.choices(inner):
        s = " \\| ".join(f"`{c}`" for c in C.choices(inner))
    elif typing.get_origin(inner) is tuple:
        args = typing.get_args(inner)
        s = f"list of {args[0].__name__}" if args[-1] is Ellipsis else f"[{', '.join(a.__name__ for a in args)}]"
    else:
        s = getattr(inner, "__name__", str(inner))
    return s + (" or null" if optional else "")


def _default(f: dataclasses.Field) -> str:
    v = f.default if f.default is not dataclasses.MISSING else f.default_factory()
    if f.name == "out_dir":
        return "null (`runs/adhoc/<dataset>/<category>/s<seed>`)"
    return "`null`" if v is None else f"`{list(v) if isinstance(v, tuple) else v}`"


def _text(s: str) -> str:
    for old, new in MOVED.items():
        s = s.replace(old, new)
    return s.replace("|", "\\|")


def reference() -> str:
    notes, out = comments(), []
    for section, cls in SECTIONS:
        hints = typing.get_type_hints(cls)
        out += [f"### `{section or 'top level'}`", "", "| key | default | accepts | meaning |", "|---|---|---|---|"]
        for f in dataclasses.fields(cls):
            if dataclasses.is_dataclass(hints[f.name]):
                continue
            key = f"{section}.{f.name}" if section else f.name
            if (cls.__name__, "--- " + f.name) in notes:
                out.append(f"| | | | *{_text(notes[(cls.__name__, '--- ' + f.name)])}* |")
            rule = C.CONSTRAINTS.get(key)
            accepts = RULES[rule] + (" or null" if C._optional(hints[f.name])[1] else "") if rule else _type(hints[f.name])
            meaning = notes.get((cls.__name__, f.name)) or UNCOMMENTED.get(key, "")
            out.append(f"| `{key}` | {_default(f)} | {accepts} | {_text(meaning)} |")
        out.append("")
    return "\n".join(out)
