"""Make the committed reference fixtures (dev-only: needs torch and transformers).

For each tiny random Qwen2 model this writes, under tests/fixtures/<name>/:
  checkpoint/               a Hugging Face checkpoint made by transformers (float32 safetensors)
  reference.safetensors     transformers' logits: prefill at every position, then 8 greedy decode steps
  reference.json            what produced them
  chat_template_cases.json  apply_chat_template(tokenize=False) for several message lists
and, given --demo-gguf, tests/fixtures/demo/ with transformers' own reading of the demo GGUF's
tokenizer (ids for a multilingual string set) and chat template renderings.
The bundles are exported afterwards with `python -m qwen2_export export` (see tests/fixtures/README.md).

usage: python tools/make_fixtures.py [--out ../tests/fixtures] [--demo-gguf PATH]
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

import numpy as np
import torch
import transformers
from safetensors.numpy import save_file
from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
from transformers import (PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM, Qwen2MoeConfig,
                          Qwen2MoeForCausalLM)

HERE = Path(__file__).resolve().parent
SPLIT = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]

CORPUS = [
    "The quick brown fox jumps over the lazy dog. The dog sleeps; the fox runs home.",
    "def reverse(s):\n    return s[::-1]\n\nprint(reverse('hello world'))\n",
    "for i in range(10):\n    if i % 2 == 0:\n        print(i, 'is even')\n",
    "Paris is the capital of France. Berlin is the capital of Germany. Rome is in Italy.",
    "Edge boxes run small language models: tokens stream back one at a time.",
    "你好，世界！今天天气很好。我们一起学习语言模型。",
    "Numbers 12345 and 3.14159 and 2026-11-26; emoji 🙂🚀 and tabs\tand  double  spaces.",
    "<html><body><p>Hello &amp; welcome</p></body></html>",
]

PROMPT = "def reverse(s):\n    return s[::-1]  # 你好 🙂"

# Router logits of the k-th and (k+1)-th expert at least this far apart at every token of the reference:
# int8 moves the tiny model's router logits by up to ~0.01.
ROUTING_MARGIN = 0.05
# A seed whose routing has clear top-k margins at every token of the reference (RouterMargins).
SEED_MOE = 11

MODELS = {
    "tiny-tied": dict(vocab=384, config=dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                              num_attention_heads=4, num_key_value_heads=2,
                                              max_position_embeddings=256, rope_theta=1000000.0,
                                              rms_norm_eps=1e-6, tie_word_embeddings=True)),
    "tiny-untied": dict(vocab=333, config=dict(hidden_size=48, intermediate_size=104, num_hidden_layers=3,
                                                num_attention_heads=3, num_key_value_heads=1,
                                                max_position_embeddings=200, rope_theta=10000.0,
                                                rms_norm_eps=1e-5, tie_word_embeddings=False)),
    "tiny-yarn": dict(vocab=384, config=dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                              num_attention_heads=4, num_key_value_heads=1,
                                              max_position_embeddings=256, rope_theta=1000000.0,
                                              rms_norm_eps=1e-6, tie_word_embeddings=True,
                                              rope_scaling={"type": "yarn", "factor": 4.0,
                                                            "original_max_position_embeddings": 64})),
    # Qwen2-MoE: 8 experts, top-2, a shared expert with its sigmoid gate; layer 1 dense (mlp_only_layers).
    "tiny-moe": dict(vocab=384, moe=True, seed=SEED_MOE,
                     config=dict(hidden_size=64, intermediate_size=96, num_hidden_layers=3,
                                 num_attention_heads=4, num_key_value_heads=2,
                                 max_position_embeddings=256, rope_theta=1000000.0,
                                 rms_norm_eps=1e-6, tie_word_embeddings=False,
                                 num_experts=8, num_experts_per_tok=2, moe_intermediate_size=32,
                                 shared_expert_intermediate_size=48, norm_topk_prob=False,
                                 decoder_sparse_step=1, mlp_only_layers=[1])),
    # Dual Chunk Attention in chunks of 6 (chunk_size 8, local_size 2): the prompt spans four chunks, so
    # queries meet keys of their own chunk, the one before and earlier ones. Reference: the authors'
    # implementation (chunkllama_reference.py; needs --chunkllama).
    "tiny-dca": dict(vocab=384, dca=dict(chunk_size=8, local_size=2),
                     config=dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                 num_attention_heads=4, num_key_value_heads=2,
                                 max_position_embeddings=256, rope_theta=10000.0,
                                 rms_norm_eps=1e-6, tie_word_embeddings=True,
                                 dual_chunk_attention_config=dict(chunk_size=8, local_size=2))),
}

WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Current weather for a city <in °C> & wind",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string", "description": "城市 name"},
                           "unit": {"type": "string", "enum": ["c", "f"]}},
            "required": ["city"],
        },
    },
}

CHAT_CASES = [
    dict(messages=[{"role": "user", "content": "hi"}], add_generation_prompt=True),
    dict(messages=[{"role": "system", "content": "You are terse."},
                   {"role": "user", "content": "What is 2+2?"},
                   {"role": "assistant", "content": "4"},
                   {"role": "user", "content": "And 3+3?"}], add_generation_prompt=True),
    dict(messages=[{"role": "user", "content": "你好！写一个函数 🙂\n  with  spaces"}], add_generation_prompt=False),
    dict(messages=[{"role": "user", "content": "Weather in Paris?"}], tools=[WEATHER_TOOL], add_generation_prompt=True),
    dict(messages=[{"role": "system", "content": "Use tools."},
                   {"role": "user", "content": "Weather in Paris and Lyon?"},
                   {"role": "assistant", "content": "",
                    "tool_calls": [{"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris"}}},
                                   {"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Lyon", "unit": "c"}}}]},
                   {"role": "tool", "content": "{\"temp\": 21}"},
                   {"role": "tool", "content": "{\"temp\": 19}"}],
         tools=[WEATHER_TOOL], add_generation_prompt=True),
]

DEMO_QUESTIONS = ["What is the capital of France?", "Write a Python function that reverses a string."]

MULTILINGUAL = [
    "Hello world, 你好！",
    "The capital of France is Paris.",
    "def add(a, b):\n    return a + b\n",
    "    indented\n\n\n  three newlines and   runs   of spaces  ",
    "emoji: 🙂🚀👍🏽 and ñ, é, ü, ß, Ωμέγα, привет, مرحبا, こんにちは, 안녕하세요",
    "numbers 1234567890 3.14159 -42 1e-9 0x1F",
    "<|im_start|>user\nWhat is 1+1?<|im_end|>\n<|im_start|>assistant\n",
    "<|endoftext|>tail",
    "tabs\tand\r\nwindows lines; don't it's we'll I'd",
    "",
]


def make_tokenizer(vocab_size: int) -> Tokenizer:
    tok = Tokenizer(models.BPE())
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(SPLIT), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(vocab_size=vocab_size - len(SPECIALS), show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), special_tokens=[])
    tok.train_from_iterator(CORPUS * 4, trainer)
    tok.add_special_tokens(SPECIALS)
    return tok


def randomize(model: Qwen2ForCausalLM, seed: int) -> None:
    """Larger-than-default weights, random norms and biases, so logits have clear margins and
    every parameter affects the output."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("mlp.gate.weight"):  # a MoE router: sharper routing, clear top-k margins
                p.copy_(4.0 * torch.randn(p.shape, generator=gen) / (p.shape[-1] ** 0.5))
            elif name.endswith("norm.weight"):
                p.copy_(1.0 + 0.2 * torch.randn(p.shape, generator=gen))
            elif name.endswith(".bias"):
                p.copy_(0.2 * torch.randn(p.shape, generator=gen))
            else:
                p.copy_(torch.randn(p.shape, generator=gen) / (p.shape[-1] ** 0.5))


