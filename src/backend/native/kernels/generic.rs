//! Portable reference kernels: plain Rust that the compiler vectorizes for the baseline ISA.
//!
//! Every kernel a tier file (x86_64/avx2.rs, x86_64/avx512.rs, aarch64/neon.rs,
//! aarch64/dotprod.rs) provides has its twin here with the same name and signature; the tiers
//! are tested against these.

use half::f16;
use half::slice::HalfFloatSliceExt;

use super::pool::ColumnBlock;
use super::q6k::{q6_group_at, q6_group_bytes, q6_super_scale, Q6Ref};
use super::quant::{
    self, groups, lane_offset, q4_scale, q4k_group_scales_mins, Q4Ref, Q8Ref, QActs, QRow, BLOCK,
    GROUP,
};

/// Independent accumulators let the compiler keep several vector lanes busy and make the
/// sum order fixed (so results do not depend on the thread count).
const LANES: usize = 8;

// `dot_f32` walks `chunks_exact` pairs: written with computed slice offsets instead, the
// release build stopped vectorizing it and 0.5B fp32 decode fell from 10.5 to 5.9 tokens/s
// (2 threads, EPYC, 2026-11).

pub fn dot_f32(a: &[f32], b: &[f32]) -> f32 {
    let n = a.len().min(b.len());
    let (a, b) = (&a[..n], &b[..n]);
    let mut acc = [0.0f32; LANES];
    let (a_chunks, b_chunks) = (a.chunks_exact(LANES), b.chunks_exact(LANES));
    let tail: f32 = a_chunks
        .remainder()
        .iter()
        .zip(b_chunks.remainder())
        .map(|(x, y)| x * y)
        .sum();
    for (x, y) in a_chunks.zip(b_chunks) {
        for ((acc, &x), &y) in acc.iter_mut().zip(x).zip(y) {
            *acc += x * y;
        }
    }
    acc.iter().sum::<f32>() + tail
}

/// Dot product of an f16 weight row with f32 activations, widening 512 weights at a time
/// (a 2 KiB stack buffer; smaller blocks spent more time in `half`'s per-call dispatch).
pub fn dot_f16(a: &[f16], b: &[f32]) -> f32 {
    const BLOCK: usize = 512;
    let n = a.len().min(b.len());
    let mut buf = [0.0f32; BLOCK];
    let mut sum = 0.0f32;
    let mut i = 0;
    while i < n {
        let len = BLOCK.min(n - i);
        a[i..i + len].convert_to_f32_slice(&mut buf[..len]);
        sum += dot_f32(&buf[..len], &b[i..i + len]);
        i += len;
    }
    sum
}

/// f16 → f32 for a run of weights (embedding rows, prefill weight blocks).
pub fn widen_f16(src: &[f16], dst: &mut [f32]) {
    let n = src.len().min(dst.len());
    src[..n].convert_to_f32_slice(&mut dst[..n]);
}

/// `out += Σ_t p[t] · rows[t]` over the `p.len()` rows of `rows`, each `out.len()` wide: the
/// probability-weighted sum of value rows in attention. `SUM_WIDTH` outputs at a time stay
/// in a local accumulator (registers, once vectorized: every tier compiles this under its
/// features) while the rows stream past, where an `axpy` call per position (the kernel it
/// replaced) loaded and stored the output each time.
#[inline(always)]
pub fn weighted_sum(p: &[f32], rows: &[f32], out: &mut [f32]) {
    let d = out.len();
    assert!(rows.len() >= p.len() * d, "weighted_sum: too few rows");
    for (c, o) in out.chunks_mut(SUM_WIDTH).enumerate() {
        let col = c * SUM_WIDTH;
        if let Ok(o) = <&mut [f32; SUM_WIDTH]>::try_from(&mut *o) {
            let mut acc = *o;
            for (row, &pt) in rows.chunks_exact(d).zip(p) {
                for (a, &v) in acc.iter_mut().zip(&row[col..col + SUM_WIDTH]) {
                    *a += pt * v;
                }
            }
            *o = acc;
        } else {
            for (row, &pt) in rows.chunks_exact(d).zip(p) {
                for (a, &v) in o.iter_mut().zip(&row[col..]) {
                    *a += pt * v;
                }
            }
        }
    }
}

/// Outputs per pass of `weighted_sum`: a 64-wide head in one pass, 4 AVX-512, 8 AVX2 or 16
/// NEON registers.
const SUM_WIDTH: usize = 64;

/// `y += a * x` for f16 `x` (values of an f16 KV cache).
pub fn axpy_f16(a: f32, x: &[f16], y: &mut [f32]) {
    for (y, &x) in y.iter_mut().zip(x) {
        *y += a * x.to_f32();
    }
}

/// RMSNorm as transformers computes it in f32: `w * (x * rsqrt(mean(x²) + eps))`.
pub fn rmsnorm(x: &[f32], weight: &[f32], eps: f32, out: &mut [f32]) {
    let mean_sq = dot_f32(x, x) / x.len().max(1) as f32;
    let inv = 1.0 / (mean_sq + eps).sqrt();
    for ((o, &x), &w) in out.iter_mut().zip(x).zip(weight) {
        *o = w * (x * inv);
    }
}

/// SwiGLU's elementwise part: `gate = silu(gate) * up`.
#[inline(always)]
pub fn silu_mul(gate: &mut [f32], up: &[f32]) {
    for (g, &u) in gate.iter_mut().zip(up) {
        let x = *g;
        *g = x / (1.0 + exp(-x)) * u;
    }
}

