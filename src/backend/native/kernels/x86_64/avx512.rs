//! The `avx512-vnni` tier: AVX-512 F/BW/VL + VNNI (`vpdpbusd`), masked loads for tails only.
//!
//! Choices and what measured them (2-core AVX-512 VNNI box, 0.5B demo model, 2 threads; the box
//! was shared with other builds throughout, so only same-run comparisons are meaningful):
//! * Decode GEMV runs the prefill tile kernel with 1 weight row × 1 token. A first version used
//!   4 rows (each activation vector feeding four rows, per-row horizontal sums amortized: ~2.4x
//!   fewer instructions than the first one-row loop); with the prefetch below, one row streams
//!   as fast on its own and measured faster end to end (Zen 5, 2026-12: int8 decode 55 -> 75
//!   tokens/s; int4 kernel 17.5 -> 21 GiB/s on 2 threads before the prefetch).
//! * Whole groups load with plain loads, only a group's tail with masked ones: on that Zen 5
//!   masked loads in every step halved the GEMV (int8 decode 48 -> 58 tokens/s, int4 51 -> 63).
//!   int4's and int4k's tail of 12 blocks (the 0.5B's 896-wide rows end in one: 3/7 of each
//!   row) loads plain too where its 64 bytes stay in the group (`plain_step`): all four
//!   weight steps and the activations' first seven (Zen 5, 2026-12-08, `cargo bench --bench
//!   kernels -- 'gemv/int4k?/avx512-vnni/|gemm/128x4864x896/int'`, three alternated rounds,
//!   medians: batch of four int4 27.3 -> 31.9 GiB/s, int4k 22.6 -> 27.5; prefill int4 266 ->
//!   313 GMAC/s, int4k 201 -> 245; GEMV on two threads int4 37.0 -> 39.0). int8's tail the
//!   same way measured within the noise, its prefill 7% slower: it keeps masked loads.
//! * int4's decode-batch tiles prefetched the tile after next whatever the rows' width: 5 KB
//!   ahead at the 1.5B's 1,536 columns, 30 KB at 8,960 (lines fetched into L1 that far
//!   ahead can leave it before they are read). Now about 8 KB ahead, in whole tiles, one to
//!   four (`tiles_ahead`): Zen 5, 2026-12-08, `QWEN2_EDGE_BENCH_COLS=N cargo bench --bench
//!   kernels -- 'gemv/int4k?/avx512-vnni/2t-batch4'`, alternated, medians of three rounds,
//!   GiB/s: 1,536 int4 38.5 -> 43.3 (38.0 -> 49.7 in another three), int4k 35.3 -> 41.6;
//!   8,960 int4 35.3 -> 38.5, int4k 35.1 -> 40.7; 896 int4 34.2 -> 35.7; 4,864 41.2 ->
//!   44.6. Three tiles at every width: 1,536 +9%, 8,960 -9%. The 1.5B int4's batch of four (`qwen2-edge bench
//!   --batch 1,4`, three alternated rounds) 127.7–133.7 -> 138.1–157.2 tokens/s. int8's
//!   batch tiles, which prefetch into L2 (below), the same way about 16 KB ahead instead of
//!   two tiles: `gemv/int8/avx512-vnni/2t-batch4`, three alternated rounds, medians, 1,536
//!   31.9 -> 34.7 GiB/s (no round overlapping), 8,960 37.2 -> 38.1, 896 and 4,864 the same;
//!   the 1.5B int8's batch of four 86.3 / 86.6 -> 98.8 / 97.5 tokens/s (two rounds).
//! * Each step prefetches the same line of a later group of every weight row: without it one
//!   thread kept too few misses in flight (Zen 5, `gemv/int8` one thread 16 -> 21 GiB/s, int4
//!   12 -> 19; a decode batch of 4 int8 sequences 77 -> 141 tokens/s). int8 prefetches the
//!   next group, int4 the fourth (Xeon, `qwen2-edge bench --variant int4 --batch 1,4`, three
//!   paired runs: one sequence 54–59 -> 59–64 tokens/s against the next group; int8 gained
//!   nothing). A decode batch's 3-row tiles (below) prefetch the same line of a later tile's
//!   rows instead: with 896-wide rows the next group mostly lay in the tile's own next row
//!   (Xeon, `qwen2-edge bench --prompt-tokens 448 --gen-tokens 64 --batch 1,4`, two paired
//!   runs: batch 4 int8 137–138 -> 143–144 tokens/s, int4 153–156 -> 165–166; two tiles
//!   ahead measured the same there). On Zen 4 (2026-12, `cargo bench --bench kernels --
//!   gemv/int4/avx512-vnni/2t-batch4`, three alternated runs) int4 went 12–14 -> 15.5–16.1
//!   GiB/s with two tiles ahead and a fifth prefetch per group (four lines cover 256 of its
//!   288 bytes); one tile ahead with the fifth was no better than without, int8 (whose groups
//!   are whole lines) gained nothing from two tiles, and the fifth prefetch slowed the
//!   one-row GEMV (1 thread 16–17.5 -> 13–15.6 GiB/s), which keeps four. int8 batch tiles
//!   prefetch the tile after next into L2 (`_MM_HINT_T1`) instead of the next into L1: 17.4–18.3
//!   -> 26.3–34.7 GiB/s, batch-4 decode 118–120 -> 179–186 tokens/s (int4's tiles, with more
//!   arithmetic per line, were slower with it: 17–18 -> 12–14 GiB/s). A one-row GEMV also asks
//!   for the line four groups past its L1 prefetch into L2: int8 1 thread 12.6–15.5 -> 17–18.5
//!   GiB/s, int4 12.4–14.3 -> 13.8–17.3 (three alternated runs; one-sequence decode int8 50–52
//!   -> 52–58 tokens/s, int4 71–73 -> 77–81). Prefill tiles keep the near prefetch alone: their
//!   weight rows stay in cache across the activation rows; the far one cost 3% of int8 prefill
//!   on the Xeon, the L2 one 8% of int4 prefill here.
//! * Prefill: 3 × 4 tiles (3 weight rows × 4 tokens). On a 2-core Xeon (Sapphire Rapids
//!   class, 2026-12) `cargo bench --bench kernels -- gemm/128x4864x896` measured, in GMAC/s
//!   over 2 threads, int4: 2 × 4 165, 4 × 2 177, 3 × 3 185, 3 × 4 190, 4 × 3 144 and 5 × 2 136
//!   (spills); int8: 2 × 4 166, 4 × 3 195, 3 × 4 198. A decode batch of up to 4 sequences takes
//!   3-row tiles too: against one row, `qwen2-edge bench --variant int8 --prompt-tokens 448
//!   --batch 1,4` went 104-107 -> 112-115 tokens/s at batch 4 on that Xeon.
//! * The tiles' code shape (Zen 4, 2026-12-05, `cargo bench --bench kernels -- 'gemm/128x4864x896|
//!   gemv/int[48]/avx512'`, three alternated runs, GMAC/s or GiB/s on 2 threads, before -> after):
//!   one loop body for whole and tail groups (a runtime mask), a runtime int4/int4k branch, float
//!   sums passed by reference and `array::from_fn` closures (not inlined: a call per result) had
//!   the compiler keep the sums in memory and reload addresses every step (a fifth of `perf`'s
//!   samples were stack loads and stores, a fifth `vpdpbusd`). Now whole groups and the tail are
//!   separate instantiations (`WHOLE`), so are the scales' sources (`FORMAT`: int4's, int4k's
//!   codes, int4k's decoded ahead, the last as plain pointers), the sums pass by value, and a
//!   tile's sums are reduced together (`sums`): int4 prefill 139–146 -> 188–196, int8 180–184
//!   -> 208–230, int4k 80–92 -> 134–137, int4 `2t-batch4` 12.3–14.1 -> 16.9–17.1. A sixth
//!   prefetch per group for batch tiles (each group's line at 256 bytes, which the others missed
//!   when a group started late in a line): 16.4–17.6 -> 17.9–19.2. One-row GEMVs unchanged
//!   within the noise.
//! * Grouped attention's value sums (`grouped_mix`, the generic loop compiled here): 7 heads × 64
//!   columns of outputs in 28 registers while the value rows stream past, instead of a `gemm`
//!   crate product that packed the values first. Xeon, `qwen2-edge bench --variant int4
//!   --prompt-tokens 448 --batch 1,4`, two paired runs: batch 4 155–154 -> 158–155 tokens/s (the
//!   same to +2%), prefill unchanged; the AVX2 tier the same within noise.
//! * Grouped attention's scores (`grouped_scores`): the `gemm` crate's product packed the keys
//!   anew for every query row (10% of a 4-sequence int4 decode step at 440 positions, `perf` on
//!   `scripts/service-load.sh`, Zen 4). Now each block of 16 keys stays in L1 while every query
//!   head takes its 16 dot products, summed together by `tree_sums` (an earlier version reducing
//!   per pair of keys had been 6% slower in prefill than the `gemm` product). Zen 4, 2026-12-05,
//!   alternated runs: `cargo bench --bench kernels -- attention/14x2x64@448` 21.5–23.3 ->
//!   16.0–18.1 µs (the AVX2 tier's 8-key version 24.3–25.4 -> 19.2–21.1); `qwen2-edge bench
//!   --variant int4 --long-prompt-tokens 2048` prefill 295–308 -> 326–339 tokens/s.

