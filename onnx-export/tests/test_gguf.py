"""The GGUF path: metadata, names, dequantization and tokenizer, checked against the fixtures'
transformers references (a GGUF written from a checkpoint must export to the same model)."""

from __future__ import annotations

import json

import numpy as np
import pytest
from conftest import FIXTURES, MODELS, load_reference
from gguf import GGMLQuantizationType as Q
from gguf import GGUFReader, quants
from gguf_maker import write_gguf

from qwen2_export.bundle import export, load_manifest
from qwen2_export.runner import OrtDecoder

FP32_TOL = 1e-4  # same float32 arithmetic as the reference: see test_reference.py

TEXTS = [
    "Hello world, 你好！",
    "def reverse(s):\n    return s[::-1]\n",
    "   runs   of   spaces\n\n\nand newlines\ttabs",
    "emoji 🙂🚀👍🏽 ñ é ü ß Ωμέγα привет",
    "numbers 1234567890 3.14159",
    "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n",
]


@pytest.mark.parametrize("model", MODELS)
def test_f32_gguf_exports_the_reference_model(model, tmp_path):
    gguf = write_gguf(model, tmp_path / "m.gguf")
    out = export(gguf, tmp_path / "bundle", ["fp32"], ["portable", "ort"], log=lambda m: None)
    ref = load_reference(model)
    for variant in ("fp32", "fp32-ort"):
        trace = OrtDecoder(out, variant, threads=1).greedy(list(ref["prompt_ids"]), len(ref["decode_ids"]))
        assert np.abs(trace.prefill_logits - ref["prefill_logits"]).max() <= FP32_TOL
        np.testing.assert_array_equal(trace.decode_ids, ref["decode_ids"])
    manifest = load_manifest(out)
    assert manifest["source"]["kind"] == "gguf"
    config = json.loads((out / "config.json").read_text())
    tied = model not in ("tiny-untied", "tiny-moe")
    assert config["tie_word_embeddings"] == tied
    assert ("lm_head.weight" in manifest["variants"][0]["weights"]) == (not tied)
    if model == "tiny-moe":  # qwen2moe: the routing settings and the dense layer come back
        original = json.loads((FIXTURES / model / "checkpoint" / "config.json").read_text())
        keys = ("model_type", "num_experts", "num_experts_per_tok", "moe_intermediate_size",
                "shared_expert_intermediate_size", "norm_topk_prob", "mlp_only_layers")
        assert {k: config[k] for k in keys} == {k: original[k] for k in keys}


@pytest.mark.parametrize("model", MODELS)
def test_gguf_tokenizer_encodes_like_the_original(model, tmp_path):
    from tokenizers import Tokenizer

    from qwen2_export.source_gguf import read_gguf

    gguf = write_gguf(model, tmp_path / "m.gguf")
    ours = Tokenizer.from_str(json.dumps(read_gguf(gguf).tokenizer_json))
    from conftest import FIXTURES

    original = Tokenizer.from_file(str(FIXTURES / model / "checkpoint" / "tokenizer.json"))
    for text in TEXTS:
        want = original.encode(text, add_special_tokens=False).ids
        assert ours.encode(text, add_special_tokens=False).ids == want, text
        assert ours.decode(want, skip_special_tokens=False) == original.decode(want, skip_special_tokens=False)


def test_quantized_tensor_types_dequantize_exactly(tmp_path):
    """F16, Q8_0, Q5_0, Q4_0 tensors land in the fp32 bundle as the gguf package dequantizes them,
    under the right Hugging Face names (the K-quants are covered by the demo GGUF)."""
    types = {
        "model.embed_tokens.weight": Q.Q8_0,
        "model.layers.0.self_attn.q_proj.weight": Q.Q5_0,
        "model.layers.0.mlp.gate_proj.weight": Q.Q4_0,
        "model.layers.1.mlp.down_proj.weight": Q.F16,
        "model.layers.1.self_attn.k_proj.weight": Q.Q8_0,
    }
    gguf = write_gguf("tiny-tied", tmp_path / "m.gguf", types=types)
    out = export(gguf, tmp_path / "bundle", ["fp32"], ["portable"], log=lambda m: None)
    table = load_manifest(out)["variants"][0]["weights"]
    data = np.memmap(out / "onnx" / "fp32" / "model.onnx.data", dtype=np.uint8, mode="r")
    reader = GGUFReader(gguf)
    from gguf_maker import gguf_name

    for hf, qtype in types.items():
        tensor = next(t for t in reader.tensors if t.name == gguf_name(hf))
        assert tensor.tensor_type == qtype
        expected = quants.dequantize(tensor.data, qtype).astype(np.float32).reshape(table[hf]["shape"])
        entry = table[hf]
        got = data[entry["offset"]:entry["offset"] + entry["nbytes"]].view(np.float32).reshape(entry["shape"])
        np.testing.assert_array_equal(got, expected)
    assert _top1_agreement(out, "tiny-tied") >= 0.85  # 8-/5-/4-bit weights in a few layers; measured 97%


def _top1_agreement(bundle, model: str) -> float:
    """How often the bundle's fp32 variant, teacher-forced on the reference tokens, ranks the reference's
    top token first."""
    ref = load_reference(model)
    trace = OrtDecoder(bundle, "fp32", threads=1).forced(list(ref["prompt_ids"]), list(ref["decode_ids"]))
    return float(np.mean(np.concatenate([trace.prefill_logits, trace.decode_logits]).argmax(-1)
                         == np.concatenate([ref["prefill_logits"], ref["decode_logits"]]).argmax(-1)))


def test_quantized_expert_stacks_dequantize_per_expert(tmp_path):
    """qwen2moe: each expert's matrix of a quantized stacked tensor lands in the bundle under its Hugging
    Face name as the gguf package dequantizes that expert's slice, and the model still follows the reference."""
    types = {"model.layers.0.mlp.experts.0.gate_proj.weight": Q.Q8_0,
             "model.layers.2.mlp.experts.0.down_proj.weight": Q.Q4_0}
    gguf = write_gguf("tiny-moe", tmp_path / "m.gguf", types=types)
    out = export(gguf, tmp_path / "bundle", ["fp32"], ["portable"], log=lambda m: None)
    table = load_manifest(out)["variants"][0]["weights"]
    data = np.memmap(out / "onnx" / "fp32" / "model.onnx.data", dtype=np.uint8, mode="r")
    reader = GGUFReader(gguf)
    for stack, layer, proj, qtype in (("blk.0.ffn_gate_exps.weight", 0, "gate_proj", Q.Q8_0),
                                      ("blk.2.ffn_down_exps.weight", 2, "down_proj", Q.Q4_0)):
        tensor = next(t for t in reader.tensors if t.name == stack)
        assert tensor.tensor_type == qtype and len(tensor.shape) == 3
        for e in range(int(tensor.shape[-1])):
            entry = table[f"model.layers.{layer}.mlp.experts.{e}.{proj}.weight"]
            expected = quants.dequantize(np.asarray(tensor.data[e]), qtype).reshape(entry["shape"])
            got = data[entry["offset"]:entry["offset"] + entry["nbytes"]].view(np.float32).reshape(entry["shape"])
            np.testing.assert_array_equal(got, expected)
    assert _top1_agreement(out, "tiny-moe") >= 0.85
