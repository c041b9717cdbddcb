"""The kNN memory bank (apmask_lib/knn/bank.py): the greedy coreset (agreement with one-at-a-time
farthest-point selection, the k-center bound, kept rows are bank rows), the bank-size cap, the fp16 bank
against fp32, and the kNN model file's fit check for settings added after a model was written.

Tolerances: fp16 storage rounds each component of a unit bank vector m to 11 significant bits, an error
e with |e| <= 2^-11 |m| = 4.9e-4; a cosine distance 1 - <q, m> then moves by at most |<q, e>| <= 4.9e-4
(asserted: < 1e-3). The bf16 search on an fp16 bank: the bf16 tolerance of tests/test_knn.py (0.02)."""
from __future__ import annotations

import itertools
import warnings

import pytest
import torch

from apmask_lib.config import Config, replace
from apmask_lib.knn import bank as kb
from apmask_lib.knn.model import KnnDetector, fit_changes, load_knn_model, save_knn_model, truncated_backbone


def unit(x: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.normalize(x, dim=-1)


def reference_greedy(x: torch.Tensor, count: int, start: int) -> list[int]:
    """Farthest-point selection one point at a time, direct distances (the textbook loop)."""
    chosen, mind = [start], (x - x[start]).pow(2).sum(1)
    mind[start] = -1.0
    while len(chosen) < count:
        j = int(mind.argmax())
        chosen.append(j)
        mind = torch.minimum(mind, (x - x[j]).pow(2).sum(1))
        mind[chosen] = -1.0
    return sorted(chosen)


@pytest.mark.parametrize("candidates", [1, 7, 256])
def test_batched_greedy_equals_one_at_a_time_farthest_point(candidates):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(600, 16, generator=g, dtype=torch.float64).float()
    start = int(torch.randint(600, (1,), generator=torch.Generator().manual_seed(5)))
    got = kb.greedy_coreset(x, 90, seed=5, proj_dim=None, candidates=candidates, chunk=97)
    assert got.tolist() == reference_greedy(x, 90, start)


def test_greedy_covering_radius_is_within_twice_the_optimal_k_center():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(14, 3, generator=g)
    d = torch.cdist(x, x)
    k = 3
    opt = min(float(d[:, list(c)].min(1).values.max()) for c in itertools.combinations(range(14), k))
    for seed in range(5):
        idx = kb.greedy_coreset(x, k, seed=seed, proj_dim=None)
        radius = float(d[:, idx].min(1).values.max())
        assert radius <= 2 * opt + 1e-6
    assert kb.greedy_coreset(x, 14, proj_dim=None).tolist() == list(range(14))  # all points: each once


def test_kept_patches_are_real_bank_rows_and_the_cap_holds():
    g = torch.Generator().manual_seed(2)
    raw = torch.randn(3, 100, 32, generator=g)
    normed = unit(raw.reshape(-1, 32))
    for method in kb.CORESET_METHODS:
        for fraction, cap, want in ((0.1, None, 30), (1.0, 45, 45), (0.5, 20, 20), (0.05, 1000, 15)):
            bank = kb.MemoryBank(coreset=fraction, max_patches=cap, coreset_method=method, seed=3).fit(raw)
            assert len(bank) == want == kb.coreset_size(300, fraction, cap) and bank.n_fitted == 300
            match = (bank.features[:, None, :] == normed[None]).all(-1)   # each kept row IS a bank row
            assert match.any(1).all() and match.any(1).sum() == want and len(set(match.float().argmax(1).tolist())) == want
    assert len(kb.MemoryBank(max_patches=10**6).fit(raw)) == 300       # a cap above the bank keeps everything
    with pytest.raises(ValueError, match="max_patches"):
        kb.MemoryBank(max_patches=0)
    with pytest.raises(ValueError, match="bank dtype"):
        kb.MemoryBank(dtype="bf16")


def test_greedy_coreset_keeps_the_bank_closer_than_random():
    """On clustered data the greedy coreset covers every cluster; the worst patch-to-bank distance
    after greedy selection is below that after a random sample of the same size."""
    g = torch.Generator().manual_seed(3)
    centers = torch.randn(40, 64, generator=g) * 3
    sizes = [400] * 5 + [5] * 35   # five big clusters and 35 small ones: a random sample misses many
    pts = unit(torch.cat([c + 0.05 * torch.randn(n, 64, generator=g) for c, n in zip(centers, sizes)]))
    worst = {}
    for method in kb.CORESET_METHODS:
        bank = kb.MemoryBank(coreset=0.02, coreset_method=method, seed=0).fit(pts)
        worst[method] = float(bank.score(pts).max())
    assert worst["greedy"] < 0.5 * worst["random"]


def test_fp16_bank_agrees_with_fp32_and_halves_storage():
    g = torch.Generator().manual_seed(4)
    pts, q = torch.randn(5000, 64, generator=g), torch.randn(2, 300, 64, generator=g)
    b32, b16 = kb.MemoryBank().fit(pts), kb.MemoryBank(dtype="fp16").fit(pts)
    assert b16.features.dtype == torch.float16 and b16.features.element_size() * 2 == b32.features.element_size()
    d32, d16 = b32.score(q, k=3), b16.score(q, k=3)
    assert d16.dtype == torch.float32 and (d16 - d32).abs().max() < 1e-3
    bf = kb.MemoryBank(dtype="fp16", search="bf16").fit(pts)
    assert (bf.score(q) - b32.score(q)).abs().max() < 0.02


def test_fp16_knn_model_file_round_trip(tmp_path):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from apmask_lib.weights import build_backbone

        backbone = truncated_backbone(build_backbone("random:vit_tiny16", seed=0), 1)
    bank = unit(torch.randn(4000, backbone.embed_dim, generator=torch.Generator().manual_seed(5)))
    m32 = KnnDetector(backbone, (64,), [bank])
    m16 = load_knn_model(save_knn_model(tmp_path / "m16.pt", KnnDetector(backbone, (64,), [bank], bank_dtype="fp16")))
    p32 = save_knn_model(tmp_path / "m32.pt", m32)
    assert m16.bank(64).dtype == torch.float16 and m16.settings()["bank_dtype"] == "fp16"
    assert load_knn_model(p32).settings()["bank_dtype"] == "fp32"
    assert (tmp_path / "m16.pt").stat().st_size < 0.75 * p32.stat().st_size
    x = torch.rand(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(torch.sigmoid(m16(x).seg_logits), torch.sigmoid(m32(x).seg_logits), atol=1e-3, rtol=0)
    with pytest.raises(ValueError, match="bank_dtype"):
        KnnDetector(backbone, (64,), [bank], bank_dtype="int8")


def test_fit_check_reads_models_fitted_before_the_bank_settings_existed():
    cfg = replace(Config(), evaluate={"knn_bank_max": None, "knn_bank_dtype": "fp32"})  # what such a model used
    old = cfg.to_dict()
    for key in ("knn_bank_max", "knn_bank_dtype"):
        del old["evaluate"][key]           # a model file written before these keys
    cpu = torch.device("cpu")
    assert fit_changes(old, cfg, cpu) == []
    assert fit_changes(old, replace(cfg, evaluate={"knn_bank_max": 1000}), cpu) == ["evaluate.knn_bank_max"]
    assert fit_changes(old, replace(cfg, evaluate={"knn_bank_dtype": "fp16"}), cpu) == ["evaluate.knn_bank_dtype"]
    # settings that do not apply to the kNN model, or that it resolves, are no change
    assert fit_changes(old, replace(cfg, evaluate={"knn_layer": 7, "knn_sigma_at": "input", "scales": [224]}), cpu) == []
