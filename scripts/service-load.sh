#!/usr/bin/env bash
# Load tests of the daemon, loopback only, bounded (requests and seconds per level); the client
# is examples/service_load (clients send requests back to back; everything measured client-side).
#
# 1. The daemon alone: starts `qwen2-edge serve` (and a private mosquitto on a free port when one
#    is installed), then runs 1, 4 and 16 concurrent clients over the Unix socket, over HTTP
#    (OpenAI's chat completions, streamed, on a free loopback port) and over MQTT, one after the
#    other against the same daemon.
#
#    scripts/service-load.sh BUNDLE [VARIANT] [REQUESTS] [MAX_TOKENS]
#    scripts/service-load.sh tests/fixtures/tiny-tied/bundle fp32 200 32
#    scripts/service-load.sh ~/.cache/qwen2-edge/demo/bundle-* int8 16 16
#    (environment: CLIENTS=1,4,16 MAX_SECONDS=180)
#
# 2. --compare: the daemon against llama.cpp's own server on the same model, in one run. Workload
#    shared-system (a ~400-token system prompt shared by every request, a short question that
#    varies, greedy, 64 new tokens), levels 1, 4 and 16 clients. Per precision (int8 = Q8_0,
#    int4 = Q4_0; fp16 = F16):
#    * `qwen2-edge serve` on the bundle's variant, [limits] max_concurrent = --max-concurrent,
#      over the Unix socket; its peak RSS (VmHWM) at the end;
#    * llama-server (built by lib.sh ensure_llama_server from the llama-cpp-python sdist's
#      llama.cpp, as llama-bench for scripts/bench.sh) on the demo GGUF requantized by
#      llama-quantize: -np --parallel -cb, prompt cache on (--cache-prompt, its default, and
#      "cache_prompt": true per request), -t --threads, -c --parallel x 1024 (1024 positions per
#      slot, as many as each of our sessions holds), over its OpenAI-compatible HTTP API;
#    each server fresh, so the first request of the 1-client level is a cold system prompt.
#    Then a table and the ratios (scripts/service_load_table.py).
#
#    scripts/service-load.sh --compare [--bundle DIR] [--gguf FILE] [--variants "int8 int4"]
#        [--engines "qwen2-edge llama-server"] [--clients 1,4,16] [--requests 32]
#        [--max-seconds 300] [--max-tokens 64] [--max-concurrent 4] [--parallel 4]
#        [--threads 2] [--json-out FILE]
#    Defaults: the demo bundle (lib.sh ensure_demo_bundle) and
#    ~/.cache/qwen2-edge/models/qwen2.5-coder-0.5b-instruct-q4_k_m.gguf, the GGUF it came from.
#    QWEN2_EDGE_BIN=FILE serves with that build of qwen2-edge instead of this tree's (a copy of an
#    earlier build: before/after comparisons on one machine, run alternately).
set -euo pipefail
source "$(dirname "$0")/lib.sh"

daemon_only() {
    local bundle variant requests max_tokens clients max_seconds mqtt_section="" port="" http_port
    bundle="$(cd "${1:?usage: $0 BUNDLE [VARIANT] [REQUESTS] [MAX_TOKENS] | --compare ...}" && pwd)"
    variant="${2:-fp32}"
    requests="${3:-64}"
    max_tokens="${4:-32}"
    clients="${CLIENTS:-1,4,16}"
    max_seconds="${MAX_SECONDS:-180}"

    cd "$REPO"
    cargo build --release --quiet --bin qwen2-edge --example service_load
    make_work_dir
    if start_mosquitto; then
        port="$MQTT_PORT"
        mqtt_section=$(printf '[mqtt]\nurl = "mqtt://127.0.0.1:%s"\ntoken_interval_ms = 0\n' "$port")
    fi

    http_port="$(free_port)"
    cat > "$WORK/config.toml" <<EOF
[model]
bundle = "$bundle"
variant = "$variant"
verify = false
[limits]
max_concurrent = 2
max_queue = 32
[unix_socket]
path = "$WORK/s.sock"
[http]
listen = ["127.0.0.1:$http_port"]
$mqtt_section
EOF
    target/release/qwen2-edge serve --config "$WORK/config.toml" 2>"$WORK/serve.log" &
    WORK_PIDS+=($!)
    wait_daemon "$!" "$WORK/s.sock" "$WORK/serve.log" || exit 1
    [ -n "$port" ] && sleep 0.5   # the service's MQTT subscription

    echo "== $bundle ($variant), $(nproc) cores"
    target/release/examples/service_load --socket "$WORK/s.sock" --clients "$clients" \
        --requests "$requests" --max-tokens "$max_tokens" --max-seconds "$max_seconds"
    target/release/examples/service_load --http "127.0.0.1:$http_port" --label qwen2-edge --clients "$clients" \
        --requests "$requests" --max-tokens "$max_tokens" --max-seconds "$max_seconds"
    if [ -n "$port" ]; then
        target/release/examples/service_load --mqtt "127.0.0.1:$port" --clients "$clients" \
            --requests "$requests" --max-tokens "$max_tokens" --max-seconds "$max_seconds"
    fi
}

# Waits until llama-server PID answers 200 on /health (503 while it loads).
wait_llama_server() {
    wait_ready "$1" "$3" llama-server curl -sf -o /dev/null "http://127.0.0.1:$2/health"
}

# Peak resident set (VmHWM, KiB) of a running process.
peak_rss_kb() {
    awk '/^VmHWM:/ { print $2 }' "/proc/$1/status" 2>/dev/null || true
}

