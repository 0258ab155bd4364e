"""Same-run reference figures for scripts/bench.sh: llama.cpp's llama-bench output, and the table.

    python scripts/bench_compare.py llamabench LLAMA_BENCH.json LABEL [BUILD]   # -> one bench JSON object
    python scripts/bench_compare.py table RESULT.json ...

llama-bench (llama.cpp's own benchmark, `-p 128,512 -n 128 -o json`) reports prompt processing
(pp128, pp512: a batch of that many prompt tokens, no sampling) and text generation (tg128: 128
tokens one at a time after an empty prompt), each as tokens/s over `-r` repetitions after a
warm-up. `llamabench` turns that into the fields of `qwen2-edge bench --json`
(prefill_tokens_per_s = median pp128, prefill_long_tokens_per_s = median pp512,
decode_tokens_per_s = median tg128; ttft_ms is 128 / pp128, the prompt's share of a first token).
BUILD names a llama.cpp built for less than this CPU has (`avx2`: the same-ISA peer of the
avx2-fma tier on an AVX-512 machine); the table then compares that tier with it, and with the
native build too. ONNX Runtime's figures come from `qwen2-edge bench --backend ort`
(scripts/bench.sh), ONNX Runtime GenAI's from scripts/genai_peer.py (`--genai`).
"""

from __future__ import annotations

import json
import statistics
import sys
from pathlib import Path


def llamabench(path: str, label: str, build: str | None = None) -> None:
    runs = json.loads(Path(path).read_text())

    def median_ts(n_prompt: int, n_gen: int):
        for r in runs:
            if r["n_prompt"] == n_prompt and r["n_gen"] == n_gen:
                return statistics.median(r.get("samples_ts") or [r["avg_ts"]])
        return None

    pp128, pp512, tg128 = median_ts(128, 0), median_ts(512, 0), median_ts(0, 128)
    first = runs[0]
    print(json.dumps({
        "backend": "llama.cpp",
        "variant": label,
        "build": build,
        "kernels": first.get("cpu_info"),
        "threads": first.get("n_threads"),
        "runs": len(first.get("samples_ts") or []),
        "prompt_tokens": 128,
        "gen_tokens": 128,
        "ttft_ms": 128_000.0 / pp128 if pp128 else None,
        "prefill_tokens_per_s": pp128,
        "prefill_long_tokens_per_s": pp512,
        "decode_tokens_per_s": tg128,
        "peak_rss_mib": None,
    }))


