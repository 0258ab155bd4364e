"""int4k, the 4-bit variant of GGUF's K-quant class (docs/bundle-format.md): its arrays read GGUF's Q4_K
blocks exactly as llama.cpp's own gguf package dequantizes them, its quantizer beats plain int4, and the
exporter keeps the tensors a GGUF's producer gave more bits at 8 bits."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import FIXTURES, load_json
from gguf import GGMLQuantizationType as Q
from gguf import quants
from gguf_maker import write_gguf

from qwen2_export.bundle import export, load_manifest
from qwen2_export.quantize import (KQ_SUPER, dequantize_int4_blocks, dequantize_int4k, int4k_from_q4_k,
                                   q4_k_from_int4k, quantize_int4_blocks, quantize_int4k)


def _random_q4_k(rng, rows: int, supers: int) -> np.ndarray:
    """Valid Q4_K rows: random nibbles and 6-bit codes, positive float16 super-block scales."""
    nb = supers * KQ_SUPER
    packed = rng.integers(0, 256, (rows, nb, 16), dtype=np.uint8)
    sc, m = (rng.integers(0, 64, (rows, nb), dtype=np.uint8) for _ in range(2))
    d, dmin = (rng.uniform(1e-4, 2e-3, (rows, supers)).astype(np.float16) for _ in range(2))
    return q4_k_from_int4k(packed, sc, m, d, dmin)


def test_q4_k_blocks_read_as_the_gguf_package_dequantizes_them():
    rng = np.random.default_rng(0)
    raw = _random_q4_k(rng, 5, 3)
    assert raw.shape == (5, 3 * 144)
    arrays = int4k_from_q4_k(raw)
    want = quants.dequantize(raw, Q.Q4_K).reshape(5, 3 * 256)
    np.testing.assert_array_equal(dequantize_int4k(*arrays, 3 * 256), want)
    # Nothing is lost on the way: the arrays give the very bytes back.
    np.testing.assert_array_equal(q4_k_from_int4k(*arrays), raw)


@pytest.mark.parametrize("shape", [(64, 896), (16, 48), (8, 4864)])
def test_searched_k_quantization_beats_plain_int4(shape):
    """Sub-blocks of 32 with a searched scale and min (6-bit codes under float16 super-block scales)
    against plain symmetric int4 (round to nearest from the block's extreme), on Gaussian weights with a
    few outliers, as trained matrices have. Measured: 0.71-0.77x int4's error."""
    rng = np.random.default_rng(1)
    w = (rng.standard_normal(shape) * 0.02).astype(np.float32)
    w[:, :: max(1, shape[1] // 7)] *= 6
    packed, sc, m, d, dmin = quantize_int4k(w)
    nb = -(-shape[1] // 32)
    assert packed.shape == (shape[0], nb, 16) and sc.shape == m.shape == (shape[0], nb)
    assert d.shape == dmin.shape == (shape[0], -(-nb // KQ_SUPER))  # a row's last super-block may be partial
    assert sc.max() <= 63 and m.max() <= 63
    got = dequantize_int4k(packed, sc, m, d, dmin, shape[1])
    plain = dequantize_int4_blocks(*quantize_int4_blocks(w), shape[1])
    err = np.sqrt(np.mean((got - w) ** 2))
    assert err <= 0.85 * np.sqrt(np.mean((plain - w) ** 2))


def test_a_gguf_producers_wider_types_stay_8_bit(tmp_path):
    """From a quantized GGUF, int4k keeps the tensors stored with more than 5 bits per weight (Q8_0) at
    int8 and makes 4-bit of those with fewer (Q5_0, Q4_0); float tensors (F16, F32) follow the checkpoint
    rule below (which picks nothing in a 2-layer model)."""
    types = {
        "model.layers.0.self_attn.v_proj.weight": Q.Q8_0,
        "model.layers.1.mlp.down_proj.weight": Q.F16,
        "model.layers.0.self_attn.q_proj.weight": Q.Q5_0,
        "model.layers.0.mlp.gate_proj.weight": Q.Q4_0,
    }
    gguf = write_gguf("tiny-tied", tmp_path / "m.gguf", types=types)
    out = export(gguf, tmp_path / "bundle", ["int4k"], ["portable"], log=lambda m: None)
    table = load_manifest(out)["variants"][0]["weights"]
    for name, spec in table.items():
        if name.startswith("model.layers.") and name.endswith("proj.weight"):
            wide = types.get(name) == Q.Q8_0
            assert spec["dtype"] == ("int8" if wide else "uint8"), name
            assert (spec["quant"].get("scheme") == "kquant") != wide, name


def test_checkpoints_keep_q4_k_m_sensitive_matrices_8_bit():
    """From a Hugging Face checkpoint: the value and down projections of the first and last eighth of the
    layers and of every third layer between are int8 (tiny-untied's 3 layers: layer 2's), the rest int4k."""
    manifest = load_json(FIXTURES / "tiny-untied" / "bundle" / "bundle.json")
    table = next(v for v in manifest["variants"] if v["name"] == "int4k")["weights"]
    for i in range(3):
        for proj in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                     "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"):
            spec = table[f"model.layers.{i}.{proj}.weight"]
            sensitive = i == 2 and proj in ("self_attn.v_proj", "mlp.down_proj")
            assert spec["dtype"] == ("int8" if sensitive else "uint8"), (i, proj)
    assert table["model.embed_tokens.weight"]["dtype"] == table["lm_head.weight"]["dtype"] == "int8"
