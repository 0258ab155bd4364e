#!/usr/bin/env bash
# Builds the Debian package with cargo-deb and checks what is in it.
#
#   scripts/package.sh [--target TRIPLE] [--glibc FLOOR] [--install-check]
#
# * cargo-deb is installed from crates.io into $CACHE/tools on first use (pinned version).
# * The .deb's file list, conffiles, control fields and maintainer scripts are checked.
# * --install-check (CI; needs root and dpkg; changes the machine): installs the package,
#   checks the system user, the installed units (systemd-analyze verify) and the installed
#   binary against the installed example config, then purges it again.
# --target TRIPLE packages a cross build (cross/build.sh sets the linker; run it first), also
# x86_64-unknown-linux-gnu after `cross/build.sh x86_64 --glibc 2.17` (the release .deb), and
# thumbv7neon-unknown-linux-gnueabihf after `cross/build.sh armv7 --glibc 2.17` (armhf).
# --glibc FLOOR: the binary was built for that glibc floor; Depends says libc6 (>= FLOOR)
# (Cargo.toml's deb variant glibc-<FLOOR with dashes>).
# Prints the path of the .deb on the last line.
set -euo pipefail
source "$(dirname "$0")/lib.sh"
cd "$REPO"

TARGET=""
GLIBC=""
INSTALL_CHECK=0
while [[ $# -gt 0 ]]; do
    case "$1" in
        --target) TARGET="$2"; shift 2 ;;
        --glibc) GLIBC="$2"; shift 2 ;;
        --install-check) INSTALL_CHECK=1; shift ;;
        *) echo "usage: scripts/package.sh [--target TRIPLE] [--glibc FLOOR] [--install-check]" >&2; exit 2 ;;
    esac
done

CARGO_DEB_VERSION=3.8.0
TOOLS="$CACHE/tools"
if ! "$TOOLS/bin/cargo-deb" --version 2>/dev/null | grep -q "$CARGO_DEB_VERSION"; then
    log "installing cargo-deb $CARGO_DEB_VERSION into $TOOLS (once; a few minutes)"
    cargo install --quiet --locked --root "$TOOLS" --version "$CARGO_DEB_VERSION" cargo-deb
fi
export PATH="$TOOLS/bin:$PATH"

# A host package: the binary `cargo build --release` (and `cargo test --release`) makes, built
# here and only packaged by cargo-deb. cargo-deb's own build would run with SOURCE_DATE_EPOCH
# set, which rebuilds every C dependency and what depends on it (8 minutes on 2 cores), and
# the next `cargo test` would rebuild them back.
if [[ -z "$TARGET" ]]; then
    cargo build --release --quiet --bin qwen2-edge
fi

# Reproducible packages: every timestamp in the .deb is the commit's time (cargo-deb and dpkg-deb
# both take SOURCE_DATE_EPOCH), not the build's.
export_source_date_epoch

# The release profile keeps line tables for profiling (a 280 MB binary); the package ships the
# stripped binary.
args=(--strip --no-separate-debug-symbols --no-build)
envs=()
if [[ -n "$TARGET" ]]; then
    # The binary was built by cross/build.sh; cargo-deb only packages it, stripping with the
    # cross binutils (it reads STRIP_<triple> / OBJCOPY_<triple>).
    args+=(--target "$TARGET")
    gnu="$(gnu_triple "$TARGET")"
    envs+=("STRIP_$TARGET=$gnu-strip" "OBJCOPY_$TARGET=$gnu-objcopy")
fi
if [[ -n "$GLIBC" ]]; then
    args+=(--variant "glibc-${GLIBC//./-}")
    # Where cross/build.sh --glibc builds.
    export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-target/glibc-$GLIBC}"
fi
log "cargo deb ${args[*]}"
deb="$(env "${envs[@]}" cargo deb "${args[@]}" 2>"$CACHE/cargo-deb.log" | tail -1)" || {
    cat "$CACHE/cargo-deb.log" >&2
    exit 1
}
[[ -f "$deb" ]] || { echo "cargo deb printed no package path" >&2; cat "$CACHE/cargo-deb.log" >&2; exit 1; }
# cargo-deb calls every Thumb triple's Debian architecture `armel`, but thumbv7neon-…-gnueabihf
# (what cross/build.sh armv7 builds) has the hard-float ABI: Debian's armhf. Repacked with the
# right field and name; nothing else changes.
if [[ "$TARGET" == thumbv7*-gnueabihf && "$(dpkg-deb --field "$deb" Architecture)" == armel ]]; then
    tree="$(mktemp -d)"
    dpkg-deb -R "$deb" "$tree/pkg"
    sed -i 's/^Architecture: armel$/Architecture: armhf/' "$tree/pkg/DEBIAN/control"
    armhf="${deb%_armel.deb}_armhf.deb"
    dpkg-deb --root-owner-group -b "$tree/pkg" "$armhf" >/dev/null
    rm -rf "$tree" "$deb"
    deb="$armhf"
fi

fail() { echo "package check: $*" >&2; exit 1; }
contents="$(dpkg-deb --contents "$deb")"
for path in ./usr/bin/qwen2-edge ./etc/qwen2-edge/qwen2-edge.toml \
        ./usr/lib/systemd/system/qwen2-edge.service ./usr/lib/systemd/system/qwen2-edge.socket \
        ./usr/share/doc/qwen2-edge/README.md ./usr/share/doc/qwen2-edge/copyright \
        ./usr/share/doc/qwen2-edge/examples/gpu-npu.conf; do
    grep -q " $path\$" <<<"$contents" || fail "$path missing from $deb"
