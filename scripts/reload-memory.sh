#!/usr/bin/env bash
# What a reload costs in memory: starts `qwen2-edge serve` on BUNDLE (VARIANT) with
# reload_strategy = STRATEGY (overlap | swap), asks one question, changes the [model] section
# (threads 0 → 2: the same model, so the reload loads it again), sends SIGHUP, waits for the
# reload (and, for overlap, the old version's unloading) and prints the resident set (VmRSS)
# and its peak (VmHWM) before and after.
#
#   scripts/reload-memory.sh BUNDLE [VARIANT=int4] [STRATEGY=overlap]
set -euo pipefail
source "$(dirname "$0")/lib.sh"
bundle="$(cd "$1" && pwd)"
variant="${2:-int4}"
strategy="${3:-overlap}"
bin="$REPO/target/release/qwen2-edge"
[[ -x "$bin" ]] || (cd "$REPO" && cargo build --release --quiet)
make_work_dir
cat > "$WORK/config.toml" <<EOF
[model]
bundle = "$bundle"
variant = "$variant"
verify = false
threads = 0
reload_strategy = "$strategy"
[unix_socket]
path = "$WORK/s.sock"
EOF
"$bin" serve --config "$WORK/config.toml" 2> "$WORK/log" &
pid=$!
WORK_PIDS+=("$pid")
wait_log() {
    for _ in $(seq 600); do grep -q "$1" "$WORK/log" && return 0; sleep 0.1; done
    cat "$WORK/log" >&2
    echo "timed out waiting for: $1" >&2
    exit 1
}
wait_log ready
ask() {
    python3 - "$WORK/s.sock" <<'PY'
import json, socket, sys
s = socket.socket(socket.AF_UNIX)
s.connect(sys.argv[1])
s.sendall(b'{"op":"generate","id":"a","messages":[{"role":"user","content":"Write a haiku about rivers."}],"max_tokens":16,"temperature":0}\n')
for line in s.makefile():
    if json.loads(line)["event"] in ("done", "error"):
        break
PY
}
memory() { grep -E "VmHWM|VmRSS" "/proc/$pid/status" | awk '{printf "%s %.0f MB  ", $1, $2 / 1024}'; echo; }
ask
echo "steady:       $(memory)"
sed -i 's/^threads = 0/threads = 2/' "$WORK/config.toml"
kill -HUP "$pid"
wait_log "reload: done"
[[ "$strategy" == overlap ]] && wait_log "old version finished and was unloaded"
sleep 0.5
echo "after reload: $(memory)"
grep -E "reload|loaded" "$WORK/log" | sed 's/^/  log: /'
