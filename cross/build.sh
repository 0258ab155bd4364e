#!/usr/bin/env bash
# Cross-compile qwen2-edge for ARM boxes with Debian's cross toolchains, and optionally run the
# test suite under qemu user-mode emulation.
#
#   cross/build.sh [aarch64|armv7] [--test [cargo test args…]]
#
# aarch64-unknown-linux-gnu: Jetson (JetPack 5/6), Raspberry Pi 4/5 with a 64-bit OS.
# armv7-unknown-linux-gnueabihf: older Pi / 32-bit Raspberry Pi OS.
# Needs: rustup target add <triple>; apt-get install gcc-aarch64-linux-gnu libc6-dev-arm64-cross
# (or gcc-arm-linux-gnueabihf libc6-dev-armhf-cross) qemu-user.
# The binary dispatches SIMD kernels at run time (NEON / dot-product on aarch64): no target-cpu flag.
set -euo pipefail
cd "$(dirname "$0")/.."

arch="${1:-aarch64}"
shift || true
case "$arch" in
    aarch64) triple=aarch64-unknown-linux-gnu gnu=aarch64-linux-gnu ;;
    armv7) triple=armv7-unknown-linux-gnueabihf gnu=arm-linux-gnueabihf ;;
    *) echo "usage: cross/build.sh [aarch64|armv7] [--test [cargo test args…]]" >&2; exit 2 ;;
esac

if ! rustup target list --installed 2>/dev/null | grep -qx "$triple"; then
    if ! rustup target add "$triple"; then
        echo "SKIPPED: 'rustup target add $triple' was refused on this machine; no $arch build" >&2
        exit 3
    fi
fi
if ! command -v "$gnu-gcc" >/dev/null; then
    echo "error: $gnu-gcc not found (apt-get install gcc-$gnu libc6-dev-${arch/aarch64/arm64}-cross)" >&2
    exit 2
fi

upper="$(echo "$triple" | tr 'a-z-' 'A-Z_')"
export "CARGO_TARGET_${upper}_LINKER=$gnu-gcc"
export "CC_${triple//-/_}=$gnu-gcc"
export "CXX_${triple//-/_}=$gnu-g++"
export "AR_${triple//-/_}=$gnu-ar"
# Tests run under qemu with the cross sysroot's dynamic loader and libc.
export "CARGO_TARGET_${upper}_RUNNER=qemu-${arch/armv7/arm} -L /usr/$gnu"

if [[ "${1:-}" == "--test" ]]; then
    shift
    cargo test --release --target "$triple" "$@"
else
    cargo build --release --target "$triple" --bin qwen2-edge "$@"
    ls -l "target/$triple/release/qwen2-edge"
fi
