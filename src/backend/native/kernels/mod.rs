//! The native backend's compute kernels behind one small interface.
//!
//! `Kernels` is a table of primitive functions. It starts as the portable `generic` set; an
//! ISA file (x86_64.rs, aarch64.rs, later) defines the same names and `select` plugs its
//! functions in after run-time feature detection, so model.rs never changes. The composite
//! operations below (linear layers, attention over a cache) add the threading on top of the
//! primitives. Kernels know nothing about Qwen2: only matrices, vectors and a KV layout.

pub mod generic;

use half::f16;
use rayon::prelude::*;

/// A row-major weight matrix `[rows, cols]` (a Linear weight is `[out, in]`).
#[derive(Clone, Copy)]
pub struct MatRef<'a> {
    pub data: MatData<'a>,
    pub rows: usize,
    pub cols: usize,
}

#[derive(Clone, Copy)]
pub enum MatData<'a> {
    F32(&'a [f32]),
    F16(&'a [f16]),
}

/// The primitive kernels; every field has a twin of the same name in `generic`.
pub struct Kernels {
    pub name: &'static str,
    pub dot_f32: fn(&[f32], &[f32]) -> f32,
    pub dot_f16: fn(&[f16], &[f32]) -> f32,
    pub widen_f16: fn(&[f16], &mut [f32]),
    pub axpy: fn(f32, &[f32], &mut [f32]),
    pub rmsnorm: fn(&[f32], &[f32], f32, &mut [f32]),
    pub silu_mul: fn(&mut [f32], &[f32]),
    pub softmax: fn(&mut [f32]),
    pub rope: fn(&mut [f32], &[f32], &[f32]),
    pub gemm_xwt: GemmXwt,
}

/// `gemm_xwt(x, m, k, w, n, out, out_stride)`: `out[i*out_stride + j] = x[i] · w[j]`.
pub type GemmXwt = fn(&[f32], usize, usize, &[f32], usize, &mut [f32], usize);

pub static GENERIC: Kernels = Kernels {
    name: "generic",
    dot_f32: generic::dot_f32,
    dot_f16: generic::dot_f16,
    widen_f16: generic::widen_f16,
    axpy: generic::axpy,
    rmsnorm: generic::rmsnorm,
    silu_mul: generic::silu_mul,
    softmax: generic::softmax,
    rope: generic::rope,
    gemm_xwt: generic::gemm_xwt,
};

/// The best kernel set for this CPU. Only the portable set exists so far.
pub fn select() -> &'static Kernels {
    tracing::debug!(kernels = GENERIC.name, "native kernels selected");
    &GENERIC
}

/// Rows of f16 weights widened at once for a prefill product: 256 rows of a 4864-wide
/// matrix are 5 MB of f32, small enough to stay in cache-friendly territory.
pub const F16_BLOCK_ROWS: usize = 256;

/// Grouped-query attention geometry.
#[derive(Debug, Clone, Copy)]
pub struct AttentionShape {
    pub heads: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
    pub scale: f32,
    /// Keys older than this many positions are not attended (None = full causal).
    pub window: Option<usize>,
}

impl Kernels {
    /// `out[r] = w · x[r] + bias` for `rows` input rows of width `w.cols`.
    /// One row (decode) is a matrix-vector product split over output rows; several rows
    /// (prefill) go through GEMM, widening f16 weights a block of rows at a time into
    /// `scratch`.
    pub fn linear(
        &self,
        w: &MatRef,
        bias: Option<&[f32]>,
        x: &[f32],
        rows: usize,
        out: &mut [f32],
        scratch: &mut Vec<f32>,
    ) {
        let (n, k) = (w.rows, w.cols);
        let out = &mut out[..rows * n];
        if rows == 1 {
            self.matvec(w, &x[..k], out);
        } else {
            match w.data {
                MatData::F32(data) => (self.gemm_xwt)(x, rows, k, data, n, out, n),
                MatData::F16(data) => {
                    scratch.resize(F16_BLOCK_ROWS * k, 0.0);
                    for start in (0..n).step_by(F16_BLOCK_ROWS) {
                        let count = F16_BLOCK_ROWS.min(n - start);
                        let block = &mut scratch[..count * k];
                        block
                            .par_chunks_mut(k)
                            .zip(data[start * k..(start + count) * k].par_chunks(k))
                            .for_each(|(dst, src)| (self.widen_f16)(src, dst));
                        (self.gemm_xwt)(x, rows, k, block, count, &mut out[start..], n);
                    }
                }
            }
        }
        if let Some(bias) = bias {
            for row in out.chunks_mut(n) {
                for (y, &b) in row.iter_mut().zip(bias) {
                    *y += b;
                }
            }
        }
    }