def reference(model, ids: list[int], steps: int = 8) -> dict[str, np.ndarray]:
    with torch.no_grad():
        out = model(torch.tensor([ids]), use_cache=True)
        prefill = out.logits[0].float().numpy()
        past = out.past_key_values
        last = out.logits[0, -1]
        fed, logits = [], []
        for _ in range(steps):
            top2 = torch.topk(last, 2).values
            margin = float(top2[0] - top2[1])
            if margin < 1e-3:
                raise RuntimeError(f"greedy margin {margin} too small for a stable fixture")
            tok = int(torch.argmax(last))
            fed.append(tok)
            out = model(torch.tensor([[tok]]), past_key_values=past, use_cache=True)
            past = out.past_key_values
            last = out.logits[0, -1]
            logits.append(last.float().numpy())
    return {
        "prompt_ids": np.asarray(ids, dtype=np.int64),
        "prefill_logits": prefill.astype(np.float32),
        "decode_ids": np.asarray(fed, dtype=np.int64),
        "decode_logits": np.stack(logits).astype(np.float32),
    }


class RouterMargins:
    """The smallest gap, over every token and MoE layer a forward saw, between the k-th and the (k+1)-th
    router logit: a near tie there would let rounding pick another expert in another runtime."""

    def __init__(self, model, top_k: int):
        self.top_k, self.smallest = top_k, float("inf")
        for module in model.modules():
            if type(module).__name__ == "Qwen2MoeTopKRouter":
                module.register_forward_hook(self._seen)

    def _seen(self, _module, _inputs, output) -> None:
        top = torch.topk(output[0].float(), self.top_k + 1, dim=-1).values
        self.smallest = min(self.smallest, float((top[:, -2] - top[:, -1]).min()))


