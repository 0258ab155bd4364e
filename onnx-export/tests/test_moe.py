"""Qwen2-MoE checkpoints: both expert layouts read the same, and the config's sparse layers."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from conftest import FIXTURES
from safetensors.numpy import load_file, save_file

from qwen2_export.checkpoint import Dims, expected_tensor_names, validate
from qwen2_export.errors import ExportError
from qwen2_export.source_hf import read_checkpoint

MOE = FIXTURES / "tiny-moe" / "checkpoint"


def _stacked_copy(tmp_path):
    """The fixture as a `state_dict` of transformers 5's modules holds it: each layer's experts in two
    stacked tensors."""
    out = tmp_path / "stacked"
    shutil.copytree(MOE, out)
    tensors = load_file(str(out / "model.safetensors"))
    cfg = json.loads((out / "config.json").read_text())
    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}.mlp.experts."
        if p + "0.gate_proj.weight" not in tensors:
            continue
        experts = range(cfg["num_experts"])
        tensors[p + "gate_up_proj"] = np.stack([np.concatenate(
            [tensors.pop(f"{p}{e}.gate_proj.weight"), tensors.pop(f"{p}{e}.up_proj.weight")]) for e in experts])
        tensors[p + "down_proj"] = np.stack([tensors.pop(f"{p}{e}.down_proj.weight") for e in experts])
    save_file(tensors, str(out / "model.safetensors"))
    return out


def test_stacked_experts_read_as_the_hub_layout(tmp_path):
    hub, stacked = read_checkpoint(MOE), read_checkpoint(_stacked_copy(tmp_path))
    assert any(n.endswith("mlp.experts.gate_up_proj") for n in load_file(str(tmp_path / "stacked" / "model.safetensors")))
    assert set(hub.tensors) == set(stacked.tensors)
    for name in hub.tensors:
        np.testing.assert_array_equal(hub.tensors[name](), stacked.tensors[name](), err_msg=name)


def test_sparse_layers_follow_transformers_rule():
    cfg = json.loads((MOE / "config.json").read_text())
    dims = Dims.from_config(cfg)
    assert dims.moe.sparse_layers == (0, 2)  # mlp_only_layers = [1]
    step2 = Dims.from_config({**cfg, "mlp_only_layers": [], "decoder_sparse_step": 2})
    assert step2.moe.sparse_layers == (1,)
    names = expected_tensor_names(dims, tied=False)
    assert "model.layers.1.mlp.gate_proj.weight" in names
    assert "model.layers.0.mlp.experts.7.down_proj.weight" in names
    assert "model.layers.0.mlp.gate_proj.weight" not in names
    assert Dims.from_config({**cfg, "model_type": "qwen2"}).moe is None


def test_a_missing_expert_is_named(tmp_path):
    out = tmp_path / "broken"
    shutil.copytree(MOE, out)
    tensors = load_file(str(out / "model.safetensors"))
    del tensors["model.layers.2.mlp.experts.5.up_proj.weight"]
    save_file(tensors, str(out / "model.safetensors"))
    with pytest.raises(ExportError, match="lacks 1 tensors, first: model.layers.2.mlp.experts.5.up_proj.weight"):
        validate(read_checkpoint(out))


def test_bad_routing_config_is_an_error():
    cfg = json.loads((MOE / "config.json").read_text())
    with pytest.raises(ExportError, match="num_experts_per_tok 9 must be between 1 and num_experts 8"):
        Dims.from_config({**cfg, "num_experts_per_tok": 9})
