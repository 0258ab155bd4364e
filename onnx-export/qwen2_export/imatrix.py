"""Calibration statistics for int4k: the mean square of every input column of every matrix, over a
calibration text (what llama.cpp's imatrix keeps), measured by running a bundle's fp32 variant in ONNX
Runtime with each product's input as an extra output.

The int4k search then weighs a weight's error by its column's mean square times the weight's own
magnitude weighting (quantize.quantize_int4k): an error in a channel that carries large activations
costs more. Measured on the demo model (README, "Quality"): calibrated on Python sources, perplexity on
the GPL-3 text 6.834 -> 6.774 (fp32: 6.448); the activations alone as the weighting (7.226) overfit
the calibration text.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from .bundle import load_manifest
from .errors import ExportError

# Tokens per forward: each window starts a fresh cache (the statistics need no longer context).
WINDOW = 512


def collect(bundle: Path, texts: list[str], max_tokens: int = 8192, threads: int | None = None) -> dict:
    """{matrix name: float32 [in_features] mean square of its input} over up to `max_tokens` tokens of
    `texts` (tokenized with the bundle's tokenizer), from the bundle's fp32 portable variant."""
    import onnx
    import onnxruntime as ort
    from tokenizers import Tokenizer

    bundle = Path(bundle)
    manifest = load_manifest(bundle)
    entry = next((v for v in manifest["variants"] if v["name"] == "fp32"), None)
    if entry is None:
        raise ExportError(f"{bundle}: no fp32 variant (export one with --variants fp32 to calibrate)")
    tokenizer = Tokenizer.from_file(str(bundle / "tokenizer.json"))
    ids: list[int] = []
    for text in texts:
        ids += tokenizer.encode(text, add_special_tokens=False).ids
    ids = ids[:max_tokens]
    if not ids:
        raise ExportError("the calibration text is empty")
    graph_path = bundle / entry["graph"]
    model = onnx.load(str(graph_path), load_external_data=False)
    # Portable graphs multiply every matrix with Gemm(x, W, transB=1): its first input is the activation.
    inputs = {n.input[1]: n.input[0] for n in model.graph.node
              if n.op_type == "Gemm" and n.input[1] in entry["weights"]}
    for name in sorted(set(inputs.values())):
        model.graph.output.append(onnx.helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, None))
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    if threads:
        opts.intra_op_num_threads = threads
    # The changed graph from memory, its weights read from the variant's own data file (the bundle may be
    # read-only, and ONNX Runtime refuses external data outside the graph's folder).
    opts.add_session_config_entry("session.model_external_initializers_file_folder_path", str(graph_path.parent))
    session = ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    config = json.loads((bundle / "config.json").read_text())
    layers, kv_heads = config["num_hidden_layers"], config.get("num_key_value_heads") or config["num_attention_heads"]
    head_dim = config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"]
    empty = np.zeros((1, kv_heads, 0, head_dim), np.float32)
    names = [o.name for o in session.get_outputs()]
    sums: dict[str, np.ndarray] = {}
    for start in range(0, len(ids), WINDOW):
        window = np.asarray([ids[start:start + WINDOW]], dtype=np.int64)
        n = window.shape[1]
        feeds = {"input_ids": window, "attention_mask": np.ones((1, n), np.int64),
                 "position_ids": np.arange(n, dtype=np.int64)[None]}
        feeds.update({f"past_key_values.{i}.{k}": empty for i in range(layers) for k in ("key", "value")})
        outs = dict(zip(names, session.run(names, feeds)))
        for weight, x in inputs.items():
            a = outs[x].reshape(-1, outs[x].shape[-1]).astype(np.float64)
            sums[weight] = sums.get(weight, 0.0) + (a * a).sum(0)
    return {name: (s / len(ids)).astype(np.float32) for name, s in sums.items()}


def save(stats: dict, path: Path) -> None:
    np.savez(path, **stats)


def load(path: Path) -> dict:
    """The statistics `save` wrote; a missing or damaged file is one ExportError line."""
    try:
        with np.load(path) as f:
            stats = {name: np.asarray(f[name], dtype=np.float32) for name in f.files}
    except (OSError, ValueError) as e:
        raise ExportError(f"{path}: not an imatrix file ({str(e).splitlines()[0] if str(e) else type(e).__name__})") from None
    for name, v in stats.items():
        if v.ndim != 1 or not np.all(np.isfinite(v)) or np.any(v < 0):
            raise ExportError(f"{path}: {name}: not a vector of mean squares")
    return stats
