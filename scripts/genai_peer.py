"""ONNX Runtime GenAI as a benchmark peer (dev-only: its model builder needs torch).

    python scripts/genai_peer.py prepare --gguf FILE --work DIR         # -> DIR/int4-cpu (a GenAI model)
    python scripts/genai_peer.py bench --model DIR/int4-cpu [--threads 2] [--runs 3]   # -> one bench JSON
    python scripts/genai_peer.py agree --model DIR/int4-cpu --hf DIR/hf --bundle BUNDLE [--tokens 64]

`prepare` loads the demo GGUF with transformers (its own dequantization, not ours), saves it as
a Hugging Face checkpoint, and runs GenAI's model builder on it (`-p int4 -e cpu`: MatMulNBits
everywhere with its defaults, block 32, accuracy level 4). `bench` times the model the way
`qwen2-edge bench` times ours, in the fields of `qwen2-edge bench --json`: prefill of 128 and
512 random prompt tokens (time of `append_tokens`, which returns with the first logits), decode
of 128 greedy tokens one at a time after a 128-token prompt, medians of --runs after a warm-up,
and the peak RSS (VmHWM) of this process, whose Python interpreter adds ~30 MB of its own. Run
from scripts/bench.sh (`--genai`), never in CI.

`agree` measures what quantization costs each engine: transformers (float32, on the checkpoint
`prepare` made) answers the demo questions greedily for --tokens tokens (on past an end of turn:
every step is a prediction), then each int4 model is fed the same tokens (teacher-forced) and its
top-1 choice at every step is compared with transformers'; our bundle's variants run in ONNX
Runtime through the exporter's runner. Prints a table and one JSON line.
"""

from __future__ import annotations

import argparse
import json
import random
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

HF_NAME = "Qwen/Qwen2.5-Coder-0.5B-Instruct"
REPO = Path(__file__).resolve().parents[1]
# The demo questions as ChatML token ids (tests/fixtures/demo, made by transformers' chat template).
DEMO_CASES = REPO / "tests" / "fixtures" / "demo" / "greedy_cases.json"


def prepare(gguf: Path, work: Path) -> Path:
    hf = work / "hf"
    out = work / "int4-cpu"
    if not (hf / "config.json").exists():
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        print(f"genai_peer: dequantizing {gguf.name} with transformers into {hf}", file=sys.stderr)
        from safetensors.torch import save_file

        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
        # save_pretrained refuses a model loaded from GGUF; the float tensors and the config are all
        # a checkpoint is (the tied LM head is the embedding, as in the original checkpoint).
        config = model.config
        if hasattr(config, "quantization_config"):
            del config.quantization_config
        config.architectures = ["Qwen2ForCausalLM"]  # the builder dispatches on it; GGUF has none
        config.save_pretrained(hf)
        tensors = {k: v.contiguous() for k, v in model.state_dict().items()
                   if not (k == "lm_head.weight" and config.tie_word_embeddings)}
        save_file(tensors, hf / "model.safetensors", metadata={"format": "pt"})
        AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name).save_pretrained(hf)
    if not (out / "genai_config.json").exists():
        print(f"genai_peer: ONNX Runtime GenAI's builder, int4 CPU, into {out}", file=sys.stderr)
        built = subprocess.run([sys.executable, "-m", "onnxruntime_genai.models.builder", "-i", str(hf), "-o",
                                str(out), "-p", "int4", "-e", "cpu", "-c", str(work / "builder-cache")],
                               capture_output=True, text=True)
        if built.returncode != 0:
            sys.exit(f"genai_peer: the builder failed:\n{built.stdout[-3000:]}{built.stderr[-3000:]}")
    return out


def set_threads(model_dir: Path, threads: int) -> None:
    """The builder leaves the thread count to ONNX Runtime (every core); pin it like ours."""
    path = model_dir / "genai_config.json"
    config = json.loads(path.read_text())
    options = config["model"]["decoder"].setdefault("session_options", {})
    options["intra_op_num_threads"] = threads
    options["inter_op_num_threads"] = 1
    path.write_text(json.dumps(config, indent=4))


def peak_rss_mib() -> float | None:
    status = Path("/proc/self/status").read_text()
    m = re.search(r"VmHWM:\s+(\d+) kB", status)
    return int(m.group(1)) / 1024 if m else None


