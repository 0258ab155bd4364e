"""The committed fixture bundles are laid out as docs/bundle-format.md says."""

from __future__ import annotations

import hashlib
import os

import numpy as np
import onnx
import pytest
from conftest import FIXTURES, MODELS, VARIANTS, load_json

from qwen2_export.bundle import PROFILES

from qwen2_export.checkpoint import Dims, expected_tensor_names
from qwen2_export.graph import FUSED_QKV, TIED_INT4_HEAD
from qwen2_export.quantize import (KQ_SUPER, Q6_SUPER, dequantize_int4_blocks, dequantize_int4k,
                                   dequantize_int8_blocks, dequantize_int8_rows, dequantize_q6k,
                                   unpack_kquant_codes)
from qwen2_export.source_hf import read_checkpoint

CONTRIB_OPS = {"GroupQueryAttention", "SkipSimplifiedLayerNormalization"}


def _variant(manifest: dict, name: str) -> dict:
    return next(v for v in manifest["variants"] if v["name"] == name)


@pytest.mark.parametrize("model", MODELS)
def test_manifest_lists_every_file_with_size_and_hash(model):
    bundle = FIXTURES / model / "bundle"
    manifest = load_json(bundle / "bundle.json")
    assert manifest["format"] == "qwen2-edge-bundle" and manifest["format_version"] == 1
    on_disk = {p.relative_to(bundle).as_posix() for p in bundle.rglob("*") if p.is_file()} - {"bundle.json"}
    assert set(manifest["files"]) == on_disk
    for rel, info in manifest["files"].items():
        data = (bundle / rel).read_bytes()
        assert len(data) == info["size"]
        assert hashlib.sha256(data).hexdigest() == info["sha256"]
    assert sorted(v["name"] for v in manifest["variants"]) == sorted(VARIANTS)


