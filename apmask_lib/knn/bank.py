"""The memory bank of the kNN extension (NOT part of the paper): nearest-neighbour search, coreset
subsampling and storage precision.

Search (:func:`knn_distances`): EXACT brute force as fp32 BLAS matrix products, one
(query chunk x bank chunk) similarity block at a time, reused, with a row maximum for k = 1: time
linear in the bank size, working memory bounded whatever the bank size. ``search="bf16"``
chooses the neighbours on bf16 products and recomputes their distances in fp32 (an opt-in
approximation, ``evaluate.knn_search``).

Coreset (:func:`greedy_coreset`, :func:`random_coreset`): subsampling of the bank, PatchCore's
answer to banks that grow with the training set (Roth et al., CVPR 2022, Sec. 3.2). ``greedy`` is
farthest-point selection (k-center greedy: each kept patch is the one farthest from those kept so
far, on a seeded random projection to 128 dimensions), computed in rounds so that it runs as matrix
products instead of one pass over the bank per kept patch; ``random`` is a uniform sample. How many
patches are kept: ``ceil(coreset * M)``, at most ``max_patches`` (``evaluate.knn_coreset``,
``evaluate.knn_bank_max``).

Storage (``dtype``, ``evaluate.knn_bank_dtype``): ``fp32`` or ``fp16``. An fp16 bank halves memory
and the model file; the search still multiplies in fp32 (each bank chunk is converted as it is
used), so the only change is the rounding of the stored unit vectors (relative 2^-11 per component,
distances move by about 1e-4: tests/test_knn_bank.py, results/knn_bank.md).

torch only; no files, no loops over data sets.
"""
from __future__ import annotations

import math
from typing import Optional, Sequence

import torch
import torch.nn.functional as F

CORESET_METHODS = ("greedy", "random")
SEARCHES = ("exact", "bf16")
BANK_DTYPES = {"fp32": torch.float32, "fp16": torch.float16}
QUERY_CHUNK, BANK_CHUNK = 1024, 4096


