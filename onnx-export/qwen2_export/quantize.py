"""Weight quantizers; the byte layouts are specified in docs/bundle-format.md."""

from __future__ import annotations

import numpy as np

INT4_BLOCK = 32


def quantize_int8_rows(w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric int8, one scale per output row: w ≈ q * scale[:, None]."""
    amax = np.abs(w).max(axis=1)
    scale = np.where(amax > 0, amax / 127.0, 1.0).astype(np.float32)
    q = np.clip(np.rint(w / scale[:, None]), -127, 127).astype(np.int8)
    return q, scale


def dequantize_int8_rows(q: np.ndarray, scale: np.ndarray) -> np.ndarray:
    return q.astype(np.float32) * scale[:, None]


def quantize_int4_blocks(w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric int4 in blocks of 32 along the input dimension, MatMulNBits layout.

    Like ggml's Q4_0, the block's value of largest magnitude maps to -8, so all 16 levels are used
    (the scale takes that value's sign). Returns packed uint8 [out, n_blocks, 16] and float32
    scales [out, n_blocks]; nibble u means (u - 8) * scale, low nibble first.
    """
    n, k = w.shape
    blocks = -(-k // INT4_BLOCK)
    padded = np.zeros((n, blocks * INT4_BLOCK), dtype=np.float32)
    padded[:, :k] = w
    wb = padded.reshape(n, blocks, INT4_BLOCK)
    idx = np.abs(wb).argmax(axis=-1)
    extreme = np.take_along_axis(wb, idx[..., None], axis=-1)[..., 0]
    scale = np.where(extreme != 0, extreme / -8.0, 1.0).astype(np.float32)
    q = np.clip(np.rint(wb / scale[..., None]), -8, 7).astype(np.int16) + 8
    q = q.astype(np.uint8)
    packed = (q[..., 0::2] | (q[..., 1::2] << 4)).astype(np.uint8)
    return packed, scale


def dequantize_int4_blocks(packed: np.ndarray, scale: np.ndarray, k: int) -> np.ndarray:
    n, blocks, _ = packed.shape
    q = np.empty((n, blocks, INT4_BLOCK), dtype=np.float32)
    q[..., 0::2] = packed & 0x0F
    q[..., 1::2] = packed >> 4
    return ((q - 8.0) * scale[..., None]).reshape(n, blocks * INT4_BLOCK)[:, :k]
