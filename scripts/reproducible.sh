#!/usr/bin/env bash
# Checks that the release binary is reproducible: the committed tree (HEAD) is cloned into a
# second directory and built there from scratch (its own target directory) the way the release
# is built (cross/build.sh ARCH --glibc 2.17), and that binary must be byte for byte the one
# built in this checkout (built first when missing). Both builds remap their checkout's and
# cargo's paths and take SOURCE_DATE_EPOCH from the commit (cross/build.sh `reproducible`), so a
# difference is a real one: a path, a time or an order that leaks into the binary.
#
#   scripts/reproducible.sh [ARCH=x86_64]
#
# Uncommitted changes are not in the clone: run it on a clean tree (CI's clone is one). Takes a
# from-scratch release build (about 10 minutes on 2 cores). The stripped binaries (what the
# .deb ships) are compared too, and on a difference the first differing bytes and the strings
# of either binary that the other lacks are printed.
set -euo pipefail
source "$(dirname "$0")/lib.sh"
cd "$REPO"
arch="${1:-x86_64}"
floor=2.17
case "$arch" in
    x86_64) triple=x86_64-unknown-linux-gnu strip=strip ;;
    aarch64) triple=aarch64-unknown-linux-gnu strip=aarch64-linux-gnu-strip ;;
    armv7) triple=thumbv7neon-unknown-linux-gnueabihf strip=arm-linux-gnueabihf-strip ;;
    *) echo "usage: scripts/reproducible.sh [x86_64|aarch64|armv7]" >&2; exit 2 ;;
esac
if [[ -n "$(git status --porcelain --untracked-files=no)" ]]; then
    log "warning: the checkout has uncommitted changes; the clone builds HEAD without them"
fi

first="target/glibc-$floor/$triple/release/qwen2-edge"
if [[ ! -x "$first" ]]; then
    cross/build.sh "$arch" --glibc "$floor"
fi
make_work_dir
# Another path, another depth: what a path that leaked would show.
clone="$WORK/elsewhere/qwen2-edge-rebuild"
git clone --quiet --no-hardlinks "$REPO" "$clone"
git -C "$clone" checkout --quiet "$(git rev-parse HEAD)"
log "building $(git rev-parse --short HEAD) again in $clone"
(cd "$clone" && CARGO_TARGET_DIR="$clone/target/glibc-$floor" cross/build.sh "$arch" --glibc "$floor")
second="$clone/target/glibc-$floor/$triple/release/qwen2-edge"

"$strip" -o "$WORK/first.stripped" "$first"
"$strip" -o "$WORK/second.stripped" "$second"
sums="$(sha256sum "$first" "$second" "$WORK/first.stripped" "$WORK/second.stripped")"
echo "$sums"
if cmp -s "$first" "$second" && cmp -s "$WORK/first.stripped" "$WORK/second.stripped"; then
    log "reproducible: both builds of $(git rev-parse --short HEAD) for $triple are identical ($(stat -c %s "$first") bytes)"
    exit 0
fi
log "NOT reproducible: the two builds differ"
cmp "$first" "$second" | head -3 || true
diff <(strings -n 8 "$first" | sort -u) <(strings -n 8 "$second" | sort -u) | head -40 || true
exit 1