/// Numerically stable softmax in place. The max and the sum run in `LANES` partial lanes and
/// the exponentials in their own loop, so all three vectorize (a loop that also carried one
/// running float sum would stay scalar: float addition is not reassociated for us). Inlined
/// so the tiers compile it under their features.
#[inline(always)]
pub fn softmax(x: &mut [f32]) {
    let mut lanes = [f32::NEG_INFINITY; LANES];
    let chunks = x.chunks_exact(LANES);
    let tail = chunks
        .remainder()
        .iter()
        .cloned()
        .fold(f32::NEG_INFINITY, f32::max);
    for c in chunks {
        for (m, &v) in lanes.iter_mut().zip(c) {
            // f32::max as a compare and select (NaN ignored the same way): this vectorizes.
            *m = if v > *m { v } else { *m };
        }
    }
    let max = lanes.iter().cloned().fold(tail, f32::max);
    for v in x.iter_mut() {
        *v = exp(*v - max);
    }
    let inv = 1.0 / sum(x);
    for v in x.iter_mut() {
        *v *= inv;
    }
}

/// `Σ x` in `LANES` partial sums (vectorizes; see `softmax`).
fn sum(x: &[f32]) -> f32 {
    let mut acc = [0.0f32; LANES];
    let chunks = x.chunks_exact(LANES);
    let tail: f32 = chunks.remainder().iter().sum();
    for c in chunks {
        for (a, &v) in acc.iter_mut().zip(c) {
            *a += v;
        }
    }
    acc.iter().sum::<f32>() + tail
}

/// Rotary embedding, "rotate half" layout: pairs (i, i + d/2) turn by the angle whose
/// cos/sin are given (d/2 values each, already scaled).
pub fn rope(x: &mut [f32], cos: &[f32], sin: &[f32]) {
    let half = x.len() / 2;
    let (lo, hi) = x.split_at_mut(half);
    for (((lo, hi), &c), &s) in lo.iter_mut().zip(hi.iter_mut()).zip(cos).zip(sin) {
        let (a, b) = (*lo, *hi);
        *lo = a * c - b * s;
        *hi = b * c + a * s;
    }
}

/// `out[i] = w[i] · x` for the `out.len()` rows of `w` (row-major, `x.len()` wide).
pub fn gemv_f32(w: &[f32], x: &[f32], out: &mut [f32]) {
    let k = x.len();
    for (o, row) in out.iter_mut().zip(w.chunks_exact(k)) {
        *o = dot_f32(row, x);
    }
}

/// `out[i] = w[i] · x` for f16 weight rows.
pub fn gemv_f16(w: &[f16], x: &[f32], out: &mut [f32]) {
    let k = x.len();
    for (o, row) in out.iter_mut().zip(w.chunks_exact(k)) {
        *o = dot_f16(row, x);
    }
}

/// Quantizes one activation row to int8 in the lane layout (quant.rs): per 32-element block
/// `scale = amax / 127`, `q = round_ties_even(x · 127 / amax)`, and the block's sum of `q`.
/// Elements past `x.len()` are zero. Every ISA computes exactly these bytes.
#[inline]
pub fn quantize_row(x: &[f32], q: &mut [i8], scales: &mut [f32], sums: &mut [i32]) {
    let nb = scales.len();
    for (first, lanes) in groups(nb) {
        let base = first * BLOCK;
        for lane in 0..lanes {
            let b = first + lane;
            let start = (b * BLOCK).min(x.len());
            let xs = &x[start..((b + 1) * BLOCK).min(x.len())];
            let (bytes, scale, sum) = match <&[f32; BLOCK]>::try_from(xs) {
                Ok(block) => quantize_block(block),
                Err(_) => {
                    let mut padded = [0.0; BLOCK];
                    padded[..xs.len()].copy_from_slice(xs);
                    quantize_block(&padded)
                }
            };
            for (step, chunk) in bytes.chunks_exact(4).enumerate() {
                let at = base + lane_offset(lanes, lane, 4 * step);
                q[at..at + 4].copy_from_slice(chunk);
            }
            scales[b] = scale;
            sums[b] = sum;
        }
    }
}

/// One block of `quantize_row`: its bytes, scale and sum, in loops the compiler vectorizes at
/// any target (the amax in `LANES` partial maxima, `round_to_int`: this function was 6.6% of
/// an int4 prefill on the AVX2 tier while it stayed scalar). NaN products (a NaN input, or
/// 0 · ∞ when 127 / amax overflows) give 0, as the saturating cast before did.
#[inline(always)]
fn quantize_block(xs: &[f32; BLOCK]) -> ([i8; BLOCK], f32, i32) {
    // max |x| with NaN as 0 (what a fold of f32::max from 0 gives), halving the block in
    // compares and selects (`maxps`): per-lane f32::max maxima stayed scalar.
    let mut m: [f32; BLOCK] =
        std::array::from_fn(|i| if xs[i].is_nan() { 0.0 } else { xs[i].abs() });
    for half in [16, 8, 4, 2, 1] {
        for i in 0..half {
            m[i] = if m[i + half] > m[i] {
                m[i + half]
            } else {
                m[i]
            };
        }
    }
    let amax = m[0];
    let (scale, inv) = if amax > 0.0 {
        (amax / 127.0, 127.0 / amax)
    } else {
        (0.0, 0.0)
    };
    let mut bytes = [0i8; BLOCK];
    let mut sum = 0i32;
    for (byte, &v) in bytes.iter_mut().zip(xs) {
        let p = v * inv;
        // Clamping before rounding is the same as after: the bounds are whole numbers.
        let p = if p.is_nan() {
            0.0
        } else {
            p.clamp(-127.0, 127.0)
        };
        let qi = round_to_int(p);
        *byte = qi as i8;
        sum += qi;
    }
    (bytes, scale, sum)
}

