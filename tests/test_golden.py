"""Behaviour is pinned: fixed-seed runs give the results recorded before the layers moved (to the last bit of float kernels).

See ``tests/golden_cases.py`` for the cases and how to regenerate them on purpose.
"""

import json

import numpy as np
import pytest

from golden_cases import GOLDEN_DIR, run_cases


@pytest.mark.slow
def test_fixed_seeds_reproduce_the_golden_outputs(tmp_path):
    expected_arrays = np.load(GOLDEN_DIR / "tiny.npz")
    expected_texts = json.loads((GOLDEN_DIR / "tiny.json").read_text())
    arrays, texts = run_cases(tmp_path)
    assert texts == expected_texts
    assert sorted(arrays) == sorted(expected_arrays.files)
    for key in expected_arrays.files:
        expected = expected_arrays[key]
        # Exact up to the last bit of float kernels, which differ between CPUs: a pixel may
        # round one level apart, a float by a ten-thousandth of the array's range.
        atol = 1 if expected.dtype == np.uint8 else 1e-4 * max(float(np.abs(expected).max()), 1e-12)
        np.testing.assert_allclose(arrays[key].astype(np.float64), expected.astype(np.float64), rtol=0,
                                   atol=atol, err_msg=key)
