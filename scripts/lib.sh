# Shared set-up for scripts/demo.sh and scripts/test.sh (sourced, not run).
# Everything downloaded or generated goes to the cache, outside the clone.

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
CACHE="${QWEN2_EDGE_CACHE:-$HOME/.cache/qwen2-edge}"
export QWEN2_EDGE_CACHE="$CACHE"
VENV="$CACHE/venv"
PY="$VENV/bin/python"

log() { printf '== %s\n' "$*" >&2; }

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