@torch.no_grad()
def knn_distances(queries: torch.Tensor, bank: torch.Tensor, k: int = 1, query_chunk: int = QUERY_CHUNK,
                  bank_chunk: int = BANK_CHUNK, search: str = "exact",
                  bank16: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Cosine distances 1 - <q, m> of each query to its ``k`` nearest bank rows, ascending.

    queries (Q, C), bank (M, C) (fp32 or fp16), both l2-normalised. Returns (Q, k) in the queries'
    dtype. Brute force as BLAS matrix products, one ``query_chunk x bank_chunk`` similarity block at
    a time (memory O(query_chunk * bank_chunk) whatever the bank size, time O(Q * M * C)); an fp16
    bank is converted to the queries' dtype one chunk at a time.

    ``search="exact"`` (default): fp32 products; for k = 1 each block is reduced with a row maximum
    (one pass, no sort), for k > 1 with ``topk`` and a running merge. The result does not depend on
    the chunk sizes beyond float rounding of the dot products (tests/test_knn.py checks both paths
    against scikit-learn's brute-force search).

    ``search="bf16"`` (an APPROXIMATION, opt-in): candidate neighbours are CHOSEN on bf16 products
    (AMX / AVX512-BF16 kernels on CPUs that have them): the best ``k`` rows of every bank chunk (k = 1:
    the row maximum), of these the ``k + 3`` best (the 3 extra absorb ties of the coarse bf16 values);
    their similarities are recomputed in fp32 and the best ``k`` kept. Each returned value is thus the
    fp32 distance to a real bank row; it can only exceed the exact k-th distance where bf16 rounding
    (about 4e-3 in similarity) left the true neighbour out of the candidates (a tie inside a chunk, or
    more than k + 3 close chunk winners), and it can depend on the chunk sizes there.
    ``bank16``: the bank already in bf16 (:class:`MemoryBank` keeps it), else converted here.
    Quality cost and speed: results/knn_speed.md."""
    if search not in SEARCHES:
        raise ValueError(f"search must be one of {SEARCHES}, got {search!r}")
    if queries.dim() != 2 or bank.dim() != 2 or queries.shape[1] != bank.shape[1]:
        raise ValueError(f"queries (Q, C) and bank (M, C) must share C, got {tuple(queries.shape)}, {tuple(bank.shape)}")
    if not 1 <= k <= bank.shape[0]:
        raise ValueError(f"k must lie in [1, bank size {bank.shape[0]}], got {k}")
    bank = bank.to(queries.device)
    qc, bc = max(1, int(query_chunk)), max(1, int(bank_chunk))
    out = torch.empty(queries.shape[0], k, dtype=queries.dtype, device=queries.device)
    if search == "bf16":
        _bf16_search(queries, bank, k, qc, bc, bank16, out)
        return out
    sim = None  # one preallocated similarity block, reused
    for qs in range(0, queries.shape[0], qc):
        q = queries[qs:qs + qc]
        best = None  # (q, k) largest similarities so far, descending
        for bs in range(0, bank.shape[0], bc):
            b = bank[bs:bs + bc].to(queries.dtype)
            if sim is None or sim.shape[0] < q.shape[0] or sim.shape[1] < b.shape[0]:
                sim = torch.empty(q.shape[0], max(b.shape[0], min(bc, bank.shape[0])), dtype=queries.dtype,
                                  device=queries.device)
            block = sim[:q.shape[0], :b.shape[0]]
            torch.mm(q, b.T, out=block)
            if k == 1:
                top = block.amax(dim=1, keepdim=True)
                best = top if best is None else torch.maximum(best, top)
            else:
                top = block.topk(min(k, block.shape[1]), dim=1).values
                best = top if best is None else torch.cat([best, top], dim=1).topk(
                    min(k, best.shape[1] + top.shape[1]), dim=1).values
        out[qs:qs + q.shape[0]] = (1.0 - best).clamp_min_(0.0)
    return out


def _bf16_search(queries, bank, k, qc, bc, bank16, out) -> None:
    """``knn_distances(search="bf16")`` into ``out`` (its docstring)."""
    bank16 = bank.bfloat16() if bank16 is None else bank16.to(queries.device)
    n_cand = min(k + 3, bank.shape[0])
    for qs in range(0, queries.shape[0], qc):
        q = queries[qs:qs + qc]
        q16 = q.bfloat16()
        vals, idxs = [], []  # per bank chunk: its best min(k, chunk) bf16 similarities and bank rows
        for bs in range(0, bank.shape[0], bc):
            block = torch.mm(q16, bank16[bs:bs + bc].T)
            if k == 1:
                v, i = block.max(dim=1, keepdim=True)  # one pass, cheaper than topk
            else:
                v, i = block.topk(min(k, block.shape[1]), dim=1)
            vals.append(v)
            idxs.append(i + bs)
        v, i = torch.cat(vals, 1), torch.cat(idxs, 1)
        if v.shape[1] > n_cand:  # the k + 3 best chunk winners are the candidates
            v, j = v.topk(n_cand, dim=1)
            i = i.gather(1, j)
        exact = torch.einsum("qc,qkc->qk", q, bank[i].to(q.dtype))  # fp32 similarities of the candidates
        out[qs:qs + q.shape[0]] = (1.0 - exact.topk(k, dim=1).values).clamp_min_(0.0)


def random_coreset(n: int, count: int, seed: int = 0) -> torch.Tensor:
    """``count`` distinct indices of range(n), uniformly at random (seeded), sorted."""
    if not 1 <= count <= n:
        raise ValueError(f"coreset size must lie in [1, {n}], got {count}")
    g = torch.Generator().manual_seed(int(seed))
    return torch.randperm(n, generator=g)[:count].sort().values


def _sq_distances(x: torch.Tensor, sq: torch.Tensor, centers: torch.Tensor) -> torch.Tensor:
    """Squared Euclidean distances (N, A) of rows of ``x`` (with squared norms ``sq``) to ``centers``."""
    d = torch.addmm(sq[:, None], x, centers.T, alpha=-2.0)
    return d.add_(centers.pow(2).sum(dim=1)[None]).clamp_min_(0.0)


def _accept_round(mind: torch.Tensor, x: torch.Tensor, sq: torch.Tensor, want: int, candidates: int) -> torch.Tensor:
    """The next ``<= want`` farthest-point picks, exactly as one-at-a-time greedy would make them.

    The ``b`` points farthest from the kept set are the candidates; ``t`` is the largest distance of
    any other point. Picking a candidate only lowers the others' distances, so the best candidate,
    its distance updated by the picks of this round, is greedy's next pick as long as it is still
    >= t; the round stops at the first that is not."""
    b = min(candidates, want, mind.shape[0])
    vals, idx = mind.topk(min(b + 1, mind.shape[0]))
    thresh = float(vals[b]) if vals.shape[0] > b else -math.inf
    cand, cm = idx[:b], vals[:b].clone()
    pair = _sq_distances(x[cand], sq[cand], x[cand])
    picks = []
    while len(picks) < b:
        j = int(cm.argmax())
        if picks and float(cm[j]) < thresh:
            break
        picks.append(j)
        torch.minimum(cm, pair[j], out=cm)
        cm[j] = -math.inf
    return cand[picks]


@torch.no_grad()
def greedy_coreset(features: torch.Tensor, count: int, seed: int = 0, proj_dim: Optional[int] = 128,
                   candidates: int = 1024, chunk: int = 65536) -> torch.Tensor:
    """PatchCore's approximate greedy coreset (k-center greedy): ``count`` indices of ``features``
    (M, C), each new one the point farthest (Euclidean) from those chosen so far, on a seeded Gaussian
    random projection to ``proj_dim`` dimensions (None: no projection), from a seeded random start.

    Computed in rounds (:func:`_accept_round`): each round takes up to ``candidates`` picks that
    one-at-a-time greedy would make in the same order, then updates every point's distance to the
    kept set with one matrix product per ``chunk`` rows. The picks equal one-at-a-time greedy's but
    for ties and float rounding of the distances; the covering radius is thus within twice the optimal
    k-center radius on the projected points (Gonzalez 1985). Time O(M * count * proj_dim) as matrix
    products, memory O(M * proj_dim + chunk * candidates + candidates^2). ``candidates`` = 1024: on bottle's
    block-7 patches a round then keeps about 210 picks (256: 110, 4096: 300), fastest of those tried.
    Returns the indices sorted."""
    m = features.shape[0]
    if not 1 <= count <= m:
        raise ValueError(f"coreset size must lie in [1, {m}], got {count}")
    g = torch.Generator().manual_seed(int(seed))
    x = features.float()
    if proj_dim is not None and proj_dim < x.shape[1]:
        proj = torch.randn(x.shape[1], proj_dim, generator=g).to(x.device) / math.sqrt(proj_dim)
        x = x @ proj
    x = x.contiguous()
    sq = x.pow(2).sum(dim=1)
    new = torch.randint(m, (1,), generator=g).to(x.device)
    kept = [new]
    n_kept = 1
    mind = torch.full((m,), math.inf, device=x.device)
    while True:
        centers = x[new]
        for s in range(0, m, chunk):
            d = _sq_distances(x[s:s + chunk], sq[s:s + chunk], centers).amin(dim=1)
            torch.minimum(mind[s:s + chunk], d, out=mind[s:s + chunk])
        mind[new] = -1.0  # kept: below every distance, never picked again
        if n_kept >= count:
            break
        new = _accept_round(mind, x, sq, count - n_kept, candidates)
        kept.append(new)
        n_kept += new.shape[0]
    return torch.cat(kept).cpu().sort().values


def coreset_size(n: int, fraction: float = 1.0, max_patches: Optional[int] = None) -> int:
    """Patches a bank of ``n`` keeps: ``ceil(fraction * n)``, at most ``max_patches`` (None: no cap)."""
    count = max(1, math.ceil(float(fraction) * n))
    return count if max_patches is None else max(1, min(count, int(max_patches)))


class MemoryBank:
    """Bank of normal patch features and nearest-neighbour scoring (module docstring).

    coreset: fraction of the fitted patches kept (1.0 = all); max_patches: at most this many kept
    (None = no cap); coreset_method: "greedy" | "random"; seed: for the coreset; dtype: "fp32" | "fp16"
    storage; query_chunk, bank_chunk: block sizes of the distance computation; search: "exact" (fp32,
    default) | "bf16" (neighbours chosen on bf16 products, :func:`knn_distances`)."""

    def __init__(self, coreset: float = 1.0, coreset_method: str = "greedy", seed: int = 0,
                 query_chunk: int = QUERY_CHUNK, bank_chunk: int = BANK_CHUNK, search: str = "exact",
                 max_patches: Optional[int] = None, dtype: str = "fp32"):
        if search not in SEARCHES:
            raise ValueError(f"search must be one of {SEARCHES}, got {search!r}")
        if not 0.0 < coreset <= 1.0:
            raise ValueError(f"coreset ratio must lie in (0, 1], got {coreset}")
        if coreset_method not in CORESET_METHODS:
            raise ValueError(f"coreset_method must be one of {CORESET_METHODS}, got {coreset_method!r}")
        if max_patches is not None and int(max_patches) < 1:
            raise ValueError(f"max_patches must be >= 1 (or None), got {max_patches}")
        if dtype not in BANK_DTYPES:
            raise ValueError(f"bank dtype must be one of {tuple(BANK_DTYPES)}, got {dtype!r}")
        self.search, self.dtype = search, dtype
        self.coreset, self.coreset_method, self.seed = float(coreset), coreset_method, int(seed)
        self.max_patches = None if max_patches is None else int(max_patches)
        self.query_chunk, self.bank_chunk = int(query_chunk), int(bank_chunk)
        self.features: Optional[torch.Tensor] = None
        self.features16: Optional[torch.Tensor] = None
        self.n_fitted = 0

    def __len__(self) -> int:
        return 0 if self.features is None else int(self.features.shape[0])

    @torch.no_grad()
    def fit(self, features: torch.Tensor | Sequence[torch.Tensor],
            device: torch.device | str | None = None) -> "MemoryBank":
        """features: (M, C) (or a list of (M_i, C) / (B, N, C) blocks, concatenated) normal patch
        features; they are l2-normalised here, subsampled to :func:`coreset_size` rows (chosen on the
        fp32 features) and stored in ``dtype``. The bank lives on ``device`` (default: that of the
        features), where :meth:`score` should be called."""
        if not torch.is_tensor(features):
            features = torch.cat([f.reshape(-1, f.shape[-1]) for f in features])
        features = features.reshape(-1, features.shape[-1])
        if features.shape[0] == 0:
            raise ValueError("cannot fit a memory bank on zero patches")
        if device is not None:
            features = features.to(device)
        feats = F.normalize(features.float(), dim=-1)
        self.n_fitted = feats.shape[0]
        count = coreset_size(self.n_fitted, self.coreset, self.max_patches)
        if count < self.n_fitted:
            idx = (greedy_coreset(feats, count, self.seed) if self.coreset_method == "greedy"
                   else random_coreset(self.n_fitted, count, self.seed))
            feats = feats[idx.to(feats.device)]
        self.features = feats.to(BANK_DTYPES[self.dtype]).contiguous()
        self.features16 = self.features.bfloat16() if self.search == "bf16" else None
        return self

    def score(self, features: torch.Tensor, k: int = 1) -> torch.Tensor:
        """features (B, N, C) (or (N, C)) -> (B, N) (or (N,)) mean cosine distance to the ``k``
        nearest bank patches (k = 1: the nearest)."""
        if self.features is None:
            raise RuntimeError("MemoryBank.score() before fit()")
        shape = features.shape[:-1]
        q = F.normalize(features.reshape(-1, features.shape[-1]).float(), dim=-1)
        d = knn_distances(q, self.features, k, self.query_chunk, self.bank_chunk, self.search, self.features16)
        return d.mean(dim=1).reshape(shape)


__all__ = ["CORESET_METHODS", "SEARCHES", "BANK_DTYPES", "QUERY_CHUNK", "BANK_CHUNK", "knn_distances",
           "random_coreset", "greedy_coreset", "coreset_size", "MemoryBank"]
