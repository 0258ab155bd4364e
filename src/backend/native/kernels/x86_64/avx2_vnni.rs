//! The `avx2-vnni` tier: the `avx2-fma` tier plus AVX-VNNI (`vpdpbusd` on 256-bit vectors,
//! VEX-encoded): Intel Alder Lake and later, among them the Alder Lake-N (N100, N97, N305)
//! boxes common at the edge, and Zen 5, none of which need AVX-512 for it.
//!
//! Only the int8 and int4 products differ from `avx2-fma` (the rest of the table is its
//! kernels): `vpdpbusd` multiplies unsigned by signed bytes and adds four products into each
//! i32 lane, one instruction where `avx2-fma` needs `vpmaddubsw` + `vpmaddwd` (+ `vpaddd`),
//! with no i16 saturation to work around:
//! * int4: the nibbles are the unsigned operand; each i32 accumulator starts at
//!   `−8 · Σx` of its block, the nibbles' offset (as the AVX-512 tier does);
//! * int8: the stored bytes `q + 128` are the unsigned operand as they are; each accumulator
//!   starts at `−128 · Σx`.
//!
//! Each block's integer dot product is exact in both tiers and the float epilogue is the same
//! sequence of operations, so this tier's results equal `avx2-fma`'s bit for bit (tested).
//! The tile functions (`tile!`, x86_64/mod.rs) and loops are `avx2-fma`'s; the half groups'
//! loads repeat that tier's rather than share helpers with it, which changed its code
//! generation and measured slower there. The sizes are `avx2-fma`'s too but for int4 prefill,
//! 2 × 4 here: the products need no i16 temporaries, so 8 accumulators fit the 16 registers
//! (prefill 448: 254–277 -> 306–334 tokens/s against 2 × 2, three paired runs). Two weight
//! rows per decode-batch tile measured no better than one. Against `avx2-fma` on a 2-core
//! Zen 5 (2026-12-03, `qwen2-edge bench --prompt-tokens 448 --batch 1,4`, three paired runs, a
//! noisy shared host): int8 prefill 300–308 -> 496–541 tokens/s, int4 prefill 254–418 ->
//! 361–392, int4 decode batch 4 92–126 -> 114–151; one-sequence decode and int8 batch 4
//! within the noise of each other.
//!
//! The decode GEMV's int4 tile (1 row × 1 activation row; also a prefill's edge tiles of at
//! most two sums) adds the high nibbles' products into accumulators of their own
//! (`SPLIT_TILE`): with one accumulator a half group was a chain
//! of eight dependent `vpdpbusd` per row, and on a Zen 5 (2026-12-07, `cargo bench --bench
//! kernels -- gemv/int4/avx2-vnni/1t`, builds alternated) one thread streamed 16.6–16.9 GiB/s
//! against `avx2-fma`'s ~25; split, 21.4–22.1. The same split of the int8 GEMV's steps, and of
//! the AVX-512 int4 GEMV's, measured no faster. That GEMV first took 2 rows a tile: fine for
//! the 0.5B's 896-wide rows, but with the 1.5B's 1536 (three whole groups, no tail) the
//! compiler spilled the two rows' nibbles and one thread streamed 7.4 GiB/s against
//! `avx2-fma`'s 23 (`QWEN2_EDGE_BENCH_COLS=1536`); one row a tile, 22–25 at 896, 1536 and
//! 8960 wide, and the 1.5B int4 decoded 22 -> 41–48 tokens/s (`qwen2-edge bench`, Zen 5,
//! 2026-12-07). Its tiles prefetch `PREFETCH_GROUPS` ahead as `avx2-fma`'s: with the next
//! group only, int4k at 896 wide streamed 9.5 GiB/s on one thread against 20.8.

// The tiles index their weight-row and activation-row arrays together by `r` and `c`.
#![allow(clippy::needless_range_loop)]

use super::avx2::{
    f32s, group_half_scales, half_mins, half_scales, hsum, kquant_group, load, Half, Operands,
    PREFETCH_GROUPS,
};
use super::*;
use crate::backend::native::kernels::{complete_tier, Kernels};
type T = Avx2Vnni;

pub static TABLE: Kernels = complete_tier!("avx2-vnni");
// q6k: the AVX2 code of every x86 tier (q6k.rs says why).
pub use super::avx2::{
    axpy_f16, dot_f32, gemm_xwt, gemv_f16, gemv_f32, grouped_mix, grouped_scores, quantize_row,
    rmsnorm, rope, silu_mul, softmax, weighted_sum, widen_f16,
};
pub use super::q6k::{gemm_q6, gemv_q6};

