"""Bad inputs give one clear error line and leave nothing behind."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import FIXTURES
from gguf import GGMLQuantizationType
from gguf_maker import write_gguf

from qwen2_export.bundle import export
from qwen2_export.errors import ExportError

PKG_ROOT = Path(__file__).resolve().parents[1]


def _copy_checkpoint(tmp_path: Path) -> Path:
    dst = tmp_path / "ckpt"
    shutil.copytree(FIXTURES / "tiny-tied" / "checkpoint", dst)
    return dst


def _assert_refused(source: Path, tmp_path: Path, message: str) -> None:
    out = tmp_path / "out" / "bundle"
    with pytest.raises(ExportError, match=message):
        export(source, out, ["fp32", "int4"], ["portable", "ort"], log=lambda m: None)
    assert not out.exists()
    leftovers = list((tmp_path / "out").glob("*")) if (tmp_path / "out").exists() else []
    assert leftovers == [], f"partial output left behind: {leftovers}"


def test_other_architecture_in_checkpoint(tmp_path):
    ckpt = _copy_checkpoint(tmp_path)
    cfg = json.loads((ckpt / "config.json").read_text())
    cfg["model_type"], cfg["architectures"] = "llama", ["LlamaForCausalLM"]
    (ckpt / "config.json").write_text(json.dumps(cfg))
    _assert_refused(ckpt, tmp_path, "unsupported architecture")


def _drop_weights(ckpt: Path) -> None:
    (ckpt / "model.safetensors").unlink()


def _truncate_weights(ckpt: Path) -> None:
    path = ckpt / "model.safetensors"
    path.write_bytes(path.read_bytes()[:-1000])


def _drop_tokenizer(ckpt: Path) -> None:
    (ckpt / "tokenizer.json").unlink()


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        (_drop_weights, "no model.safetensors"),
        (_truncate_weights, "truncated"),
        (_drop_tokenizer, "tokenizer.json: missing"),
    ],
)
def test_damaged_checkpoint(tmp_path, damage, message):
    ckpt = _copy_checkpoint(tmp_path)
    damage(ckpt)
    _assert_refused(ckpt, tmp_path, message)


def test_missing_source(tmp_path):
    _assert_refused(tmp_path / "nope.gguf", tmp_path, "no such file")


def test_other_architecture_in_gguf(tmp_path):
    gguf = write_gguf("tiny-tied", tmp_path / "llama.gguf", arch="llama")
    _assert_refused(gguf, tmp_path, "architecture 'llama' is not supported")


def test_truncated_gguf(tmp_path):
    gguf = write_gguf("tiny-tied", tmp_path / "m.gguf")
    data = gguf.read_bytes()
    gguf.write_bytes(data[: len(data) - 4096])
    _assert_refused(gguf, tmp_path, "truncated|not a readable GGUF")


def test_unsupported_tensor_type(tmp_path):
    weird = ("blk.0.attn_q.weight_i8", np.zeros((4, 32), dtype=np.int8))
    gguf = write_gguf("tiny-tied", tmp_path / "m.gguf", extra_tensor=weird)
    _assert_refused(gguf, tmp_path, "type I8 is not supported")


def test_gguf_with_unsupported_quantization_of_a_weight(tmp_path):
    gguf = write_gguf("tiny-tied", tmp_path / "m.gguf",
                      types={"model.layers.0.mlp.up_proj.weight": GGMLQuantizationType.Q8_0})
    # a supported type exports fine: the refusal above is about the type, not about quantization
    export(gguf, tmp_path / "ok", ["fp32"], ["portable"], log=lambda m: None)


def test_existing_output_needs_force(tmp_path):
    out = tmp_path / "bundle"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(ExportError, match="already exists"):
        export(FIXTURES / "tiny-tied" / "checkpoint", out, ["fp32"], ["portable"], log=lambda m: None)
    assert (out / "keep.txt").read_text() == "mine"


def test_unknown_variant(tmp_path):
    with pytest.raises(ExportError, match="unknown variant 'int3'"):
        export(FIXTURES / "tiny-tied" / "checkpoint", tmp_path / "b", ["int3"], ["portable"])


def test_command_line_error_is_one_line(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "qwen2_export", "export", "--from", str(tmp_path / "missing"), "--out",
         str(tmp_path / "b")], capture_output=True, text=True, cwd=PKG_ROOT)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr


def test_a_full_disk_leaves_nothing_behind(tmp_path):
    """Writes that fail midway (a file-size limit: the disk filling up, as an unprivileged test can
    have it) end the export with one error line, and no bundle, partial or scratch directory stays."""
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    limit = 256 << 10  # the tiny fixture's fp32 weights are larger than this

    def small_files():
        import resource
        import signal

        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a failed write, not a killed process
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    result = subprocess.run(
        [sys.executable, "-m", "qwen2_export", "export", "--from", str(FIXTURES / "tiny-tied" / "checkpoint"),
         "--out", str(out_dir / "bundle"), "--variants", "fp32", "--profiles", "portable"],
        capture_output=True, text=True, cwd=PKG_ROOT, preexec_fn=small_files)
    assert result.returncode == 1, result.stderr
    lines = result.stderr.strip().splitlines()
    assert lines and lines[-1].startswith("error: ") and "too large" in lines[-1].lower(), result.stderr
    assert "Traceback" not in result.stderr, result.stderr
    assert list(out_dir.iterdir()) == []
