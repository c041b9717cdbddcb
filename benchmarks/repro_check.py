"""Which environment settings change the numbers of a run? (docs/reproducibility.md)

Runs STEPS demo pre-training steps (params.yaml, demo brick, offline backbone) in a fresh process
per variant -- each variant changes one setting of the numerical environment -- and prints the
per-step losses (hex floats, exact) and an md5 over the pre-trained weights. Variants whose digest
equals the baseline's do not affect the numbers.

    .venv/bin/python -m benchmarks.repro_check --steps 3 --out results/repro_check.md

Not pinned here on purpose (the script calls run_pretrain directly, not through the `apmask`
command line, so apmask_lib.core.repro is not applied): it measures the raw effect of each setting.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmarks.common import ROOT, machine

CHILD = r"""
import hashlib, json, os, sys, tempfile, torch
if os.environ.get("T"):
    torch.set_num_threads(int(os.environ["T"]))
from apmask_lib.pretrain import stage as pretrain
from apmask_lib.config import load_params
losses = []
step = pretrain.train_step
def logged(*a, **k):
    loss = step(*a, **k); losses.append(float(loss)); return loss
pretrain.train_step = logged
out = tempfile.mkdtemp()
cfg = load_params("params.yaml", [f"out_dir={out}", "data.category=brick"])
pretrain.run_pretrain(cfg, max_steps=int(sys.argv[1]), progress=False)
sd = torch.load(f"{out}/pretrain/backbone.pt", weights_only=True)
digest = hashlib.md5(b"".join(sd[k].numpy().tobytes() for k in sorted(sd))).hexdigest()[:12]
print("RESULT", json.dumps({"threads": torch.get_num_threads(), "isa": torch.backends.cpu.get_cpu_capability(),
                            "losses": [x.hex() for x in losses], "weights_md5": digest}))
"""

#: name -> environment changes against the baseline (1 thread, the machine's default ISA)
VARIANTS = {
    "baseline (1 thread)": {"T": "1"},
    "2 threads": {"T": "2"},
    "PYTHONHASHSEED=7": {"T": "1", "PYTHONHASHSEED": "7"},
    "ATEN_CPU_CAPABILITY=avx2": {"T": "1", "ATEN_CPU_CAPABILITY": "avx2"},
    "ATEN_CPU_CAPABILITY=default": {"T": "1", "ATEN_CPU_CAPABILITY": "default"},
    "MKL_CBWR=AVX2": {"T": "1", "MKL_CBWR": "AVX2"},
    "ONEDNN_MAX_CPU_ISA=AVX2": {"T": "1", "ONEDNN_MAX_CPU_ISA": "AVX2"},
    "all AVX2, 1 thread": {"T": "1", "ATEN_CPU_CAPABILITY": "avx2", "MKL_CBWR": "AVX2", "ONEDNN_MAX_CPU_ISA": "AVX2"},
    "all AVX2, 2 threads": {"T": "2", "ATEN_CPU_CAPABILITY": "avx2", "MKL_CBWR": "AVX2", "ONEDNN_MAX_CPU_ISA": "AVX2"},
}


def run_variant(env_changes: dict[str, str], steps: int) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("ATEN_CPU_CAPABILITY", "MKL_CBWR", "ONEDNN_MAX_CPU_ISA")}
    env.update(env_changes, PYTHONPATH=str(ROOT))
    t0 = time.time()
    r = subprocess.run([sys.executable, "-c", CHILD, str(steps)], cwd=ROOT, env=env, capture_output=True, text=True)
    if r.returncode:
        raise RuntimeError(r.stderr[-2000:])
    res = json.loads(r.stdout.split("RESULT", 1)[1])
    res["seconds"] = round(time.time() - t0, 1)
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--out", default=None, help="Markdown report (default: print only)")
    args = ap.parse_args()
    machine_text = machine(load=True)
    rows = []
    for name, changes in VARIANTS.items():
        res = run_variant(changes, args.steps)
        rows.append((name, res))
        print(name, json.dumps(res), flush=True)
    base = rows[0][1]["weights_md5"]
    lines = [f"# Which settings change the numbers ({args.steps} demo pre-training steps)", "",
             f"Command: `.venv/bin/python -m benchmarks.repro_check --steps {args.steps}`. Machine: {machine_text}.", "",
             "| variant | threads | ATen ISA | step losses (hex) | weights md5 | equals baseline |", "|---|---|---|---|---|---|"]
    for name, r in rows:
        lines.append(f"| {name} | {r['threads']} | {r['isa']} | {' '.join(r['losses'])} | {r['weights_md5']} | "
                     f"{'yes' if r['weights_md5'] == base else 'no'} |")
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        Path(args.out).write_text(text)


if __name__ == "__main__":
    main()
