#!/usr/bin/env bash
# Cross-compile qwen2-edge for ARM boxes with Debian's cross toolchains, and optionally run the
# test suite under qemu user-mode emulation; or build a release binary against an old glibc
# (--glibc) or a static one (--static) with zig.
#
#   cross/build.sh [aarch64|armv7] [--test [cargo test args…]]
#   cross/build.sh [x86_64|aarch64|armv7] --glibc VERSION [--test [cargo test args…]]
#   cross/build.sh [x86_64|aarch64] --static
#
# aarch64-unknown-linux-gnu: Jetson (JetPack 5/6), Raspberry Pi 4/5 with a 64-bit OS.
# armv7 = thumbv7neon-unknown-linux-gnueabihf: Raspberry Pi 2/3/Zero 2 with 32-bit Raspberry Pi
# OS (armhf): Armv7 with NEON, which every such Pi has and which stable Rust can only enable for
# a whole target on 32-bit Arm (no run-time dispatch there); Thumb-2 code, as Debian's armhf.
# Needs: rustup target add <triple>; apt-get install gcc-aarch64-linux-gnu libc6-dev-arm64-cross
# (or gcc-arm-linux-gnueabihf libc6-dev-armhf-cross) qemu-user.
# --glibc VERSION (e.g. 2.17): links against that glibc's symbol versions with
# `cargo zigbuild` (zig from the `ziglang` Python package, cargo-zigbuild from crates.io, both
# installed into ~/.cache/qwen2-edge), then checks with objdump that no symbol needs a newer
# glibc; into target/glibc-VERSION/<triple>/. With --test, the tests are built the same way and
# run under qemu (the cross sysroot's newer libc runs them). Needs no cross gcc for the build.
# --static: a fully static musl binary (into target/static/<arch>-unknown-linux-musl/) for boxes
# without a package manager; the ort backend is compiled out (ONNX Runtime is a shared library
# loaded at run time, which a static binary cannot do): native and tract only.
# zig builds are reproducible: SOURCE_DATE_EPOCH (default: the commit's time) and the checkout's
# and cargo's paths remapped, so the same commit gives the same stripped binary (what the .deb
# ships) in any directory (scripts/reproducible.sh checks it).
# The binary dispatches SIMD kernels at run time (NEON / dot-product on aarch64): no target-cpu flag.
set -euo pipefail
source "$(dirname "$0")/../scripts/lib.sh"
cd "$REPO"

ZIGLANG_VERSION=0.17.1
CARGO_ZIGBUILD_VERSION=0.24.1

arch="${1:-aarch64}"
shift || true
triple="$(release_triple "$arch")" || { sed -n '6,8p' "$0" | sed 's/^# */usage: /' >&2; exit 2; }
gnu="$(gnu_triple "$triple")"
upper="$(echo "$triple" | tr 'a-z-' 'A-Z_')"
# Tests run under qemu with the cross sysroot's dynamic loader and libc.
runner="qemu-${arch/armv7/arm} -L /usr/$gnu"

mode=cross
case "${1:-}" in
    --glibc) mode=glibc floor="${2:?--glibc VERSION, e.g. 2.17}"; shift 2 ;;
    --static) mode=static; shift
        [[ "$arch" != armv7 ]] || { echo "--static: x86_64 and aarch64 only" >&2; exit 2; }
        triple="$arch-unknown-linux-musl" ;;
esac

if ! rustup target list --installed 2>/dev/null | grep -qx "$triple"; then
    if ! rustup target add "$triple"; then
        echo "SKIPPED: 'rustup target add $triple' was refused on this machine; no $arch build" >&2
        exit 3
    fi
fi

# zig and cargo-zigbuild, pinned, in the cache; on the PATH from here on.
ensure_zig() {
    local zig_venv="$CACHE/zig-venv" tools="$CACHE/tools"
    if ! [[ -x "$zig_venv/bin/python" ]] \
        || [[ "$("$zig_venv/bin/python" -m ziglang version 2>/dev/null)" != "$ZIGLANG_VERSION" ]]; then
        log "zig $ZIGLANG_VERSION (the ziglang package) into $zig_venv"
        python3 -m venv "$zig_venv"
        "$zig_venv/bin/pip" install --quiet "ziglang==$ZIGLANG_VERSION"
    fi
    if ! [[ "$("$tools/bin/cargo-zigbuild" --version 2>/dev/null)" == *" $CARGO_ZIGBUILD_VERSION" ]]; then
        log "cargo install cargo-zigbuild $CARGO_ZIGBUILD_VERSION (into $tools)"
        cargo install --quiet --locked --root "$tools" "cargo-zigbuild@$CARGO_ZIGBUILD_VERSION"
    fi
    # cargo-zigbuild runs `python3 -m ziglang` when no `zig` is on the PATH.
    export PATH="$zig_venv/bin:$tools/bin:$PATH"
}

