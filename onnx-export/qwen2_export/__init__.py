"""Export Qwen2-family checkpoints to the qwen2-edge ONNX model bundle."""

__version__ = "0.1.0"
