"""Results tables (paper Tables 1-4) from finished runs, our numbers beside the paper's.

Input: every ``RUN/evaluate/metrics.json`` under a runs directory, with the run's metadata read
from its configuration (``RUN/evaluate/config.json``, else ``RUN/finetune/config.json``, else
``RUN/config.json``, else ``RUN/pretrain/config.json``): dataset, category, seed, pretrain.mask,
pretrain.mask_ratio, finetune.anomaly, finetune.init, evaluate.scales.

  Table 1  MVTec AD per category (+ mean): image / pixel AUROC, our AU-PRO; main method only
           (pretrain.mask=apmask, mask_ratio=0.3, finetune.anomaly=attention, finetune.init=pretrain).
  Table 2  NIH ChestX-ray14, category male / female: pixel AUROC ± SE (and our image AUROC).
  Table 3  ablations: fine-tuning anomaly kind; initialisation of fine-tuning (pre-training variant).
  Table 4  pre-training mask kind x drop ratio.

Cells: percentages, one decimal. "mean ± SE" over seeds (SE = std(ddof=1)/sqrt(n)); with one seed
the SE is "—". Over several categories (Tables 1 mean row, 3, 4): the mean of the per-category means,
SE = sqrt(sum SE_c^2) / C when every category has >= 2 seeds, else "—". Δ = ours - paper, shown only
where both exist and cover the same scope (Tables 3/4: only with all 15 MVTec categories, as the paper
averages over them). A missing run or a paper number not transcribed (see :mod:`apmask_lib.report.reference`)
is "—" — never a made-up number. Written as Markdown, CSV and LaTeX.
"""
from __future__ import annotations

import csv
import io
import json
import math
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence

from . import reference as ref
from ..metrics import aggregate_seeds
from ..core.files import atomic_write_text

DASH = "—"
MAIN = {"mask": "apmask", "mask_ratio": 0.3, "anomaly": "attention", "init": "pretrain"}
CONFIG_PLACES = ("evaluate/config.json", "finetune/config.json", "config.json", "pretrain/config.json")


# --------------------------------------------------------------------------------------------
# discovery
# --------------------------------------------------------------------------------------------
@dataclass
class RunRecord:
    """One evaluated run: where it is, what it was (from its config), what it measured."""

    run_dir: Path
    metrics_path: Path
    dataset: str
    category: str
    seed: int
    mask: str = "apmask"
    mask_ratio: float = 0.3
    anomaly: str = "attention"
    init: str = "pretrain"
    scales: tuple[int, ...] = ()
    metrics: dict[str, Any] = field(default_factory=dict)

    def is_variant(self, **kw: Any) -> bool:
        """True when every given field equals the record's (mask_ratio compared to 1e-9)."""
        for k, v in kw.items():
            mine = getattr(self, k)
            if isinstance(v, float) or isinstance(mine, float):
                if v is None or mine is None or abs(float(mine) - float(v)) > 1e-9:
                    return False
            elif mine != v:
                return False
        return True


def read_run(metrics_path: str | Path) -> RunRecord:
    """Record for one ``RUN/evaluate/metrics.json`` (metadata from the run's config.json)."""
    metrics_path = Path(metrics_path)
    run_dir = metrics_path.parent.parent
    try:
        metrics = json.loads(metrics_path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"cannot read {metrics_path}: {e}") from e
    cfg: dict[str, Any] = {}
    for place in CONFIG_PLACES:
        p = run_dir / place
        if p.is_file():
            try:
                cfg = json.loads(p.read_text())
            except json.JSONDecodeError as e:
                raise ValueError(f"cannot parse {p}: {e}") from e
            break
    data, pre, fin, ev = (cfg.get(k, {}) or {} for k in ("data", "pretrain", "finetune", "evaluate"))
    dataset = data.get("dataset", metrics.get("dataset"))
    category = data.get("category", metrics.get("category"))
    if dataset is None or category is None:
        raise ValueError(f"{run_dir}: no config.json with data.dataset/data.category (looked in "
                         f"{', '.join(CONFIG_PLACES)}) and none in {metrics_path}")
    return RunRecord(run_dir=run_dir, metrics_path=metrics_path, dataset=str(dataset), category=str(category),
                     seed=int(cfg.get("seed", metrics.get("seed", 0))), mask=str(pre.get("mask", MAIN["mask"])),
                     mask_ratio=float(pre.get("mask_ratio", MAIN["mask_ratio"])),
                     anomaly=str(fin.get("anomaly", MAIN["anomaly"])), init=str(fin.get("init", MAIN["init"])),
                     scales=tuple(ev.get("scales", metrics.get("scales", ()))), metrics=metrics)