use super::*;
use crate::backend::native::kernels::{complete_tier, Kernels};
use tiles::{tile_q4, tile_q4_gemv, tile_q4_stream, tile_q8, tile_q8_gemv, tile_q8_stream};
type T = Avx512Vnni;

pub static TABLE: Kernels = complete_tier!("avx512-vnni");
// q6k: the AVX2 code of every x86 tier (q6k.rs says why).
pub use super::q6k::{gemm_q6, gemv_q6};
pub use generic::gemm_xwt;

safe!(T, gemv_q8 => gemv_q8_imp(w: Q8Ref, first: usize, x: QRow, out: &mut [f32]));
safe!(T, gemv_q4 => gemv_q4_imp(w: Q4Ref, first: usize, x: QRow, out: &mut [f32]));
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
safe!(T, gemm_q8 => gemm_q8_imp(w: Q8Ref, acts: &QActs, out: &mut ColumnBlock<'_>));
safe!(T, gemm_q4 => gemm_q4_imp(w: Q4Ref, acts: &QActs, out: &mut ColumnBlock<'_>));

gemv_tiled!(
    gemv_q8_imp,
    tile_q8_gemv,
    Q8Ref,
    "avx512f,avx512bw,avx512vl,avx512vnni",
    1
);
gemv_tiled!(
    gemv_q4_imp,
    tile_q4_gemv,
    Q4Ref,
    "avx512f,avx512bw,avx512vl,avx512vnni",
    1
);
gemm_tiled!(
    gemm_q8_imp,
    tile_q8,
    Q8Ref,
    "avx512f,avx512bw,avx512vl,avx512vnni",
    3,
    4,
    tile_q8_stream,
    3
);
gemm_tiled!(
    gemm_q4_imp,
    tile_q4,
    Q4Ref,
    "avx512f,avx512bw,avx512vl,avx512vnni",
    3,
    4,
    tile_q4_stream,
    3
);

/// Byte mask of the first `n` (≤ 64) bytes.
#[inline(always)]
pub(super) fn bytes_mask(n: usize) -> __mmask64 {
    if n >= 64 {
        !0
    } else {
        (1u64 << n) - 1
    }
}

#[inline(always)]
pub(super) fn lanes_mask(n: usize) -> __mmask16 {
    if n >= 16 {
        !0
    } else {
        ((1u32 << n) - 1) as u16
    }
}

/// Σ a·b over 64 floats a step with four accumulators, a masked tail.
#[target_feature(enable = "avx512f")]
unsafe fn dot_f32_imp(a: &[f32], b: &[f32]) -> f32 {
    let n = a.len().min(b.len());
    let (pa, pb) = (a.as_ptr(), b.as_ptr());
    let mut acc = [_mm512_setzero_ps(); 4];
    let mut i = 0;
    // SAFETY: every load reads floats i..i+16 with i + 16 ≤ n, or is masked to n.
    unsafe {
        while i + 64 <= n {
            for (j, acc) in acc.iter_mut().enumerate() {
                let o = i + 16 * j;
                *acc =
                    _mm512_fmadd_ps(_mm512_loadu_ps(pa.add(o)), _mm512_loadu_ps(pb.add(o)), *acc);
            }
            i += 64;
        }
        while i < n {
            let k = lanes_mask(n - i);
            let x = _mm512_maskz_loadu_ps(k, pa.add(i));
            let y = _mm512_maskz_loadu_ps(k, pb.add(i));
            acc[0] = _mm512_fmadd_ps(x, y, acc[0]);
            i += 16;
        }
    }
    let s = _mm512_add_ps(_mm512_add_ps(acc[0], acc[1]), _mm512_add_ps(acc[2], acc[3]));
    _mm512_reduce_add_ps(s)
}

#[target_feature(enable = "avx512f")]
unsafe fn gemv_f32_imp(w: &[f32], x: &[f32], out: &mut [f32]) {
    let k = x.len();
    assert!(w.len() >= out.len() * k);
    for (o, row) in out.iter_mut().zip(w.chunks_exact(k)) {
        // SAFETY: same features as this function.
        *o = unsafe { dot_f32_imp(row, x) };
    }
}

/// Rows are taken four at a time: four weight streams in flight, each `x` vector loaded once
/// for all four, the same rows of the next group prefetched; each row sums in the same order
/// as alone (two accumulators over alternate 16-wide blocks), so results do not depend on the
/// tiling.
#[target_feature(enable = "avx512f,f16c")]
unsafe fn gemv_f16_imp(w: &[f16], x: &[f32], out: &mut [f32]) {
    const ROWS: usize = 4;
    let k = x.len();
    assert!(w.len() >= out.len() * k);
    let px = x.as_ptr();
    let tiled = out.len() / ROWS * ROWS;
    for (t, o) in out[..tiled].chunks_exact_mut(ROWS).enumerate() {
        let pw = w[t * ROWS * k..].as_ptr() as *const u16;
        let mut acc = [[_mm512_setzero_ps(); 2]; ROWS];
        let mut i = 0;
        // SAFETY: loads read elements i..i+16 < k of rows t*4..t*4+4 (inside `w`, asserted
        // above) and of x, or are masked; prefetches do not fault and their addresses are
        // computed with wrapping arithmetic.
        unsafe {
            while i + 32 <= k {
                let xv = [_mm512_loadu_ps(px.add(i)), _mm512_loadu_ps(px.add(i + 16))];
                for (r, acc) in acc.iter_mut().enumerate() {
                    let row = pw.add(r * k + i);
                    _mm_prefetch::<_MM_HINT_T0>(row.wrapping_add(ROWS * k) as *const i8);
                    for (j, acc) in acc.iter_mut().enumerate() {
                        let wv =
                            _mm512_cvtph_ps(_mm256_loadu_si256(row.add(16 * j) as *const __m256i));
                        *acc = _mm512_fmadd_ps(wv, xv[j], *acc);
                    }
                }
                i += 32;
            }
            while i < k {
                let m = lanes_mask(k - i);
                let xv = _mm512_maskz_loadu_ps(m, px.add(i));
                for (r, acc) in acc.iter_mut().enumerate() {
                    let at = pw.add(r * k + i) as *const i16;
                    let wv = _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(m, at));
                    acc[0] = _mm512_fmadd_ps(wv, xv, acc[0]);
                }
                i += 16;
            }
        }
        for (o, acc) in o.iter_mut().zip(acc) {
            *o = _mm512_reduce_add_ps(_mm512_add_ps(acc[0], acc[1]));
        }
    }
    for (o, row) in out[tiled..].iter_mut().zip(w[tiled * k..].chunks_exact(k)) {
        let (pw, px) = (row.as_ptr() as *const u16, x.as_ptr());
        let mut acc = [_mm512_setzero_ps(); 2];
        let mut i = 0;
        // SAFETY: loads read elements i..i+16 < k of the row and of x, or are masked.
        unsafe {
            while i + 32 <= k {
                for (j, acc) in acc.iter_mut().enumerate() {
                    let o = i + 16 * j;
                    let wv = _mm512_cvtph_ps(_mm256_loadu_si256(pw.add(o) as *const __m256i));
                    *acc = _mm512_fmadd_ps(wv, _mm512_loadu_ps(px.add(o)), *acc);
                }
                i += 32;
            }
            while i < k {
                let m = lanes_mask(k - i);
                let wv = _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(m, pw.add(i) as *const i16));
                acc[0] = _mm512_fmadd_ps(wv, _mm512_maskz_loadu_ps(m, px.add(i)), acc[0]);
                i += 16;
            }
        }
        *o = _mm512_reduce_add_ps(_mm512_add_ps(acc[0], acc[1]));
    }
}

#[target_feature(enable = "avx512f,avx512bw,avx512vl,f16c")]
unsafe fn axpy_f16_imp(a: f32, x: &[f16], y: &mut [f32]) {
    let n = x.len().min(y.len());
    let av = _mm512_set1_ps(a);
    let (px, py) = (x.as_ptr() as *const i16, y.as_mut_ptr());
    let mut i = 0;
    // SAFETY: elements i..i+16 ≤ n, or masked to n.
    unsafe {
        while i < n {
            let m = lanes_mask(n - i);
            let xv = _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(m, px.add(i)));
            let yv = _mm512_fmadd_ps(av, xv, _mm512_maskz_loadu_ps(m, py.add(i)));
            _mm512_mask_storeu_ps(py.add(i), m, yv);
            i += 16;
        }
    }
}

#[target_feature(enable = "avx512f,avx512bw,f16c")]
unsafe fn widen_f16_imp(src: &[f16], dst: &mut [f32]) {
    let n = src.len().min(dst.len());
    let (ps, pd) = (src.as_ptr() as *const i16, dst.as_mut_ptr());
    let mut i = 0;
    // SAFETY: elements i..i+16 ≤ n, or masked to n.
    unsafe {
        while i < n {
            let m = lanes_mask(n - i);
            let v = _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(m, ps.add(i)));
            _mm512_mask_storeu_ps(pd.add(i), m, v);
            i += 16;
        }
    }
}

