"""fetch-demo's assembly and verification, on chunk wheels made here (no registry needed)."""

from __future__ import annotations

import hashlib
import zipfile

import pytest

from qwen2_export.errors import ExportError
from qwen2_export.fetch import ChunkedModel, fetch


def _model(payload: bytes, parts: int, sha: str | None = None) -> ChunkedModel:
    return ChunkedModel(name="toy", file_name="toy.gguf", package_prefix="toy-part", version="1.0",
                        parts=parts, sha256=sha or hashlib.sha256(payload).hexdigest(), size=len(payload))


def _wheels(tmp_path, payload: bytes, parts: int):
    wheel_dir = tmp_path / "cache" / "wheels" / "toy"
    wheel_dir.mkdir(parents=True)
    step = -(-len(payload) // parts)
    for i in range(parts):
        with zipfile.ZipFile(wheel_dir / f"toy_part{i + 1}-1.0-py3-none-any.whl", "w") as zf:
            zf.writestr(f"toy_part{i + 1}/data/part{i + 1:02d}.bin", payload[i * step:(i + 1) * step])


def test_assembles_chunks_in_order_and_verifies(tmp_path):
    payload = bytes(range(256)) * 1000
    _wheels(tmp_path, payload, 3)
    path = fetch(_model(payload, 3), tmp_path / "cache")
    assert path.read_bytes() == payload
    assert fetch(_model(payload, 3), tmp_path / "cache") == path  # cached: no download needed


def test_wrong_hash_is_refused_and_leaves_no_file(tmp_path):
    payload = b"x" * 5000
    _wheels(tmp_path, payload, 2)
    with pytest.raises(ExportError, match="expected"):
        fetch(_model(payload, 2, sha="0" * 64), tmp_path / "cache")
    assert list((tmp_path / "cache" / "models").iterdir()) == []
