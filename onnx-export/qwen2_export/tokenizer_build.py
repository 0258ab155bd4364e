"""Build a Hugging Face tokenizer.json / tokenizer_config.json from a GGUF vocabulary.

GGUF stores a byte-level BPE vocabulary (`tokenizer.ggml.model = gpt2`) as its token strings
(already in the byte-to-unicode alphabet), merges as "left right" strings, and a type per token.
The Hugging Face file wants the same pieces arranged as a BPE model plus a list of added tokens.
"""

from __future__ import annotations

from .errors import ExportError

# The pre-tokenizer split pattern of Qwen2's tokenizer (GGUF `tokenizer.ggml.pre = qwen2`).
QWEN2_SPLIT_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)

# llama.cpp token types
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6


def _byte_level(kind: str) -> dict:
    return {"type": kind, "add_prefix_space": False, "trim_offsets": False, "use_regex": False}


def build_tokenizer_json(tokens: list[str], token_types: list[int], merges: list[str], pre: str) -> dict:
    if pre not in ("qwen2", "default", "gpt-2"):
        raise ExportError(f"GGUF pre-tokenizer {pre!r} is not supported (qwen2 is)")
    if len(tokens) != len(token_types):
        raise ExportError("GGUF tokenizer: tokens and token_type differ in length")
    vocab: dict[str, int] = {}
    added = []
    for i, (tok, kind) in enumerate(zip(tokens, token_types)):
        if kind in (NORMAL, BYTE, UNKNOWN):
            vocab[tok] = i
        elif kind in (CONTROL, USER_DEFINED):
            added.append(
                {
                    "id": i,
                    "content": tok,
                    "single_word": False,
                    "lstrip": False,
                    "rstrip": False,
                    "normalized": False,
                    "special": kind == CONTROL,
                }
            )
        # UNUSED: padding rows of the embedding ([PAD151665] …); no text maps to them.
    pairs = []
    for m in merges:
        parts = m.split(" ")
        if len(parts) != 2:
            raise ExportError(f"GGUF tokenizer: malformed merge {m!r}")
        pairs.append(parts)
    return {
        "version": "1.0",
        "truncation": None,
        "padding": None,
        "added_tokens": added,
        "normalizer": {"type": "NFC"},
        "pre_tokenizer": {
            "type": "Sequence",
            "pretokenizers": [
                {"type": "Split", "pattern": {"Regex": QWEN2_SPLIT_PATTERN}, "behavior": "Isolated", "invert": False},
                _byte_level("ByteLevel"),
            ],
        },
        "post_processor": _byte_level("ByteLevel"),
        "decoder": _byte_level("ByteLevel"),
        "model": {
            "type": "BPE",
            "dropout": None,
            "unk_token": None,
            "continuing_subword_prefix": "",
            "end_of_word_suffix": "",
            "fuse_unk": False,
            "byte_fallback": False,
            "ignore_merges": False,
            "vocab": vocab,
            "merges": pairs,
        },
    }


def build_tokenizer_config(tokenizer_json: dict, tokens: list[str], chat_template: str | None,
                           eos_id: int | None, pad_id: int | None, bos_id: int | None,
                           add_bos: bool, max_length: int) -> dict:
    def tok(i):
        return tokens[i] if i is not None and 0 <= i < len(tokens) else None

    decoder = {
        str(t["id"]): {k: t[k] for k in ("content", "lstrip", "normalized", "rstrip", "single_word", "special")}
        for t in tokenizer_json["added_tokens"]
    }
    cfg = {
        "add_bos_token": bool(add_bos),
        "add_prefix_space": False,
        "added_tokens_decoder": decoder,
        "bos_token": tok(bos_id) if add_bos else None,
        "clean_up_tokenization_spaces": False,
        "eos_token": tok(eos_id),
        "errors": "replace",
        "model_max_length": max_length,
        "pad_token": tok(pad_id),
        "split_special_tokens": False,
        "tokenizer_class": "Qwen2Tokenizer",
        "unk_token": None,
    }
    if chat_template:
        cfg["chat_template"] = chat_template
    return cfg
