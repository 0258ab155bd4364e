#!/usr/bin/env bash
# Speculative decoding with prompt lookup against plain decoding: ten mixed prompts
# (scripts/prompts/speculative.txt: code edits that copy their input, a quote, code to write,
# questions), greedy, each answered with `--prompt-lookup 0` and `--prompt-lookup N` one after
# the other (a noisy box slows both alike), as a Markdown table: decode tokens/s of each,
# drafts accepted, forward passes; and whether the two answers are the same (they must be).
# The machine should be otherwise idle.
#
#   scripts/bench-speculative.sh BUNDLE [VARIANT=int4] > table.md
#   env: LOOKUP (8: drafted tokens per pass), GEN (128), THREADS (2), FLAGS (more `generate`
#        flags for both runs, e.g. "--repetition-penalty 1"; default: the bundle's settings),
#        DRAFT (a draft model's bundle, e.g. the 0.5B's for the 1.5B: drafts from it instead of
#        prompt lookup), DRAFT_VARIANT (int4), DRAFT_TOKENS (3), DRAFT_LM_HEAD (bundle),
#        DRAFT_LOOKUP (0; N: prompt lookup's drafts first, up to N, the draft model's where the
#        context has none), DRAFT_VOCAB (65536: the draft's `--draft-vocab`; 0: every token)
set -euo pipefail
source "$(dirname "$0")/lib.sh"
BUNDLE="${1:-}" VARIANT="${2:-int4}"
[[ -f "$BUNDLE/bundle.json" ]] || { sed -n '9p' "$0" | sed 's/^# */usage: /' >&2; exit 2; }
BIN="$REPO/target/release/qwen2-edge"
[[ -x "$BIN" ]] || cargo build --release --quiet --manifest-path "$REPO/Cargo.toml"
LOOKUP="${LOOKUP:-8}" GEN="${GEN:-128}" THREADS="${THREADS:-2}"
WORK="$(mktemp -d)"
trap 'rm -rf "$WORK"' EXIT

# Prompts are separated by lines holding only "---".
python3 - "$REPO/scripts/prompts/speculative.txt" "$WORK" <<'PY'
import pathlib, sys
text = pathlib.Path(sys.argv[1]).read_text()
for i, p in enumerate(t.strip("\n") for t in text.split("\n---\n")):
    pathlib.Path(sys.argv[2], f"prompt{i}").write_text(p)
PY

run() { # PROMPT_FILE LOOKUP OUT: the answer to OUT, the stats lines to OUT.err
    local drafts=(--prompt-lookup "$2")
    if [[ -n "${DRAFT:-}" && "$2" != 0 ]]; then
        drafts=(--prompt-lookup "${DRAFT_LOOKUP:-0}" --draft-bundle "$DRAFT" --draft-variant "${DRAFT_VARIANT:-int4}" --draft-tokens "${DRAFT_TOKENS:-3}"
            --draft-lm-head "${DRAFT_LM_HEAD:-bundle}" --draft-vocab "${DRAFT_VOCAB:-65536}")
    fi
    "$BIN" generate --bundle "$BUNDLE" --variant "$VARIANT" --no-verify --threads "$THREADS" \
        --temperature 0 --max-tokens "$GEN" --stats "${drafts[@]}" ${FLAGS:-} "$(cat "$1")" \
        > "$3" 2> "$3.err"
}
for p in "$WORK"/prompt*; do
    run "$p" 0 "$p.plain"
    run "$p" "$LOOKUP" "$p.lookup"
done
label="lookup $LOOKUP"
[[ -n "${DRAFT:-}" ]] && label="draft ${DRAFT_VARIANT:-int4}×${DRAFT_TOKENS:-3}"
[[ -n "${DRAFT:-}" && "${DRAFT_LOOKUP:-0}" != 0 ]] && label="$label + lookup ${DRAFT_LOOKUP}"
python3 - "$WORK" "$VARIANT" "$label" <<'PY'
import pathlib, re, statistics, sys
work, variant, lookup = pathlib.Path(sys.argv[1]), sys.argv[2], sys.argv[3]
def stats(path):
    err = pathlib.Path(str(path) + ".err").read_text()
    m = re.search(r"completion (\d+) tokens.*decode ([0-9.]+) tok/s", err)
    if not m:
        sys.exit(f"{path}: no stats line in\n{err}")
    s = re.search(r"\[speculative\] (\d+) drafted, (\d+) accepted .*?, (\d+) forward passes", err)
    return int(m[1]) - 1, float(m[2]), tuple(map(int, s.groups())) if s else (0, 0, 0)
print(f"| prompt | tokens | plain t/s | {lookup} t/s | speed-up | drafted | accepted | passes | same answer |")
print("|---|---:|---:|---:|---:|---:|---:|---:|---|")
totals = [0, 0.0, 0.0, 0, 0]
ratios = []
prompts = sorted((p for p in work.iterdir() if re.fullmatch(r"prompt\d+", p.name)), key=lambda p: int(p.name[6:]))
for p in prompts:
    n, plain, _ = stats(str(p) + ".plain")
    n2, fast, (drafted, accepted, passes) = stats(str(p) + ".lookup")
    same = (pathlib.Path(str(p) + ".plain").read_bytes() == pathlib.Path(str(p) + ".lookup").read_bytes())
    first = p.read_text().splitlines()[0][:48]
    ratios.append(fast / plain)
    totals[0] += n; totals[1] += n / plain; totals[2] += n2 / fast; totals[3] += drafted; totals[4] += accepted
    print(f"| {first} | {n} | {plain:.1f} | {fast:.1f} | {fast / plain:.2f}× | {drafted} | {accepted} | {passes} | {'yes' if same else '**NO**'} |")
agg_plain, agg_fast = totals[0] / totals[1], totals[0] / totals[2]
print(f"| **all ({variant})** | {totals[0]} | {agg_plain:.1f} | {agg_fast:.1f} | {agg_fast / agg_plain:.2f}× "
      f"(median {statistics.median(ratios):.2f}×) | {totals[3]} | {totals[4]} | | |")
PY
