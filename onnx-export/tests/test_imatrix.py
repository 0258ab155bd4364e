"""Calibration statistics for int4k (imatrix.py): what they measure, and what they change."""

from __future__ import annotations

import json

import numpy as np
import pytest
from conftest import FIXTURES

from qwen2_export.bundle import export, load_manifest
from qwen2_export.errors import ExportError
from qwen2_export.imatrix import collect, load, save
from qwen2_export.quantize import dequantize_int4k, quantize_int4k

TEXT = ["def reverse(s):\n    return s[::-1]\n\nprint(reverse('hello world'))\n" * 20,
        "The quick brown fox jumps over the lazy dog. " * 30]


def test_statistics_cover_every_product_and_agree_where_inputs_are_shared(tmp_path):
    bundle = FIXTURES / "tiny-tied" / "bundle"
    stats = collect(bundle, TEXT, max_tokens=300, threads=1)
    table = load_manifest(bundle)["variants"][0]["weights"]
    matrices = {n for n, e in table.items() if len(e["shape"]) == 2 and "embed" not in n} | {"model.embed_tokens.weight"}
    assert set(stats) == matrices
    for name, v in stats.items():
        assert v.shape == (table[name]["shape"][1],) and np.all(v >= 0) and v.max() > 0, name
    # Q, K and V read the same normalized input; gate and up too.
    p = "model.layers.1."
    np.testing.assert_array_equal(stats[p + "self_attn.q_proj.weight"], stats[p + "self_attn.v_proj.weight"])
    np.testing.assert_array_equal(stats[p + "mlp.gate_proj.weight"], stats[p + "mlp.up_proj.weight"])
    save(stats, tmp_path / "s.npz")
    again = load(tmp_path / "s.npz")
    assert set(again) == set(stats) and all(np.array_equal(again[n], stats[n]) for n in stats)


def test_a_damaged_statistics_file_is_one_error(tmp_path):
    bad = tmp_path / "bad.npz"
    bad.write_bytes(b"not a zip")
    with pytest.raises(ExportError, match="not an imatrix file"):
        load(bad)
    np.savez(tmp_path / "neg.npz", **{"m.weight": np.array([1.0, -1.0], np.float32)})
    with pytest.raises(ExportError, match="not a vector of mean squares"):
        load(tmp_path / "neg.npz")


def test_column_weights_lower_the_error_where_activations_are_large():
    rng = np.random.default_rng(0)
    w = rng.standard_normal((64, 256)).astype(np.float32)
    columns = np.exp(2 * rng.standard_normal(256)).astype(np.float32)  # a few channels dominate

    def activation_error(arrays):
        d = dequantize_int4k(*arrays, 256)
        return float((columns * (w - d) ** 2).sum())

    plain, weighted = activation_error(quantize_int4k(w)), activation_error(quantize_int4k(w, columns))
    assert weighted < 0.8 * plain, (weighted, plain)
    with pytest.raises(ValueError):
        quantize_int4k(w, columns[:100])


def test_export_with_statistics_changes_int4k_only_and_says_so(tmp_path):
    src = FIXTURES / "tiny-tied" / "checkpoint"
    stats = collect(FIXTURES / "tiny-tied" / "bundle", TEXT, max_tokens=300, threads=1)
    plain = export(src, tmp_path / "plain", ["int4k", "int8"], ["portable"], log=lambda m: None)
    calibrated = export(src, tmp_path / "cal", ["int4k", "int8"], ["portable"], log=lambda m: None, imatrix=stats)
    entries = {b: {v["name"]: v for v in load_manifest(b)["variants"]} for b in (plain, calibrated)}
    assert entries[plain]["int4k"]["int4k_calibrated"] is False
    assert entries[calibrated]["int4k"]["int4k_calibrated"] is True
    data = {b: (b / "onnx" / "int4k" / "model.onnx.data").read_bytes() for b in (plain, calibrated)}
    assert data[plain] != data[calibrated]
    assert ((plain / "onnx" / "int8" / "model.onnx.data").read_bytes()
            == (calibrated / "onnx" / "int8" / "model.onnx.data").read_bytes())
    other = {n: v[:10] for n, v in stats.items()}
    with pytest.raises(ExportError, match="statistics for 10 input columns"):
        export(src, tmp_path / "wrong", ["int4k"], ["portable"], log=lambda m: None, imatrix=other)
    config = json.loads((calibrated / "config.json").read_text())
    assert config["hidden_size"] == 64


def test_the_command_line_collects_and_exports(tmp_path):
    from qwen2_export.cli import main

    text = tmp_path / "calibration.txt"
    text.write_text(TEXT[0] + TEXT[1])
    stats = tmp_path / "stats.npz"
    assert main(["imatrix", "--bundle", str(FIXTURES / "tiny-untied" / "bundle"), "--text", str(text),
                 "--tokens", "200", "--threads", "1", "--out", str(stats)]) == 0
    out = tmp_path / "b"
    assert main(["export", "--from", str(FIXTURES / "tiny-untied" / "checkpoint"), "--out", str(out),
                 "--variants", "int4k", "--profiles", "portable", "--imatrix", str(stats)]) == 0
    assert load_manifest(out)["variants"][0]["int4k_calibrated"] is True
    # Another model's statistics: one error line, exit 2, nothing written.
    assert main(["export", "--from", str(FIXTURES / "tiny-tied" / "checkpoint"), "--out", str(tmp_path / "c"),
                 "--variants", "int4k", "--profiles", "portable", "--imatrix", str(stats)]) == 2
    assert not (tmp_path / "c").exists()
    # A bundle without an fp32 variant cannot calibrate.
    assert main(["imatrix", "--bundle", str(out), "--text", str(text), "--out", str(tmp_path / "x.npz")]) == 2
