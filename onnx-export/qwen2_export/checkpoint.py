"""The in-memory view of a Qwen2 source that every exporter step works from.

A source reader (Hugging Face directory or GGUF file) produces a `Checkpoint`: the Hugging Face
config, tokenizer files and a lazily loaded float32 tensor for every Hugging Face parameter name.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from .errors import ExportError

SUPPORTED_ARCHITECTURES = {"Qwen2ForCausalLM", "Qwen2MoeForCausalLM"}
MODEL_TYPES = ("qwen2", "qwen2_moe")


@dataclass
class Checkpoint:
    config: dict
    generation_config: dict
    tokenizer_json: dict
    tokenizer_config: dict
    # Hugging Face parameter name -> loader returning a float32 array in the Hugging Face shape.
    tensors: dict[str, Callable[[], np.ndarray]]
    source: dict = field(default_factory=dict)  # kind, name, sha256
    # GGUF sources: Hugging Face name -> the tensor's GGUF type name ("Q4_K", "Q6_K", "F16", ...)
    # and a loader of its raw blocks, uint8 [rows, row bytes] (int4k carries Q4_K blocks as they are).
    gguf_types: dict[str, str] = field(default_factory=dict)
    raw_blocks: dict[str, Callable[[], np.ndarray]] = field(default_factory=dict)

    @property
    def tied(self) -> bool:
        return "lm_head.weight" not in self.tensors

    def dims(self) -> "Dims":
        return Dims.from_config(self.config)


@dataclass(frozen=True)
class Moe:
    """Qwen2-MoE's sparse MLP (transformers' Qwen2MoeSparseMoeBlock): a router over `experts` experts of
    width `intermediate`, the `top_k` best per token (their softmax probabilities renormalized to sum 1
    when `norm_topk_prob`), plus a shared expert of width `shared_intermediate` scaled by a sigmoid gate."""
    experts: int
    top_k: int
    intermediate: int
    shared_intermediate: int
    norm_topk_prob: bool
    # The layers with a sparse MLP; the others keep a dense one of the config's intermediate_size.
    sparse_layers: tuple[int, ...]

    @staticmethod
    def from_config(cfg: dict, layers: int) -> "Moe | None":
        if cfg.get("model_type") != "qwen2_moe":
            return None
        experts = int(cfg.get("num_experts", 60))
        step = int(cfg.get("decoder_sparse_step", 1))
        dense = set(cfg.get("mlp_only_layers") or [])
        moe = Moe(
            experts=experts,
            top_k=int(cfg.get("num_experts_per_tok", 4)),
            intermediate=int(cfg.get("moe_intermediate_size", 1408)),
            shared_intermediate=int(cfg.get("shared_expert_intermediate_size", 5632)),
            norm_topk_prob=bool(cfg.get("norm_topk_prob", False)),
            # transformers' Qwen2MoeDecoderLayer rule.
            sparse_layers=tuple(i for i in range(layers)
                                if i not in dense and experts > 0 and step > 0 and (i + 1) % step == 0),
        )
        if moe.sparse_layers and not 0 < moe.top_k <= experts:
            raise ExportError(f"num_experts_per_tok {moe.top_k} must be between 1 and num_experts {experts}")
        if moe.sparse_layers and (moe.intermediate <= 0 or moe.shared_intermediate <= 0):
            raise ExportError("moe_intermediate_size and shared_expert_intermediate_size must be positive")
        return moe

    def sparse(self, layer: int) -> bool:
        return layer in self.sparse_layers


@dataclass(frozen=True)
class Dims:
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int
    vocab: int
    eps: float
    moe: Moe | None = None

    @staticmethod
    def from_config(cfg: dict) -> "Dims":
        try:
            heads = int(cfg["num_attention_heads"])
            hidden = int(cfg["hidden_size"])
            layers = int(cfg["num_hidden_layers"])
            dims = Dims(
                hidden=hidden,
                layers=layers,
                heads=heads,
                kv_heads=int(cfg.get("num_key_value_heads") or heads),
                head_dim=int(cfg.get("head_dim") or hidden // heads),
                intermediate=int(cfg["intermediate_size"]),
                vocab=int(cfg["vocab_size"]),
                eps=float(cfg.get("rms_norm_eps", 1e-6)),
                moe=Moe.from_config(cfg, layers),
            )
        except KeyError as e:
            raise ExportError(f"config.json lacks required key {e.args[0]!r}") from None
        except (TypeError, ValueError) as e:
            raise ExportError(f"config.json: {_first_line(e)}") from None
        if dims.heads % dims.kv_heads:
            raise ExportError(f"num_attention_heads {heads} is not a multiple of num_key_value_heads {dims.kv_heads}")
        if dims.head_dim % 2:
            raise ExportError(f"head_dim {dims.head_dim} is odd: rotary embedding needs an even head_dim")
        return dims


def _first_line(e: Exception) -> str:
    return str(e).splitlines()[0] if str(e) else type(e).__name__


def mlp_names(prefix: str) -> list[str]:
    """A SwiGLU MLP's three matrices under `prefix` (e.g. `model.layers.0.mlp.`)."""
    return [prefix + f"{m}_proj.weight" for m in ("gate", "up", "down")]