// Elementwise kernels: the generic code (with its libm-free exp) compiled for 512-bit
// vectors; LLVM vectorizes it once the target features allow. Only features the tier's token
// checks are enabled (not AVX-512 DQ: a VNNI CPU without DQ must be able to run them).
/// The generic loop under this tier's features: its 64-wide accumulator becomes registers.
#[target_feature(enable = "avx512f,avx512bw,avx512vl")]
unsafe fn weighted_sum_imp(p: &[f32], rows: &[f32], out: &mut [f32]) {
    generic::weighted_sum(p, rows, out)
}

#[target_feature(enable = "avx512f,avx512bw,avx512vl")]
unsafe fn rmsnorm_imp(x: &[f32], w: &[f32], eps: f32, out: &mut [f32]) {
    generic::rmsnorm(x, w, eps, out)
}

#[target_feature(enable = "avx512f,avx512bw,avx512vl")]
unsafe fn rope_imp(x: &mut [f32], cos: &[f32], sin: &[f32]) {
    generic::rope(x, cos, sin)
}

#[target_feature(enable = "avx512f,avx512bw,avx512vl")]
unsafe fn silu_mul_imp(gate: &mut [f32], up: &[f32]) {
    generic::silu_mul(gate, up)
}

#[target_feature(enable = "avx512f,avx512bw,avx512vl")]
unsafe fn softmax_imp(x: &mut [f32]) {
    generic::softmax(x)
}

/// `generic::quantize_row`'s bytes, a 32-element block per two vectors: the same amax (NaN
/// ignored), the same scalar scale, IEEE products, clamped to ±127, rounded to nearest even,
/// NaN to 0; each block's 8 four-byte steps then go to their places in the lane layout. A row
/// whose padded blocks run past `x` goes through the generic code (the model's widths are
/// whole groups). The generic loop was 9% of an int4 prefill on a 2-core Xeon (`perf`).
#[target_feature(enable = "avx512f,avx512bw,avx512vl")]
unsafe fn quantize_row_imp(x: &[f32], q: &mut [i8], s: &mut [f32], z: &mut [i32]) {
    let nb = s.len();
    if x.len() < nb * BLOCK || q.len() < nb * BLOCK || z.len() < nb {
        return generic::quantize_row(x, q, s, z);
    }
    let (lo, hi) = (_mm512_set1_ps(-127.0), _mm512_set1_ps(127.0));
    for (first, lanes) in groups(nb) {
        let base = first * BLOCK;
        for lane in 0..lanes {
            let b = first + lane;
            let mut bytes = [0i8; BLOCK];
            // SAFETY: elements b*32..b*32+32 < x.len() (checked above); the stores write the
            // 32 bytes of `bytes`.
            let sum = unsafe {
                let p = x.as_ptr().add(b * BLOCK);
                let v = [_mm512_loadu_ps(p), _mm512_loadu_ps(p.add(16))];
                // |v| with NaN lanes as 0, which is what f32::max's fold ignores them to.
                let abs = v.map(|v| {
                    _mm512_maskz_mov_ps(_mm512_cmp_ps_mask::<_CMP_ORD_Q>(v, v), _mm512_abs_ps(v))
                });
                let amax = _mm512_reduce_max_ps(_mm512_max_ps(abs[0], abs[1]));
                let (scale, inv) = if amax > 0.0 {
                    (amax / 127.0, 127.0 / amax)
                } else {
                    (0.0, 0.0)
                };
                s[b] = scale;
                let iv = _mm512_set1_ps(inv);
                let mut total = _mm512_setzero_si512();
                for (h, v) in v.into_iter().enumerate() {
                    let prod = _mm512_mul_ps(v, iv);
                    let ordered = _mm512_cmp_ps_mask::<_CMP_ORD_Q>(prod, prod);
                    let clamped = _mm512_min_ps(_mm512_max_ps(prod, lo), hi);
                    let qi = _mm512_maskz_cvt_roundps_epi32::<
                        { _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC },
                    >(ordered, clamped);
                    total = _mm512_add_epi32(total, qi);
                    let packed = _mm512_cvtepi32_epi8(qi);
                    _mm_storeu_si128(bytes.as_mut_ptr().add(16 * h) as *mut __m128i, packed);
                }
                _mm512_reduce_add_epi32(total)
            };
            z[b] = sum;
            for (step, chunk) in bytes.chunks_exact(4).enumerate() {
                let at = base
                    + crate::backend::native::kernels::quant::lane_offset(lanes, lane, 4 * step);
                q[at..at + 4].copy_from_slice(chunk);
            }
        }
    }
}

