"""Dual Chunk Attention's reference logits (dev-only, for make_fixtures.py's tiny-dca): a transformers
Qwen2 model whose attention is computed by the paper authors' own implementation, ChunkLlama's
`chunkqwen_attn_replace.py` (https://github.com/HKUNLP/ChunkLlama, Apache-2.0), loaded from a checkout
the caller names. Nothing of it is copied here; this file only runs it:

- its attention `forward` and `ChunkLlamaRotaryEmbedding` are called as they are, on an object that
  carries the attributes it reads (transformers 4.3x's attention module had them; 5.x's has not);
- it imports flash-attn, a CUDA library: `flash_attn_func` is provided here as plain softmax attention
  in float32 (outputs and log-sum-exp, the two values its caller merges);
- it repeats the key/value heads twice (before and after the cache), which is right only without
  grouped-query attention, so it runs on the model's equivalent multi-head form: each key/value
  projection's rows repeated for every query head of its group (the same attention);
- it computes a whole sequence at once (its cached-decode path needs transformers 4.x's Cache API), so
  each greedy step runs the whole sequence again: the same arithmetic a cache would hold.
"""

from __future__ import annotations

import importlib.util
import math
import sys
import types
from pathlib import Path

import numpy as np
import torch


def _flash_attn_func(q, k, v, causal=False, return_attn_probs=False, **_):
    """flash-attn's signature ([batch, seq, heads, dim] in and out), float32 softmax attention;
    returns (output, log-sum-exp [batch, heads, seq], None) as flash-attn does with return_attn_probs."""
    scores = torch.einsum("bqhd,bkhd->bhqk", q.float(), k.float()) / math.sqrt(q.shape[-1])
    if causal:
        sq, sk = scores.shape[-2:]
        # flash-attn aligns the causal mask to the bottom right (equal lengths here: the diagonal).
        mask = torch.ones(sq, sk, dtype=torch.bool).tril(diagonal=sk - sq)
        scores = scores.masked_fill(~mask, float("-inf"))
    lse = torch.logsumexp(scores, dim=-1)
    out = torch.einsum("bhqk,bkhd->bqhd", torch.softmax(scores, dim=-1), v.float())
    return out.to(q.dtype), lse, None


def load_chunkqwen(checkout: Path, chunk_size: int, local_size: int):
    """The authors' module with its chunk settings (module globals there)."""
    shim = types.ModuleType("flash_attn.flash_attn_interface")
    shim.flash_attn_func = _flash_attn_func
    shim.flash_attn_qkvpacked_func = None
    sys.modules.setdefault("flash_attn", types.ModuleType("flash_attn"))
    sys.modules["flash_attn.flash_attn_interface"] = shim
    spec = importlib.util.spec_from_file_location("chunkqwen_attn_replace", checkout / "chunkqwen_attn_replace.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    module.chunk_size, module.local_window = chunk_size, local_size
    return module


def _repeated(proj: torch.nn.Linear, groups: int, head_dim: int) -> torch.nn.Linear:
    """A key/value projection with each head's rows repeated `groups` times."""
    heads = proj.out_features // head_dim
    out = torch.nn.Linear(proj.in_features, proj.out_features * groups, bias=proj.bias is not None)
    with torch.no_grad():
        w = proj.weight.view(heads, head_dim, -1).repeat_interleave(groups, dim=0)
        out.weight.copy_(w.reshape(-1, proj.in_features))
        if proj.bias is not None:
            out.bias.copy_(proj.bias.view(heads, head_dim).repeat_interleave(groups, dim=0).reshape(-1))
    return out


class _AttentionView:
    """The attributes the authors' attention `forward` reads, for one Qwen2 layer."""

    def __init__(self, attn, config, rotary):
        heads, head_dim = config.num_attention_heads, attn.head_dim
        groups = heads // config.num_key_value_heads
        self.q_proj, self.o_proj = attn.q_proj, attn.o_proj
        self.k_proj, self.v_proj = _repeated(attn.k_proj, groups, head_dim), _repeated(attn.v_proj, groups, head_dim)
        self.num_heads = self.num_key_value_heads = heads
        self.num_key_value_groups = 1
        self.head_dim, self.hidden_size = head_dim, heads * head_dim
        self.layer_idx, self.rotary_emb = attn.layer_idx, rotary


def install(model, checkout: Path, chunk_size: int, local_size: int) -> None:
    """Routes every attention layer of `model` (transformers' Qwen2ForCausalLM) through the authors' code."""
    module = load_chunkqwen(checkout, chunk_size, local_size)
    config = model.config
    head_dim = config.hidden_size // config.num_attention_heads
    theta = config.rope_parameters["rope_theta"] if hasattr(config, "rope_parameters") else config.rope_theta
    rotary = module.ChunkLlamaRotaryEmbedding(head_dim, base=theta)
    views = {}
    for layer in model.model.layers:
        attn = layer.self_attn
        views[attn.layer_idx] = _AttentionView(attn, config, rotary)

    def forward(self, hidden_states, position_embeddings=None, attention_mask=None, cache=None, **kwargs):
        out, _, _ = module.forward(views[self.layer_idx], hidden_states, position_ids=kwargs["position_ids"])
        return out, None

    for layer in model.model.layers:
        layer.self_attn.forward = types.MethodType(forward, layer.self_attn)


def reference(model, ids: list[int], steps: int = 8) -> dict[str, np.ndarray]:
    """make_fixtures.py's reference, each decode step a whole-sequence forward."""
    with torch.no_grad():
        prefill = model(torch.tensor([ids]), use_cache=False).logits[0].float()
        last, fed, logits = prefill[-1], [], []
        for _ in range(steps):
            top2 = torch.topk(last, 2).values
            if float(top2[0] - top2[1]) < 1e-3:
                raise RuntimeError("greedy margin too small for a stable fixture")
            fed.append(int(torch.argmax(last)))
            last = model(torch.tensor([ids + fed]), use_cache=False).logits[0, -1].float()
            logits.append(last.numpy())
    return {
        "prompt_ids": np.asarray(ids, dtype=np.int64),
        "prefill_logits": prefill.numpy().astype(np.float32),
        "decode_ids": np.asarray(fed, dtype=np.int64),
        "decode_logits": np.stack(logits).astype(np.float32),
    }
