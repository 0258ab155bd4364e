//! The composite operations on top of a `Kernels` table: linear layers (GEMV for decode,
//! GEMM for prefill, f32 / f16 / int8 / int4 weights) and attention over a KV cache, split
//! over the backend's persistent `Pool`, with the scratch memory they reuse between calls.

use std::ops::Range;

use half::f16;

use super::super::dual_chunk::{DualChunk, QUERY_COPIES};
use super::pool::{ColumnBlock, Pool};
use super::q6k;
use super::quant::{self, DecodedCodes, Q4Ref, QActs};
use super::{Kernels, MatData, MatRef};

/// Rows of f16 weights widened at once for a prefill product.
pub const F16_BLOCK_ROWS: usize = 64;

/// One layer's keys or values in the KV cache, `[kv_heads, capacity, head_dim]`: f32, f16
/// (half the memory and half the bytes attention reads per token, for long contexts), or int8
/// with a scale per `block` elements (`[kv_heads, capacity, head_dim / block]`).
#[derive(Clone, Copy)]
pub enum KvRef<'a> {
    F32(&'a [f32]),
    F16(&'a [f16]),
    I8 {
        q: &'a [i8],
        scales: &'a [f32],
        block: usize,
    },
}

impl<'a> KvRef<'a> {
    /// An f32 or f16 cache as grouped attention reads it; None for int8.
    fn floats(self) -> Option<Floats<'a>> {
        match self {
            KvRef::F32(d) => Some(Floats::F32(d)),
            KvRef::F16(d) => Some(Floats::F16(d)),
            KvRef::I8 { .. } => None,
        }
    }

    /// Elements `r` (whole positions).
    fn range(self, r: std::ops::Range<usize>) -> Self {
        match self {
            KvRef::F32(d) => KvRef::F32(&d[r]),
            KvRef::F16(d) => KvRef::F16(&d[r]),
            KvRef::I8 { q, scales, block } => KvRef::I8 {
                scales: &scales[r.start / block..r.end / block],
                q: &q[r],
                block,
            },
        }
    }
}

/// `a · b` for an int8 `b` (the int8 KV cache's keys): eight partial sums, so the compiler
/// vectorizes it at any target (a portable kernel: attention is a small part of a step).
fn dot_f32_i8(a: &[f32], b: &[i8]) -> f32 {
    let mut acc = [0.0f32; 8];
    let (ac, bc) = (a.chunks_exact(8), b.chunks_exact(8));
    let tail: f32 = ac
        .remainder()
        .iter()
        .zip(bc.remainder())
        .map(|(x, &y)| x * y as f32)
        .sum();
    for (x, y) in ac.zip(bc) {
        for i in 0..8 {
            acc[i] += x[i] * y[i] as f32;
        }
    }
    acc.iter().sum::<f32>() + tail
}

/// `y += a · x` for an int8 `x` (the int8 KV cache's values).
fn axpy_i8(a: f32, x: &[i8], y: &mut [f32]) {
    for (y, &x) in y.iter_mut().zip(x) {
        *y += a * x as f32;
    }
}

/// Grouped-query attention geometry.
#[derive(Debug, Clone, Copy)]
pub struct AttentionShape {
    pub heads: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
    pub scale: f32,
    /// Keys older than this many positions are not attended (None = full causal).
    pub window: Option<usize>,
    /// Dual Chunk Attention: each query row comes as `QUERY_COPIES` rotated copies, each
    /// scoring its own span of keys (dual_chunk.rs).
    pub dual_chunk: Option<DualChunk>,
}

impl AttentionShape {
    /// The first position a query at `pos` attends to.
    fn first_visible(&self, pos: usize) -> usize {
        self.window.map_or(0, |w| (pos + 1).saturating_sub(w))
    }

    /// Rotated copies of each query row in `attention`'s `q`.
    pub fn query_copies(&self) -> usize {
        if self.dual_chunk.is_some() {
            QUERY_COPIES
        } else {
            1
        }
    }

    /// The keys a query at `pos` attends to, as spans each scored by one copy of the query.
    fn spans(&self, pos: usize) -> impl Iterator<Item = (Range<usize>, usize)> {
        let first = self.first_visible(pos);
        let plain = self.dual_chunk.is_none().then_some((first..pos + 1, 0));
        let chunked = self.dual_chunk.into_iter();
        plain
            .into_iter()
            .chain(chunked.flat_map(move |d| d.spans(first, pos)))
    }
}

/// Per-session scratch of the linear layers, allocated once (`reserve`) and reused.
pub struct Scratch {
    /// Activations quantized for int8/int4 weights, one row per token of a chunk.
    pub acts: QActs,
    /// f16 weight rows widened for prefill GEMM, `F16_BLOCK_ROWS * k` per thread.
    pub widened: Vec<f32>,
    /// int4k scales and mins decoded for prefill GEMM, `PREFILL_BLOCK_ROWS` rows per thread.
    pub decoded: Vec<f32>,
}

/// Weight rows of a quantized prefill product's blocks, which stay in L2 while every activation
/// row passes (`quantized_gemm`); int4k's codes are decoded a block at a time (`Kernels::gemm`).
const PREFILL_BLOCK_ROWS: usize = 64;

impl Scratch {
    /// Room for `rows` activation rows of width up to `max_k`, on `threads` threads.
    pub fn new(max_k: usize, rows: usize, threads: usize, f16_weights: bool) -> Self {
        Self {
            acts: QActs::new(max_k, rows),
            widened: if f16_weights && rows > 1 {
                vec![0.0; threads * F16_BLOCK_ROWS * max_k]
            } else {
                Vec::new()
            },
            decoded: if rows > BATCH_ROWS {
                vec![0.0; threads * 2 * PREFILL_BLOCK_ROWS * quant::padded_blocks(max_k)]
            } else {
                Vec::new()
            },
        }
    }
}

