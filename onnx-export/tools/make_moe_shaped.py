"""A Qwen2-MoE checkpoint at the 0.5B's width with random bfloat16 weights made by transformers
(dev-only: needs torch + transformers), for measuring the native backend's sparse MLP against the
dense 0.5B: the same attention, vocabulary and layers (Qwen2.5-0.5B's), every layer sparse with
8 experts of width 1216, top-2, and a shared expert of width 2432 — so a token's active MLP width,
2 x 1216 + 2432 = 4864, is the dense model's, while the layer holds 2.5 times its MLP weights.

    python tools/make_moe_shaped.py --tokenizer-from BUNDLE --out DIR [--layers 24]

The tokenizer files are copied from an exported bundle of any Qwen2 model (they share one
tokenizer); the answers are noise, only shapes, memory and speed mean anything.
"""

from __future__ import annotations

from make_7b_shaped import make_shaped

# Qwen2.5-0.5B's config.json (Qwen/Qwen2.5-0.5B-Instruct) with a sparse MLP in every layer.
QWEN2_MOE_05B = dict(
    vocab_size=151936, hidden_size=896, intermediate_size=4864, num_attention_heads=14,
    num_key_value_heads=2, max_position_embeddings=32768, rope_theta=1000000.0, rms_norm_eps=1e-6,
    tie_word_embeddings=True, hidden_act="silu", bos_token_id=151643, eos_token_id=151645,
    num_experts=8, num_experts_per_tok=2, moe_intermediate_size=1216, shared_expert_intermediate_size=2432,
    norm_topk_prob=False, decoder_sparse_step=1, mlp_only_layers=[],
)


def main() -> None:
    make_shaped(__doc__, QWEN2_MOE_05B, "Qwen2MoeForCausalLM", default_layers=24)


if __name__ == "__main__":
    main()
