"""Tables 1-4 from a runs tree: our numbers beside the paper's, "—" for anything missing."""
from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import pytest

from apmask_lib.report import reference as ref
from apmask_lib.config import Config, replace
from apmask_lib.report.tables import DASH, discover_runs, fmt_stat, Stat, summarise, write_tables


def make_run(root: Path, name: str, metrics: dict, with_config: bool = True, **sections) -> Path:
    run = root / name
    (run / "evaluate").mkdir(parents=True)
    (run / "evaluate" / "metrics.json").write_text(json.dumps(metrics))
    if with_config:
        cfg = replace(Config(), **sections)
        (run / "evaluate" / "config.json").write_text(json.dumps(cfg.to_dict()))
    return run


@pytest.fixture()
def runs(tmp_path) -> Path:
    root = tmp_path / "runs"
    mv = {"dataset": "mvtec", "category": "bottle"}
    make_run(root, "bottle/seed0", {"image_auroc": 0.98, "pixel_auroc": 0.96, "au_pro": 0.9}, seed=0, data=mv)
    make_run(root, "bottle/seed1", {"image_auroc": 0.99, "pixel_auroc": 0.97, "au_pro": None}, seed=1, data=mv)
    make_run(root, "bottle_cutpaste/seed0", {"image_auroc": 0.90, "pixel_auroc": 0.80}, data=mv,
             finetune={"anomaly": "cutpaste"})
    make_run(root, "bottle_random05/seed0", {"image_auroc": 0.95, "pixel_auroc": 0.93}, data=mv,
             pretrain={"mask": "random", "mask_ratio": 0.5})
    make_run(root, "nih_male/seed0", {"image_auroc": 0.7, "pixel_auroc": 0.8}, data={"dataset": "nih", "category": "male"})
    # no config.json: metadata from metrics.json (run_evaluate writes dataset/category/seed there)
    make_run(root, "cable/seed3", {"image_auroc": 0.9, "pixel_auroc": 0.91, "dataset": "mvtec", "category": "cable",
                                   "seed": 3}, with_config=False)
    broken = root / "broken" / "evaluate"
    broken.mkdir(parents=True)
    (broken / "metrics.json").write_text("{not json")
    return root


def read_csv(path: Path) -> dict[str, list[str]]:
    with path.open() as f:
        rows = list(csv.reader(f))
    return {r[0]: r for r in rows[1:]}


def test_discovery(runs):
    with pytest.warns(UserWarning, match="broken"):
        recs = discover_runs(runs)
    assert len(recs) == 6
    cable = [r for r in recs if r.category == "cable"][0]
    assert cable.seed == 3 and cable.mask == "apmask" and cable.anomaly == "attention"
    rnd = [r for r in recs if r.mask == "random"][0]
    assert rnd.mask_ratio == 0.5 and rnd.scales == (224, 320, 384, 416, 448, 512)
    with pytest.raises(FileNotFoundError, match="runs directory"):
        discover_runs(runs / "nope")


def test_tables_ours_beside_paper_and_dashes(runs, tmp_path):
    out = tmp_path / "tables"
    with pytest.warns(UserWarning):
        written = write_tables(runs, out)
    assert set(written) == {"table1", "table1_paper", "table2", "table3", "table4", "runs"}
    for paths in written.values():
        for p in paths.values():
            assert p.is_file() and p.stat().st_size > 0
    t1 = read_csv(written["table1"]["csv"])
    bottle = t1["bottle"]
    se = 100 * 0.005  # std(ddof=1) of (98, 99)% / sqrt(2)
    assert bottle[1] == "2"
    assert bottle[2] == f"98.5 ± {se:.1f}" and bottle[3] == "99.1" and bottle[4] == "-0.6"
    assert bottle[5] == "96.5 ± 0.5" and bottle[6] == "97.8" and bottle[7] == "-1.3"
    assert bottle[8] == f"90.0 ± {DASH}"          # AU-PRO: one seed has it, one has None
    cable_img = ref.PAPER_TABLE1_MVTEC["cable"][0]
    assert t1["cable"][2] == f"90.0 ± {DASH}" and t1["cable"][3] == f"{cable_img:.1f}"
    assert t1["cable"][4] == f"{90.0 - cable_img:+.1f}"
    cap = t1["capsule"]  # never run: our columns are dashes, the paper's are filled
    assert all(cap[i] == DASH for i in (1, 2, 4, 5, 7, 8))
    assert (cap[3], cap[6]) == tuple(f"{v:.1f}" for v in ref.PAPER_TABLE1_MVTEC["capsule"])
    mean = [r for k, r in t1.items() if k.startswith("mean")][0]
    assert mean[0] == "mean (2/15 categories)" and mean[3] == f"{(99.1 + cable_img) / 2:.1f}"  # paper's mean over the same 2
    t2 = read_csv(written["table2"]["csv"])
    assert t2["male"][2] == f"80.0 ± {DASH}" and t2["male"][3] == "70.9 ± 0.5" and t2["female"][2] == DASH
    assert t2["male: PII (paper)"][3] == "65.2 ± 0.9" and t2["male: PII (paper)"][2] == DASH
    t3 = read_csv(written["table3"]["csv"])
    assert t3["anomaly: cutpaste"][4] == f"90.0 ± {DASH}" and t3["anomaly: cutpaste"][5] == "95.4 ± 0.4"
    assert t3["anomaly: cutpaste"][6] == DASH  # Δ: our runs do not cover the 15 categories
    assert t3["init: MSN (not implemented)"][8] == "97.8 ± 0.6" and t3["init: MSN (not implemented)"][4] == DASH
    assert "anomaly: scar" not in t3  # neither run nor in the paper
    t4 = read_csv(written["table4"]["csv"])
    assert t4["random, r = 0.5"][4] == f"95.0 ± {DASH}" and t4["random, r = 0.5"][5] == DASH  # not in the paper
    assert t4["random, r = 0.3"][5] == "96.6" and t4["none (no masking)"][8] == "96.2"
    tex = written["table1"]["tex"].read_text()
    assert r"\pm" in tex and r"metal\_nut" in tex and "±" not in tex
    md = (out / "tables.md").read_text()
    assert "| bottle | 2 |" in md and "not transcribed" not in md


