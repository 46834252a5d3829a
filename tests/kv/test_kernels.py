"""The shared numba pieces: the vectorised exp against float64 ``exp``."""

from __future__ import annotations

import numpy as np
import pytest

from memfusion.kv import kernels

pytestmark = pytest.mark.skipif(not kernels.available(), reason="numba is a dependency; the kernels need it")


def test_exp_matches_float64_exp_and_masks_to_exact_zero() -> None:
    rng = np.random.default_rng(0)
    x = np.concatenate([-rng.random(20000) * 90, -rng.random(2000) * 1e-3, [0.0, -1e-30, -87.0, -200.0, -np.inf]])
    x = x.astype(np.float32)
    got = x.copy()
    from memfusion.kv.jitkernels import exp_shifted  # numba: imported by the test, not at collection

    exp_shifted(got, np.empty(len(x), dtype=np.int32))
    ref = np.exp(x.astype(np.float64))
    big = ref > 1e-37  # 2^-126 clamps below; such weights are negligible beside the max's weight 1
    rel = np.abs(got[big] - ref[big]) / ref[big]
    assert rel.max() < 5e-6
    near = x > -1.0  # where softmax weights matter most: within a few float32 ulps
    assert (np.abs(got[near] - ref[near]) / ref[near]).max() < 5e-7
    assert got[-1] == 0.0 and got[-5] == 1.0
    assert (got[~big] >= 0).all() and (got[~big] < 1.1e-37).all()