/// The integer dot products of one lane group of `W / 4` blocks (`W` = 16, 32, 48 or 64 bytes
/// a step): `d[b]` sums the byte products at position `b` of every step, so block `i`'s dot
/// product is the sum of `d[4i..4i + 4]`. Written as contiguous fixed-width multiply-adds of
/// i16 products (|q · x| ≤ 128 · 127 fits) so LLVM vectorizes it at the baseline ISA
/// (SSE2 `pmullw`/`paddd`, NEON `smull`/`saddw`); the lane-by-lane form with computed offsets
/// stayed scalar (1.8 tokens/s int8 decode on a 2-core EPYC).
#[inline(always)]
fn lane_dots_q8<const W: usize>(w: &[u8], x: &[i8], dots: &mut [i32; GROUP]) {
    let (w, x) = (&w[..8 * W], &x[..8 * W]);
    let mut d = [0i32; W];
    // Two steps at a time: a pair of products (|q · x| ≤ 128 · 127) still fits i16, so only
    // every other product is widened to i32.
    for (ws, xs) in w.chunks_exact(2 * W).zip(x.chunks_exact(2 * W)) {
        let (w0, w1) = ws.split_at(W);
        let (x0, x1) = xs.split_at(W);
        let pairs = w0.iter().zip(w1).zip(x0.iter().zip(x1));
        for (d, ((&w0, &w1), (&x0, &x1))) in d.iter_mut().zip(pairs) {
            let p0 = (w0 ^ 0x80) as i8 as i16 * x0 as i16;
            let p1 = (w1 ^ 0x80) as i8 as i16 * x1 as i16;
            *d += (p0 + p1) as i32;
        }
    }
    for (lane, dot) in dots.iter_mut().enumerate().take(W / 4) {
        *dot = d[4 * lane] + d[4 * lane + 1] + d[4 * lane + 2] + d[4 * lane + 3];
    }
}

/// As `lane_dots_q8` for an int4 group: chunk `t` of `W` bytes holds step `t` in its low
/// nibbles and step `t + 4` in its high ones; `(u - 8) · x` pairs fit i16 (2 · 8 · 127).
#[inline(always)]
fn lane_dots_q4<const W: usize>(w: &[u8], x: &[i8], dots: &mut [i32; GROUP]) {
    lane_dots_nibbles::<W, 8>(w, x, dots)
}

/// `lane_dots_q4` on the nibbles as they are (`u · x`, int4k's weights `u · scale − min`): its
/// pairs fit i16 too (2 · 15 · 127), and no `8 · Σx` has to be added back per block.
#[inline(always)]
fn lane_dots_u4<const W: usize>(w: &[u8], x: &[i8], dots: &mut [i32; GROUP]) {
    lane_dots_nibbles::<W, 0>(w, x, dots)
}

#[inline(always)]
fn lane_dots_nibbles<const W: usize, const OFFSET: i16>(
    w: &[u8],
    x: &[i8],
    dots: &mut [i32; GROUP],
) {
    let (w, x) = (&w[..4 * W], &x[..8 * W]);
    let mut d = [0i32; W];
    for t in 0..4 {
        let ws = &w[t * W..(t + 1) * W];
        let (xl, xh) = (&x[t * W..(t + 1) * W], &x[(t + 4) * W..(t + 5) * W]);
        for (((d, &w), &l), &h) in d.iter_mut().zip(ws).zip(xl).zip(xh) {
            let lo = (w & 0x0F) as i16 - OFFSET;
            let hi = (w >> 4) as i16 - OFFSET;
            *d += (lo * l as i16 + hi * h as i16) as i32;
        }
    }
    for (lane, dot) in dots.iter_mut().enumerate().take(W / 4) {
        *dot = d[4 * lane] + d[4 * lane + 1] + d[4 * lane + 2] + d[4 * lane + 3];
    }
}

/// Runs `$f::<W>` for a group of `$lanes` (4, 8, 12 or 16) blocks.
macro_rules! by_width {
    ($f:ident, $lanes:expr, $($arg:expr),*) => {
        match $lanes {
            16 => $f::<64>($($arg),*),
            12 => $f::<48>($($arg),*),
            8 => $f::<32>($($arg),*),
            _ => $f::<16>($($arg),*),
        }
    };
}

/// `out[i] = scale[r] · Σ_b x.scale[b] · Σ_e q[r, b, e] · x.q[b, e]` for rows
/// `r = first + i` of a repacked int8 matrix.
pub fn gemv_q8(w: Q8Ref, first: usize, x: QRow, out: &mut [f32]) {
    let nb = w.blocks();
    for (i, o) in out.iter_mut().enumerate() {
        let r = first + i;
        let row = w.row(r);
        let mut acc = [0.0f32; GROUP];
        let mut dots = [0i32; GROUP];
        for (fb, lanes) in groups(nb) {
            let at = fb * BLOCK;
            by_width!(lane_dots_q8, lanes, &row[at..], &x.q[at..], &mut dots);
            for ((acc, &d), &s) in acc.iter_mut().zip(&dots).zip(&x.scales[fb..fb + lanes]) {
                *acc += d as f32 * s;
            }
        }
        *o = acc.iter().sum::<f32>() * w.scales[r];
    }
}

