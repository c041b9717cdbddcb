"""The PAPER's published numbers, for comparison only. Nothing here is computed by this project.

Source: B. Bozorgtabar and D. Mahapatra, "Attention-conditioned augmentations for self-supervised
anomaly detection and localization", AAAI 2023 — every number of its Tables 1-4 (the method's and
the competitors'), in percent as printed. They live in the package file ``paper_tables.csv``
(columns ``table, section, method, dataset, category, metric, value, se``), a copy of the hand
transcription ``../shared/paper/tables.csv`` (tests/test_tables.py checks the copy against it when
``../shared`` is present). Caveats (also in the CSV's header): the paper's text came from a PDF
through OCR; NSA's transistor pixel AUROC reads "8.0" there and is 88.0 (its row mean requires it);
the printed means of DifferNet (image), SPADE (pixel) and RIAD (pixel) are their original papers'
and differ from the means of their rows — kept as printed; PaDiM's image row gives the mean only.

What the tables mean:

* Table 1 — MVTec AD, image / pixel AUROC per category and mean, for CutPaste (3-way), NSA,
  DRAEM, PaDiM, DifferNet, InTra, SPADE, RIAD and the paper's method ("Ours" in the CSV).
* Table 2 — NIH ChestX-ray14 pixel AUROC ± SE (five seeds), model trained on male / female
  images, for CutPaste, PaDiM, FPI, PII and the paper's method.
* Table 3 — MVTec AD means ± SE: pre-training (DINO = fine-tuned from DINO without APMask
  pre-training; iBOT; MSN) and fine-tuning anomalies (CutPaste, NSA, FPI, the paper's attention-guided).
* Table 4 — MVTec AD means: masking strategy (none / random / APMask at r = 0.3) and APMask ratio r.

The constants below (``PAPER_TABLE*``) are views of the CSV keyed the way :mod:`apmask_lib.report.tables`
looks up our runs' settings; ``paper_value`` / ``paper_rows`` read any entry.
"""
from __future__ import annotations

import csv
from dataclasses import dataclass
from functools import lru_cache
from importlib import resources
from typing import Optional

from ..data.mvtec import CATEGORIES as MVTEC_CATEGORIES, TEXTURES

PAPER = "Bozorgtabar & Mahapatra, AAAI 2023"
OURS = "Ours"  # the paper's own method in paper_tables.csv
CSV_NAME = "paper_tables.csv"

# the paper's Table 1 column order: textures first, then objects, each alphabetical
PAPER_CATEGORY_ORDER = TEXTURES + tuple(c for c in MVTEC_CATEGORIES if c not in TEXTURES)
TABLE1_METHODS = ("CutPaste (3-way)", "NSA", "DRAEM", "PaDiM", "DifferNet", "InTra", "SPADE", "RIAD", OURS)
# what the paper's Table 1 reports per method: "all" = 15 categories + mean, "mean" = the mean only, absent = not given
_BOTH = {"image_auroc": "all", "pixel_auroc": "all"}
TABLE1_REPORTED: dict[str, dict[str, str]] = {
    "CutPaste (3-way)": _BOTH, "NSA": _BOTH, "DRAEM": _BOTH, OURS: _BOTH,
    "PaDiM": {"image_auroc": "mean", "pixel_auroc": "all"},
    "DifferNet": {"image_auroc": "all"}, "InTra": {"image_auroc": "all"},
    "SPADE": {"pixel_auroc": "all"}, "RIAD": {"pixel_auroc": "all"}}

Pair = tuple[Optional[float], Optional[float]]


@dataclass(frozen=True)
class PaperValue:
    """One number of the paper: ``value`` (and ``se``, its ± standard error, where printed), in %."""

    table: int
    section: str
    method: str
    dataset: str
    category: str
    metric: str
    value: float
    se: Optional[float] = None