def discover_runs(runs_dir: str | Path) -> list[RunRecord]:
    """All ``**/evaluate/metrics.json`` under ``runs_dir`` (sorted). Unreadable runs are skipped with
    a warning that names them."""
    runs_dir = Path(runs_dir)
    if not runs_dir.is_dir():
        raise FileNotFoundError(f"runs directory not found: {runs_dir}")
    out = []
    for p in sorted(runs_dir.glob("**/evaluate/metrics.json")):
        try:
            out.append(read_run(p))
        except ValueError as e:
            warnings.warn(f"skipping run: {e}", stacklevel=2)
    return out


# --------------------------------------------------------------------------------------------
# aggregation and formatting
# --------------------------------------------------------------------------------------------
@dataclass
class Stat:
    """mean and standard error (None: undefined), number of runs and of categories."""

    mean: Optional[float]
    se: Optional[float]
    n: int
    categories: tuple[str, ...] = ()


def summarise(records: Sequence[RunRecord], key: str) -> Stat:
    """Mean ± SE of ``metrics[key]`` over seeds; over several categories the mean of per-category
    means with SE = sqrt(sum SE_c^2)/C (None unless every category has an SE)."""
    by_cat: dict[str, list[RunRecord]] = {}
    for r in records:
        by_cat.setdefault(r.category, []).append(r)
    per_cat = {}
    for c, rs in sorted(by_cat.items()):
        agg = aggregate_seeds([r.metrics for r in rs]).get(key)
        if agg and agg["n"] > 0:
            per_cat[c] = agg
    if not per_cat:
        return Stat(None, None, 0)
    n = sum(a["n"] for a in per_cat.values())
    cats = tuple(per_cat)
    if len(per_cat) == 1:
        a = next(iter(per_cat.values()))
        return Stat(a["mean"], a["se"], n, cats)
    mean = sum(a["mean"] for a in per_cat.values()) / len(per_cat)
    ses = [a["se"] for a in per_cat.values()]
    se = math.sqrt(sum(s * s for s in ses)) / len(ses) if all(s is not None for s in ses) else None
    return Stat(mean, se, n, cats)


def fmt_pct(v: Optional[float], digits: int = 1) -> str:
    """Fraction -> percent string; None -> "—"."""
    return DASH if v is None or not math.isfinite(v) else f"{100 * v:.{digits}f}"


def fmt_stat(s: Stat, digits: int = 1) -> str:
    """"99.1 ± 0.2" (percent); one seed: "99.1 ± —"; no run: "—"."""
    if s.mean is None or not math.isfinite(s.mean):
        return DASH
    return f"{fmt_pct(s.mean, digits)} ± {fmt_pct(s.se, digits) if s.se is not None else DASH}"


def fmt_paper(v: Optional[float], se: Optional[float] = None) -> str:
    """Paper value (already in percent) -> string; None -> "—"."""
    if v is None:
        return DASH
    return f"{v:.1f}" if se is None else f"{v:.1f} ± {se:.1f}"


def fmt_delta(ours: Stat, paper: Optional[float], comparable: bool = True) -> str:
    """ours - paper in percentage points (signed), "—" where either is missing or not comparable."""
    if not comparable or paper is None or ours.mean is None or not math.isfinite(ours.mean):
        return DASH
    return f"{100 * ours.mean - paper:+.1f}"


@dataclass
class Table:
    name: str
    title: str
    columns: list[str]
    rows: list[list[str]]
    notes: list[str] = field(default_factory=list)