def test_summarise_across_categories():
    from apmask_lib.report.tables import RunRecord

    def rec(cat, seed, v):
        return RunRecord(Path("."), Path("."), "mvtec", cat, seed, metrics={"image_auroc": v})

    s = summarise([rec("a", 0, 0.8), rec("a", 1, 0.9), rec("b", 0, 0.6), rec("b", 1, 0.6)], "image_auroc")
    assert s.mean == pytest.approx((0.85 + 0.6) / 2) and s.n == 4 and s.categories == ("a", "b")
    assert s.se == pytest.approx(math.sqrt(0.05**2 + 0.0) / 2)
    assert summarise([rec("a", 0, 0.8), rec("b", 0, 0.6)], "image_auroc").se is None
    assert fmt_stat(Stat(None, None, 0)) == DASH


def test_reference_holds_every_paper_number():
    assert ref.PAPER_TABLE1_MVTEC["bottle"] == (99.1, 97.8)
    assert set(ref.PAPER_TABLE1_MVTEC) == set(ref.MVTEC_CATEGORIES)
    assert ref.missing_reference_values() == []
    assert len(ref.paper_rows()) == 245
    # the NSA transistor pixel value the OCR garbled ("8.0") is the 88.0 its row mean requires
    assert ref.paper_value(1, "NSA", "transistor", "pixel_auroc") == 88.0
    assert ref.paper_value(1, "PaDiM", "bottle", "image_auroc") is None  # the paper gives PaDiM's image mean only


SHARED_TABLES = Path(__file__).resolve().parents[1].parent / "shared" / "paper" / "tables.csv"


@pytest.mark.skipif(not SHARED_TABLES.is_file(), reason=f"{SHARED_TABLES} (the paper's transcription) is not present")
def test_every_paper_value_appears_in_the_rendered_tables(tmp_path):
    """Each value of ../shared/paper/tables.csv is in the package copy and in the rendered table of its number
    (Table 1: in its method's row and category column of table1_paper; Tables 2-4: as "value ± se" where the
    paper gives an SE)."""
    from apmask_lib.report.tables import to_csv, build_tables

    with SHARED_TABLES.open() as f:
        shared = list(csv.DictReader(f))
    assert len(shared) == len(ref.paper_rows())
    tables = {t.name: t for t in build_tables([])}
    t1 = {(r[0], r[1]): r for r in tables["table1_paper"].rows}
    col = {c: i for i, c in enumerate(tables["table1_paper"].columns)}
    text = {2: to_csv(tables["table2"]), 3: to_csv(tables["table3"]), 4: to_csv(tables["table4"])}
    label = {"image_auroc": "image AUROC", "pixel_auroc": "pixel AUROC"}
    for r in shared:
        v = float(r["value"])
        e = ref.paper_entry(int(r["table"]), r["method"], r["category"], r["metric"], r["section"] or None)
        assert e is not None and e.value == v and e.se == (float(r["se"]) if r["se"] else None), r
        want = f"{v:.1f}" + (f" ± {float(r['se']):.1f}" if r["se"] else "")
        if r["table"] == "1":
            name = "APMask (paper)" if r["method"] == ref.OURS else f"{r['method']} (paper)"
            assert t1[(name, label[r["metric"]])][col[r["category"]]] == want, r
        else:
            assert want in text[int(r["table"])], r


def test_datasets_outside_the_paper_get_their_own_table(tmp_path):
    root = tmp_path / "runs"
    demo = {"dataset": "demo"}
    make_run(root, "brick/s0", {"image_auroc": 0.9, "pixel_auroc": 0.8, "au_pro": 0.7}, seed=0,
             data={**demo, "category": "brick"})
    make_run(root, "brick/s1", {"image_auroc": 0.8, "pixel_auroc": 0.8, "au_pro": 0.7}, seed=1,
             data={**demo, "category": "brick"})
    make_run(root, "grass/s0", {"image_auroc": 0.6, "pixel_auroc": 0.5, "au_pro": 0.4}, seed=0,
             data={**demo, "category": "grass"})
    written = write_tables(root, tmp_path / "tables")
    assert "table1_demo" in written
    md = (tmp_path / "tables" / "table1_demo.md").read_text()
    assert "| brick | 2 | 85.0 ± 5.0 |" in md
    assert "| grass | 1 | 60.0" in md
    assert "mean (2 categories)" in md
    # MVTec's Table 1 stays free of demo numbers
    assert "| brick |" not in (tmp_path / "tables" / "table1.md").read_text()
