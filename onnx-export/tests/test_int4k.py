"""int4k, the 4-bit variant of GGUF's K-quant class (docs/bundle-format.md): its arrays read GGUF's Q4_K
(and, for its wide matrices, Q6_K) blocks exactly as llama.cpp's own gguf package dequantizes them, its
quantizers beat plain int4 and int8 per row, and the exporter keeps the tensors a GGUF's producer gave more
bits wide (q6k by default, int8 on request)."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import FIXTURES, load_json
from gguf import GGMLQuantizationType as Q
from gguf import quants
from gguf_maker import write_gguf

from qwen2_export.bundle import export, load_manifest
from qwen2_export.quantize import (KQ_SUPER, Q6_SUPER, dequantize_int4_blocks, dequantize_int4k,
                                   dequantize_q6k, int4k_from_q4_k, q4_k_from_int4k, q6_k_from_q6k,
                                   q6k_from_q6_k, quantize_int4_blocks, quantize_int4k, quantize_q6k)


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


def _random_q6_k(rng, rows: int, supers: int) -> np.ndarray:
    """Valid Q6_K rows: random 6-bit values and int8 scale codes (-128 included, as llama.cpp writes
    them), positive float16 super-block scales."""
    nb = supers * 8
    packed = rng.integers(0, 256, (rows, nb, 16), dtype=np.uint8)
    qh = rng.integers(0, 256, (rows, nb, 8), dtype=np.uint8)
    sc = rng.integers(-128, 128, (rows, supers * Q6_SUPER), dtype=np.int8)
    d = rng.uniform(1e-5, 2e-4, (rows, supers)).astype(np.float16)
    return q6_k_from_q6k(packed, qh, sc, d)


def test_q6_k_blocks_read_as_the_gguf_package_dequantizes_them():
    rng = np.random.default_rng(2)
    raw = _random_q6_k(rng, 5, 3)
    assert raw.shape == (5, 3 * 210)
    arrays = q6k_from_q6_k(raw)
    want = quants.dequantize(raw, Q.Q6_K).reshape(5, 3 * 256)
    np.testing.assert_array_equal(dequantize_q6k(*arrays, 3 * 256), want)
    np.testing.assert_array_equal(q6_k_from_q6k(*arrays), raw)


@pytest.mark.parametrize("shape", [(64, 896), (16, 48), (8, 4864)])
def test_q6k_quantization_searches_its_scales(shape):
    """6-bit sub-blocks of 16 with their scales searched and then coded in 8 bits under a float16 super-block
    scale, against round to nearest from each sub-block's extreme with the scale kept in float32 (what the
    search must beat) and against int4k (what q6k must be well clear of), on Gaussian weights with a few
    outliers. Measured: 0.96-0.98x the former's error, 0.26-0.29x int4k's."""
    rng = np.random.default_rng(3)
    w = (rng.standard_normal(shape) * 0.02).astype(np.float32)
    w[:, :: max(1, shape[1] // 7)] *= 6
    packed, qh, sc, d = quantize_q6k(w)
    nb = -(-shape[1] // 32)
    assert packed.shape == (shape[0], nb, 16) and qh.shape == (shape[0], nb, 8) and sc.shape == (shape[0], 2 * nb)
    assert d.shape == (shape[0], -(-2 * nb // Q6_SUPER))  # a row's last super-block may be partial
    assert np.abs(sc.astype(np.int32)).max() <= 127
    got = dequantize_q6k(packed, qh, sc, d, shape[1])
    subs = np.zeros((shape[0], 2 * nb * 16), np.float32)
    subs[:, :shape[1]] = w
    subs = subs.reshape(shape[0], 2 * nb, 16)
    extreme = np.take_along_axis(subs, np.abs(subs).argmax(-1)[..., None], -1)
    scale = np.where(extreme != 0, extreme / -32.0, 1.0)
    rtn = (np.clip(np.rint(subs / scale), -32, 31) * scale).reshape(shape[0], -1)[:, :shape[1]]
    int4k = dequantize_int4k(*quantize_int4k(w), shape[1])

    def rms(a):
        return np.sqrt(np.mean((a - w) ** 2))

    assert rms(got) <= rms(rtn)
    assert rms(got) <= 0.35 * rms(int4k)


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


@pytest.mark.parametrize("wide", ["q6k", "int8"])
def test_a_gguf_producers_wider_types_stay_wide(tmp_path, wide):
    """From a quantized GGUF, int4k keeps the tensors stored with more than 5 bits per weight wide (its
    8-bit ones, Q8_0 here, int8 per row whatever `--int4k-wide` says; Q6_K, which these tiny rows cannot
    hold, q6k: test_demo.py) and makes 4-bit of those with fewer (Q5_0, Q4_0); float tensors (F16, F32)
    follow the checkpoint rule below (which picks nothing in a 2-layer model)."""
    types = {
        "model.layers.0.self_attn.v_proj.weight": Q.Q8_0,
        "model.layers.1.mlp.down_proj.weight": Q.F16,
        "model.layers.0.self_attn.q_proj.weight": Q.Q5_0,
        "model.layers.0.mlp.gate_proj.weight": Q.Q4_0,
    }
    gguf = write_gguf("tiny-tied", tmp_path / "m.gguf", types=types)
    out = export(gguf, tmp_path / "bundle", ["int4k"], ["portable"], log=lambda m: None, int4k_wide=wide)
    entry = load_manifest(out)["variants"][0]
    assert entry["int4k_wide"] == wide
    for name, spec in entry["weights"].items():
        if name.startswith("model.layers.") and name.endswith("proj.weight"):
            if types.get(name) == Q.Q8_0:
                assert spec["dtype"] == "int8" and spec["quant"]["bits"] == 8, name
            else:
                assert spec["quant"]["scheme"] == "kquant", name


def test_checkpoints_keep_q4_k_m_sensitive_matrices_wide():
    """From a Hugging Face checkpoint: the value and down projections of the first and last eighth of the
    layers and of every third layer between are q6k (tiny-untied's 3 layers: layer 2's), the rest int4k."""
    manifest = load_json(FIXTURES / "tiny-untied" / "bundle" / "bundle.json")
    table = next(v for v in manifest["variants"] if v["name"] == "int4k")["weights"]
    for i in range(3):
        for proj in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                     "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"):
            spec = table[f"model.layers.{i}.{proj}.weight"]
            sensitive = i == 2 and proj in ("self_attn.v_proj", "mlp.down_proj")
            assert spec["quant"]["scheme"] == ("q6k" if sensitive else "kquant"), (i, proj)
    assert table["model.embed_tokens.weight"]["dtype"] == table["lm_head.weight"]["dtype"] == "int8"


def test_the_command_line_picks_the_wide_format(tmp_path):
    """`--int4k-wide int8` keeps the sensitive matrices (tiny-untied: layer 2's value and down projections)
    int8 per row and says so in the variant entry; an unknown format is one error line, exit 2, nothing
    written."""
    from qwen2_export.cli import main

    src = FIXTURES / "tiny-untied" / "checkpoint"
    out = tmp_path / "b"
    assert main(["export", "--from", str(src), "--out", str(out), "--variants", "int4k", "--profiles",
                 "portable", "--int4k-wide", "int8"]) == 0
    entry = load_manifest(out)["variants"][0]
    assert entry["int4k_wide"] == "int8"
    assert entry["weights"]["model.layers.2.mlp.down_proj.weight"]["dtype"] == "int8"
    assert entry["weights"]["model.layers.1.mlp.down_proj.weight"]["quant"]["scheme"] == "kquant"
    assert main(["export", "--from", str(src), "--out", str(tmp_path / "c"), "--variants", "int4k",
                 "--profiles", "portable", "--int4k-wide", "q5"]) == 2
    assert not (tmp_path / "c").exists()
