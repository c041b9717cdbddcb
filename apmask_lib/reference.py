"""The PAPER's published numbers, for comparison only. Nothing here is computed by this project.

Source: B. Bozorgtabar and D. Mahapatra, "Attention-conditioned augmentations for self-supervised
anomaly detection and localization", AAAI 2023. Values are percentages as printed in the paper.

Only numbers that were verified against a source available to this project are filled in:
Table 1 "bottle" (image AUROC 99.1, pixel AUROC 97.8) is quoted in ../shared/data/README.md.
Every other entry is ``None`` = NOT YET TRANSCRIBED: fill it from the paper's PDF (and cite the
table) before comparing; the tables print "—" for ``None`` and never invent a value.
``missing_reference_values()`` lists what is still to be filled.
"""
from __future__ import annotations

from typing import Optional

PAPER = "Bozorgtabar & Mahapatra, AAAI 2023"

MVTEC_CATEGORIES = ("bottle", "cable", "capsule", "carpet", "grid", "hazelnut", "leather", "metal_nut",
                    "pill", "screw", "tile", "toothbrush", "transistor", "wood", "zipper")

Pair = tuple[Optional[float], Optional[float]]

# Table 1 — MVTec AD, the paper's method: (image AUROC %, pixel AUROC %) per category.
PAPER_TABLE1_MVTEC: dict[str, Pair] = {c: (None, None) for c in MVTEC_CATEGORIES}
PAPER_TABLE1_MVTEC["bottle"] = (99.1, 97.8)  # quoted in ../shared/data/README.md
PAPER_TABLE1_MVTEC_MEAN: Pair = (None, None)  # the paper's mean row over the 15 categories

# Table 2 — NIH ChestX-ray14, models trained on one gender: (pixel AUROC %, standard error %).
PAPER_TABLE2_NIH: dict[str, Pair] = {"male": (None, None), "female": (None, None)}

# Table 3 — ablations on MVTec AD (mean over categories): (image AUROC %, pixel AUROC %).
#   fine-tuning anomaly synthesis (finetune.anomaly)
PAPER_TABLE3_ANOMALY: dict[str, Pair] = {k: (None, None) for k in ("attention", "cutpaste", "scar", "nsa", "fpi")}
#   initialisation of fine-tuning (finetune.init): "pretrain" = APMask pre-training, else a backbone source
PAPER_TABLE3_INIT: dict[str, Pair] = {"pretrain": (None, None), "dino": (None, None)}

# Table 4 — pre-training mask kind x drop ratio (pretrain.mask, pretrain.mask_ratio): (image %, pixel %).
PAPER_TABLE4_MASK: dict[tuple[str, Optional[float]], Pair] = {
    (m, r): (None, None) for m in ("apmask", "random", "block") for r in (0.15, 0.3, 0.5)}
PAPER_TABLE4_MASK[("none", None)] = (None, None)


def missing_reference_values() -> list[str]:
    """Names of the paper's numbers that are still ``None`` (to transcribe from the paper)."""
    out = []
    tables = {"table1": PAPER_TABLE1_MVTEC, "table2": PAPER_TABLE2_NIH, "table3_anomaly": PAPER_TABLE3_ANOMALY,
              "table3_init": PAPER_TABLE3_INIT, "table4": PAPER_TABLE4_MASK}
    for name, table in tables.items():
        for key, pair in table.items():
            for i, v in enumerate(pair):
                if v is None:
                    out.append(f"{name}[{key!r}][{i}]")
    out += [f"table1_mean[{i}]" for i, v in enumerate(PAPER_TABLE1_MVTEC_MEAN) if v is None]
    return out


__all__ = ["PAPER", "MVTEC_CATEGORIES", "PAPER_TABLE1_MVTEC", "PAPER_TABLE1_MVTEC_MEAN", "PAPER_TABLE2_NIH",
           "PAPER_TABLE3_ANOMALY", "PAPER_TABLE3_INIT", "PAPER_TABLE4_MASK", "missing_reference_values"]
