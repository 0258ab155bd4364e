"""Write small GGUF files from the fixture checkpoints (test helper, uses the gguf package's writer)."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
from conftest import FIXTURES, load_json
from gguf import GGMLQuantizationType, GGUFWriter, quants

from qwen2_export.source_gguf import _EXPERT_STACKS, _GLOBAL_NAMES, _LAYER_NAMES, _MOE_LAYER_NAMES
from qwen2_export.source_hf import read_checkpoint

HF_TO_GGUF = {hf: g for g, hf in _GLOBAL_NAMES.items()}
HF_TO_GGUF.update({hf: g for g, hf in _LAYER_NAMES.items()})
HF_TO_GGUF.update({hf: g for g, hf in _MOE_LAYER_NAMES.items()})
EXPERT = re.compile(r"^model\.layers\.(\d+)\.mlp\.experts\.(\d+)\.(\w+)\.weight$")


def gguf_name(hf: str) -> str:
    if hf in HF_TO_GGUF:
        return HF_TO_GGUF[hf]
    parts = hf.split(".")  # model.layers.N.rest
    return f"blk.{parts[2]}.{HF_TO_GGUF['.'.join(parts[3:])]}"


def tokenizer_fields(tokenizer_json: dict):
    vocab = dict(tokenizer_json["model"]["vocab"])
    types = {i: 1 for i in vocab.values()}
    for t in tokenizer_json["added_tokens"]:
        vocab[t["content"]] = t["id"]
        types[t["id"]] = 3 if t["special"] else 4
    tokens = [None] * len(vocab)
    for tok, i in vocab.items():
        tokens[i] = tok
    merges = [m if isinstance(m, str) else " ".join(m) for m in tokenizer_json["model"]["merges"]]
    return tokens, [types[i] for i in range(len(tokens))], merges


def write_gguf(model: str, path: Path, arch: str = "qwen2", types: dict[str, GGMLQuantizationType] | None = None,
               extra_tensor: tuple[str, np.ndarray] | None = None) -> Path:
    """The fixture checkpoint as GGUF; `types` maps HF names to a quantization (default F32). A Qwen2-MoE
    fixture becomes architecture qwen2moe, each layer's experts stacked in one tensor per matrix (the type of
    expert 0's name) and the shared expert's gate a vector, as llama.cpp's converter writes them."""
    ckpt = read_checkpoint(FIXTURES / model / "checkpoint")
    cfg = ckpt.config
    moe = cfg.get("model_type") == "qwen2_moe"
    if moe and arch == "qwen2":
        arch = "qwen2moe"
    w = GGUFWriter(str(path), arch)
    if moe:
        w.add_expert_count(cfg["num_experts"])
        w.add_expert_used_count(cfg["num_experts_per_tok"])
        w.add_expert_feed_forward_length(cfg["moe_intermediate_size"])
        w.add_expert_shared_feed_forward_length(cfg["shared_expert_intermediate_size"])
    w.add_name(model)
    w.add_block_count(cfg["num_hidden_layers"])
    w.add_context_length(cfg["max_position_embeddings"])
    w.add_embedding_length(cfg["hidden_size"])
    w.add_feed_forward_length(cfg["intermediate_size"])
    w.add_head_count(cfg["num_attention_heads"])
    w.add_head_count_kv(cfg["num_key_value_heads"])
    rope = cfg.get("rope_parameters") or {}
    w.add_rope_freq_base(rope.get("rope_theta", cfg.get("rope_theta", 10000.0)))
    if rope.get("rope_type") == "yarn":
        w.add_string(f"{arch}.rope.scaling.type", "yarn")
        w.add_float32(f"{arch}.rope.scaling.factor", rope["factor"])
        w.add_uint32(f"{arch}.rope.scaling.original_context_length", rope["original_max_position_embeddings"])
    w.add_layer_norm_rms_eps(cfg["rms_norm_eps"])
    tokens, token_types, merges = tokenizer_fields(ckpt.tokenizer_json)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("qwen2")
    w.add_token_list(tokens)
    w.add_token_types(token_types)
    w.add_token_merges(merges)
    w.add_eos_token_id(tokens.index("<|im_end|>"))
    w.add_pad_token_id(tokens.index("<|endoftext|>"))
    w.add_bos_token_id(tokens.index("<|endoftext|>"))
    w.add_add_bos_token(False)
    w.add_chat_template(ckpt.tokenizer_config["chat_template"])
    stacks: dict[str, list] = {}
    for name, load in ckpt.tensors.items():
        m = EXPERT.match(name)
        if m:
            stacks.setdefault(f"blk.{m.group(1)}.{HF_TO_STACK[m.group(3)]}", []).append((name, load))
            continue
        arr = load()
        if name.endswith("shared_expert_gate.weight"):
            arr = arr.reshape(-1)
        _add(w, gguf_name(name), arr, (types or {}).get(name, GGMLQuantizationType.F32))
    for gguf, members in stacks.items():
        _add(w, gguf, np.stack([load() for _, load in members]),
             (types or {}).get(members[0][0], GGMLQuantizationType.F32))
    if extra_tensor:
        w.add_tensor(*extra_tensor)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


HF_TO_STACK = {proj: gguf for gguf, proj in _EXPERT_STACKS.items()}


def _add(w, name: str, arr: np.ndarray, qtype) -> None:
    if qtype == GGMLQuantizationType.F32:
        w.add_tensor(name, arr)
    elif qtype == GGMLQuantizationType.F16:
        w.add_tensor(name, arr.astype(np.float16))
    else:
        w.add_tensor(name, quants.quantize(arr, qtype), raw_dtype=qtype)


def checkpoint_tokenizer(model: str) -> dict:
    return load_json(FIXTURES / model / "checkpoint" / "tokenizer.json")
