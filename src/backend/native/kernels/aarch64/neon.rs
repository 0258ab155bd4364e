//! The `neon` tier: Armv8.0 Advanced SIMD, for cores without the dot product (Cortex-A53/A57/
//! A72: Raspberry Pi 3/4, Jetson Nano/TX2). Its float, f16 and elementwise kernels serve the
//! `neon-dotprod` tier too.
//!
//! The elementwise kernels (RMSNorm, RoPE, SiLU·mul, softmax, activation quantization) are
//! the generic code compiled here: NEON is part of the aarch64 baseline, and LLVM vectorizes
//! that code to 128-bit NEON (`fmla`, `frintn`, `fmaxnm`); hand-written intrinsics would add
//! code without removing instructions.

use super::*;
use crate::backend::native::kernels::{complete_tier, Kernels};
type T = Neon;

pub static TABLE: Kernels = complete_tier!("neon");
/// f32 prefill products: the `gemm` crate, which picks its NEON microkernels itself.
pub use generic::gemm_xwt;

safe!(T, gemv_q8 => gemv_q8_imp(w: Q8Ref, first: usize, x: QRow, out: &mut [f32]));
safe!(T, gemv_q4 => gemv_q4_imp(w: Q4Ref, first: usize, x: QRow, out: &mut [f32]));
safe!(T, gemm_q8 => gemm_q8_imp(w: Q8Ref, acts: &QActs, out: &mut ColumnBlock<'_>));
safe!(T, gemm_q4 => gemm_q4_imp(w: Q4Ref, acts: &QActs, out: &mut ColumnBlock<'_>));
safe!(T, gemv_q6 => gemv_q6_imp(w: Q6Ref, first: usize, x: QRow, out: &mut [f32]));
safe!(T, gemm_q6 => gemm_q6_imp(w: Q6Ref, acts: &QActs, out: &mut ColumnBlock<'_>));
safe!(T, gemv_f32 => gemv_f32_imp(w: &[f32], x: &[f32], out: &mut [f32]));
safe!(T, gemv_f16 => gemv_f16_imp(w: &[f16], x: &[f32], out: &mut [f32]));
safe!(T, dot_f32 => dot_f32_imp(a: &[f32], b: &[f32]) -> f32);
safe!(T, axpy_f16 => axpy_f16_imp(a: f32, x: &[f16], y: &mut [f32]));
safe!(T, weighted_sum => weighted_sum_imp(p: &[f32], rows: &[f32], out: &mut [f32]));
safe!(T, grouped_scores => grouped_scores_imp(q: &[f32], qs: usize, m: usize, keys: &[f32], n: usize, k: usize, scale: f32, out: &mut [f32], os: usize));
safe!(T, grouped_mix => grouped_mix_imp(p: &[f32], ps: usize, m: usize, values: &[f32], n: usize, k: usize, out: &mut [f32], os: usize));
safe!(T, widen_f16 => widen_f16_imp(src: &[f16], dst: &mut [f32]));
safe!(T, rmsnorm => rmsnorm_imp(x: &[f32], w: &[f32], eps: f32, out: &mut [f32]));
safe!(T, rope => rope_imp(x: &mut [f32], cos: &[f32], sin: &[f32]));
safe!(T, silu_mul => silu_mul_imp(gate: &mut [f32], up: &[f32]));
safe!(T, softmax => softmax_imp(x: &mut [f32]));
safe!(T, quantize_row => quantize_row_imp(x: &[f32], q: &mut [i8], s: &mut [f32], z: &mut [i32]));

/// `acc += a · b` per 32-bit lane, as `sdot` computes it, in Armv8.0 instructions: widening
/// multiplies of each half (`smull`, `smull2`: 16 i16 products), `addp` sums adjacent pairs
/// (≤ 2 · 128 · 127, no overflow) and `sadalp` adds adjacent pairs of those into the lanes.
#[target_feature(enable = "neon")]
#[inline]
fn dot4(acc: int32x4_t, a: int8x16_t, b: int8x16_t) -> int32x4_t {
    let lo = vmull_s8(vget_low_s8(a), vget_low_s8(b));
    let hi = vmull_high_s8(a, b);
    vpadalq_s16(acc, vpaddq_s16(lo, hi))
}

quantized_kernels!(dot4, "neon");

#[target_feature(enable = "neon")]
unsafe fn dot_f32_imp(a: &[f32], b: &[f32]) -> f32 {
    let n = a.len().min(b.len());
    let (pa, pb) = (a.as_ptr(), b.as_ptr());
    let mut acc = [vdupq_n_f32(0.0); 4];
    let mut i = 0;
    // SAFETY: loads read floats i..i+4 ≤ n; the tail goes through the generic code.
    unsafe {
        while i + 16 <= n {
            for (j, acc) in acc.iter_mut().enumerate() {
                let o = i + 4 * j;
                *acc = vfmaq_f32(*acc, vld1q_f32(pa.add(o)), vld1q_f32(pb.add(o)));
            }
            i += 16;
        }
        while i + 4 <= n {
            acc[0] = vfmaq_f32(acc[0], vld1q_f32(pa.add(i)), vld1q_f32(pb.add(i)));
            i += 4;
        }
    }
    let s = vaddq_f32(vaddq_f32(acc[0], acc[1]), vaddq_f32(acc[2], acc[3]));
    vaddvq_f32(s) + generic::dot_f32(&a[i..n], &b[i..n])
}

#[target_feature(enable = "neon")]
unsafe fn gemv_f32_imp(w: &[f32], x: &[f32], out: &mut [f32]) {
    let k = x.len();
    assert!(w.len() >= out.len() * k);
    for (o, row) in out.iter_mut().zip(w.chunks_exact(k)) {
        // SAFETY: same features as this function.
        *o = unsafe { dot_f32_imp(row, x) };
    }
}

#[target_feature(enable = "neon")]
unsafe fn gemv_f16_imp(w: &[f16], x: &[f32], out: &mut [f32]) {
    let k = x.len();
    assert!(w.len() >= out.len() * k);
    for (o, row) in out.iter_mut().zip(w.chunks_exact(k)) {
        let (pw, px) = (row.as_ptr() as *const u16, x.as_ptr());
        let mut acc = [vdupq_n_f32(0.0); 2];
        let mut i = 0;
        // SAFETY: loads read elements i..i+8 ≤ k of the row and of x; the tail is scalar.
        unsafe {
            while i + 8 <= k {
                let h = vld1q_u16(pw.add(i));
                let (lo, hi) = (widen_f16x4(vget_low_u16(h)), widen_f16x4(vget_high_u16(h)));
                acc[0] = vfmaq_f32(acc[0], lo, vld1q_f32(px.add(i)));
                acc[1] = vfmaq_f32(acc[1], hi, vld1q_f32(px.add(i + 4)));
                i += 8;
            }
        }
        let tail: f32 = row[i..k]
            .iter()
            .zip(&x[i..k])
            .map(|(w, x)| w.to_f32() * x)
            .sum();
        *o = vaddvq_f32(vaddq_f32(acc[0], acc[1])) + tail;
    }
}

#[target_feature(enable = "neon")]
unsafe fn axpy_f16_imp(a: f32, x: &[f16], y: &mut [f32]) {
    let n = x.len().min(y.len());
    let av = vdupq_n_f32(a);
    let (px, py) = (x.as_ptr() as *const u16, y.as_mut_ptr());
    let mut i = 0;
    // SAFETY: elements i..i+4 ≤ n; the tail goes through the generic code.
    unsafe {
        while i + 4 <= n {
            let xv = widen_f16x4(vld1_u16(px.add(i)));
            vst1q_f32(py.add(i), vfmaq_f32(vld1q_f32(py.add(i)), av, xv));
            i += 4;
        }
    }
    generic::axpy_f16(a, &x[i..n], &mut y[i..n]);
}

#[target_feature(enable = "neon")]
unsafe fn widen_f16_imp(src: &[f16], dst: &mut [f32]) {
    let n = src.len().min(dst.len());
    let (ps, pd) = (src.as_ptr() as *const u16, dst.as_mut_ptr());
    let mut i = 0;
    // SAFETY: elements i..i+4 ≤ n; the tail goes through the generic code.
    unsafe {
        while i + 4 <= n {
            vst1q_f32(pd.add(i), widen_f16x4(vld1_u16(ps.add(i))));
            i += 4;
        }
    }
    generic::widen_f16(&src[i..n], &mut dst[i..n]);
}

/// The generic loop under this tier's features: its 64-wide accumulator becomes registers.
#[target_feature(enable = "neon")]
unsafe fn weighted_sum_imp(p: &[f32], rows: &[f32], out: &mut [f32]) {
    generic::weighted_sum(p, rows, out)
}

#[target_feature(enable = "neon")]
unsafe fn rmsnorm_imp(x: &[f32], w: &[f32], eps: f32, out: &mut [f32]) {
    generic::rmsnorm(x, w, eps, out)
}

#[target_feature(enable = "neon")]
unsafe fn rope_imp(x: &mut [f32], cos: &[f32], sin: &[f32]) {
    generic::rope(x, cos, sin)
}

#[target_feature(enable = "neon")]
unsafe fn silu_mul_imp(gate: &mut [f32], up: &[f32]) {
    generic::silu_mul(gate, up)
}

#[target_feature(enable = "neon")]
unsafe fn softmax_imp(x: &mut [f32]) {
    generic::softmax(x)
}

#[target_feature(enable = "neon")]
unsafe fn quantize_row_imp(x: &[f32], q: &mut [i8], s: &mut [f32], z: &mut [i32]) {
    generic::quantize_row(x, q, s, z)
}

/// `generic::grouped_scores` without the `gemm` crate, whose product packed the keys anew for
/// every query row: as the x86 tiers' (avx512.rs), in blocks of 8 keys whose 8 dot products per
/// head (8 accumulators: two FMA pipes of 4-cycle latency) are summed by pairwise adds. Head
/// widths that are not a multiple of 4 take the generic product.
#[target_feature(enable = "neon")]
#[allow(clippy::too_many_arguments)]
unsafe fn grouped_scores_imp(
    q: &[f32],
    qs: usize,
    m: usize,
    keys: &[f32],
    n: usize,
    k: usize,
    scale: f32,
    out: &mut [f32],
    os: usize,
) {
    // SAFETY: each arm has the same target features as this function.
    unsafe {
        match k {
            64 => grouped_scores_chunks::<16>(q, qs, m, keys, n, scale, out, os),
            128 => grouped_scores_chunks::<32>(q, qs, m, keys, n, scale, out, os),
            32 => grouped_scores_chunks::<8>(q, qs, m, keys, n, scale, out, os),
            16 => grouped_scores_chunks::<4>(q, qs, m, keys, n, scale, out, os),
            _ => generic::grouped_scores(q, qs, m, keys, n, k, scale, out, os),
        }
    }
}

/// `grouped_scores` for heads of `4 * CHUNKS` floats: constant offsets within a block of keys.
#[target_feature(enable = "neon")]
#[allow(clippy::too_many_arguments)]
unsafe fn grouped_scores_chunks<const CHUNKS: usize>(
    q: &[f32],
    qs: usize,
    m: usize,
    keys: &[f32],
    n: usize,
    scale: f32,
    out: &mut [f32],
    os: usize,
) {
    let k = 4 * CHUNKS;
    if !generic::grouped_scores_operands(q, qs, m, keys, n, k, out, os) {
        return;
    }
    let (pq, po) = (q.as_ptr(), out.as_mut_ptr());
    let whole = n / 8 * 8;
    // SAFETY: query i's floats i * qs..i * qs + k and key t's t * k..(t + 1) * k are inside
    // their slices (`grouped_scores_operands`), block loads read keys j0..j0 + 8 ≤ whole ≤ n;
    // outputs i * os + j for j < n are inside `out` (checked there too).
    unsafe {
        for j0 in (0..whole).step_by(8) {
            let block = keys.as_ptr().add(j0 * k);
            for i in 0..m {
                let qi = pq.add(i * qs);
                let mut acc = [vdupq_n_f32(0.0); 8];
                for c in 0..CHUNKS {
                    let qv = vld1q_f32(qi.add(4 * c));
                    for (t, acc) in acc.iter_mut().enumerate() {
                        *acc = vfmaq_f32(*acc, vld1q_f32(block.add(t * k + 4 * c)), qv);
                    }
                }
                // Pairwise adds: lane t of a quad of vectors' sums is vector t's.
                let quad =
                    |v: &[float32x4_t]| vpaddq_f32(vpaddq_f32(v[0], v[1]), vpaddq_f32(v[2], v[3]));
                let o = po.add(i * os + j0);
                vst1q_f32(o, vmulq_n_f32(quad(&acc[..4]), scale));
                vst1q_f32(o.add(4), vmulq_n_f32(quad(&acc[4..]), scale));
            }
        }
        // The last keys one at a time.
        for j in whole..n {
            let key = keys.as_ptr().add(j * k);
            for i in 0..m {
                let qi = pq.add(i * qs);
                let mut acc = vdupq_n_f32(0.0);
                for c in 0..CHUNKS {
                    acc = vfmaq_f32(acc, vld1q_f32(key.add(4 * c)), vld1q_f32(qi.add(4 * c)));
                }
                *po.add(i * os + j) = vaddvq_f32(acc) * scale;
            }
        }
    }
}

/// The generic loop under this tier's features, fused, 16 output columns per pass.
#[target_feature(enable = "neon")]
#[allow(clippy::too_many_arguments)]
unsafe fn grouped_mix_imp(
    p: &[f32],
    ps: usize,
    m: usize,
    values: &[f32],
    n: usize,
    k: usize,
    out: &mut [f32],
    os: usize,
) {
    generic::grouped_mix_with::<true, 16>(p, ps, m, values, n, k, out, os)
}
