"""Shared paths and helpers for the exporter's tests."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[2]
FIXTURES = REPO / "tests" / "fixtures"
MODELS = ["tiny-tied", "tiny-untied", "tiny-yarn", "tiny-moe"]
VARIANTS = ["fp32", "fp16", "int8", "int4", "int4k", "fp32-ort", "fp16-ort", "int8-ort", "int4-ort", "fp16-gpu", "int4-gpu"]


def load_reference(model: str) -> dict[str, np.ndarray]:
    from safetensors.numpy import load_file

    return load_file(str(FIXTURES / model / "reference.safetensors"))


def load_json(path: Path):
    return json.loads(Path(path).read_text(encoding="utf-8"))


@pytest.fixture(scope="session")
def demo_bundle() -> Path:
    """The demo model's bundle, exported by .ci/run into the cache. Required in CI."""
    path = os.environ.get("QWEN2_EDGE_DEMO_BUNDLE")
    if not path:
        if os.environ.get("CI"):
            pytest.fail("QWEN2_EDGE_DEMO_BUNDLE is not set: .ci/run must export the demo model")
        pytest.skip("QWEN2_EDGE_DEMO_BUNDLE not set (run .ci/run, or export the demo model)")
    return Path(path)