# --------------------------------------------------------------------------------------------
# the four tables
# --------------------------------------------------------------------------------------------
def table1(records: Sequence[RunRecord]) -> Table:
    main = [r for r in records if r.dataset == "mvtec" and r.is_variant(**MAIN)]
    cols = ["Category", "runs", "Image AUROC (ours)", "Image AUROC (paper)", "Δ image",
            "Pixel AUROC (ours)", "Pixel AUROC (paper)", "Δ pixel", "AU-PRO (ours)"]
    rows, have = [], []
    for c in ref.MVTEC_CATEGORIES:
        rs = [r for r in main if r.category == c]
        img, pix, pro = (summarise(rs, k) for k in ("image_auroc", "pixel_auroc", "au_pro"))
        p_img, p_pix = ref.PAPER_TABLE1_MVTEC[c]
        if img.mean is not None or pix.mean is not None:
            have.append(c)
        rows.append([c, str(len(rs)) if rs else DASH, fmt_stat(img), fmt_paper(p_img), fmt_delta(img, p_img),
                     fmt_stat(pix), fmt_paper(p_pix), fmt_delta(pix, p_pix), fmt_stat(pro)])
    rs = [r for r in main if r.category in have]
    img, pix, pro = (summarise(rs, k) for k in ("image_auroc", "pixel_auroc", "au_pro"))
    full = len(have) == len(ref.MVTEC_CATEGORIES)

    def paper_mean(i: int) -> Optional[float]:
        if full:
            return ref.PAPER_TABLE1_MVTEC_MEAN[i]
        vals = [ref.PAPER_TABLE1_MVTEC[c][i] for c in have]
        return sum(vals) / len(vals) if vals and all(v is not None for v in vals) else None

    rows.append([f"mean ({len(have)}/{len(ref.MVTEC_CATEGORIES)} categories)", str(len(rs)) if rs else DASH,
                 fmt_stat(img), fmt_paper(paper_mean(0)), fmt_delta(img, paper_mean(0)),
                 fmt_stat(pix), fmt_paper(paper_mean(1)), fmt_delta(pix, paper_mean(1)), fmt_stat(pro)])
    notes = ["Main method only: " + ", ".join(f"{k}={v}" for k, v in MAIN.items()) + ".",
             "The mean row averages the categories we have; its paper column averages the paper's values "
             "over the same categories (or is the paper's own mean when all 15 are present)."]
    return Table("table1", "Table 1 — MVTec AD (%)", cols, rows, notes + _scale_note(main))


def table1_paper(records: Sequence[RunRecord]) -> Table:
    """Table 1 as the paper prints it: one row per method and metric, the 15 MVTec AD categories in the
    paper's order (textures first) + mean, every competitor's published values, the paper's own rows,
    and this project's main-method runs (mean over seeds) below them."""
    cats = list(ref.PAPER_CATEGORY_ORDER)
    cols = ["Method", "Metric"] + cats + ["mean"]
    label = {"image_auroc": "image AUROC", "pixel_auroc": "pixel AUROC"}
    rows = []
    for m in ref.TABLE1_METHODS:
        name = "APMask (paper)" if m == ref.OURS else f"{m} (paper)"
        for metric in ref.TABLE1_REPORTED[m]:
            rows.append([name, label[metric]] + [fmt_paper(ref.paper_value(1, m, c, metric)) for c in cats + ["mean"]])
    main = [r for r in records if r.dataset == "mvtec" and r.is_variant(**MAIN)]
    for metric in ("image_auroc", "pixel_auroc", "au_pro"):
        stats = [summarise([r for r in main if r.category == c], metric) for c in cats]
        mean = summarise(main, metric) if all(st.mean is not None for st in stats) else Stat(None, None, 0)
        rows.append(["this project", label.get(metric, "AU-PRO")] + [fmt_pct(st.mean) for st in stats + [mean]])
    notes = ["Competitor and APMask rows: the paper's Table 1 as printed (apmask_lib/paper_tables.csv). PaDiM's image "
             "AUROC is given as a mean only; DifferNet and InTra report image, SPADE and RIAD pixel AUROC only. The "
             "printed means of DifferNet (image), SPADE and RIAD (pixel) are their original papers' and differ from "
             "the means of their rows.",
             "'this project': our main-method runs, mean over seeds; the mean column only when all 15 categories ran."]
    return Table("table1_paper", "Table 1 — MVTec AD, all methods (%)", cols, rows, notes)


