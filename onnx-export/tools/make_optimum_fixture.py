"""Dev-only: export a fixture checkpoint with Hugging Face Optimum, the way users get Qwen2 ONNX
models from outside this project, check it against the fixture's transformers reference, and
write it to tests/fixtures/<name>/optimum/ for the Rust ort backend's tests.

Needs torch, optimum-onnx (which pins transformers < 4.58) and onnxruntime; nothing here runs
in CI. Usage (from the repository root):

    python onnx-export/tools/make_optimum_fixture.py [--fixture tiny-tied]
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[2]
TOLERANCE = 1e-4


def v4_config(config: dict) -> dict:
    """transformers 5 writes rope settings as `rope_parameters`; the 4.x that Optimum needs only
    reads `rope_theta` / `rope_scaling` and would silently use the default theta."""
    rope = config.get("rope_parameters")
    if rope and "rope_theta" not in config:
        if rope.get("rope_type", "default") != "default":
            sys.exit("only default RoPE fixtures can be exported with transformers 4.x")
        config = {**config, "rope_theta": rope["rope_theta"]}
        del config["rope_parameters"]
    return config


def export(checkpoint: Path, out: Path) -> None:
    from optimum.exporters.onnx import main_export

    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "checkpoint"
        shutil.copytree(checkpoint, src)
        config = v4_config(json.loads((src / "config.json").read_text()))
        (src / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        main_export(str(src), output=str(Path(tmp) / "onnx"), task="text-generation-with-past")
        out.mkdir(parents=True, exist_ok=True)
        shutil.copy(Path(tmp) / "onnx" / "model.onnx", out / "model.onnx")
        # The config the graph was exported from (what the Rust loader reads).
        (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")


def check(out: Path, reference: Path) -> float:
    """Prefill and greedy decode in ONNX Runtime against transformers' logits."""
    import onnxruntime as ort
    from safetensors.numpy import load_file

    ref = load_file(str(reference))
    session = ort.InferenceSession(str(out / "model.onnx"), providers=["CPUExecutionProvider"])
    past_inputs = [i for i in session.get_inputs() if i.name.startswith("past_key_values.")]
    kv_heads, head_dim = past_inputs[0].shape[1], past_inputs[0].shape[3]
    cache = {i.name: np.zeros((1, kv_heads, 0, head_dim), np.float32) for i in past_inputs}
    names = [o.name for o in session.get_outputs()]

    def step(ids, past_len):
        feeds = {
            "input_ids": np.asarray([ids], np.int64),
            "attention_mask": np.ones((1, past_len + len(ids)), np.int64),
            "position_ids": np.arange(past_len, past_len + len(ids), dtype=np.int64)[None],
            **cache,
        }
        outs = dict(zip(names, session.run(None, feeds)))
        for name, value in outs.items():
            if name.startswith("present."):
                cache["past_key_values." + name[len("present."):]] = value
        return outs["logits"][0]

    prompt = [int(t) for t in ref["prompt_ids"]]
    worst = float(np.abs(step(prompt, 0) - ref["prefill_logits"]).max())
    for i, tok in enumerate(ref["decode_ids"]):
        logits = step([int(tok)], len(prompt) + i)[-1]
        worst = max(worst, float(np.abs(logits - ref["decode_logits"][i]).max()))
    return worst


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--fixture", default="tiny-tied")
    args = ap.parse_args()
    fixture = REPO / "tests" / "fixtures" / args.fixture
    out = fixture / "optimum"
    export(fixture / "checkpoint", out)
    worst = check(out, fixture / "reference.safetensors")
    import optimum.version
    import torch
    import transformers

    (out / "versions.json").write_text(json.dumps({
        "made_by": "onnx-export/tools/make_optimum_fixture.py",
        "optimum": optimum.version.__version__,
        "transformers": transformers.__version__,
        "torch": torch.__version__,
        "max_abs_diff_vs_reference": worst,
    }, indent=2) + "\n")
    print(f"{out}: max |logit diff| vs transformers reference {worst:.2e}")
    if worst > TOLERANCE:
        sys.exit(f"exported graph differs from the reference by {worst} (> {TOLERANCE})")


if __name__ == "__main__":
    main()
