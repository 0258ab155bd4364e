"""Damaged and hostile checkpoints (property tests with hypothesis): whatever the bytes of a GGUF
or safetensors file, reading it and every tensor it declares ends in the checkpoint or in one
ExportError line, never another exception, and never allocates what a lying header asks for
(numpy's allocations are traced: the peak stays far below what the sizes claim).

Examples per property: QWEN2_EDGE_HYPOTHESIS_EXAMPLES (default 150; scripts/fuzz.sh runs more).
"""

from __future__ import annotations

import json
import os
import shutil
import struct
import tempfile
import tracemalloc
from pathlib import Path

import pytest
from conftest import FIXTURES
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from qwen2_export.errors import ExportError
from qwen2_export.source_gguf import read_gguf
from qwen2_export.source_hf import read_checkpoint

EXAMPLES = int(os.environ.get("QWEN2_EDGE_HYPOTHESIS_EXAMPLES", "150"))
SETTINGS = settings(max_examples=EXAMPLES, deadline=None, derandomize=not os.environ.get("QWEN2_EDGE_HYPOTHESIS_RANDOM"),
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
# The fixture models are a few hundred KB; a reader that believes a lying size allocates
# gigabytes. Anything in between would be a bug too, but this bound cannot be flaky.
MAX_TRACED_BYTES = 64 << 20

# Integers a lying header might carry: sizes, counts and offsets at the edges.
LIES = st.sampled_from([0, 1, 2**31 - 1, 2**31, 2**32 - 1, 2**32, 2**40, 2**63 - 1, 2**63, 2**64 - 1])


@st.composite
def damaged(draw, data: bytes) -> bytes:
    """`data` truncated, with bytes flipped, and/or with 4- or 8-byte integers overwritten."""
    out = bytearray(data)
    for _ in range(draw(st.integers(1, 4))):
        kind = draw(st.sampled_from(["truncate", "flip", "u32", "u64"]))
        if not out:
            break
        at = draw(st.integers(0, len(out) - 1))
        if kind == "truncate":
            del out[at:]
        elif kind == "flip":
            out[at] ^= 1 << draw(st.integers(0, 7))
        else:
            width = 4 if kind == "u32" else 8
            value = draw(LIES) % (1 << (8 * width))
            out[at:at + width] = value.to_bytes(width, "little")
    return bytes(out)


def read_everything(read, path: Path) -> None:
    """Reads the checkpoint and loads every tensor; only ExportError may come out, in one line,
    and the traced peak stays small."""
    tracemalloc.start()
    try:
        ckpt = read(path)
        for load in ckpt.tensors.values():
            load()
    except ExportError as e:
        assert "\n" not in str(e), repr(str(e))
    finally:
        _, peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
    assert peak < MAX_TRACED_BYTES, f"{peak} bytes allocated"


@pytest.fixture(scope="module")
def gguf_bytes(tmp_path_factory) -> bytes:
    from gguf import GGMLQuantizationType
    from gguf_maker import write_gguf

    path = tmp_path_factory.mktemp("gguf") / "tiny.gguf"
    # A quantized and a float tensor type, so both readers' paths are there to damage.
    write_gguf("tiny-tied", path, types={"model.embed_tokens.weight": GGMLQuantizationType.Q8_0})
    read_everything(read_gguf, path)  # the undamaged file reads
    return path.read_bytes()


def test_damaged_gguf_is_one_error_line(gguf_bytes):
    scratch = Path(tempfile.mkdtemp(prefix="qwen2-export-gguf-"))
    try:
        @SETTINGS
        @given(st.data())
        def check(data):
            path = scratch / "model.gguf"
            path.write_bytes(data.draw(damaged(gguf_bytes)))
            read_everything(read_gguf, path)

        check()
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


@pytest.fixture(scope="module")
def checkpoint_dir(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("hf") / "checkpoint"
    shutil.copytree(FIXTURES / "tiny-tied" / "checkpoint", path)
    read_everything(read_checkpoint, path)
    return path


def safetensors_parts(path: Path) -> tuple[dict, bytes]:
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    return json.loads(raw[8:8 + n]), raw[8 + n:]


# Values a hostile header puts where a dtype, a shape or offsets belong.
HOSTILE = st.recursive(
    st.one_of(st.none(), st.booleans(), LIES, st.integers(-2**64, 2**64), st.floats(allow_nan=True),
              st.sampled_from(["F32", "F16", "BF16", "F64", "I8", "", "x" * 300])),
    lambda inner: st.one_of(st.lists(inner, max_size=4), st.dictionaries(st.text(max_size=8), inner, max_size=3)),
    max_leaves=8,
)


def test_damaged_safetensors_is_one_error_line(checkpoint_dir):
    weights = checkpoint_dir / "model.safetensors"
    original = weights.read_bytes()
    header, data = safetensors_parts(weights)
    names = [k for k in header if k != "__metadata__"]

    @SETTINGS
    @given(st.data())
    def check(draw):
        if draw.draw(st.booleans()):
            # Bytes damaged anywhere (the header's length, its JSON, the data).
            weights.write_bytes(draw.draw(damaged(original)))
        else:
            # A well-formed file whose header lies: one field of a tensor replaced.
            lying = json.loads(json.dumps(header))
            name = draw.draw(st.sampled_from(names))
            field = draw.draw(st.sampled_from(["dtype", "shape", "data_offsets", None]))
            value = draw.draw(HOSTILE)
            if field is None:
                lying[name] = value
            else:
                lying[name][field] = value
            text = json.dumps(lying).encode()
            weights.write_bytes(struct.pack("<Q", len(text)) + text + data)
        read_everything(read_checkpoint, checkpoint_dir)

    try:
        check()
    finally:
        weights.write_bytes(original)


def test_a_shard_index_cannot_name_files_outside_the_checkpoint(checkpoint_dir, tmp_path):
    ckpt = tmp_path / "ckpt"
    shutil.copytree(checkpoint_dir, ckpt)
    (ckpt / "model.safetensors").rename(tmp_path / "outside.safetensors")
    for name in ["../outside.safetensors", "/etc/passwd", "", 7]:
        index = {"weight_map": {"model.embed_tokens.weight": name}}
        (ckpt / "model.safetensors.index.json").write_text(json.dumps(index))
        with pytest.raises(ExportError, match="not a file name in the checkpoint directory"):
            read_checkpoint(ckpt)
