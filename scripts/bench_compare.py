"""Same-run reference figures for scripts/bench.sh: llama.cpp (llama-cpp-python), and the table.

    python scripts/bench_compare.py quantize SRC.gguf DST.gguf q8_0|q4_0
    python scripts/bench_compare.py llamacpp MODEL.gguf [--threads 2] ...
    python scripts/bench_compare.py table RESULT.json ...

ONNX Runtime's figures come from `qwen2-edge bench --backend ort` (scripts/bench.sh). The llama.cpp
bench prints one JSON object with the fields of `qwen2-edge bench --json`: ttft_ms,
prefill_tokens_per_s (prompt of --prompt-tokens), decode_tokens_per_s (over --gen-tokens greedy
tokens), prefill_long_tokens_per_s (prompt of --long-prompt-tokens), peak_rss_mib (after the
answer runs), each a median of --runs runs. The prompt is the same filler text qwen2-edge's
bench uses (src/bench.rs), cut to the same number of tokens by each engine's own tokenizer.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import sys
import time
from pathlib import Path

FILLER = ("The quick brown fox jumps over the lazy dog while the edge box "
          "streams tokens back to the operator. 边缘设备上的小模型也能快速回答问题。 ")


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def quantize(src: str, dst: str, kind: str) -> None:
    """llama.cpp's own quantizer (llama_model_quantize), requantizing the Q4_K_M demo GGUF."""
    import llama_cpp

    ftype = {"q8_0": llama_cpp.LLAMA_FTYPE_MOSTLY_Q8_0, "q4_0": llama_cpp.LLAMA_FTYPE_MOSTLY_Q4_0}[kind]
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = ftype
    params.allow_requantize = True
    params.nthread = 2
    rc = llama_cpp.llama_model_quantize(src.encode(), dst.encode(), params)
    if rc != 0:
        sys.exit(f"llama_model_quantize failed ({rc})")


