#!/usr/bin/env bash
# Checks that the release is reproducible: the committed tree (HEAD) is cloned into a second
# directory and built there from scratch (its own target directory, a fresh zig cache) the way
# the release is built (cross/build.sh ARCH --glibc 2.17, then scripts/package.sh), and what
# ships must be byte for byte what this checkout builds (brought up to date first): the stripped
# binary and the Debian package. Both builds remap their checkout's and cargo's paths and take
# SOURCE_DATE_EPOCH from the commit (cross/build.sh `reproducible`), so a difference is a real
# one: a path, a time or an order that leaks into the release.
#
#   scripts/reproducible.sh [ARCH=x86_64]
#
# The unstripped binaries (symbols and line tables, for profiling) are compared too and reported,
# not failed on: their symbol tables and debug info differed between the two directories (local
# symbols LLVM promotes across codegen units carry a `.llvm.<hash>` suffix, and zig compiles its
# C runtime objects with the working directory in their debug info).
#
# Uncommitted changes are not in the clone: run it on a clean tree (CI's clone is one). Takes a
# from-scratch release build (about 8 minutes on 2 cores). On a difference, the first differing
# bytes and the strings of either binary that the other lacks are printed.
set -euo pipefail
source "$(dirname "$0")/lib.sh"
cd "$REPO"
arch="${1:-x86_64}"
floor=2.17
triple="$(release_triple "$arch")" || { echo "usage: scripts/reproducible.sh [x86_64|aarch64|armv7]" >&2; exit 2; }
strip="$(gnu_triple "$triple")-strip"
if [[ -n "$(git status --porcelain --untracked-files=no)" ]]; then
    log "warning: the checkout has uncommitted changes; the clone builds HEAD without them"
fi

# Built (or found up to date by cargo) here first: a binary left from an older commit would
# differ for that reason alone.
cross/build.sh "$arch" --glibc "$floor"
first="target/glibc-$floor/$triple/release/qwen2-edge"
make_work_dir
# Another path, another depth: what a path that leaked would show.
clone="$WORK/elsewhere/qwen2-edge-rebuild"
git clone --quiet --no-hardlinks "$REPO" "$clone"
git -C "$clone" checkout --quiet "$(git rev-parse HEAD)"
log "building $(git rev-parse --short HEAD) again in $clone"
(cd "$clone" && CARGO_TARGET_DIR="$clone/target/glibc-$floor" ZIG_GLOBAL_CACHE_DIR="$WORK/zig-cache" \
    cross/build.sh "$arch" --glibc "$floor")
second="$clone/target/glibc-$floor/$triple/release/qwen2-edge"
first_deb="$(scripts/package.sh --target "$triple" --glibc "$floor" | tail -1)"
second_deb="$(cd "$clone" && CARGO_TARGET_DIR="$clone/target/glibc-$floor" \
    scripts/package.sh --target "$triple" --glibc "$floor" | tail -1)"

"$strip" -o "$WORK/first.stripped" "$first"
"$strip" -o "$WORK/second.stripped" "$second"
sha256sum "$first" "$second" "$WORK/first.stripped" "$WORK/second.stripped" "$first_deb" "$second_deb"
"$strip" --strip-debug -o "$WORK/first.nodebug" "$first"
"$strip" --strip-debug -o "$WORK/second.nodebug" "$second"
if cmp -s "$first" "$second"; then
    log "the unstripped binaries are identical too"
elif cmp -s "$WORK/first.nodebug" "$WORK/second.nodebug"; then
    log "the unstripped binaries differ in their debug info only (not a failure; see the header)"
else
    log "the unstripped binaries differ in their symbol table too (not a failure: nothing of it ships)"
fi
if cmp -s "$WORK/first.stripped" "$WORK/second.stripped" && cmp -s "$first_deb" "$second_deb"; then
    log "reproducible: both builds of $(git rev-parse --short HEAD) for $triple give the same stripped binary ($(stat -c %s "$WORK/first.stripped") bytes) and the same $(basename "$first_deb")"
    exit 0
fi
log "NOT reproducible: what ships differs between the two builds"
cmp "$WORK/first.stripped" "$WORK/second.stripped" | head -3 || true
cmp "$first_deb" "$second_deb" | head -3 || true
diff <(strings -n 8 "$WORK/first.stripped" | sort -u) <(strings -n 8 "$WORK/second.stripped" | sort -u) | head -40 || true
exit 1
