"""The generated blocks of README.md and docs/: tables made from the committed results/ files.

A page holds a block as ``<!-- generated: python -m tools.docs NAME -->`` ... ``<!-- end generated -->``;
``BLOCKS[NAME]()`` returns its text. ``python -m tools.docs`` rewrites every block in place,
``python -m tools.docs --check`` lists the stale ones and exits 1 (tests/test_docs_numbers.py does the same),
so a quoted table cannot drift from the file it comes from. Pure: reads files, imports no torch.
"""
from __future__ import annotations

import csv
import json
import re
import statistics
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PAGES = ("README.md", "docs")
METRICS = ("image_auroc", "pixel_auroc", "au_pro")
DEMO = ("brick", "grass", "gravel")
BLOCK = re.compile(r"(<!-- generated: python -m tools\.docs ([\w-]+) -->\n)(.*?)(<!-- end generated -->)", re.S)


def _json(name: str):
    return json.loads((ROOT / "results" / name).read_text())


def _cell(m: dict | None, scale: float = 1.0, digits: int = 2) -> str:
    if not m:
        return "—"
    return " / ".join("—" if m.get(k) is None else f"{scale * m[k]:.{digits}f}" for k in METRICS)


def _peer(dataset: str, peer: str) -> dict | None:
    """A peer's row on the whole training set (rows with a training-image cap are left out)."""
    rows = [r for r in _json("peers.json")["rows"] if r["dataset"] == dataset and r["peer"] == peer
            and not r.get("max_train")]
    return rows[-1] if rows else None


def _paper(category: str) -> dict:
    lines = (ROOT / "apmask_lib" / "report" / "paper_tables.csv").read_text().splitlines()
    rows = csv.DictReader(line for line in lines if not line.startswith("#"))
    vals = {r["metric"]: float(r["value"]) for r in rows
            if r["table"] == "1" and r["method"] == "Ours" and r["dataset"] == "mvtec" and r["category"] == category}
    return {"image_auroc": vals.get("image_auroc"), "pixel_auroc": vals.get("pixel_auroc"), "au_pro": None}


def _spread(variant: str, at: int, dataset: str = "bottle") -> dict:
    """Mean and SD (ddof 1) over seeds of one seed_spread setting at one epoch, on the CPU that measured the
    ``paper`` variant (seeds from two CPUs are two settings: ``benchmarks.seed_spread.cpu_of``)."""
    from benchmarks.seed_spread import cpu_of

    all_rows = _json("seed_spread.json")["rows"]
    cpu = next(cpu_of(r) for r in all_rows if r["variant"] == "paper" and r["dataset"] == dataset)
    rows = [r for r in all_rows if (r["dataset"], r["variant"], r.get("tag", ""), r["at"], cpu_of(r))
            == (dataset, variant, "", at, cpu)]
    return {k: (statistics.mean(r[k] for r in rows), statistics.stdev(r[k] for r in rows)) for k in METRICS} | {
        "n": len(rows), "epochs": rows[0]["epochs"], "n_train": rows[0]["n_train"]}


def _ms(s: dict) -> str:
    return " / ".join(f"{s[k][0]:.1f} ± {s[k][1]:.1f}" for k in METRICS)


def _knn_default() -> dict:
    """results/knn_bank.json's rows (per data set) of the bank settings that are today's defaults; an error
    when no measured variant matches them (re-run benchmarks/knn_bank.py with the new default)."""
    from apmask_lib.config import Config
    from benchmarks.knn_bank import VARIANTS

    ev = Config().evaluate
    want = {"coreset": ev.knn_coreset, "coreset_method": "greedy", "max_patches": ev.knn_bank_max,
            "dtype": ev.knn_bank_dtype}
    names = [n for n, v in VARIANTS.items() if {"coreset_method": "greedy", **v} == want]
    if not names:
        raise LookupError(f"no variant of benchmarks/knn_bank.py measures today's kNN bank defaults {want}")
    return {r["dataset"]: r["variants"][names[0]] for r in _json("knn_bank.json")["rows"]}


