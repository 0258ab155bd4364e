"""Weight quantizers; the byte layouts are specified in docs/bundle-format.md.

Each works through its matrix a slab of rows at a time (every row quantizes on its own), so its
temporaries stay a few MB whatever the matrix: the exporter's peak memory is then the tensor itself.
"""

from __future__ import annotations

from typing import Callable

import numpy as np

INT4_BLOCK = 32
# Block of the ort profile's 8-bit weights (ONNX Runtime's MatMulNBits takes powers of two from 16).
# 128: the fastest of 32/64/128 with accuracy level 4 for a 4864x896 product on ONNX Runtime 1.32
# (decode 0.18/0.15/0.12 ms, 128-row prefill 4.8/4.8/4.0 ms), scales cost 3% of the weight bytes,
# and the in_features of Qwen2 0.5B-7B (896, 1536, 2048, 3584, 4864, 8960, 11008, 18944) divide by it.
INT8_BLOCK = 128


# Elements quantized together (whole rows, at least one): the slab's temporaries (1 MB each) stay in
# cache. Measured on 1536x8960, 8960x1536 and 151936x1536 matrices, 2^18 elements quantizes 1.5-4x
# faster than slabs of 4096 rows (up to 147 MB per temporary, every step a trip to memory) and is
# within 10% of the best of 16...4096 rows for each shape.
SLAB_ELEMENTS = 1 << 18


def _by_slabs(w: np.ndarray, outputs: tuple[np.ndarray, ...],
              quantize: Callable[[np.ndarray], tuple[np.ndarray, ...]]) -> tuple[np.ndarray, ...]:
    """Fills `outputs` (first axis = rows of `w`) with `quantize` of each slab of rows."""
    rows = max(1, SLAB_ELEMENTS // max(1, w.shape[1]))
    for start in range(0, w.shape[0], rows):
        for out, part in zip(outputs, quantize(np.asarray(w[start:start + rows], dtype=np.float32))):
            out[start:start + len(part)] = part
    return outputs


def quantize_int8_rows(w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric int8, one scale per output row: w ≈ q * scale[:, None]."""

    def slab(rows):
        amax = np.abs(rows).max(axis=1)
        scale = np.where(amax > 0, amax / 127.0, 1.0).astype(np.float32)
        return np.clip(np.rint(rows / scale[:, None]), -127, 127).astype(np.int8), scale

    n, k = w.shape
    return _by_slabs(w, (np.empty((n, k), np.int8), np.empty(n, np.float32)), slab)


def _blocked(rows: np.ndarray, k: int, blocks: int, block: int) -> np.ndarray:
    """Rows [r, k] as [r, blocks, block], zero-padded past k."""
    padded = np.zeros((len(rows), blocks * block), dtype=np.float32)
    padded[:, :k] = rows
    return padded.reshape(len(rows), blocks, block)


def dequantize_int8_rows(q: np.ndarray, scale: np.ndarray) -> np.ndarray:
    return q.astype(np.float32) * scale[:, None]


def quantize_int8_blocks(w: np.ndarray, block: int = INT8_BLOCK) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric int8 in blocks along the input dimension, the layout of ONNX Runtime's 8-bit MatMulNBits
    (no zero points given, so it subtracts 128). Returns uint8 [out, n_blocks, block] holding q + 128 and
    float32 scales [out, n_blocks]: w = (u - 128) * scale, q in [-127, 127], scale = max |w| / 127 over
    the block (an all-zero block gets 1); padding past in_features is u = 128 (zero)."""
    n, k = w.shape
    blocks = -(-k // block)

    def slab(rows):
        wb = _blocked(rows, k, blocks, block)
        amax = np.abs(wb).max(axis=-1)
        scale = np.where(amax > 0, amax / 127.0, 1.0).astype(np.float32)
        q = np.clip(np.rint(wb / scale[..., None]), -127, 127).astype(np.int16) + 128
        return q.astype(np.uint8), scale

    return _by_slabs(w, (np.empty((n, blocks, block), np.uint8), np.empty((n, blocks), np.float32)), slab)


def dequantize_int8_blocks(u: np.ndarray, scale: np.ndarray, k: int) -> np.ndarray:
    n, blocks, block = u.shape
    return ((u.astype(np.float32) - 128.0) * scale[..., None]).reshape(n, blocks * block)[:, :k]


def quantize_int4_blocks(w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric int4 in blocks of 32 along the input dimension, MatMulNBits layout.

    Like ggml's Q4_0, the block's value of largest magnitude maps to -8, so all 16 levels are used
    (the scale takes that value's sign). Returns packed uint8 [out, n_blocks, 16] and float32
    scales [out, n_blocks]; nibble u means (u - 8) * scale, low nibble first.
    """
    n, k = w.shape
    blocks = -(-k // INT4_BLOCK)

    def slab(rows):
        wb = _blocked(rows, k, blocks, INT4_BLOCK)
        idx = np.abs(wb).argmax(axis=-1)
        extreme = np.take_along_axis(wb, idx[..., None], axis=-1)[..., 0]
        scale = np.where(extreme != 0, extreme / -8.0, 1.0).astype(np.float32)
        q = (np.clip(np.rint(wb / scale[..., None]), -8, 7).astype(np.int16) + 8).astype(np.uint8)
        return (q[..., 0::2] | (q[..., 1::2] << 4)).astype(np.uint8), scale

    return _by_slabs(w, (np.empty((n, blocks, INT4_BLOCK // 2), np.uint8), np.empty((n, blocks), np.float32)), slab)


def dequantize_int4_blocks(packed: np.ndarray, scale: np.ndarray, k: int) -> np.ndarray:
    n, blocks, _ = packed.shape
    q = np.empty((n, blocks, INT4_BLOCK), dtype=np.float32)
    q[..., 0::2] = packed & 0x0F
    q[..., 1::2] = packed >> 4
    return ((q - 8.0) * scale[..., None]).reshape(n, blocks * INT4_BLOCK)[:, :k]
