# Shared set-up for scripts/demo.sh and scripts/test.sh (sourced, not run).
# Everything downloaded or generated goes to the cache, outside the clone.

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
CACHE="${QWEN2_EDGE_CACHE:-$HOME/.cache/qwen2-edge}"
export QWEN2_EDGE_CACHE="$CACHE"
VENV="$CACHE/venv"
PY="$VENV/bin/python"

log() { printf '== %s\n' "$*" >&2; }

# A scratch directory for one run of a script, removed at exit together with the background
# processes the script started there (it appends their PIDs to WORK_PIDS).
make_work_dir() {
    WORK="$(mktemp -d)"
    WORK_PIDS=()
    trap stop_work EXIT
}
stop_work() {
    local i
    # Last started first: a daemon stops before the broker it talks to.
    for ((i = ${#WORK_PIDS[@]} - 1; i >= 0; i--)); do
        kill "${WORK_PIDS[i]}" 2>/dev/null || true
        wait "${WORK_PIDS[i]}" 2>/dev/null || true
    done
    wait 2>/dev/null || true
    rm -rf "$WORK"
}

# A loopback TCP port nobody listens on now.
free_port() {
    python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

# Stops one background process of WORK_PIDS now (stop_work stops the rest at exit).
stop_pid() {
    kill "$1" 2>/dev/null || true
    wait "$1" 2>/dev/null || true
}

# A private mosquitto on a free loopback port, its files in $WORK (make_work_dir first): sets
# MQTT_PORT, or says so and returns 1 when mosquitto is not installed. set_tcp_nodelay: see
# [mqtt] url in systemd/qwen2-edge.toml; as root, mosquitto would otherwise drop to its own user.
start_mosquitto() {
    local bin
    bin="$(command -v mosquitto || echo /usr/sbin/mosquitto)"
    if [[ ! -x "$bin" ]]; then
        log "mosquitto is not installed: MQTT skipped (apt-get install mosquitto)"
        return 1
    fi
    MQTT_PORT="$(free_port)"
    printf 'listener %s 127.0.0.1\nallow_anonymous true\npersistence false\nset_tcp_nodelay true\n%s\n' \
        "$MQTT_PORT" "$([ "$(id -u)" = 0 ] && echo 'user root')" > "$WORK/mosquitto.conf"
    "$bin" -c "$WORK/mosquitto.conf" 2> "$WORK/mosquitto.log" &
    WORK_PIDS+=($!)
}

# Waits until the command after PID LOG WHAT succeeds, while PID lives, at most 300 s; else
# shows LOG's tail.
wait_ready() {
    local pid="$1" log="$2" what="$3"
    shift 3
    for _ in $(seq 1 3000); do
        "$@" && return 0
        kill -0 "$pid" 2>/dev/null || break
        sleep 0.1
    done
    log "$what did not become ready:"
    tail -20 "$log" >&2
    return 1
}

# The daemon logged "ready" with its socket in place (model loaded).
daemon_ready() {
    [[ -S "$1" ]] && grep -q "ready" "$2"
}

# Waits for `qwen2-edge serve` PID with socket SOCK and log LOG.
wait_daemon() {
    wait_ready "$1" "$3" "qwen2-edge serve" daemon_ready "$2" "$3"
}

# The Rust target triple of a release build for ARCH (x86_64 | aarch64 | armv7); fails for another.
release_triple() {
    case "$1" in
        x86_64) echo x86_64-unknown-linux-gnu ;;
        aarch64) echo aarch64-unknown-linux-gnu ;;
        # Armv7 with NEON (cross/README.md says why this target).
        armv7) echo thumbv7neon-unknown-linux-gnueabihf ;;
        *) return 1 ;;
    esac
}

# The GNU triple of a Rust target triple: the prefix of Debian's cross binutils and gcc, and
# the sysroot under /usr (thumbv7neon-unknown-linux-gnueabihf -> arm-linux-gnueabihf).
gnu_triple() {
    echo "$1" | sed -e 's/-unknown-/-/' -e 's/^\(armv7\|thumbv7neon\)-/arm-/'
}

