#!/usr/bin/env bash
# The ort backend on an NVIDIA GPU: runs the demo bundle on the CUDA and TensorRT execution
# providers, checks the greedy answers against the CPU provider, and prints tokens/s.
#
# Installs nothing and needs no network: it takes the onnxruntime-gpu wheel carried beside it
# (onnxruntime_gpu-*.whl in this directory, or --wheel), unpacks ONNX Runtime's libraries with
# Python's zipfile, and runs a qwen2-edge binary built elsewhere (default target/release).
# CUDA, cuDNN and (for TensorRT) TensorRT libraries must be on the box, as the wheel expects;
# a provider that cannot start is reported as FAILED with ONNX Runtime's reason (strict mode).
# The float16-compute variants (profile gpu: fp16-gpu, int4-gpu) are run when the bundle has them
# (python -m qwen2_export export ... --profiles portable,ort,gpu); their answers on a GPU must agree
# with the CPU's for at least the first half of the CPU's text (float16 rounding differs between
# the providers' kernels, so a late token may differ), the float32 variants' exactly.
#
#   scripts/gpu-check.sh [--bundle DIR] [--bin PATH] [--wheel PATH] [--variants "fp32 int4-ort fp16-gpu int4-gpu"]
#
# Exit status: 0 all providers ran and matched the CPU, 1 a mismatch or failure, 2 no GPU / bad
# arguments.
set -uo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO="$(cd "$HERE/.." && pwd)"
source "$HERE/lib.sh"

BIN="$REPO/target/release/qwen2-edge"
BUNDLE="${QWEN2_EDGE_DEMO_BUNDLE:-}"
WHEEL=""
VARIANTS="fp32 int4-ort fp16-gpu int4-gpu"
PROVIDERS="cuda tensorrt"
PROMPT="Write a Python function that checks whether a number is prime."
TOKENS=32
while [[ $# -gt 0 ]]; do
    case "$1" in
        --bundle) BUNDLE="$2"; shift 2 ;;
        --bin) BIN="$2"; shift 2 ;;
        --wheel) WHEEL="$2"; shift 2 ;;
        --variants) VARIANTS="$2"; shift 2 ;;
        --providers) PROVIDERS="$2"; shift 2 ;;
        -h|--help) sed -n '2,16p' "$0"; exit 0 ;;
        *) echo "unknown argument $1" >&2; exit 2 ;;
    esac
done

fail() { echo "gpu-check: $*" >&2; exit 2; }
command -v nvidia-smi >/dev/null || fail "no nvidia-smi: this box has no NVIDIA driver"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader \
    || fail "nvidia-smi sees no GPU"
[[ -x "$BIN" ]] || fail "no qwen2-edge binary at $BIN (cargo build --release elsewhere, or --bin)"
if [[ -z "$BUNDLE" ]]; then
    BUNDLE="$(ls -d "$CACHE"/demo/bundle* 2>/dev/null | head -1)"
fi
[[ -f "$BUNDLE/bundle.json" ]] || fail "no demo bundle (--bundle DIR or QWEN2_EDGE_DEMO_BUNDLE)"
if [[ -z "$WHEEL" ]]; then
    WHEEL="$(ls "$HERE"/onnxruntime_gpu-*.whl 2>/dev/null | sort -V | tail -1)"
fi
[[ -f "$WHEEL" ]] || fail "no onnxruntime-gpu wheel beside the script (put onnxruntime_gpu-*.whl in $HERE, or --wheel)"

WORK="$(mktemp -d)"
trap 'rm -rf "$WORK"' EXIT
LIB="$(extract_ort_lib "$WHEEL" "$WORK/ort")" || fail "cannot unpack $WHEEL"
log "ONNX Runtime $LIB (from $(basename "$WHEEL")), bundle $BUNDLE"

# Greedy text for a provider list; strict so a provider that cannot run fails loudly.
answer() { # variant providers [extra args]
    local variant="$1" providers="$2"; shift 2
    "$BIN" generate --bundle "$BUNDLE" --no-verify --backend ort --variant "$variant" \
        --ort-library "$LIB" --ort-providers "$providers" --ort-strict \
        --temperature 0 --max-tokens "$TOKENS" "$@" "$PROMPT"
}
bench() { # variant providers [extra args] -> "prefill decode load"
    local variant="$1" providers="$2"; shift 2
    "$BIN" bench --bundle "$BUNDLE" --no-verify --backend ort --variant "$variant" \
        --ort-library "$LIB" --ort-providers "$providers" --ort-strict --json "$@" \
        | python3 -c 'import json,sys; r=json.load(sys.stdin); print("%.1f %.1f %.1f %s" % (r["prefill_tokens_per_s"], r["decode_tokens_per_s"], r["load_s"], r["device"]))'
}

# Whether two answers agree: exactly, or (float16 compute) on the first half of the CPU's text.
agrees() { # variant cpu-text provider-text
    [[ "$2" == "$3" ]] && return 0
    [[ "$1" == *-gpu ]] || return 1
    local half=$(( ${#2} / 2 ))
    [[ "${2:0:half}" == "${3:0:half}" ]]
}

status=0
printf '\n%-10s %-9s %-8s %12s %12s %8s\n' variant provider greedy "prefill t/s" "decode t/s" "load s"
for variant in $VARIANTS; do
    if ! python3 -c "import json, sys; sys.exit(0 if any(v['name'] == '$variant' for v in json.load(open('$BUNDLE/bundle.json'))['variants']) else 1)"; then
        hint=""; [[ "$variant" == *-gpu ]] && hint=" (export with --profiles portable,ort,gpu)"
        printf '%-10s %-9s %s\n' "$variant" - "not in the bundle$hint"
        continue
    fi
    cpu="$(answer "$variant" cpu 2>"$WORK/err")" || { cat "$WORK/err" >&2; fail "CPU run of $variant failed"; }
    read -r pre dec load _ <<<"$(bench "$variant" cpu --threads 0 2>/dev/null)"
    printf '%-10s %-9s %-8s %12s %12s %8s\n' "$variant" cpu reference "$pre" "$dec" "$load"
    for p in $PROVIDERS; do
        chain="$p"; extra=()
        case "$p" in
            # Full fp32 (no TF32) so greedy tokens can match the CPU's bit for bit.
            cuda) extra=(--ort-provider-option cuda.use_tf32=0) ;;
            # TensorRT takes what it supports, CUDA the rest (contrib ops of profile ort);
            # engines are cached so a second run does not rebuild them.
            tensorrt) chain="tensorrt,cuda"; extra=(--ort-cache "$WORK/cache" --ort-provider-option cuda.use_tf32=0) ;;
        esac
        if got="$(answer "$variant" "$chain" "${extra[@]}" 2>"$WORK/err")"; then
            if [[ "$got" == "$cpu" ]]; then verdict=same
            elif agrees "$variant" "$cpu" "$got"; then verdict=close
            else verdict=DIFFERS; status=1; fi
            read -r pre dec load dev <<<"$(bench "$variant" "$chain" "${extra[@]}" 2>/dev/null)"
            printf '%-10s %-9s %-8s %12s %12s %8s  %s\n' "$variant" "$p" "$verdict" "$pre" "$dec" "$load" "$dev"
            if [[ "$verdict" != same ]]; then
                printf '    cpu: %q\n    %s: %q\n' "$cpu" "$p" "$got"
            fi
        else
            status=1
            printf '%-10s %-9s %-8s\n' "$variant" "$p" FAILED
            sed 's/^/    /' "$WORK/err" | tail -5
        fi
    done
done
exit "$status"
