"""Read a llama.cpp GGUF file of architecture qwen2 (or qwen2moe) into a `Checkpoint` (dequantized to float32)."""

from __future__ import annotations

import mmap
import re
from pathlib import Path

import numpy as np

from .checkpoint import Checkpoint
from .errors import ExportError
from .fetch import sha256_file
from .tokenizer_build import build_tokenizer_config, build_tokenizer_json

_LAYER_NAMES = {
    "attn_norm.weight": "input_layernorm.weight",
    "attn_q.weight": "self_attn.q_proj.weight",
    "attn_q.bias": "self_attn.q_proj.bias",
    "attn_k.weight": "self_attn.k_proj.weight",
    "attn_k.bias": "self_attn.k_proj.bias",
    "attn_v.weight": "self_attn.v_proj.weight",
    "attn_v.bias": "self_attn.v_proj.bias",
    "attn_output.weight": "self_attn.o_proj.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "ffn_gate.weight": "mlp.gate_proj.weight",
    "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
}
# qwen2moe (llama.cpp's names for Qwen2-MoE): the router, the shared expert and its gate.
_MOE_LAYER_NAMES = {
    "ffn_gate_inp.weight": "mlp.gate.weight",
    "ffn_gate_inp_shexp.weight": "mlp.shared_expert_gate.weight",
    "ffn_gate_shexp.weight": "mlp.shared_expert.gate_proj.weight",
    "ffn_up_shexp.weight": "mlp.shared_expert.up_proj.weight",
    "ffn_down_shexp.weight": "mlp.shared_expert.down_proj.weight",
}
# Every expert's matrix of a layer in one tensor [experts, rows, cols]: one Hugging Face tensor per expert.
_EXPERT_STACKS = {
    "ffn_gate_exps.weight": "gate_proj",
    "ffn_up_exps.weight": "up_proj",
    "ffn_down_exps.weight": "down_proj",
}
ARCHITECTURES = ("qwen2", "qwen2moe")
_GLOBAL_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
_BLOCK = re.compile(r"^blk\.(\d+)\.(.+)$")


def hf_name(gguf_name: str) -> str:
    if gguf_name in _GLOBAL_NAMES:
        return _GLOBAL_NAMES[gguf_name]
    m = _BLOCK.match(gguf_name)
    names = {**_LAYER_NAMES, **_MOE_LAYER_NAMES}
    if m and m.group(2) in names:
        return f"model.layers.{m.group(1)}.{names[m.group(2)]}"
    raise ExportError(f"GGUF tensor {gguf_name!r} has no Qwen2 counterpart")


def _expert_names(gguf_name: str, experts: int) -> list[str] | None:
    """The Hugging Face names of a stacked expert tensor's matrices, one per expert; None for other tensors."""
    m = _BLOCK.match(gguf_name)
    if not m or m.group(2) not in _EXPERT_STACKS:
        return None
    return [f"model.layers.{m.group(1)}.mlp.experts.{e}.{_EXPERT_STACKS[m.group(2)]}.weight" for e in range(experts)]


def _field(reader, key: str, default=None, required: bool = False):
    f = reader.get_field(key)
    if f is None:
        if required:
            raise ExportError(f"GGUF metadata lacks {key}")
        return default
    return f.contents()


# Dequantized bytes per slab: bounds the temporaries of a tensor's load (gguf's dequantizers make several
# times their output); 16 MB dequantizes the 1.5B model's tensors 15% faster than 64 MB (cache).
SLAB_BYTES = 16 << 20


def _drop_pages(mapped: np.memmap, start: int, length: int) -> None:
    """Takes bytes [start, start + length) of the mapped GGUF file out of this process's resident set
    (they stay in the page cache): without it every dequantized tensor's source bytes would stay counted,
    the whole file by the end of the export."""
    mm = getattr(mapped, "_mmap", None)
    if mm is None or not hasattr(mm, "madvise") or not hasattr(mmap, "MADV_DONTNEED"):
        return  # not a memory map we can advise (or not Linux): only the accounting suffers
    first = start - start % mmap.PAGESIZE
    # A page shared with the neighbouring tensor is simply read again from the page cache if needed.
    mm.madvise(mmap.MADV_DONTNEED, first, start + length - first)


def _part(tensor, expert: int | None) -> tuple[int, int]:
    """(offset, bytes) in the file of `tensor`, or of one expert's matrix of a stacked expert tensor."""
    if expert is None:
        return int(tensor.data_offset), int(tensor.n_bytes)
    size = int(tensor.n_bytes) // int(tensor.shape[-1])
    return int(tensor.data_offset) + expert * size, size