@pytest.mark.parametrize("model", MODELS)
@pytest.mark.parametrize("variant", VARIANTS)
def test_graph_io_and_ops(model, variant):
    bundle = FIXTURES / model / "bundle"
    entry = _variant(load_json(bundle / "bundle.json"), variant)
    onnx.checker.check_model(str(bundle / entry["graph"]))
    graph = onnx.load(str(bundle / entry["graph"]), load_external_data=False)
    dims = Dims.from_config(load_json(bundle / "config.json"))
    layers = dims.layers
    inputs = ["input_ids", "attention_mask", "position_ids"] + [
        f"past_key_values.{i}.{k}" for i in range(layers) for k in ("key", "value")]
    contrib = variant.endswith(("-ort", "-gpu"))
    if contrib:
        inputs.append("logits_to_keep")
    outputs = ["logits"] + [f"present.{i}.{k}" for i in range(layers) for k in ("key", "value")]
    assert [i.name for i in graph.graph.input] == inputs == entry["inputs"]
    assert [o.name for o in graph.graph.output] == outputs == entry["outputs"]
    domains = {n.domain or "ai.onnx" for n in graph.graph.node}
    ops = {n.op_type for n in graph.graph.node}
    standard = next(o.version for o in graph.opset_import if o.domain in ("", "ai.onnx"))
    assert standard >= 17
    kv = onnx.TensorProto.FLOAT16 if variant.endswith("-gpu") else onnx.TensorProto.FLOAT
    assert all(i.type.tensor_type.elem_type == kv for i in graph.graph.input if i.name.startswith("past_key_values"))
    assert entry["kv_dtype"] == ("float16" if kv == onnx.TensorProto.FLOAT16 else "float32")
    assert graph.graph.output[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT, "logits are float32"
    if contrib:
        assert CONTRIB_OPS <= ops
        quantized = variant.startswith(("int4", "int8"))
        assert ("MatMulNBits" in ops) == quantized
        if quantized:
            assert not ops & {"DequantizeLinear", "Gemm"}, "ONNX Runtime would fold these to float32"
            # Five products per layer (Q, K and V fused into one; a MoE layer: three per expert and for the
            # shared expert) and the LM head: no int8 head for ONNX Runtime to fold to float32.
            nbits = [n for n in graph.graph.node if n.op_type == "MatMulNBits"]
            moe = dims.moe
            mlps = [1 + moe.experts if moe and moe.sparse(i) else 1 for i in range(layers)]
            assert len(nbits) == sum(2 + 3 * m for m in mlps) + 1
            gqa = [n for n in graph.graph.node if n.op_type == "GroupQueryAttention"]
            assert len(gqa) == layers and all(n.input[1] == n.input[2] == "" for n in gqa), "packed QKV input"
            attrs = [{a.name: a.i for a in n.attribute} for n in nbits]
            bits = 4 if variant.startswith("int4") else 8
            level = 0 if variant.endswith("-gpu") else 4  # float MatMulNBits for GPU providers
            assert all(a["accuracy_level"] == level and a["bits"] == bits for a in attrs)
            assert entry["accuracy_level"] == level
    else:
        assert domains == {"ai.onnx"}, f"portable profile uses non-standard domains {domains}"


@pytest.mark.parametrize("model", MODELS)
@pytest.mark.parametrize("variant", ["fp32", "fp16", "int8", "int4", "int4k"])
def test_weights_table_reads_back_the_checkpoint(model, variant):
    """Every weight is found by its Hugging Face name at the recorded offset, in the recorded
    layout, and decodes to the checkpoint's values within the precision's rounding."""
    bundle = FIXTURES / model / "bundle"
    manifest = load_json(bundle / "bundle.json")
    entry = _variant(manifest, variant)
    ckpt = read_checkpoint(FIXTURES / model / "checkpoint")
    names = expected_tensor_names(ckpt.dims(), ckpt.tied)
    table = entry["weights"]
    assert set(names) <= set(table)
    data = np.fromfile(bundle / entry["data"], dtype=np.uint8)
    graph = onnx.load(str(bundle / entry["graph"]), load_external_data=False)
    initializers = {t.name for t in graph.graph.initializer}

    def read(spec, dtype):
        assert spec["offset"] % 64 == 0
        return data[spec["offset"]:spec["offset"] + spec["nbytes"]].view(dtype)

    for name in names:
        spec = table[name]
        assert name in initializers
        assert spec["transposed"] is False
        want = ckpt.tensors[name]()
        assert spec["shape"] == list(want.shape)
        quant = spec.get("quant")
        if quant is None:
            got = read(spec, np.dtype(spec["dtype"])).astype(np.float32).reshape(want.shape)
            tol = 0 if spec["dtype"] == "float32" else np.abs(want).max() * 2**-10
            np.testing.assert_allclose(got, want, rtol=0, atol=tol)
            continue
        if quant.get("scheme") == "kquant":
            assert quant["bits"] == 4 and quant["block_size"] == 32 and quant["super_block"] == KQ_SUPER
            n, blocks, _ = quant["packed_shape"]
            assert "scale" not in quant and "min" not in quant, "codes packed 6 bits each"
            codes = read(quant["codes"], np.uint8).reshape(n, -(-blocks // KQ_SUPER), 12)
            sc, m = unpack_kquant_codes(codes, blocks)
            d, dmin = (read(quant[key], np.float16).reshape(n, -(-blocks // KQ_SUPER)) for key in ("d", "dmin"))
            assert sc.max() <= 63 and m.max() <= 63, "6-bit codes"
            got = dequantize_int4k(read(spec, np.uint8).reshape(n, blocks, 16), sc, m, d, dmin, want.shape[1])
            # A searched scale and min need not cover a block's extremes: a clamped value may be off by
            # more than half a step; measured at most 1.4 steps on these fixtures.
            step = np.repeat(np.repeat(d.astype(np.float32), KQ_SUPER, axis=1)[:, :blocks] * sc, 32,
                             axis=1)[:, : want.shape[1]]
            assert np.all(np.abs(got - want) <= 2 * step + 1e-6), name
            continue
        if quant.get("scheme") == "q6k":
            assert quant["bits"] == 6 and quant["block_size"] == 16 and quant["super_block"] == Q6_SUPER
            n, blocks, _ = quant["packed_shape"]
            qh = read(quant["high"], np.uint8).reshape(n, blocks, 8)
            sc = read(quant["scale"], np.int8).reshape(n, 2 * blocks)
            d = read(quant["d"], np.float16).reshape(n, -(-2 * blocks // Q6_SUPER))
            got = dequantize_q6k(read(spec, np.uint8).reshape(n, blocks, 16), qh, sc, d, want.shape[1])
            # Half a step, or a step where the searched scale clamps a sub-block's extreme (-32..31).
            step = np.repeat(np.repeat(d.astype(np.float32), Q6_SUPER, axis=1)[:, :2 * blocks]
                             * np.abs(sc.astype(np.float32)), 16, axis=1)[:, : want.shape[1]]
            assert np.all(np.abs(got - want) <= step + 1e-6), name
            continue
        scale = read(quant["scale"], np.float32).reshape(quant["scale"]["shape"])
        if quant["bits"] == 8:
            q = read(spec, np.int8).reshape(want.shape)
            got = dequantize_int8_rows(q, scale)
            bound = np.abs(scale)[:, None] / 2
        else:
            assert quant["block_size"] == 32
            packed = read(spec, np.uint8).reshape(quant["packed_shape"])
            got = dequantize_int4_blocks(packed, scale, want.shape[1])
            # half a step, except a value opposite in sign to the block's extreme can be clamped
            # from +8 to +7 steps (the extreme maps to -8): up to one step there.
            bound = np.repeat(np.abs(scale), 32, axis=1)[:, : want.shape[1]]
        assert np.all(np.abs(got - want) <= bound * (1 + 1e-5) + 1e-7), name


@pytest.mark.parametrize("model", MODELS)
@pytest.mark.parametrize("variant", ["int8-ort", "int4-ort", "int4-gpu"])
def test_ort_quantized_weights_read_back(model, variant):
    """The ort profile's MatMulNBits weights (8-bit blocks of 128 with u = q + 128, or int4 blocks of
    32), the fused Q/K/V rows and a tied int4 head's copy decode to the checkpoint within half a step."""
    bundle = FIXTURES / model / "bundle"
    entry = _variant(load_json(bundle / "bundle.json"), variant)
    ckpt = read_checkpoint(FIXTURES / model / "checkpoint")
    data = np.fromfile(bundle / entry["data"], dtype=np.uint8)

    def read(spec, dtype):
        assert spec["offset"] % 64 == 0
        return data[spec["offset"]:spec["offset"] + spec["nbytes"]].view(dtype)

    def source(name):
        if FUSED_QKV + ".weight" in name:
            prefix = name.removesuffix(FUSED_QKV + ".weight")
            return np.concatenate([ckpt.tensors[f"{prefix}self_attn.{p}.weight"]() for p in ("q_proj", "k_proj", "v_proj")])
        return ckpt.tensors["model.embed_tokens.weight" if name == TIED_INT4_HEAD else name]()

    quantized = {name: spec for name, spec in entry["weights"].items() if "quant" in spec}
    assert quantized
    for name, spec in quantized.items():
        want, quant = source(name), spec["quant"]
        k = want.shape[1]
        assert spec["shape"] == list(want.shape)
        scale = read(quant["scale"], np.float32).reshape(quant["scale"]["shape"])
        if spec["dtype"] == "int8":
            assert variant.startswith("int4") and name == "model.embed_tokens.weight", "int4 gathers int8 rows"
            got = dequantize_int8_rows(read(spec, np.int8).reshape(want.shape), scale)
            assert np.all(np.abs(got - want) <= scale[:, None] / 2 * (1 + 1e-5) + 1e-7), name
            continue
        packed = read(spec, np.uint8).reshape(quant["packed_shape"])
        if variant == "int8-ort":
            assert quant["bits"] == 8 and quant["block_size"] == 128 and quant["zero_point"] == 128, name
            blocks = -(-k // 128)
            assert quant["packed_shape"] == [want.shape[0], blocks, 128]
            assert np.all(packed.reshape(want.shape[0], -1)[:, k:] == 128), "padding must be zero"
            got, step = dequantize_int8_blocks(packed, scale, k), np.repeat(scale, 128, axis=1)[:, :k]
            bound = step / 2
        else:
            assert quant["bits"] == 4 and quant["block_size"] == 32, name
            got, step = dequantize_int4_blocks(packed, scale, k), np.repeat(np.abs(scale), 32, axis=1)[:, :k]
            bound = step  # a value opposite in sign to the block's extreme may be clamped by one step
        assert np.all(np.abs(got - want) <= bound * (1 + 1e-5) + 1e-7), name


# tiny-dca (Dual Chunk Attention) is not in MODELS: ONNX Runtime runs its graphs as plain attention, which
# matches its reference only within one chunk (the Rust tests check that); its bundle is current all the same.
@pytest.mark.parametrize("model", MODELS + ["tiny-dca"])
def test_committed_bundles_are_current(model, tmp_path):
    """The committed fixture bundles are what this exporter writes today (regenerate them with
    the commands in tests/fixtures/README.md after changing the exporter)."""
    from qwen2_export.bundle import export

    fresh = export(FIXTURES / model / "checkpoint", tmp_path / "b", profiles=PROFILES, log=lambda m: None)
    old = load_json(FIXTURES / model / "bundle" / "bundle.json")
    new = load_json(fresh / "bundle.json")
    assert [v["weights"] for v in new["variants"]] == [v["weights"] for v in old["variants"]]
    for rel, info in new["files"].items():
        if not rel.endswith("model.onnx"):  # protobuf bytes may vary with the onnx version
            assert old["files"][rel] == info, rel
    # Readable like any mkdir'ed directory (not mkdtemp's 0700): a service user must read it.
    umask = os.umask(0)
    os.umask(umask)
    assert fresh.stat().st_mode & 0o777 == 0o777 & ~umask
    for variant in new["variants"]:
        ops_new = [n.op_type for n in onnx.load(str(fresh / variant["graph"]), load_external_data=False).graph.node]
        ops_old = [n.op_type for n in onnx.load(str(FIXTURES / model / "bundle" / variant["graph"]),
                                                load_external_data=False).graph.node]
        assert ops_new == ops_old, variant["name"]