def table(files: list[str]) -> None:
    """Markdown table of bench JSON objects (qwen2-edge per tier and the references) and the ratios."""
    rows = [json.loads(Path(f).read_text()) for f in files]

    def name(r: dict) -> str:
        if r["backend"] == "native":
            return f"qwen2-edge {r['variant']} ({r.get('kernels') or '?'})"
        if r["backend"] == "llama.cpp":
            build = f" ({r['build'].upper()} build)" if r.get("build") else ""
            return f"llama.cpp {r['variant']}{build}"
        if r["backend"] == "ort-genai":
            return f"ONNX Runtime GenAI {r['variant']} ({r.get('kernels')}, its model builder)"
        return f"qwen2-edge --backend ort {r['variant']} (ONNX Runtime CPU)"

    fmt = lambda v, d=1: "n/a" if v is None else f"{v:.{d}f}"  # noqa: E731
    pct = lambda v: "n/a" if v is None else f"{100 * v:.0f}%"  # noqa: E731
    print("| engine | TTFT ms (128) | prefill 128 t/s | prefill 512 t/s | decode t/s (128) | peak RSS MiB "
          "| weights GB/s | of memory BW |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {name(r)} | {fmt(r.get('ttft_ms'))} | {fmt(r.get('prefill_tokens_per_s'))} | "
              f"{fmt(r.get('prefill_long_tokens_per_s'))} | {fmt(r.get('decode_tokens_per_s'), 2)} | "
              f"{fmt(r.get('peak_rss_mib'), 0)} | {fmt(r.get('decode_weight_gb_per_s'))} | "
              f"{pct(r.get('decode_bandwidth_fraction'))} |")
    bw = [r["memory_read_gb_per_s"] for r in rows if r.get("memory_read_gb_per_s")]
    if bw:
        print(f"\nmemory read bandwidth (same threads, a buffer as large as the weights, measured after each "
              f"qwen2-edge run): {min(bw):.1f}-{max(bw):.1f} GB/s")
    fallbacks = {r.get("kernels"): r.get("kernel_fallbacks") for r in rows if r["backend"] == "native"}
    for tier, f in fallbacks.items():
        if f:
            print(f"WARNING: tier {tier} falls back to the generic kernels for {', '.join(f)}")

    def ref(backend: str, variant: str, build: str | None = None):
        return next((r for r in rows if r["backend"] == backend and r["variant"].lower() == variant
                     and r.get("build") == build), None)

    def ratio(label: str, a, b, field: str, target: float | None = None) -> None:
        if a and b and a.get(field) and b.get(field):
            value = a[field] / b[field]
            mark = "" if target is None else (f"  [target >= {target}x: {'met' if value >= target else 'MISSED'}]")
            print(f"{label}: {value:.2f}x ({a[field]:.1f} / {b[field]:.1f}){mark}")

    ort4 = ref("ort", "int4-ort")
    genai = ref("ort-genai", "int4")
    if ort4 and genai:
        print("\nqwen2-edge --backend ort int4-ort / ONNX Runtime GenAI int4 (issue 16):")
        ratio("  decode", ort4, genai, "decode_tokens_per_s", 0.9)
        ratio("  prefill 128", ort4, genai, "prefill_tokens_per_s", 0.9)
        ratio("  prefill 512", ort4, genai, "prefill_long_tokens_per_s")
        if ort4.get("peak_rss_mib") and genai.get("peak_rss_mib"):
            ok = ort4["peak_rss_mib"] <= genai["peak_rss_mib"]
            print(f"  peak RSS: {ort4['peak_rss_mib']:.0f} / {genai['peak_rss_mib']:.0f} MiB  "
                  f"[target <= GenAI's: {'met' if ok else 'MISSED'}]")
    native = [ref("llama.cpp", q) for q in ("q4_0", "q8_0", "f16")]
    avx2 = [ref("llama.cpp", q, "avx2") for q in ("q4_0", "q8_0", "f16")]
    tiers = list(dict.fromkeys(r.get("kernels") for r in rows if r["backend"] == "native"))
    for tier in tiers:
        mine = {r["variant"]: r for r in rows if r["backend"] == "native" and r.get("kernels") == tier}
        # The portable tier's only target is against the SIMD tiers (below), not llama.cpp.
        marks = tier != "generic"
        # The AVX2 tier's targets are against llama.cpp on AVX2 where that build ran (on an AVX2
        # box that is the native one); against this CPU's native build it is shown as well.
        same_isa = tier == "avx2-fma" and any(avx2)
        l4, l8, l16 = avx2 if same_isa else native
        best4 = max((r for r in (l4, ort4) if r), key=lambda r: r["decode_tokens_per_s"] or 0, default=None)
        print(f"\n{tier}:" + (" (targets against llama.cpp's AVX2 build)" if same_isa else ""))
        prefill, decode, fp16 = (1.2, 1.25, 1.0) if marks else (None, None, None)
        ratio("  prefill 128 int4 / llama.cpp Q4_0", mine.get("int4"), l4, "prefill_tokens_per_s", prefill)
        ratio("  prefill 128 int8 / llama.cpp Q8_0", mine.get("int8"), l8, "prefill_tokens_per_s", prefill)
        if best4:
            ratio(f"  decode int4 / faster int4 reference ({name(best4)})", mine.get("int4"), best4,
                  "decode_tokens_per_s", decode)
        ratio("  decode int4 / llama.cpp Q4_0", mine.get("int4"), l4, "decode_tokens_per_s")
        ratio("  decode int4 / ONNX Runtime int4", mine.get("int4"), ort4, "decode_tokens_per_s")
        ratio("  decode int8 / llama.cpp Q8_0", mine.get("int8"), l8, "decode_tokens_per_s", decode)
        ratio("  decode fp16 / llama.cpp F16", mine.get("fp16"), l16, "decode_tokens_per_s", fp16)
        ratio("  prefill 512 int4 / llama.cpp Q4_0", mine.get("int4"), l4, "prefill_long_tokens_per_s")
        ratio("  prefill 512 int8 / llama.cpp Q8_0", mine.get("int8"), l8, "prefill_long_tokens_per_s")
        if same_isa:
            n4, n8, n16 = native
            ratio("  against this CPU's native llama.cpp: prefill 128 int4 / Q4_0", mine.get("int4"), n4,
                  "prefill_tokens_per_s")
            ratio("  against this CPU's native llama.cpp: prefill 128 int8 / Q8_0", mine.get("int8"), n8,
                  "prefill_tokens_per_s")
            ratio("  against this CPU's native llama.cpp: decode int4 / Q4_0", mine.get("int4"), n4,
                  "decode_tokens_per_s")
            ratio("  against this CPU's native llama.cpp: decode int8 / Q8_0", mine.get("int8"), n8,
                  "decode_tokens_per_s")
            ratio("  against this CPU's native llama.cpp: decode fp16 / F16", mine.get("fp16"), n16,
                  "decode_tokens_per_s")
    generic = {r["variant"]: r for r in rows if r["backend"] == "native" and r.get("kernels") == "generic"}
    print()
    for tier in tiers:
        if tier == "generic":
            continue
        simd = {r["variant"]: r for r in rows if r["backend"] == "native" and r.get("kernels") == tier}
        for v in ("int8", "int4"):
            ratio(f"generic / {tier} decode {v}", generic.get(v), simd.get(v), "decode_tokens_per_s",
                  0.3 if v == "int8" else None)


def main() -> None:
    if len(sys.argv) >= 2 and sys.argv[1] == "table":
        table(sys.argv[2:])
    elif len(sys.argv) in (4, 5) and sys.argv[1] == "llamabench":
        llamabench(*sys.argv[2:])
    else:
        sys.exit(__doc__)


if __name__ == "__main__":
    main()