/// The activation rows of a linear layer and how they relate.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Rows {
    /// Consecutive tokens of one sequence (a prompt chunk): any summation order will do.
    Prompt(usize),
    /// Rows of several sequences (an engine step: a decode token of each, and with quantized
    /// weights a prompt slice): every row's result is bit for bit its one-row product, so a
    /// sequence's output does not depend on what it is batched with. The quantized tiles
    /// already are (`kernels::batched_rows_equal_single_rows` checks it on every tier); float
    /// weights then take one matrix-vector product per row over each task's block of weight
    /// rows (read from memory once, reused from cache).
    Batch(usize),
}

impl Rows {
    pub fn count(self) -> usize {
        match self {
            Rows::Prompt(n) | Rows::Batch(n) => n,
        }
    }

    /// `n` rows that relate the same way (e.g. those of them that reach the LM head).
    pub fn with_count(self, n: usize) -> Self {
        match self {
            Rows::Prompt(_) => Rows::Prompt(n),
            Rows::Batch(_) => Rows::Batch(n),
        }
    }
}

/// One linear layer of `Kernels::linears`: weights, optional bias, output.
pub type Layer<'a> = (MatRef<'a>, Option<&'a [f32]>, &'a mut [f32]);

/// Adds `bias` to every `n`-wide row of `out`.
fn add_bias(out: &mut [f32], n: usize, bias: Option<&[f32]>) {
    if let Some(bias) = bias {
        for row in out.chunks_mut(n) {
            for (y, &b) in row.iter_mut().zip(bias) {
                *y += b;
            }
        }
    }
}

/// Activation rows up to which a product is a decode batch: its tiles take them all at once and
/// stream the weights as a GEMV does (tiling.rs).
pub const BATCH_ROWS: usize = 4;

/// Output rows per task of a matrix-vector product: about four tasks per thread (dynamic
/// balance against a core busy with something else), at least 16 rows (a task costs an
/// atomic increment; 16 rows of a 896-wide int4 matrix are 9 KB of weights).
fn rows_per_task(rows: usize, threads: usize) -> usize {
    (rows.div_ceil(threads * 4)).max(16)
}

/// Weight rows per task of a quantized product over `n` columns (weight rows) and `rows`
/// activation rows. A prefill's blocks stay in L2 while every activation row passes. A decode
/// batch (≤ `BATCH_ROWS` rows, which the tiles take at once: tiling.rs) reads each weight row
/// once, so it is split as a GEMV is, in long runs of rows each thread streams with its
/// prefetches ahead: blocks of 64 rows started a cold stream every 64 rows (Zen 4, `cargo bench
/// --bench kernels -- 2t-batch4`, two alternated runs: int4 11.4–12.2 -> 14.9–15.0 GiB/s, int8
/// 15.3 -> 16.0–16.2).
fn quantized_block(rows: usize, n: usize, threads: usize) -> usize {
    if rows <= BATCH_ROWS {
        rows_per_task(n, threads)
    } else {
        rows_per_task(n, threads).min(PREFILL_BLOCK_ROWS)
    }
}

