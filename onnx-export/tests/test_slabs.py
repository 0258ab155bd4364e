"""The exporter reads and quantizes a slab at a time: the slab size must not change a byte."""

from __future__ import annotations

import json
import struct

import numpy as np
import pytest

from qwen2_export import quantize, source_hf


@pytest.mark.parametrize("name", ["quantize_int8_rows", "quantize_int8_blocks", "quantize_int4_blocks"])
def test_slabs_give_the_bytes_of_one_pass(name, monkeypatch):
    rng = np.random.default_rng(7)
    w = rng.standard_normal((53, 300)).astype(np.float32)  # 300: padding in every block layout
    w[5] = 0.0  # an all-zero row
    fn = getattr(quantize, name)
    whole = fn(w)
    monkeypatch.setattr(quantize, "SLAB_ELEMENTS", 7 * 300)  # slabs of 7 rows
    slabs = fn(w)
    for a, b in zip(whole, slabs):
        assert a.dtype == b.dtype and a.shape == b.shape
        assert np.array_equal(a, b)


def test_bf16_slabs_give_the_values_of_one_pass(tmp_path, monkeypatch):
    rng = np.random.default_rng(3)
    bits = rng.integers(0, 2**16, size=(37, 11), dtype=np.uint16)
    bits[(bits & 0x7F80) == 0x7F80] = 0  # no NaN / inf patterns: compared with ==
    header = json.dumps({"w": {"dtype": "BF16", "shape": [37, 11], "data_offsets": [0, bits.nbytes]}}).encode()
    path = tmp_path / "model.safetensors"
    path.write_bytes(struct.pack("<Q", len(header)) + header + bits.tobytes())
    want = (bits.astype(np.uint32) << 16).view(np.float32)
    monkeypatch.setattr(source_hf, "SLAB_ELEMENTS", 5)
    got = source_hf._loader(source_hf._safetensors_index(path)["w"])()
    assert got.dtype == np.float32 and np.array_equal(got, want)