def _sha256(path: Path) -> str:
    import hashlib

    return hashlib.sha256(path.read_bytes()).hexdigest()


def dca_reference(model, spec: dict, ids: list[int], chunkllama: Path | None) -> dict[str, np.ndarray]:
    """Logits of the authors' Dual Chunk Attention; checked first to be transformers' own where a
    chunk holds the whole sequence (the harness around their code adds nothing)."""
    import chunkllama_reference

    if chunkllama is None:
        raise SystemExit("tiny-dca needs --chunkllama PATH (a checkout of github.com/HKUNLP/ChunkLlama)")
    with torch.no_grad():
        plain = model(torch.tensor([ids])).logits[0]
        chunkllama_reference.install(model, chunkllama, chunk_size=4 * len(ids), local_size=1)
        diff = float((model(torch.tensor([ids])).logits[0] - plain).abs().max())
    if diff > 1e-4:
        raise RuntimeError(f"the authors' attention in one chunk is {diff} from transformers'")
    chunkllama_reference.install(model, chunkllama, **spec["dca"])
    return chunkllama_reference.reference(model, ids)


def make_model(name: str, spec: dict, out: Path, seed: int, chunkllama: Path | None = None) -> None:
    target = out / name
    ckpt = target / "checkpoint"
    shutil.rmtree(ckpt, ignore_errors=True)
    ckpt.mkdir(parents=True)
    tok = make_tokenizer(spec["vocab"])
    template = (HERE / "chatml_template.jinja").read_text()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                   chat_template=template, clean_up_tokenization_spaces=False)
    fast.save_pretrained(ckpt)
    vocab = len(tok.get_vocab())
    ids = {s: tok.token_to_id(s) for s in SPECIALS}
    moe = spec.get("moe", False)
    config_class, model_class = (Qwen2MoeConfig, Qwen2MoeForCausalLM) if moe else (Qwen2Config, Qwen2ForCausalLM)
    config = config_class(vocab_size=vocab, bos_token_id=ids["<|endoftext|>"], eos_token_id=ids["<|im_end|>"],
                          pad_token_id=ids["<|endoftext|>"], **spec["config"])
    torch.manual_seed(seed)
    model = model_class(config).eval()
    model.config._attn_implementation = "eager"
    randomize(model, seed)
    model.save_pretrained(ckpt, safe_serialization=True)
    if moe:
        margins = RouterMargins(model, config.num_experts_per_tok)
    model.generation_config.eos_token_id = [ids["<|im_end|>"], ids["<|endoftext|>"]]
    model.generation_config.save_pretrained(ckpt)
    prompt_ids = tok.encode(PROMPT).ids
    ref = dca_reference(model, spec, prompt_ids, chunkllama) if "dca" in spec else reference(model, prompt_ids)
    if moe:
        if margins.smallest < ROUTING_MARGIN:
            raise RuntimeError(f"routing margin {margins.smallest} too small for a stable fixture")
        # The checkpoint (per-expert tensors, the hub's layout) reads back to the same logits.
        again = model_class.from_pretrained(ckpt).eval()
        again.config._attn_implementation = "eager"
        with torch.no_grad():
            diff = (again(torch.tensor([prompt_ids])).logits[0].numpy() - ref["prefill_logits"]).__abs__().max()
        if diff > 1e-5:
            raise RuntimeError(f"the saved checkpoint reads back {diff} away")
        print(f"{name}: smallest routing margin {margins.smallest:.4f}")
    save_file(ref, str(target / "reference.safetensors"))
    (target / "reference.json").write_text(json.dumps({
        "made_by": "onnx-export/tools/make_fixtures.py",
        "transformers": transformers.__version__,
        "torch": torch.__version__,
        "dtype": "float32",
        "attn_implementation": "ChunkLlama's chunkqwen_attn_replace.py" if "dca" in spec else "eager",
        "seed": seed,
        "prompt": PROMPT,
        "decode_steps": 8,
        **({"dual_chunk_attention": {**spec["dca"], "reference": "https://github.com/HKUNLP/ChunkLlama",
                                     "chunkqwen_attn_replace.py sha256": _sha256(chunkllama / "chunkqwen_attn_replace.py")}}
           if "dca" in spec else {}),
    }, indent=2, ensure_ascii=False) + "\n")
    cases = []
    for case in CHAT_CASES:
        rendered = fast.apply_chat_template(case["messages"], tools=case.get("tools"), tokenize=False,
                                            add_generation_prompt=case["add_generation_prompt"])
        cases.append({**case, "tools": case.get("tools"), "rendered": rendered})
    (target / "chat_template_cases.json").write_text(json.dumps(cases, indent=2, ensure_ascii=False) + "\n")
    print(f"{name}: vocab {vocab}, prompt {len(prompt_ids)} tokens")