def expected_tensor_names(dims: Dims, tied: bool) -> list[str]:
    names = ["model.embed_tokens.weight"]
    for i in range(dims.layers):
        p = f"model.layers.{i}."
        names += [p + "input_layernorm.weight"]
        for proj in ("q", "k", "v"):
            names += [p + f"self_attn.{proj}_proj.weight", p + f"self_attn.{proj}_proj.bias"]
        names += [p + "self_attn.o_proj.weight", p + "post_attention_layernorm.weight"]
        if dims.moe and dims.moe.sparse(i):
            names += [p + "mlp.gate.weight", p + "mlp.shared_expert_gate.weight"]
            names += mlp_names(p + "mlp.shared_expert.")
            for e in range(dims.moe.experts):
                names += mlp_names(p + f"mlp.experts.{e}.")
        else:
            names += mlp_names(p + "mlp.")
    names += ["model.norm.weight"]
    if not tied:
        names += ["lm_head.weight"]
    return names


def expected_shape(name: str, dims: Dims) -> tuple[int, ...]:
    h, hd = dims.hidden, dims.head_dim
    q_out, kv_out = dims.heads * hd, dims.kv_heads * hd
    if dims.moe:
        moe = dims.moe
        if name.endswith(".mlp.gate.weight"):  # the router
            return (moe.experts, h)
        if name.endswith(".mlp.shared_expert_gate.weight"):
            return (1, h)
        width = moe.intermediate if ".mlp.experts." in name else (
            moe.shared_intermediate if ".mlp.shared_expert." in name else None)
        if width is not None:
            return (h, width) if name.endswith("down_proj.weight") else (width, h)
    table = {
        "embed_tokens.weight": (dims.vocab, h),
        "lm_head.weight": (dims.vocab, h),
        "norm.weight": (h,),
        "input_layernorm.weight": (h,),
        "post_attention_layernorm.weight": (h,),
        "q_proj.weight": (q_out, h),
        "q_proj.bias": (q_out,),
        "k_proj.weight": (kv_out, h),
        "k_proj.bias": (kv_out,),
        "v_proj.weight": (kv_out, h),
        "v_proj.bias": (kv_out,),
        "o_proj.weight": (h, q_out),
        "gate_proj.weight": (dims.intermediate, h),
        "up_proj.weight": (dims.intermediate, h),
        "down_proj.weight": (h, dims.intermediate),
    }
    for suffix, shape in table.items():
        if name.endswith(suffix):
            return shape
    raise ExportError(f"unexpected tensor {name}")