def bench(model_dir: Path, threads: int, runs: int) -> None:
    import onnxruntime_genai as og

    set_threads(model_dir, threads)
    model = og.Model(str(model_dir))
    vocab = 151_000  # below the tokenizer's size; random ids like llama-bench's
    rng = random.Random(0)

    def generator(max_length: int):
        params = og.GeneratorParams(model)
        params.set_search_options(max_length=max_length, do_sample=False)
        return og.Generator(model, params)

    def prefill(n: int) -> float:
        g = generator(n + 8)
        ids = [rng.randrange(vocab) for _ in range(n)]
        t = time.perf_counter()
        g.append_tokens(ids)
        return n / (time.perf_counter() - t)

    def decode(prompt: int, n: int) -> float:
        g = generator(prompt + n + 8)
        g.append_tokens([rng.randrange(vocab) for _ in range(prompt)])
        t = time.perf_counter()
        for _ in range(n):
            g.generate_next_token()
        return n / (time.perf_counter() - t)

    prefill(128), decode(128, 16)  # warm-up
    p128 = statistics.median(prefill(128) for _ in range(runs))
    p512 = statistics.median(prefill(512) for _ in range(runs))
    dec = statistics.median(decode(128, 128) for _ in range(runs))
    print(json.dumps({
        "backend": "ort-genai",
        "variant": "int4",
        "build": None,
        "kernels": f"onnxruntime-genai {og.__version__}",
        "threads": threads,
        "runs": runs,
        "prompt_tokens": 128,
        "gen_tokens": 128,
        "ttft_ms": 128_000.0 / p128,
        "prefill_tokens_per_s": p128,
        "prefill_long_tokens_per_s": p512,
        "decode_tokens_per_s": dec,
        "peak_rss_mib": peak_rss_mib(),
    }))


def reference_answers(hf: Path, prompts: list[list[int]], tokens: int) -> list[list[int]]:
    """transformers' greedy tokens, float32, `tokens` steps each (no stop at an end of turn)."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(hf, dtype=torch.float32)
    answers = []
    with torch.no_grad():
        for prompt in prompts:
            x, cache, answer = torch.tensor([prompt]), None, []
            for _ in range(tokens):
                out = model(input_ids=x, cache=cache, use_cache=True)  # transformers 5 names it `cache`
                cache = out.cache
                answer.append(int(out.logits[0, -1].argmax()))
                x = torch.tensor([[answer[-1]]])
            answers.append(answer)
    return answers


def genai_top1(model_dir: Path, prompt: list[int], answer: list[int]) -> list[bool]:
    """ONNX Runtime GenAI's own top-1 at every step of a teacher-forced answer."""
    import numpy as np
    import onnxruntime_genai as og

    model = og.Model(str(model_dir))
    params = og.GeneratorParams(model)
    params.set_search_options(max_length=len(prompt) + len(answer) + 8, do_sample=False)
    g = og.Generator(model, params)
    g.append_tokens(prompt)
    hits = []
    for token in answer:
        logits = np.asarray(g.get_logits())
        hits.append(int(logits.reshape(-1, logits.shape[-1])[-1].argmax()) == token)
        g.append_tokens([token])
    return hits


def agree(model_dir: Path, hf: Path, bundle: Path, variants: list[str], tokens: int) -> None:
    import numpy as np

    sys.path.insert(0, str(REPO / "onnx-export"))
    from qwen2_export.runner import OrtDecoder

    prompts = [case["prompt_ids"] for case in json.loads(DEMO_CASES.read_text())]
    answers = reference_answers(hf, prompts, tokens)
    rows = {}
    for variant in variants:
        dec = OrtDecoder(bundle, variant)
        hits = []
        for prompt, answer in zip(prompts, answers):
            trace = dec.forced(prompt, answer[:-1])
            predicted = np.concatenate([trace.prefill_logits[-1:], trace.decode_logits]).argmax(-1)
            hits.extend(bool(p == a) for p, a in zip(predicted, answer))
        rows[f"qwen2-edge {variant}"] = hits
    rows["onnxruntime-genai int4"] = [h for p, a in zip(prompts, answers) for h in genai_top1(model_dir, p, a)]
    print(f"top-1 agreement with transformers float32, {len(prompts)} demo questions x {tokens} tokens, teacher-forced")
    for name, hits in rows.items():
        print(f"  {name:<28} {sum(hits):>4} / {len(hits)}  {sum(hits) / len(hits):.1%}")
    print(json.dumps({name: sum(hits) / len(hits) for name, hits in rows.items()}))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("prepare")
    p.add_argument("--gguf", type=Path, required=True)
    p.add_argument("--work", type=Path, required=True)
    b = sub.add_parser("bench")
    b.add_argument("--model", type=Path, required=True)
    b.add_argument("--threads", type=int, default=2)
    b.add_argument("--runs", type=int, default=3)
    a = sub.add_parser("agree")
    a.add_argument("--model", type=Path, required=True)
    a.add_argument("--hf", type=Path, required=True, help="the checkpoint `prepare` dequantized (WORK/hf)")
    a.add_argument("--bundle", type=Path, required=True)
    a.add_argument("--variants", default="fp32-ort,int8-ort,int4-ort")
    a.add_argument("--tokens", type=int, default=64)
    args = ap.parse_args()
    if args.cmd == "prepare":
        print(prepare(args.gguf, args.work))
    elif args.cmd == "bench":
        bench(args.model, args.threads, args.runs)
    else:
        agree(args.model, args.hf, args.bundle, args.variants.split(","), args.tokens)


if __name__ == "__main__":
    main()