def make_demo(gguf: Path, out: Path) -> None:
    """transformers' own GGUF tokenizer conversion and chat template, as references for ours."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    target = out / "demo"
    target.mkdir(parents=True, exist_ok=True)
    encodings = [{"text": t, "ids": tok.encode(t, add_special_tokens=False)} for t in MULTILINGUAL]
    (target / "tokenizer_cases.json").write_text(json.dumps(encodings, indent=2, ensure_ascii=False) + "\n")
    cases = []
    for case in CHAT_CASES:
        rendered = tok.apply_chat_template(case["messages"], tools=case.get("tools"), tokenize=False,
                                           add_generation_prompt=case["add_generation_prompt"])
        cases.append({**case, "tools": case.get("tools"), "rendered": rendered})
    (target / "chat_template_cases.json").write_text(json.dumps(cases, indent=2, ensure_ascii=False) + "\n")
    # transformers on the dequantized GGUF: greedy answer and the top logits at every position.
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32).eval()
    traces = []
    for question in DEMO_QUESTIONS:
        text = tok.apply_chat_template([{"role": "user", "content": question}], tokenize=False,
                                       add_generation_prompt=True)
        ids = tok(text, add_special_tokens=False).input_ids
        with torch.no_grad():
            out = model.generate(torch.tensor([ids]), max_new_tokens=24, do_sample=False)
            answer = out[0, len(ids):].tolist()
            logits = model(torch.tensor([ids + answer])).logits[0]
        top = torch.topk(logits, 8, dim=-1)
        traces.append({"question": question, "prompt": text, "prompt_ids": ids, "answer_ids": answer,
                       "answer": tok.decode(answer, skip_special_tokens=True),
                       "top_ids": top.indices.tolist(), "top_logits": top.values.tolist()})
    (target / "greedy_cases.json").write_text(json.dumps(traces, ensure_ascii=False) + "\n")
    (target / "reference.json").write_text(json.dumps({
        "made_by": "onnx-export/tools/make_fixtures.py --demo-gguf",
        "transformers": transformers.__version__,
        "gguf_sha256": "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
    }, indent=2) + "\n")
    print("demo: tokenizer and chat template cases written")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", type=Path, default=HERE.parent.parent / "tests" / "fixtures")
    ap.add_argument("--demo-gguf", type=Path)
    ap.add_argument("--skip-tiny", action="store_true", help="only the demo cases")
    ap.add_argument("--only", help="make only this tiny model (e.g. tiny-moe)")
    ap.add_argument("--chunkllama", type=Path, help="a checkout of github.com/HKUNLP/ChunkLlama (for tiny-dca)")
    args = ap.parse_args()
    if not args.skip_tiny:
        for seed, (name, spec) in enumerate(MODELS.items(), start=1):
            if args.only not in (None, name):
                continue
            if "dca" in spec and args.chunkllama is None and args.only is None:
                print(f"{name}: skipped (its reference needs --chunkllama PATH)")
                continue
            make_model(name, spec, args.out, spec.get("seed", seed), args.chunkllama)
    if args.demo_gguf:
        make_demo(args.demo_gguf, args.out)


if __name__ == "__main__":
    main()
