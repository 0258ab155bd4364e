"""The exporter at model scale: the 1.5B demo model (Qwen2.5-Coder-1.5B-Instruct, Q4_K_M, 1.1 GB) exports
under a hard address-space limit, byte for byte what an export with memory to spare writes.

Runs in CI (CI=1) or with QWEN2_EDGE_TEST_1_5B=1: it downloads the 1.5B GGUF into the cache once and
takes about two minutes on two cores."""

from __future__ import annotations

import os
import resource
import shutil
import subprocess
import sys

import pytest

from qwen2_export.bundle import load_manifest

GIB = 1 << 30
# The int8+int4 export of this model peaked at 11.0 GB resident before it streamed (the figure);
# it now maps at most 2.8 GiB of address space (2.0 of it the GGUF map and the largest tensor, the
# 151936x1536 embedding in float32). The hard limit allows 25% over that and is a third of the old peak.
ADDRESS_SPACE_LIMIT = 3.5 * GIB
# --max-memory of the limited export, and what its resident peak must stay within.
BUDGET = 2 * GIB
VARIANTS = ("int8", "int4")

# The child prints its resident peak (VmHWM, KiB) as its last stderr line.
CHILD = ("import re, sys; from qwen2_export.cli import main; rc = main(sys.argv[1:]); "
         "status = open('/proc/self/status').read(); "
         "print(re.search(r'VmHWM:\\s+(\\d+)', status).group(1), file=sys.stderr); sys.exit(rc)")


@pytest.fixture(scope="module")
def gguf_1_5b() -> str:
    if not (os.environ.get("CI") or os.environ.get("QWEN2_EDGE_TEST_1_5B")):
        pytest.skip("the 1.5B export test runs in CI or with QWEN2_EDGE_TEST_1_5B=1 (downloads 1.1 GB once)")
    run = subprocess.run([sys.executable, "-m", "qwen2_export", "fetch-demo", "--model", "1.5b"],
                         capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    return run.stdout.strip()


def _export(gguf: str, out, *options, address_space: int | None = None) -> int:
    """Exports int8+int4 portable in a child process; returns its resident peak in bytes."""

    def limit():
        resource.setrlimit(resource.RLIMIT_AS, (address_space, address_space))

    run = subprocess.run([sys.executable, "-c", CHILD, "export", "--from", gguf, "--out", str(out),
                          "--variants", ",".join(VARIANTS), "--profiles", "portable", *options],
                         capture_output=True, text=True, preexec_fn=limit if address_space else None)
    # A full disk shows as numpy's "Not enough free space": say how much there was.
    free_disk = shutil.disk_usage(out.parent).free
    assert run.returncode == 0, f"{run.stderr[-4000:]}\n{free_disk / GIB:.1f} GiB free on {out.parent}"
    return int(run.stderr.strip().splitlines()[-1]) * 1024


def test_1_5b_export_under_a_hard_memory_limit_is_byte_identical(gguf_1_5b, tmp_path):
    try:
        # Memory to spare: tensors quantized in parallel, nothing limited.
        free = _export(gguf_1_5b, tmp_path / "free", "--max-memory", "64G")
        reference = load_manifest(tmp_path / "free")["files"]
        shutil.rmtree(tmp_path / "free")  # two 1.5B bundles at once would double the disk the test needs
        # The kernel refuses any allocation or map past the limit: the export must fit, not just try to.
        limited = _export(gguf_1_5b, tmp_path / "limited", "--max-memory", str(BUDGET),
                          address_space=int(ADDRESS_SPACE_LIMIT))
        files = load_manifest(tmp_path / "limited")["files"]
    finally:
        # 2.9 GB each: gone even when the test fails (a failed test's tmp_path is kept).
        for name in ("free", "limited"):
            shutil.rmtree(tmp_path / name, ignore_errors=True)
    print(f"1.5B int8+int4 export: resident peak {free / GIB:.2f} GiB with memory to spare, "
          f"{limited / GIB:.2f} GiB under --max-memory {BUDGET / GIB:.1f}G and a "
          f"{ADDRESS_SPACE_LIMIT / GIB:.1f} GiB address-space limit")
    assert limited <= BUDGET
    assert files.keys() == reference.keys()
    for rel, info in reference.items():
        assert files[rel] == info, rel