    /// `out = w · x`, parallel over blocks of output rows.
    pub fn matvec(&self, w: &MatRef, x: &[f32], out: &mut [f32]) {
        let k = w.cols;
        // A few blocks per thread balance the load without scheduling overhead per row.
        let block = (w.rows / (rayon::current_num_threads() * 4)).max(16);
        out[..w.rows]
            .par_chunks_mut(block)
            .enumerate()
            .for_each(|(b, ys)| {
                let first = b * block;
                for (i, y) in ys.iter_mut().enumerate() {
                    let r = first + i;
                    *y = match w.data {
                        MatData::F32(d) => (self.dot_f32)(&d[r * k..(r + 1) * k], x),
                        MatData::F16(d) => (self.dot_f16)(&d[r * k..(r + 1) * k], x),
                    };
                }
            });
    }

    /// Copies row `row` of an embedding table into `out` as f32.
    pub fn gather_row(&self, table: &MatRef, row: usize, out: &mut [f32]) {
        let k = table.cols;
        match table.data {
            MatData::F32(d) => out[..k].copy_from_slice(&d[row * k..(row + 1) * k]),
            MatData::F16(d) => (self.widen_f16)(&d[row * k..(row + 1) * k], &mut out[..k]),
        }
    }

    /// RMSNorm of each `width`-wide row of `x` into `out`.
    pub fn rmsnorm_rows(&self, x: &[f32], weight: &[f32], eps: f32, out: &mut [f32]) {
        let width = weight.len();
        for (x, o) in x.chunks(width).zip(out.chunks_mut(width)) {
            (self.rmsnorm)(x, weight, eps, o);
        }
    }