/// `out[i] = Σ_b scale[r, b] · x.scale[b] · Σ_e (u[r, b, e] - 8) · x.q[b, e]` for rows
/// `r = first + i` of a repacked int4 matrix; int4k: `gemv_q4k`.
pub fn gemv_q4(w: Q4Ref, first: usize, x: QRow, out: &mut [f32]) {
    if w.kquant {
        return gemv_q4k(w, first, x, out);
    }
    let (nb, block_bytes) = (w.blocks(), w.block_bytes());
    for (i, o) in out.iter_mut().enumerate() {
        let row = w.row(first + i);
        let mut acc = [0.0f32; GROUP];
        let mut dots = [0i32; GROUP];
        for (fb, lanes) in groups(nb) {
            let at = fb * block_bytes;
            by_width!(
                lane_dots_q4,
                lanes,
                &row[at..],
                &x.q[fb * BLOCK..],
                &mut dots
            );
            for (lane, (acc, &d)) in acc.iter_mut().zip(&dots).take(lanes).enumerate() {
                let scale = q4_scale(row, fb, lanes, lane);
                *acc += d as f32 * (scale * x.scales[fb + lane]);
            }
        }
        *o = acc.iter().sum::<f32>();
    }
}

/// `out[i] = Σ_b scale[r, b] · x.scale[b] · Σ_e u[r, b, e] · x.q[b, e] − min[r, b] ·
/// x.block_sums[b]` for rows `r = first + i` of a repacked int4k matrix (scales and mins
/// decoded from its codes, `quant::q4k_scale_min`, or ahead for a prefill). Its own loop, not
/// a branch per block in `gemv_q4`'s: with the `8 · Σx` it added back to each block's dot
/// product, the generic tier's int4k decode ran at 0.93–0.96× int4's.
fn gemv_q4k(w: Q4Ref, first: usize, x: QRow, out: &mut [f32]) {
    let (nb, block_bytes) = (w.blocks(), w.block_bytes());
    for (i, o) in out.iter_mut().enumerate() {
        let row = w.row(first + i);
        // A prefill's int4k scales and mins, decoded ahead (`Q4Ref::decoded`).
        let decoded = w.decoded.map(|d| d.row(first + i));
        let mut acc = [0.0f32; GROUP];
        let mut dots = [0i32; GROUP];
        let (mut scales, mut mins) = ([0.0f32; GROUP], [0.0f32; GROUP]);
        for (fb, lanes) in groups(nb) {
            let at = fb * block_bytes;
            by_width!(
                lane_dots_u4,
                lanes,
                &row[at..],
                &x.q[fb * BLOCK..],
                &mut dots
            );
            if let Some((s, m)) = decoded {
                scales[..lanes].copy_from_slice(&s[fb..fb + lanes]);
                mins[..lanes].copy_from_slice(&m[fb..fb + lanes]);
            } else {
                q4k_group_scales_mins(row, fb, lanes, &mut scales, &mut mins);
            }
            let xs = &x.scales[fb..fb + lanes];
            let sums = &x.block_sums[fb..fb + lanes];
            for ((((acc, &d), (&scale, &min)), &xs), &sum) in acc
                .iter_mut()
                .zip(&dots)
                .zip(scales.iter().zip(&mins))
                .zip(xs)
                .zip(sums)
            {
                *acc += d as f32 * (scale * xs);
                *acc -= min * sum;
            }
        }
        *o = acc.iter().sum::<f32>();
    }
}

/// `out[i] = Σ_b x.scale[b] · d · Σ_h sc[r, b, h] · Σ_e (u[r, b, e] − 32) · x.q[b, e]` for
/// rows `r = first + i` of a repacked q6k matrix (`h` the block's two sub-blocks of 16, `e`
/// their elements). The integer sums take `u` as it is and subtract `32 · Σx` per sub-block,
/// as the SIMD tiers do.
pub fn gemv_q6(w: Q6Ref, first: usize, x: QRow, out: &mut [f32]) {
    let nb = w.blocks();
    for (i, o) in out.iter_mut().enumerate() {
        let row = w.row(first + i);
        let mut acc = [0.0f32; GROUP];
        let mut dots = [[0i32; GROUP]; 2];
        for (fb, lanes) in groups(nb) {
            let group = &row[q6_group_at(fb)..][..q6_group_bytes(lanes)];
            let xq = &x.q[fb * BLOCK..(fb + lanes) * BLOCK];
            by_width!(lane_dots_q6, lanes, group, xq, &mut dots);
            for (lane, acc) in acc.iter_mut().enumerate().take(lanes) {
                let b = fb + lane;
                let halves = quant::half_sums(x.half_sums[b]);
                let mut sum = 0i32;
                for h in 0..2 {
                    let code = group[24 * lanes + 2 * lane + h] as i8;
                    sum += code as i32 * (dots[h][lane] - 32 * halves[h]);
                }
                let d = q6_super_scale(group, lanes, lane / 8);
                *acc += sum as f32 * (d * x.scales[b]);
            }
        }
        *o = acc.iter().sum::<f32>();
    }
}

/// Each lane's `Σ u · x` over a q6k group's first sub-blocks (steps 0–3, `dots[0]`) and its
/// second ones (steps 4–7, `dots[1]`), `W` = 4 · lanes bytes a step: written a step's bytes
/// at a time so that it vectorizes (a lane at a time it decoded at a fifth of int8's bytes per
/// second).
#[inline(always)]
fn lane_dots_q6<const W: usize>(group: &[u8], x: &[i8], dots: &mut [[i32; GROUP]; 2]) {
    let (nibbles, tops, x) = (&group[..4 * W], &group[4 * W..6 * W], &x[..8 * W]);
    let mut d = [[0i32; W]; 2];
    for t in 0..4 {
        let (ns, ts) = (
            &nibbles[t * W..(t + 1) * W],
            &tops[(t / 2) * W..(t / 2 + 1) * W],
        );
        let (xl, xh) = (&x[t * W..(t + 1) * W], &x[(t + 4) * W..(t + 5) * W]);
        let shift = 4 * (t % 2);
        let [d0, d1] = &mut d;
        for ((((d0, d1), (&n, &top)), &l), &h) in d0
            .iter_mut()
            .zip(d1.iter_mut())
            .zip(ns.iter().zip(ts))
            .zip(xl)
            .zip(xh)
        {
            let top = top >> shift;
            let first = (n & 15) | (top & 3) << 4;
            let second = (n >> 4) | (top >> 2 & 3) << 4;
            *d0 += (first as i16 * l as i16) as i32;
            *d1 += (second as i16 * h as i16) as i32;
        }
    }
    for (h, dots) in dots.iter_mut().enumerate() {
        for (lane, dot) in dots.iter_mut().enumerate().take(W / 4) {
            *dot = d[h][4 * lane..4 * lane + 4].iter().sum();
        }
    }
}