def llamacpp(args) -> dict:
    import numpy as np
    from llama_cpp import Llama

    n_ctx = max(args.prompt_tokens + args.gen_tokens, args.long_prompt_tokens + 1) + 8
    llm = Llama(model_path=args.model, n_threads=args.threads, n_threads_batch=args.threads,
                n_ctx=n_ctx, n_batch=512, n_ubatch=512, verbose=False)
    vocab = llm.n_vocab()
    text = FILLER * (max(args.prompt_tokens, args.long_prompt_tokens) // 8 + 1)
    ids = llm.tokenize(text.encode(), add_bos=False, special=False)

    def last_argmax() -> int:
        logits = np.ctypeslib.as_array(llm._ctx.get_logits(), shape=(vocab,))
        return int(np.argmax(logits))

    def answer(n_prompt: int, n_gen: int):
        llm.reset()
        llm._ctx.kv_cache_clear() if hasattr(llm._ctx, "kv_cache_clear") else None
        prompt = ids[:n_prompt]
        t0 = time.perf_counter()
        llm.eval(prompt)
        token = last_argmax()
        t1 = time.perf_counter()
        for _ in range(n_gen - 1):
            llm.eval([token])
            token = last_argmax()
        t2 = time.perf_counter()
        decode = (n_gen - 1) / (t2 - t1) if n_gen > 1 else float("nan")
        return (t1 - t0) * 1000.0, n_prompt / (t1 - t0), decode

    return measure(args, answer, "llama.cpp", Path(args.model).name)


def measure(args, answer, backend: str, variant: str) -> dict:
    answer(16, 2)  # warm-up: first-call allocations and kernel selection
    runs = [answer(args.prompt_tokens, args.gen_tokens) for _ in range(args.runs)]
    rss = peak_rss_mib()
    long = [answer(args.long_prompt_tokens, 1)[1] for _ in range(args.runs)] if args.long_prompt_tokens else []
    med = lambda xs: statistics.median(xs)  # noqa: E731
    return {
        "backend": backend,
        "variant": variant,
        "threads": args.threads,
        "runs": args.runs,
        "prompt_tokens": args.prompt_tokens,
        "gen_tokens": args.gen_tokens,
        "ttft_ms": med([r[0] for r in runs]),
        "prefill_tokens_per_s": med([r[1] for r in runs]),
        "decode_tokens_per_s": med([r[2] for r in runs]),
        "long_prompt_tokens": args.long_prompt_tokens,
        "prefill_long_tokens_per_s": med(long) if long else None,
        "peak_rss_mib": rss,
    }


def table(files: list[str]) -> None:
    """Markdown table of bench JSON objects (qwen2-edge and the two references) and the ratios."""
    rows = [json.loads(Path(f).read_text()) for f in files]

    def name(r: dict) -> str:
        if r["backend"] == "native":
            return f"qwen2-edge {r['variant']} ({r.get('kernels') or '?'})"
        if r["backend"] == "llama.cpp":
            q = next((q for q in ("q8_0", "q4_0", "q4_k_m") if q in r["variant"].lower()), r["variant"])
            return f"llama.cpp {q.upper()}"
        return f"qwen2-edge --backend ort {r['variant']} (ONNX Runtime CPU)"

    fmt = lambda v, d=1: "n/a" if v is None else f"{v:.{d}f}"  # noqa: E731
    pct = lambda v: "n/a" if v is None else f"{100 * v:.0f}%"  # noqa: E731
    print("| engine | TTFT ms (128) | prefill 128 t/s | prefill 512 t/s | decode t/s (128) | peak RSS MiB "
          "| weights GB/s | of memory BW |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {name(r)} | {fmt(r['ttft_ms'])} | {fmt(r['prefill_tokens_per_s'])} | "
              f"{fmt(r.get('prefill_long_tokens_per_s'))} | {fmt(r['decode_tokens_per_s'], 2)} | "
              f"{fmt(r.get('peak_rss_mib'), 0)} | {fmt(r.get('decode_weight_gb_per_s'))} | "
              f"{pct(r.get('decode_bandwidth_fraction'))} |")
    bw = [r["memory_read_gb_per_s"] for r in rows if r.get("memory_read_gb_per_s")]
    if bw:
        print(f"\nmemory read bandwidth (same threads, a buffer as large as the weights, measured after each qwen2-edge run): "
              f"{min(bw):.1f}-{max(bw):.1f} GB/s")

    def find(backend: str, key: str):
        return next((r for r in rows if r["backend"] == backend and key in r["variant"].lower()), None)

    def ratio(label: str, a, b, field: str) -> None:
        if a and b and a.get(field) and b.get(field):
            print(f"{label}: {a[field] / b[field]:.2f}x ({a[field]:.1f} / {b[field]:.1f})")

    n4, n8 = find("native", "int4"), find("native", "int8")
    ort4 = find("ort", "int4")
    l4, l8 = find("llama.cpp", "q4_0"), find("llama.cpp", "q8_0")
    print()
    ratio("decode int4 / ONNX Runtime int4", n4, ort4, "decode_tokens_per_s")
    ratio("decode int4 / llama.cpp Q4_0", n4, l4, "decode_tokens_per_s")
    ratio("decode int8 / llama.cpp Q8_0", n8, l8, "decode_tokens_per_s")
    best4 = max((r for r in (ort4, l4) if r), key=lambda r: r["prefill_tokens_per_s"], default=None)
    ratio("prefill 128 int4 / best int4 reference", n4, best4, "prefill_tokens_per_s")
    ratio("prefill 128 int8 / llama.cpp Q8_0", n8, l8, "prefill_tokens_per_s")
    ratio("prefill 512 int4 / llama.cpp Q4_0", n4, l4, "prefill_long_tokens_per_s")
    ratio("peak RSS int4 / llama.cpp Q4_0", n4, l4, "peak_rss_mib")


def main() -> None:
    p = argparse.ArgumentParser()
    sub = p.add_subparsers(dest="cmd", required=True)
    q = sub.add_parser("quantize")
    q.add_argument("src")
    q.add_argument("dst")
    q.add_argument("kind", choices=["q8_0", "q4_0"])
    t = sub.add_parser("table")
    t.add_argument("files", nargs="+")
    b = sub.add_parser("llamacpp")
    b.add_argument("model")
    b.add_argument("--threads", type=int, default=2)
    b.add_argument("--prompt-tokens", type=int, default=128)
    b.add_argument("--gen-tokens", type=int, default=128)
    b.add_argument("--long-prompt-tokens", type=int, default=512)
    b.add_argument("--runs", type=int, default=3)
    args = p.parse_args()
    if args.cmd == "quantize":
        quantize(args.src, args.dst, args.kind)
    elif args.cmd == "table":
        table(args.files)
    else:
        print(json.dumps(llamacpp(args)))


if __name__ == "__main__":
    main()
