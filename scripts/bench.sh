#!/usr/bin/env bash
# End-to-end benchmark of the native backend against llama.cpp and ONNX Runtime, in one run on
# one machine, 2 threads each (README "Benchmarks"). Not a test: prints a table and the ratios.
#
#   scripts/bench.sh [--runs N] [--threads T] [--bundle DIR] [--gguf FILE] [--variants "int4 int8 ..."]
#
# * qwen2-edge: `qwen2-edge bench --json` per variant (TTFT, prefill 128 and 512, decode over
#   128 tokens, peak RSS; medians of --runs).
# * llama.cpp: llama-cpp-python from the Python registry, built from source into
#   $CACHE/llamacpp-venv (never vendored; the first build takes ~30 min on 2 cores). The demo
#   GGUF is requantized to Q8_0 and Q4_0 with llama.cpp's own quantizer (llama_model_quantize).
#   Built with AVX-512/VNNI but without AMX: this VM does not grant AMX tile state and
#   llama.cpp's AMX path crashes in ggml_backend_amx_mul_mat.
# * ONNX Runtime: our `ort` backend on the bundle's int4-ort variant (the same MatMulNBits CPU
#   kernels ONNX Runtime GenAI runs), with the onnxruntime wheel's library of the exporter's venv.
set -euo pipefail
source "$(dirname "$0")/lib.sh"
cd "$REPO"

RUNS=3
THREADS=2
BUNDLE=""
GGUF="$CACHE/models/qwen2.5-coder-0.5b-instruct-q4_k_m.gguf"
VARIANTS="int4 int8 fp16 fp32"
while [[ $# -gt 0 ]]; do
    case "$1" in
        --runs) RUNS="$2"; shift 2 ;;
        --threads) THREADS="$2"; shift 2 ;;
        --bundle) BUNDLE="$2"; shift 2 ;;
        --gguf) GGUF="$2"; shift 2 ;;
        --variants) VARIANTS="$2"; shift 2 ;;
        *) echo "usage: scripts/bench.sh [--runs N] [--threads T] [--bundle DIR] [--gguf FILE] [--variants LIST]" >&2; exit 2 ;;
    esac
done

ensure_venv
if [[ -z "$BUNDLE" ]]; then
    BUNDLE="$(ensure_demo_bundle)"
fi
LLAMA_VENV="$CACHE/llamacpp-venv"
LLAMA_VERSION="0.3.36"
if ! "$LLAMA_VENV/bin/python" -c "import llama_cpp; assert llama_cpp.__version__ == '$LLAMA_VERSION'" 2>/dev/null; then
    log "building llama-cpp-python $LLAMA_VERSION into $LLAMA_VENV (from source: ~30 min on 2 cores)"
    python3 -m venv "$LLAMA_VENV"
    CMAKE_BUILD_PARALLEL_LEVEL=2 CMAKE_ARGS="-DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF \
        -DLLAMA_BUILD_SERVER=OFF -DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON \
        -DGGML_F16C=ON -DGGML_BMI2=ON -DGGML_AVX512=ON -DGGML_AVX512_VBMI=ON -DGGML_AVX512_VNNI=ON \
        -DGGML_AVX512_BF16=ON -DGGML_AVX_VNNI=ON -DGGML_AMX_TILE=OFF -DGGML_AMX_INT8=OFF -DGGML_AMX_BF16=OFF" \
        "$LLAMA_VENV/bin/pip" install --quiet --no-cache-dir "llama-cpp-python==$LLAMA_VERSION"
fi

log "cargo build --release"
cargo build --release --quiet
BIN="$REPO/target/release/qwen2-edge"
OUT="$(mktemp -d)"
trap 'rm -rf "$OUT"' EXIT

stem="${GGUF%.gguf}"
stem="${stem%-q4_k_m}"
for q in q8_0 q4_0; do
    if [[ ! -f "$stem-$q.gguf" ]]; then
        log "requantizing $(basename "$GGUF") to ${q^^} with llama.cpp's quantizer"
        "$LLAMA_VENV/bin/python" scripts/bench_compare.py quantize "$GGUF" "$stem-$q.gguf" "$q" 2>/dev/null
    fi
done

log "machine: $(nproc) cores, load $(cut -d' ' -f1-3 /proc/loadavg); $THREADS threads, $RUNS runs each"
for v in $VARIANTS; do
    log "qwen2-edge $v"
    "$BIN" bench --bundle "$BUNDLE" --variant "$v" --threads "$THREADS" --runs "$RUNS" --no-verify --json \
        > "$OUT/native-$v.json"
done
for q in q4_0 q8_0 q4_k_m; do
    f="$stem-$q.gguf"
    [[ -f "$f" ]] || continue
    log "llama.cpp ${q^^}"
    "$LLAMA_VENV/bin/python" scripts/bench_compare.py llamacpp "$f" --threads "$THREADS" --runs "$RUNS" \
        > "$OUT/llamacpp-$q.json" 2>/dev/null || log "llama.cpp ${q^^} failed"
done
if "$PY" -c "import json, sys; sys.exit(0 if any(v['name']=='int4-ort' for v in json.load(open('$BUNDLE/bundle.json'))['variants']) else 1)"; then
    log "qwen2-edge --backend ort int4-ort (ONNX Runtime's CPU MatMulNBits kernels)"
    "$BIN" bench --bundle "$BUNDLE" --backend ort --ort-library "$(ensure_ort_lib)" --variant int4-ort \
        --threads "$THREADS" --runs "$RUNS" --no-verify --json > "$OUT/ort-int4.json" || log "ort int4-ort failed"
fi
log "load after the run: $(cut -d' ' -f1-3 /proc/loadavg)"
python3 scripts/bench_compare.py table "$OUT"/*.json
