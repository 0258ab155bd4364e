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


def _unpack_nibbles(packed: np.ndarray, dtype=np.float32) -> np.ndarray:
    """Packed blocks [n, blocks, 16] (element 2j in the low nibble of byte j) as [n, blocks, 32]."""
    n, blocks, _ = packed.shape
    q = np.empty((n, blocks, INT4_BLOCK), dtype=dtype)
    q[..., 0::2] = packed & 0x0F
    q[..., 1::2] = packed >> 4
    return q


def dequantize_int4_blocks(packed: np.ndarray, scale: np.ndarray, k: int) -> np.ndarray:
    n, blocks, _ = packed.shape
    q = _unpack_nibbles(packed)
    return ((q - 8.0) * scale[..., None]).reshape(n, blocks * INT4_BLOCK)[:, :k]


# ---- int4k: 4-bit of GGUF's K-quant class (docs/bundle-format.md, "int4k") ----

# Sub-blocks of 32 per super-block: the 6-bit sub-block scales and mins of a super-block share one
# float16 scale each (`d`, `dmin`), as in GGUF's Q4_K (8 x 32 = 256 weights).
KQ_SUPER = 8
KQ_CODE_MAX = 63
# Bytes of one GGUF Q4_K super-block: d, dmin (float16), 12 bytes of packed 6-bit codes, 128 of nibbles.
Q4_K_BYTES = 144
# Candidate steps per sub-block in the scale search: the range (max - min) is cut into 15 + delta steps.
_SEARCH_DELTAS = np.linspace(-1.0, 1.0, 11, dtype=np.float32)


