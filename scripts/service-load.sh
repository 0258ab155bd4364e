#!/usr/bin/env bash
# Load test of the daemon, loopback only: starts `qwen2-edge serve` (and a private mosquitto on
# a free port when one is installed), then runs examples/service_load.rs at 1, 4 and 16
# concurrent clients over the Unix socket and over MQTT. Bounded: --requests per level and
# --max-seconds per level.
#
#   scripts/service-load.sh BUNDLE [VARIANT] [REQUESTS] [MAX_TOKENS]
#   scripts/service-load.sh tests/fixtures/tiny-tied/bundle fp32 200 32
#   scripts/service-load.sh ~/.cache/qwen2-edge/demo/bundle-* int8 16 16
set -euo pipefail
source "$(dirname "$0")/lib.sh"
BUNDLE="$(cd "${1:?usage: $0 BUNDLE [VARIANT] [REQUESTS] [MAX_TOKENS]}" && pwd)"
VARIANT="${2:-fp32}"
REQUESTS="${3:-64}"
MAX_TOKENS="${4:-32}"
CLIENTS="${CLIENTS:-1,4,16}"
MAX_SECONDS="${MAX_SECONDS:-180}"

cd "$REPO"
cargo build --release --quiet --bin qwen2-edge --example service_load
make_work_dir
MQTT_SECTION=""
PORT=""
if start_mosquitto; then
    PORT="$MQTT_PORT"
    MQTT_SECTION=$(printf '[mqtt]\nurl = "mqtt://127.0.0.1:%s"\ntoken_interval_ms = 0\n' "$PORT")
fi

cat > "$WORK/config.toml" <<EOF
[model]
bundle = "$BUNDLE"
variant = "$VARIANT"
verify = false
[limits]
max_concurrent = 2
max_queue = 32
[unix_socket]
path = "$WORK/s.sock"
$MQTT_SECTION
EOF
target/release/qwen2-edge serve --config "$WORK/config.toml" 2>"$WORK/serve.log" &
WORK_PIDS+=($!)
for _ in $(seq 1 600); do [ -S "$WORK/s.sock" ] && grep -q "ready" "$WORK/serve.log" && break; sleep 0.1; done
grep -q "ready" "$WORK/serve.log" || { cat "$WORK/serve.log"; exit 1; }
[ -n "$PORT" ] && sleep 0.5   # the service's MQTT subscription

echo "== $BUNDLE ($VARIANT), $(nproc) cores"
target/release/examples/service_load --socket "$WORK/s.sock" --clients "$CLIENTS" \
    --requests "$REQUESTS" --max-tokens "$MAX_TOKENS" --max-seconds "$MAX_SECONDS"
if [ -n "$PORT" ]; then
    target/release/examples/service_load --mqtt "127.0.0.1:$PORT" --clients "$CLIENTS" \
        --requests "$REQUESTS" --max-tokens "$MAX_TOKENS" --max-seconds "$MAX_SECONDS"
fi
