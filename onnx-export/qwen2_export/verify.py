"""`verify`: run every variant of a bundle in ONNX Runtime against a reference and report the gap."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from .bundle import check_files, load_manifest
from .errors import ExportError
from .runner import OrtDecoder, transformers_trace

# fp32 graphs differ from the reference only in summation order: |Δlogit| stays near 1e-5 on the
# fixtures and well under 1e-3 on real models; a larger gap means a wrong graph, not rounding.
FP32_TOLERANCE = 1e-3


def _encode(bundle: Path, text: str) -> list[int]:
    try:
        from tokenizers import Tokenizer
    except ImportError:
        raise ExportError("verify needs the `tokenizers` package (pip install tokenizers)") from None
    ids = Tokenizer.from_file(str(bundle / "tokenizer.json")).encode(text, add_special_tokens=False).ids
    if not ids:
        raise ExportError("the prompt encodes to no tokens")
    return ids


def verify(bundle: Path, reference: Path | None, variants: list[str] | None, prompt: str, steps: int,
           threads: int | None) -> bool:
    bundle = Path(bundle)
    manifest = load_manifest(bundle)
    check_files(bundle, manifest, hashes=True)
    names = [v["name"] for v in manifest["variants"]]
    chosen = variants or names
    unknown = [v for v in chosen if v not in names]
    if unknown:
        raise ExportError(f"{bundle}: no variant {unknown[0]!r} (has {', '.join(names)})")
    ids = _encode(bundle, prompt)
    if reference is not None:
        ref = transformers_trace(reference, ids, steps)
        ref_name = f"transformers on {reference}"
    else:
        if "fp32" not in names:
            raise ExportError(f"{bundle}: no fp32 variant to compare with; pass --reference CHECKPOINT")
        ref = OrtDecoder(bundle, "fp32", threads).greedy(ids, steps)
        ref_name = "the bundle's fp32 variant"
    print(f"reference: {ref_name}; prompt {len(ids)} tokens, {steps} decode steps")
    print(f"{'variant':<10} {'max|Δ| prefill':>15} {'max|Δ| decode':>14} {'top-1 agree':>12} {'greedy same':>12}")
    ok = True
    for name in chosen:
        dec = OrtDecoder(bundle, name, threads)
        forced = dec.forced(ids, list(ref.decode_ids))
        free = dec.greedy(ids, steps)
        del dec  # one ONNX Runtime session at a time: freed before the next variant's loads
        d_pre = float(np.abs(forced.prefill_logits - ref.prefill_logits).max())
        d_dec = float(np.abs(forced.decode_logits - ref.decode_logits).max()) if steps else 0.0
        top1 = np.concatenate([forced.prefill_logits[-1:], forced.decode_logits[:-1]]).argmax(-1) if steps else []
        agree = float(np.mean(top1 == ref.decode_ids)) if steps else 1.0
        same = bool(np.array_equal(free.decode_ids, ref.decode_ids))
        print(f"{name:<10} {d_pre:>15.3e} {d_dec:>14.3e} {agree:>12.0%} {str(same):>12}")
        precision = name.split("-")[0]
        if precision == "fp32" and max(d_pre, d_dec) > FP32_TOLERANCE:
            ok = False
        if precision in ("fp32", "fp16") and not same:
            ok = False
    print("verify: " + ("ok" if ok else "FAILED (fp32 beyond tolerance or fp32/fp16 greedy tokens differ)"))
    return ok