def results_table() -> str:
    """README: bottle and the demo textures — the paper method, the kNN extension, the peers, the paper."""
    knn = _knn_default()
    abl = next(r for r in _json("ablations.json")["rows"]["apmask"] if r["seed"] == 0)
    s20 = _spread("paper", 20)
    demo = {c: _json(f"metrics/{c}_s0.json") for c in DEMO}
    head = ("| method (image AUROC / pixel AUROC / AU-PRO, %) | MVTec AD bottle | demo brick | demo grass | demo gravel"
            " | from |\n|---|---|---|---|---|---|")
    rows = [
        ("APMask, the paper method: demo schedule (5 + 15 epochs, 112 px, 1 seed)", "—",
         *(_cell(demo[c], 100, 1) for c in DEMO), "[results/metrics/](results/metrics/)"),
        ("APMask, shortened CPU schedule (1 + 2 epochs, 224 px, seed 0)", _cell(abl["metrics"], 100, 1), "—", "—", "—",
         "[results/ablations.md](results/ablations.md)"),
        (f"detector fine-tuned from the backbone, {s20['epochs']} epochs on {s20['n_train']} images "
         f"(mean ± SD, {s20['n']} seeds)", _ms(s20), "—", "—", "—", "[results/seed_spread.md](results/seed_spread.md)"),
        ("kNN extension (training-free; block 7, 224 + 448 px, default bank)", _cell(knn["bottle"]),
         *(_cell(knn[c]) for c in DEMO), "[results/knn_bank.md](results/knn_bank.md)"),
        ("peer: AnomalyDINO (anomalib, same backbone, block 7, 252 px)", _cell(_peer("mvtec/bottle", "anomalydino7")),
         *(_cell(_peer(f"demo/{c}", "anomalydino7")) for c in DEMO), "[results/peers.md](results/peers.md)"),
        ("peer: PatchCore (anomalib, EfficientNet-Lite0, coreset 0.1)", _cell(_peer("mvtec/bottle", "patchcore")),
         *(_cell(_peer(f"demo/{c}", "patchcore")) for c in DEMO), "[results/peers.md](results/peers.md)"),
        ("the paper, Table 1 (300 + 100 epochs, DINO ViT-S/16, GPU)", _cell(_paper("bottle"), 1, 1), "—", "—", "—",
         "[paper_tables.csv](apmask_lib/report/paper_tables.csv)"),
    ]
    return head + "\n" + "\n".join("| " + " | ".join(r) + " |" for r in rows) + "\n"


def spread_table() -> str:
    """Run-to-run spread of fine-tuning on bottle: the paper's single learning rate vs the backbone at 0.1x."""
    ats = sorted({r["at"] for r in _json("seed_spread.json")["rows"] if r["variant"] == "paper"})
    lines = ["| epoch of the schedule | `paper`: one learning rate | `bb0.1`: backbone at 0.1× the heads' rate |",
             "|---|---|---|"]
    for at in ats:
        p, b = _spread("paper", at), _spread("bb0.1", at)
        lines.append(f"| {at} of {p['epochs']} | {_ms(p)} | {_ms(b)} |")
    return "\n".join(lines) + "\n"


def peers_table() -> str:
    """docs/knn.md: the kNN extension's default beside the peers on every data set, the same training images."""
    q = _json("knn_quality.json")
    names = {"mvtec:bottle": "MVTec AD bottle (first 50 training images)", "demo:brick": "demo brick",
             "demo:grass": "demo grass", "demo:gravel": "demo gravel", "nih:all": "NIH ChestX-ray14 subset"}
    peers = _json("peers.json")["rows"]

    def peer(ds: str, name: str) -> dict | None:
        cap = 50 if ds == "mvtec:bottle" else None
        rows = [r for r in peers if r["dataset"] == ds.replace(":", "/") and r["peer"] == name and r.get("max_train") == cap]
        return rows[-1] if rows else None

    lines = ["| data set | kNN extension (full fp32 bank) | AnomalyDINO (252 px) | PatchCore |", "|---|---|---|---|"]
    for ds, label in names.items():
        lines.append(f"| {label} | {_cell(q['variants']['default'][ds])} | {_cell(peer(ds, 'anomalydino7'))} | "
                     f"{_cell(peer(ds, 'patchcore'))} |")
    return "\n".join(lines) + "\n"


def config_reference() -> str:
    from tools.configdoc import reference

    return reference()


BLOCKS = {"results-table": results_table, "spread-table": spread_table, "peers-table": peers_table,
          "config": config_reference}


def pages(root: Path = ROOT) -> list[Path]:
    return [root / "README.md", *sorted((root / "docs").glob("*.md"))]


def render(text: str) -> str:
    """``text`` with every generated block replaced by what its function returns now."""
    return BLOCK.sub(lambda m: m.group(1) + BLOCKS[m.group(2)]() + m.group(4), text)


def stale(root: Path = ROOT) -> list[str]:
    return [str(p.relative_to(root)) for p in pages(root) if render(p.read_text()) != p.read_text()]


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if "--check" in argv:
        bad = stale()
        print("stale generated blocks: " + ", ".join(bad) if bad else "every generated block is current")
        return 1 if bad else 0
    for p in pages():
        new = render(p.read_text())
        if new != p.read_text():
            p.write_text(new)
            print(f"rewrote {p.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
