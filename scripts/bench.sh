#!/usr/bin/env bash
# End-to-end benchmark of the native backend, every kernel tier this CPU has, against llama.cpp
# and ONNX Runtime, in one run on one machine, 2 threads each (README "Benchmarks"). Not a test:
# prints a table and the ratios against the targets.
#
#   scripts/bench.sh [--runs N] [--threads T] [--bundle DIR] [--gguf FILE] [--variants "int4 int8 ..."]
#                    [--tiers "avx2-fma generic"] [--generic-variants "int8 int4"] [--genai]
#
# * qwen2-edge: `qwen2-edge bench --json --kernels TIER` per tier and variant (TTFT, prefill 128
#   and 512, decode over 128 tokens, peak RSS; medians of --runs). --tiers defaults to every
#   tier `qwen2-edge info` lists for this CPU, best first, each forced; the portable `generic`
#   tier runs --generic-variants only (its prefill is slow by design).
# * llama.cpp: its own llama-bench (pp128, pp512, tg128; -r --runs) and llama-quantize, built
#   with cmake from the llama.cpp tree in the llama-cpp-python sdist into the cache
#   (scripts/lib.sh ensure_llamacpp; ~10 min on 2 cores the first time). The demo GGUF (Q4_K_M)
#   is requantized to Q8_0, Q4_0 and F16 by llama-quantize. Where the CPU has AVX-512 and the
#   avx2-fma tier runs, the same tree built for AVX2 only (ensure_llamacpp x86_64-avx2) runs
#   Q4_0, Q8_0 and F16 too: the AVX2 tier's targets are against llama.cpp on AVX2.
# * ONNX Runtime: our `ort` backend on the bundle's int4-ort variant (the same MatMulNBits CPU
#   kernels ONNX Runtime GenAI runs), with the onnxruntime wheel's library of the exporter's venv.
# * --genai: ONNX Runtime GenAI itself (scripts/genai_peer.py): its model builder's int4 CPU model
#   of the demo GGUF (dequantized by transformers) and the same prefill/decode timings, then the
#   top-1 agreement with transformers float32 of its int4 and of our ort variants. Dev-only:
#   the builder needs torch, so a separate venv (~/.cache/qwen2-edge/genai-venv, ~5 GB with
#   torch's CUDA wheels) is made on first use.
set -euo pipefail
source "$(dirname "$0")/lib.sh"
cd "$REPO"

RUNS=3
THREADS=2
BUNDLE=""
GGUF="$CACHE/models/qwen2.5-coder-0.5b-instruct-q4_k_m.gguf"
VARIANTS="int4 int8 fp16 fp32"
TIERS=""
GENERIC_VARIANTS="int8 int4"
GENAI=0
while [[ $# -gt 0 ]]; do
    case "$1" in
        --runs) RUNS="$2"; shift 2 ;;
        --threads) THREADS="$2"; shift 2 ;;
        --bundle) BUNDLE="$2"; shift 2 ;;
        --gguf) GGUF="$2"; shift 2 ;;
        --variants) VARIANTS="$2"; shift 2 ;;
        --tiers) TIERS="$2"; shift 2 ;;
        --generic-variants) GENERIC_VARIANTS="$2"; shift 2 ;;
        --genai) GENAI=1; shift ;;
        *) echo "usage: scripts/bench.sh [--runs N] [--threads T] [--bundle DIR] [--gguf FILE] [--variants LIST] [--tiers LIST] [--generic-variants LIST] [--genai]" >&2; exit 2 ;;
    esac
done

ensure_venv
if [[ -z "$BUNDLE" ]]; then
    BUNDLE="$(ensure_demo_bundle)"
fi
LLAMA_BIN="$(ensure_llamacpp x86_64)"

log "cargo build --release"
cargo build --release --quiet
BIN="$REPO/target/release/qwen2-edge"
OUT="$(mktemp -d)"
trap 'rm -rf "$OUT"' EXIT
if [[ -z "$TIERS" ]]; then
    TIERS="$("$BIN" info --bundle "$BUNDLE" | sed -n 's/.*(available: \([^;]*\);.*/\1/p' | tr -d ,)"
fi

stem="${GGUF%.gguf}"
stem="${stem%-q4_k_m}"
for q in q8_0 q4_0 f16; do
    if [[ ! -f "$stem-$q.gguf" ]]; then
        log "requantizing $(basename "$GGUF") to ${q^^} with llama.cpp's llama-quantize"
        "$LLAMA_BIN/llama-quantize" --allow-requantize "$GGUF" "$stem-$q.gguf" "${q^^}" "$THREADS" >/dev/null 2>&1
    fi
done

