#!/usr/bin/env bash
# Counts the guest instructions an Arm program executes under qemu user-mode emulation
# (qemu-aarch64, or qemu-arm with --arch arm), with the TCG plugin in
# tools/qemu-insns/insn_count.c (an emulator's count, not a hardware one: the same binary and
# CPU model give the same number on any host).
#
#   scripts/qemu-insns.sh [--arch aarch64|arm] [--cpu CPU] -- PROGRAM ARGS...
#
# Runs QEMU_CPU=CPU (default max) qemu-aarch64 -L /usr/aarch64-linux-gnu (--arch arm: qemu-arm
# -L /usr/arm-linux-gnueabihf) -plugin insn_count.so PROGRAM ARGS...; the program's stdout and
# stderr pass through untouched, and the last line on stderr is
#   qemu-insns: <N> guest instructions
# The plugin is built with the host gcc into
# ${QWEN2_EDGE_CACHE:-$HOME/.cache/qwen2-edge}/qemu-insns/insn_count.so when missing or older
# than its source. Exit status: the program's; 2 for bad arguments, or when the program exited
# 0 but no count came back.
set -euo pipefail
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
CACHE="${QWEN2_EDGE_CACHE:-$HOME/.cache/qwen2-edge}"
SRC="$REPO/tools/qemu-insns/insn_count.c"
SO="$CACHE/qemu-insns/insn_count.so"

fail() { echo "qemu-insns: $*" >&2; exit 2; }

CPU=max
ARCH=aarch64
while [[ $# -gt 0 ]]; do
    case "$1" in
        --cpu) [[ $# -ge 2 ]] || fail "--cpu needs a value"; CPU="$2"; shift 2 ;;
        --arch) [[ $# -ge 2 ]] || fail "--arch needs a value"; ARCH="$2"; shift 2 ;;
        --) shift; break ;;
        -h|--help) sed -n '2,15p' "$0"; exit 0 ;;
        *) fail "unknown argument $1 (usage: $0 [--arch aarch64|arm] [--cpu CPU] -- PROGRAM ARGS...)" ;;
    esac
done
[[ $# -ge 1 ]] || fail "no program given (usage: $0 [--arch aarch64|arm] [--cpu CPU] -- PROGRAM ARGS...)"
case "$ARCH" in
    aarch64) SYSROOT=/usr/aarch64-linux-gnu ;;
    arm) SYSROOT=/usr/arm-linux-gnueabihf ;;
    *) fail "--arch: aarch64 or arm, not $ARCH" ;;
esac
command -v "qemu-$ARCH" >/dev/null || fail "qemu-$ARCH not found (Debian: qemu-user)"
# qemu-aarch64 neither searches PATH nor says why a missing program failed: check here.
[[ -f "$1" ]] || fail "no such program: $1"

# Build into a temporary name and rename, so a concurrent run never loads a half-written .so.
if [[ ! -f "$SO" || "$SRC" -nt "$SO" ]]; then
    mkdir -p "$(dirname "$SO")"
    gcc -shared -fPIC -O2 -fvisibility=hidden -Wall -Wextra -o "$SO.tmp.$$" "$SRC"
    mv -f "$SO.tmp.$$" "$SO"
fi

# The plugin reports through QEMU's log, which prints only with -d plugin. -D sends that log to
# a file of its own, so the program's stderr stays as it was and the count cannot mix into it.
LOG="$(mktemp "${TMPDIR:-/tmp}/qemu-insns.XXXXXX")"
trap 'rm -f "$LOG"' EXIT
status=0
QEMU_CPU="$CPU" "qemu-$ARCH" -L "$SYSROOT" -plugin "$SO" -d plugin -D "$LOG" "$@" \
    || status=$?

count="$(sed -n 's/^insns \([0-9][0-9]*\)$/\1/p' "$LOG" | tail -n 1)"
# No line: the guest died before QEMU ran the plugin's exit hook (killed by a signal: QEMU
# runs the hook on exit/exit_group only). Keep the program's failure status if it has one.
if [[ -z "$count" ]]; then
    echo "qemu-insns: no count from the plugin (exit status $status)" >&2
    exit $((status != 0 ? status : 2))
fi
echo "qemu-insns: $count guest instructions" >&2
exit "$status"
