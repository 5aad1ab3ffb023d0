"""Behaviour is pinned: fixed-seed runs give exactly the results recorded before the layers move.

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
        np.testing.assert_array_equal(arrays[key], expected_arrays[key], err_msg=key)
