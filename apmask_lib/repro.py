"""The pinned numerical environment that makes CPU runs reproduce bit for bit across machines.

Measured on the 2-core x86 CPU (``benchmarks/repro_check.py``; README, "Reproducibility"): the
same three demo pre-training steps give bitwise different losses and weights when only

* the number of intra-op threads changes (1 vs 2: ATen splits reductions and MKL splits GEMMs by
  thread, and float addition is not associative), or
* the CPU's vector ISA changes (``ATEN_CPU_CAPABILITY`` avx2 vs avx512: other kernels, other
  summation order), which is what differs between two machines with the same core count.

A difference in the last bit at step 0 grows through training (Sinkhorn, top-k masking, 100s of
steps) into different metrics. Pinning both -- a fixed thread count and the AVX2 code paths of
ATen, MKL (``MKL_CBWR``, conditional numerical reproducibility) and oneDNN -- removes both causes
on any x86-64 CPU with AVX2. Not covered: CUDA (other kernels entirely), other torch/MKL versions
(``requirements-lock.txt`` pins them) and non-x86 CPUs.

The variables are read when torch / MKL / OpenMP start, so they must be in the environment of the
process *before* it imports torch: :func:`pipeline_env` builds it for child processes
(``apmask demo`` -> ``dvc repro``, ``apmask notebook`` -> the papermill kernel), and
:func:`pin_process` applies it to the current process at the start of the ``apmask`` command line.
``APMASK_NUMERICS=native`` turns the pinning off (all cores, best ISA, results machine-dependent).
"""
from __future__ import annotations

import os
import sys
from typing import Mapping, MutableMapping

#: intra-op threads of every pipeline process (the reference machine has 2 cores; more threads on a
#: bigger machine would change the numbers, fewer on a 1-core machine only costs time)
THREADS = 2

#: environment that fixes the summation order (see the module docstring)
PINNED: dict[str, str] = {
    "OMP_NUM_THREADS": str(THREADS),
    "MKL_NUM_THREADS": str(THREADS),
    "ATEN_CPU_CAPABILITY": "avx2",      # ATen's vectorised CPU kernels
    "MKL_CBWR": "AVX2",                 # MKL's GEMM code path (conditional numerical reproducibility)
    "ONEDNN_MAX_CPU_ISA": "AVX2",       # oneDNN (convolutions, e.g. the patch embedding)
    "PYTHONHASHSEED": "0",              # set iteration order (no effect measured; removes a doubt)
}


def enabled(env: Mapping[str, str] | None = None) -> bool:
    """Pinning is on unless ``APMASK_NUMERICS=native``."""
    return (env if env is not None else os.environ).get("APMASK_NUMERICS", "pinned") != "native"


def pipeline_env(env: MutableMapping[str, str] | None = None) -> dict[str, str]:
    """A copy of ``env`` (default ``os.environ``) with :data:`PINNED` set (unless disabled);
    values the caller already set explicitly are replaced, so a run is pinned or it is native."""
    out = dict(os.environ if env is None else env)
    if enabled(out):
        out.update(PINNED)
    return out


def pin_process() -> bool:
    """Apply :data:`PINNED` to this process's environment (for itself and its children). Effective
    for torch only if torch is not imported yet; returns whether the process is pinned."""
    if not enabled():
        return False
    os.environ.update(PINNED)
    if "torch" in sys.modules:
        import torch

        torch.set_num_threads(THREADS)
        return torch.backends.cpu.get_cpu_capability() == "AVX2"
    return True


def describe() -> dict[str, object]:
    """What governs the numbers of this process (recorded in run folders / reports)."""
    import torch

    return {"numerics": "pinned" if enabled() else "native", "threads": torch.get_num_threads(),
            "cpu_capability": torch.backends.cpu.get_cpu_capability(), "torch": torch.__version__,
            **{k: os.environ.get(k) for k in PINNED}}


__all__ = ["THREADS", "PINNED", "enabled", "pipeline_env", "pin_process", "describe"]
