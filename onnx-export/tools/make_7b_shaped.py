"""A Hugging Face checkpoint with Qwen2-7B's tensor shapes but only a few of its 28 layers, random
bfloat16 weights made by transformers (dev-only: needs torch + transformers), for measuring the
exporter's memory and the native backend at 7B width on a machine that cannot hold a 7B.

    python tools/make_7b_shaped.py --layers 4 --tokenizer-from BUNDLE --out DIR

The tokenizer files are copied from an exported bundle of any Qwen2 model (they share one
tokenizer); the answers are noise, only shapes, memory and speed mean anything.
"""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

# Qwen2-7B's config.json (Qwen/Qwen2-7B), except num_hidden_layers.
QWEN2_7B = dict(
    vocab_size=152064, hidden_size=3584, intermediate_size=18944, num_attention_heads=28,
    num_key_value_heads=4, max_position_embeddings=131072, rope_theta=1000000.0, rms_norm_eps=1e-6,
    tie_word_embeddings=False, hidden_act="silu", bos_token_id=151643, eos_token_id=151643,
)


def make_shaped(description: str, shape: dict, architecture: str, default_layers: int | None = None) -> None:
    """The command line of the shaped-checkpoint tools: a transformers model `architecture` (a class name
    of transformers, its config class the same name with Config for ForCausalLM) of `shape` with random
    bfloat16 weights, saved with a bundle's tokenizer files."""
    ap = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=int, required=default_layers is None, default=default_layers)
    ap.add_argument("--tokenizer-from", type=Path, required=True, help="a bundle (or checkpoint) directory")
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args()

    import torch
    import transformers

    torch.manual_seed(0)
    config = getattr(transformers, architecture.replace("ForCausalLM", "Config"))(
        num_hidden_layers=args.layers, **shape)
    config.architectures = [architecture]
    model = getattr(transformers, architecture)(config).to(torch.bfloat16)
    model.save_pretrained(args.out, max_shard_size="2GB")
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(args.tokenizer_from / name, args.out / name)
    print(args.out)


def main() -> None:
    make_shaped(__doc__, QWEN2_7B, "Qwen2ForCausalLM")


if __name__ == "__main__":
    main()
