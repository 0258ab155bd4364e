#!/usr/bin/env bash
# The ARM figure that can be had without ARM hardware: guest instructions executed per decoded
# token and per prompt token, counted under qemu-aarch64 (scripts/qemu-insns.sh), for our
# aarch64 binary on each ARM kernel tier and, when built, llama.cpp's llama-bench for aarch64.
#
#   scripts/arm-insns.sh BUNDLE [VARIANT] [GGUF]
#
# Per decoded token: (count of P prompt + N2 generated) − (P + N1), over N2 − N1; per prompt
# token: (P2 + N1) − (P1 + N1), over P2 − P1 — load, warm-up and the other fixed costs cancel.
# One thread (the plugin's counter is not atomic). What it means: the work a core must
# retire, instruction for instruction, on that ISA level; what it does not: time — an `sdot`
# and an `add` count the same, and memory stalls, which bound decode on real boards, are not
# seen. Needs target/aarch64-unknown-linux-gnu/release/qwen2-edge (cross/build.sh aarch64).
# ARM_ARCH=arm counts a 32-bit build instead (ARM_BIN, default the armv7 glibc 2.17 release
# binary; its only tier, generic, on an emulated Cortex-A7 = Raspberry Pi 2).
set -euo pipefail
source "$(dirname "$0")/lib.sh"
cd "$REPO"
BUNDLE="$1"
VARIANT="${2:-int4}"
GGUF="${3:-}"
ARM_ARCH="${ARM_ARCH:-aarch64}"
if [[ "$ARM_ARCH" == arm ]]; then
    BIN="${ARM_BIN:-target/glibc-2.17/thumbv7neon-unknown-linux-gnueabihf/release/qwen2-edge}"
    SPECS="cortex-a7:generic"
else
    BIN="${ARM_BIN:-target/aarch64-unknown-linux-gnu/release/qwen2-edge}"
    SPECS="cortex-a72:neon max:neon-dotprod max:generic"
fi
P1=8 P2=40 N1=8 N2=24

count() { # count CPU ARGS... -> guest instructions
    local cpu="$1"
    shift
    scripts/qemu-insns.sh --arch "$ARM_ARCH" --cpu "$cpu" -- "$@" 2>&1 >/dev/null | sed -n 's/^qemu-insns: \([0-9]*\) guest instructions$/\1/p'
}
ours() { # ours CPU TIER P N
    count "$1" "$BIN" bench --bundle "$BUNDLE" --variant "$VARIANT" --kernels "$2" --threads 1 --runs 1 \
        --prompt-tokens "$3" --gen-tokens "$4" --long-prompt-tokens 0 --no-verify
}
report() { # report LABEL base(P1,N1) (P1,N2) (P2,N1)
    python3 - "$@" <<'PY'
import sys
label, a, b, c = sys.argv[1], *map(int, sys.argv[2:5])
p1, p2, n1, n2 = 8, 40, 8, 24
print(f"{label}: {(b - a) / (n2 - n1) / 1e6:.1f} M instructions per decoded token, "
      f"{(c - a) / (p2 - p1) / 1e6:.1f} M per prompt token")
PY
}

for spec in $SPECS; do
    cpu="${spec%%:*}" tier="${spec#*:}"
    log "qwen2-edge $VARIANT, $tier kernels, QEMU_CPU=$cpu"
    report "qwen2-edge $VARIANT $tier ($cpu)" "$(ours "$cpu" "$tier" $P1 $N1)" \
        "$(ours "$cpu" "$tier" $P1 $N2)" "$(ours "$cpu" "$tier" $P2 $N1)"
done

LLAMA="$CACHE/llamacpp/$LLAMACPP_VERSION-aarch64-armv8.2-dotprod/bin/llama-bench"
if [[ "$ARM_ARCH" == aarch64 && -n "$GGUF" && -x "$LLAMA" ]]; then
    # llama-bench runs a prompt of P (pp) and, separately, N generated tokens (tg): one
    # repetition each, no warm-up (its warm-up repeats the prompt and would count it twice).
    lb() { count max "$LLAMA" -m "$GGUF" -t 1 -r 1 --no-warmup -p "$1" -n "$2" -o json; }
    log "llama.cpp $(basename "$GGUF") (aarch64, armv8.2-a+dotprod)"
    report "llama.cpp $(basename "$GGUF") (max)" "$(lb $P1 $N1)" "$(lb $P1 $N2)" "$(lb $P2 $N1)"
else
    log "llama.cpp for aarch64 not built (scripts/lib.sh: ensure_llamacpp aarch64) or no GGUF given: skipped"
fi