def table1_other(records: Sequence[RunRecord], dataset: str) -> Table:
    """Table 1-style results for a dataset the paper did not use (e.g. the built-in demo):
    our numbers only, per category and mean; no paper column."""
    main = [r for r in records if r.dataset == dataset and r.is_variant(**MAIN)]
    cols = ["Category", "runs", "Image AUROC", "Pixel AUROC", "AU-PRO", "Image AUROC (max of map)"]
    keys = ("image_auroc", "pixel_auroc", "au_pro", "image_auroc_map_max")
    rows = []
    for c in sorted({r.category for r in main}):
        rs = [r for r in main if r.category == c]
        rows.append([c, str(len(rs))] + [fmt_stat(summarise(rs, k)) for k in keys])
    rows.append([f"mean ({len(rows)} categories)", str(len(main)) if main else DASH]
                + [fmt_stat(summarise(main, k)) for k in keys])
    notes = [f"Dataset '{dataset}' is not in the paper: no reference column.",
             "Main method only: " + ", ".join(f"{k}={v}" for k, v in MAIN.items()) + "."]
    return Table(f"table1_{dataset}", f"Table 1-style — {dataset} (%)", cols, rows, notes + _scale_note(main))


def table2(records: Sequence[RunRecord]) -> Table:
    cols = ["Model trained on", "runs", "Pixel AUROC (ours)", "Pixel AUROC (paper)", "Δ pixel", "Image AUROC (ours)"]
    rows = []
    nih = [r for r in records if r.dataset == "nih" and r.is_variant(**MAIN)]
    for g in ("male", "female"):
        rs = [r for r in nih if r.category == g]
        pix, img = summarise(rs, "pixel_auroc"), summarise(rs, "image_auroc")
        p, p_se = ref.PAPER_TABLE2_NIH[g]
        rows.append([g, str(len(rs)) if rs else DASH, fmt_stat(pix), fmt_paper(p, p_se), fmt_delta(pix, p),
                     fmt_stat(img)])
    for m, per_gender in ref.PAPER_TABLE2_NIH_COMPETITORS.items():
        for g in ("male", "female"):
            rows.append([f"{g}: {m} (paper)", DASH, DASH, fmt_paper(*per_gender[g]), DASH, DASH])
    notes = ["Rows 'gender: method (paper)': the competitors of the paper's Table 2 (pixel AUROC ± SE over five "
             "seeds, as printed).",
             "Pixel metrics use only test images with box ground truth (and all normal images); abnormal "
             "images without a box count for image AUROC only."]
    return Table("table2", "Table 2 — NIH ChestX-ray14 (%)", cols, rows, notes + _scale_note(nih))


def _ablation_rows(records: Sequence[RunRecord], variants: list[tuple[str, dict[str, Any], tuple]],
                   paper: dict, paper_se: Optional[dict] = None) -> list[list[str]]:
    rows = []
    for label, sel, key in variants:
        rs_all = [r for r in records if r.is_variant(**sel)]
        datasets = sorted({r.dataset for r in rs_all}) or [None]
        for ds in datasets:
            rs = [r for r in rs_all if r.dataset == ds]
            img, pix = summarise(rs, "image_auroc"), summarise(rs, "pixel_auroc")
            p_img, p_pix = paper.get(key, (None, None))
            se_img, se_pix = (paper_se or {}).get(key, (None, None))
            comparable = ds == "mvtec" and set(img.categories) >= set(ref.MVTEC_CATEGORIES)
            cats = ", ".join(sorted({r.category for r in rs})) if rs else DASH
            rows.append([label, ds or DASH, cats, str(len(rs)) if rs else DASH,
                         fmt_stat(img), fmt_paper(p_img, se_img), fmt_delta(img, p_img, comparable),
                         fmt_stat(pix), fmt_paper(p_pix, se_pix), fmt_delta(pix, p_pix, comparable)])
    return rows


