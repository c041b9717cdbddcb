"""Metric correctness: hand-computed cases, scikit-learn, and the official MVTec AD evaluation (oracles)."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest
from sklearn.metrics import precision_recall_curve, roc_auc_score

from apmask_lib import metrics as M

HIST_TOL = 1e-5   # histogram path (2^20 bins over the data range) vs the official figures
EXACT_TOL = 1e-6  # exact path vs the official figures


# --- image level -----------------------------------------------------------------------------
def test_auroc_known_answers():
    labels = [0, 0, 0, 1, 1]
    assert M.image_auroc([0.1, 0.2, 0.3, 0.8, 0.9], labels) == 1.0
    assert M.image_auroc([0.9, 0.8, 0.7, 0.2, 0.1], labels) == 0.0
    assert M.image_auroc([0.5] * 5, labels) == 0.5
    # one positive tied with one of three negatives, above the others: (2 + 0.5) / 3 per positive
    assert M.image_auroc([0.1, 0.2, 0.7, 0.7, 0.9], labels) == pytest.approx((3 + 2.5) / 6)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_auroc_and_f1_match_sklearn_with_ties(seed):
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 2, 500)
    scores = np.round(rng.normal(size=500) + labels, 1)  # rounding -> many ties
    assert M.image_auroc(scores, labels) == pytest.approx(roc_auc_score(labels, scores), abs=1e-12)
    p, r, t = precision_recall_curve(labels, scores)
    f1 = np.where(p + r > 0, 2 * p * r / np.maximum(p + r, 1e-300), 0)[:-1]
    best, thr = M.f1_max(scores, labels)
    assert best == pytest.approx(f1.max(), abs=1e-12)
    assert thr == pytest.approx(t[np.argmax(f1)])


def test_f1_max_hand_case():
    # threshold 0.8 -> tp 2, fp 0, fn 1: F1 = 2 * 1 * 2/3 / (5/3) = 0.8; threshold 0.4 -> tp 3, fp 1: 6/7
    f1, thr = M.f1_max([0.9, 0.8, 0.4, 0.4, 0.1], [1, 1, 1, 0, 0])
    assert f1 == pytest.approx(6 / 7) and thr == 0.4


# --- trapezoid and PRO -----------------------------------------------------------------------
def test_trapezoid_interpolates_at_limit():
    x, y = [0, 0.2, 0.4, 1.0], [0, 0.5, 1.0, 1.0]
    # 0..0.2: 0.05; 0.2..0.3 with y(0.3) = 0.75: 0.5 * (0.5 + 0.75) * 0.1 = 0.0625
    assert M.trapezoid(x, y, x_max=0.3) == pytest.approx(0.1125)
    assert M.trapezoid(x, y, x_max=0.4) == pytest.approx(0.05 + 0.15)
    assert M.trapezoid(x, y) == pytest.approx(0.05 + 0.15 + 0.6)


def two_region_case():
    """4x4 image: region A (2 px, row 0) and region B (2x2, rows 2-3), 10 normal pixels."""
    mask = np.zeros((4, 4), bool)
    mask[0, 0:2] = True
    mask[2:4, 0:2] = True
    s = np.zeros((4, 4), np.float32)
    s[0, 0:2] = 0.9          # A fully found at 0.9
    s[2, 0:2] = 0.8          # half of B at 0.8
    s[3, 0:2] = 0.1          # the other half at 0.1
    s[1, 0] = 0.85           # one false positive (1/10 of the normal pixels)
    return s, mask


def test_pro_two_regions_by_hand():
    s, mask = two_region_case()
    w, n = M.region_weights(mask)
    assert n == 2 and w[0, 0] == 0.5 and w[2, 0] == 0.25
    fpr, pro = M.pro_curve([s], [mask])
    # points: (0,0) | t=.9 (0,.5) | t=.85 (.1,.5) | t=.8 (.1,.75) | t=.1 (.1,1) | t=0 (1,1) | (1,1)
    np.testing.assert_allclose(fpr, [0, 0, 0.1, 0.1, 0.1, 1, 1])
    np.testing.assert_allclose(pro, [0, 0.5, 0.5, 0.75, 1, 1, 1])
    # area to 0.3: 0.1 * 0.5 + 0.2 * 1 = 0.25 -> / 0.3
    assert M.au_pro([s], [mask], 0.3) == pytest.approx(0.25 / 0.3)
    assert M.au_pro([s], [mask], 0.05) == pytest.approx(0.5)
    assert M.au_pro([s], [mask], 0.3, bins=1000, value_range=(0, 1)) == pytest.approx(0.25 / 0.3)


def test_regions_are_8_connected():
    mask = np.zeros((5, 5), bool)
    mask[1, 1] = mask[2, 2] = True    # diagonal neighbours: one region
    mask[4, 4] = True
    assert M.region_weights(mask)[1] == 2


def test_constant_map_gives_chance_pro_and_auroc():
    """All scores tied: the curve jumps from (0,0) to (1,1); AU-PRO(0.3) = 0.5*0.3*0.3/0.3 = 0.15."""
    _, mask = two_region_case()
    s = np.full((4, 4), 0.3)
    assert M.au_pro([s], [mask], 0.3) == pytest.approx(0.15)
    assert M.pixel_auroc([s], [mask]) == pytest.approx(0.5)


def test_normal_images_only_add_false_positives():
    s, mask = two_region_case()
    good = np.zeros((4, 4), np.float32)
    good[0, 0] = 0.95                            # above everything: fpr jumps first
    a = M.au_pro([s, good], [mask, np.zeros_like(mask)], 0.3)
    b = M.au_pro([s], [mask], 0.3)
    assert a < b


# --- pixel AUROC, streaming, histogram -------------------------------------------------------
def test_pixel_auroc_matches_sklearn_and_streams_over_sizes():
    rng = np.random.default_rng(3)
    maps, masks = [], []
    for h, w in [(20, 30), (17, 17), (40, 8)]:
        m = np.zeros((h, w), bool)
        m[h // 4: h // 2, w // 3: w // 2 + 1] = True
        maps.append(np.round(rng.random((h, w)) * 0.7 + 0.3 * m, 2))  # ties from rounding
        masks.append(m)
    flat_s = np.concatenate([m.ravel() for m in maps])
    flat_y = np.concatenate([m.ravel() for m in masks])
    assert M.pixel_auroc(maps, masks) == pytest.approx(roc_auc_score(flat_y, flat_s), abs=1e-12)
    acc = M.PixelMetrics(bins=None)
    for s, m in zip(maps, masks):
        acc.update(s, m)
    p, r, _ = precision_recall_curve(flat_y, flat_s)
    assert acc.f1_max()[0] == pytest.approx(np.max(2 * p * r / np.maximum(p + r, 1e-300)), abs=1e-12)


def test_histogram_close_to_exact_on_probability_maps():
    rng = np.random.default_rng(4)
    maps, masks = [], []
    for _ in range(6):
        m = np.zeros((64, 64), bool)
        y, x = rng.integers(5, 50, 2)
        m[y:y + rng.integers(3, 12), x:x + rng.integers(3, 12)] = True
        logits = rng.normal(size=(64, 64)) + 2.5 * m
        maps.append((1 / (1 + np.exp(-logits))).astype(np.float32))
        masks.append(m)
    exact, hist = M.PixelMetrics(None), M.PixelMetrics()  # default: 2^20 bins over [0, 1]
    exact.update_batch(maps, masks)
    hist.update_batch(maps, masks)
    err = abs(hist.pixel_auroc() - exact.pixel_auroc())
    assert err < 1e-4 and err <= hist.auroc_bin_error_bound() + 1e-12
    flat_y = np.concatenate([m.ravel() for m in masks])
    flat_s = np.concatenate([m.ravel() for m in maps])
    assert abs(hist.pixel_auroc() - roc_auc_score(flat_y, flat_s)) < 1e-4
    for lim in (0.05, 0.3, 1.0):
        assert abs(hist.au_pro(lim) - exact.au_pro(lim)) < 1e-4
    assert abs(hist.f1_max()[0] - exact.f1_max()[0]) < 1e-4
    # coarse bins: the bound still holds
    coarse = M.PixelMetrics(bins=16)
    coarse.update_batch(maps, masks)
    assert abs(coarse.pixel_auroc() - exact.pixel_auroc()) <= coarse.auroc_bin_error_bound() + 1e-12


def test_out_of_range_scores_warn():
    acc = M.PixelMetrics(bins=8)
    _, mask = two_region_case()
    acc.update(np.full((4, 4), 2.0), mask)
    with pytest.warns(UserWarning, match="outside"):
        acc.pixel_auroc()


def test_errors_are_clear():
    with pytest.raises(ValueError, match="both classes"):
        M.image_auroc([0.1, 0.2], [0, 0])
    with pytest.raises(ValueError, match="must be equal"):
        M.PixelMetrics().update(np.zeros((3, 3)), np.zeros((3, 4), bool))
    with pytest.raises(ValueError, match="non-finite"):
        M.image_auroc([np.nan, 0.2], [0, 1])
    with pytest.raises(ValueError, match="region"):
        M.au_pro([np.zeros((3, 3))], [np.zeros((3, 3), bool)])


# --- the official evaluation's figures ------------------------------------------------------
@pytest.fixture(scope="module")
def oracles(oracle_dir):
    cases = np.load(oracle_dir / "cases.npz")
    expected = json.loads((oracle_dir / "expected.json").read_text())
    return cases, expected


@pytest.mark.slow
@pytest.mark.parametrize("case", ["blur_low_noise", "blur_high_noise", "quantized_ties"])
def test_matches_official_mvtec_evaluation(oracles, case):
    cases, expected = oracles
    gts = cases["bottle__gts"] > 0
    maps = cases[f"{case}__maps"]
    exp = expected[case]
    exact = M.PixelMetrics(bins=None)
    hist = M.PixelMetrics(bins=M.DEFAULT_BINS, value_range=(float(maps.min()), float(maps.max())))
    for s, m in zip(maps, gts):
        exact.update(s, m)
        hist.update(s, m)
    for lim, value in exp["au_pro"].items():
        assert exact.au_pro(float(lim)) == pytest.approx(value, abs=EXACT_TOL), f"AU-PRO@{lim} exact"
        assert hist.au_pro(float(lim)) == pytest.approx(value, abs=HIST_TOL), f"AU-PRO@{lim} histogram"
    assert exact.pixel_auroc() == pytest.approx(exp["pixel_auroc_sklearn"], abs=EXACT_TOL)
    assert hist.pixel_auroc() == pytest.approx(exp["pixel_auroc_sklearn"], abs=HIST_TOL)
    labels = gts.reshape(len(gts), -1).any(axis=1)
    img = M.image_auroc(maps.reshape(len(maps), -1).max(axis=1), labels)
    assert img == pytest.approx(exp["image_auroc_max_of_map"], abs=EXACT_TOL)


# --- seeds -----------------------------------------------------------------------------------
def test_aggregate_seeds():
    runs = [{"image_auroc": 0.90, "per_defect": {"a": 0.8}, "backbone": "x"},
            {"image_auroc": 0.92, "per_defect": {"a": 0.9}},
            {"image_auroc": 0.94, "per_defect": {"a": float("nan")}}]
    agg = M.aggregate_seeds(runs)
    assert agg["image_auroc"]["mean"] == pytest.approx(0.92)
    assert agg["image_auroc"]["se"] == pytest.approx(0.02 / math.sqrt(3))
    assert agg["image_auroc"]["n"] == 3
    assert agg["per_defect"]["a"] == {"mean": pytest.approx(0.85), "se": pytest.approx(0.05), "n": 2}
    assert "backbone" not in agg
    one = M.aggregate_seeds(runs[:1])
    assert one["image_auroc"]["se"] is None and one["image_auroc"]["n"] == 1
