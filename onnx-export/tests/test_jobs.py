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


def test_saved_tensors_stay_within_the_scratch_budget_and_the_rest_load_again(tmp_path):
    """The exporter's dequantized scratch: tensors saved while they fit its budget (one load, then maps),
    later ones loaded again at each use, every use the same values."""
    from qwen2_export.bundle import _memoized
    from qwen2_export.checkpoint import Checkpoint

    arrays = {"a": np.arange(64, dtype=np.float32), "b": np.ones(32, np.float32), "c": np.full(64, 2.5, np.float32)}
    loads = {name: 0 for name in arrays}

    def loader(name):
        def load():
            loads[name] += 1
            return arrays[name].copy()
        return load

    ckpt = Checkpoint({}, {}, {}, {}, {name: loader(name) for name in arrays})
    # Room for "a" (256 bytes) and "b" (128), not then for "c" (256).
    memo = _memoized(ckpt, tmp_path, budget=400)
    for _ in range(3):
        for name, arr in arrays.items():
            assert np.array_equal(memo.tensors[name](), arr)
    assert loads == {"a": 1, "b": 1, "c": 3}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["0.npy", "1.npy"]


def test_an_export_without_the_scratch_writes_the_same_bytes(tmp_path, monkeypatch):
    import qwen2_export.bundle as bundle

    model = MODELS[0]
    saved = export(FIXTURES / model / "checkpoint", tmp_path / "saved", profiles=PROFILES, log=lambda m: None)
    monkeypatch.setattr(bundle, "_memo_budget", lambda variant_count, scratch: 0)
    reloaded = export(FIXTURES / model / "checkpoint", tmp_path / "reloaded", profiles=PROFILES, log=lambda m: None)
    assert json.loads((saved / "bundle.json").read_text())["files"] == \
        json.loads((reloaded / "bundle.json").read_text())["files"]


def test_the_scratch_is_kept_for_three_variants_or_more_in_half_the_free_disk(tmp_path, monkeypatch):
    import qwen2_export.bundle as bundle

    monkeypatch.setattr(bundle.shutil, "disk_usage", lambda path: shutil._ntuple_diskusage(100, 10, 90))
    assert bundle._memo_budget(bundle.MEMO_MIN_VARIANTS - 1, tmp_path) == 0
    assert bundle._memo_budget(bundle.MEMO_MIN_VARIANTS, tmp_path) == 45