@lru_cache(maxsize=1)
def paper_rows() -> tuple[PaperValue, ...]:
    """Every number of the paper's Tables 1-4, from the package file ``paper_tables.csv``."""
    text = resources.files(__package__).joinpath(CSV_NAME).read_text(encoding="utf-8")
    lines = [ln for ln in text.splitlines() if ln.strip() and not ln.startswith("#")]
    out = []
    for r in csv.DictReader(lines):
        out.append(PaperValue(int(r["table"]), r["section"], r["method"], r["dataset"], r["category"], r["metric"],
                              float(r["value"]), float(r["se"]) if r["se"] else None))
    return tuple(out)


def paper_entry(table: int, method: str, category: str, metric: str, section: Optional[str] = None,
                dataset: Optional[str] = None) -> Optional[PaperValue]:
    """The paper's entry, or None where the paper gives none (e.g. PaDiM's per-category image AUROC)."""
    for r in paper_rows():
        if (r.table == table and r.method == method and r.category == category and r.metric == metric
                and (section is None or r.section == section) and (dataset is None or r.dataset == dataset)):
            return r
    return None


def paper_value(table: int, method: str, category: str, metric: str, section: Optional[str] = None) -> Optional[float]:
    """The paper's value in % (None where it gives none)."""
    e = paper_entry(table, method, category, metric, section)
    return None if e is None else e.value


def _pair(table: int, method: str, category: str, section: Optional[str] = None) -> Pair:
    return (paper_value(table, method, category, "image_auroc", section),
            paper_value(table, method, category, "pixel_auroc", section))


def _se_pair(table: int, method: str, category: str, section: Optional[str] = None) -> Pair:
    es = [paper_entry(table, method, category, m, section) for m in ("image_auroc", "pixel_auroc")]
    return tuple(None if e is None else e.se for e in es)  # type: ignore[return-value]


# Table 1 — MVTec AD, the paper's method: (image AUROC %, pixel AUROC %) per category, and its mean row.
PAPER_TABLE1_MVTEC: dict[str, Pair] = {c: _pair(1, OURS, c) for c in MVTEC_CATEGORIES}
PAPER_TABLE1_MVTEC_MEAN: Pair = _pair(1, OURS, "mean")

# Table 2 — NIH ChestX-ray14, model trained on one gender: (pixel AUROC %, standard error %), the paper's
# method; the competitors in PAPER_TABLE2_NIH_COMPETITORS[method][gender].
PAPER_TABLE2_NIH: dict[str, Pair] = {
    g: (paper_value(2, OURS, g, "pixel_auroc"), paper_entry(2, OURS, g, "pixel_auroc").se) for g in ("male", "female")}
PAPER_TABLE2_NIH_COMPETITORS: dict[str, dict[str, Pair]] = {
    m: {g: (paper_value(2, m, g, "pixel_auroc"), paper_entry(2, m, g, "pixel_auroc").se) for g in ("male", "female")}
    for m in ("CutPaste", "PaDiM", "FPI", "PII")}

# Table 3 — ablations, MVTec AD means: (image AUROC %, pixel AUROC %) and their SEs.
#   fine-tuning anomaly synthesis, keyed by finetune.anomaly (the paper reports no CutPaste-Scar row)
_T3_ANOMALY = {"attention": OURS, "cutpaste": "CutPaste", "nsa": "NSA", "fpi": "FPI"}
PAPER_TABLE3_ANOMALY: dict[str, Pair] = {k: _pair(3, m, "mean", "fine-tuning") for k, m in _T3_ANOMALY.items()}
PAPER_TABLE3_ANOMALY_SE: dict[str, Pair] = {k: _se_pair(3, m, "mean", "fine-tuning") for k, m in _T3_ANOMALY.items()}
#   pre-training, keyed by finetune.init: "pretrain" = APMask pre-training (the paper's full method, its
#   fine-tuning "Ours" row), "dino" = fine-tuned from DINO without APMask; iBOT and MSN are pre-trainings
#   this project does not implement (paper rows only)
_T3_INIT = {"pretrain": ("fine-tuning", OURS), "dino": ("pre-training", "DINO"), "ibot": ("pre-training", "iBOT"),
            "msn": ("pre-training", "MSN")}