def validate(ckpt: Checkpoint) -> Dims:
    """Check architecture, config and that every tensor the graph needs is present."""
    archs = ckpt.config.get("architectures") or ["Qwen2ForCausalLM"]
    if ckpt.config.get("model_type", "qwen2") not in MODEL_TYPES or not set(archs) & SUPPORTED_ARCHITECTURES:
        raise ExportError(
            f"unsupported architecture {archs} / model_type {ckpt.config.get('model_type')!r}: only Qwen2 (and Qwen2.5) decoders and Qwen2-MoE are supported"
        )
    if ckpt.config.get("qkv_bias", True) is not True:
        raise ExportError("qkv_bias = false is not supported (Qwen2 and Qwen2-MoE projections have biases)")
    if ckpt.config.get("use_sliding_window"):
        raise ExportError("use_sliding_window = true is not supported (Qwen2 models ship with it off)")
    dims = ckpt.dims()
    missing = [n for n in expected_tensor_names(dims, ckpt.tied) if n not in ckpt.tensors]
    if missing:
        raise ExportError(f"checkpoint lacks {len(missing)} tensors, first: {missing[0]}")
    return dims


def rope_parameters(cfg: dict) -> dict:
    """Normalise the two config spellings (transformers 4: rope_theta + rope_scaling,
    transformers 5: rope_parameters) to one dict with rope_type and rope_theta."""
    params = dict(cfg.get("rope_parameters") or cfg.get("rope_scaling") or {})
    params.setdefault("rope_type", params.pop("type", "default"))
    params.setdefault("rope_theta", cfg.get("rope_theta", 10000.0))
    return params


def rotary_inv_freq(cfg: dict, dims: Dims) -> tuple[np.ndarray, float]:
    """Inverse frequencies and the cos/sin scale (YaRN's attention factor), in float32 as
    transformers computes them (modeling_rope_utils)."""
    import math

    p = rope_parameters(cfg)
    base = float(p["rope_theta"])
    dim = dims.head_dim
    pos_freqs = np.float32(base) ** (np.arange(0, dim, 2, dtype=np.float32) / np.float32(dim))
    inv_freq = (np.float32(1.0) / pos_freqs).astype(np.float32)
    kind = p["rope_type"]
    if kind == "default":
        return inv_freq, 1.0
    if kind == "linear":
        return (inv_freq / np.float32(p["factor"])).astype(np.float32), 1.0
    if kind != "yarn":
        raise ExportError(f"rope type {kind!r} is not supported (default, linear and yarn are)")
    orig = p.get("original_max_position_embeddings") or cfg["max_position_embeddings"]
    factor = p.get("factor") or cfg["max_position_embeddings"] / orig

    def get_mscale(scale: float, m: float = 1.0) -> float:
        return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0

    attention_factor = p.get("attention_factor")
    if attention_factor is None:
        mscale, mscale_all = p.get("mscale"), p.get("mscale_all_dim")
        if mscale and mscale_all:
            attention_factor = get_mscale(factor, mscale) / get_mscale(factor, mscale_all)
        else:
            attention_factor = get_mscale(factor)
    beta_fast = p.get("beta_fast") or 32
    beta_slow = p.get("beta_slow") or 1

    def correction_dim(rotations: float) -> float:
        return (dim * math.log(orig / (rotations * 2 * math.pi))) / (2 * math.log(base))

    low, high = correction_dim(beta_fast), correction_dim(beta_slow)
    if p.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001
    ramp = np.clip((np.arange(dim // 2, dtype=np.float32) - np.float32(low)) / np.float32(high - low), 0, 1)
    extrapolation_factor = (np.float32(1) - ramp).astype(np.float32)
    interpolation = (np.float32(1.0) / (np.float32(factor) * pos_freqs)).astype(np.float32)
    inv = interpolation * (1 - extrapolation_factor) + inv_freq * extrapolation_factor
    return inv.astype(np.float32), float(attention_factor)
