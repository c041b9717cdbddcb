"""The kNN extension's fusion helpers (apmask_lib/knn/fusion.py); the extension end to end is in
tests/test_knn.py (run_evaluate with evaluate.knn_layer set)."""
from __future__ import annotations

import numpy as np
import pytest

from apmask_lib.knn import fusion as knn_fusion


def test_fusion_helpers():
    z = np.linspace(-1e4, 1e4, 10001)
    u = knn_fusion.squash(z)
    assert (np.diff(u) > 0).all() and u.min() > 0 and u.max() < 1 and knn_fusion.squash(0.0) == 0.5
    st = knn_fusion.RunningStats()
    v = np.random.default_rng(1).normal(3, 2, size=(7, 9))
    st.update(v[:3])
    st.update(v[3:])
    assert st.mean == pytest.approx(v.mean()) and st.std == pytest.approx(v.std(ddof=1))
    np.testing.assert_allclose(knn_fusion.standardise(v, st), (v - v.mean()) / v.std(ddof=1))
    np.testing.assert_allclose(knn_fusion.logit(np.array([0.5, 0.25])), [0.0, np.log(1 / 3)])
    h = knn_fusion.calibration_indices(209, 0.1)
    assert len(h) == 21 and h[0] == 0 and h[-1] == 208 and len(set(h.tolist())) == 21
    assert len(knn_fusion.calibration_indices(4, 0.1)) == 2 and len(knn_fusion.calibration_indices(2, 0.1)) == 1
    with pytest.raises(ValueError, match="at least 2"):
        knn_fusion.calibration_indices(1, 0.1)
