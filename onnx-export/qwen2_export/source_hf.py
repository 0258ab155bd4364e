"""Read a Hugging Face Qwen2 or Qwen2-MoE checkpoint directory (what `huggingface-cli download` gives)."""

from __future__ import annotations

import hashlib
import json
import struct
from pathlib import Path

import numpy as np

from .checkpoint import Checkpoint
from .errors import ExportError

_DTYPES = {"F32": np.float32, "F16": np.float16, "BF16": np.uint16, "F64": np.float64}
# Elements converted to float32 at a time.
SLAB_ELEMENTS = 16 << 20


def _read_json(path: Path) -> dict:
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ExportError(f"{path}: missing") from None
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as e:
        raise ExportError(f"{path}: not valid JSON ({_first_line(e)})") from None
    if not isinstance(value, dict):
        raise ExportError(f"{path}: not a JSON object")
    return value


def _safetensors_index(path: Path) -> dict[str, tuple[Path, str, list[int], int, int]]:
    """Map tensor name -> (file, dtype, shape, start, end) from one safetensors file's header.

    Everything in the header is checked before it is used, so a damaged or hostile file is one
    ExportError line, never a traceback or an allocation its sizes ask for."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) != 8:
            raise ExportError(f"{path}: truncated safetensors file")
        (n,) = struct.unpack("<Q", head)
        if n > size - 8:
            raise ExportError(f"{path}: truncated safetensors file (header of {n} bytes)")
        try:
            header = json.loads(f.read(n))
        except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as e:
            raise ExportError(f"{path}: corrupt safetensors header ({_first_line(e)})") from None
    if not isinstance(header, dict):
        raise ExportError(f"{path}: corrupt safetensors header (not a JSON object)")
    base = 8 + n
    out = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        dtype, shape, start, end = _tensor_entry(path, name, info, size - base)
        out[name] = (path, dtype, shape, base + start, base + end)
    return out


def _tensor_entry(path: Path, name: str, info, room: int) -> tuple[str, list[int], int, int]:
    """(dtype, shape, start, end) of one header entry, checked against the data's `room` bytes."""
    def bad(what: str) -> ExportError:
        return ExportError(f"{path}: corrupt safetensors header (tensor {name[:80]!r}: {what})")

    if not isinstance(info, dict):
        raise bad("not an object")
    dtype, shape, offsets = info.get("dtype"), info.get("shape"), info.get("data_offsets")
    if not isinstance(dtype, str):
        raise bad("dtype is not a string")
    if not (isinstance(shape, list) and all(type(d) is int and 0 <= d < 2**40 for d in shape)):
        raise bad("shape is not a list of sizes")
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(type(o) is int for o in offsets)):
        raise bad("data_offsets is not [start, end]")
    start, end = offsets
    if not 0 <= start <= end:
        raise bad(f"data_offsets {offsets} are not in order")
    if end > room:
        raise ExportError(f"{path}: truncated (tensor {name[:80]!r} ends past the end of the file)")
    if dtype in _DTYPES:
        want = int(np.prod(shape, dtype=np.float64)) * np.dtype(_DTYPES[dtype]).itemsize
        if want != end - start:
            raise bad(f"shape {shape} of {dtype} needs {want} bytes, data_offsets give {end - start}")
    return dtype, shape, start, end


def _first_line(e: Exception) -> str:
    return str(e).splitlines()[0] if str(e) else type(e).__name__


def _loader(entry):
    path, dtype, shape, start, end = entry

    def load() -> np.ndarray:
        if dtype not in _DTYPES:
            raise ExportError(f"{path}: tensor dtype {dtype} is not supported (F32, F16, BF16 are)")
        raw = np.memmap(path, dtype=np.uint8, mode="r", offset=start, shape=(end - start,))
        src = raw.view(_DTYPES[dtype])
        out = np.empty(src.shape, dtype=np.float32)
        # A slab at a time: a whole-tensor conversion would hold two more copies of the largest
        # tensors (a 7B's LM head is 2.2 GB in float32).
        for i in range(0, len(src), SLAB_ELEMENTS):
            part = src[i:i + SLAB_ELEMENTS]
            if dtype == "BF16":  # bfloat16 is the top half of a float32
                out[i:i + len(part)] = (part.astype(np.uint32) << 16).view(np.float32)
            else:
                out[i:i + len(part)] = part
        return out.reshape(shape)

    return load


