#!/usr/bin/env bash
# Fuzzes every parser of untrusted input (fuzz/fuzz_targets/: the request line, OpenAI bodies,
# the config, bundle.json, chat messages through the chat template, the streaming detokenizer,
# MQTT publishes through the front end) with libFuzzer for SECONDS each (default 60), and
# prints one line per target: runs, coverage, corpus, crashes. Exit 1 if any target crashed
# (the input is kept in fuzz/artifacts/<target>/; replay it with
# `cargo +nightly fuzz run -s none <target> <file>` in fuzz/); exit 3 if the nightly toolchain
# cannot be installed.
#
#   scripts/fuzz.sh [SECONDS] [TARGET...]
#
# Needs the nightly toolchain (installed with rustup when missing) and cargo-fuzz (installed into
# the cache). The corpus grows in the cache (~/.cache/qwen2-edge/fuzz-corpus/<target>) from the
# committed seeds in fuzz/seeds/<target>. No sanitizer (-s none): the targets are safe Rust
# (the unsafe kernels are checked by Miri and against their portable twins), and AddressSanitizer
# would double the build for no finding it could make there; libFuzzer's RSS and time limits
# still catch runaway allocations (-rss_limit_mb, -malloc_limit_mb) and hangs (-timeout).
set -euo pipefail
source "$(dirname "$0")/lib.sh"
cd "$REPO/fuzz"
seconds="${1:-60}"
shift || true
targets=("$@")
if [[ ${#targets[@]} -eq 0 ]]; then
    targets=(request openai_body config bundle_json chat_template detokenizer mqtt_publish)
fi

if ! rustup run nightly rustc --version >/dev/null 2>&1; then
    log "rustup toolchain install nightly (the fuzz targets only)"
    if ! rustup toolchain install nightly --profile minimal; then
        log "SKIPPED: fuzzing needs the nightly toolchain, which rustup could not install here"
        exit 3
    fi
fi
tools="$CACHE/tools"
if ! [[ -x "$tools/bin/cargo-fuzz" ]]; then
    log "cargo install cargo-fuzz (into $tools)"
    cargo install --quiet --locked --root "$tools" cargo-fuzz@0.13.2
fi
export PATH="$tools/bin:$PATH"
# The instrumented build lives in the cache too: a later run rebuilds only what changed.
export CARGO_TARGET_DIR="$CACHE/fuzz-target"

log "cargo +nightly fuzz build (into $CARGO_TARGET_DIR)"
cargo +nightly fuzz build -s none

for t in "${targets[@]}"; do
    # A target without committed seeds is a mistake (git keeps no empty folder): say so, and
    # do not let libFuzzer fail on a missing directory.
    if [[ -z "$(ls -A "seeds/$t" 2>/dev/null)" ]]; then
        log "fuzz/seeds/$t has no seed files: commit at least one for target $t"
        exit 1
    fi
done

crashed=0
printf '%-14s %12s %8s %10s %8s\n' target runs cov corpus crashes
for t in "${targets[@]}"; do
    corpus="$CACHE/fuzz-corpus/$t"
    mkdir -p "$corpus"
    out="$(mktemp)"
    set +e
    cargo +nightly fuzz run -s none "$t" "$corpus" "seeds/$t" -- \
        -max_total_time="$seconds" -rss_limit_mb=2048 -malloc_limit_mb=1024 -timeout=10 \
        -print_final_stats=1 >"$out" 2>&1
    rc=$?
    set -e
    # `|| true`: a run that ended before its first status line has none of these.
    runs="$(sed -n 's/^stat::number_of_executed_units: *//p' "$out" | tail -1)"
    cov="$(grep -o 'cov: [0-9]*' "$out" | tail -1 | cut -d' ' -f2 || true)"
    corp="$(grep -o 'corp: [0-9]*' "$out" | tail -1 | cut -d' ' -f2 || true)"
    n=$(find "artifacts/$t" -type f 2>/dev/null | wc -l)
    printf '%-14s %12s %8s %10s %8s\n' "$t" "${runs:-?}" "${cov:-?}" "${corp:-?}" "$n"
    if [[ $rc -ne 0 || $n -gt 0 ]]; then
        crashed=1
        if ! grep -E "panicked|ERROR|SUMMARY|Test unit written" "$out" | head -20 >&2; then
            tail -20 "$out" >&2
        fi
        log "$t: libFuzzer exited with $rc"
    fi
    rm -f "$out"
done
exit "$crashed"
