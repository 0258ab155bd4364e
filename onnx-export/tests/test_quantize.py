"""The quantizers work a slab of rows at a time: the slab size must not change a byte."""

from __future__ import annotations

import numpy as np
import pytest

from qwen2_export import quantize


@pytest.mark.parametrize("name", ["quantize_int8_rows", "quantize_int8_blocks", "quantize_int4_blocks"])
def test_slabs_give_the_bytes_of_one_pass(name, monkeypatch):
    rng = np.random.default_rng(7)
    w = rng.standard_normal((53, 300)).astype(np.float32)  # 300: padding in every block layout
    w[5] = 0.0  # an all-zero row
    fn = getattr(quantize, name)
    whole = fn(w)
    monkeypatch.setattr(quantize, "SLAB_ROWS", 7)
    slabs = fn(w)
    for a, b in zip(whole, slabs):
        assert a.dtype == b.dtype and a.shape == b.shape
        assert np.array_equal(a, b)
