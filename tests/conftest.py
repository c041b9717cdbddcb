"""Shared fixtures. Real data lives in ../shared/data beside the project root.

Where it is absent (a user's clone) tests that need it skip with the reason; under CI
(CI=true) a missing ../shared/data is a failure, never a silent skip.
"""
from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("APMASK_SHARED_DATA", ROOT.parent / "shared" / "data"))

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


def _need(path: Path) -> Path:
    if not path.exists():
        msg = f"real data not found at {path} (expected ../shared/data beside the project root)"
        if os.environ.get("CI"):
            pytest.fail(msg + " -- CI must have it", pytrace=False)
        pytest.skip(msg)
    return path


@pytest.fixture(scope="session")
def shared_data() -> Path:
    return _need(SHARED_DATA)


@pytest.fixture(scope="session")
def mvtec_root() -> Path:
    """Folder holding the real MVTec AD category folders (only 'bottle' here)."""
    return _need(SHARED_DATA / "mvtec_ad" / "bottle").parent


@pytest.fixture(scope="session")
def nih_root() -> Path:
    return _need(SHARED_DATA / "nih_cxr14")


@pytest.fixture(scope="session")
def oracle_dir() -> Path:
    return _need(SHARED_DATA / "metric_oracles")


@pytest.fixture(scope="session")
def offline_backbone():
    """The real offline DINOv2 ViT-S/14 (converted once, cached)."""
    from apmask_lib.weights import build_backbone

    return build_backbone("dinov2-s14-offline").eval()