PAPER_TABLE3_INIT: dict[str, Pair] = {k: _pair(3, m, "mean", s) for k, (s, m) in _T3_INIT.items()}
PAPER_TABLE3_INIT_SE: dict[str, Pair] = {k: _se_pair(3, m, "mean", s) for k, (s, m) in _T3_INIT.items()}

# Table 4 — pre-training masking, MVTec AD means, keyed by (pretrain.mask, pretrain.mask_ratio): (image %, pixel %).
# Top: strategies at r = 0.3; bottom: APMask ratios. (APMask r = 0.3 appears in both halves with equal values.)
PAPER_TABLE4_MASK: dict[tuple[str, Optional[float]], Pair] = {
    ("none", None): _pair(4, "No Masking", "mean", "masking strategy"),
    ("random", 0.3): _pair(4, "Random Masking", "mean", "masking strategy"),
    ("apmask", 0.3): _pair(4, "APMask", "mean", "masking strategy"),
    ("apmask", 0.15): _pair(4, "r=0.15", "mean", "masking ratio"),
    ("apmask", 0.5): _pair(4, "r=0.5", "mean", "masking ratio"),
}
if PAPER_TABLE4_MASK[("apmask", 0.3)] != _pair(4, "r=0.3", "mean", "masking ratio"):  # pragma: no cover
    raise ValueError(f"{CSV_NAME}: Table 4's APMask row and its r=0.3 row differ")


def missing_reference_values() -> list[str]:
    """Entries of the ``PAPER_TABLE*`` views that have no paper number (empty when the package CSV is
    complete: each is looked up there; a renamed method or a dropped line shows up here)."""
    out = []
    tables = {"table1": PAPER_TABLE1_MVTEC, "table2": PAPER_TABLE2_NIH, "table3_anomaly": PAPER_TABLE3_ANOMALY,
              "table3_init": PAPER_TABLE3_INIT, "table4": PAPER_TABLE4_MASK,
              **{f"table2_{m}": v for m, v in PAPER_TABLE2_NIH_COMPETITORS.items()}}
    for name, table in tables.items():
        for key, pair in table.items():
            for i, v in enumerate(pair):
                if v is None:
                    out.append(f"{name}[{key!r}][{i}]")
    out += [f"table1_mean[{i}]" for i, v in enumerate(PAPER_TABLE1_MVTEC_MEAN) if v is None]
    for m in TABLE1_METHODS:  # every Table 1 row the paper prints (TABLE1_REPORTED)
        for metric, scope in TABLE1_REPORTED[m].items():
            cats = ("mean",) if scope == "mean" else MVTEC_CATEGORIES + ("mean",)
            out += [f"table1[{m!r}][{c!r}][{metric}]" for c in cats if paper_value(1, m, c, metric) is None]
    for key, pair in {**PAPER_TABLE3_ANOMALY_SE, **PAPER_TABLE3_INIT_SE}.items():
        out += [f"table3_se[{key!r}][{i}]" for i, v in enumerate(pair) if v is None]
    return out


__all__ = ["PAPER", "OURS", "MVTEC_CATEGORIES", "PAPER_CATEGORY_ORDER", "TABLE1_METHODS", "TABLE1_REPORTED",
           "PaperValue", "paper_rows",
           "paper_entry", "paper_value", "PAPER_TABLE1_MVTEC", "PAPER_TABLE1_MVTEC_MEAN", "PAPER_TABLE2_NIH",
           "PAPER_TABLE2_NIH_COMPETITORS", "PAPER_TABLE3_ANOMALY", "PAPER_TABLE3_ANOMALY_SE", "PAPER_TABLE3_INIT",
           "PAPER_TABLE3_INIT_SE", "PAPER_TABLE4_MASK", "missing_reference_values"]
