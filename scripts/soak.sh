#!/usr/bin/env bash
# Soak: one daemon under mixed traffic for DURATION (seconds, or with m / h: 90m, 1h), loopback
# only. Starts a private mosquitto and `qwen2-edge serve` (socket and MQTT) on BUNDLE's VARIANT
# (default: the demo model, int4), then runs examples/soak: socket and MQTT clients sending
# plain requests, cancels mid-stream, deadlines that expire, malformed and unknown-field
# requests, long prompts and prompts over the limit, one at a time each. Every SAMPLE seconds it
# records the daemon's RSS, open descriptors and threads and the p50/p99 latency of the plain
# requests. Fails (exit 1) when a request got no terminal event or the wrong one, or the daemon
# died.
#
#   scripts/soak.sh DURATION [BUNDLE] [VARIANT]
#   scripts/soak.sh 1h                      # the README's figures
#   SOAK_CPUS=0 scripts/soak.sh 1h          # daemon and clients on CPU 0 only (taskset)
#
# Environment: SAMPLE (seconds between samples; default DURATION/60, at least 5),
# SOCKET_CLIENTS (2), MQTT_CLIENTS (1), SOAK_OUT (where the CSV, summary and log go; default
# ~/.cache/qwen2-edge/soak/<date>).
set -euo pipefail
source "$(dirname "$0")/lib.sh"

duration="${1:?usage: $0 DURATION [BUNDLE] [VARIANT]}"
case "$duration" in
    *h) seconds=$(( ${duration%h} * 3600 )) ;;
    *m) seconds=$(( ${duration%m} * 60 )) ;;
    *s) seconds="${duration%s}" ;;
    *) seconds="$duration" ;;
esac
variant="${3:-int4}"
cd "$REPO"
if [[ -n "${2:-}" ]]; then
    bundle="$(cd "$2" && pwd)"
else
    ensure_venv
    bundle="$(ensure_demo_bundle)"
fi
sample="${SAMPLE:-$(( seconds / 60 > 5 ? seconds / 60 : 5 ))}"
out="${SOAK_OUT:-$CACHE/soak/$(date -u +%Y%m%dT%H%M%SZ)}"
mkdir -p "$out"
pin=()
[[ -n "${SOAK_CPUS:-}" ]] && pin=(taskset -c "$SOAK_CPUS")

log "cargo build --release (qwen2-edge, examples/soak)"
cargo build --release --quiet --bin qwen2-edge --example soak
make_work_dir
start_mosquitto || { log "the soak needs mosquitto"; exit 1; }

# Limits the mix is built around: prompts over 1,024 tokens are too long, requests ask for at
# most 64 tokens, and the queue holds every client so that no request is refused as busy.
cat > "$WORK/config.toml" <<EOF
[model]
bundle = "$bundle"
variant = "$variant"
verify = false
[limits]
max_concurrent = 2
max_queue = 32
max_prompt_tokens = 1024
max_new_tokens = 64
request_timeout_s = 60
[unix_socket]
path = "$WORK/s.sock"
[mqtt]
url = "mqtt://127.0.0.1:$MQTT_PORT"
client_id = "soak-daemon"
EOF
"${pin[@]}" target/release/qwen2-edge serve --config "$WORK/config.toml" 2> "$out/serve.log" &
daemon=$!
WORK_PIDS+=("$daemon")
wait_daemon "$daemon" "$WORK/s.sock" "$out/serve.log" || exit 1
sleep 0.5   # the daemon's MQTT subscription

log "soak: $seconds s on $bundle ($variant), sampling every $sample s; $(nproc) cores ($(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs)); output in $out"
set +e
"${pin[@]}" target/release/examples/soak --socket "$WORK/s.sock" --mqtt "127.0.0.1:$MQTT_PORT" \
    --pid "$daemon" --seconds "$seconds" --sample-s "$sample" \
    --socket-clients "${SOCKET_CLIENTS:-2}" --mqtt-clients "${MQTT_CLIENTS:-1}" \
    --csv "$out/soak.csv" | tee "$out/summary.json"
rc=${PIPESTATUS[0]}
set -e
if ! kill -0 "$daemon" 2>/dev/null; then
    log "the daemon died; its log's tail:"
    tail -20 "$out/serve.log" >&2
    exit 1
fi
if grep -q "panicked" "$out/serve.log"; then
    log "the daemon's log shows a panic:"
    grep -m5 "panicked" "$out/serve.log" >&2
    exit 1
fi
exit "$rc"
