"""The machine and software a number was measured on: one description for run folders
(``metrics.json``'s ``machine``) and for every benchmark report."""
from __future__ import annotations

import importlib
import os
import platform
from pathlib import Path
from typing import Any

import torch


def cpuinfo_field(name: str) -> str | None:
    """The value of the first ``name : value`` line of ``/proc/cpuinfo``, or None where the file or the
    field is missing."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return None
    return next((l.split(":", 1)[1].strip() for l in lines if l.startswith(name) and ":" in l), None)


def cpu_model() -> str:
    """The CPU's model name (for benchmark reports)."""
    return cpuinfo_field("model name") or platform.processor() or "unknown"


def cpu_vendor() -> str:
    """``vendor_id`` of ``/proc/cpuinfo`` (GenuineIntel, AuthenticAMD, ...; "unknown" where unreadable).
    MKL honours the ``MKL_CBWR`` code-path branches (AVX2, ...) on GenuineIntel only (apmask_lib/core/repro.py)."""
    return cpuinfo_field("vendor_id") or "unknown"


def cpu_flags() -> set[str]:
    """The CPU feature flags of ``/proc/cpuinfo`` (empty where it cannot be read)."""
    return set((cpuinfo_field("flags") or "").split())


BF16_UNITS = ("amx_bf16", "avx512_bf16")  # CPU units that run bf16 matrix products natively


def bf16_slow_reason() -> str | None:
    """Why bf16 matrix products would be SLOWER than fp32 on this process's CPU, or None: the CPU has no
    bf16 units (:data:`BF16_UNITS`), or the numerics are pinned to AVX2 (``ONEDNN_MAX_CPU_ISA`` /
    ``ATEN_CPU_CAPABILITY``, what ``apmask`` sets by default, apmask_lib/core/repro.py), which keeps oneDNN off
    them (measured: bf16 features about 5x slower than fp32 there, results/knn_speed.md)."""
    flags = cpu_flags()
    if flags and not any(f in flags for f in BF16_UNITS):
        return "this CPU has no bf16 units (no amx_bf16 / avx512_bf16 in /proc/cpuinfo)"
    if os.environ.get("ONEDNN_MAX_CPU_ISA", "").upper() == "AVX2" or torch.backends.cpu.get_cpu_capability() == "AVX2":
        return ("the numerics are pinned to AVX2 (apmask_lib/core/repro.py), which keeps oneDNN off the bf16 units; "
                "APMASK_NUMERICS=native lifts the pinning (results then depend on the machine)")
    return None


def machine_info(device: torch.device) -> dict[str, Any]:
    """Platform, python and torch versions, device (and its name on CUDA), cores and torch threads."""
    info = {"platform": platform.platform(), "python": platform.python_version(), "torch": torch.__version__,
            "device": str(device), "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads()}
    if device.type == "cuda":
        info["device_name"] = torch.cuda.get_device_name(device)
    return info


def machine_line(device: torch.device | str | None = None, load: bool = False) -> str:
    """One line for a report: CPU model, cores, torch threads, [device (+ GPU name)], [load average]."""
    text = f"{cpu_model()}, {os.cpu_count()} cores, torch threads {torch.get_num_threads()}"
    if device is not None:
        dev = torch.device(device)
        text += f", device {dev}" + (f" ({torch.cuda.get_device_name(dev)})" if dev.type == "cuda" else "")
    if load:
        text += f", load average at start {os.getloadavg()[0]:.1f}"
    return text


def versions(*packages: str) -> dict[str, str]:
    """``{"python": ..., "torch": ..., <package>: <its __version__>}`` for the named extra packages."""
    out = {"python": platform.python_version(), "torch": torch.__version__}
    for name in packages:
        out[name] = getattr(importlib.import_module(name), "__version__", "unknown")
    return out


def versions_line(*packages: str) -> str:
    """:func:`versions` as ``"python 3.11.9, torch 2.x, timm 1.x"``."""
    return ", ".join(f"{k} {v}" for k, v in versions(*packages).items())


__all__ = ["cpuinfo_field", "cpu_model", "cpu_vendor", "cpu_flags", "BF16_UNITS", "bf16_slow_reason", "machine_info", "machine_line", "versions", "versions_line"]