/// The sums of 16 vectors: `v[n]`'s in lane `4 * (n % 4) + n / 4`. Each adds its 128-bit
/// quarters as 0 + 2 and 1 + 3, those two, then its four lanes as (0 + 2) + (1 + 3), the
/// order of `_mm512_reduce_add_ps`.
#[target_feature(enable = "avx512f")]
#[inline]
fn tree_sums(v: [__m512; 16]) -> __m512 {
    // [a0 + a2, a1 + a3, b0 + b2, b1 + b3] in quarters, for pairs (a, b).
    let mut halves = [_mm512_setzero_ps(); 8];
    for (k, h) in halves.iter_mut().enumerate() {
        let (a, b) = (v[2 * k], v[2 * k + 1]);
        let low = _mm512_shuffle_f32x4::<0b01_00_01_00>(a, b);
        let high = _mm512_shuffle_f32x4::<0b11_10_11_10>(a, b);
        *h = _mm512_add_ps(low, high);
    }
    // Quarter q of `quarters[m]`: four lanes that sum to v[4m + q]'s total.
    let mut quarters = [_mm512_setzero_ps(); 4];
    for (m, q) in quarters.iter_mut().enumerate() {
        let (a, b) = (halves[2 * m], halves[2 * m + 1]);
        let even = _mm512_shuffle_f32x4::<0b10_00_10_00>(a, b);
        let odd = _mm512_shuffle_f32x4::<0b11_01_11_01>(a, b);
        *q = _mm512_add_ps(even, odd);
    }
    let pair =
        |a: __m512, b: __m512| _mm512_add_ps(_mm512_unpacklo_ps(a, b), _mm512_unpackhi_ps(a, b));
    let (ab, cd) = (
        _mm512_castps_pd(pair(quarters[0], quarters[1])),
        _mm512_castps_pd(pair(quarters[2], quarters[3])),
    );
    _mm512_add_ps(
        _mm512_castpd_ps(_mm512_unpacklo_pd(ab, cd)),
        _mm512_castpd_ps(_mm512_unpackhi_pd(ab, cd)),
    )
}

/// `generic::grouped_scores` (the attention scores of `m` query heads sharing one key head)
/// without the `gemm` crate, whose product packed the keys anew for every query row: 10% of a
/// 4-sequence int4 decode step at 440 positions (`perf`, `scripts/service-load.sh`). Here a
/// block of 16 keys stays in L1 while each head takes its 16 dot products into 16 accumulators,
/// summed together by `tree_sums`; head widths that are not a multiple of 16 (none of Qwen2's)
/// take the generic product.
#[target_feature(enable = "avx512f")]
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
            64 => grouped_scores_chunks::<4>(q, qs, m, keys, n, scale, out, os),
            128 => grouped_scores_chunks::<8>(q, qs, m, keys, n, scale, out, os),
            32 => grouped_scores_chunks::<2>(q, qs, m, keys, n, scale, out, os),
            16 => grouped_scores_chunks::<1>(q, qs, m, keys, n, scale, out, os),
            _ => generic::grouped_scores(q, qs, m, keys, n, k, scale, out, os),
        }
    }
}

/// `grouped_scores` for heads of `16 * CHUNKS` floats: constant offsets within a block of keys.
#[target_feature(enable = "avx512f")]
#[allow(clippy::too_many_arguments, clippy::needless_range_loop)]
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
    let k = 16 * CHUNKS;
    if !generic::grouped_scores_operands(q, qs, m, keys, n, k, out, os) {
        return;
    }
    // Lane l of `tree_sums` holds vector 4 * (l % 4) + l / 4's sum: this puts key t in lane t.
    let order = _mm512_setr_epi32(0, 4, 8, 12, 1, 5, 9, 13, 2, 6, 10, 14, 3, 7, 11, 15);
    let scale_v = _mm512_set1_ps(scale);
    let (pq, po) = (q.as_ptr(), out.as_mut_ptr());
    let whole = n / 16 * 16;
    // SAFETY: query i's floats i * qs..i * qs + k and key t's t * k..(t + 1) * k are inside
    // their slices (`grouped_scores_operands`), block loads read keys j0..j0 + 16 ≤ whole ≤ n;
    // outputs i * os + j for j < n are inside `out` (checked there too).
    unsafe {
        for j0 in (0..whole).step_by(16) {
            let block = keys.as_ptr().add(j0 * k);
            for i in 0..m {
                let qi = pq.add(i * qs);
                let mut acc = [_mm512_setzero_ps(); 16];
                for c in 0..CHUNKS {
                    let qv = _mm512_loadu_ps(qi.add(16 * c));
                    for t in 0..16 {
                        let kv = _mm512_loadu_ps(block.add(t * k + 16 * c));
                        acc[t] = _mm512_fmadd_ps(kv, qv, acc[t]);
                    }
                }
                let sums = _mm512_permutexvar_ps(order, tree_sums(acc));
                _mm512_storeu_ps(po.add(i * os + j0), _mm512_mul_ps(sums, scale_v));
            }
        }
        // The last keys one at a time.
        for j in whole..n {
            let key = keys.as_ptr().add(j * k);
            for i in 0..m {
                let qi = pq.add(i * qs);
                let mut acc = _mm512_setzero_ps();
                for c in 0..CHUNKS {
                    let kv = _mm512_loadu_ps(key.add(16 * c));
                    acc = _mm512_fmadd_ps(kv, _mm512_loadu_ps(qi.add(16 * c)), acc);
                }
                *po.add(i * os + j) = _mm512_reduce_add_ps(acc) * scale;
            }
        }
    }
}

/// Prefill products with quantized weights: tiles of `R` weight rows × `C` activation rows.
/// Each unpacked weight vector feeds `C` dot products and each activation vector `R`, so a
/// 3 × 4 int4 tile does 96 `vpdpbusd` per 16-block group for 36 unpacking and 44 load
/// instructions, against 8 per 20 in a one-row loop. 12 int32 + 12 float accumulators, 6
/// weight and 2 activation vectors fill the 32 zmm registers (the nibble mask can be a memory
/// operand); 4 × 3 and 5 × 2 spill (module comment).
mod tiles {
    use super::*;
    use crate::backend::native::kernels::quant::Q4_BLOCK_BYTES;