/// Prefill product with int8 weights: rows `out.start..out.end` of `w` times every
/// quantized activation row, into `out` (row `i` of `out` ↔ activation row `i`).
pub fn gemm_q8(w: Q8Ref, acts: &QActs, out: &mut ColumnBlock<'_>) {
    let start = out.start;
    for i in 0..acts.rows {
        gemv_q8(w, start, acts.row(i), out.row(i));
    }
}

/// Prefill product with int4 weights, as `gemm_q8`.
pub fn gemm_q4(w: Q4Ref, acts: &QActs, out: &mut ColumnBlock<'_>) {
    let start = out.start;
    for i in 0..acts.rows {
        gemv_q4(w, start, acts.row(i), out.row(i));
    }
}

/// Prefill product with q6k weights, as `gemm_q8`.
pub fn gemm_q6(w: Q6Ref, acts: &QActs, out: &mut ColumnBlock<'_>) {
    let start = out.start;
    for i in 0..acts.rows {
        gemv_q6(w, start, acts.row(i), out.row(i));
    }
}

/// 1.5 · 2²³: for |x| < 2²², `x + ROUND_MAGIC` lies in [2²³, 2²⁴) where one unit of the last
/// place is 1, so the default rounding mode (to nearest, ties to even) rounds x, and the
/// integer is `(x + ROUND_MAGIC).to_bits() - ROUND_MAGIC.to_bits()`. Unlike
/// `f32::round_ties_even` (libm's `rintf` per element on baseline x86-64) followed by an `as`
/// cast (saturating, NaN to 0), this vectorizes.
const ROUND_MAGIC: f32 = 12_582_912.0;

/// The whole number nearest `x` (ties to even) as an integer, for |x| < 2²² (ROUND_MAGIC).
#[inline(always)]
fn round_to_int(x: f32) -> i32 {
    (x + ROUND_MAGIC)
        .to_bits()
        .wrapping_sub(ROUND_MAGIC.to_bits()) as i32
}

/// `e^x` for f32 without libm, in straight-line code the compiler vectorizes: `x = n ln2 + r`
/// with `|r| ≤ ln2 / 2` (Cody–Waite split of ln 2), a degree-6 Taylor polynomial for `e^r`
/// (relative error below 2e-7), and `2^n` built in the exponent bits. Below -87.3 (where
/// e^x leaves the normal range; softmax's masked -inf) the result is 0; inputs are capped at
/// 88 (e^88 ≈ 1.7e38) instead of overflowing.
///
/// `n` is rounded with `round_to_int` (|c · log2 e| ≤ 127): with `f32::round_ties_even` and an
/// `as` cast this loop stayed scalar and SiLU took 6% of an int4 prefill (Xeon, `perf`).
#[inline(always)]
pub fn exp(x: f32) -> f32 {
    const LN2_HI: f32 = 0.693_359_4;
    const LN2_LO: f32 = -2.121_944_4e-4;
    let c = x.clamp(-87.3, 88.0);
    let n_int = round_to_int(c * std::f32::consts::LOG2_E);
    let n = n_int as f32;
    let r = (c - n * LN2_HI) - n * LN2_LO;
    let p = 1.0 / 720.0;
    let p = p * r + 1.0 / 120.0;
    let p = p * r + 1.0 / 24.0;
    let p = p * r + 1.0 / 6.0;
    let p = p * r + 0.5;
    let p = p * r + 1.0;
    let p = p * r + 1.0;
    let scale = f32::from_bits((n_int.wrapping_add(127) as u32) << 23);
    if x < -87.3 {
        0.0
    } else {
        p * scale
    }
}

/// `out[i, j] = Σ_k x[i, k] · w[j, k]` for `m` rows of `x` ([m, k]) and the `n` rows of `w`
/// ([n, k], a Linear weight as stored) that make up `out`'s column block. Runs on the
/// calling thread: the pool splits a product into column blocks (kernels::Kernels::linear).
pub fn gemm_xwt(x: &[f32], m: usize, k: usize, w: &[f32], out: &mut ColumnBlock<'_>) {
    let n = out.end - out.start;
    if m == 0 || n == 0 {
        return;
    }
    assert!(x.len() >= m * k, "gemm: x too short");
    assert!(w.len() >= n * k, "gemm: w too short");
    assert!(out.rows >= m, "gemm: out has too few rows");
    let stride = out.stride as isize;
    let dst = out.as_mut_ptr();
    // SAFETY: `gemm` takes raw pointers and strides. The asserts above keep every element it
    // reads inside x (i*k + kk, i < m, kk < k) and w (j*k + kk, j < n); it writes
    // dst + i*stride + j for i < m, j < n: exactly the column block's cells, which no other
    // task touches (ColumnBlock's contract). read_dst = false: old contents are never read.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            dst,
            1,
            stride,
            false,
            x.as_ptr(),
            1,
            k as isize,
            w.as_ptr(),
            k as isize,
            1,
            0.0f32,
            1.0f32,
            false,
            false,
            false,
            gemm::Parallelism::None,
        );
    }
}

