"""A run gives the same numbers whatever the machine's thread count and vector ISA.

Two micro pipelines (demo data, tiny random ViT, pretrain -> finetune -> evaluate through the
``apmask`` command line) run in fresh processes whose environments differ the way two machines
differ: 1 vs 2 OpenMP/MKL threads, and ATen's generic vs AVX2 kernels. Under the pinned numerics
(:mod:`apmask_lib.core.repro`, the default) every logged loss, the weights (bitwise) and every metric
must be equal exactly.
The guard runs the same pair with ``APMASK_NUMERICS=native`` and shows the comparison can fail:
there the pre-trained weights differ bitwise (the effect behind issue 12's irreproducible demo).
"""
from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks.behaviour_check import tensor_digest

ROOT = Path(__file__).resolve().parents[1]

TINY = ["backbone=random:vit_tiny16", "device=cpu", "data.image_size=64", "data.max_train=8", "data.max_test=1",
        "pretrain.epochs=1", "pretrain.batch_size=4", "pretrain.global_size=64", "pretrain.local_size=32",
        "pretrain.n_local=2", "pretrain.hidden_dim=64", "pretrain.num_workers=0", "pretrain.warmup_epochs=0",
        "pretrain.log_every=1", "finetune.epochs=1", "finetune.batch_size=4", "finetune.num_workers=0",
        "finetune.warmup_epochs=0", "finetune.log_every=1", "evaluate.scales=[64]", "evaluate.batch_size=4"]

#: two "machines": thread count and ATen ISA differ
MACHINES = {"a": {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "ATEN_CPU_CAPABILITY": "default"},
            "b": {"OMP_NUM_THREADS": "2", "MKL_NUM_THREADS": "2", "ATEN_CPU_CAPABILITY": "avx2"}}