/// A quantized product over `out`'s `n` columns, split over the pool by `quantized_block`.
fn quantized_gemm(
    pool: &Pool,
    out: &mut [f32],
    rows: usize,
    n: usize,
    product: &(dyn Fn(&mut ColumnBlock<'_>) + Sync),
) {
    let block = quantized_block(rows, n, pool.threads());
    pool.for_column_blocks(out, rows, n, n, block, (&mut [0u8; 0][..], 0), &|c, _| {
        product(c)
    });
}

impl Kernels {
    /// `out[r] = w · x[r] + bias` for `rows` input rows of width `w.cols`, split by output
    /// feature over the pool. One row (decode) is a matrix-vector product; several rows
    /// (prefill) are a GEMM: `gemm` for f32 (f16 widened a block of rows at a time), and the
    /// int8 dot products of the quantized kernels for int8/int4 weights.
    #[allow(clippy::too_many_arguments)]
    pub fn linear(
        &self,
        pool: &Pool,
        w: &MatRef,
        bias: Option<&[f32]>,
        x: &[f32],
        rows: Rows,
        out: &mut [f32],
        scratch: &mut Scratch,
    ) {
        let (mode, rows) = (rows, rows.count());
        let (n, k) = (w.rows, w.cols);
        let out = &mut out[..rows * n];
        let x = &x[..rows * k];
        if w.is_quantized() {
            self.quantize(pool, x, rows, k, &mut scratch.acts, w.is_q6k());
        }
        let acts = &scratch.acts;
        if rows == 1 {
            pool.for_chunks(out, rows_per_task(n, pool.threads()), &|i, part| {
                let first = i * rows_per_task(n, pool.threads());
                self.gemv(w, first, x, acts, 0, part);
            });
        } else {
            let buffers = (&mut scratch.widened[..], &mut scratch.decoded[..]);
            self.gemm(pool, w, x, mode, acts, out, buffers);
        }
        add_bias(out, n, bias);
    }

    /// Several linear layers over the same input (q/k/v, gate/up): `x` is quantized once and,
    /// for one row, all products share one parallel loop.
    pub fn linears<const N: usize>(
        &self,
        pool: &Pool,
        x: &[f32],
        rows: Rows,
        scratch: &mut Scratch,
        layers: [Layer<'_>; N],
    ) {
        let (mode, rows) = (rows, rows.count());
        let half_sums = layers.iter().any(|l| l.0.is_q6k());
        if rows != 1 && rows <= BATCH_ROWS && layers.iter().all(|l| l.0.is_quantized()) {
            self.batch_linears(pool, x, rows, scratch, layers);
            return;
        }
        if rows != 1 {
            let mut quantized = false;
            for (w, bias, out) in layers {
                let (n, k) = (w.rows, w.cols);
                if w.is_quantized() && !quantized {
                    let acts = &mut scratch.acts;
                    self.quantize(pool, &x[..rows * k], rows, k, acts, half_sums);
                    quantized = true;
                }
                let out = &mut out[..rows * n];
                self.gemm(
                    pool,
                    &w,
                    &x[..rows * k],
                    mode,
                    &scratch.acts,
                    out,
                    (&mut scratch.widened, &mut scratch.decoded),
                );
                add_bias(out, n, bias);
            }
            return;
        }
        let k = layers[0].0.cols;
        if layers.iter().any(|l| l.0.is_quantized()) {
            self.quantize(pool, &x[..k], 1, k, &mut scratch.acts, half_sums);
        }
        let acts = &scratch.acts;
        let threads = pool.threads();
        let ws: [MatRef; N] = std::array::from_fn(|o| layers[o].0);
        let biases: [Option<&[f32]>; N] = std::array::from_fn(|o| layers[o].1);
        let chunks: [usize; N] = std::array::from_fn(|o| rows_per_task(ws[o].rows, threads));
        let outs = layers.map(|(w, _, out)| &mut out[..w.rows]);
        pool.for_chunks_multi(outs, chunks, &|o, t, part| {
            let first = t * chunks[o];
            self.gemv(&ws[o], first, x, acts, 0, part);
            if let Some(b) = biases[o] {
                for (y, &b) in part.iter_mut().zip(&b[first..]) {
                    *y += b;
                }
            }
        });
    }

    /// `linears` for a decode batch of quantized layers: every product's column blocks in one
    /// parallel loop, as one row's are (a batch of 4 took three hand-offs for q/k/v and two for
    /// gate/up, each with its wait for the slowest thread).
    fn batch_linears<const N: usize>(
        &self,
        pool: &Pool,
        x: &[f32],
        rows: usize,
        scratch: &mut Scratch,
        mut layers: [Layer<'_>; N],
    ) {
        let k = layers[0].0.cols;
        let half_sums = layers.iter().any(|l| l.0.is_q6k());
        self.quantize(pool, &x[..rows * k], rows, k, &mut scratch.acts, half_sums);
        let acts = &scratch.acts;
        let ws: [MatRef; N] = std::array::from_fn(|o| layers[o].0);
        let widths = ws.map(|w| w.rows);
        let blocks = widths.map(|n| quantized_block(rows, n, pool.threads()));
        let outs = layers
            .each_mut()
            .map(|(w, _, out)| &mut out[..rows * w.rows]);
        pool.for_column_blocks_multi(outs, rows, widths, blocks, &|o, c| {
            self.quantized_product(&ws[o], acts, c)
        });
        for (w, bias, out) in layers {
            add_bias(&mut out[..rows * w.rows], w.rows, bias);
        }
    }

    /// A quantized product into one column block of the output (`gemm_q8` / `gemm_q4`).
    fn quantized_product(&self, w: &MatRef, acts: &QActs, c: &mut ColumnBlock<'_>) {
        match w.data {
            MatData::Q8 { data, scales } => (self.gemm_q8)(w.q8(data, scales), acts, c),
            MatData::Q4 { data, kquant } => (self.gemm_q4)(w.q4(data, kquant), acts, c),
            MatData::Q6 { data } => (self.gemm_q6)(w.q6(data), acts, c),
            _ => panic!("quantized_product: float weights"),
        }
    }

    /// Quantizes `rows` rows of `x` (width `k`) into `acts`, in parallel for a prompt's rows (a
    /// decode batch's few take less than a hand-off to the pool); `half_sums`: for q6k products.
    fn quantize(
        &self,
        pool: &Pool,
        x: &[f32],
        rows: usize,
        k: usize,
        acts: &mut QActs,
        half_sums: bool,
    ) {
        let nb = quant::padded_blocks(k);
        assert!(
            rows * nb <= acts.scales.len(),
            "activation scratch too small"
        );
        acts.blocks = nb;
        acts.rows = rows;
        let q = (&mut acts.q[..], nb * quant::BLOCK);
        let s = (&mut acts.scales[..], nb);
        let z = (&mut acts.sums[..], nb);
        let row = |i: usize, q: &mut [i8], s: &mut [f32], z: &mut [i32]| {
            (self.quantize_row)(&x[i * k..(i + 1) * k], q, s, z)
        };
        if rows <= BATCH_ROWS {
            let parts =
                q.0.chunks_mut(q.1)
                    .zip(s.0.chunks_mut(s.1))
                    .zip(z.0.chunks_mut(z.1));
            for (i, ((q, s), z)) in parts.take(rows).enumerate() {
                row(i, q, s, z);
            }
        } else {
            pool.for_chunks3(q, s, z, rows, &row);
        }
        acts.fill_block_sums();
        if half_sums {
            acts.fill_half_sums();
        }
    }

    /// Rows `first..first + out.len()` of `w` times activation row `r` (`x` as f32 for float
    /// weights, `acts` quantized for int8/int4).
    fn gemv(&self, w: &MatRef, first: usize, x: &[f32], acts: &QActs, r: usize, out: &mut [f32]) {
        let (n, k) = (out.len(), w.cols);
        match w.data {
            MatData::F32(d) => {
                (self.gemv_f32)(&d[first * k..(first + n) * k], &x[r * k..(r + 1) * k], out)
            }
            MatData::F16(d) => {
                (self.gemv_f16)(&d[first * k..(first + n) * k], &x[r * k..(r + 1) * k], out)
            }
            MatData::Q8 { data, scales } => {
                let w = w.q8(data, scales);
                (self.gemv_q8)(w, first, acts.row(r), out)
            }
            MatData::Q4 { data, kquant } => {
                (self.gemv_q4)(w.q4(data, kquant), first, acts.row(r), out)
            }
            MatData::Q6 { data } => (self.gemv_q6)(w.q6(data), first, acts.row(r), out),
            MatData::Q8Rows { .. } => {
                panic!("bundle-layout int8 rows are gathered, not multiplied")
            }
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn gemm(
        &self,
        pool: &Pool,
        w: &MatRef,
        x: &[f32],
        rows: Rows,
        acts: &QActs,
        out: &mut [f32],
        (widened, decoded): (&mut [f32], &mut [f32]),
    ) {
        let (mode, rows) = (rows, rows.count());
        let (n, k) = (w.rows, w.cols);
        let threads = pool.threads();
        let float = matches!(w.data, MatData::F32(_) | MatData::F16(_));
        if float && mode == Rows::Batch(rows) {
            let block = rows_per_task(n, threads);
            pool.for_column_blocks(out, rows, n, n, block, (&mut [0u8; 0][..], 0), &|c, _| {
                for r in 0..rows {
                    self.gemv(w, c.start, x, acts, r, c.row(r));
                }
            });
            return;
        }
        match w.data {
            MatData::F32(data) => {
                // Blocks of 64+ output features: gemm packs each block's weights once.
                let block = n.div_ceil(threads * 2).max(64);
                pool.for_column_blocks(out, rows, n, n, block, (&mut [0u8; 0][..], 0), &|c, _| {
                    let wb = &data[c.start * k..c.end * k];
                    (self.gemm_xwt)(x, rows, k, wb, c)
                });
            }
            MatData::F16(data) => {
                let per_task = F16_BLOCK_ROWS * k;
                let block = n.div_ceil(threads);
                pool.for_column_blocks(out, rows, n, n, block, (widened, per_task), &|c, buf| {
                    let (start, end) = (c.start, c.end);
                    for s in (start..end).step_by(F16_BLOCK_ROWS) {
                        let e = (s + F16_BLOCK_ROWS).min(end);
                        let wb = &mut buf[..(e - s) * k];
                        (self.widen_f16)(&data[s * k..e * k], wb);
                        let mut sub = c.sub(s - start, e - start);
                        (self.gemm_xwt)(x, rows, k, wb, &mut sub);
                    }
                });
            }
            MatData::Q8 { .. } => {
                quantized_gemm(pool, out, rows, n, &|c| self.quantized_product(w, acts, c));
            }
            MatData::Q4 { data, kquant } if kquant && rows > BATCH_ROWS => {
                // A prefill passes each weight row once per tile of activation rows: int4k's
                // codes are decoded once per block of rows instead.
                let q = w.q4(data, kquant);
                let nb = q.blocks();
                let per_task = 2 * PREFILL_BLOCK_ROWS * nb;
                let block = n.div_ceil(threads);
                pool.for_column_blocks(out, rows, n, n, block, (decoded, per_task), &|c, buf| {
                    let (start, end) = (c.start, c.end);
                    for s in (start..end).step_by(PREFILL_BLOCK_ROWS) {
                        let e = (s + PREFILL_BLOCK_ROWS).min(end);
                        let (scales, mins) = buf[..2 * (e - s) * nb].split_at_mut((e - s) * nb);
                        quant::decode_kquant_rows(q, s, scales, mins);
                        let decoded = DecodedCodes {
                            first: s,
                            blocks: nb,
                            scales,
                            mins,
                        };
                        let q = Q4Ref {
                            decoded: Some(decoded),
                            ..q
                        };
                        (self.gemm_q4)(q, acts, &mut c.sub(s - start, e - start));
                    }
                });
            }
            MatData::Q4 { .. } | MatData::Q6 { .. } => {
                quantized_gemm(pool, out, rows, n, &|c| self.quantized_product(w, acts, c));
            }
            MatData::Q8Rows { .. } => {
                panic!("bundle-layout int8 rows are gathered, not multiplied")
            }
        }
    }

    /// Copies row `row` of an embedding table into `out` as f32.
    pub fn gather_row(&self, table: &MatRef, row: usize, out: &mut [f32]) {
        let k = table.cols;
        let out = &mut out[..k];
        match table.data {
            MatData::F32(d) => out.copy_from_slice(&d[row * k..(row + 1) * k]),
            MatData::F16(d) => (self.widen_f16)(&d[row * k..(row + 1) * k], out),
            MatData::Q8Rows { q, scales } => {
                let s = scales[row];
                for (o, &v) in out.iter_mut().zip(&q[row * k..(row + 1) * k]) {
                    *o = v as f32 * s;
                }
            }
            MatData::Q8 { data, scales } => {
                let w = table.q8(data, scales);
                for (e, o) in out.iter_mut().enumerate() {
                    *o = quant::q8_weight(w.row(row), e) as f32 * scales[row];
                }
            }
            MatData::Q4 { data, kquant } => {
                let w = table.q4(data, kquant);
                for (e, o) in out.iter_mut().enumerate() {
                    let (q, s, offset) = quant::q4_weight_in(w.row(row), w.blocks(), kquant, e);
                    *o = q as f32 * s + offset;
                }
            }
            MatData::Q6 { data } => {
                let w = table.q6(data);
                for (e, o) in out.iter_mut().enumerate() {
                    let (u, sc, d) = q6k::q6_weight(w.row(row), w.blocks(), e);
                    *o = d * sc as f32 * (u as f32 - 32.0);
                }
            }
        }
    }

    /// `gate = silu(gate) * up` over `rows` rows of `width`: one row (a decode step) on this
    /// thread, a prompt chunk's rows split over the pool (on one thread it was 2.4% of an
    /// int4 prefill on the AVX2 tier).
    pub fn silu_mul_rows(
        &self,
        pool: &Pool,
        rows: usize,
        gate: &mut [f32],
        up: &[f32],
        width: usize,
    ) {
        let (gate, up) = (&mut gate[..rows * width], &up[..rows * width]);
        if rows == 1 {
            return (self.silu_mul)(gate, up);
        }
        let chunk = rows.div_ceil(pool.threads()) * width;
        pool.for_chunks(gate, chunk, &|i, part| {
            (self.silu_mul)(part, &up[i * chunk..][..part.len()])
        });
    }

    /// RMSNorm of each `width`-wide row of `x` into `out`.
    pub fn rmsnorm_rows(&self, x: &[f32], weight: &[f32], eps: f32, out: &mut [f32]) {
        let width = weight.len();
        for (x, o) in x.chunks(width).zip(out.chunks_mut(width)) {
            (self.rmsnorm)(x, weight, eps, o);
        }
    }

    /// Causal grouped-query attention of several sequences' query rows, each over its own
    /// cache laid out `[kv_heads, capacity, head_dim]` (the ONNX past layout) that already holds
    /// these rows' keys and values: `seq(i)` describes sequence `i < seqs`, whose rows follow
    /// sequence `i - 1`'s in `q` and `out`.
    ///
    /// `q` is `[rows, query_copies, heads * head_dim]` (one copy but with Dual Chunk
    /// Attention), `out` `[rows, heads * head_dim]`. Every sequence's heads run in one parallel
    /// loop (a decode batch of 4 took four hand-offs a layer), one task per key/value head of
    /// a sequence (`attention_scratch` sizes `scores` and `head_major`, the tasks' scratch). A
    /// query's scores are products over its keys (the cache rows are contiguous), its output a
    /// weighted sum of value rows.
    #[allow(clippy::too_many_arguments)]
    pub fn attention<'c>(
        &self,
        pool: &Pool,
        shape: &AttentionShape,
        q: &[f32],
        seqs: usize,
        seq: &SeqRows<'c>,
        scores: &mut [f32],
        head_major: &mut [f32],
        out: &mut [f32],
    ) {
        let (hd, heads) = (shape.head_dim, shape.heads);
        let q_width = heads * hd;
        let layout = AttentionLayout::new(shape, seqs, seq);
        let (scores_len, head_major_len) = layout.scratch(seqs);
        assert!(
            scores.len() >= scores_len && head_major.len() >= head_major_len,
            "attention scratch too small"
        );
        let copies = shape.query_copies();
        let units = layout.units;
        pool.for_chunks2(
            scores,
            layout.scores_chunk(),
            head_major,
            layout.head_chunk(),
            seqs * units,
            &|task, scores, head_out| {
                let (s, unit) = (task / units, task % units);
                let rows = seq(s);
                let row0: usize = (0..s).map(|j| seq(j).rows).sum();
                let q = &q[row0 * copies * q_width..(row0 + rows.rows) * copies * q_width];
                let (scores, widened) = scores.split_at_mut(layout.unit_heads * layout.positions);
                let scores = Scores {
                    data: scores,
                    stride: layout.positions,
                };
                match (rows.keys.floats(), rows.values.floats()) {
                    (Some(keys), Some(values)) if layout.grouped => self.attend_group(
                        shape, q, unit, keys, values, &rows, scores, widened, head_out,
                    ),
                    _ => self.attend_head(shape, q, unit, &rows, scores, head_out),
                }
            },
        );
        let mut row0 = 0;
        for s in 0..seqs {
            let rows = seq(s).rows;
            let head_major = &head_major[s * units * layout.head_chunk()..];
            for r in 0..rows {
                for h in 0..heads {
                    // Head `g` of unit `u`, row `r`: at (g * rows + r) * hd of the unit's chunk.
                    let (u, g) = (h / layout.unit_heads, h % layout.unit_heads);
                    let at = u * layout.head_chunk() + (g * rows + r) * hd;
                    out[(row0 + r) * q_width + h * hd..][..hd]
                        .copy_from_slice(&head_major[at..at + hd]);
                }
            }
            row0 += rows;
        }
    }

    /// The scratch `attention` needs for these sequences: floats of `scores` and `head_major`.
    pub fn attention_scratch<'c>(
        shape: &AttentionShape,
        seqs: usize,
        seq: &SeqRows<'c>,
    ) -> (usize, usize) {
        AttentionLayout::new(shape, seqs, seq).scratch(seqs)
    }

    /// One task of `attention` over an f32 or f16 cache with grouped query heads: key/value
    /// head `kv` of one sequence. Its query heads take their scores and outputs as two small
    /// matrix products, so each cached key and value is read once per row instead of once per
    /// query head (7 and 6 times for Qwen2 0.5B and 1.5B, whose decode attention re-read the
    /// cache from L2 that way: about 16% of a 4-sequence int4 decode step at 440 positions,
    /// `perf` on `scripts/service-load.sh`). An f16 cache is widened `WIDEN_POSITIONS` keys or
    /// values at a time into `widened` (which holds that many rows and the group's outputs).
    #[allow(clippy::too_many_arguments)]
    fn attend_group(
        &self,
        shape: &AttentionShape,
        q: &[f32],
        kv: usize,
        keys: Floats,
        values: Floats,
        at: &AttentionRows,
        scores: Scores,
        widened: &mut [f32],
        head_out: &mut [f32],
    ) {
        let hd = shape.head_dim;
        let group = shape.heads / shape.kv_heads;
        let q_width = shape.heads * hd;
        let copies = shape.query_copies();
        let (capacity, rows) = (at.capacity, at.rows);
        let Scores {
            data: scores,
            stride,
        } = scores;
        let head = kv * capacity..(kv + 1) * capacity;
        let (keys, values) = (keys.positions(head.clone(), hd), values.positions(head, hd));
        for r in 0..rows {
            let pos = at.first_pos + r;
            let start = shape.first_visible(pos);
            let n = pos + 1 - start;
            for (span, copy) in shape.spans(pos) {
                let row = r * copies + copy;
                let query = &q[row * q_width + kv * group * hd..][..group * hd];
                let out = &mut scores[span.start - start..];
                // Each block of keys (all of an f32 cache's at once) with the same query.
                let mut first = span.start;
                while first < span.end {
                    let end = keys.block_end(first, span.end);
                    let block = keys.widen(self, first..end, hd, widened);
                    let out = &mut out[first - span.start..];
                    (self.grouped_scores)(
                        query,
                        hd,
                        group,
                        block,
                        end - first,
                        hd,
                        shape.scale,
                        out,
                        stride,
                    );
                    first = end;
                }
            }
            for s in scores.chunks_mut(stride) {
                (self.softmax)(&mut s[..n]);
            }
            // Head `g` of the group, row `r`: head_out[(g * rows + r) * hd..]. An f16 cache's
            // later blocks add their sums through the group's outputs at the end of `widened`.
            let out = &mut head_out[r * hd..];
            let mut first = start;
            while first <= pos {
                let end = values.block_end(first, pos + 1);
                let (block, sums) = widened.split_at_mut(widened.len().min(WIDEN_POSITIONS * hd));
                let block = values.widen(self, first..end, hd, block);
                let p = &scores[first - start..];
                if first == start {
                    (self.grouped_mix)(p, stride, group, block, end - first, hd, out, rows * hd);
                } else {
                    (self.grouped_mix)(p, stride, group, block, end - first, hd, sums, hd);
                    for (g, sum) in sums.chunks(hd).take(group).enumerate() {
                        for (o, s) in out[g * rows * hd..][..hd].iter_mut().zip(sum) {
                            *o += s;
                        }
                    }
                }
                first = end;
            }
        }
    }

    /// One task of `attention` for one query head `h` of one sequence: int8 caches, and f32 or
    /// f16 ones without grouped query heads (where a key/value head's task would have one
    /// head).
    fn attend_head(
        &self,
        shape: &AttentionShape,
        q: &[f32],
        h: usize,
        at: &AttentionRows,
        scores: Scores,
        head_out: &mut [f32],
    ) {
        let hd = shape.head_dim;
        let group = shape.heads / shape.kv_heads;
        let q_width = shape.heads * hd;
        let copies = shape.query_copies();
        let (capacity, rows) = (at.capacity, at.rows);
        let scores = scores.data;
        let kv = h / group;
        let keys = at.keys.range(kv * capacity * hd..(kv + 1) * capacity * hd);
        let values = at
            .values
            .range(kv * capacity * hd..(kv + 1) * capacity * hd);
        for r in 0..rows {
            let pos = at.first_pos + r;
            let start = shape.first_visible(pos);
            for (span, copy) in shape.spans(pos) {
                let query = &q[(r * copies + copy) * q_width + h * hd..][..hd];
                let keys_at = span.start * hd..span.end * hd;
                let s = &mut scores[span.clone()];
                match keys {
                    KvRef::F32(k) => (self.gemv_f32)(&k[keys_at], query, s),
                    KvRef::F16(k) => (self.gemv_f16)(&k[keys_at], query, s),
                    KvRef::I8 {
                        q: k,
                        scales,
                        block,
                    } => {
                        let nb = hd / block;
                        for (t, s) in span.zip(s.iter_mut()) {
                            let (at, sc) = (t * hd, &scales[t * nb..]);
                            *s = (0..nb)
                                .map(|b| {
                                    let (q, k) = (&query[b * block..], &k[at + b * block..]);
                                    sc[b] * dot_f32_i8(&q[..block], &k[..block])
                                })
                                .sum();
                        }
                    }
                }
            }
            let s = &mut scores[start..=pos];
            for v in s.iter_mut() {
                *v *= shape.scale;
            }
            (self.softmax)(s);
            let o = &mut head_out[r * hd..(r + 1) * hd];
            o.fill(0.0);
            match values {
                KvRef::F32(v) => (self.weighted_sum)(s, &v[start * hd..(pos + 1) * hd], o),
                KvRef::F16(v) => {
                    for (t, &p) in s.iter().enumerate() {
                        let at = (start + t) * hd;
                        (self.axpy_f16)(p, &v[at..at + hd], o);
                    }
                }
                KvRef::I8 {
                    q: v,
                    scales,
                    block,
                } => {
                    for (t, &p) in s.iter().enumerate() {
                        let at = (start + t) * hd;
                        let sc = &scales[(start + t) * (hd / block)..];
                        let parts = v[at..at + hd].chunks(block).zip(o.chunks_mut(block));
                        for ((v, o), &s) in parts.zip(sc) {
                            axpy_i8(p * s, v, o);
                        }
                    }
                }
            }
        }
    }
}

/// `seq(i)`: sequence `i`'s rows in an `attention` call.
pub type SeqRows<'c> = dyn Fn(usize) -> AttentionRows<'c> + Sync + 'c;

/// One sequence's query rows in an `attention` call.
#[derive(Clone, Copy)]
pub struct AttentionRows<'a> {
    /// Its cache's keys and values, `[kv_heads, capacity, head_dim]`.
    pub keys: KvRef<'a>,
    pub values: KvRef<'a>,
    pub capacity: usize,
    /// The position of its first query row.
    pub first_pos: usize,
    pub rows: usize,
}

/// A task's scores: a row of `stride` floats per query head it computes.
struct Scores<'a> {
    data: &'a mut [f32],
    stride: usize,
}

/// Key or value positions of an f16 cache widened at a time in a grouped task (64 KB of f32 at
/// a head width of 64: they stay in L2 while the group's heads read them).
const WIDEN_POSITIONS: usize = 256;

/// A grouped task's keys or values: an f32 cache read in place, an f16 one widened a block of
/// positions at a time.
#[derive(Clone, Copy)]
enum Floats<'a> {
    F32(&'a [f32]),
    F16(&'a [f16]),
}

impl<'a> Floats<'a> {
    /// Positions `range` of rows of `width`.
    fn positions(self, range: Range<usize>, width: usize) -> Self {
        let elements = range.start * width..range.end * width;
        match self {
            Floats::F32(d) => Floats::F32(&d[elements]),
            Floats::F16(d) => Floats::F16(&d[elements]),
        }
    }

    /// Where the block that starts at `first` ends: at `end` for f32, at most
    /// `WIDEN_POSITIONS` on for f16.
    fn block_end(self, first: usize, end: usize) -> usize {
        match self {
            Floats::F32(_) => end,
            Floats::F16(_) => end.min(first + WIDEN_POSITIONS),
        }
    }

    /// Positions `range` (of rows of `width`) as f32: in place, or widened into `buffer`.
    fn widen<'b>(
        self,
        k: &Kernels,
        range: Range<usize>,
        width: usize,
        buffer: &'b mut [f32],
    ) -> &'b [f32]
    where
        'a: 'b,
    {
        let elements = range.start * width..range.end * width;
        match self {
            Floats::F32(d) => &d[elements],
            Floats::F16(d) => {
                let out = &mut buffer[..elements.len()];
                (k.widen_f16)(&d[elements], out);
                out
            }
        }
    }
}

/// How `attention` splits its work and scratch: one task per key/value head of a sequence
/// (`grouped`: f32 or f16 caches shared by several query heads) or per query head.
struct AttentionLayout {
    grouped: bool,
    /// Grouped over an f16 cache: each task's scores chunk also holds its widened rows.
    widens: bool,
    /// Tasks a sequence: key/value heads, or query heads.
    units: usize,
    /// Query heads a task computes.
    unit_heads: usize,
    /// Positions any row may attend over (the largest cache's capacity: a row's scores are
    /// indexed by position, and a stride that does not grow with the sequences keeps the
    /// scratch from growing with them).
    positions: usize,
    /// Rows of the longest sequence.
    rows: usize,
    head_dim: usize,
}

impl AttentionLayout {
    fn new<'c>(shape: &AttentionShape, seqs: usize, seq: &SeqRows<'c>) -> Self {
        let all = (0..seqs).map(seq);
        let grouped = shape.heads > shape.kv_heads
            && all
                .clone()
                .all(|a| a.keys.floats().is_some() && a.values.floats().is_some());
        let half = |kv: KvRef| matches!(kv, KvRef::F16(_));
        let widens = grouped && all.clone().any(|a| half(a.keys) || half(a.values));
        let (units, unit_heads) = if grouped {
            (shape.kv_heads, shape.heads / shape.kv_heads)
        } else {
            (shape.heads, 1)
        };
        Self {
            grouped,
            widens,
            units,
            unit_heads,
            positions: all.clone().map(|a| a.capacity).max().unwrap_or(0),
            rows: all.map(|a| a.rows).max().unwrap_or(0),
            head_dim: shape.head_dim,
        }
    }

    fn scores_chunk(&self) -> usize {
        let widened = if self.widens {
            (WIDEN_POSITIONS + self.unit_heads) * self.head_dim
        } else {
            0
        };
        self.unit_heads * self.positions + widened
    }

    fn head_chunk(&self) -> usize {
        self.unit_heads * self.rows * self.head_dim
    }

    /// Floats of `scores` and of `head_major` for `seqs` sequences.
    fn scratch(&self, seqs: usize) -> (usize, usize) {
        let tasks = seqs * self.units;
        (tasks * self.scores_chunk(), tasks * self.head_chunk())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::native::dual_chunk::{INTER, INTRA, SUCCESSIVE};
    use crate::backend::native::kernels::available;

    fn values(n: usize, seed: f32) -> Vec<f32> {
        (0..n).map(|i| ((i as f32 + seed) * 0.7318).sin()).collect()
    }

    #[test]
    fn linear_paths_agree() {
        // 300 output rows: the f16 prefill path widens several blocks of rows.
        let (n, k) = (300, 40);
        let w32 = values(n * k, 1.0);
        let w16: Vec<f16> = w32.iter().map(|&x| f16::from_f32(x)).collect();
        let bias = values(n, 2.0);
        let x = values(3 * k, 3.0);
        let pool = Pool::new(2).unwrap();
        for kernels in available() {
            for data in [MatData::F32(&w32), MatData::F16(&w16)] {
                let w = MatRef {
                    data,
                    rows: n,
                    cols: k,
                };
                let mut scratch = Scratch::new(k, 3, pool.threads(), true);
                let mut batched = vec![0.0; 3 * n];
                kernels.linear(
                    &pool,
                    &w,
                    Some(&bias),
                    &x,
                    Rows::Prompt(3),
                    &mut batched,
                    &mut scratch,
                );
                for r in 0..3 {
                    let mut single = vec![0.0; n];
                    kernels.linear(
                        &pool,
                        &w,
                        Some(&bias),
                        &x[r * k..],
                        Rows::Prompt(1),
                        &mut single,
                        &mut scratch,
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
                        assert!((batched[r * n + j] - naive).abs() < tol, "{}", kernels.name);
                        assert!(
                            (single[j] - batched[r * n + j]).abs() < 1e-4,
                            "{}",
                            kernels.name
                        );
                    }
                }
            }
        }
    }

    /// Straightforward attention for one query row: `queries[t]` scores key `t` (the same
    /// query for every key but with Dual Chunk Attention's copies), for comparison.
    fn naive(queries: &[&[f32]], keys: &[Vec<f32>], values: &[Vec<f32>], scale: f32) -> Vec<f32> {
        let scores: Vec<f32> = keys
            .iter()
            .zip(queries)
            .map(|(k, q)| k.iter().zip(q.iter()).map(|(a, b)| a * b).sum::<f32>() * scale)
            .collect();
        let max = scores.iter().cloned().fold(f32::NEG_INFINITY, f32::max);
        let e: Vec<f32> = scores.iter().map(|s| (s - max).exp()).collect();
        let sum: f32 = e.iter().sum();
        let mut out = vec![0.0; values[0].len()];
        for (p, v) in e.iter().zip(values) {
            for (o, x) in out.iter_mut().zip(v) {
                *o += p / sum * x;
            }
        }
        out
    }

    /// Every path (grouped f32 and f16, per head) with and without a sliding window and Dual Chunk
    /// Attention, against `naive`; with DCA each key is scored by the query copy of its chunk's
    /// relation to the query's (chunks of 4 here: the last rows see all three kinds of keys),
    /// in a short cache and one of 590 positions (a window of 300, 147 chunks); two sequences
    /// in each call.
    #[test]
    fn attention_with_and_without_window_and_dual_chunks() {
        let (heads, hd) = (4, 8);
        let dca = DualChunk::from_config(&crate::bundle::DualChunkConfig {
            chunk_size: 5,
            local_size: 1,
        })
        .unwrap();
        let pool = Pool::new(2).unwrap();
        // (capacity, cached positions, rows at the end of them, a window)
        for (capacity, len, rows, window) in [(16, 11, 3, 4), (600, 590, 5, 300)] {
            let first = len - rows;
            for kv_heads in [2, 4] {
                // Values an f16 cache holds exactly, so both caches are checked against the
                // same sums.
                let halves = |v: Vec<f32>| -> Vec<f32> {
                    v.into_iter().map(|x| f16::from_f32(x).to_f32()).collect()
                };
                let k_cache = halves(values(kv_heads * capacity * hd, 5.0));
                let v_cache = halves(values(kv_heads * capacity * hd, 6.0));
                let k_half: Vec<f16> = k_cache.iter().map(|&x| f16::from_f32(x)).collect();
                let v_half: Vec<f16> = v_cache.iter().map(|&x| f16::from_f32(x)).collect();
                let cases = [
                    (None, None),
                    (Some(window), None),
                    (None, Some(dca)),
                    (Some(window + 2), Some(dca)),
                ];
                for (kernels, half) in available()
                    .into_iter()
                    .flat_map(|k| [(k, false), (k, true)])
                {
                    for (window, dual_chunk) in cases {
                        let shape = AttentionShape {
                            heads,
                            kv_heads,
                            head_dim: hd,
                            scale: 0.35,
                            window,
                            dual_chunk,
                        };
                        let copies = shape.query_copies();
                        // Two sequences in one call over the same cache: `rows` rows from
                        // `first`, and one row before them.
                        let parts = [(first, rows, 0), (first - 1, 1, rows)];
                        let q = values((rows + 1) * copies * heads * hd, 7.0);
                        let mut out = vec![0.0; (rows + 1) * heads * hd];
                        let (keys, values) = if half {
                            (KvRef::F16(&k_half), KvRef::F16(&v_half))
                        } else {
                            (KvRef::F32(&k_cache), KvRef::F32(&v_cache))
                        };
                        let seq = |i: usize| AttentionRows {
                            keys,
                            values,
                            capacity,
                            first_pos: parts[i].0,
                            rows: parts[i].1,
                        };
                        let (s, hm) = Kernels::attention_scratch(&shape, 2, &seq);
                        kernels.attention(
                            &pool,
                            &shape,
                            &q,
                            2,
                            &seq,
                            &mut vec![0.0; s],
                            &mut vec![0.0; hm],
                            &mut out,
                        );
                        for (first, rows, row0) in parts {
                            for r in 0..rows {
                                let pos = first + r;
                                let start = window.map_or(0, |w| pos + 1 - w);
                                for h in 0..heads {
                                    let g = h / (heads / kv_heads);
                                    let at = |cache: &[f32], t: usize| {
                                        cache[(g * capacity + t) * hd..][..hd].to_vec()
                                    };
                                    let keys: Vec<_> =
                                        (start..=pos).map(|t| at(&k_cache, t)).collect();
                                    let vals: Vec<_> =
                                        (start..=pos).map(|t| at(&v_cache, t)).collect();
                                    let copy = |t: usize| match dual_chunk {
                                        None => 0,
                                        Some(_) if t / 4 == pos / 4 => INTRA,
                                        Some(_) if t / 4 + 1 == pos / 4 => SUCCESSIVE,
                                        Some(_) => INTER,
                                    };
                                    let row = row0 + r;
                                    let queries: Vec<&[f32]> = (start..=pos)
                                        .map(|t| {
                                            &q[((row * copies + copy(t)) * heads + h) * hd..][..hd]
                                        })
                                        .collect();
                                    let want = naive(&queries, &keys, &vals, 0.35);
                                    let got = &out[(row * heads + h) * hd..][..hd];
                                    for (a, b) in got.iter().zip(&want) {
                                        assert!(
                                        (a - b).abs() < 1e-5,
                                        "{} {len} positions (f16 cache: {half}) kv_heads {kv_heads} window {window:?} dca {dual_chunk:?} position {pos} head {h}: {a} vs {b}",
                                        kernels.name
                                    );
                                    }
                                }
                            }
                        }
                    }
                }
            }
        }
    }
}