/// `out[i * out_stride + j] = scale · Σ_kk q[i * q_stride + kk] · keys[j * k + kk]` for
/// `i < m`, `j < n`: the attention scores of `m` query heads that share one key head, with the
/// `n` cached keys (rows of `k`) read once for all of them rather than once per head.
#[allow(clippy::too_many_arguments)]
pub fn grouped_scores(
    q: &[f32],
    q_stride: usize,
    m: usize,
    keys: &[f32],
    n: usize,
    k: usize,
    scale: f32,
    out: &mut [f32],
    out_stride: usize,
) {
    let q = Strided::new(q, q_stride, 1);
    // Element (kk, j) of the right operand is key j's kk-th value.
    let keys = Strided::new(keys, 1, k);
    strided_product(m, n, k, q, keys, scale, out, out_stride);
}

/// The operand checks of the tiers' own `grouped_scores`: panics on a slice too short for its
/// shape; false when there is nothing to compute.
#[allow(clippy::too_many_arguments)]
#[cfg(any(target_arch = "x86_64", target_arch = "aarch64"))]
pub(crate) fn grouped_scores_operands(
    q: &[f32],
    q_stride: usize,
    m: usize,
    keys: &[f32],
    n: usize,
    k: usize,
    out: &[f32],
    out_stride: usize,
) -> bool {
    if m == 0 || n == 0 {
        return false;
    }
    assert!(
        q.len() >= (m - 1) * q_stride + k && keys.len() >= n * k,
        "grouped_scores: an operand is too short"
    );
    assert!(
        out_stride >= n && out.len() >= (m - 1) * out_stride + n,
        "grouped_scores: out too short"
    );
    true
}

/// `a · b + c`, one rounding where `FUSED`.
#[inline(always)]
fn madd<const FUSED: bool>(a: f32, b: f32, c: f32) -> f32 {
    if FUSED {
        a.mul_add(b, c)
    } else {
        a * b + c
    }
}

/// `out[i * out_stride + j] = Σ_t p[i * p_stride + t] · values[t * k + j]` for `i < m`,
/// `j < k`: the attention outputs of `m` query heads that share one value head (`n` cached
/// values of `k`). Up to `MIX_HEADS` heads × `W` columns of outputs stay in registers while
/// the values stream past once: `W` is the tier's choice (64 on AVX-512: 7 heads × 4
/// vectors of accumulators leave 4 of the 32 registers for the values).
#[allow(clippy::too_many_arguments)]
#[inline(always)]
pub fn grouped_mix(
    p: &[f32],
    p_stride: usize,
    m: usize,
    values: &[f32],
    n: usize,
    k: usize,
    out: &mut [f32],
    out_stride: usize,
) {
    grouped_mix_with::<false, 8>(p, p_stride, m, values, n, k, out, out_stride)
}

/// Query heads whose outputs `grouped_mix` accumulates together (Qwen2 groups 6 or 7 query
/// heads per key/value head up to 7B; 3B's 8 take two passes).
const MIX_HEADS: usize = 7;

/// `grouped_mix` with `W` output columns per pass and fused multiply-adds where `FUSED`.
#[allow(clippy::too_many_arguments)]
#[inline(always)]
pub(crate) fn grouped_mix_with<const FUSED: bool, const W: usize>(
    p: &[f32],
    p_stride: usize,
    m: usize,
    values: &[f32],
    n: usize,
    k: usize,
    out: &mut [f32],
    out_stride: usize,
) {
    if m == 0 || k == 0 {
        return;
    }
    assert!(
        (n == 0 || p.len() >= (m - 1) * p_stride + n) && values.len() >= n * k,
        "grouped_mix: an operand is too short"
    );
    assert!(
        out_stride >= k && out.len() >= (m - 1) * out_stride + k,
        "grouped_mix: out too short"
    );
    let mix = MixOperands {
        p,
        p_stride,
        values: &values[..n * k],
        k,
    };
    let mut col = 0;
    while col < k {
        let width = W.min(k - col);
        let mut first = 0;
        while first < m {
            let heads = (m - first).min(MIX_HEADS);
            let out = &mut out[first * out_stride..];
            if width < W {
                mix.columns_tail::<FUSED>(first, heads, col, width, out, out_stride);
                first += heads;
                continue;
            }
            // One instance per head count, so each keeps its accumulators in registers.
            match heads {
                1 => mix.columns::<FUSED, W, 1>(first, col, out, out_stride),
                2 => mix.columns::<FUSED, W, 2>(first, col, out, out_stride),
                3 => mix.columns::<FUSED, W, 3>(first, col, out, out_stride),
                4 => mix.columns::<FUSED, W, 4>(first, col, out, out_stride),
                5 => mix.columns::<FUSED, W, 5>(first, col, out, out_stride),
                6 => mix.columns::<FUSED, W, 6>(first, col, out, out_stride),
                _ => mix.columns::<FUSED, W, MIX_HEADS>(first, col, out, out_stride),
            }
            first += heads;
        }
        col += width;
    }
}

/// The inputs of `grouped_mix`, checked against each other by it.
struct MixOperands<'a> {
    p: &'a [f32],
    p_stride: usize,
    /// `n` rows of `k`.
    values: &'a [f32],
    k: usize,
}

