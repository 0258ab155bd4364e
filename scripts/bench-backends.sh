#!/usr/bin/env bash
# `qwen2-edge bench` for every backend and variant of a bundle, one process each (so peak RSS is
# per configuration), as a Markdown table. The machine should be otherwise idle: on a shared box
# run it a few times (ROUNDS) and keep the best row of each configuration.
#
#   scripts/bench-backends.sh [BUNDLE] > table.md
#   env: THREADS (2), PROMPT (128), GEN (64), ROUNDS (1), ORT_DYLIB_PATH (else the venv's wheel),
#        CONFIGS ("backend:variant ..." to run a subset)
set -euo pipefail
source "$(dirname "$0")/lib.sh"
BUNDLE="${1:-${QWEN2_EDGE_DEMO_BUNDLE:-}}"
[[ -f "$BUNDLE/bundle.json" ]] || { echo "usage: $0 BUNDLE (or set QWEN2_EDGE_DEMO_BUNDLE)" >&2; exit 2; }
BIN="$REPO/target/release/qwen2-edge"
[[ -x "$BIN" ]] || cargo build --release --quiet --manifest-path "$REPO/Cargo.toml"
ORT_LIB="${ORT_DYLIB_PATH:-$(ensure_ort_lib)}"
THREADS="${THREADS:-2}" PROMPT="${PROMPT:-128}" GEN="${GEN:-64}" ROUNDS="${ROUNDS:-1}"
CONFIGS="${CONFIGS:-native:fp32 native:fp16 \
ort:fp32 ort:fp16 ort:int8 ort:int4 ort:fp32-ort ort:fp16-ort ort:int8-ort ort:int4-ort \
tract:fp32 tract:fp16 tract:int8 tract:int4}"

echo "| backend | variant | prefill t/s | decode t/s | peak RSS MiB | load s | start → 1st token s | load avg |"
echo "|---|---|---:|---:|---:|---:|---:|---:|"
for config in $CONFIGS; do
    backend="${config%%:*}" variant="${config#*:}"
    best=""
    for _ in $(seq "$ROUNDS"); do
        load="$(cut -d' ' -f1 /proc/loadavg)"
        if ! json="$("$BIN" bench --bundle "$BUNDLE" --no-verify --backend "$backend" --variant "$variant" \
                --threads "$THREADS" --prompt-tokens "$PROMPT" --gen-tokens "$GEN" \
                --ort-library "$ORT_LIB" --json 2>/dev/null)"; then
            best="| $backend | $variant | failed | | | | | $load |"
            continue
        fi
        row="$(python3 - "$json" "$load" <<'PY'
import json, sys
r = json.loads(sys.argv[1])
cells = [r["backend"], r["variant"], f'{r["prefill_tokens_per_s"]:.1f}', f'{r["decode_tokens_per_s"]:.1f}',
         f'{r["peak_rss_mib"]:.0f}', f'{r["load_s"]:.2f}', f'{r["first_token_s"]:.2f}', sys.argv[2]]
print(f'{r["decode_tokens_per_s"]:.3f}||' + " | ".join(cells).join(["| ", " |"]))
PY
)"
        # Keep the round with the best decode speed (the least disturbed one).
        if [[ -z "$best" || "$best" == *failed* ]] || python3 -c 'import sys; sys.exit(float(sys.argv[1]) <= float(sys.argv[2]))' "${row%%||*}" "${best%%||*}"; then
            best="$row"
        fi
    done
    echo "${best#*||}"
done
