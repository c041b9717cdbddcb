"""kNN patch scoring (the AnomalyDINO-style EXTENSION): agreement with scikit-learn / scipy, chunking,
coresets, one real-data run, and the evaluate integration leaving the paper method untouched."""
from __future__ import annotations

import csv
import json
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from scipy.ndimage import gaussian_filter
from sklearn.metrics import roc_auc_score
from sklearn.neighbors import NearestNeighbors

from apmask_lib.knn import scoring as knn
from apmask_lib.config import replace
from apmask_lib.data import build_dataset
from apmask_lib.evaluate.stage import run_evaluate
from apmask_lib.weights import build_backbone

from helpers import ConstantMap, micro_cfg


def unit(x: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.normalize(x, dim=-1)


# --- nearest neighbours ----------------------------------------------------------------------
@pytest.mark.parametrize("k", [1, 3])
def test_distances_agree_with_sklearn(k):
    g = torch.Generator().manual_seed(0)
    bank, queries = unit(torch.randn(300, 24, generator=g)), unit(torch.randn(2, 40, 24, generator=g))
    got = knn.MemoryBank(query_chunk=17, bank_chunk=64).fit(bank).score(queries, k=k)
    nn_ = NearestNeighbors(n_neighbors=k, metric="cosine", algorithm="brute").fit(bank.double().numpy())
    dist, _ = nn_.kneighbors(queries.reshape(-1, 24).double().numpy())
    assert got.shape == (2, 40)
    np.testing.assert_allclose(got.reshape(-1).numpy(), dist.mean(axis=1), atol=1e-5)


@pytest.mark.slow
def test_chunking_gives_identical_results():
    g = torch.Generator().manual_seed(1)
    bank, q = unit(torch.randn(500, 32, generator=g)), unit(torch.randn(61, 32, generator=g))
    whole = knn.knn_distances(q, bank, k=4, query_chunk=10**6, bank_chunk=10**6)
    for qc, bc in ((1, 500), (20, 7), (61, 499), (8, 128)):
        part = knn.knn_distances(q, bank, k=4, query_chunk=qc, bank_chunk=bc)
        torch.testing.assert_close(part, whole, atol=1e-6, rtol=0)
    assert (whole[:, 1:] >= whole[:, :-1]).all()  # ascending


@pytest.mark.slow
def test_exact_search_agrees_with_a_brute_force_reference_for_any_chunking():
    """k = 1 (row-maximum pass) and k = 5 (running top-k) against the full similarity matrix, with
    chunk sizes that do not divide the query / bank counts and the defaults."""
    g = torch.Generator().manual_seed(5)
    bank, q = unit(torch.randn(1031, 48, generator=g)), unit(torch.randn(203, 48, generator=g))
    full = (1.0 - (q.double() @ bank.double().T)).sort(dim=1).values
    for k in (1, 5):
        ref = full[:, :k].clamp_min(0.0).float()
        for qc, bc in ((1024, 32768), (64, 100), (203, 1031), (7, 1030), (1, 1)):
            got = knn.knn_distances(q, bank, k=k, query_chunk=qc, bank_chunk=bc)
            assert got.shape == (203, k)
            torch.testing.assert_close(got, ref, atol=2e-6, rtol=0)
    with pytest.raises(ValueError, match="k must"):
        knn.knn_distances(q, bank, k=0)
    with pytest.raises(ValueError, match="share C"):
        knn.knn_distances(q, bank[:, :5])


@pytest.mark.slow
def test_bf16_search_returns_exact_distances_of_the_neighbours_it_chooses():
    """search="bf16": each value is the fp32 distance to a real bank row, never below the exact k-th
    distance, equal to it where the bf16 ranking agrees (here: most queries; off by at most the bf16
    rounding elsewhere), ascending; the option is refused when misspelt."""
    g = torch.Generator().manual_seed(6)
    bank, q = unit(torch.randn(1031, 48, generator=g)), unit(torch.randn(203, 48, generator=g))
    sims = q @ bank.T
    for k in (1, 4):
        exact = knn.knn_distances(q, bank, k=k)
        got = knn.knn_distances(q, bank, k=k, query_chunk=64, bank_chunk=100, search="bf16")
        assert got.shape == (203, k) and (got[:, 1:] >= got[:, :-1]).all()
        assert (got >= exact - 1e-6).all() and (got - exact).max() < 0.02
        assert ((got - exact).abs() < 1e-6).float().mean() > 0.97
        # every value is the fp32 distance to some bank row of that query
        assert (((1.0 - sims)[:, :, None] - got[:, None, :]).abs() < 1e-6).any(dim=1).all()
        assert (knn.knn_distances(q, bank, k=k, search="bf16") - exact).abs().max() < 0.02
    mb = knn.MemoryBank(search="bf16").fit(bank)
    assert mb.features16.dtype == torch.bfloat16
    torch.testing.assert_close(mb.score(q), knn.knn_distances(q, bank, search="bf16")[:, 0], atol=1e-6, rtol=0)
    with pytest.raises(ValueError, match="search"):
        knn.MemoryBank(search="fp16")


def test_identical_patch_scores_zero_and_bank_rows_are_normalised():
    g = torch.Generator().manual_seed(2)
    raw = torch.randn(50, 16, generator=g) * 5.0
    bank = knn.MemoryBank().fit(raw)
    assert torch.allclose(bank.features.norm(dim=1), torch.ones(50), atol=1e-6)
    d = bank.score(raw[[3, 17]][None])  # the very patches of the bank (unnormalised: scale-invariant)
    assert d.shape == (1, 2) and d.abs().max() < 1e-6
    one = knn.MemoryBank().fit(raw[:1])
    assert one.score(-raw[:1]).item() == pytest.approx(2.0, abs=1e-6)  # opposite direction: distance 2


@pytest.mark.slow
def test_coreset_keeps_requested_count_and_greedy_covers_clusters():
    g = torch.Generator().manual_seed(3)
    centers = unit(torch.randn(5, 64, generator=g)) * 10
    pts = torch.cat([c + 0.01 * torch.randn(200, 64, generator=g) for c in centers])
    for method in knn.CORESET_METHODS:
        bank = knn.MemoryBank(coreset=0.1, coreset_method=method).fit(pts)
        assert len(bank) == 100 and bank.n_fitted == 1000
    idx = knn.greedy_coreset(pts, 5, seed=0, proj_dim=None)
    assert sorted((idx // 200).tolist()) == [0, 1, 2, 3, 4]  # farthest-point selection: one per cluster
    assert torch.equal(knn.greedy_coreset(pts, 7, seed=4), knn.greedy_coreset(pts, 7, seed=4))
    r = knn.random_coreset(1000, 30, seed=1)
    assert len(set(r.tolist())) == 30 and torch.equal(r, knn.random_coreset(1000, 30, seed=1))
    with pytest.raises(ValueError, match="coreset"):
        knn.MemoryBank(coreset=0.0)


# --- read-out --------------------------------------------------------------------------------
def test_top_fraction_mean_and_maps():
    x = torch.arange(1000, dtype=torch.float32)[None].repeat(2, 1)
    assert knn.top_fraction_mean(x, 0.01).tolist() == [float(np.mean(np.arange(990, 1000)))] * 2
    assert knn.top_fraction_mean(x[:, :50], 0.01).tolist() == [49.0, 49.0]  # at least one patch
    rng = np.random.default_rng(0)
    m = rng.random((2, 40, 33)).astype(np.float32)
    got = knn.gaussian_filter(torch.from_numpy(m), 2.0).numpy()
    for i in range(2):
        np.testing.assert_allclose(got[i], gaussian_filter(m[i].astype(np.float64), 2.0, mode="mirror"), atol=1e-5)
    const = knn.distance_map(torch.full((1, 16), 0.3), (4, 4), (50, 70), sigma=4)
    assert const.shape == (1, 50, 70) and torch.allclose(const, torch.full_like(const, 0.3), atol=1e-6)


def test_sigma_at_input_smooths_a_fixed_fraction_of_the_image():
    """sigma_at="input": the map's smoothing does not depend on the size the image is stored at
    (a map made at 2x the size, shrunk back, equals the 1x map); sigma_at="output" smooths twice
    as narrowly at 2x. Equal to "output" when the stored size is the input size."""
    g = torch.zeros(1, 8 * 8)
    g[0, 8 * 3 + 4] = 1.0  # one hot patch on an 8x8 grid
    pool = torch.nn.functional.avg_pool2d
    m1 = knn.distance_map(g, (8, 8), (112, 112), 4.0, "input", (112, 112))
    np.testing.assert_allclose(m1, knn.distance_map(g, (8, 8), (112, 112), 4.0), atol=1e-6)
    m2_in = knn.distance_map(g, (8, 8), (224, 224), 4.0, "input", (112, 112))
    m2_out = knn.distance_map(g, (8, 8), (224, 224), 4.0, "output")
    back_in = pool(m2_in[:, None], 2)[:, 0]
    back_out = pool(m2_out[:, None], 2)[:, 0]
    err_in = float((back_in - m1).abs().max())
    err_out = float((back_out - m1).abs().max())
    assert err_in < 0.02 * float(m1.max()), err_in
    assert err_out > 5 * err_in  # the output convention is NOT resolution-independent
    with pytest.raises(ValueError, match="sigma_at"):
        knn.distance_map(g, (8, 8), (16, 16), 4.0, "middle")
    with pytest.raises(ValueError, match="input_size"):
        knn.distance_map(g, (8, 8), (16, 16), 4.0, "input")


def test_average_outputs_over_sizes():
    a = knn.KnnOutput(torch.zeros(2, 4), np.array([1.0, 2.0]), [np.full((3, 5), 1.0), np.full((4, 4), 0.0)])
    b = knn.KnnOutput(torch.zeros(2, 16), np.array([3.0, 4.0]), [np.full((3, 5), 2.0), np.full((4, 4), 1.0)])
    avg = knn.average_outputs([a, b])
    np.testing.assert_allclose(avg.scores, [2.0, 3.0])
    assert [m.shape for m in avg.maps] == [(3, 5), (4, 4)] and avg.maps[0].mean() == 1.5 and avg.maps[1].mean() == 0.5


def test_patch_features_equal_the_backbone_forward():
    bb = build_backbone("random:vit_tiny16", seed=0).eval()
    x = torch.rand(2, 3, 64, 48)
    with torch.no_grad():
        ref = bb(x, attn=None, return_layers=(1,)).layers[1][:, 1:]
    raw = knn.patch_features(bb, x, 1, final_norm=False)
    normed = knn.patch_features(bb, x, -3, final_norm=True)  # -3 == block 1 of 4
    assert raw.shape == (2, 12, 96)
    torch.testing.assert_close(raw, unit(ref), atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(normed, unit(bb.norm(ref)), atol=1e-6, rtol=1e-5)
    with pytest.raises(ValueError, match="layer"):
        knn.patch_features(bb, x, 4)


def test_input_shape_keeps_the_aspect_ratio():
    assert knn.input_shape((300, 500), 224, 14) == (224, 224)  # square: stretched
    h, w = knn.input_shape((300, 500), 224, 14, "keep")
    assert h % 14 == 0 and w % 14 == 0 and abs(w / h - 500 / 300) < 0.1
    assert abs(h * w - 224 * 224) / (224 * 224) < 0.1  # about the square's patch count
    assert knn.input_shape((512, 512), 448, 14, "keep") == (448, 448)
    assert knn.input_shape((40, 400), 224, 14, "keep")[0] >= 14  # at least one patch per side
    with pytest.raises(ValueError, match="aspect"):
        knn.input_shape((3, 4), 224, 14, "crop")


def grey_texture(h: int, w: int, seed: int) -> np.ndarray:
    """A smooth random grey texture as RGB uint8 (three equal channels, as read_image returns grey files)."""
    rng = np.random.default_rng(seed)
    g = gaussian_filter(rng.random((h, w)), 2.0)
    g = (255 * (g - g.min()) / (np.ptp(g) + 1e-9)).astype(np.uint8)
    return np.repeat(g[:, :, None], 3, axis=2)


@pytest.mark.slow
def test_non_square_grey_images_at_their_own_aspect_ratio():
    """aspect="keep": images of different non-square sizes in one batch, each on its own grid, maps at
    the stored sizes; a square image gives exactly the square mode's result; features() refuses a
    batch of mixed input shapes with a pointer to features_list()."""
    bb = build_backbone("random:vit_tiny16", seed=0).eval()
    sizes = [(48, 80), (80, 48), (64, 64), (50, 90)]
    train = [grey_texture(h, w, i) for i, (h, w) in enumerate(sizes)]
    keep = knn.KnnScorer(bb, 1, 64, aspect="keep")
    feats = keep.features_list(train)
    assert [tuple(f.shape) for f in feats] == [(keep.grid_of(hw)[0] * keep.grid_of(hw)[1], 96) for hw in sizes]
    assert keep.grid_of((48, 80)) == (3, 5) and keep.grid_of((80, 48)) == (5, 3) and keep.grid_of((64, 64)) == (4, 4)
    keep.fit(feats)
    test = [grey_texture(h, w, 10 + i) for i, (h, w) in enumerate(sizes)]
    out = keep.predict(test)
    assert [m.shape for m in out.maps] == sizes and out.scores.shape == (4,) and np.isfinite(out.scores).all()
    with pytest.raises(ValueError, match="features_list"):
        keep.features(test)
    square = knn.KnnScorer(bb, 1, 64)
    square.fit(square.features(train))  # square mode stretches every image to 64 x 64
    sq_out = square.predict(test)
    assert [m.shape for m in sq_out.maps] == sizes
    # on a square image the two modes agree exactly (same input, same grid), given the same bank
    one_keep = keep.predict([test[2]], bank=square.bank)
    one_sq = square.predict([test[2]])
    np.testing.assert_array_equal(one_keep.maps[0], one_sq.maps[0])
    assert one_keep.scores[0] == one_sq.scores[0]


@pytest.mark.slow
def test_bf16_features_on_cpu_use_one_shared_bf16_copy(offline_backbone):
    """feature_bf16=True on the CPU: features from a bf16 copy of the backbone (made once, shared by
    every scorer of that backbone, the original left in fp32), within bf16 rounding of the fp32 ones
    (real offline ViT-S/14, block 7, 112 px)."""
    images = [grey_texture(112, 112, i) for i in range(3)]
    exact = knn.KnnScorer(offline_backbone, 7, 112).features(images)
    a, b = knn.KnnScorer(offline_backbone, 7, 112, feature_bf16=True), knn.KnnScorer(offline_backbone, 7, 224, feature_bf16=True)
    approx = a.features(images)
    b.features(images[:1])
    copy = knn.bf16_copy(offline_backbone)
    assert copy is knn.bf16_copy(offline_backbone) and copy is not offline_backbone
    assert {p.dtype for p in copy.parameters()} == {torch.bfloat16}
    assert {p.dtype for p in offline_backbone.parameters()} == {torch.float32}
    assert approx.dtype == torch.float32 and approx.shape == exact.shape
    cos = (approx * exact).sum(-1)
    assert cos.min() > 0.995 and not torch.equal(approx, exact), cos.min()


def test_bf16_options_warn_where_they_would_be_slower(monkeypatch, caplog):
    """Pinned numerics (ONEDNN_MAX_CPU_ISA=AVX2, apmask's default) or a CPU without bf16 units make
    bf16 slower than fp32 (results/knn_speed.md): asking for it says so; fp32 / exact says nothing."""
    from apmask_lib.core import machine

    bb = build_backbone("random:vit_tiny16", seed=0).eval()
    monkeypatch.setattr(machine, "cpu_flags", lambda: {"avx2", "amx_bf16"})
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "AVX2")
    assert "pinned to AVX2" in machine.bf16_slow_reason()
    with caplog.at_level("WARNING", logger="apmask_lib.knn.scoring"):
        knn.KnnScorer(bb, 1, 64)
        assert not caplog.records
        knn.KnnScorer(bb, 1, 64, search="bf16")
    assert "SLOWER than fp32" in caplog.text and "pinned to AVX2" in caplog.text
    monkeypatch.setattr(machine, "cpu_flags", lambda: {"avx2"})
    assert "no bf16 units" in machine.bf16_slow_reason()
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "")
    monkeypatch.setattr(machine, "cpu_flags", lambda: {"avx512f", "amx_bf16"})
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "AVX512")
    assert machine.bf16_slow_reason() is None


@pytest.mark.slow
def test_non_square_grey_defect_is_localised(offline_backbone):
    """A bright blob on a non-square grey texture is found at its place with aspect="keep" (real
    offline ViT-S/14, block 7, 112 px)."""
    sc = knn.KnnScorer(offline_backbone, 7, 112, aspect="keep")
    sc.fit(sc.features_list([grey_texture(96, 160, i) for i in range(6)]))
    img = grey_texture(96, 160, 99)
    img[40:64, 110:134] = 255
    m = sc.predict([img]).maps[0]
    assert m.shape == (96, 160)
    y, x = np.unravel_index(np.argmax(m), m.shape)
    assert 30 <= y < 74 and 100 <= x < 144, (y, x)


# --- real data -------------------------------------------------------------------------------
@pytest.mark.slow
def test_real_bottle_knn_detects_defects(mvtec_root, offline_backbone):
    """AnomalyDINO read-out on real MVTec bottle, offline ViT-S/14 block 7 at 224 px, a bank from 20
    training images, 10 good + 10 defective test images (measured: AUROC 1.0)."""
    ds = build_dataset("mvtec", mvtec_root, "bottle")
    good = [s for s in ds.test if s.label == 0][:10]
    bad = [s for s in ds.test if s.label == 1][::6][:10]
    scorer = knn.KnnScorer(offline_backbone, layer=7, size=224)
    train = ds.train[::10][:20]
    feats = [scorer.features([ds.image(s) for s in train[i:i + 5]]) for i in range(0, len(train), 5)]
    scorer.fit(feats)
    assert len(scorer.bank) == 20 * 256 and scorer.grid == (16, 16)
    scores, maps = [], []
    for i in range(0, 20, 5):
        out = scorer.predict([ds.image(s) for s in (good + bad)[i:i + 5]])
        scores += out.scores.tolist()
        maps += out.maps
    labels = [0] * 10 + [1] * 10
    assert roc_auc_score(labels, scores) > 0.9
    assert maps[0].shape == ds.image(good[0]).shape[:2] and all(np.isfinite(m).all() for m in maps)
    # the defective pixels of the defective images score higher than their good pixels
    inside = [m[ds.mask(s, m.shape)].mean() - m[~ds.mask(s, m.shape)].mean() for s, m in zip(bad, maps[10:])]
    assert np.mean(np.array(inside) > 0) >= 0.8


# --- evaluate integration --------------------------------------------------------------------
PAPER_KEYS = ("image_auroc", "image_auroc_det_mean", "image_auroc_map_max", "per_defect_image_auroc", "f1_max",
              "pixel_auroc", "au_pro", "pixel_f1_max", "vote_accuracy", "n_images", "n_pixel_gt_images")


@pytest.mark.slow
def test_evaluate_extension_adds_knn_and_keeps_the_paper_method(tmp_path, mvtec_root):
    ds = build_dataset("mvtec", mvtec_root, "bottle")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        base = micro_cfg(tmp_path / "off", mvtec_root, figure_images=4)
        m_off = run_evaluate(base, dataset=ds, model=ConstantMap())
        on = replace(micro_cfg(tmp_path / "on", mvtec_root, figure_images=4),
                     evaluate={"knn_layer": 1, "knn_sizes": [64, 32], "fusion": "fused", "knn_holdout": 0.5})
        m_on = run_evaluate(on, dataset=ds, model=ConstantMap())
    assert "methods" not in m_off and "extension" not in m_off
    for k in PAPER_KEYS:  # the paper method's results are the same with the extension on
        assert m_on[k] == m_off[k], k
        if k in m_on["methods"]["paper"]:
            assert m_on["methods"]["paper"][k] == m_off[k], k
    assert set(m_on["methods"]) == {"paper", "knn", "fused"}
    for m in ("knn", "fused"):
        for k in ("image_auroc", "pixel_auroc", "au_pro"):
            assert 0.0 <= m_on["methods"][m][k] <= 1.0, (m, k)
    ext = m_on["extension"]
    assert ext["knn_layer"] == 1 and ext["knn_backbone"] == "init" and ext["knn_sizes"] == [64, 32]
    assert ext["bank_images"] == 4 and ext["bank_patches"] == [4 * 16, 4 * 4] and ext["holdout_images"] == 2
    assert set(ext["fusion_stats"]) == {"knn_map", "seg_map", "knn_score", "det_score"}
    out = Path(on.out_dir) / "evaluate"
    with (out / "scores.csv").open() as f:
        rows = list(csv.DictReader(f))
    labels = [int(r["label"]) for r in rows]
    assert m_on["methods"]["knn"]["image_auroc"] == pytest.approx(
        roc_auc_score(labels, [float(r["score_knn"]) for r in rows]), abs=1e-6)
    assert m_on["methods"]["fused"]["image_auroc"] == pytest.approx(
        roc_auc_score(labels, [float(r["score_fused"]) for r in rows]), abs=1e-6)
    assert (out / "fig4a_localization_knn.png").is_file() and (out / "fig4a_localization_fused.png").is_file()
    saved = json.loads((out / "metrics.json").read_text())
    assert saved["extension"]["fusion"] == "fused" and saved["methods"]["paper"]["au_pro"] == m_off["au_pro"]
    off_cols = (Path(base.out_dir) / "evaluate" / "scores.csv").read_text().splitlines()[0]
    assert "score_knn" not in off_cols


@pytest.mark.slow
def test_evaluate_extension_with_the_finetuned_backbone(tmp_path, mvtec_root):
    """The real (briefly) fine-tuned detector, kNN on its own backbone, fusion 'knn' only."""
    from test_evaluate import make_detector

    cfg = replace(micro_cfg(tmp_path, mvtec_root), evaluate={"knn_layer": 2, "knn_backbone": "finetuned",
                                                             "knn_sizes": [96, 64, 100], "fusion": "knn", "knn_coreset": 0.5})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        make_detector(cfg)
        m = run_evaluate(cfg)
    assert set(m["methods"]) == {"paper", "knn"} and m["extension"]["holdout_images"] == 0
    # 100 px snaps to 96 (patch 16) and is used once; coreset 0.5 halves each bank
    assert m["extension"]["knn_sizes"] == [96, 64] and m["extension"]["knn_grids"] == [[6, 6], [4, 4]]
    assert m["extension"]["bank_patches"] == [4 * 36 // 2, 4 * 16 // 2]
    assert 0.0 <= m["methods"]["knn"]["pixel_auroc"] <= 1.0


def test_bad_extension_settings_are_clear_errors(tmp_path, mvtec_root):
    for bad, match in (({"fusion": "max"}, "evaluate.fusion"), ({"knn_backbone": "x"}, "evaluate.knn_backbone"),
                       ({"knn_sigma_at": "x"}, "evaluate.knn_sigma_at")):
        with pytest.raises(ValueError, match=match):  # refused when the config is built (config.CONSTRAINTS)
            run_evaluate(replace(micro_cfg(tmp_path, mvtec_root), evaluate={"knn_layer": 1, **bad}), model=ConstantMap())


@pytest.mark.slow
def test_evaluate_extension_at_the_images_own_aspect_ratio(tmp_path, mvtec_root):
    """evaluate.knn_aspect=keep: a folder data set of grey non-square images of several sizes runs
    through the extension with fusion (bank features grouped by input shape, held-out images scored
    one grid at a time); maps come back at the stored sizes."""
    from PIL import Image

    sizes = [(48, 80), (80, 48), (64, 64), (50, 90), (48, 80), (90, 50)]
    for folder, seed0, shapes in (("good", 0, sizes), ("bad/blob", 50, sizes[:3])):
        (tmp_path / "imgs" / folder).mkdir(parents=True)
        for i, (h, w) in enumerate(shapes):
            im = grey_texture(h, w, seed0 + i)
            if folder != "good":
                im[h // 3:h // 3 + 12, w // 3:w // 3 + 12] = 255
            Image.fromarray(im[:, :, 0]).save(tmp_path / "imgs" / folder / f"{i}.png")
    cfg = replace(micro_cfg(tmp_path, mvtec_root),
                  data={"dataset": "folder", "root": str(tmp_path / "imgs"), "category": "grey", "normal_dir": "good",
                        "abnormal_dir": "bad/blob", "normal_test_split": 0.34, "normal_val_split": 0.0,
                        "max_test": None, "max_train": None},
                  evaluate={"knn_layer": 1, "knn_sizes": [64], "fusion": "fused", "knn_holdout": 0.5, "knn_aspect": "keep"})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        m = run_evaluate(cfg, model=ConstantMap())
    assert set(m["methods"]) == {"paper", "knn", "fused"} and m["extension"]["holdout_images"] == 2
    assert 0.0 <= m["methods"]["knn"]["image_auroc"] <= 1.0
    assert m["extension"]["knn_aspect"] == "keep" and m["extension"]["knn_features"] == "fp32"
    assert m["extension"]["knn_search"] == "exact"
    with pytest.raises(ValueError, match="evaluate.knn_aspect"):
        replace(cfg, evaluate={"knn_aspect": "crop"})
    # the opt-in approximations reach the scorers and are recorded
    fast = replace(cfg, evaluate={"knn_features": "bf16", "knn_search": "bf16"})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        m16 = run_evaluate(fast, model=ConstantMap())
    assert m16["extension"]["knn_features"] == "bf16" and m16["extension"]["knn_search"] == "bf16"
    assert abs(m16["methods"]["knn"]["image_auroc"] - m["methods"]["knn"]["image_auroc"]) < 0.05
    for key, bad in (("knn_features", "fp16"), ("knn_search", "approx")):
        with pytest.raises(ValueError, match=f"evaluate.{key}"):
            replace(cfg, evaluate={key: bad})