impl MixOperands<'_> {
    /// Columns `col..col + W` of heads `first..first + H` into `out`'s rows `0..H`.
    #[inline(always)]
    fn columns<const FUSED: bool, const W: usize, const H: usize>(
        &self,
        first: usize,
        col: usize,
        out: &mut [f32],
        out_stride: usize,
    ) {
        let mut acc = [[0.0f32; W]; H];
        for (t, row) in self.values.chunks_exact(self.k).enumerate() {
            let v = &row[col..col + W];
            for (h, acc) in acc.iter_mut().enumerate() {
                let weight = self.p[(first + h) * self.p_stride + t];
                for (a, &x) in acc.iter_mut().zip(v) {
                    *a = madd::<FUSED>(weight, x, *a);
                }
            }
        }
        for (h, acc) in acc.iter().enumerate() {
            out[h * out_stride + col..][..W].copy_from_slice(acc);
        }
    }

    /// The last `width` (< W) columns: the same sums, accumulated in `out`.
    fn columns_tail<const FUSED: bool>(
        &self,
        first: usize,
        heads: usize,
        col: usize,
        width: usize,
        out: &mut [f32],
        out_stride: usize,
    ) {
        for h in 0..heads {
            let o = &mut out[h * out_stride + col..][..width];
            o.fill(0.0);
            for (t, row) in self.values.chunks_exact(self.k).enumerate() {
                let weight = self.p[(first + h) * self.p_stride + t];
                for (a, &x) in o.iter_mut().zip(&row[col..col + width]) {
                    *a = madd::<FUSED>(weight, x, *a);
                }
            }
        }
    }
}

/// A matrix operand in a slice: element `(i, j)` at `data[i * row + j * col]`.
struct Strided<'a> {
    data: &'a [f32],
    row: usize,
    col: usize,
}

impl<'a> Strided<'a> {
    fn new(data: &'a [f32], row: usize, col: usize) -> Self {
        Self { data, row, col }
    }

    /// Whether every element of a `rows` × `cols` matrix lies inside `data`.
    fn holds(&self, rows: usize, cols: usize) -> bool {
        rows == 0 || cols == 0 || (rows - 1) * self.row + (cols - 1) * self.col < self.data.len()
    }
}

