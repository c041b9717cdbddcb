"""Benchmark reports render what was measured: ratios within a round, the equal-quality judgement,
the backbone table for both numerics settings, and the notes (benchmarks/knn_speed.py)."""
from __future__ import annotations

import pytest

from benchmarks.knn_speed import render


def _row(method, total, quality, **kw):
    t = {"total_s": total, "train_features_s": 1.0, "fit_s": 0.1, "test_features_s": 1.0, "search_s": 1.0,
         "readout_s": 0.1, "other_s": 0.1}
    return {"method": method, "n_train": 209, "n_test": 83, "timings": t, "peak_rss_mb": 1000.0,
            "load_before": [2.0], "load_after": [2.0], "quality": dict(zip(("image_auroc", "pixel_auroc", "au_pro"), quality)),
            **kw}


def test_knn_speed_report_judges_ratio_and_quality_per_round():
    rnd = [_row("anomalydino", 30.0, (100.0, 98.95, 95.65)),
           _row("ours", 90.0, (100.0, 98.91, 95.87)),
           _row("ours", 30.0, (100.0, 98.90, 95.88), feature_bf16=True, search="bf16"),
           _row("ours", 15.0, (100.0, 98.80, 95.87), feature_bf16=True)]
    bb = {"timings": {"fp32 @ 224": 30.0, "fp32 @ 448": 163.0, "bf16 copy @ 224": 8.0, "bf16 copy @ 448": 36.0},
          "load_before": [2.0], "load_after": [2.1]}
    md = render({"rounds": [rnd], "scaling": [], "date": "d", "total_s": 1.0, "notes": ["jobs paused"],
                 "backbone": bb, "backbone_pinned": bb}, "cmd", "machine")
    lines = md.splitlines()
    exact = next(l for l in lines if "fp32 features, exact fp32 search" in l and "| 1 |" in l)
    assert "| 90.0 s | 3.00 |" in exact and "| yes |" in exact            # the exact row is its own reference
    fast = next(l for l in lines if "bf16 search" in l and "| 1 |" in l)
    assert "| 30.0 s | 1.00 |" in fast and "| yes |" in fast
    off = next(l for l in lines if "bf16 copy of the backbone), exact" in l and "| 1 |" in l)
    assert "| 0.50 |" in off and "| no |" in off                           # 0.11 points of pixel AUROC lost
    assert "Note: jobs paused" in md
    assert sum("| bf16 copy | 8 ms | 36 ms |" in l for l in lines) == 2       # native and pinned


def _peer(name, kind, cat, n_train, metrics, max_train=None):
    return {"name": name, "peer": name.lower(), "dataset_kind": kind, "category": cat, "dataset": f"{kind}/{cat}",
            "max_train": max_train, "settings": {"train_images": n_train, "image_size": 252},
            **dict(zip(("image_auroc", "pixel_auroc", "au_pro"), metrics))}


def test_knn_quality_puts_the_default_beside_peers_measured_on_the_same_images():
    """Peer rows match by kind, category and number of training images; the verdict lines count where the
    default is ahead on every metric and where it is behind on one (benchmarks/knn_quality.py)."""
    from benchmarks.knn_quality import peer_section

    m = lambda a, b, c: dict(zip(("image_auroc", "pixel_auroc", "au_pro"), (a, b, c)))  # noqa: E731
    res = {"datasets": ["demo:grass", "mvtec:bottle", "nih:all"],
           "info": {"demo:grass": {"train": 40}, "mvtec:bottle": {"train": 50}, "nih:all": {"train": 36}},
           "variants": {"default": {"demo:grass": m(100, 99, 96), "mvtec:bottle": m(100, 98.9, 95.9),
                                    "nih:all": m(60, 80, 40)}}}
    rows = [_peer("AD", "demo", "grass", 40, (99, 98, 95)),          # behind the default everywhere: ours ahead
            _peer("AD", "mvtec", "bottle", 209, (100, 99.5, 99)),   # 209 training images: another measurement
            _peer("AD", "nih", "all", 36, (50, 81, 30)),            # ours behind on pixel AUROC
            _peer("PC", "demo", "grass", 40, (100, 99, 96))]        # a tie: neither ahead nor behind
    lines = peer_section(res, rows)
    assert "mvtec:bottle" not in lines[next(i for i, l in enumerate(lines) if l.startswith("| method"))]
    ad = next(l for l in lines if l.startswith("- against AD"))
    assert "ahead on 1 of 2 data sets (demo:grass)" in ad and "behind on at least one metric on nih:all" in ad
    pc = next(l for l in lines if l.startswith("- against PC"))
    assert "ahead on 0 of 1" in pc and "on none" in pc
    # saturated image AUROC: equal there, better elsewhere is ahead; 0.04 below elsewhere is a tie
    res["variants"]["default"]["demo:grass"] = m(100, 99.1, 96)
    tie = [_peer("PC", "demo", "grass", 40, (100, 99.14, 95.98))]
    assert "ahead on 1 of 1" in peer_section(res, [_peer("PC", "demo", "grass", 40, (100, 99, 96))])[-1]
    assert "ahead on 0 of 1" in peer_section(res, tie)[-1] and "on none" in peer_section(res, tie)[-1]
    assert next(l for l in lines if l.startswith("| PC")).endswith("| not run |")
    assert peer_section(res, [rows[1]]) == []                        # nothing on the same images: no section


def test_peer_rows_are_kept_per_data_set_category_cap_and_size():
    """benchmarks/peers.py: rows written before --dataset existed count as MVTec on all training images;
    the table names each row's data set and training images."""
    from benchmarks.peers import PATCHCORE_SIZE, markdown_table, peer_sizes, row_key

    assert peer_sizes(["anomalydino7", "patchcore"], [252, 448]) == [("anomalydino7", 252), ("anomalydino7", 448),
                                                                    ("patchcore", PATCHCORE_SIZE)]

    old = {"peer": "patchcore", "category": "bottle", "settings": {"image_size": 224, "train_images": 209}}
    assert row_key(old) == ("mvtec", "bottle", None, "patchcore", 224)
    new = _peer("AD", "demo", "grass", 40, (99, 98, 95))
    assert row_key(new) == ("demo", "grass", None, "ad", 252)
    assert row_key(dict(new, max_train=20)) != row_key(new)
    new.update(fit_s=1.0, infer_s=2.0, infer_per_image_s=0.1, settings={**new["settings"], "layer": "blocks.7",
                                                                         "k": 1, "memory_bank_patches": 10})
    table = markdown_table([new, dict(new, max_train=20, settings={**new["settings"], "train_images": 20})])
    assert "| demo/grass | 40 | AD |" in table and "| demo/grass | 20 (first) | AD |" in table


@pytest.mark.slow
def test_no_committed_result_or_doc_carries_a_machine_path():
    """Results, README, docs, CHANGELOG and params files name paths relative to the project, never this machine's."""
    import re
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    files = [p for p in (root / "results").rglob("*") if p.suffix in (".json", ".md", ".csv", ".tex", ".ipynb", ".html")]
    files += [root / "README.md", root / "CHANGELOG.md", *root.glob("params*.yaml"), root / "dvc.yaml",
              *(root / "docs").rglob("*.md")]
    pattern = re.compile(r"(?<![\w.])/(work|root|home|Users)/[\w.-]+")
    hits = [f"{p.relative_to(root)}: {m.group(0)}" for p in files if p.is_file()
            for m in pattern.finditer(p.read_text(errors="ignore"))]
    assert not hits, hits[:10]