def _unstack_experts(entries: dict) -> dict:
    """transformers >= 5 holds a Qwen2-MoE layer's experts stacked (`mlp.experts.gate_up_proj`
    [E, 2 * I, H], `mlp.experts.down_proj` [E, H, I]), and so does a `state_dict` of it saved directly
    (`save_pretrained` writes the hub's layout); the hub's checkpoints and the exporter name one
    `mlp.experts.N.{gate,up,down}_proj.weight` per expert. Each expert's matrix is a contiguous range of
    the stacked one, so it becomes an entry of its own: no stacked tensor is ever loaded whole."""
    out = {}
    for name, entry in entries.items():
        path, dtype, shape, start, end = entry
        stacked = name.endswith(".mlp.experts.gate_up_proj") or name.endswith(".mlp.experts.down_proj")
        if not stacked or dtype not in _DTYPES or len(shape) != 3:
            out[name] = entry
            continue
        experts, rows, cols = shape
        size = np.dtype(_DTYPES[dtype]).itemsize
        base = name[: name.rindex(".") + 1]
        for e in range(experts):
            first = start + e * rows * cols * size
            if name.endswith("down_proj"):
                out[f"{base}{e}.down_proj.weight"] = (path, dtype, [rows, cols], first, first + rows * cols * size)
            else:
                half = rows // 2 * cols * size
                out[f"{base}{e}.gate_proj.weight"] = (path, dtype, [rows // 2, cols], first, first + half)
                out[f"{base}{e}.up_proj.weight"] = (path, dtype, [rows // 2, cols], first + half, first + 2 * half)
    return out


def _shard_files(index_path: Path) -> list[str]:
    """The shard files an index names: plain file names in the checkpoint directory."""
    weight_map = _read_json(index_path).get("weight_map")
    if not isinstance(weight_map, dict):
        raise ExportError(f"{index_path}: no weight_map object")
    files = set(weight_map.values())
    for name in files:
        if not isinstance(name, str) or not name or "/" in name or "\\" in name or name in (".", ".."):
            raise ExportError(f"{index_path}: shard {str(name)[:80]!r} is not a file name in the checkpoint directory")
    return sorted(files)


def read_checkpoint(directory: Path) -> Checkpoint:
    directory = Path(directory)
    if not directory.is_dir():
        raise ExportError(f"{directory}: not a directory")
    config = _read_json(directory / "config.json")
    tokenizer_json = _read_json(directory / "tokenizer.json")
    tokenizer_config = _read_json(directory / "tokenizer_config.json")
    template_path = directory / "chat_template.jinja"  # transformers >= 4.5x saves the template here
    if template_path.exists() and "chat_template" not in tokenizer_config:
        tokenizer_config["chat_template"] = template_path.read_text(encoding="utf-8")
    max_len = tokenizer_config.get("model_max_length")
    if isinstance(max_len, (int, float)) and max_len > 2**53:  # "unbounded" sentinel; keep JSON portable
        tokenizer_config["model_max_length"] = config.get("max_position_embeddings")
    gen_path = directory / "generation_config.json"
    generation_config = _read_json(gen_path) if gen_path.exists() else {}

    index_path = directory / "model.safetensors.index.json"
    if index_path.exists():
        files = _shard_files(index_path)
    elif (directory / "model.safetensors").exists():
        files = ["model.safetensors"]
    else:
        raise ExportError(f"{directory}: no model.safetensors or model.safetensors.index.json")
    entries = {}
    digest = hashlib.sha256()
    for name in files:
        path = directory / name
        if not path.exists():
            raise ExportError(f"{path}: missing (named by the shard index)")
        entries.update(_safetensors_index(path))
        with open(path, "rb") as f:
            while block := f.read(1 << 22):
                digest.update(block)
    tensors = {name: _loader(e) for name, e in _unstack_experts(entries).items()}
    if config.get("tie_word_embeddings", False):
        tensors.pop("lm_head.weight", None)
    elif "lm_head.weight" not in tensors:
        raise ExportError(f"{directory}: tie_word_embeddings is false but lm_head.weight is missing")
    if not generation_config:
        generation_config = {"eos_token_id": config.get("eos_token_id"), "bos_token_id": config.get("bos_token_id")}
    return Checkpoint(
        config=config,
        generation_config=generation_config,
        tokenizer_json=tokenizer_json,
        tokenizer_config=tokenizer_config,
        tensors=tensors,
        source={"kind": "hf", "name": directory.name, "sha256": digest.hexdigest()},
    )
