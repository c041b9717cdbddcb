"""Nearest-neighbour search: block sizes, exact vs bf16, against the implementation before issue 16 (not a test).

On real bottle patch features at 448 px (the cache ``benchmarks/knn_speed.py --scaling`` writes),
times ``knn_distances`` as it was before issue 16 (4096 x 65536 similarity blocks reduced with
``topk`` and a running ``cat + topk`` merge, even for k = 1), the exact search with 1024 x 32768 and
1024 x 4096 blocks (written into one reused buffer, a row maximum for k = 1), and the bf16 search
(candidates chosen on bf16 products, re-ranked in fp32) with both block sizes, alternating the order in
``--rounds`` rounds, with each variant's difference from the exact distances. Writes
results/knn_search.{md,json}::

    .venv/bin/python -m benchmarks.knn_search --queries 8192 --bank 65536
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import shlex
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]

from benchmarks.common import machine  # noqa: E402
from apmask_lib.knn.scoring import knn_distances  # noqa: E402
from apmask_lib.core.files import atomic_write_text  # noqa: E402


@torch.no_grad()
def previous_knn_distances(queries, bank, k=1, query_chunk=4096, bank_chunk=65536):
    """``apmask_lib.knn.scoring.knn_distances`` before issue 16 (verbatim logic), for the comparison."""
    out = []
    for qs in range(0, queries.shape[0], query_chunk):
        q = queries[qs:qs + query_chunk]
        best = None
        for bs in range(0, bank.shape[0], bank_chunk):
            sim = q @ bank[bs:bs + bank_chunk].T
            kk = min(k, sim.shape[1])
            top = sim.topk(kk, dim=1).values
            best = top if best is None else torch.cat([best, top], dim=1).topk(min(k, best.shape[1] + kk), dim=1).values
        out.append((1.0 - best).clamp_min_(0.0))
    return torch.cat(out)


VARIANTS = {  # name: (function, search, bank block); the query block is 1024 except for "previous"
    "previous (before issue 16)": (previous_knn_distances, None, None),
    "exact, 1024 x 32768 blocks": (knn_distances, "exact", 32768),
    "exact, 1024 x 4096 blocks (current)": (knn_distances, "exact", 4096),
    "bf16, 1024 x 32768 blocks": (knn_distances, "bf16", 32768),
    "bf16, 1024 x 4096 blocks (current)": (knn_distances, "bf16", 4096),
}


def run_variant(name: str, q: torch.Tensor, bank: torch.Tensor, k: int, bank16: torch.Tensor) -> torch.Tensor:
    fn, search, bc = VARIANTS[name]
    if search is None:
        return fn(q, bank, k)
    return fn(q, bank, k, query_chunk=1024, bank_chunk=bc, search=search, bank16=bank16 if search == "bf16" else None)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--cache", type=Path, default=ROOT / "runs" / "knn_speed" / "bottle_scaling.pt")
    ap.add_argument("--queries", type=int, default=8192)
    ap.add_argument("--bank", type=int, default=65536)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--note", default=None, help="a sentence about the conditions of this run, kept in the report")
    ap.add_argument("--out", type=Path, default=ROOT / "results" / "knn_search.md")
    args = ap.parse_args(argv)
    c = torch.load(args.cache, weights_only=True, mmap=True)
    bank = c["train_448"].reshape(-1, c["train_448"].shape[-1])[:args.bank].clone()
    q = c["test_448"].reshape(-1, bank.shape[1])[:args.queries].clone()
    bank16 = bank.bfloat16()
    exact = {k: knn_distances(q, bank, k) for k in (1, 3)}
    rows = []
    for r in range(args.rounds):
        names = list(VARIANTS) if r % 2 == 0 else list(reversed(VARIANTS))
        for name in names:
            for k in (1, 3):
                load = os.getloadavg()[0]
                t0 = time.perf_counter()
                d = run_variant(name, q, bank, k, bank16)
                sec = time.perf_counter() - t0
                err = d - exact[k]
                rows.append({"round": r + 1, "impl": name, "k": k, "s": sec, "load": load,
                             "max_abs_diff_vs_exact": float(err.abs().max()),
                             "frac_above_exact_1e-6": float((err > 1e-6).float().mean()),
                             "mean_diff_vs_exact": float(err.mean())})
    # bf16 similarities (AMX / AVX-512 BF16): their error against fp32 on the same block, and the
    # median nearest-neighbour distance it has to be compared with
    sim32 = q[:2048] @ bank.T
    err = float(((q[:2048].bfloat16() @ bank.bfloat16().T).float() - sim32).abs().max())
    nn = float((1.0 - sim32.amax(dim=1)).median())
    del sim32
    cmd = ".venv/bin/python -m benchmarks.knn_search " + " ".join(
        shlex.quote(a) for a in (argv if argv is not None else sys.argv[1:]))
    lines = ["# kNN search: block sizes, exact vs bf16", "",
             f"Generated {dt.datetime.now().isoformat(timespec='seconds')} by `benchmarks/knn_search.py`.", "",
             f"Command: `{cmd}`", "", f"Machine: {machine('cpu')}; 1-min load average per row.", ""]
    lines += [f"Note: {args.note}", ""] if args.note else []
    lines += [f"Real bottle block-7 patch features at 448 px: {q.shape[0]} test queries x {bank.shape[0]} bank patches "
              f"x {bank.shape[1]} dims. Rounds alternate the order. Difference = returned distance minus the exact "
              "one (current exact search); the bf16 search returns the fp32 distance of the neighbour it chose, "
              "so it is never below the exact value beyond float rounding.", "",
              "| round | k | variant | time | max difference | queries above exact (> 1e-6) | mean difference | load |",
              "|---|---|---|---|---|---|---|---|"]
    for row in rows:
        lines.append(f"| {row['round']} | {row['k']} | {row['impl']} | {row['s']:.2f} s | {row['max_abs_diff_vs_exact']:.1e} | "
                     f"{100 * row['frac_above_exact_1e-6']:.1f} % | {row['mean_diff_vs_exact']:.1e} | {row['load']:.1f} |")
    lines += ["", f"bf16 similarities (first 2048 queries): max |bf16 - fp32| = {err:.1e}, against a median "
              f"nearest-neighbour distance of {nn:.4f} on the same queries: the bf16 search is an opt-in "
              "approximation (`evaluate.knn_search: bf16`), its effect on the metrics in results/knn_speed.md."]
    atomic_write_text(args.out.with_suffix(".json"), json.dumps({"command": cmd, "rows": rows, "bf16_max_abs_err": err,
                                                                 "median_nn_distance": nn, "note": args.note},
                                                                indent=2) + "\n")
    atomic_write_text(args.out, "\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