    /// The bytes of `mask` at `p`: a plain load for a whole group (all ones), which this
    /// loop mostly loads; masked loads measured twice as slow in it on Zen 5.
    #[target_feature(enable = "avx512f,avx512bw")]
    #[inline]
    unsafe fn load_bytes(mask: __mmask64, p: *const i8) -> __m512i {
        if mask == !0 {
            // SAFETY: the caller's 64 bytes at `p` are readable (the mask selects all).
            unsafe { _mm512_loadu_si512(p as *const __m512i) }
        } else {
            // SAFETY: the caller's masked bytes at `p` are readable; the rest are not touched.
            unsafe { _mm512_maskz_loadu_epi8(mask, p) }
        }
    }

    /// A group step's 64 bytes at `p`: a plain load where `plain_step` allows one, else
    /// `load_bytes`.
    #[target_feature(enable = "avx512f,avx512bw")]
    #[inline]
    unsafe fn load_step(plain: bool, mask: __mmask64, p: *const i8) -> __m512i {
        if plain {
            // SAFETY: the caller's 64 bytes at `p` are readable (`plain_step`).
            unsafe { _mm512_loadu_si512(p as *const __m512i) }
        } else {
            // SAFETY: the caller's masked bytes at `p` are readable.
            unsafe { load_bytes(mask, p) }
        }
    }

    /// `load_bytes` for 16 lanes of i32, i16 and f32 (a group's per-block values).
    #[target_feature(enable = "avx512f,avx512bw,avx512vl")]
    #[inline]
    unsafe fn load_i32(mask: __mmask16, p: *const i32) -> __m512i {
        if mask == !0 {
            // SAFETY: as in `load_bytes`, 16 i32 at `p`.
            unsafe { _mm512_loadu_si512(p as *const __m512i) }
        } else {
            // SAFETY: as in `load_bytes`.
            unsafe { _mm512_maskz_loadu_epi32(mask, p) }
        }
    }

    #[target_feature(enable = "avx512f,avx512bw,avx512vl")]
    #[inline]
    unsafe fn load_i16(mask: __mmask16, p: *const i16) -> __m256i {
        if mask == !0 {
            // SAFETY: as in `load_bytes`, 16 i16 at `p`.
            unsafe { _mm256_loadu_si256(p as *const __m256i) }
        } else {
            // SAFETY: as in `load_bytes`.
            unsafe { _mm256_maskz_loadu_epi16(mask, p) }
        }
    }

    #[target_feature(enable = "avx512f,avx512bw,avx512vl")]
    #[inline]
    unsafe fn load_f32(mask: __mmask16, p: *const f32) -> __m512 {
        if mask == !0 {
            // SAFETY: as in `load_bytes`, 16 f32 at `p`.
            unsafe { _mm512_loadu_ps(p) }
        } else {
            // SAFETY: as in `load_bytes`.
            unsafe { _mm512_maskz_loadu_ps(mask, p) }
        }
    }

    /// `(scale, min)` of each block of an int4k group of `lanes` blocks from its codes at `p`
    /// (right after the nibbles; quant.rs), as `quant::q4k_scale_min` computes them.
    #[target_feature(enable = "avx512f,avx512bw,avx512vl")]
    #[inline]
    unsafe fn kquant_scales(p: *const u8, lanes: usize) -> (__m512, __m512) {
        // SAFETY: the caller's group holds `lanes` code bytes at `p`, then `lanes / 2` bytes of
        // top bits and 4 bytes per super-block: 32 bytes for a full group, read at once;
        // otherwise the masked loads touch only those.
        unsafe {
            let (codes, tops, sup) = if lanes == GROUP {
                // Masked loads are slower on AMD (`load_bytes`); a full group's codes, top bits
                // and super-block scales are one 32-byte load.
                let tail = _mm256_loadu_si256(p as *const __m256i);
                let high = _mm256_extracti128_si256::<1>(tail);
                (
                    _mm256_castsi256_si128(tail),
                    high,
                    _mm_srli_si128::<8>(high),
                )
            } else {
                let tops = p.add(lanes) as *const i8;
                // [d0, dmin0, d1, dmin1] (the second pair only in a group of more than 8 blocks).
                let pairs = if lanes > 8 { 0b1111 } else { 0b11 };
                (
                    _mm_maskz_loadu_epi8(super::lanes_mask(lanes), p as *const i8),
                    _mm_maskz_loadu_epi8(super::lanes_mask(lanes / 2), tops),
                    _mm_maskz_loadu_epi16(pairs, p.add(lanes + lanes / 2) as *const i16),
                )
            };
            let low = _mm512_cvtepu8_epi32(codes);
            // Byte i of the top bits holds blocks 2i (low nibble) and 2i + 1 (high nibble).
            let pairs = _mm512_setr_epi32(0, 0, 1, 1, 2, 2, 3, 3, 4, 4, 5, 5, 6, 6, 7, 7);
            let tops = _mm512_permutexvar_epi32(pairs, _mm512_cvtepu8_epi32(tops));
            let halves = _mm512_setr_epi32(0, 4, 0, 4, 0, 4, 0, 4, 0, 4, 0, 4, 0, 4, 0, 4);
            let tops = _mm512_srlv_epi32(tops, halves);
            let sc_top = _mm512_slli_epi32(_mm512_and_si512(tops, _mm512_set1_epi32(3)), 4);
            let m_top = _mm512_slli_epi32(_mm512_and_si512(tops, _mm512_set1_epi32(12)), 2);
            let sc = _mm512_or_si512(_mm512_and_si512(low, _mm512_set1_epi32(15)), sc_top);
            let m = _mm512_or_si512(_mm512_srli_epi32(low, 4), m_top);
            let sup = _mm512_cvtph_ps(_mm256_zextsi128_si256(sup));
            let d = _mm512_permutexvar_ps(
                _mm512_setr_epi32(0, 0, 0, 0, 0, 0, 0, 0, 2, 2, 2, 2, 2, 2, 2, 2),
                sup,
            );
            let dmin = _mm512_permutexvar_ps(
                _mm512_setr_epi32(1, 1, 1, 1, 1, 1, 1, 1, 3, 3, 3, 3, 3, 3, 3, 3),
                sup,
            );
            let scale = _mm512_mul_ps(d, _mm512_cvtepi32_ps(sc));
            (scale, _mm512_mul_ps(dmin, _mm512_cvtepi32_ps(m)))
        }
    }

    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni")]
    #[inline]
    unsafe fn tile_q4_imp<const R: usize, const C: usize, const MODE: u8>(
        w: Q4Ref,
        j: usize,
        xs: [QRow; C],
    ) -> [[f32; C]; R] {
        // One instantiation per format: the format's branches out of the group loop.
        // SAFETY: the caller's contract, passed on.
        unsafe {
            if !w.kquant {
                tile_q4_format::<R, C, MODE, INT4>(w, j, xs)
            } else if w.decoded.is_some() {
                tile_q4_format::<R, C, MODE, INT4K_DECODED>(w, j, xs)
            } else {
                tile_q4_format::<R, C, MODE, INT4K>(w, j, xs)
            }
        }
    }