safe!(T, gemv_q8 => gemv_q8_imp(w: Q8Ref, first: usize, x: QRow, out: &mut [f32]));
safe!(T, gemv_q4 => gemv_q4_imp(w: Q4Ref, first: usize, x: QRow, out: &mut [f32]));
safe!(T, gemm_q8 => gemm_q8_imp(w: Q8Ref, acts: &QActs, out: &mut ColumnBlock<'_>));
safe!(T, gemm_q4 => gemm_q4_imp(w: Q4Ref, acts: &QActs, out: &mut ColumnBlock<'_>));

/// Tiles of at most this many elements (rows × activation rows) split each element's sum over
/// two accumulators.
const SPLIT_TILE: usize = 2;

/// Each activation row's block sums of a half group times `−2^SHIFT`: the accumulators'
/// starting values for weights stored with an offset of `2^SHIFT`.
#[target_feature(enable = "avx2")]
#[inline]
unsafe fn offsets<const R: usize, const C: usize, const N: usize, const SHIFT: i32>(
    op: &Operands<R, C>,
    Half { fb, h, .. }: Half,
) -> [__m256i; C] {
    let mut start = [_mm256_setzero_si256(); C];
    for c in 0..C {
        // SAFETY: the caller checked that each activation row holds the group's block sums.
        let sums = unsafe { load::<N>(op.x_sums[c].add(fb + 8 * h) as *const u8) };
        start[c] = _mm256_sub_epi32(_mm256_setzero_si256(), _mm256_slli_epi32::<SHIFT>(sums));
    }
    start
}

/// One int4 half group of `N` lanes into the tile's float accumulators (returned).
/// `kquant_scales`: int4k's block scales, decoded from its codes by the caller (`tile!`'s
/// `@half`, which also adds int4k's mins); without them the half group loads its scales (and
/// decoded-ahead mins) itself.
#[target_feature(enable = "avx2,fma,f16c,avxvnni")]
#[inline]
unsafe fn half_q4<const R: usize, const C: usize, const N: usize, const FORMAT: u8>(
    op: &Operands<R, C>,
    at: Half,
    kquant_scales: Option<&[__m256; R]>,
    mut accf: [[__m256; C]; R],
) -> [[__m256; C]; R] {
    let Half { fb, lanes, h } = at;
    let (low, width) = (_mm256_set1_epi8(0x0F), lanes * 4);
    // SAFETY: the caller checked that each weight row holds the group (its 4 nibble chunks,
    // then its f16 scales or int4k's codes) and each activation row its 8
    // steps (32 bytes a block), scales and sums; lanes 8h..8h + N lie inside the group.
    unsafe {
        let x: [*const u8; C] = op.x.map(|p| p.add(fb * BLOCK + 32 * h));
        // int4 weights are u − 8 (int4k's dot products take u).
        let start = if FORMAT == INT4 {
            offsets::<R, C, N, 3>(op, at)
        } else {
            [_mm256_setzero_si256(); C]
        };
        let mut acc = [start; R];
        // A tile of at most `SPLIT_TILE` sums (the decode GEMV's, a prefill's edge tiles) adds
        // its high nibbles' products into accumulators of their own, so two `vpdpbusd` chains
        // per tile element run at once.
        let split = R * C <= SPLIT_TILE;
        let mut acc_hi = [[_mm256_setzero_si256(); C]; R];
        let w: [*const u8; R] = op.w.map(|p| p.add(fb * op.bb + 32 * h));
        for t in 0..4 {
            let mut lo = [_mm256_setzero_si256(); R];
            let mut hi = [_mm256_setzero_si256(); R];
            for r in 0..R {
                if h == 0 {
                    // The lines of the group `PREFETCH_GROUPS` ahead, as `avx2-fma` (module
                    // docs). A prefetch never faults; the address may lie past the row
                    // (`wrapping_add`).
                    let next = op.w[r].wrapping_add((fb + PREFETCH_GROUPS * GROUP) * op.bb);
                    _mm_prefetch::<_MM_HINT_T0>(next.wrapping_add(t * 64) as *const i8);
                    if t == 0 {
                        _mm_prefetch::<_MM_HINT_T0>(next.wrapping_add(256) as *const i8);
                    }
                }
                let v = load::<N>(w[r].add(t * width));
                lo[r] = _mm256_and_si256(v, low);
                hi[r] = _mm256_and_si256(_mm256_srli_epi16(v, 4), low);
            }
            for c in 0..C {
                let xl = load::<N>(x[c].add(t * width));
                let xh = load::<N>(x[c].add((t + 4) * width));
                for r in 0..R {
                    acc[r][c] = _mm256_dpbusd_avx_epi32(acc[r][c], lo[r], xl);
                    if split {
                        acc_hi[r][c] = _mm256_dpbusd_avx_epi32(acc_hi[r][c], hi[r], xh);
                    } else {
                        acc[r][c] = _mm256_dpbusd_avx_epi32(acc[r][c], hi[r], xh);
                    }
                }
            }
        }
        if split {
            for r in 0..R {
                for c in 0..C {
                    acc[r][c] = _mm256_add_epi32(acc[r][c], acc_hi[r][c]);
                }
            }
        }
        let (ws, mins) = match kquant_scales {
            Some(ws) => (*ws, [_mm256_setzero_ps(); R]),
            None => half_scales::<R, C, N, FORMAT>(op, at),
        };
        for c in 0..C {
            let xsc = f32s::<N>(op.x_scales[c].add(fb + 8 * h));
            for r in 0..R {
                let s = _mm256_mul_ps(ws[r], xsc);
                accf[r][c] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(acc[r][c]), s, accf[r][c]);
            }
        }
        if FORMAT == INT4K_DECODED {
            accf = half_mins::<R, C, N>(op, at, &mins, accf);
        }
    }
    accf
}

/// One int8 half group of `N` lanes into the tile's float accumulators.
#[target_feature(enable = "avx2,fma,avxvnni")]
#[inline]
unsafe fn half_q8<const R: usize, const C: usize, const N: usize>(
    op: &Operands<R, C>,
    at: Half,
    accf: &mut [[__m256; C]; R],
) {
    let Half { fb, lanes, h } = at;
    let width = lanes * 4;
    // SAFETY: the caller checked that each weight row and each activation row holds the
    // group's 8 steps (32 bytes a block), the activations' scales and sums; lanes 8h..8h + N
    // lie inside the group.
    unsafe {
        let x: [*const u8; C] = op.x.map(|p| p.add(fb * BLOCK + 32 * h));
        let start = offsets::<R, C, N, 7>(op, at);
        let mut acc = [start; R];
        let w: [*const u8; R] = op.w.map(|p| p.add(fb * BLOCK + 32 * h));
        for s in 0..8 {
            let mut u = [_mm256_setzero_si256(); R];
            for r in 0..R {
                if h == 0 {
                    // The same line of the next group, as in `avx2-fma`.
                    let next = op.w[r].wrapping_add((fb + GROUP) * BLOCK + s * 64);
                    _mm_prefetch::<_MM_HINT_T0>(next as *const i8);
                }
                u[r] = load::<N>(w[r].add(s * width));
            }
            for c in 0..C {
                let xv = load::<N>(x[c].add(s * width));
                for r in 0..R {
                    acc[r][c] = _mm256_dpbusd_avx_epi32(acc[r][c], u[r], xv);
                }
            }
        }
        for c in 0..C {
            let xsc = f32s::<N>(op.x_scales[c].add(fb + 8 * h));
            for r in 0..R {
                accf[r][c] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(acc[r][c]), xsc, accf[r][c]);
            }
        }
    }
}

strip!(batch_strip_q8, half_q8, Q8Ref, "avx2,fma,avxvnni", q8, 4);
strip!(
    batch_strip_q4,
    half_q4,
    Q4Ref,
    "avx2,fma,f16c,avxvnni",
    q4,
    4
);
tile!(tile_q4, half_q4, Q4Ref, "avx2,fma,f16c,avxvnni", q4);
tile!(tile_q8, half_q8, Q8Ref, "avx2,fma,avxvnni", q8);
gemv_tiled!(gemv_q8_imp, tile_q8, Q8Ref, "avx2,fma,avxvnni", 1);
gemv_tiled!(gemv_q4_imp, tile_q4, Q4Ref, "avx2,fma,f16c,avxvnni", 1);
gemm_tiled!(gemm_q8_imp, tile_q8, Q8Ref, "avx2,fma,avxvnni", 2, 4, tile_q8, 1, strip batch_strip_q8);
gemm_tiled!(gemm_q4_imp, tile_q4, Q4Ref, "avx2,fma,f16c,avxvnni", 2, 4, tile_q4, 1, strip batch_strip_q4);