log "machine: $(nproc) cores ($(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs)), load $(cut -d' ' -f1-3 /proc/loadavg); $THREADS threads, $RUNS runs each"
log "CPU flags: $(grep -m1 '^flags' /proc/cpuinfo | tr ' ' '\n' | grep -E '^(avx|avx2|fma|f16c|avx512f|avx512bw|avx512vl|avx512_vnni|avx_vnni)$' | xargs)"
log "tiers: $TIERS"
n=10
# File names keep the run order for the table (best tier first).
for tier in $TIERS; do
    variants="$VARIANTS" extra=()
    # The portable tier prefills at single-digit tokens/s: no 512-token prompt for it.
    [[ "$tier" == generic ]] && variants="$GENERIC_VARIANTS" extra=(--long-prompt-tokens 0)
    for v in $variants; do
        log "qwen2-edge $v ($tier)"
        n=$((n + 1))
        "$BIN" bench --bundle "$BUNDLE" --variant "$v" --kernels "$tier" --threads "$THREADS" --runs "$RUNS" \
            "${extra[@]}" --no-verify --json > "$OUT/1-native-$n-$tier-$v.json"
    done
done
for q in q4_0 q8_0 f16 q4_k_m; do
    f="$stem-$q.gguf"
    [[ -f "$f" ]] || continue
    log "llama.cpp ${q^^} (llama-bench)"
    if "$LLAMA_BIN/llama-bench" -m "$f" -t "$THREADS" -p 128,512 -n 128 -r "$RUNS" -o json \
        > "$OUT/llamabench-$q.raw" 2>/dev/null; then
        python3 scripts/bench_compare.py llamabench "$OUT/llamabench-$q.raw" "${q^^}" > "$OUT/2-llamacpp-$q.json"
    else
        log "llama.cpp ${q^^} failed"
    fi
done
if [[ " $TIERS " == *" avx2-fma "* ]] && grep -qw avx512f /proc/cpuinfo; then
    LLAMA_AVX2_BIN="$(ensure_llamacpp x86_64-avx2)"
    for q in q4_0 q8_0 f16; do
        log "llama.cpp ${q^^}, AVX2 build (llama-bench)"
        if "$LLAMA_AVX2_BIN/llama-bench" -m "$stem-$q.gguf" -t "$THREADS" -p 128,512 -n 128 -r "$RUNS" \
            -o json > "$OUT/llamabench-avx2-$q.raw" 2>/dev/null; then
            python3 scripts/bench_compare.py llamabench "$OUT/llamabench-avx2-$q.raw" "${q^^}" avx2 \
                > "$OUT/2-llamacpp-avx2-$q.json"
        else
            log "llama.cpp ${q^^} (AVX2 build) failed"
        fi
    done
fi
for bits in 4 8; do
    if "$PY" -c "import json, sys; sys.exit(0 if any(v['name']=='int$bits-ort' for v in json.load(open('$BUNDLE/bundle.json'))['variants']) else 1)"; then
        log "qwen2-edge --backend ort int$bits-ort (ONNX Runtime's CPU MatMulNBits kernels)"
        "$BIN" bench --bundle "$BUNDLE" --backend ort --ort-library "$(ensure_ort_lib)" --variant "int$bits-ort" \
            --threads "$THREADS" --runs "$RUNS" --no-verify --json > "$OUT/3-ort-int$bits.json" || log "ort int$bits-ort failed"
    fi
done
if [[ "$GENAI" == 1 ]]; then
    GENAI_VENV="$CACHE/genai-venv"
    if [[ ! -x "$GENAI_VENV/bin/python" ]]; then
        log "making $GENAI_VENV (onnxruntime-genai, torch, transformers: dev-only)"
        python3 -m venv "$GENAI_VENV"
        "$GENAI_VENV/bin/pip" install -q onnxruntime-genai onnx_ir torch transformers accelerate gguf
    fi
    log "ONNX Runtime GenAI int4 (its model builder)"
    model="$("$GENAI_VENV/bin/python" scripts/genai_peer.py prepare --gguf "$GGUF" --work "$CACHE/genai")"
    "$GENAI_VENV/bin/python" scripts/genai_peer.py bench --model "$model" --threads "$THREADS" --runs "$RUNS" \
        > "$OUT/4-genai.json" || log "ONNX Runtime GenAI failed"
    log "top-1 agreement with transformers float32 (demo questions, 64 tokens, teacher-forced)"
    "$GENAI_VENV/bin/python" scripts/genai_peer.py agree --model "$model" --hf "$CACHE/genai/hf" --bundle "$BUNDLE" \
        --variants fp32-ort,int8-ort,int4-ort 2> /dev/null > "$OUT/agreement.txt" || log "agreement run failed"
fi
log "load after the run: $(cut -d' ' -f1-3 /proc/loadavg)"
python3 scripts/bench_compare.py table "$OUT"/*.json
if [[ -f "$OUT/agreement.txt" ]]; then head -n -1 "$OUT/agreement.txt"; fi
