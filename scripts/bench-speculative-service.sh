#!/usr/bin/env bash
# Prompt lookup in the daemon against plain decoding: `qwen2-edge serve` started twice on the
# same bundle, with `[[model]] prompt_lookup = 0` and then `= LOOKUP`, each asked the ten mixed
# prompts of scripts/prompts/speculative.txt over its Unix socket (greedy, CLIENTS at a time),
# as a Markdown table: each prompt's decode tokens/s both ways (the `done` event's timings),
# whether the answers are the same (they must be), and the drafts the daemon's `stats` counted.
# The machine should be otherwise idle.
#
#   scripts/bench-speculative-service.sh BUNDLE [VARIANT=int4] > table.md
#   env: LOOKUP (8), GEN (128 new tokens), CLIENTS (1), THREADS (2)
#   With DRAFT=<bundle> (DRAFT_VARIANT int4, DRAFT_TOKENS 3, DRAFT_LM_HEAD bundle) the second
#   daemon drafts with that model instead of prompt lookup (`[[model]] draft`: the draft model's
#   table first, with `lm_head = DRAFT_LM_HEAD`); DRAFT_LOOKUP=N (0) adds `prompt_lookup = N`:
#   lookup's drafts first, the draft model's where the context has none; DRAFT_VOCAB=N (the
#   default, 65536) sets `draft_vocab` (0: the draft model drafts from every token).
set -euo pipefail
source "$(dirname "$0")/lib.sh"
BUNDLE="${1:-}" VARIANT="${2:-int4}"
[[ -f "$BUNDLE/bundle.json" ]] || { sed -n '9p' "$0" | sed 's/^# */usage: /' >&2; exit 2; }
BIN="$REPO/target/release/qwen2-edge"
[[ -x "$BIN" ]] || cargo build --release --quiet --manifest-path "$REPO/Cargo.toml"
LOOKUP="${LOOKUP:-8}" GEN="${GEN:-128}" CLIENTS="${CLIENTS:-1}" THREADS="${THREADS:-2}"
DRAFT="${DRAFT:-}" DRAFT_VARIANT="${DRAFT_VARIANT:-int4}" DRAFT_TOKENS="${DRAFT_TOKENS:-3}"
DRAFT_LM_HEAD="${DRAFT_LM_HEAD:-bundle}" DRAFT_LOOKUP="${DRAFT_LOOKUP:-0}" DRAFT_VOCAB="${DRAFT_VOCAB:-65536}"
make_work_dir

