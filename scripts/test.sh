#!/usr/bin/env bash
# Every test: formatting and lints, the Rust suite (fixtures and demo model), the exporter's pytest
# suite. Needs Rust, Python 3.10+ and the package registries; installs the rest into the cache.
set -euo pipefail
source "$(dirname "$0")/lib.sh"
cd "$REPO"
ensure_venv
QWEN2_EDGE_DEMO_BUNDLE="$(ensure_demo_bundle)"
export QWEN2_EDGE_DEMO_BUNDLE
# The ort backend loads ONNX Runtime at run time: its tests use the onnxruntime wheel's library.
ORT_DYLIB_PATH="$(ensure_ort_lib)"
export ORT_DYLIB_PATH
# The structured-output tests validate the service's JSON with Python's jsonschema (in the venv).
QWEN2_EDGE_PYTHON="$PY"
export QWEN2_EDGE_PYTHON
log "ONNX Runtime for the ort backend: $ORT_DYLIB_PATH"
log "cargo fmt --check (and the fuzz crate's)"
cargo fmt --check
cargo fmt --check --manifest-path fuzz/Cargo.toml
log "cargo clippy --all-targets -- -D warnings"
cargo clippy --release --all-targets --quiet -- -D warnings
log "cargo test --release"
cargo test --release
log "pytest onnx-export"
(cd onnx-export && "$PY" -m pytest -q)