def _fit_scale_offset(x: np.ndarray, wgt: np.ndarray, levels: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The weighted least-squares (scale, offset) with x ≈ scale * levels + offset per sub-block (last
    axis), the offset kept <= 0 (a K-quant min is subtracted); returns scale, offset, weighted error."""
    sw = wgt.sum(-1)
    sl = (wgt * levels).sum(-1)
    sll = (wgt * levels * levels).sum(-1)
    sx = (wgt * x).sum(-1)
    slx = (wgt * levels * x).sum(-1)
    det = sw * sll - sl * sl
    with np.errstate(divide="ignore", invalid="ignore"):
        scale = np.where(det > 0, (sw * slx - sx * sl) / det, 0.0)
        offset = np.where(det > 0, (sll * sx - sl * slx) / det, 0.0)
        positive = offset > 0
        scale = np.where(positive, np.where(sll > 0, slx / sll, 0.0), scale)
        offset = np.where(positive, 0.0, offset)
    scale = np.maximum(scale, 0.0)
    err = (wgt * (scale[..., None] * levels + offset[..., None] - x) ** 2).sum(-1)
    return scale.astype(np.float32), offset.astype(np.float32), err


def _search_sub_blocks(x: np.ndarray, columns: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Per sub-block of 32 (last axis): the (scale >= 0, min >= 0) with x ≈ scale * q - min, q in 0..15,
    that minimize the importance-weighted squared error over a few candidate grids. Importance of a
    weight: its square plus the sub-block's mean square, so large weights are kept more exactly (on the
    demo model this weighting gave perplexity 6.82 where uniform weights gave 7.14 and RMS + magnitude
    7.17), times its input column's weight `columns` [sub-blocks, 32] when calibration statistics give
    one (imatrix.py: the column's mean square activation, relative to the matrix's mean)."""
    wgt = x * x + (x * x).mean(-1, keepdims=True)
    if columns is not None:
        wgt = wgt * columns
    lo = np.minimum(x.min(-1), 0.0)
    hi = x.max(-1)
    span = hi - lo
    best_scale = np.where(span > 0, span / 15.0, 0.0).astype(np.float32)
    best_off = lo.astype(np.float32)
    levels = np.clip(np.rint((x - lo[..., None]) / np.where(span > 0, best_scale, 1.0)[..., None]), 0, 15)
    best_err = (wgt * (best_scale[..., None] * levels + lo[..., None] - x) ** 2).sum(-1)
    for delta in _SEARCH_DELTAS:
        inv = np.where(span > 0, (15.0 + delta) / np.where(span > 0, span, 1.0), 0.0)
        levels = np.clip(np.rint(inv[..., None] * (x - lo[..., None])), 0, 15)
        scale, off, err = _fit_scale_offset(x, wgt, levels)
        better = err < best_err
        best_scale = np.where(better, scale, best_scale)
        best_off = np.where(better, off, best_off)
        best_err = np.where(better, err, best_err)
    return best_scale, -best_off


def _per_sub_block(per_super: np.ndarray, nb: int) -> np.ndarray:
    """Super-block values [r, supers] repeated for their sub-blocks, as float32 [r, nb]."""
    return np.repeat(per_super.astype(np.float32), KQ_SUPER, axis=1)[:, :nb]


def _codes(values: np.ndarray, supers: int) -> tuple[np.ndarray, np.ndarray]:
    """Non-negative per-sub-block values [r, nb] as a float16 scale per super-block [r, supers] and 6-bit
    codes [r, nb] (value ≈ scale * code)."""
    r, nb = values.shape
    padded = np.zeros((r, supers * KQ_SUPER), dtype=np.float32)
    padded[:, :nb] = values
    top = padded.reshape(r, supers, KQ_SUPER).max(-1)
    d = (top / KQ_CODE_MAX).astype(np.float16)
    d32 = _per_sub_block(d, nb)
    with np.errstate(divide="ignore", invalid="ignore"):
        codes = np.where(d32 > 0, np.rint(values / d32), 0.0)
    return d, np.clip(codes, 0, KQ_CODE_MAX).astype(np.uint8)


def _column_weights(columns: np.ndarray | None, k: int, blocks: int, width: int) -> np.ndarray | None:
    """Calibration statistics [k] (each input column's mean square activation, imatrix.py) as importance
    weights relative to their mean, laid out as sub-blocks [blocks, width] (1 past k); None without."""
    if columns is None:
        return None
    if columns.shape != (k,):
        raise ValueError(f"calibration statistics of shape {columns.shape} for a matrix of {k} columns")
    padded = np.ones(blocks * width, np.float32)
    mean = float(columns.mean())
    padded[:k] = columns / mean if mean > 0 else 1.0
    return padded.reshape(blocks, width)


def quantize_int4k(w: np.ndarray, columns: np.ndarray | None = None) -> tuple[np.ndarray, ...]:
    """4-bit of K-quant class in sub-blocks of 32 along the input dimension, super-blocks of 8 sub-blocks
    (the last one of a row may be partial): w ≈ d*sc*q - dmin*m with q in 0..15, 6-bit sc and m per
    sub-block, float16 d and dmin per super-block. The sub-block's scale and min are searched (weighted
    least squares over candidate grids) rather than taken from its range, then coded in 6 bits, and the
    nibbles chosen for the coded values. `columns` [in_features]: calibration statistics, each input
    column's mean square activation (imatrix.py), which weigh the search. Returns packed nibbles uint8
    [out, nb, 16] (element 2j low), sc and m uint8 [out, nb], d and dmin float16 [out, ns]."""
    n, k = w.shape
    nb = -(-k // INT4_BLOCK)
    ns = -(-nb // KQ_SUPER)
    weights = _column_weights(columns, k, nb, INT4_BLOCK)

    def slab(rows):
        x = _blocked(rows, k, nb, INT4_BLOCK)
        scale, mn = _search_sub_blocks(x, weights)
        d, sc = _codes(scale, ns)
        dmin, m = _codes(mn, ns)
        step = _per_sub_block(d, nb) * sc
        low = _per_sub_block(dmin, nb) * m
        with np.errstate(divide="ignore", invalid="ignore"):
            q = np.where(step[..., None] > 0, np.rint((x + low[..., None]) / step[..., None]), 0.0)
        q = np.clip(q, 0, 15).astype(np.uint8)
        return (q[..., 0::2] | (q[..., 1::2] << 4)).astype(np.uint8), sc, m, d, dmin

    outputs = (np.empty((n, nb, INT4_BLOCK // 2), np.uint8), np.empty((n, nb), np.uint8),
               np.empty((n, nb), np.uint8), np.empty((n, ns), np.float16), np.empty((n, ns), np.float16))
    return _by_slabs(w, outputs, slab)


def dequantize_int4k(packed: np.ndarray, sc: np.ndarray, m: np.ndarray, d: np.ndarray, dmin: np.ndarray,
                     k: int) -> np.ndarray:
    n, nb, _ = packed.shape
    step = _per_sub_block(d, nb) * sc
    low = _per_sub_block(dmin, nb) * m
    return (_unpack_nibbles(packed) * step[..., None] - low[..., None]).reshape(n, nb * INT4_BLOCK)[:, :k]


def unpack_kquant_codes(codes: np.ndarray, nb: int) -> tuple[np.ndarray, np.ndarray]:
    """The 6-bit scale and min codes [n, nb] of packed super-block codes [n, ns, 12], GGUF Q4_K's packing:
    codes 0..3 in the low 6 bits of bytes 0..3 (scales) and 4..7 (mins); codes 4..7 as a low nibble in
    bytes 8..11 (scale) / high nibble (min), their top 2 bits in the spare top bits of bytes 0..3 (scale)
    and 4..7 (min)."""
    n, ns, _ = codes.shape
    s = codes.astype(np.uint8)
    sc = np.empty((n, ns, KQ_SUPER), np.uint8)
    m = np.empty((n, ns, KQ_SUPER), np.uint8)
    sc[..., :4] = s[..., 0:4] & 63
    m[..., :4] = s[..., 4:8] & 63
    sc[..., 4:] = (s[..., 8:12] & 0x0F) | ((s[..., 0:4] >> 6) << 4)
    m[..., 4:] = (s[..., 8:12] >> 4) | ((s[..., 4:8] >> 6) << 4)
    return sc.reshape(n, -1)[:, :nb], m.reshape(n, -1)[:, :nb]


def pack_kquant_codes(sc: np.ndarray, m: np.ndarray) -> np.ndarray:
    """Scale and min codes [n, nb] (0..63) packed per super-block as GGUF's Q4_K packs them, [n, ns, 12]
    (a row's last super-block padded with zero codes); unpack_kquant_codes gives them back."""
    n, nb = sc.shape
    ns = -(-nb // KQ_SUPER)
    padded = np.zeros((2, n, ns * KQ_SUPER), np.uint8)
    padded[0, :, :nb], padded[1, :, :nb] = sc, m
    sc, m = (p.reshape(n, ns, KQ_SUPER) for p in padded)
    s = np.empty((n, ns, 12), np.uint8)
    s[..., 0:4] = (sc[..., :4] & 63) | ((sc[..., 4:] >> 4) << 6)
    s[..., 4:8] = (m[..., :4] & 63) | ((m[..., 4:] >> 4) << 6)
    s[..., 8:12] = (sc[..., 4:] & 0x0F) | ((m[..., 4:] & 0x0F) << 4)
    return s


def int4k_from_q4_k(raw: np.ndarray) -> tuple[np.ndarray, ...]:
    """GGUF Q4_K rows (uint8 [out, supers * 144]) as int4k's arrays, losslessly: the same nibbles, 6-bit
    codes, d and dmin, only arranged differently (q4_k_from_int4k gives the bytes back)."""
    n = raw.shape[0]
    blocks = raw.reshape(n, -1, Q4_K_BYTES)
    ns = blocks.shape[1]
    d = blocks[..., 0:2].copy().view(np.float16)[..., 0]
    dmin = blocks[..., 2:4].copy().view(np.float16)[..., 0]
    sc, m = unpack_kquant_codes(blocks[..., 4:16], ns * KQ_SUPER)
    qs = blocks[..., 16:].reshape(n, ns, 4, 32)
    # Chunk c of 64 weights: byte l's low nibble is weight 64c + l, its high nibble weight 64c + 32 + l.
    q = np.stack([qs & 0x0F, qs >> 4], axis=3).reshape(n, ns * KQ_SUPER, INT4_BLOCK)
    packed = (q[..., 0::2] | (q[..., 1::2] << 4)).astype(np.uint8)
    return packed, sc, m, d, dmin


def q4_k_from_int4k(packed: np.ndarray, sc: np.ndarray, m: np.ndarray, d: np.ndarray,
                    dmin: np.ndarray) -> np.ndarray:
    """The GGUF Q4_K bytes of full super-blocks of int4k arrays (the inverse of int4k_from_q4_k)."""
    n, nb, _ = packed.shape
    ns = nb // KQ_SUPER
    q = _unpack_nibbles(packed, np.uint8).reshape(n, ns, 4, 2, 32)
    qs = (q[:, :, :, 0] | (q[:, :, :, 1] << 4)).reshape(n, ns, 128)
    s = pack_kquant_codes(sc, m)
    head = np.concatenate([d.astype(np.float16)[..., None].view(np.uint8),
                           dmin.astype(np.float16)[..., None].view(np.uint8)], axis=-1)
    return np.concatenate([head, s, qs], axis=-1).reshape(n, ns * Q4_K_BYTES)


# ---- q6k: 6-bit of GGUF's Q6_K class, int4k's wide matrices (docs/bundle-format.md, "q6k") ----

# Weights per sub-block (each with its own int8 scale code) and sub-blocks per super-block (one float16
# `d` each), as in GGUF's Q6_K: 16 x 16 = 256 weights.
Q6_SUB = 16
Q6_SUPER = 16
Q6_SCALE_MAX = 127
# Bytes of one GGUF Q6_K super-block: 128 of low nibbles, 64 of top bits, 16 int8 scales, d (float16).
Q6_K_BYTES = 210
# Candidate scales per sub-block: the one mapping its largest magnitude to -32, times 1 + 0.1 * delta.
_Q6_DELTAS = np.arange(-6, 7, dtype=np.float32) * 0.1


def _pack_q6(u: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """6-bit values uint8 [r, nb, 32] as the bundle's low nibbles [r, nb, 16] (element 2j low) and top
    bits [r, nb, 8] (element 4j + i in bits 2i..2i+2 of byte j)."""
    low = u & 0x0F
    top = u >> 4
    packed = (low[..., 0::2] | (low[..., 1::2] << 4)).astype(np.uint8)
    qh = (top[..., 0::4] | (top[..., 1::4] << 2) | (top[..., 2::4] << 4) | (top[..., 3::4] << 6)).astype(np.uint8)
    return packed, qh


def _unpack_q6(packed: np.ndarray, qh: np.ndarray) -> np.ndarray:
    """The 6-bit values uint8 [r, nb, 32] of the bundle's low nibbles and top bits (the inverse of _pack_q6)."""
    u = _unpack_nibbles(packed, np.uint8)
    for i in range(4):
        u[..., i::4] |= ((qh >> (2 * i)) & 3) << 4
    return u


def _q6_sub_block_scales(x: np.ndarray, wgt: np.ndarray) -> np.ndarray:
    """Per sub-block of 16 (last axis), the signed scale s with x ≈ s * q, q in -32..31, that minimizes
    the importance-weighted squared error over candidates around the one mapping the value of largest
    magnitude to -32 (as Q4_0 / ggml's Q6_K do: all 64 levels used), each refitted by least squares."""
    idx = np.abs(x).argmax(-1)
    extreme = np.take_along_axis(x, idx[..., None], -1)[..., 0]
    base = np.where(extreme != 0, extreme / -32.0, 0.0).astype(np.float32)
    best = base
    best_err = np.full(base.shape, np.inf, np.float32)
    for delta in _Q6_DELTAS:
        trial = base * (1.0 + delta)
        with np.errstate(divide="ignore", invalid="ignore"):
            q = np.where(trial[..., None] != 0, np.clip(np.rint(x / trial[..., None]), -32, 31), 0.0)
        sqq = (wgt * q * q).sum(-1)
        with np.errstate(divide="ignore", invalid="ignore"):
            fit = np.where(sqq > 0, (wgt * q * x).sum(-1) / sqq, 0.0).astype(np.float32)
        err = (wgt * (fit[..., None] * q - x) ** 2).sum(-1)
        better = err < best_err
        best = np.where(better, fit, best)
        best_err = np.where(better, err, best_err)
    return best


def quantize_q6k(w: np.ndarray, columns: np.ndarray | None = None) -> tuple[np.ndarray, ...]:
    """6-bit of Q6_K class along the input dimension: w ≈ d * sc * (u - 32), u in 0..63, an int8 scale
    code sc per sub-block of 16 and a float16 d per super-block of 256 (a row's last may be partial). Each
    sub-block's scale is searched (`_q6_sub_block_scales`, importance as int4k's: a weight's square plus
    the sub-block's mean square, times its column's calibration weight), coded in 8 bits under its
    super-block's largest magnitude / 127, and the values chosen for the coded scale. Returns the low
    nibbles uint8 [out, nb, 16], top bits uint8 [out, nb, 8], sc int8 [out, 2 nb], d float16 [out, ns]."""
    n, k = w.shape
    nb = -(-k // INT4_BLOCK)
    subs = 2 * nb
    ns = -(-subs // Q6_SUPER)
    weights = _column_weights(columns, k, subs, Q6_SUB)

    def slab(rows):
        x = _blocked(rows, k, subs, Q6_SUB)
        wgt = x * x + (x * x).mean(-1, keepdims=True)
        if weights is not None:
            wgt = wgt * weights
        scale = _q6_sub_block_scales(x, wgt)
        padded = np.zeros((len(rows), ns * Q6_SUPER), np.float32)
        padded[:, :subs] = scale
        top = np.abs(padded.reshape(len(rows), ns, Q6_SUPER)).max(-1)
        d = (top / Q6_SCALE_MAX).astype(np.float16)
        d32 = np.repeat(d.astype(np.float32), Q6_SUPER, axis=1)[:, :subs]
        with np.errstate(divide="ignore", invalid="ignore"):
            sc = np.where(d32 > 0, np.clip(np.rint(scale / d32), -Q6_SCALE_MAX, Q6_SCALE_MAX), 0.0)
        step = d32 * sc
        with np.errstate(divide="ignore", invalid="ignore"):
            q = np.where(step[..., None] != 0, np.clip(np.rint(x / step[..., None]), -32, 31), 0.0)
        u = (q + 32).astype(np.uint8).reshape(len(rows), nb, INT4_BLOCK)
        packed, qh = _pack_q6(u)
        return packed, qh, sc.astype(np.int8), d

    outputs = (np.empty((n, nb, INT4_BLOCK // 2), np.uint8), np.empty((n, nb, INT4_BLOCK // 4), np.uint8),
               np.empty((n, subs), np.int8), np.empty((n, ns), np.float16))
    return _by_slabs(w, outputs, slab)


def dequantize_q6k(packed: np.ndarray, qh: np.ndarray, sc: np.ndarray, d: np.ndarray, k: int) -> np.ndarray:
    n, nb, _ = packed.shape
    u = _unpack_q6(packed, qh).astype(np.float32).reshape(n, 2 * nb, Q6_SUB)
    step = np.repeat(d.astype(np.float32), Q6_SUPER, axis=1)[:, :2 * nb] * sc.astype(np.float32)
    return ((u - 32.0) * step[..., None]).reshape(n, nb * INT4_BLOCK)[:, :k]


def q6k_from_q6_k(raw: np.ndarray) -> tuple[np.ndarray, ...]:
    """GGUF Q6_K rows (uint8 [out, supers * 210]) as q6k's arrays, losslessly: the same 6-bit values,
    scale codes and d, only arranged differently (q6_k_from_q6k gives the bytes back)."""
    n = raw.shape[0]
    blocks = raw.reshape(n, -1, Q6_K_BYTES)
    ns = blocks.shape[1]
    ql = blocks[..., 0:128].reshape(n, ns, 2, 2, 32)      # [half, chunk c of 32 bytes, l]
    qh = blocks[..., 128:192].reshape(n, ns, 2, 1, 32)    # [half, -, l]
    sc = blocks[..., 192:208].copy().view(np.int8)
    d = blocks[..., 208:210].copy().view(np.float16)[..., 0]
    # GGUF's layout: in each half of 128 weights, weight 32t + l (t = 0..3) has its low 4 bits in byte
    # 32(t % 2) + l of the half's 64 low bytes (low nibble for t < 2, high for t >= 2) and its top 2 bits
    # in bits 2t..2t+2 of byte l of the half's 32 top bytes.
    low = np.concatenate([ql & 0x0F, ql >> 4], axis=3)    # [half, t = 2 * nibble + chunk, l]
    top = (qh >> (2 * np.arange(4, dtype=np.uint8)).reshape(1, 1, 1, 4, 1)) & 3
    u = (low | (top << 4)).astype(np.uint8).reshape(n, ns * 8, INT4_BLOCK)
    packed, bits = _pack_q6(u)
    return packed, bits, sc.reshape(n, ns * Q6_SUPER), d


def q6_k_from_q6k(packed: np.ndarray, qh: np.ndarray, sc: np.ndarray, d: np.ndarray) -> np.ndarray:
    """The GGUF Q6_K bytes of full super-blocks of q6k arrays (the inverse of q6k_from_q6_k)."""
    n, nb, _ = packed.shape
    ns = nb // 8
    u = _unpack_q6(packed, qh).reshape(n, ns, 2, 4, 32)   # [half, t, l]
    low, top = u & 0x0F, u >> 4
    ql = (low[:, :, :, 0:2] | (low[:, :, :, 2:4] << 4)).reshape(n, ns, 128)
    bits = (top[:, :, :, 0] | (top[:, :, :, 1] << 2) | (top[:, :, :, 2] << 4) | (top[:, :, :, 3] << 6))
    head = sc.reshape(n, ns, Q6_SUPER).view(np.uint8)
    tail = d.astype(np.float16)[..., None].view(np.uint8)
    return np.concatenate([ql, bits.reshape(n, ns, 64).astype(np.uint8), head, tail], axis=-1).reshape(
        n, ns * Q6_K_BYTES)