serve_and_ask() { # LOOKUP OUT.json
    local sock="$WORK/lookup$1.sock" config="$WORK/lookup$1.toml" log="$WORK/lookup$1.log"
    local model=""
    if [[ -n "$DRAFT" && "$1" != 0 ]]; then
        model=target
        printf '[[model]]\nname = "draft"\nbundle = "%s"\nvariant = "%s"\nthreads = %s\nverify = false\nlm_head = "%s"\n\n' \
            "$DRAFT" "$DRAFT_VARIANT" "$THREADS" "$DRAFT_LM_HEAD" > "$config"
        printf '[[model]]\nname = "target"\nbundle = "%s"\nvariant = "%s"\nthreads = %s\nverify = false\ndraft = "draft"\ndraft_tokens = %s\nprompt_lookup = %s\ndraft_vocab = %s\n' \
            "$BUNDLE" "$VARIANT" "$THREADS" "$DRAFT_TOKENS" "$DRAFT_LOOKUP" "$DRAFT_VOCAB" >> "$config"
    else
        printf '[model]\nbundle = "%s"\nvariant = "%s"\nthreads = %s\nverify = false\nprompt_lookup = %s\n' \
            "$BUNDLE" "$VARIANT" "$THREADS" "$1" > "$config"
    fi
    printf '\n[limits]\nmax_concurrent = %s\nmax_new_tokens = %s\n' "$CLIENTS" "$GEN" >> "$config"
    printf '\n[unix_socket]\npath = "%s"\n' "$sock" >> "$config"
    "$BIN" serve --config "$config" 2> "$log" &
    local server=$!
    WORK_PIDS+=("$server")
    for _ in $(seq 1 240); do
        grep -q ' ready$' "$log" && break
        kill -0 "$server" 2>/dev/null || { cat "$log" >&2; log "the daemon exited"; exit 1; }
        sleep 0.5
    done
    python3 - "$sock" "$REPO/scripts/prompts/speculative.txt" "$GEN" "$CLIENTS" "$model" > "$2" <<'PY'
import json, socket, sys, threading
sock_path, prompts_path, gen, clients = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
model = sys.argv[5]
prompts = [p.strip("\n") for p in open(prompts_path).read().split("\n---\n")]

def call(request):
    s = socket.socket(socket.AF_UNIX)
    s.connect(sock_path)
    s.sendall((json.dumps(request) + "\n").encode())
    buf = b""
    while True:
        chunk = s.recv(65536)
        if not chunk:
            sys.exit(f"the daemon closed the connection: {buf[-300:]!r}")
        buf += chunk
        for line in buf.split(b"\n")[:-1]:
            event = json.loads(line)
            if event.get("event") in ("done", "error", "stats"):
                s.close()
                return event

results = [None] * len(prompts)
def client(first):
    for i in range(first, len(prompts), clients):
        messages = [{"role": "user", "content": prompts[i]}]
        request = {"op": "generate", "id": f"p{i}", "messages": messages, "max_tokens": gen,
                   "temperature": 0}
        if model:
            request["model"] = model
        results[i] = call(request)
threads = [threading.Thread(target=client, args=(c,)) for c in range(clients)]
for t in threads: t.start()
for t in threads: t.join()
print(json.dumps({"answers": results, "stats": call({"op": "stats", "id": "s"})}))
PY
    kill -TERM "$server"
    wait "$server" || true
}

serve_and_ask 0 "$WORK/plain.json"
serve_and_ask "$LOOKUP" "$WORK/lookup.json"
how="lookup $LOOKUP"
[[ -n "$DRAFT" ]] && how="draft $(basename "$DRAFT") $DRAFT_VARIANT ×$DRAFT_TOKENS"
python3 - "$WORK/plain.json" "$WORK/lookup.json" "$VARIANT" "$how" "$CLIENTS" "$REPO/scripts/prompts/speculative.txt" <<'PY'
import json, statistics, sys
plain, fast = (json.load(open(p)) for p in sys.argv[1:3])
variant, lookup, clients = sys.argv[3:6]
prompts = [p.strip("\n") for p in open(sys.argv[6]).read().split("\n---\n")]
print(f"| prompt | tokens | plain t/s | {lookup} t/s | speed-up | same answer |")
print("|---|---:|---:|---:|---:|---|")
ratios, tokens, t_plain, t_fast = [], 0, 0.0, 0.0
for prompt, a, b in zip(prompts, plain["answers"], fast["answers"]):
    if a.get("event") != "done" or b.get("event") != "done":
        sys.exit(f"not answered: {a} / {b}")
    n = a["usage"]["completion_tokens"] - 1
    pa, pb = a["timings"]["decode_tokens_per_s"], b["timings"]["decode_tokens_per_s"]
    ratios.append(pb / pa)
    tokens, t_plain, t_fast = tokens + n, t_plain + n / pa, t_fast + n / pb
    same = "yes" if a["text"] == b["text"] else "**NO**"
    print(f"| {prompt.splitlines()[0][:48]} | {n} | {pa:.1f} | {pb:.1f} | {pb / pa:.2f}× | {same} |")
s = fast["stats"]
# Several models (a draft model's config): the drafting model's own counters.
s = next((m for m in s.get("models", []) if m.get("name") == "target"), s)
print(f"| **all ({variant}, {clients} client(s))** | {tokens} | {tokens / t_plain:.1f} | {tokens / t_fast:.1f} | "
      f"{t_plain / t_fast:.2f}× (median {statistics.median(ratios):.2f}×) | |")
print(f"\ndrafted {s['draft_tokens']}, accepted {s['accepted_draft_tokens']} (the daemon's stats)")
PY