    /// Where an int4 tile's block scales come from: int4's f16 scales, int4k's codes decoded
    /// in the tile, or int4k's scales and mins decoded ahead (`Q4Ref::decoded`, prefill).
    const INT4: u8 = 0;
    const INT4K: u8 = 1;
    const INT4K_DECODED: u8 = 2;

    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni")]
    #[inline]
    unsafe fn tile_q4_format<const R: usize, const C: usize, const MODE: u8, const FORMAT: u8>(
        w: Q4Ref,
        j: usize,
        xs: [QRow; C],
    ) -> [[f32; C]; R] {
        let nb = w.blocks();
        let mut rows: [&[u8]; R] = [&[]; R];
        for (r, row) in rows.iter_mut().enumerate() {
            *row = w.row(j + r);
        }
        for x in &xs {
            x.assert_blocks(nb, FORMAT != INT4);
        }
        // int4k's scales and mins decoded ahead, when they were (`nb` of each a row, checked
        // by `decoded_rows`), as pointers: the slices took registers the sums needed.
        let decoded: [(*const f32, *const f32); R] = match w.decoded_rows::<R>(j) {
            Some(rows) if FORMAT == INT4K_DECODED => rows.map(|(s, m)| (s.as_ptr(), m.as_ptr())),
            _ => [(std::ptr::null(), std::ptr::null()); R],
        };
        let mut accf = [[_mm512_setzero_ps(); C]; R];
        // Whole groups with plain loads and no masks to compute, then the tail group (4, 8 or
        // 12 blocks; `SHAPE`): one loop body with a runtime mask spilled its accumulators.
        let whole = nb / GROUP * GROUP;
        let mut fb = 0;
        while fb < whole {
            // SAFETY: the caller's contract (rows `j..j + R` exist), the lengths asserted above.
            unsafe {
                accf =
                    q4_group::<R, C, MODE, FORMAT, WHOLE>(&rows, &xs, fb, GROUP, nb, decoded, accf)
            };
            fb += GROUP;
        }
        // SAFETY: as above.
        unsafe {
            match nb - fb {
                0 => {}
                TWELVE => {
                    accf = q4_group::<R, C, MODE, FORMAT, TAIL_OF_TWELVE>(
                        &rows, &xs, fb, TWELVE, nb, decoded, accf,
                    )
                }
                lanes => {
                    accf = q4_group::<R, C, MODE, FORMAT, TAIL>(
                        &rows, &xs, fb, lanes, nb, decoded, accf,
                    )
                }
            }
        }
        sums(accf, [1.0; R])
    }

    /// Each accumulator's sum times its row's `scale`. Loops, here and for the tiles' rows, not
    /// `array::from_fn`: its closures were not inlined (calls that took 8% of int8 prefill).
    ///
    /// Three or more accumulators are summed together, 16 at a time, in a tree of shuffles
    /// (`tree_sums`) instead of one `_mm512_reduce_add_ps` each: ~36 operations for a 3 × 4
    /// tile instead of ~100, against its 192 `vpdpbusd` for an 896-wide row (int4 prefill
    /// 175 -> 195 GMAC/s, int8 202 -> 222 on Zen 4; module docs). Each sum adds its lanes in
    /// `_mm512_reduce_add_ps`'s order, so a result does not depend on the tile it was computed
    /// in (`gemm_tiled!`; `tests::tree_sums_add_as_reduce_add`).
    #[target_feature(enable = "avx512f")]
    #[inline]
    #[allow(clippy::needless_range_loop)] // `r` and `c` index the sums, results and scales
    fn sums<const R: usize, const C: usize>(
        accf: [[__m512; C]; R],
        scale: [f32; R],
    ) -> [[f32; C]; R] {
        let mut out = [[0.0; C]; R];
        if R * C < 3 {
            for r in 0..R {
                for c in 0..C {
                    out[r][c] = _mm512_reduce_add_ps(accf[r][c]) * scale[r];
                }
            }
            return out;
        }
        let mut v = [_mm512_setzero_ps(); 16];
        for r in 0..R {
            for c in 0..C {
                v[r * C + c] = accf[r][c];
            }
        }
        let mut lanes = [0.0; 16];
        // SAFETY: `lanes` holds 16 floats.
        unsafe { _mm512_storeu_ps(lanes.as_mut_ptr(), tree_sums(v)) };
        for r in 0..R {
            for c in 0..C {
                let n = r * C + c;
                out[r][c] = lanes[4 * (n % 4) + n / 4] * scale[r];
            }
        }
        out
    }

    /// How many tiles of `tile_bytes` ahead a streamed batch tile prefetches: about `bytes`,
    /// one tile at least and four at most. Two tiles whatever their width (as before
    /// 2026-12-08) were 5 KB ahead for the 1.5B's 1,536-wide int4 rows and 30 KB for its
    /// 8,960-wide ones; three were better for the first and worse for the second (Zen 5,
    /// module docs).
    #[inline(always)]
    fn tiles_ahead(tile_bytes: usize, bytes: usize) -> usize {
        (bytes / tile_bytes).clamp(1, 4)
    }

    /// How far ahead int4's batch tiles prefetch into L1 (`tiles_ahead`).
    const STREAM_AHEAD_BYTES: usize = 8192;
    /// How far ahead int8's batch tiles prefetch into L2 (`tiles_ahead`; module docs).
    const STREAM_L2_AHEAD_BYTES: usize = 16384;

    /// A group's shape (the group functions' `SHAPE`): a whole group of 16 blocks, a row's
    /// last group of 12 (the 0.5B's 896-wide rows: 28 blocks), or of 4 or 8.
    const WHOLE: u8 = 0;
    const TAIL_OF_TWELVE: u8 = 1;
    const TAIL: u8 = 2;
    const TWELVE: usize = 12;

    /// The byte and lane masks of a group of `lanes` blocks: all ones for a whole group (a
    /// constant, so its loads are plain ones).
    #[inline(always)]
    fn group_masks<const SHAPE: u8>(lanes: usize) -> (__mmask64, __mmask16) {
        if SHAPE == WHOLE {
            (!0, !0)
        } else {
            (super::bytes_mask(4 * lanes), super::lanes_mask(lanes))
        }
    }

    /// Whether the 64 bytes from activation step `step`'s start (of a group's 8 steps,
    /// `lanes` × 4 bytes each) of a group of shape `SHAPE` are read with a plain load: every
    /// step of a whole group, and of a tail of twelve blocks (48 bytes a step) all but the
    /// last, whose 64 bytes would run 16 past the group's steps; its other steps' extra 16
    /// bytes are the next step's. Masked loads ran twice as slow as plain ones on Zen 5 (`load_bytes`),
    /// and a tail of twelve is 3/7 of an 896-wide row. The lanes past the twelfth then hold
    /// other blocks' products, which the group's scales, loaded masked, multiply by zero:
    /// the same sums as masked loads give, bit for bit (an integer times +0.0 adds ±0.0 to
    /// a lane that stays +0.0).
    #[inline(always)]
    const fn plain_step<const SHAPE: u8>(step: usize) -> bool {
        SHAPE == WHOLE || (SHAPE == TAIL_OF_TWELVE && step < 7)
    }