# Reproducible outputs: every timestamp is the commit's time unless SOURCE_DATE_EPOCH is set.
export_source_date_epoch() {
    export SOURCE_DATE_EPOCH="${SOURCE_DATE_EPOCH:-$(git -C "$REPO" log -1 --format=%ct 2>/dev/null || echo 0)}"
}

# The newest glibc symbol version (GLIBC_x.y) the ELF file BIN needs; GNU (a triple such as
# aarch64-linux-gnu) picks that architecture's objdump when it is installed.
glibc_needed() {
    local objdump=objdump
    if [[ -n "${2:-}" ]] && command -v "$2-objdump" >/dev/null; then objdump="$2-objdump"; fi
    "$objdump" -T "$1" | grep -o 'GLIBC_[0-9][0-9.]*' | sed 's/GLIBC_//' | sort -uV | tail -1
}

# Whether version A is at most version B (sort -V order).
version_at_most() {
    [[ "$(printf '%s\n%s\n' "$1" "$2" | sort -V | tail -1)" == "$2" ]]
}

# The exporter's Python environment: onnx, onnxruntime, gguf, numpy, tokenizers, pytest.
ensure_venv() {
    local stamp="$VENV/.qwen2-export-installed"
    local want
    want="$(sha256sum "$REPO/onnx-export/pyproject.toml" | cut -c1-16) $REPO"
    if [[ -x "$PY" && -f "$stamp" && "$(cat "$stamp")" == "$want" ]]; then
        return
    fi
    log "python venv in $VENV"
    python3 -m venv "$VENV"
    "$PY" -m pip install --quiet --upgrade pip
    "$PY" -m pip install --quiet -e "$REPO/onnx-export[test]"
    echo "$want" > "$stamp"
}

# Fetch the demo GGUF and export it; the bundle is cached under a key of the exporter's source and
# the GGUF, so it is rebuilt exactly when either changes. Prints the bundle path.
ensure_demo_bundle() {
    local gguf key bundle
    gguf="$("$PY" -m qwen2_export fetch-demo)"
    key="$({ cat "$REPO"/onnx-export/qwen2_export/*.py; echo "$gguf"; } | sha256sum | cut -c1-12)"
    bundle="$CACHE/demo/bundle-$key"
    if [[ ! -f "$bundle/bundle.json" ]]; then
        log "exporting the demo model to $bundle (all variants, about 1-2 minutes)"
        mkdir -p "$CACHE/demo"
        find "$CACHE/demo" -maxdepth 1 -name 'bundle-*' ! -name "bundle-$key" -exec rm -rf {} +
        "$PY" -m qwen2_export export --from "$gguf" --out "$bundle" --force >&2
    fi
    echo "$bundle"
}

# Unpacks ONNX Runtime's shared libraries (libonnxruntime.so.<version> and, for GPU wheels, the
# provider libraries it loads beside itself) from an onnxruntime / onnxruntime-gpu wheel into
# DEST, with the stdlib's zipfile (no pip, no network). Prints the libonnxruntime path.
extract_ort_lib() {
    local wheel="$1" dest="$2"
    mkdir -p "$dest"
    python3 - "$wheel" "$dest" <<'PY'
import pathlib, sys, zipfile
wheel, dest = sys.argv[1], pathlib.Path(sys.argv[2])
main = None
with zipfile.ZipFile(wheel) as z:
    for name in z.namelist():
        path = pathlib.PurePosixPath(name)
        if path.parent.as_posix() == "onnxruntime/capi" and ".so" in path.name:
            (dest / path.name).write_bytes(z.read(name))
            if path.name.startswith("libonnxruntime.so"):
                main = dest / path.name
if main is None:
    sys.exit(f"{wheel}: no onnxruntime/capi/libonnxruntime.so* inside (not an onnxruntime wheel?)")
print(main)
PY
}