# The same commit gives the same binary wherever it is checked out: no build time, no absolute
# path of the checkout or of cargo's registry in the binary (panic locations, line tables, C
# objects' debug info).
reproducible() {
    export_source_date_epoch
    local cargo_home maps=() m flags=""
    cargo_home="$(cd "${CARGO_HOME:-$HOME/.cargo}" && pwd -P)"
    maps=("$(pwd -P)=/build/qwen2-edge" "$cargo_home=/cargo")
    for m in "${maps[@]}"; do
        flags+=" --remap-path-prefix=$m"
        CFLAGS="${CFLAGS:+$CFLAGS }-ffile-prefix-map=$m"
        CXXFLAGS="${CXXFLAGS:+$CXXFLAGS }-ffile-prefix-map=$m"
    done
    export RUSTFLAGS="${RUSTFLAGS:+$RUSTFLAGS }${flags# }" CFLAGS CXXFLAGS
}

if [[ "$mode" == static ]]; then
    ensure_zig
    reproducible
    export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-target/static}"
    log "cargo zigbuild --release --target $triple --no-default-features --features tract"
    cargo zigbuild --release --target "$triple" --no-default-features --features tract --bin qwen2-edge
    bin="$CARGO_TARGET_DIR/$triple/release/qwen2-edge"
    # Static: no program interpreter and no shared library to find on the box.
    if readelf -l "$bin" | grep -q INTERP || readelf -d "$bin" | grep -q NEEDED; then
        readelf -l -d "$bin" >&2
        log "$bin is not static"
        exit 1
    fi
    log "$bin: static (no interpreter, no shared libraries)"
    ls -l "$bin"
    exit 0
fi

if [[ "$mode" == glibc ]]; then
    ensure_zig
    reproducible
    # Its own target directory: C dependencies compiled by the host's or Debian's cross gcc
    # (against a newer glibc's headers) must never be linked into the floor build.
    export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-target/glibc-$floor}"
    if [[ "${1:-}" == "--test" ]]; then
        shift
        [[ "$arch" == x86_64 ]] || export "CARGO_TARGET_${upper}_RUNNER=$runner"
        log "cargo-zigbuild test --release --target $triple.$floor $*"
        cargo-zigbuild test --release --target "$triple.$floor" "$@"
        exit 0
    fi
    log "cargo zigbuild --release --target $triple.$floor"
    cargo zigbuild --release --target "$triple.$floor" --bin qwen2-edge
    bin="$CARGO_TARGET_DIR/$triple/release/qwen2-edge"
    needs="$(glibc_needed "$bin" "$gnu")"
    if ! version_at_most "$needs" "$floor"; then
        log "$bin needs glibc $needs, above the floor $floor"
        exit 1
    fi
    log "$bin: needs glibc $needs (floor $floor)"
    ls -l "$bin"
    exit 0
fi

if [[ "$arch" == x86_64 ]]; then
    echo "x86_64 builds natively (cargo build --release); cross/build.sh x86_64 --glibc VERSION links against an older glibc" >&2
    exit 2
fi
if ! command -v "$gnu-gcc" >/dev/null; then
    echo "error: $gnu-gcc not found (apt-get install gcc-$gnu libc6-dev-$( [[ $arch == armv7 ]] && echo armhf || echo arm64 )-cross)" >&2
    exit 2
fi

export "CARGO_TARGET_${upper}_LINKER=$gnu-gcc"
export "CC_${triple//-/_}=$gnu-gcc"
export "CXX_${triple//-/_}=$gnu-g++"
export "AR_${triple//-/_}=$gnu-ar"
export "CARGO_TARGET_${upper}_RUNNER=$runner"

if [[ "${1:-}" == "--test" ]]; then
    shift
    cargo test --release --target "$triple" "$@"
else
    cargo build --release --target "$triple" --bin qwen2-edge "$@"
    ls -l "target/$triple/release/qwen2-edge"
fi
