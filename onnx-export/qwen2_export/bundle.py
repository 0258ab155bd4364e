"""Write a model bundle: all files into a temporary directory, then one rename into place."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import tempfile
import threading
from pathlib import Path

import numpy as np

from . import __version__
from .checkpoint import Checkpoint, validate
from .errors import ExportError
from .fetch import sha256_file
from .graph import (GPU_PRECISIONS, INT4K_8BIT_CHOICES, INT4K_WIDE_FORMATS, ORT_CPU_ACCURACY_LEVEL,
                    PORTABLE_ONLY_PRECISIONS, build_variant)
from .jobs import TensorJobs, resident_bytes

PRECISIONS = ("fp32", "fp16", "int8", "int4", "int4k")
PROFILES = ("portable", "ort", "gpu")
# What `export` writes unless asked: the float16-compute gpu profile is for GPU boxes only.
DEFAULT_PROFILES = ("portable", "ort")
FORMAT = "qwen2-edge-bundle"
FORMAT_VERSION = 1


def variant_name(precision: str, profile: str) -> str:
    return precision if profile == "portable" else f"{precision}-{profile}"


def read_source(path: Path) -> Checkpoint:
    path = Path(path)
    if path.is_dir():
        from .source_hf import read_checkpoint

        return read_checkpoint(path)
    if not path.exists():
        raise ExportError(f"{path}: no such file or directory")
    with open(path, "rb") as f:
        magic = f.read(4)
    if magic != b"GGUF":
        raise ExportError(f"{path}: neither a Hugging Face checkpoint directory nor a GGUF file")
    from .source_gguf import read_gguf

    return read_gguf(path)


def _memoized(ckpt: Checkpoint, scratch: Path, budget: int) -> Checkpoint:
    """`ckpt` whose tensors are dequantized / converted once, however many variants are written, without
    holding them all: the first use saves the tensor to `scratch` (one .npy file each) while the saved
    files stay within `budget` bytes, later uses map that file, so memory holds the tensors in use (pages
    of a dropped map go back to the page cache). A tensor past the budget is loaded again at each use:
    the same values, so the same bytes written."""
    tensors = {}
    saved = [0]
    budget_lock = threading.Lock()

    def claim(nbytes: int) -> bool:
        with budget_lock:
            if saved[0] + nbytes > budget:
                return False
            saved[0] += nbytes
            return True

    for i, (name, load) in enumerate(ckpt.tensors.items()):
        path = scratch / f"{i}.npy"

        # Tensor jobs on threads may want the same tensor at once (the embedding and a tied int4 head):
        # one loads it, the other maps the saved file.
        def cached(load=load, path=path, lock=threading.Lock()):
            with lock:
                if path.exists():
                    return np.load(path, mmap_mode="r")
                arr = load()
                if claim(arr.nbytes):
                    np.save(path, arr)
                return arr

        tensors[name] = cached
    return dataclasses.replace(ckpt, tensors=tensors)


# Saving the dequantized model pays off when several variants reuse it (the 0.5B demo, its 8 default
# variants: 85 s instead of 117 s) and not for two (the 1.5B as int8 + int4: 40 s either way), while its
# float32 copy takes disk until the export ends (7.1 GB for the 1.5B). So: from this many variants on,
# and in at most half the disk that is free when the export starts (the rest is for the bundle).
MEMO_MIN_VARIANTS = 3


def _memo_budget(variant_count: int, scratch: Path) -> int:
    if variant_count < MEMO_MIN_VARIANTS:
        return 0
    return shutil.disk_usage(scratch).free // 2


def _write_json(path: Path, obj) -> None:
    path.write_text(json.dumps(obj, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def export(source: Path, out: Path, precisions=PRECISIONS, profiles=DEFAULT_PROFILES, force: bool = False,
           progress=None, log=print, accuracy_level: int = ORT_CPU_ACCURACY_LEVEL,
           max_memory: int | None = None, sign=None, int4k_8bit: str = "auto", imatrix: dict | None = None,
           int4k_wide: str = "q6k") -> Path:
    """Read `source` (checkpoint directory or GGUF file) and write its bundle to `out`; `sign`:
    (private key, signer name) to sign it with before it appears under `out`; `imatrix`: calibration
    statistics for int4k (imatrix.py); `int4k_wide`: how int4k stores its wide matrices (int8 or q6k)."""
    _check_request(out, precisions, profiles, force, int4k_8bit, int4k_wide)
    return write_bundle(read_source(source), out, precisions, profiles, force, progress, log, accuracy_level,
                        max_memory, sign, int4k_8bit, imatrix, int4k_wide)


def _check_request(out: Path, precisions, profiles, force: bool, int4k_8bit: str = "auto",
                   int4k_wide: str = "q6k") -> None:
    out = Path(out)
    if int4k_8bit not in INT4K_8BIT_CHOICES:
        raise ExportError(f"unknown int4k 8-bit choice {int4k_8bit!r} (choose from {', '.join(INT4K_8BIT_CHOICES)})")
    if int4k_wide not in INT4K_WIDE_FORMATS:
        raise ExportError(f"unknown int4k wide format {int4k_wide!r} (choose from {', '.join(INT4K_WIDE_FORMATS)})")
    for p in precisions:
        if p not in PRECISIONS:
            raise ExportError(f"unknown variant {p!r} (choose from {', '.join(PRECISIONS)})")
    for p in profiles:
        if p not in PROFILES:
            raise ExportError(f"unknown profile {p!r} (choose from {', '.join(PROFILES)})")
    if out.exists() and not force:
        raise ExportError(f"{out}: already exists (pass --force to replace it)")


def write_bundle(ckpt: Checkpoint, out: Path, precisions=PRECISIONS, profiles=DEFAULT_PROFILES, force: bool = False,
                 progress=None, log=print, accuracy_level: int = ORT_CPU_ACCURACY_LEVEL,
                 max_memory: int | None = None, sign=None, int4k_8bit: str = "auto",
                 imatrix: dict | None = None, int4k_wide: str = "q6k") -> Path:
    """`accuracy_level`: MatMulNBits' in the ort int4 and int8 variants (4 on CPU: int8 dot products; 0 for a GPU).
    `int4k_8bit`: which matrices the int4k variant keeps wide (graph.INT4K_8BIT_CHOICES); `int4k_wide`: in
    which format (graph.INT4K_WIDE_FORMATS: int8 per row, or q6k).
    Profile gpu writes its precisions among `precisions` (fp16, int4), always at accuracy level 0.
    `max_memory` (bytes): quantize tensors in parallel while this process stays within it; None: one
    tensor at a time. The bytes written are the same either way."""
    out = Path(out)
    _check_request(out, precisions, profiles, force, int4k_8bit, int4k_wide)
    dims = validate(ckpt)
    dca = ckpt.config.get("dual_chunk_attention_config")
    if isinstance(dca, dict):
        chunk, local = dca.get("chunk_size"), dca.get("local_size")
        span = f"{chunk - local} positions" if isinstance(chunk, int) and isinstance(local, int) else "its size"
        log(f"note: config.json asks for Dual Chunk Attention; the ONNX graphs compute plain attention, the same "
            f"within one chunk ({span}): qwen2-edge's ort and tract backends stop there, its native backend "
            f"runs longer sequences with it")
    jobs = TensorJobs(_tensor_budget(max_memory), log=log) if max_memory is not None else TensorJobs()
    out.parent.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix=f".{out.name}.scratch-", dir=out.parent))
    try:
        memoized = _memoized(ckpt, scratch, _memo_budget(len(_wanted(precisions, profiles)), scratch))
        return _write(memoized, dims, out, precisions, profiles, progress, log, accuracy_level, jobs,
                      sign, int4k_8bit, imatrix, int4k_wide)
    finally:
        jobs.close()
        shutil.rmtree(scratch, ignore_errors=True)


# What the process needs beside its tensor jobs: building a variant's graph and writing its model.onnx,
# on top of what it held when the export began (interpreter, libraries, the source's metadata and tokenizer).
GRAPH_OVERHEAD = 256 << 20


def _tensor_budget(max_memory: int) -> int:
    """The part of `max_memory` that tensor jobs may hold at once."""
    base = resident_bytes() + GRAPH_OVERHEAD
    if max_memory <= base:
        raise ExportError(f"--max-memory {max_memory >> 20} MiB leaves nothing for tensors: the exporter "
                          f"itself takes about {base >> 20} MiB")
    return max_memory - base


def _wanted(precisions, profiles) -> list[tuple[str, str]]:
    """The (precision, profile) pairs an export writes: the gpu profile only in its precisions, the
    portable-only precisions only there."""
    return [(pr, pf) for pr in precisions for pf in profiles
            if (pf != "gpu" or pr in GPU_PRECISIONS) and (pf == "portable" or pr not in PORTABLE_ONLY_PRECISIONS)]


def _write(ckpt: Checkpoint, dims, out: Path, precisions, profiles, progress, log, accuracy_level, jobs,
           sign, int4k_8bit, imatrix=None, int4k_wide="q6k") -> Path:
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))
    # mkdtemp makes the directory 0700; the bundle must end up as readable as any directory
    # mkdir would make (a service user reads bundles exported by root or by an admin).
    umask = os.umask(0)
    os.umask(umask)
    tmp.chmod(0o777 & ~umask)
    try:
        _write_json(tmp / "config.json", ckpt.config)
        _write_json(tmp / "generation_config.json", ckpt.generation_config)
        _write_json(tmp / "tokenizer.json", ckpt.tokenizer_json)
        _write_json(tmp / "tokenizer_config.json", ckpt.tokenizer_config)
        variants = []
        wanted = _wanted(precisions, profiles)
        if not wanted:
            raise ExportError(f"profile gpu has only the precisions {', '.join(GPU_PRECISIONS)}")
        for precision, profile in wanted:
            name = variant_name(precision, profile)
            log(f"writing variant {name}")
            rel = Path("onnx") / name
            entry = build_variant(ckpt, dims, precision, profile, tmp / rel, progress, accuracy_level, jobs,
                                  int4k_8bit, imatrix, int4k_wide)
            variants.append({"name": name, "graph": f"{rel.as_posix()}/model.onnx",
                             "data": f"{rel.as_posix()}/model.onnx.data", **entry})
        files = {}
        for path in sorted(p for p in tmp.rglob("*") if p.is_file()):
            rel = path.relative_to(tmp).as_posix()
            files[rel] = {"size": path.stat().st_size, "sha256": sha256_file(path)}
        manifest = {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "exporter": f"qwen2_export {__version__}",
            "source": ckpt.source,
            "files": files,
            "variants": variants,
        }
        _write_json(tmp / "bundle.json", manifest)
        if sign is not None:
            from .signing import sign_bundle

            sign_bundle(tmp, *sign)
        if out.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
            os.replace(out, old / out.name)
            os.replace(tmp, out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def load_manifest(bundle: Path) -> dict:
    path = Path(bundle) / "bundle.json"
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ExportError(f"{path}: missing (not a model bundle)") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ExportError(f"{path}: corrupt ({e})") from None
    if manifest.get("format") != FORMAT or manifest.get("format_version") != FORMAT_VERSION:
        raise ExportError(f"{path}: not a {FORMAT} version {FORMAT_VERSION} manifest")
    return manifest


def check_files(bundle: Path, manifest: dict, hashes: bool = True) -> None:
    for rel, info in manifest["files"].items():
        path = Path(bundle) / rel
        if not path.is_file():
            raise ExportError(f"{path}: missing")
        if path.stat().st_size != info["size"]:
            raise ExportError(f"{path}: size {path.stat().st_size}, bundle.json says {info['size']}")
        if hashes and sha256_file(path) != info["sha256"]:
            raise ExportError(f"{path}: sha256 does not match bundle.json")
