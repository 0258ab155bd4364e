//! Portable reference kernels: plain Rust that the compiler vectorizes for the baseline ISA.
//!
//! Every kernel an ISA file (x86_64.rs, aarch64.rs) provides has its twin here with the same
//! name and signature; those files are tested against these.

use half::f16;
use half::slice::HalfFloatSliceExt;

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

/// `y += a * x`
pub fn axpy(a: f32, x: &[f32], y: &mut [f32]) {
    for (y, &x) in y.iter_mut().zip(x) {
        *y += a * x;
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
pub fn silu_mul(gate: &mut [f32], up: &[f32]) {
    for (g, &u) in gate.iter_mut().zip(up) {
        let x = *g;
        *g = x / (1.0 + (-x).exp()) * u;
    }
}

/// Numerically stable softmax in place.
pub fn softmax(x: &mut [f32]) {
    let max = x.iter().cloned().fold(f32::NEG_INFINITY, f32::max);
    let mut sum = 0.0f32;
    for v in x.iter_mut() {
        *v = (*v - max).exp();
        sum += *v;
    }
    let inv = 1.0 / sum;
    for v in x.iter_mut() {
        *v *= inv;
    }
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

/// `out[i, j] = Σ_k x[i, k] · w[j, k]` for `m` rows of `x` ([m, k]) and `n` rows of `w`
/// ([n, k], a Linear weight as stored), written at `out[i * out_stride + j]`.
pub fn gemm_xwt(
    x: &[f32],
    m: usize,
    k: usize,
    w: &[f32],
    n: usize,
    out: &mut [f32],
    out_stride: usize,
) {
    if m == 0 || n == 0 {
        return;
    }
    assert!(x.len() >= m * k, "gemm: x too short");
    assert!(w.len() >= n * k, "gemm: w too short");
    assert!(out_stride >= n, "gemm: output stride below width");
    assert!(out.len() >= (m - 1) * out_stride + n, "gemm: out too short");
    // Inside the backend's thread pool this is the pool's size.
    let threads = rayon::current_num_threads();
    let parallelism = if threads > 1 {
        gemm::Parallelism::Rayon(threads)
    } else {
        gemm::Parallelism::None
    };
    // SAFETY: `gemm` takes raw pointers and strides. The asserts above keep every element it
    // touches inside the three slices: x is read at i*k + kk (i < m, kk < k), w at j*k + kk
    // (j < n), out written at i*out_stride + j. `out` is a unique borrow, so it aliases
    // neither input, and read_dst = false means its old contents are never read.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            out.as_mut_ptr(),
            1,
            out_stride as isize,
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
            parallelism,
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
        gemm_xwt(&x, m, k, &w, n, &mut out, stride);
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