def _run(tmp: Path, name: str, numerics: str, data_root: Path) -> dict:
    out = tmp / name
    sets = [f"out_dir={out}", f"data.root={data_root}", "data.category=grass", *TINY]
    args = [a for s in sets for a in ("-S", s)]
    script = ("import sys; from apmask_lib.cli import main\n"
              "for cmd in ('pretrain', 'finetune', 'evaluate'):\n"
              "    main([cmd, '--params', '', *sys.argv[1:]])\n"
              "from apmask_lib.core.repro import describe; import json; print('DESCRIBE', json.dumps(describe()))\n")
    env = {k: v for k, v in os.environ.items() if k not in ("APMASK_NUMERICS", "PYTHONHASHSEED")}
    env.update(MACHINES[name[-1]], APMASK_NUMERICS=numerics, PYTHONPATH=str(ROOT))
    r = subprocess.run([sys.executable, "-c", script, *args], cwd=tmp, env=env, capture_output=True, text=True,
                       timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    desc = json.loads(r.stdout.split("DESCRIBE", 1)[1])

    def losses(stage: str) -> list[str]:
        with (out / stage / "log.csv").open(newline="") as f:
            return [row["loss"] for row in csv.DictReader(f)]

    metrics = json.loads((out / "evaluate" / "metrics.json").read_text())
    return {"pretrain": losses("pretrain"), "finetune": losses("finetune"), "describe": desc,
            "weights": [tensor_digest(out / "pretrain" / "backbone.pt"), tensor_digest(out / "finetune" / "model.pt")],
            "metrics": {k: v for k, v in metrics.items() if isinstance(v, float)}}


@pytest.fixture(scope="module")
def demo_root(tmp_path_factory) -> Path:
    from apmask_lib.data import build_dataset

    root = tmp_path_factory.mktemp("demo")
    build_dataset("demo", root, "grass")
    return root


@pytest.mark.slow
def test_pinned_runs_agree_across_thread_counts_and_isa(tmp_path, demo_root):
    a = _run(tmp_path, "pinned_a", "pinned", demo_root)
    b = _run(tmp_path, "pinned_b", "pinned", demo_root)
    for r in (a, b):
        assert r["describe"]["threads"] == 2 and r["describe"]["cpu_capability"] == "AVX2", r["describe"]
    assert len(a["pretrain"]) == 2 and len(a["finetune"]) == 2
    assert a["pretrain"] == b["pretrain"]
    assert a["finetune"] == b["finetune"]
    assert a["weights"] == b["weights"], "pre-trained / fine-tuned weights differ bitwise"
    assert a["metrics"] == b["metrics"] and "image_auroc" in a["metrics"]


@pytest.mark.slow
def test_guard_native_numerics_differ(tmp_path, demo_root):
    """Without pinning the two environments give other numbers, so the test above can fail."""
    a = _run(tmp_path, "native_a", "native", demo_root)
    b = _run(tmp_path, "native_b", "native", demo_root)
    assert (a["describe"]["threads"], b["describe"]["threads"]) == (1, 2)
    assert a["weights"][0] != b["weights"][0], "pre-trained weights equal without pinning: the guard shows nothing"


def test_equal_checkpoints_are_equal_files(tmp_path):
    """save_checkpoint's bytes depend on the content only (not on its temporary file name)."""
    import torch

    from apmask_lib.core.files import save_checkpoint

    for name in ("a", "b"):
        save_checkpoint(tmp_path / name / "model.pt", state_dict={"w": torch.arange(6.0)}, meta={"step": 3})
    assert (tmp_path / "a" / "model.pt").read_bytes() == (tmp_path / "b" / "model.pt").read_bytes()


@pytest.mark.parametrize("numerics", ["pinned", "compatible"])
@pytest.mark.slow
def test_mkl_runs_the_branch_the_mode_asks_for_where_it_can(numerics):
    """MKL reports the code path of each GEMM (``MKL_VERBOSE``). ``compatible`` asks for MKL_CBWR=COMPATIBLE,
    which MKL honours on every x86 CPU; ``pinned`` asks for AVX2, which MKL honours on Intel CPUs only and
    replaces by AUTO elsewhere (why Intel- and AMD-made results differ; apmask_lib/core/repro.py). Fails when MKL
    stops doing what the module docstring and ``describe()['mkl_cbwr_effective']`` say."""
    from apmask_lib.core import repro
    from apmask_lib.core.machine import cpu_vendor

    env = repro.pipeline_env({**{k: v for k, v in os.environ.items() if not k.startswith("MKL_")},
                              "APMASK_NUMERICS": numerics})
    env["MKL_VERBOSE"] = "1"
    script = ("import torch, json; torch.randn(64, 384) @ torch.randn(384, 128)\n"
              "from apmask_lib.core.repro import describe; print('EFFECTIVE', describe()['mkl_cbwr_effective'])\n")
    r = subprocess.run([sys.executable, "-c", script], cwd=ROOT, env={**env, "PYTHONPATH": str(ROOT)},
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    branch = next(w for w in r.stdout.split() if w.startswith("CNR:")).removeprefix("CNR:")
    effective = r.stdout.split("EFFECTIVE", 1)[1].strip()
    if numerics == "compatible":
        assert branch == "COMPATIBLE" and effective == "COMPATIBLE"
    elif cpu_vendor() == "GenuineIntel":
        assert branch == "AVX2" and effective == "AVX2"
    else:
        assert branch == "AUTO" and effective.startswith("AUTO (AVX2 ignored")


def test_unknown_numerics_mode_is_refused():
    from apmask_lib.core import repro

    with pytest.raises(ValueError, match="APMASK_NUMERICS='fast'"):
        repro.pipeline_env({"APMASK_NUMERICS": "fast"})
    assert repro.settings({"APMASK_NUMERICS": "native"}) == {}
    assert repro.settings({"APMASK_NUMERICS": "compatible"})["MKL_CBWR"] == "COMPATIBLE"
    assert repro.settings({})["MKL_CBWR"] == "AVX2"
    r = subprocess.run([sys.executable, "-m", "apmask_lib.cli", "data", "--help"], cwd=ROOT, capture_output=True,
                       text=True, env={**os.environ, "APMASK_NUMERICS": "fast", "PYTHONPATH": str(ROOT)}, timeout=120)
    assert r.returncode != 0 and r.stderr.strip() == "apmask: APMASK_NUMERICS='fast': choose one of pinned, compatible, native"
