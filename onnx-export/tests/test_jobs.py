"""Parallel tensor jobs (`--max-memory`): the same bytes as one tensor at a time, the budget respected,
failures reported and nothing left behind."""

from __future__ import annotations

import json
import shutil
import threading
import time

import numpy as np
import pytest
from conftest import FIXTURES, MODELS

from qwen2_export.bundle import export
from qwen2_export.errors import ExportError
from qwen2_export.jobs import TensorJobs, parse_size

PROFILES = ["portable", "ort", "gpu"]


@pytest.mark.parametrize("model", MODELS)
def test_parallel_export_writes_the_bytes_of_a_serial_one(model, tmp_path):
    serial = export(FIXTURES / model / "checkpoint", tmp_path / "serial", profiles=PROFILES, log=lambda m: None)
    parallel = export(FIXTURES / model / "checkpoint", tmp_path / "parallel", profiles=PROFILES, log=lambda m: None,
                      max_memory=parse_size("64G"))
    a = json.loads((serial / "bundle.json").read_text())
    b = json.loads((parallel / "bundle.json").read_text())
    assert a["files"] == b["files"]
    assert a["variants"] == b["variants"]


def test_jobs_hold_at_most_the_budget_and_run_in_parallel():
    lock = threading.Lock()
    held, peak, running, most = 0, 0, 0, 0

    def job(size):
        def run():
            nonlocal held, peak, running, most
            with lock:
                held += size
                running += 1
                peak, most = max(peak, held), max(most, running)
            time.sleep(0.02)
            with lock:
                held -= size
                running -= 1
        return run

    jobs = TensorJobs(budget=100, workers=4, log=lambda m: None)
    for size in [30, 30, 30, 60, 10, 10, 250, 40, 40]:  # 250: more than the budget, runs alone
        jobs.submit(size, job(size), "t")
    jobs.close()
    assert held == 0
    assert most >= 2  # small jobs overlapped
    assert peak <= 250  # the oversized job ran with nothing else


def test_a_failing_job_fails_the_export_and_leaves_nothing(tmp_path):
    ckpt = tmp_path / "ckpt"
    shutil.copytree(FIXTURES / "tiny-tied" / "checkpoint", ckpt)
    config = json.loads((ckpt / "config.json").read_text())
    # The config now disagrees with the stored tensors' shapes: the first tensor job that loads one fails.
    config["intermediate_size"] += 8
    (ckpt / "config.json").write_text(json.dumps(config))
    for max_memory in (None, parse_size("64G")):
        out = tmp_path / "out" / "bundle"
        with pytest.raises(ExportError, match="shape .* the model's config implies"):
            export(ckpt, out, ["fp32", "int4"], ["portable", "ort"], log=lambda m: None, max_memory=max_memory)
        assert not out.exists()
        assert list((tmp_path / "out").glob("*")) == []


@pytest.mark.parametrize(("text", "size"), [("6G", 6 << 30), ("512M", 512 << 20), ("1.5GiB", 3 << 29),
                                             ("4000000000", 4000000000), ("64k", 64 << 10)])
def test_sizes(text, size):
    assert parse_size(text) == size


@pytest.mark.parametrize("text", ["", "lots", "6X", "-1G", "1e9"])
def test_bad_sizes(text):
    with pytest.raises(ExportError, match="not a size"):
        parse_size(text)


def test_a_budget_below_the_exporter_itself_is_refused(tmp_path):
    with pytest.raises(ExportError, match="leaves nothing for tensors"):
        export(FIXTURES / "tiny-tied" / "checkpoint", tmp_path / "b", ["fp32"], ["portable"], log=lambda m: None,
               max_memory=parse_size("1M"))
    assert not (tmp_path / "b").exists()


def test_shapes_come_from_the_config_not_the_file():
    """The data file's layout is planned from the config before any tensor loads (what lets jobs run in
    any order): a shape check guards the plan."""
    from qwen2_export.checkpoint import Dims, expected_shape

    dims = Dims(hidden=8, layers=1, heads=2, kv_heads=1, head_dim=4, intermediate=16, vocab=32, eps=1e-6)
    assert expected_shape("model.layers.0.self_attn.k_proj.weight", dims) == (4, 8)
    assert expected_shape("model.layers.0.mlp.down_proj.weight", dims) == (8, 16)
    assert np.prod(expected_shape("model.embed_tokens.weight", dims)) == 256
