"""The `verify` command on a fixture bundle, and on a tampered one."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

from conftest import FIXTURES, VARIANTS

PKG_ROOT = Path(__file__).resolve().parents[1]


def _verify(bundle: Path, *extra: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "qwen2_export", "verify", "--bundle", str(bundle), *extra],
                          capture_output=True, text=True, cwd=PKG_ROOT)


def test_verify_reports_every_variant():
    result = _verify(FIXTURES / "tiny-untied" / "bundle", "--prompt", "def f(x): return x")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    rows = {line.split()[0]: line.split() for line in lines[2:-1]}
    assert set(rows) == set(VARIANTS)
    assert float(rows["fp32-ort"][1]) <= 1e-4 and rows["fp16"][4] == "True"
    assert lines[-1] == "verify: ok"


def test_verify_refuses_a_tampered_bundle(tmp_path):
    bundle = tmp_path / "b"
    shutil.copytree(FIXTURES / "tiny-tied" / "bundle", bundle)
    data = bundle / "onnx" / "int8" / "model.onnx.data"
    raw = bytearray(data.read_bytes())
    raw[100] ^= 0xFF
    data.write_bytes(bytes(raw))
    result = _verify(bundle)
    assert result.returncode == 2
    assert "model.onnx.data: sha256 does not match bundle.json" in result.stderr