# The ONNX Runtime library of the venv's onnxruntime wheel (installed by ensure_venv), for the
# ort backend's tests: prints its path (scripts/test.sh exports it as ORT_DYLIB_PATH).
ensure_ort_lib() {
    ensure_venv
    "$PY" - <<'PY'
import pathlib, sys, onnxruntime
capi = pathlib.Path(onnxruntime.__file__).parent / "capi"
libs = sorted(capi.glob("libonnxruntime.so*"), key=lambda p: len(p.name))
if not libs:
    sys.exit(f"no libonnxruntime.so* in {capi}")
print(libs[0])
PY
}

# llama.cpp's own tools (llama-bench, llama-quantize) for benchmarks, built with cmake from the
# llama.cpp tree vendored in the llama-cpp-python sdist (a Python-registry package; never
# vendored here) into $CACHE/llamacpp/<version>-<target>-<cpu key>. x86_64 builds for this CPU
# (GGML_NATIVE: the peer gets every instruction this machine has, keyed by its flags so a cache
# moved to another CPU rebuilds); x86_64-avx2 builds for AVX2 + FMA only (the peer of our
# avx2-fma tier where the CPU has more); aarch64 cross-builds with Debian's g++-aarch64-linux-gnu
# for Armv8.2 + dotprod (the instruction-count comparison under qemu). Prints the bin directory.
# About 10 minutes on 2 cores per target.
LLAMACPP_VERSION="0.3.36"
# Sets CMAKE: the system's cmake, else the PyPI wheel's in the venv (a binary, no compiling).
ensure_cmake() {
    CMAKE="$(command -v cmake || true)"
    if [[ -z "$CMAKE" ]]; then
        ensure_venv
        [[ -x "$VENV/bin/cmake" ]] || "$PY" -m pip install --quiet cmake >&2
        CMAKE="$VENV/bin/cmake"
    fi
}

ensure_llamacpp() {
    local target="${1:-x86_64}" key src build flags
    flags=(-DCMAKE_BUILD_TYPE=Release -DBUILD_SHARED_LIBS=OFF -DLLAMA_CURL=OFF
        -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_SERVER=OFF
        -DGGML_OPENMP=OFF)
    case "$target" in
        x86_64)
            # AMX off: the AVX-512 VMs here do not grant AMX tile state and ggml's AMX path
            # crashes. GGML_AMX_* only count without GGML_NATIVE; with it, -march=native turns
            # the AMX code on wherever the CPU lists the flags, so the compiler is told too.
            local no_amx="-mno-amx-tile -mno-amx-int8 -mno-amx-bf16"
            flags+=(-DGGML_NATIVE=ON -DGGML_AMX_TILE=OFF -DGGML_AMX_INT8=OFF -DGGML_AMX_BF16=OFF
                "-DCMAKE_C_FLAGS=$no_amx" "-DCMAKE_CXX_FLAGS=$no_amx")
            # The build is this CPU's (native) and these flags'.
            key="$({ grep -m1 '^flags' /proc/cpuinfo; echo "${flags[*]}"; } | sha256sum | cut -c1-8)"
            ;;
        x86_64-avx2)
            # The same tree for AVX2 + FMA + F16C only, as on the AVX2 boxes the product is for:
            # the same-ISA peer of our avx2-fma tier on a machine that has more.
            flags+=(-DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON
                -DGGML_BMI2=ON -DGGML_AVX_VNNI=OFF -DGGML_AVX512=OFF -DGGML_AVX512_VNNI=OFF
                -DGGML_AVX512_VBMI=OFF -DGGML_AVX512_BF16=OFF -DGGML_AMX_TILE=OFF
                -DGGML_AMX_INT8=OFF -DGGML_AMX_BF16=OFF)
            # Keyed by these flags: a change rebuilds.
            key="avx2-$(echo "${flags[*]}" | sha256sum | cut -c1-8)"
            ;;
        aarch64)
            flags+=(-DGGML_NATIVE=OFF -DCMAKE_SYSTEM_NAME=Linux -DCMAKE_SYSTEM_PROCESSOR=aarch64
                -DCMAKE_C_COMPILER=aarch64-linux-gnu-gcc -DCMAKE_CXX_COMPILER=aarch64-linux-gnu-g++
                -DGGML_CPU_ARM_ARCH=armv8.2-a+dotprod)
            key="armv8.2-dotprod"
            ;;
        *) log "ensure_llamacpp: unknown target $target"; return 2 ;;
    esac
    build="$CACHE/llamacpp/$LLAMACPP_VERSION-$target-$key"
    if [[ -x "$build/bin/llama-bench" && -x "$build/bin/llama-quantize" ]]; then
        echo "$build/bin"
        return
    fi
    src="$CACHE/src/llama_cpp_python-$LLAMACPP_VERSION"
    if [[ ! -d "$src/vendor/llama.cpp" ]]; then
        log "fetching the llama-cpp-python $LLAMACPP_VERSION sdist (for its vendored llama.cpp)"
        mkdir -p "$CACHE/src"
        # The sdist only: `--no-binary :all:` would also build its build requirements (cmake,
        # ninja) from source to prepare its metadata, which takes most of an hour on 2 cores.
        python3 -m pip download --quiet --no-deps --no-binary llama-cpp-python \
            "llama-cpp-python==$LLAMACPP_VERSION" -d "$CACHE/src" >&2
        tar -xzf "$CACHE/src/llama_cpp_python-$LLAMACPP_VERSION.tar.gz" -C "$CACHE/src"
    fi
    log "building llama.cpp ($LLAMACPP_VERSION, $target) into $build (about 10 minutes on 2 cores)"
    rm -rf "$build"
    ensure_cmake
    "$CMAKE" -S "$src/vendor/llama.cpp" -B "$build" "${flags[@]}" >&2
    "$CMAKE" --build "$build" --parallel "$(nproc)" --target llama-bench llama-quantize >&2
    echo "$build/bin"
}