done
ctrl="$(mktemp -d)"
trap 'rm -rf "$ctrl"' EXIT
dpkg-deb --control "$deb" "$ctrl"
grep -qx /etc/qwen2-edge/qwen2-edge.toml "$ctrl/conffiles" || fail "example config is not a conffile"
grep -q '^Depends:.*adduser' "$ctrl/control" || fail "Depends lacks adduser"
grep -q 'adduser --system' "$ctrl/postinst" || fail "postinst creates no system user"
grep -q 'deb-systemd-helper' "$ctrl/postinst" || fail "postinst does not register the units"
# Units are registered but not enabled on install (no model bundle yet): only re-enabled on
# upgrade when the admin had enabled them.
grep -q 'was-enabled' "$ctrl/postinst" || fail "postinst enables the units on install"
# Depends must name at least the glibc the binary needs (its newest GLIBC_ symbol version):
# cross/build.sh --glibc builds against an old floor, and the package says so.
dpkg-deb --fsys-tarfile "$deb" | tar -xO ./usr/bin/qwen2-edge > "$ctrl/qwen2-edge"
needs="$(glibc_needed "$ctrl/qwen2-edge" "${gnu:-}")"
declared="$(dpkg-deb --field "$deb" Depends | sed -n 's/.*libc6 (>= \([0-9.]*\)).*/\1/p')"
[[ -n "$declared" ]] || fail "Depends names no libc6 version: $(dpkg-deb --field "$deb" Depends)"
version_at_most "$needs" "$declared" \
    || fail "the binary needs glibc $needs but Depends says libc6 (>= $declared)"
if [[ -n "$GLIBC" && "$declared" != "$GLIBC" ]]; then
    fail "built for glibc $GLIBC but Depends says libc6 (>= $declared)"
fi
log "glibc: the binary needs $needs, Depends: libc6 (>= $declared)"
size="$(grep ' ./usr/bin/qwen2-edge$' <<<"$contents" | awk '{print $3}')"
log "$(basename "$deb"): $(du -k "$deb" | cut -f1) KiB (binary $((size / 1024)) KiB stripped); \
$(dpkg-deb --field "$deb" Architecture); Depends: $(dpkg-deb --field "$deb" Depends)"

if [[ "$INSTALL_CHECK" == 1 ]]; then
    [[ "$(id -u)" == 0 ]] || fail "--install-check needs root"
    if dpkg-query -W qwen2-edge >/dev/null 2>&1; then
        fail "qwen2-edge is already installed on this machine; not touching it"
    fi
    log "dpkg -i $(basename "$deb")"
    dpkg -i "$deb" >/dev/null
    # model.bundle of the example config is <store>/<name>/current, what `bundle install` makes.
    demo_model=/var/lib/qwen2-edge/models/qwen2.5-0.5b-instruct
    [[ ! -e "$demo_model" ]] || fail "$demo_model exists already; not touching it"
    purge() {
        rm -rf "$demo_model"
        if dpkg-query -W qwen2-edge >/dev/null 2>&1; then dpkg --purge qwen2-edge >/dev/null; fi
    }
    trap 'purge; rm -rf "$ctrl"' EXIT
    getent passwd qwen2-edge | grep -q ':/var/lib/qwen2-edge:/usr/sbin/nologin$' \
        || fail "system user qwen2-edge missing or wrong: $(getent passwd qwen2-edge)"
    /usr/bin/qwen2-edge --version
    out="$(systemd-analyze verify --man=no /usr/lib/systemd/system/qwen2-edge.service \
        /usr/lib/systemd/system/qwen2-edge.socket 2>&1)" || fail "systemd-analyze verify: $out"
    [[ -z "$out" ]] || fail "systemd-analyze verify: $out"
    # The shipped config names a bundle the admin installs later: --check must say exactly that.
    if out="$(/usr/bin/qwen2-edge serve --config /etc/qwen2-edge/qwen2-edge.toml --check 2>&1)"; then
        fail "serve --check passed without a model bundle"
    fi
    grep -q "model.bundle" <<<"$out" || fail "serve --check without a bundle said: $out"
    # Installed into the store (verified, smoke-tested, made current; the model's name comes from
    # the config's model.bundle), the unit's ExecStartPre passes as the service user.
    /usr/bin/qwen2-edge bundle install tests/fixtures/tiny-tied/bundle \
        --config /etc/qwen2-edge/qwen2-edge.toml >/dev/null || fail "bundle install into the store"
    [[ -L "$demo_model/current" ]] || fail "bundle install made no current link"
    runuser -u qwen2-edge -- /usr/bin/qwen2-edge serve --config /etc/qwen2-edge/qwen2-edge.toml --check \
        || fail "serve --check as qwen2-edge with a bundle in place"
    purge
    getent passwd qwen2-edge >/dev/null || fail "purge removed the system user (it should stay)"
    [[ ! -e /usr/bin/qwen2-edge && ! -e /etc/qwen2-edge ]] || fail "purge left files behind"
    log "installed, checked and purged"
fi
echo "$deb"
