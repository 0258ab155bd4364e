"""Run a bundle variant in ONNX Runtime: prefill, then greedy decode through the KV cache."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .bundle import load_manifest
from .errors import ExportError


@dataclass
class GreedyTrace:
    prefill_logits: np.ndarray  # [S, V], logits at every prompt position
    decode_ids: np.ndarray  # [steps], token fed at step i (argmax of the previous logits)
    decode_logits: np.ndarray  # [steps, V]


class OrtDecoder:
    def __init__(self, bundle: Path, variant: str, threads: int | None = None):
        import onnxruntime as ort

        manifest = load_manifest(bundle)
        entry = next((v for v in manifest["variants"] if v["name"] == variant), None)
        if entry is None:
            names = ", ".join(v["name"] for v in manifest["variants"])
            raise ExportError(f"{bundle}: no variant {variant!r} (has {names})")
        opts = ort.SessionOptions()
        opts.log_severity_level = 3
        if threads:
            opts.intra_op_num_threads = threads
        self.session = ort.InferenceSession(str(Path(bundle) / entry["graph"]), opts,
                                            providers=["CPUExecutionProvider"])
        self.layers = sum(1 for n in entry["inputs"] if n.endswith(".key"))
        # Profile ort graphs compute logits only for the last `logits_to_keep` positions: ask for all.
        self.keeps_logits = "logits_to_keep" in entry["inputs"]
        shape = self.session.get_inputs()[3].shape  # [batch, kv_heads, past_seq, head_dim]
        self.kv_heads, self.head_dim = int(shape[1]), int(shape[3])
        self.kv_dtype = np.dtype(entry.get("kv_dtype", "float32"))  # float16 in profile gpu

    def empty_cache(self) -> dict:
        empty = np.zeros((1, self.kv_heads, 0, self.head_dim), dtype=self.kv_dtype)
        return {f"past_key_values.{i}.{k}": empty for i in range(self.layers) for k in ("key", "value")}

    def step(self, ids: list[int], cache: dict) -> tuple[np.ndarray, dict]:
        past = cache["past_key_values.0.key"].shape[2]
        feeds = {
            "input_ids": np.asarray([ids], dtype=np.int64),
            "attention_mask": np.ones((1, past + len(ids)), dtype=np.int64),
            "position_ids": np.arange(past, past + len(ids), dtype=np.int64)[None, :],
            **cache,
        }
        if self.keeps_logits:
            feeds["logits_to_keep"] = np.asarray([len(ids)], dtype=np.int64)
        names = [o.name for o in self.session.get_outputs()]
        outs = dict(zip(names, self.session.run(None, feeds)))
        new_cache = {f"past_key_values.{n[len('present.'):]}": v for n, v in outs.items() if n.startswith("present.")}
        return outs["logits"][0], new_cache

    def greedy(self, prompt: list[int], steps: int) -> GreedyTrace:
        logits, cache = self.step(prompt, self.empty_cache())
        prefill = logits
        ids, decode = [], []
        last = logits[-1]
        for _ in range(steps):
            tok = int(np.argmax(last))
            ids.append(tok)
            out, cache = self.step([tok], cache)
            last = out[-1]
            decode.append(last)
        return GreedyTrace(prefill, np.asarray(ids, dtype=np.int64), np.asarray(decode))

    def forced(self, prompt: list[int], fed: list[int]) -> GreedyTrace:
        """Teacher-forced trace: feed `fed` (a reference's greedy tokens) whatever this variant predicts,
        so every step compares logits for the same context."""
        logits, cache = self.step(prompt, self.empty_cache())
        decode = []
        for tok in fed:
            out, cache = self.step([int(tok)], cache)
            decode.append(out[-1])
        return GreedyTrace(logits, np.asarray(fed, dtype=np.int64), np.asarray(decode))


def transformers_trace(checkpoint: Path, prompt: list[int], steps: int) -> GreedyTrace:
    """The reference: Hugging Face transformers on the original checkpoint (dev machines only)."""
    try:
        import torch
        from transformers import AutoModelForCausalLM
    except ImportError:
        raise ExportError("--reference needs torch and transformers installed") from None
    model = AutoModelForCausalLM.from_pretrained(str(checkpoint), dtype=torch.float32).eval()
    with torch.no_grad():
        out = model(torch.tensor([prompt]), use_cache=True)
        prefill = out.logits[0].numpy()
        past, last = out.past_key_values, out.logits[0, -1]
        ids, decode = [], []
        for _ in range(steps):
            tok = int(torch.argmax(last))
            ids.append(tok)
            out = model(torch.tensor([[tok]]), past_key_values=past, use_cache=True)
            past, last = out.past_key_values, out.logits[0, -1]
            decode.append(last.numpy())
    return GreedyTrace(prefill, np.asarray(ids, dtype=np.int64), np.asarray(decode))