def _dequantizer(tensor, mapped: np.memmap, expert: int | None = None, shape: tuple[int, ...] | None = None):
    """A loader of `tensor` (of its matrix `expert` when it stacks experts) as float32, in `shape` if given."""
    from gguf import GGMLQuantizationType, quants

    qtype = tensor.tensor_type

    def load() -> np.ndarray:
        try:
            # GGUF lists dims fastest-first; numpy (and Hugging Face) want them slowest-first.
            full = tuple(int(d) for d in reversed(tensor.shape))
            data = tensor.data  # mapped from the file: [rows, row bytes] (or elements)
            if expert is not None:
                full, data = full[1:], data[expert]
            out = np.empty(full, dtype=np.float32)
            rows = out.reshape(-1, full[-1]) if out.ndim > 1 else out.reshape(1, -1)
            # A slab of rows at a time: gguf's dequantizers make temporaries several times their output.
            step = max(1, SLAB_BYTES // (4 * max(1, rows.shape[1])))
            for start in range(0, len(rows), step):
                # A plain ndarray over the map: gguf's dequantizers split their input into thousands of
                # views, and np.memmap's per-view bookkeeping was a third of the dequantizing time.
                part = np.asarray(data[start:start + step] if data.ndim > 1 else data)
                if qtype in (GGMLQuantizationType.F32, GGMLQuantizationType.F16):
                    values = np.asarray(part).astype(np.float32, copy=False)
                else:
                    values = quants.dequantize(part, qtype)
                rows[start:start + step] = values.reshape(-1, rows.shape[1])
        except NotImplementedError:
            raise ExportError(f"GGUF tensor {tensor.name}: type {qtype.name} is not supported") from None
        except Exception as e:  # noqa: BLE001 - a damaged tensor breaks the dequantizers in assorted ways
            raise ExportError(f"GGUF tensor {tensor.name}: damaged ({_first_line(e)})") from None
        finally:
            _drop_pages(mapped, *_part(tensor, expert))
        return out if shape is None else out.reshape(shape)

    return load


def _raw_rows(tensor, mapped: np.memmap, expert: int | None = None):
    """A loader of `tensor`'s bytes (of its matrix `expert` when it stacks experts) as the file holds them,
    one row of blocks per output row (a copy: the mapped pages are dropped from this process afterwards, as
    after dequantizing)."""

    def load() -> np.ndarray:
        try:
            data = np.asarray(tensor.data)
            dims = [int(d) for d in tensor.shape[1:]]
            if expert is not None:
                data, dims = data[expert], dims[:-1]
            rows = int(np.prod(dims, dtype=np.int64)) or 1
            return np.array(data.view(np.uint8).reshape(rows, -1))
        finally:
            _drop_pages(mapped, *_part(tensor, expert))

    return load


def _check_types(reader) -> None:
    from gguf import GGMLQuantizationType, quants

    for t in reader.tensors:
        q = t.tensor_type
        if q in (GGMLQuantizationType.F32, GGMLQuantizationType.F16):
            continue
        cls = getattr(quants, "_type_traits", {}).get(q)
        if cls is None:
            raise ExportError(f"GGUF tensor {t.name}: type {q.name} is not supported")


def read_gguf(path: Path) -> Checkpoint:
    """The checkpoint a GGUF file holds; a damaged or hostile file is one ExportError line (the
    gguf package's reader, and our reading of its fields, fail in assorted ways on bad bytes)."""
    path = Path(path)
    try:
        return _read_gguf(path)
    except ExportError:
        raise
    except Exception as e:  # noqa: BLE001 - every other failure is the file's
        raise ExportError(f"{path}: damaged GGUF file ({_first_line(e)})") from None


def _first_line(e: Exception) -> str:
    text = str(e).splitlines()[0] if str(e) else ""
    return f"{type(e).__name__}: {text[:200]}"


def _read_gguf(path: Path) -> Checkpoint:
    from gguf import GGUFReader

    if not path.is_file():
        raise ExportError(f"{path}: missing")
    try:
        reader = GGUFReader(path)
    except Exception as e:  # noqa: BLE001 - the reader raises assorted errors on damaged files
        raise ExportError(f"{path}: not a readable GGUF file ({_first_line(e)})") from None
    size = path.stat().st_size
    for t in reader.tensors:
        if t.data_offset + t.n_bytes > size:
            raise ExportError(f"{path}: truncated (tensor {t.name} ends past the end of the file)")
    arch = _field(reader, "general.architecture", required=True)
    if arch not in ARCHITECTURES:
        raise ExportError(f"{path}: architecture {arch!r} is not supported ({' and '.join(ARCHITECTURES)} are)")
    _check_types(reader)

    def meta(key, default=None, required=True):
        return _field(reader, f"{arch}.{key}", default, required)

    experts = int(meta("expert_count")) if arch == "qwen2moe" else 0
    tensors, gguf_types, raw_blocks = {}, {}, {}
    for t in reader.tensors:
        per_expert = _expert_names(t.name, experts) if experts else None
        if per_expert is not None:
            if len(t.shape) != 3 or int(t.shape[-1]) != experts:
                raise ExportError(f"{path}: tensor {t.name} of shape {list(t.shape)} does not stack {experts} experts")
            for e, name in enumerate(per_expert):
                tensors[name] = _dequantizer(t, reader.data, expert=e)
                gguf_types[name] = t.tensor_type.name
                raw_blocks[name] = _raw_rows(t, reader.data, expert=e)
            continue
        name = hf_name(t.name)
        # llama.cpp keeps a shared expert's gate as a vector; Hugging Face as a [1, hidden] matrix.
        shape = (1, -1) if name.endswith("mlp.shared_expert_gate.weight") else None
        tensors[name] = _dequantizer(t, reader.data, shape=shape)
        gguf_types[name] = t.tensor_type.name
        raw_blocks[name] = _raw_rows(t, reader.data)
    tied = "lm_head.weight" not in tensors

    tokens = list(_field(reader, "tokenizer.ggml.tokens", required=True))
    token_types = [int(x) for x in _field(reader, "tokenizer.ggml.token_type", required=True)]
    merges = list(_field(reader, "tokenizer.ggml.merges", required=True))
    model_kind = _field(reader, "tokenizer.ggml.model", required=True)
    if model_kind != "gpt2":
        raise ExportError(f"{path}: tokenizer model {model_kind!r} is not supported (gpt2 byte-level BPE is)")
    pre = _field(reader, "tokenizer.ggml.pre", "qwen2")
    eos = _field(reader, "tokenizer.ggml.eos_token_id")
    pad = _field(reader, "tokenizer.ggml.padding_token_id")
    bos = _field(reader, "tokenizer.ggml.bos_token_id")
    add_bos = bool(_field(reader, "tokenizer.ggml.add_bos_token", False))
    chat_template = _field(reader, "tokenizer.chat_template")
    ctx = int(meta("context_length"))

    embed_rows = int(next(t for t in reader.tensors if t.name == "token_embd.weight").shape[1])
    config = {
        "architectures": ["Qwen2ForCausalLM"],
        "model_type": "qwen2",
        "hidden_act": "silu",
        "hidden_size": int(meta("embedding_length")),
        # A qwen2moe file may leave it out when every layer is sparse (set below then).
        "intermediate_size": int(meta("feed_forward_length", 0, required=arch == "qwen2")) or None,
        "num_hidden_layers": int(meta("block_count")),
        "num_attention_heads": int(meta("attention.head_count")),
        "num_key_value_heads": int(meta("attention.head_count_kv")),
        "max_position_embeddings": ctx,
        "rms_norm_eps": float(np.float32(meta("attention.layer_norm_rms_epsilon"))),
        "rope_theta": float(meta("rope.freq_base", 10000.0, required=False)),
        "vocab_size": embed_rows,
        "tie_word_embeddings": tied,
        "bos_token_id": bos,
        "eos_token_id": eos,
        "use_sliding_window": False,
        "attention_dropout": 0.0,
        "torch_dtype": "float32",
        "use_cache": True,
    }
    if arch == "qwen2moe":
        layers = config["num_hidden_layers"]
        expert_width = int(meta("expert_feed_forward_length"))
        config.update({
            "architectures": ["Qwen2MoeForCausalLM"],
            "model_type": "qwen2_moe",
            "num_experts": experts,
            "num_experts_per_tok": int(meta("expert_used_count")),
            "moe_intermediate_size": expert_width,
            "shared_expert_intermediate_size": int(meta("expert_shared_feed_forward_length")),
            # llama.cpp's qwen2moe weighs the chosen experts by their softmax probabilities as they are.
            "norm_topk_prob": bool(meta("expert_weights_norm", False, required=False)),
            "decoder_sparse_step": 1,
            # A layer without a router has a dense MLP (llama.cpp's own files route every layer).
            "mlp_only_layers": [i for i in range(layers) if f"model.layers.{i}.mlp.gate.weight" not in tensors],
        })
        if "intermediate_size" not in config or config["intermediate_size"] is None:
            config["intermediate_size"] = expert_width
    scaling = meta("rope.scaling.type", None, required=False)
    if scaling and scaling != "none":
        config["rope_scaling"] = {
            "type": scaling,
            "factor": float(meta("rope.scaling.factor", 1.0, required=False)),
            "original_max_position_embeddings": int(meta("rope.scaling.original_context_length", ctx, required=False)),
        }
    # An instruct model ends a turn with <|im_end|>, a base model with <|endoftext|>: stop on both.
    eos_ids = [i for i in dict.fromkeys([eos, pad, bos]) if i is not None and 0 <= i < len(tokens)
               and tokens[i] in ("<|im_end|>", "<|endoftext|>")]
    generation_config = {
        "bos_token_id": bos,
        "eos_token_id": eos_ids or ([eos] if eos is not None else []),
        "pad_token_id": pad,
        # Qwen2.5's published sampling defaults; a GGUF does not record any.
        "do_sample": True,
        "temperature": 0.7,
        "top_p": 0.8,
        "top_k": 20,
        "repetition_penalty": 1.05,
    }
    tokenizer_json = build_tokenizer_json(tokens, token_types, merges, pre)
    tokenizer_config = build_tokenizer_config(tokenizer_json, tokens, chat_template, eos, pad, bos, add_bos, ctx)
    name = _field(reader, "general.name", path.stem)
    return Checkpoint(
        config=config,
        generation_config=generation_config,
        tokenizer_json=tokenizer_json,
        tokenizer_config=tokenizer_config,
        tensors=tensors,
        gguf_types=gguf_types,
        raw_blocks=raw_blocks,
        source={"kind": "gguf", "name": str(name), "file": path.name, "sha256": sha256_file(path)},
    )