/// `out[i * out_row + j] = scale · Σ_t a(i, t) · b(t, j)` for `i < m`, `j < n`, `t < k`,
/// on the calling thread (the pool splits the work above it).
#[allow(clippy::too_many_arguments)]
fn strided_product(
    m: usize,
    n: usize,
    k: usize,
    a: Strided,
    b: Strided,
    scale: f32,
    out: &mut [f32],
    out_row: usize,
) {
    if m == 0 || n == 0 {
        return;
    }
    assert!(
        a.holds(m, k) && b.holds(k, n),
        "product: an operand is too short"
    );
    assert!(
        out_row >= n && out.len() >= (m - 1) * out_row + n,
        "product: out too short"
    );
    if k == 0 {
        for row in out.chunks_mut(out_row).take(m) {
            row[..n].fill(0.0);
        }
        return;
    }
    // SAFETY: `gemm` takes raw pointers and strides. By the asserts it reads a's (i, t) and
    // b's (t, j) elements inside their slices and writes out[i * out_row + j] (j < n <=
    // out_row: no two cells alias) inside `out`, which is borrowed exclusively for the call.
    // read_dst = false: old contents are never read.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            out.as_mut_ptr(),
            1,
            out_row as isize,
            false,
            a.data.as_ptr(),
            a.col as isize,
            a.row as isize,
            b.data.as_ptr(),
            b.col as isize,
            b.row as isize,
            0.0f32,
            scale,
            false,
            false,
            false,
            gemm::Parallelism::None,
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grouped_attention_products_match_naive_loops() {
        let (m, n, k, stride) = (3, 11, 8, 16);
        let q: Vec<f32> = (0..m * k).map(|i| (i % 7) as f32 * 0.25 - 0.5).collect();
        let keys: Vec<f32> = (0..n * k).map(|i| (i % 5) as f32 * 0.5 - 1.0).collect();
        let mut scores = vec![f32::NAN; (m - 1) * stride + n];
        grouped_scores(&q, k, m, &keys, n, k, 0.5, &mut scores, stride);
        let mut out = vec![0.0; (m - 1) * 2 * k + k];
        grouped_mix(&scores, stride, m, &keys, n, k, &mut out, 2 * k);
        for i in 0..m {
            for j in 0..n {
                let want: f32 = (0..k).map(|t| q[i * k + t] * keys[j * k + t]).sum::<f32>() * 0.5;
                assert!(
                    (scores[i * stride + j] - want).abs() < 1e-5,
                    "score {i} {j}"
                );
            }
            for j in 0..k {
                let want: f32 = (0..n)
                    .map(|t| scores[i * stride + t] * keys[t * k + j])
                    .sum();
                assert!((out[i * 2 * k + j] - want).abs() < 1e-4, "mix {i} {j}");
            }
        }
    }

    #[test]
    fn dot_matches_naive() {
        let a: Vec<f32> = (0..37).map(|i| i as f32 * 0.5 - 3.0).collect();
        let b: Vec<f32> = (0..37).map(|i| (i as f32).sin()).collect();
        let naive: f32 = a.iter().zip(&b).map(|(x, y)| x * y).sum();
        assert!((dot_f32(&a, &b) - naive).abs() < 1e-4);
        let a16: Vec<f16> = a.iter().map(|&x| f16::from_f32(x)).collect();
        assert!((dot_f16(&a16, &b) - naive).abs() < 1e-2);
    }

    #[test]
    fn gemm_matches_naive() {
        let (m, k, n) = (5, 7, 3);
        let x: Vec<f32> = (0..m * k).map(|i| (i as f32 * 0.37).cos()).collect();
        let w: Vec<f32> = (0..n * k).map(|i| (i as f32 * 0.11).sin()).collect();
        let stride = n + 2;
        let mut out = vec![-9.0f32; (m - 1) * stride + n];
        let pool = super::super::pool::Pool::new(2).unwrap();
        pool.for_column_blocks(
            &mut out,
            m,
            stride,
            n,
            2,
            (&mut [0u8; 0][..], 0),
            &|c, _| gemm_xwt(&x, m, k, &w[c.start * k..c.end * k], c),
        );
        for i in 0..m {
            for j in 0..n {
                let want = dot_f32(&x[i * k..][..k], &w[j * k..][..k]);
                assert!((out[i * stride + j] - want).abs() < 1e-5);
            }
        }
        assert_eq!(out[n], -9.0); // padding between rows untouched
    }

    #[test]
    fn rope_rotates_pairs() {
        let mut x = vec![1.0, 2.0, 3.0, 4.0];
        rope(&mut x, &[0.0, 1.0], &[1.0, 0.0]);
        assert_eq!(x, vec![-3.0, 2.0, 1.0, 4.0]);
    }

    /// The exponent read from the rounding sum's bits is the saturating cast it replaced:
    /// every input that reaches the scale (clamped to [-87.3, 88]) and the edges give the
    /// same bits, and the result stays within the polynomial's error of `f32::exp`.
    #[test]
    fn exp_rounds_like_a_cast_and_tracks_libm() {
        fn with_cast(x: f32) -> f32 {
            let c = x.clamp(-87.3, 88.0);
            let n = (c * std::f32::consts::LOG2_E).round_ties_even();
            let r = (c - n * 0.693_359_4) - n * -2.121_944_4e-4;
            let p = [1.0 / 120.0, 1.0 / 24.0, 1.0 / 6.0, 0.5, 1.0, 1.0]
                .iter()
                .fold(1.0 / 720.0, |p, &k| p * r + k);
            let scale = f32::from_bits(((n as i32 + 127) as u32) << 23);
            if x < -87.3 {
                0.0
            } else {
                p * scale
            }
        }
        let edges = [-87.3, -87.29, 88.0, 88.5, -1e30, 1e30, 0.0, -0.0, 0.5, -0.5];
        let sweep = (-200_000..=200_000).map(|i| i as f32 * 4.5e-4);
        for x in sweep.chain(edges) {
            assert_eq!(exp(x).to_bits(), with_cast(x).to_bits(), "e^{x}");
            if (-87.0..88.0).contains(&x) {
                let want = x.exp();
                assert!(
                    (exp(x) - want).abs() <= 4e-7 * want,
                    "e^{x}: {} vs {want}",
                    exp(x)
                );
            }
        }
        assert_eq!(exp(f32::NEG_INFINITY), 0.0);
        assert_eq!(exp(f32::INFINITY), with_cast(f32::INFINITY));
        assert!(exp(f32::NAN).is_nan());
    }

    /// The vectorizing block quantizer gives the bytes of the scalar code it replaced (a
    /// rounded, clamped, saturating cast per element) on random rows, short tails and the
    /// special values: NaN, infinities, a subnormal maximum (127 / amax overflows), zeros.
    #[test]
    fn quantize_row_matches_the_scalar_formulation() {
        fn scalar(x: &[f32], q: &mut [i8], scales: &mut [f32], sums: &mut [i32]) {
            let nb = scales.len();
            for (first, lanes) in groups(nb) {
                for lane in 0..lanes {
                    let b = first + lane;
                    let xs = &x[(b * BLOCK).min(x.len())..((b + 1) * BLOCK).min(x.len())];
                    let amax = xs.iter().fold(0.0f32, |m, v| m.max(v.abs()));
                    let inv = if amax > 0.0 { 127.0 / amax } else { 0.0 };
                    scales[b] = if amax > 0.0 { amax / 127.0 } else { 0.0 };
                    sums[b] = 0;
                    for e in 0..BLOCK {
                        let v = xs.get(e).copied().unwrap_or(0.0);
                        let qi = (v * inv).round_ties_even().clamp(-127.0, 127.0) as i32;
                        q[first * BLOCK + lane_offset(lanes, lane, e)] = qi as i8;
                        sums[b] += qi;
                    }
                }
            }
        }
        let mut rows: Vec<Vec<f32>> = [896, 37, 32, 1, 600]
            .iter()
            .map(|&n| {
                (0..n)
                    .map(|i| ((i * 7919 % 1000) as f32 - 500.0) * 0.013)
                    .collect()
            })
            .collect();
        let mut special: Vec<f32> = (0..128).map(|i| (i as f32 * 0.37).sin() * 9.0).collect();
        special[3] = f32::NAN;
        special[40] = f32::INFINITY;
        special[41] = f32::NEG_INFINITY;
        special[64..96].fill(0.0);
        special[96..128].fill(1e-40);
        special[100] = -2e-40;
        rows.push(special);
        for x in rows {
            let nb = x.len().div_ceil(BLOCK);
            let (mut q, mut s, mut z) = (vec![0i8; nb * BLOCK], vec![0.0; nb], vec![0; nb]);
            let (mut q2, mut s2, mut z2) = (q.clone(), s.clone(), z.clone());
            quantize_row(&x, &mut q, &mut s, &mut z);
            scalar(&x, &mut q2, &mut s2, &mut z2);
            assert_eq!((q, z), (q2, z2), "n = {}", x.len());
            let bits = |s: &[f32]| s.iter().map(|s| s.to_bits()).collect::<Vec<_>>();
            assert_eq!(bits(&s), bits(&s2), "n = {}", x.len());
        }
    }

    #[test]
    fn softmax_and_norm() {
        let mut x = vec![1.0, 1.0, f32::NEG_INFINITY];
        softmax(&mut x);
        assert_eq!(x, vec![0.5, 0.5, 0.0]);
        let mut out = vec![0.0; 2];
        rmsnorm(&[3.0, 4.0], &[1.0, 2.0], 0.0, &mut out);
        let inv = 1.0 / 12.5f32.sqrt();
        assert!((out[0] - 3.0 * inv).abs() < 1e-6 && (out[1] - 8.0 * inv).abs() < 1e-6);
    }
}
