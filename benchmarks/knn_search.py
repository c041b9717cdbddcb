"""Exact nearest-neighbour search: the previous implementation vs the current one (not a test).

On real bottle patch features at 448 px (the cache ``benchmarks/knn_speed.py --scaling`` writes),
times ``knn_distances`` as it was before issue 16 (4096 x 65536 similarity blocks reduced with
``topk`` and a running ``cat + topk`` merge, even for k = 1) against the current one (1024 x 32768
blocks written into one reused buffer, reduced with a row maximum for k = 1), alternating in
``--rounds`` rounds, and checks both return the same distances. Writes results/knn_search.{md,json}::

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
from apmask_lib.knn import knn_distances  # noqa: E402
from apmask_lib.files import atomic_write_text  # noqa: E402


@torch.no_grad()
def previous_knn_distances(queries, bank, k=1, query_chunk=4096, bank_chunk=65536):
    """``apmask_lib.knn.knn_distances`` before issue 16 (verbatim logic), for the comparison."""
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


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--cache", type=Path, default=ROOT / "runs" / "knn_speed" / "bottle_scaling.pt")
    ap.add_argument("--queries", type=int, default=8192)
    ap.add_argument("--bank", type=int, default=65536)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--out", type=Path, default=ROOT / "results" / "knn_search.md")
    args = ap.parse_args(argv)
    c = torch.load(args.cache, weights_only=True, mmap=True)
    bank = c["train_448"].reshape(-1, c["train_448"].shape[-1])[:args.bank].clone()
    q = c["test_448"].reshape(-1, bank.shape[1])[:args.queries].clone()
    rows = []
    for r in range(args.rounds):
        for name, fn in (("previous", previous_knn_distances), ("current", knn_distances)):
            for k in (1, 3):
                load = os.getloadavg()[0]
                t0 = time.perf_counter()
                d = fn(q, bank, k)
                rows.append({"round": r + 1, "impl": name, "k": k, "s": time.perf_counter() - t0, "load": load})
                if name == "current":
                    ref = previous_knn_distances(q, bank, k)
                    rows[-1]["max_abs_diff_vs_previous"] = float((d - ref).abs().max())
    # bf16 similarities (AMX / AVX-512 BF16): their error against fp32 on the same block, and the
    # median nearest-neighbour distance it has to be compared with
    sim32 = q[:2048] @ bank.T
    err = float(((q[:2048].bfloat16() @ bank.bfloat16().T).float() - sim32).abs().max())
    nn = float((1.0 - sim32.amax(dim=1)).median())
    del sim32
    cmd = ".venv/bin/python -m benchmarks.knn_search " + " ".join(
        shlex.quote(a) for a in (argv if argv is not None else sys.argv[1:]))
    lines = ["# Exact kNN search: previous vs current implementation", "",
             f"Generated {dt.datetime.now().isoformat(timespec='seconds')} by `benchmarks/knn_search.py`.", "",
             f"Command: `{cmd}`", "", f"Machine: {machine('cpu')} (shared with other jobs: 1-min load average per row).", "",
             f"Real bottle block-7 patch features at 448 px: {q.shape[0]} test queries x {bank.shape[0]} bank patches "
             f"x {bank.shape[1]} dims, fp32.", "",
             "| round | k | previous | current | speed-up | max abs difference | load |", "|---|---|---|---|---|---|---|"]
    for r in range(1, args.rounds + 1):
        for k in (1, 3):
            p = next(x for x in rows if x["round"] == r and x["k"] == k and x["impl"] == "previous")
            n = next(x for x in rows if x["round"] == r and x["k"] == k and x["impl"] == "current")
            lines.append(f"| {r} | {k} | {p['s']:.2f} s | {n['s']:.2f} s | {p['s'] / n['s']:.2f}x | "
                         f"{n['max_abs_diff_vs_previous']:.1e} | {p['load']:.1f} / {n['load']:.1f} |")
    lines += ["", f"bf16 similarities (first 2048 queries): max |bf16 - fp32| = {err:.1e}, against a median "
              f"nearest-neighbour distance of {nn:.4f} on the same queries, so bf16 is not used for the search."]
    atomic_write_text(args.out.with_suffix(".json"), json.dumps({"command": cmd, "rows": rows, "bf16_max_abs_err": err,
                                                                 "median_nn_distance": nn}, indent=2) + "\n")
    atomic_write_text(args.out, "\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