ABLATION_COLS = ["Variant", "Dataset", "Categories", "runs", "Image AUROC (ours)", "Image AUROC (paper)", "Δ image",
                 "Pixel AUROC (ours)", "Pixel AUROC (paper)", "Δ pixel"]
ABLATION_NOTE = ("The paper's ablation numbers are MVTec AD means over all 15 categories: Δ is shown only when "
                 "our runs cover all 15; otherwise compare with care.")


def table3(records: Sequence[RunRecord]) -> Table:
    base = {k: MAIN[k] for k in ("mask", "mask_ratio")}
    anomalies = list(ref.PAPER_TABLE3_ANOMALY) + sorted({r.anomaly for r in records} - set(ref.PAPER_TABLE3_ANOMALY))
    inits = list(ref.PAPER_TABLE3_INIT) + sorted({r.init for r in records} - set(ref.PAPER_TABLE3_INIT))
    v_anom = [(f"anomaly: {a}", {**base, "init": MAIN["init"], "anomaly": a}, a) for a in anomalies]
    init_label = {"pretrain": "APMask pre-training", "dino": "DINO, no APMask pre-training", "ibot": "iBOT (not implemented)",
                  "msn": "MSN (not implemented)"}
    v_init = [(f"init: {init_label.get(i, i)}",
               {"anomaly": MAIN["anomaly"], "init": i, **(base if i == "pretrain" else {})}, i) for i in inits]
    rows = _ablation_rows(records, v_anom, ref.PAPER_TABLE3_ANOMALY, ref.PAPER_TABLE3_ANOMALY_SE) + \
        _ablation_rows(records, v_init, ref.PAPER_TABLE3_INIT, ref.PAPER_TABLE3_INIT_SE)
    notes = [ABLATION_NOTE, "anomaly: finetune.anomaly with APMask pre-training (r = 0.3); init: finetune.init with "
             "attention-guided anomalies ('pretrain' = this run's APMask backbone, else a backbone source "
             "used directly)."]
    return Table("table3", "Table 3 — ablations: synthetic anomalies and pre-training (%)", ABLATION_COLS, rows, notes)


def table4(records: Sequence[RunRecord]) -> Table:
    fixed = {"anomaly": MAIN["anomaly"], "init": MAIN["init"]}
    keys = list(ref.PAPER_TABLE4_MASK)
    found = sorted({(r.mask, None if r.mask == "none" else r.mask_ratio) for r in records if r.is_variant(**fixed)},
                   key=str)
    keys += [k for k in found if k not in keys]
    variants = []
    for m, ratio in keys:
        sel = {**fixed, "mask": m} if ratio is None else {**fixed, "mask": m, "mask_ratio": ratio}
        variants.append((f"{m}, r = {ratio}" if ratio is not None else f"{m} (no masking)", sel, (m, ratio)))
    rows = _ablation_rows(records, variants, ref.PAPER_TABLE4_MASK)
    return Table("table4", "Table 4 — pre-training mask kind × drop ratio r (%)", ABLATION_COLS, rows,
                 [ABLATION_NOTE, "All with attention-guided anomalies in fine-tuning."])


def runs_table(records: Sequence[RunRecord]) -> Table:
    """Every run found, one row each (for checking what the other tables used)."""
    cols = ["run", "dataset", "category", "seed", "mask", "r", "anomaly", "init", "scales",
            "image AUROC", "pixel AUROC", "AU-PRO"]
    rows = [[str(r.run_dir), r.dataset, r.category, str(r.seed), r.mask, f"{r.mask_ratio:g}", r.anomaly, r.init,
             " ".join(map(str, r.scales)) or DASH] +
            [fmt_pct(_num(r.metrics.get(k)), 2) for k in ("image_auroc", "pixel_auroc", "au_pro")] for r in records]
    return Table("runs", "All evaluated runs (%)", cols, rows)


def _num(v: Any) -> Optional[float]:
    return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else None