    /// One group of `lanes` blocks from block `fb` (`SHAPE`, `lanes` as it says) of `R` int4
    /// rows times `C` activation rows, added to `accf` (returned, as in `q8_group`).
    ///
    /// # Safety
    /// The rows hold `nb` blocks (`Q4Ref::row`), the activation rows `nb` blocks each, with
    /// `block_sums` for int4k; `fb + lanes ≤ nb`.
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni")]
    #[inline]
    #[allow(clippy::too_many_arguments)]
    unsafe fn q4_group<
        const R: usize,
        const C: usize,
        const MODE: u8,
        const FORMAT: u8,
        const SHAPE: u8,
    >(
        rows: &[&[u8]; R],
        xs: &[QRow; C],
        fb: usize,
        lanes: usize,
        nb: usize,
        decoded: [(*const f32, *const f32); R],
        mut accf: [[__m512; C]; R],
    ) -> [[__m512; C]; R] {
        let bb = Q4_BLOCK_BYTES;
        let width = lanes * 4;
        let (km, kl) = group_masks::<SHAPE>(lanes);
        // SAFETY: as in `gemv_q4_imp`, for each of the R rows (nb*bb bytes, checked by
        // `Q4Ref::row`) and C activation rows (the caller's), and the decoded scales and mins
        // (nb each, asserted by `decoded_rows`); masked and plain loads stay in the group
        // (`plain_step`, and the weights' note below). The prefetch
        // addresses may lie past a row (`wrapping_add`): a prefetch never faults and reads
        // nothing into a register.
        unsafe {
            let low = _mm512_set1_epi8(0x0F);
            let mut acc = [[_mm512_setzero_si512(); C]; R];
            // int4 weights are u − 8: the dot products start at −8·Σx (int4k's take u).
            if FORMAT == INT4 {
                for c in 0..C {
                    let sums = load_i32(kl, xs[c].sums.as_ptr().add(fb));
                    let init = _mm512_sub_epi32(_mm512_setzero_si512(), _mm512_slli_epi32(sums, 3));
                    for a in acc.iter_mut() {
                        a[c] = init;
                    }
                }
            }
            // Prefetches reach lines four groups ahead (18 bytes a block, 288 a group; for
            // short rows, the next rows'), or for a streamed batch tile the same row of a
            // later tile (`tiles_ahead`): more misses in flight. One group ahead decoded 7%
            // slower (int4, one sequence; Xeon, three paired runs). A GEMV also asks for the
            // line four groups further into L2 (module docs).
            let dist = if MODE == STREAM {
                tiles_ahead(R * nb * bb, STREAM_AHEAD_BYTES) * R * nb
            } else {
                4 * GROUP
            } * bb;
            let step = |t: usize, acc: &mut [[__m512i; C]; R]| {
                let mut lo = [_mm512_setzero_si512(); R];
                let mut hi = [_mm512_setzero_si512(); R];
                for r in 0..R {
                    let ahead = fb * bb + dist + t * 64;
                    _mm_prefetch::<_MM_HINT_T0>(rows[r].as_ptr().wrapping_add(ahead) as *const i8);
                    if MODE == GEMV {
                        let far = ahead + 4 * GROUP * bb;
                        _mm_prefetch::<_MM_HINT_T1>(rows[r].as_ptr().wrapping_add(far) as *const i8);
                    }
                    if MODE == STREAM && t == 3 {
                        // A group's 288 bytes span up to six lines (it starts anywhere in
                        // one): the four above, the one at 256 and the one of its last byte
                        // cover them all; without the last two a batch tile missed lines.
                        let last = ahead - t * 64 + lanes * bb - 1;
                        _mm_prefetch::<_MM_HINT_T0>(
                            rows[r].as_ptr().wrapping_add(last) as *const i8
                        );
                        _mm_prefetch::<_MM_HINT_T0>(
                            rows[r].as_ptr().wrapping_add(ahead + 64) as *const i8
                        );
                    }
                    let p = rows[r].as_ptr().add(fb * bb + t * width);
                    // In a twelve-block tail even the last step's 64 bytes (from byte 144)
                    // end 8 or 10 before the group does, in its scales or codes (216 or 218
                    // bytes a group), so every step loads plain.
                    let v = load_step(SHAPE != TAIL, km, p as *const i8);
                    lo[r] = _mm512_and_si512(v, low);
                    hi[r] = _mm512_and_si512(_mm512_srli_epi16(v, 4), low);
                }
                for c in 0..C {
                    let xg = xs[c].q.as_ptr().add(fb * BLOCK);
                    let xl = load_step(plain_step::<SHAPE>(t), km, xg.add(t * width));
                    let xh = load_step(plain_step::<SHAPE>(t + 4), km, xg.add((t + 4) * width));
                    for r in 0..R {
                        acc[r][c] = _mm512_dpbusd_epi32(acc[r][c], lo[r], xl);
                        acc[r][c] = _mm512_dpbusd_epi32(acc[r][c], hi[r], xh);
                    }
                }
            };
            // Written out, so each step's offsets are constants: the earlier `for t in 0..4` was
            // not unrolled, and `perf` showed its addresses reloaded from the stack every step.
            step(0, &mut acc);
            step(1, &mut acc);
            step(2, &mut acc);
            step(3, &mut acc);
            for r in 0..R {
                // The group's scales, or int4k's codes, follow its nibbles.
                let p = rows[r].as_ptr().add(fb * bb + width * 4);
                let (ws, min) = if FORMAT == INT4K_DECODED {
                    let (scales, mins) = decoded[r];
                    (load_f32(kl, scales.add(fb)), load_f32(kl, mins.add(fb)))
                } else if FORMAT == INT4K {
                    kquant_scales(p, lanes)
                } else {
                    (
                        _mm512_cvtph_ps(load_i16(kl, p as *const i16)),
                        _mm512_setzero_ps(),
                    )
                };
                for c in 0..C {
                    let x = load_f32(kl, xs[c].scales.as_ptr().add(fb));
                    let d = _mm512_cvtepi32_ps(acc[r][c]);
                    accf[r][c] = _mm512_fmadd_ps(d, _mm512_mul_ps(ws, x), accf[r][c]);
                }
                if FORMAT != INT4 {
                    // int4k: − min · Σx per block.
                    for c in 0..C {
                        let bs = load_f32(kl, xs[c].block_sums.as_ptr().add(fb));
                        accf[r][c] = _mm512_fnmadd_ps(min, bs, accf[r][c]);
                    }
                }
            }
        }
        accf
    }

    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni")]
    #[inline]
    unsafe fn tile_q8_imp<const R: usize, const C: usize, const MODE: u8>(
        w: Q8Ref,
        j: usize,
        xs: [QRow; C],
    ) -> [[f32; C]; R] {
        let nb = w.blocks();
        let mut rows: [&[u8]; R] = [&[]; R];
        for (r, row) in rows.iter_mut().enumerate() {
            *row = w.row(j + r);
        }
        for x in &xs {
            x.assert_blocks(nb, false);
        }
        let mut accf = [[_mm512_setzero_ps(); C]; R];
        // Whole groups unmasked, then the tail group, as in `tile_q4_format`.
        let whole = nb / GROUP * GROUP;
        let mut fb = 0;
        while fb < whole {
            // SAFETY: the caller's contract (rows `j..j + R` exist), the lengths asserted above.
            accf = unsafe { q8_group::<R, C, MODE, WHOLE>(&rows, &xs, fb, GROUP, accf) };
            fb += GROUP;
        }
        if fb < nb {
            // SAFETY: as above.
            accf = unsafe { q8_group::<R, C, MODE, TAIL>(&rows, &xs, fb, nb - fb, accf) };
        }
        let mut scales = [0.0; R];
        scales.copy_from_slice(&w.scales[j..j + R]);
        sums(accf, scales)
    }

