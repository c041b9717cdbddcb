"""The pinned numerical environment that makes CPU runs reproduce bit for bit across machines.

Measured on the 2-core x86 CPU (``benchmarks/repro_check.py``; docs/reproducibility.md): the
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

**Intel and AMD CPUs give different numbers under the default pinning.** MKL honours the AVX2 branch of
``MKL_CBWR`` on Intel CPUs only: on an AMD EPYC, ``MKL_VERBOSE=1`` reports ``CNR:AUTO`` for
``MKL_CBWR=AVX2`` (and for every other branch but COMPATIBLE), so MKL picks its own GEMM path there
(``tests/test_reproducibility.py`` checks which branch MKL runs). Runs reproduce bit for bit among Intel
CPUs and, as far as measured, among AMD CPUs of one kind, not between the two (measured on the demo: docs/reproducibility.md,
"Intel vs AMD"). ``APMASK_NUMERICS=compatible`` adds ``MKL_CBWR=COMPATIBLE``, the one branch MKL
documents as giving the same results on Intel and non-Intel x86 CPUs and honours on both (about 3x
slower matrix products on the 2-core EPYC); not the default, and not yet checked on an Intel CPU here.
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


#: ``APMASK_NUMERICS`` values: pinned (the default), compatible (pinned + MKL's cross-vendor branch), native
MODES = ("pinned", "compatible", "native")


def mode(env: Mapping[str, str] | None = None) -> str:
    """The numerics mode of ``env`` (default ``os.environ``): ``APMASK_NUMERICS``, default ``pinned``."""
    value = (env if env is not None else os.environ).get("APMASK_NUMERICS", "pinned")
    if value not in MODES:
        raise ValueError(f"APMASK_NUMERICS={value!r}: choose one of {', '.join(MODES)}")
    return value


def enabled(env: Mapping[str, str] | None = None) -> bool:
    """Pinning is on unless ``APMASK_NUMERICS=native``."""
    return mode(env) != "native"


def settings(env: Mapping[str, str] | None = None) -> dict[str, str]:
    """The variables the mode of ``env`` sets: :data:`PINNED`, with ``MKL_CBWR=COMPATIBLE`` in
    ``compatible`` mode; empty for ``native``."""
    m = mode(env)
    return {} if m == "native" else {**PINNED, **({"MKL_CBWR": "COMPATIBLE"} if m == "compatible" else {})}


def pipeline_env(env: MutableMapping[str, str] | None = None) -> dict[str, str]:
    """A copy of ``env`` (default ``os.environ``) with :func:`settings` applied; values the caller
    already set explicitly are replaced, so a run is pinned (or compatible) or it is native."""
    out = dict(os.environ if env is None else env)
    out.update(settings(out))
    return out


def pin_process() -> bool:
    """Apply :func:`settings` to this process's environment (for itself and its children). Effective
    for torch only if torch is not imported yet; returns whether the process is pinned."""
    if not enabled():
        return False
    os.environ.update(settings())
    if "torch" in sys.modules:
        import torch

        torch.set_num_threads(THREADS)
        return torch.backends.cpu.get_cpu_capability() == "AVX2"
    return True


def describe() -> dict[str, object]:
    """What governs the numbers of this process, for reports and tests (not written into run folders or
    ``results/``, which would then differ by machine)."""
    import torch

    from .machine import cpu_vendor

    vendor = cpu_vendor()
    cbwr = os.environ.get("MKL_CBWR")
    return {"numerics": mode(), "threads": torch.get_num_threads(),
            "cpu_capability": torch.backends.cpu.get_cpu_capability(), "torch": torch.__version__,
            "cpu_vendor": vendor,
            # MKL runs a requested MKL_CBWR branch other than COMPATIBLE on Intel CPUs only (module docstring)
            "mkl_cbwr_effective": (cbwr if cbwr in (None, "COMPATIBLE") or vendor == "GenuineIntel"
                                   else f"AUTO ({cbwr} ignored on {vendor})"),
            **{k: os.environ.get(k) for k in PINNED}}


__all__ = ["THREADS", "PINNED", "MODES", "mode", "enabled", "settings", "pipeline_env", "pin_process", "describe"]