    /// Causal grouped-query attention of `rows` queries at positions `first_pos..` over a
    /// cache laid out `[kv_heads, capacity, head_dim]` (the ONNX past layout) that already
    /// holds these rows' keys and values.
    ///
    /// `q` and `out` are `[rows, heads * head_dim]`; `scores` holds `heads * capacity` floats
    /// and `head_major` `heads * rows * head_dim`: per-head scratch, so heads run in parallel
    /// without allocating.
    #[allow(clippy::too_many_arguments)]
    pub fn attention(
        &self,
        shape: &AttentionShape,
        q: &[f32],
        k_cache: &[f32],
        v_cache: &[f32],
        capacity: usize,
        first_pos: usize,
        rows: usize,
        scores: &mut [f32],
        head_major: &mut [f32],
        out: &mut [f32],
    ) {
        let hd = shape.head_dim;
        let group = shape.heads / shape.kv_heads;
        let q_width = shape.heads * hd;
        scores[..shape.heads * capacity]
            .par_chunks_mut(capacity)
            .zip(head_major[..shape.heads * rows * hd].par_chunks_mut(rows * hd))
            .enumerate()
            .for_each(|(h, (scores, head_out))| {
                let kv = h / group;
                let keys = &k_cache[kv * capacity * hd..(kv + 1) * capacity * hd];
                let values = &v_cache[kv * capacity * hd..(kv + 1) * capacity * hd];
                for r in 0..rows {
                    let pos = first_pos + r;
                    let start = shape.window.map_or(0, |w| (pos + 1).saturating_sub(w));
                    let query = &q[r * q_width + h * hd..][..hd];
                    let s = &mut scores[start..=pos];
                    for (t, score) in s.iter_mut().enumerate() {
                        let key = &keys[(start + t) * hd..][..hd];
                        *score = (self.dot_f32)(query, key) * shape.scale;
                    }
                    (self.softmax)(s);
                    let o = &mut head_out[r * hd..(r + 1) * hd];
                    o.fill(0.0);
                    for (t, &p) in s.iter().enumerate() {
                        (self.axpy)(p, &values[(start + t) * hd..][..hd], o);
                    }
                }
            });
        for r in 0..rows {
            for h in 0..shape.heads {
                out[r * q_width + h * hd..][..hd]
                    .copy_from_slice(&head_major[(h * rows + r) * hd..][..hd]);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn values(n: usize, seed: f32) -> Vec<f32> {
        (0..n).map(|i| ((i as f32 + seed) * 0.7318).sin()).collect()
    }

    #[test]
    fn linear_paths_agree() {
        // 300 output rows: the f16 prefill path widens two blocks of rows.
        let (n, k) = (300, 40);
        let w32 = values(n * k, 1.0);
        let w16: Vec<f16> = w32.iter().map(|&x| f16::from_f32(x)).collect();
        let bias = values(n, 2.0);
        let x = values(3 * k, 3.0);
        let k_ = &GENERIC;
        for data in [MatData::F32(&w32), MatData::F16(&w16)] {
            let w = MatRef {
                data,
                rows: n,
                cols: k,
            };
            let mut batched = vec![0.0; 3 * n];
            k_.linear(&w, Some(&bias), &x, 3, &mut batched, &mut Vec::new());
            for r in 0..3 {
                let mut single = vec![0.0; n];
                k_.linear(
                    &w,
                    Some(&bias),
                    &x[r * k..],
                    1,
                    &mut single,
                    &mut Vec::new(),
                );
                for j in 0..n {
                    let row = &w32[j * k..(j + 1) * k];
                    let naive: f32 =
                        row.iter().zip(&x[r * k..]).map(|(a, b)| a * b).sum::<f32>() + bias[j];
                    let tol = if matches!(data, MatData::F16(_)) {
                        2e-2
                    } else {
                        1e-4
                    };
                    assert!((batched[r * n + j] - naive).abs() < tol);
                    assert!((single[j] - batched[r * n + j]).abs() < 1e-4);
                }
            }
        }
    }

    /// Straightforward causal attention for one query, for comparison.
    fn naive(q: &[f32], keys: &[Vec<f32>], values: &[Vec<f32>], scale: f32) -> Vec<f32> {
        let scores: Vec<f32> = keys
            .iter()
            .map(|k| k.iter().zip(q).map(|(a, b)| a * b).sum::<f32>() * scale)
            .collect();
        let max = scores.iter().cloned().fold(f32::NEG_INFINITY, f32::max);
        let e: Vec<f32> = scores.iter().map(|s| (s - max).exp()).collect();
        let sum: f32 = e.iter().sum();
        let mut out = vec![0.0; q.len()];
        for (p, v) in e.iter().zip(values) {
            for (o, x) in out.iter_mut().zip(v) {
                *o += p / sum * x;
            }
        }
        out
    }

    #[test]
    fn grouped_query_attention_with_and_without_window() {
        let (heads, kv_heads, hd, capacity, len) = (4, 2, 8, 16, 11);
        let k_cache = values(kv_heads * capacity * hd, 5.0);
        let v_cache = values(kv_heads * capacity * hd, 6.0);
        let rows = 3; // queries at positions len-3 .. len-1
        let first = len - rows;
        let q = values(rows * heads * hd, 7.0);
        for window in [None, Some(4)] {
            let shape = AttentionShape {
                heads,
                kv_heads,
                head_dim: hd,
                scale: 0.35,
                window,
            };
            let mut out = vec![0.0; rows * heads * hd];
            GENERIC.attention(
                &shape,
                &q,
                &k_cache,
                &v_cache,
                capacity,
                first,
                rows,
                &mut vec![0.0; heads * capacity],
                &mut vec![0.0; rows * heads * hd],
                &mut out,
            );
            for r in 0..rows {
                let pos = first + r;
                let start = window.map_or(0, |w| pos + 1 - w);
                for h in 0..heads {
                    let g = h / (heads / kv_heads);
                    let at =
                        |cache: &[f32], t: usize| cache[(g * capacity + t) * hd..][..hd].to_vec();
                    let keys: Vec<_> = (start..=pos).map(|t| at(&k_cache, t)).collect();
                    let vals: Vec<_> = (start..=pos).map(|t| at(&v_cache, t)).collect();
                    let qh = &q[(r * heads + h) * hd..][..hd];
                    let want = naive(qh, &keys, &vals, 0.35);
                    let got = &out[(r * heads + h) * hd..][..hd];
                    for (a, b) in got.iter().zip(&want) {
                        assert!((a - b).abs() < 1e-5, "window {window:?} row {r} head {h}");
                    }
                }
            }
        }
    }
}