def _scale_note(records: Sequence[RunRecord]) -> list[str]:
    scales = sorted({r.scales for r in records if r.scales})
    if len(scales) > 1:
        return ["Runs used different test-time scales: " + "; ".join(" ".join(map(str, s)) for s in scales) + "."]
    return []


# --------------------------------------------------------------------------------------------
# writers
# --------------------------------------------------------------------------------------------
def to_markdown(t: Table) -> str:
    lines = [f"### {t.title}", "", "| " + " | ".join(t.columns) + " |", "|" + "---|" * len(t.columns)]
    lines += ["| " + " | ".join(r) + " |" for r in t.rows]
    lines += [""] + [f"- {n}" for n in t.notes + [f"Paper: {ref.PAPER}. {DASH} = not run / not available."]]
    return "\n".join(lines) + "\n"


def to_csv(t: Table) -> str:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(t.columns)
    w.writerows(t.rows)
    return buf.getvalue()


def _tex(s: str) -> str:
    for a, b in (("\\", r"\textbackslash{}"), ("&", r"\&"), ("%", r"\%"), ("_", r"\_"), ("#", r"\#"),
                 ("±", r"$\pm$"), ("Δ", r"$\Delta$"), ("×", r"$\times$"), (DASH, "--")):
        s = s.replace(a, b)
    return s


def to_latex(t: Table) -> str:
    lines = [r"\begin{table}[t]", r"\centering", r"\small",
             r"\begin{tabular}{l" + "c" * (len(t.columns) - 1) + "}", r"\toprule",
             " & ".join(_tex(c) for c in t.columns) + r" \\", r"\midrule"]
    lines += [" & ".join(_tex(c) for c in r) + r" \\" for r in t.rows]
    lines += [r"\bottomrule", r"\end{tabular}",
              r"\caption{" + _tex(t.title) + ". " + _tex(" ".join(t.notes)) + f" Paper: {_tex(ref.PAPER)}; "
              r"-- = not run / not available.}", rf"\label{{tab:{t.name}}}", r"\end{table}"]
    return "\n".join(lines) + "\n"


def build_tables(records: Sequence[RunRecord]) -> list[Table]:
    others = sorted({r.dataset for r in records} - {"mvtec", "nih"})
    return ([table1(records), table1_paper(records)] + [table1_other(records, d) for d in others]
            + [table2(records), table3(records), table4(records), runs_table(records)])


def write_tables(runs_dir: str | Path, out_dir: str | Path) -> dict[str, dict[str, Path]]:
    """Discover runs under ``runs_dir`` and write ``out_dir/{table1..4,runs}.{md,csv,tex}`` plus
    ``tables.md`` (all Markdown tables). Returns {table name: {format: path}}."""
    records = discover_runs(runs_dir)
    out_dir = Path(out_dir)
    written: dict[str, dict[str, Path]] = {}
    md_all = [f"# Results (runs under `{runs_dir}`: {len(records)} evaluated)", ""]
    missing = ref.missing_reference_values()
    if missing:
        md_all.append(f"_{len(missing)} of the paper's reference numbers are not transcribed yet "
                      "(see apmask_lib/report/reference.py); they show as {DASH}._\n".replace("{DASH}", DASH))
    for t in build_tables(records):
        paths = {"md": out_dir / f"{t.name}.md", "csv": out_dir / f"{t.name}.csv", "tex": out_dir / f"{t.name}.tex"}
        atomic_write_text(paths["md"], to_markdown(t))
        atomic_write_text(paths["csv"], to_csv(t))
        atomic_write_text(paths["tex"], to_latex(t))
        written[t.name] = paths
        md_all.append(to_markdown(t))
    atomic_write_text(out_dir / "tables.md", "\n".join(md_all))
    return written


__all__ = ["RunRecord", "read_run", "discover_runs", "Stat", "summarise", "fmt_pct", "fmt_stat", "fmt_paper",
           "fmt_delta", "Table", "table1", "table1_paper", "table1_other", "table2", "table3", "table4", "runs_table", "to_markdown", "to_csv",
           "to_latex", "build_tables", "write_tables", "MAIN", "DASH"]