# llama.cpp's llama-server (its OpenAI-compatible HTTP server, the peer of scripts/service-load.sh),
# added to ensure_llamacpp's build directory: the same tree and cached flags plus
# LLAMA_BUILD_SERVER, with the web UI neither built (npm) nor downloaded (prebuilt assets), so
# the server embeds an empty UI and the build stays offline. Only what the server adds compiles
# on top of the existing libraries (about 8 minutes on 2 cores, most of it mtmd, the multimodal
# library it links); llama-bench and llama-quantize stay as they were. Prints the bin directory.
ensure_llama_server() {
    local bin build
    bin="$(ensure_llamacpp "${1:-x86_64}")" || return
    build="$(dirname "$bin")"
    if [[ ! -x "$bin/llama-server" ]]; then
        log "building llama.cpp's llama-server into $build (about 8 minutes on 2 cores)"
        # `cmake BUILD_DIR` reconfigures the existing tree with the source and flags it cached.
        ensure_cmake
        "$CMAKE" "$build" -DLLAMA_BUILD_SERVER=ON -DLLAMA_BUILD_UI=OFF -DLLAMA_USE_PREBUILT_UI=OFF >&2
        "$CMAKE" --build "$build" --parallel "$(nproc)" --target llama-server >&2
    fi
    if [[ ! -x "$bin/llama-server" || ! -x "$bin/llama-bench" || ! -x "$bin/llama-quantize" ]]; then
        log "ensure_llama_server: $bin lacks llama-server, llama-bench or llama-quantize"
        return 1
    fi
    echo "$bin"
}

# GGUF requantized by llama.cpp's llama-quantize (LLAMA_BIN: ensure_llamacpp's bin directory)
# beside the source: requantized_gguf SRC.gguf q8_0 prints <SRC without -q4_k_m>-q8_0.gguf, made
# the first time (--allow-requantize: the demo GGUF is itself quantized, Q4_K_M).
requantized_gguf() {
    local src="$1" quant="$2" stem
    stem="${src%.gguf}"
    stem="${stem%-q4_k_m}"
    if [[ ! -f "$stem-$quant.gguf" ]]; then
        log "requantizing $(basename "$src") to ${quant^^} with llama.cpp's llama-quantize"
        "$LLAMA_BIN/llama-quantize" --allow-requantize "$src" "$stem-$quant.gguf" "${quant^^}" "$(nproc)" \
            >/dev/null 2>&1 || { rm -f "$stem-$quant.gguf"; return 1; }
    fi
    echo "$stem-$quant.gguf"
}