# Runs the load driver against the server PID (TRANSPORT: --socket PATH or --http HOST:PORT) and
# appends its results and the server's peak RSS to $results; uses compare's $load and $common.
drive() {
    local pid="$1" label="$2" model="$3" rss
    shift 3
    "$load" "$@" --label "$label" "${common[@]}" >> "$results" \
        || log "$label: the load driver failed"
    rss="$(peak_rss_kb "$pid")"
    printf '{"kind":"run","engine":"%s","model":"%s","peak_rss_kb":%s}\n' \
        "$label" "$model" "${rss:-null}" >> "$results"
}

compare() {
    local bundle="" gguf="$CACHE/models/qwen2.5-coder-0.5b-instruct-q4_k_m.gguf"
    local variants="int8 int4" engines="qwen2-edge llama-server" clients="1,4,16" requests=32
    local max_seconds=300 max_tokens=64 max_concurrent=4 parallel=4 threads=2 json_out=""
    local ctx_per_slot=1024
    while [[ $# -gt 0 ]]; do
        case "$1" in
            --bundle) bundle="$2"; shift 2 ;;
            --gguf) gguf="$2"; shift 2 ;;
            --variants) variants="$2"; shift 2 ;;
            --engines) engines="$2"; shift 2 ;;
            --clients) clients="$2"; shift 2 ;;
            --requests) requests="$2"; shift 2 ;;
            --max-seconds) max_seconds="$2"; shift 2 ;;
            --max-tokens) max_tokens="$2"; shift 2 ;;
            --max-concurrent) max_concurrent="$2"; shift 2 ;;
            --parallel) parallel="$2"; shift 2 ;;
            --threads) threads="$2"; shift 2 ;;
            --json-out) json_out="$(realpath -m "$2")"; shift 2 ;;
            *) sed -n '/^# 2\. --compare/,/^set -euo/p' "$0" | sed '$d' >&2; exit 2 ;;
        esac
    done
    if (( max_tokens >= ctx_per_slot / 2 )); then
        log "--max-tokens must stay under $((ctx_per_slot / 2)) (positions per session/slot: $ctx_per_slot)"
        exit 2
    fi
    local max_clients
    max_clients="$(tr ',' '\n' <<< "$clients" | sort -n | tail -1)"

    cd "$REPO"
    if [[ -z "$bundle" ]]; then
        ensure_venv
        bundle="$(ensure_demo_bundle)"
    fi
    bundle="$(cd "$bundle" && pwd)"
    if [[ " $engines " == *" llama-server "* ]]; then
        LLAMA_BIN="$(ensure_llama_server x86_64)"
    fi
    log "cargo build --release"
    cargo build --release --quiet --bin qwen2-edge --example service_load
    make_work_dir
    local results="$WORK/results.jsonl" load=target/release/examples/service_load
    local common=(--workload shared-system --clients "$clients" --requests "$requests"
        --max-tokens "$max_tokens" --max-seconds "$max_seconds" --json)
    : > "$results"
    log "machine: $(nproc) cores ($(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs)), load $(cut -d' ' -f1-3 /proc/loadavg)"

    local v quant model pid label sock port
    for v in $variants; do
        case "$v" in
            int8) quant=q8_0 ;;
            int4) quant=q4_0 ;;
            fp16) quant=f16 ;;
            *) quant="" ;;
        esac
        if [[ " $engines " == *" qwen2-edge "* ]]; then
            label="qwen2-edge:$v"
            sock="$WORK/$v.sock"
            # Each session holds ctx_per_slot positions, as each llama-server slot does.
            cat > "$WORK/$v.toml" <<EOF
[model]
bundle = "$bundle"
variant = "$v"
verify = false
threads = $threads
[limits]
max_concurrent = $max_concurrent
max_queue = $((max_clients + 16))
max_prompt_tokens = $((ctx_per_slot - max_tokens))
max_new_tokens = $max_tokens
request_timeout_s = 600
[unix_socket]
path = "$sock"
EOF
            log "$label: qwen2-edge serve, max_concurrent $max_concurrent, $threads threads"
            "${QWEN2_EDGE_BIN:-target/release/qwen2-edge}" serve --config "$WORK/$v.toml" \
                2> "$WORK/$v-serve.log" &
            pid=$!
            WORK_PIDS+=("$pid")
            if wait_daemon "$pid" "$sock" "$WORK/$v-serve.log"; then
                drive "$pid" "$label" "$bundle ($v)" --socket "$sock"
            fi
            stop_pid "$pid"
        fi
        if [[ " $engines " == *" llama-server "* ]]; then
            if [[ -z "$quant" ]]; then
                log "llama-server: no GGUF type for variant $v, skipped"
                continue
            fi
            label="llama-server:$v"
            model="$(requantized_gguf "$gguf" "$quant")"
            port="$(free_port)"
            log "$label: llama-server $(basename "$model"), -np $parallel -cb, $threads threads"
            "$LLAMA_BIN/llama-server" -m "$model" -np "$parallel" -cb --cache-prompt -t "$threads" \
                -c "$((parallel * ctx_per_slot))" --host 127.0.0.1 --port "$port" --no-webui \
                > "$WORK/$v-llama-server.log" 2>&1 &
            pid=$!
            WORK_PIDS+=("$pid")
            if wait_llama_server "$pid" "$port" "$WORK/$v-llama-server.log"; then
                drive "$pid" "$label" "$(basename "$model")" --http "127.0.0.1:$port"
            fi
            stop_pid "$pid"
        fi
    done
    log "load after the run: $(cut -d' ' -f1-3 /proc/loadavg)"
    [[ -n "$json_out" ]] && cp "$results" "$json_out"
    python3 scripts/service_load_table.py "$results"
}

if [[ "${1:-}" == --compare ]]; then
    shift
    compare "$@"
else
    daemon_only "$@"
fi