    /// One group of `lanes` blocks from block `fb` (`SHAPE`, `lanes` as it says) of `R` int8
    /// rows times `C` activation rows, added to `accf` (returned: by reference the sums were
    /// kept in memory).
    ///
    /// # Safety
    /// The rows and the activation rows hold at least `fb + lanes` blocks.
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni")]
    #[inline]
    unsafe fn q8_group<const R: usize, const C: usize, const MODE: u8, const SHAPE: u8>(
        rows: &[&[u8]; R],
        xs: &[QRow; C],
        fb: usize,
        lanes: usize,
        mut accf: [[__m512; C]; R],
    ) -> [[__m512; C]; R] {
        let nb = rows[0].len() / BLOCK;
        let width = lanes * 4;
        let (km, kl) = group_masks::<SHAPE>(lanes);
        // SAFETY: as in `gemv_q8_imp`, for each of the R rows (nb*32 bytes, checked by
        // `Q8Ref::row`) and C activation rows (the caller's); masked loads stay in the group.
        // The prefetch addresses may lie past a row (`wrapping_add`): a prefetch never faults
        // and reads nothing into a register.
        unsafe {
            let mut acc = [[_mm512_setzero_si512(); C]; R];
            for c in 0..C {
                let sums = load_i32(kl, xs[c].sums.as_ptr().add(fb));
                let init = _mm512_sub_epi32(_mm512_setzero_si512(), _mm512_slli_epi32(sums, 7));
                for a in acc.iter_mut() {
                    a[c] = init;
                }
            }
            // A streamed batch tile's prefetch distance into L2 (`tiles_ahead`, module docs).
            let tile = R * nb * BLOCK;
            let stream_far = tiles_ahead(tile, STREAM_L2_AHEAD_BYTES) * tile;
            for s in 0..8 {
                let mut wv = [_mm512_setzero_si512(); R];
                for r in 0..R {
                    // More misses in flight: the same line of the next group (and for a
                    // GEMV of the fourth into L2), or for a streamed batch tile of a later
                    // tile's row into L2.
                    let line = rows[r].as_ptr().wrapping_add(fb * BLOCK + s * 64);
                    if MODE == STREAM {
                        _mm_prefetch::<_MM_HINT_T1>(line.wrapping_add(stream_far) as *const i8);
                    } else {
                        let next = line.wrapping_add(GROUP * BLOCK);
                        _mm_prefetch::<_MM_HINT_T0>(next as *const i8);
                        if MODE == GEMV {
                            let far = next.wrapping_add(3 * GROUP * BLOCK);
                            _mm_prefetch::<_MM_HINT_T1>(far as *const i8);
                        }
                    }
                    let p = rows[r].as_ptr().add(fb * BLOCK + s * width);
                    wv[r] = load_bytes(km, p as *const i8);
                }
                for c in 0..C {
                    let p = xs[c].q.as_ptr().add(fb * BLOCK + s * width);
                    let xv = load_bytes(km, p);
                    for r in 0..R {
                        acc[r][c] = _mm512_dpbusd_epi32(acc[r][c], wv[r], xv);
                    }
                }
            }
            for c in 0..C {
                let x = load_f32(kl, xs[c].scales.as_ptr().add(fb));
                for r in 0..R {
                    let d = _mm512_cvtepi32_ps(acc[r][c]);
                    accf[r][c] = _mm512_fmadd_ps(d, x, accf[r][c]);
                }
            }
        }
        accf
    }

    /// Prefetch reach of a tile (`MODE`): a prefill tile's weight rows stay in cache across
    /// its activation rows (the next lines into L1 only), a one-row GEMV streams them (also
    /// lines further ahead into L2), a decode-batch tile streams them with more arithmetic
    /// per line (lines of the tile after next).
    const PREFILL: u8 = 0;
    const GEMV: u8 = 1;
    const STREAM: u8 = 2;

    /// Generates the tile functions the shared loops call, over `$imp` with each prefetch
    /// reach: `$prefill`, `$gemv` and `$stream`.
    macro_rules! tiles {
        ($imp:ident, $w:ty, $prefill:ident, $gemv:ident, $stream:ident) => {
            tiles!(@one $imp, $w, $prefill, PREFILL);
            tiles!(@one $imp, $w, $gemv, GEMV);
            tiles!(@one $imp, $w, $stream, STREAM);
        };
        (@one $imp:ident, $w:ty, $name:ident, $mode:ident) => {
            #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni")]
            #[inline]
            pub(super) unsafe fn $name<const R: usize, const C: usize>(
                w: $w,
                j: usize,
                xs: [QRow; C],
            ) -> [[f32; C]; R] {
                // SAFETY: the caller keeps `$imp`'s contract (rows `j..j + R` exist).
                unsafe { $imp::<R, C, $mode>(w, j, xs) }
            }
        };
    }
    tiles!(tile_q8_imp, Q8Ref, tile_q8, tile_q8_gemv, tile_q8_stream);
    tiles!(tile_q4_imp, Q4Ref, tile_q4, tile_q4_gemv, tile_q4_stream);

    #[cfg(test)]
    mod tests {
        use super::*;

        #[test]
        fn tree_sums_add_as_reduce_add() {
            if !is_x86_feature_detected!("avx512f") {
                eprintln!("tree_sums_add_as_reduce_add skipped: this CPU lacks AVX-512");
                return;
            }
            // Magnitudes from 1e-4 to 1e4 with both signs: any other order of the additions
            // rounds differently somewhere among these.
            let mut state = 0x2545_f491_u32;
            let mut next = move || {
                state ^= state << 13;
                state ^= state >> 17;
                state ^= state << 5;
                let mantissa = (state % 20_001) as f32 / 10_000.0 - 1.0;
                mantissa * 10f32.powi((state >> 20) as i32 % 9 - 4)
            };
            for _ in 0..200 {
                let values: Vec<[f32; 16]> =
                    (0..16).map(|_| std::array::from_fn(|_| next())).collect();
                // SAFETY: AVX-512 F was detected above; each array holds 16 floats.
                let (tree, each) = unsafe {
                    let v: [__m512; 16] =
                        std::array::from_fn(|n| _mm512_loadu_ps(values[n].as_ptr()));
                    let mut tree = [0.0f32; 16];
                    _mm512_storeu_ps(tree.as_mut_ptr(), tree_sums(v));
                    (tree, v.map(|v| _mm512_reduce_add_ps(v)))
                };
                for (n, want) in each.iter().enumerate() {
                    assert_eq!(
                        tree[4 * (n % 4) + n / 4].to_bits(),
                        want.to_bits(),
                        "vector {n}"
                    );
                }
                // And through `sums` for the tile shapes that take the tree or not.
                let accf: [[__m512; 4]; 3] = std::array::from_fn(|r| {
                    // SAFETY: as above.
                    std::array::from_fn(|c| unsafe { _mm512_loadu_ps(values[4 * r + c].as_ptr()) })
                });
                // SAFETY: as above.
                let (tile, one) =
                    unsafe { (sums(accf, [1.0, 2.0, 0.5]), sums([[accf[2][3]]], [0.5])) };
                for r in 0..3 {
                    for c in 0..4 {
                        let want = each[4 * r + c] * [1.0, 2.0, 0.5][r];
                        assert_eq!(tile[r][c].to_bits(), want.to_bits(), "tile {r} {c}");
                    }
                }
                assert_eq!(one[0][0].to_bits(), tile[2][3].to_bits());
            }
        }
    }
}

/// The generic loop under this tier's features, fused, 64 output columns per pass.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,fma")]
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
    generic::grouped_mix_with::<true, 64>(p, ps, m, values, n, k, out, os)
}
