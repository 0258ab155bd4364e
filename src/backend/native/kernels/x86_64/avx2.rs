//! The `avx2-fma` tier: AVX2 + FMA + F16C (Haswell, Zen 1 and later), 256-bit vectors.
//!
//! AVX2 has no int8 dot product instruction: `vpmaddubsw` multiplies unsigned by signed bytes
//! and adds adjacent pairs into saturating i16, `vpmaddwd` with ones widens pairs of those to
//! i32. A 256-bit register holds 8 lanes of the layout (quant.rs), so a group of 16 blocks is
//! two halves.
//!
//! * int4: nibbles (0..15) are the unsigned operand, activations (−127..127) the signed one,
//!   so a pair sum is at most 2 · 15 · 127 = 3810 and all 8 products of a block-half (4 steps
//!   × low/high nibbles) add up in i16 (≤ 30480) before one `vpmaddwd`: 2.1 instructions per
//!   32 multiply-adds. The `− 8` of the nibbles is `− 8 · Σx` per block (the activation sums).
//! * int8: weights are stored `q + 128`; `|q|` and `sign(x, q)` keep each pair sum within i16
//!   (2 · 127 · 127), so every step is widened to i32 at once: 4 instructions per 32.
//! * Tiles: `R` weight rows × `C` activation rows share every load (an unpacked weight vector
//!   feeds `C` products, an activation vector `R`); loops in tiling.rs. With 16 ymm registers
//!   the compiler spills beyond small tiles, so the sizes are what measured best on a 2-core
//!   Zen 3 (EPYC, 2026-11, one-thread `stream` test and `qwen2-edge bench`, noisy VM): decode
//!   int4 2 × 1 (6.9 GB/s of weights on one core; 4 × 1 spilled: 4.1; now 1 × 1, see the
//!   last bullet), int8 1 × 1 (7.0; 4 × 1:
//!   4.0); prefill int4 2 × 2, int8 2 × 4 (2 × 4 and 2 × 2 within the noise of each other for
//!   int4, 2 × 1 slower for int8). Each half group of a tile is one inlined function with
//!   its lane count a constant (`half_q4::<R, C, N, FORMAT>`), and the operands are raw
//!   pointers checked once per tile (bounds-checked slices per half group: int4 prefill 128
//!   at 107 tokens/s; now 120–143 on the same box). On a Xeon (2026-12, `cargo bench --bench
//!   kernels -- gemm/128x4864x896`, GMAC/s on 2 threads) the sizes held: int4 2 × 2 95.7,
//!   3 × 2 97.9, 2 × 3 95.1, 1 × 4 75.4; int8 2 × 4 80.5, 3 × 2 80.8, 2 × 2 51.5.
//! * A decode batch of up to 4 sequences takes one weight row per tile: on that Zen 3 int8
//!   batch 4 went 2.0x -> 2.4x one sequence against two rows; on a Xeon (2026-12) two rows
//!   were as fast for int8 and 8% faster for int4; on an AVX2-only Zen 2 (EPYC, 2026-12-06,
//!   `cargo bench --bench kernels -- gemv/int4/avx2-fma/2t-batch4`) two rows were slower, 6.3
//!   against 7.3 GiB/s of weights, and so were four activation rows a tile as a call each
//!   (1 × 4: 5.0 against 1 × 2's 7.0; in the strips below, 1 × 4 is the faster).
//! * The int4 tiles' code shape (that Zen 2, `cargo bench --bench kernels --
//!   'gemm/128x4864x896|2t-batch4'`, two alternated rounds, GMAC/s or GiB/s on 2 threads, before
//!   -> after): the width of a step read at run time and the format (int4, int4k's codes,
//!   int4k decoded ahead) tested in every half group had the compiler keep each step's
//!   address in a register of its own, spilled and reloaded every step. Now each format is
//!   its own instantiation (`INT4`, `INT4K`, `INT4K_DECODED`), whole groups' halves are
//!   called with their lane count a constant (so are their offsets), the sums pass by value,
//!   and the next weights are prefetched 4 groups ahead instead of 1 (the loads' scheduling
//!   had moved the prefetches to the end of a group): int4 prefill 57 -> 75 GMAC/s, int4k
//!   50 -> 61, int4 decode batch 6.5 -> 7.4 GiB/s, int4k 5.5 -> 5.8. int8's tiles keep their
//!   loop (in this shape the compiler called the half groups of a decode-batch tile out of
//!   line: 10 -> 8 GiB/s).
//! * Inlining (the same Zen 2, a later session): `perf` still showed int4k's half group called
//!   out of line by the decode tile (decoding its codes made it too big to inline) and the
//!   decode-batch tile calling the halves of a row's last group (4, 8 or 12 lanes). Now int4k's
//!   codes are decoded and its `− min · Σx` added by inlined functions of their own around
//!   the half group (`tile!`'s `@half`), and decode and batch tiles call each half size once
//!   for the last group. `cargo bench --bench kernels --
//!   'gemv/int4k?/avx2-fma/(2t|2t-batch4)$|gemm/128x4864x896/int4k?/avx2-fma$'`, two
//!   alternated rounds, before -> after: batch4 int4 7.1–7.2 -> 8.0–8.4 GiB/s, int4k 5.7–5.8
//!   -> 6.6–6.8; 2t int4k 10.6–12.6 -> 12.2–13.2; prefill unchanged (int4 67.1 -> 65.8–67.5
//!   GMAC/s, int4k 57.0–58.3 -> 55.2–58.1). Guest instructions per decoded token under
//!   `qemu-x86_64 -cpu max` (one thread): int4 202.7 -> 192.5 M, int4k 295.6 -> 258.9 M. The
//!   prefill tile keeps the calls: with its last-group halves inlined too it ran ~10% slower
//!   (gemm int4 55.6–66.2 against 62.8–68.0 GMAC/s, four rounds), and with int4's scales
//!   loaded before the dot products (as int4k's now are) model prefill lost 6–8%.
//! * Strips (`strip!`, the same Zen 2, a later session): a tile over one of the 0.5B's 896-wide
//!   rows is four half groups, and a decode batch's one tile call per row and pair of
//!   activation rows cost about as much again: the call and its 0x2e0-byte frame, the operand
//!   checks, the format dispatch and the latency of the final sums, none overlapped with the
//!   next tile (`perf annotate`: the same half group ran ~24 cycles in a loop of its own, ~42
//!   in place). Now a decode batch is one call per task that loops over its weight rows, the
//!   activations checked once. `cargo bench --bench kernels`, alternated, GiB/s on 2 threads,
//!   before -> after: `2t-batch4` int4 8.8–9.5 -> 10.8–11.7, int4k 7.4–7.6 -> 8.6–9.3, int8
//!   10.0–11.3 -> 12.1–13.2. `qwen2-edge bench --variant int4 --prompt-tokens 32 --batch 1,4`:
//!   a batch of four 114–124 -> 126–143 tokens/s. Decode GEMVs and prefill keep their tile
//!   calls: through strips, prefill gained ~5% but the compiler then called the decode tile's
//!   last half groups out of line (the half-group functions shared by both; int4k decode 2–5%
//!   slower), and one-row GEMVs, bound by memory here (~8 GiB/s a core), gained nothing.
//!   With no batch tile left in `gemm_q4_imp` the compiler inlined its prefill tile
//!   differently, and int4k's prefill (codes decoded ahead) lost ~11% (`qwen2-edge bench
//!   --variant int4k --prompt-tokens 128`, 174–181 -> 154–159 tokens/s); a task of one weight
//!   row keeps the batch tile (tiling.rs), which brings it back (175 -> 182, one round).
//!   Marking the tiles `#[inline(never)]` instead cost every prefill a third.
//!   Inside a strip, int4's tile takes four activation rows, not two (1 × 4, as int8's and
//!   the VNNI tier's): as a call of its own it had lost (5.0 against 7.0 GiB/s above), but
//!   in one call per task its weight row's unpacking is shared by twice the rows. Same Zen 2,
//!   alternated, before -> after: `2t-batch4` int4 11.1–11.3 -> 13.0–13.1 GiB/s, int4k
//!   8.5–8.9 -> 10.5; `qwen2-edge bench --variant V --prompt-tokens 32 --gen-tokens 64
//!   --batch 1,4`, a batch of four, int4 141.6 / 132.4 -> 154.2 / 139.1 tokens/s, int4k
//!   116.6 / 118.1 -> 126.9 / 128.9; one-sequence decode and prefill unchanged or faster.
//!   Strips for prefill too (1 × 4 tiles over 32 activation rows, the last chunk overlapping
//!   the one before) measured no faster than the 2 × 2 tiles for int4, int4k +12% and int8
//!   −13% (`gemm/128x4864x896`), and the decode batch 3% slower: not kept.
//! * The int4 decode GEMV takes one weight row a tile (it took two; same Zen 2, a later
//!   session). The 2 × 1 tile called its row's last-group half groups out of line (three
//!   calls a row pair, `objdump`), which the one-row tile, inlined whole, does not: `cargo
//!   bench --bench kernels -- 'gemv/int4k?/avx2-fma/(1t|2t)$'`, alternated, GiB/s, int4 1t
//!   8.0–8.5 -> 12.0–12.3, 2t 15.6–16.7 -> 21.8–23.3, int4k 1t 7.8–8.2 -> 8.9–10.2, 2t
//!   15.2–15.7 -> 17.6–19.7 (one core's bandwidth was not the limit, as had been thought);
//!   `qwen2-edge bench --variant V --prompt-tokens 128 --gen-tokens 128`, decode int4 50–53
//!   -> 60–64 tokens/s, int4k 49–52 -> 56–61. With the GEMV no longer using the 2 × 1 tile,
//!   the compiler inlined it into `gemm_q4_imp` (the prefill's odd-row edge), which changed
//!   how it inlined the 2 × 2 tiles and cost int4k's prefill 10% (181 -> 158–164 tokens/s);
//!   that edge now calls `edge_tile_q4`, out of line as the tile was (prefill 180–183).
//! * int4k's codes (a later session, the same Zen 2): decode and batch tiles unpacked each half
//!   group's 8 codes in 32-bit lanes (`kquant_half`: ~23 instructions a half and row, a
//!   quarter of an int4k half group's work). Now a group's 16 codes, or the 12 that end each of
//!   the 0.5B's 896-wide rows, are unpacked together in bytes (`kquant_group`) and widened per
//!   half (`group_half_scales`); rows ending in 8 or 4 blocks keep `kquant_half` there (16-byte
//!   loads would read past the group). Guest instructions per decoded int4k token under
//!   `qemu-x86_64 -cpu max` (one thread): 261 -> 237 M (int4: 207 M). `cargo bench --bench
//!   kernels -- 'gemv/int4k/avx2-fma/(1t|2t)$'` (one 256 MB product), alternated: 1t 8.9–11.4
//!   GiB/s (median 9.6, 11 rounds) -> 11.0–11.9 (3 rounds), 2t 17.3–22.3 (median 18.4) ->
//!   21.6–22.5, as fast as int4's. The model's decode (169 smaller products a token) moves
//!   little, for reasons not found: `qwen2-edge bench --prompt-tokens 32 --gen-tokens 128`,
//!   five alternated rounds, int4k 57.8–61.4 (median 60.1) -> 60.0–63.1 (61.7) tokens/s; int4k
//!   ÷ int4 (same build and round) 0.91–0.98 (median 0.96, 8 rounds) -> 0.94–1.03 (0.97, 13
//!   rounds); on one thread unchanged (34.5–36.0 both); prefill unchanged.
//! * The order of a decode batch's sums (a Zen 3, 2026-12-07; not kept). `perf` shows the 1 × 4
//!   strip tile's 32 products of a half group computed ahead and added as a tree, its float
//!   sums spilled to the stack. Forcing the source order, `cargo bench --bench kernels --
//!   'gemv/int4/avx2-fma/2t-batch4$'` (GiB/s, this code 12.1–13.2): an empty `asm!` on each
//!   step's i16 sums in `half_q4` (the compiler then called `half_q4` out of line) 9.5; the
//!   same in a copy of the half group written as a macro for the strip 11.5; the half group's
//!   integer steps as one `asm!` block 11.1, and 11.9–12.2 against 13.2 with 8 MB of weights
//!   (in cache); saturating adds, which cannot be reassociated (`vpaddsw`, on the multiply pipes
//!   here: 1.2 against 1.6 `vpmaddubsw` a cycle beside them), 8.7. A C prototype of the tile
//!   (gcc, rows of whole groups, never part of this tree) ran 7.2–7.5 GiB/s on one core with
//!   gcc's own order and 8.3–9.9 with the sums pinned the same way (~8.5 each as two processes):
//!   ~13% above this tile's ~6.6 a thread in cache once its rows' 4-lane halves (half the work
//!   of an 8-lane one, the same instructions) are counted. The tile's instructions, not where
//!   the compiler keeps its sums, bound it. The same day, int8's groups walked as int4's are
//!   (whole groups with the lane count a constant) made the one-row GEMV no faster: `cargo
//!   bench --bench kernels -- 'gemv/int8/avx2-fma/(1t|2t)$'`, alternated, 2t 20.1 / 23.7 ->
//!   19.8 / 20.1 GiB/s.
//! * Wide rows (a Zen 5, 2026-12-07): a strip took each weight row whole against all its
//!   activation rows, which at 8,960 columns (the 1.5B's down projection) are 45 KB of codes,
//!   scales and sums for four, more than L1 keeps beside the weight stream. `cargo bench
//!   --bench kernels -- 2t-batch4` with `QWEN2_EDGE_BENCH_COLS`, GiB/s of int4 on
//!   `avx2-vnni`: 20–23 at 896 and 4,864, 18 at 5,632, 16–18 at 8,960; batches of two and
//!   three lost in proportion (at 8,960: 31 and 22 against 36 and 29 at 4,864), so the
//!   activations' reads, not the weights', bounded it. Rows of more than `WIDE_FROM` blocks
//!   now go in column chunks of `WIDE_BLOCKS` (2,048 columns), `WIDE_ROWS` (8) weight rows
//!   over each chunk, each row's float sums carried to its next chunk (the same operations in
//!   the same order: bit for bit the one-row tile's, tested). Alternated, two rounds, before
//!   -> after at 8,960: `avx2-vnni` int4 17.4 / 16.7 -> 22.8 / 21.7, int8 14.0 / 13.3 ->
//!   21.9 / 21.8; `avx2-fma` int4 15.9 / 16.2 -> 20.3 / 20.0, int8 12.2 / 12.3 -> 18.5 /
//!   18.8. Chunks of 4,096 columns gained less for int4 (18.3–18.7); chunking 4,864-wide rows
//!   too (4 groups a chunk) made them slower (int4 21.5 -> 14.4–19.2): a chunk's first groups
//!   start with no prefetch ahead of them. The 1.5B int4 on `avx2-vnni` (`qwen2-edge bench
//!   --kernels avx2-vnni --prompt-tokens 128 --gen-tokens 128 --batch 4`, three alternated
//!   rounds): a batch of four 92.2 / 97.3 / 94.0 -> 104.4 / 90.0 / 99.8 tokens/s (medians 94.0
//!   -> 99.8; the down projection is 29% of its weights).

// The tiles index their weight-row and activation-row arrays together by `r` and `c`.
#![allow(clippy::needless_range_loop)]

use super::*;
use crate::backend::native::kernels::{complete_tier, Kernels};
type T = Avx2Fma;

pub static TABLE: Kernels = complete_tier!("avx2-fma");
// q6k: the AVX2 code of every x86 tier (q6k.rs says why).
pub use super::q6k::{gemm_q6, gemv_q6};
pub use generic::gemm_xwt;

safe!(T, gemv_q8 => gemv_q8_imp(w: Q8Ref, first: usize, x: QRow, out: &mut [f32]));
safe!(T, gemv_q4 => gemv_q4_imp(w: Q4Ref, first: usize, x: QRow, out: &mut [f32]));
safe!(T, gemm_q8 => gemm_q8_imp(w: Q8Ref, acts: &QActs, out: &mut ColumnBlock<'_>));
safe!(T, gemm_q4 => gemm_q4_imp(w: Q4Ref, acts: &QActs, out: &mut ColumnBlock<'_>));
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

#[target_feature(enable = "avx")]
pub(super) fn hsum(v: __m256) -> f32 {
    let s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    let s = _mm_add_ss(s, _mm_shuffle_ps(s, s, 1));
    _mm_cvtss_f32(s)
}

/// `N` (8 or 4) lanes of 4 bytes from `p`, zeros past them: lane groups hold a multiple of 4
/// blocks, so a half group is 8 or 4 lanes (`N` is a constant: no branch in the loops).
#[target_feature(enable = "avx2")]
#[inline]
pub(super) unsafe fn load<const N: usize>(p: *const u8) -> __m256i {
    // SAFETY: the caller guarantees `4 * N` readable bytes at `p`.
    unsafe {
        if N == 8 {
            _mm256_loadu_si256(p as *const __m256i)
        } else {
            _mm256_zextsi128_si256(_mm_loadu_si128(p as *const __m128i))
        }
    }
}

/// `N` (8 or 4) floats from `p`, zeros past them.
#[target_feature(enable = "avx2")]
#[inline]
pub(super) unsafe fn f32s<const N: usize>(p: *const f32) -> __m256 {
    // SAFETY: the caller guarantees `N` readable floats at `p`.
    unsafe {
        if N == 8 {
            _mm256_loadu_ps(p)
        } else {
            _mm256_zextps128_ps256(_mm_loadu_ps(p))
        }
    }
}

/// `N` (8 or 4) f16 values from `p`, widened; zeros past them.
#[target_feature(enable = "avx2,f16c")]
#[inline]
pub(super) unsafe fn f16s<const N: usize>(p: *const u8) -> __m256 {
    // SAFETY: the caller guarantees `2 * N` readable bytes at `p`.
    unsafe {
        if N == 8 {
            _mm256_cvtph_ps(_mm_loadu_si128(p as *const __m128i))
        } else {
            _mm256_cvtph_ps(_mm_loadl_epi64(p as *const __m128i))
        }
    }
}

/// How many groups ahead the int4 tiles prefetch their weight rows (the int8 tiles: one).
pub(super) const PREFETCH_GROUPS: usize = 4;

/// The operands of a tile: each weight row's and activation row's first byte, the
/// activations' block scales and sums. The tile functions check the lengths once (`Q4Ref::row`,
/// asserts on the activations) so the half-group loops use plain pointer offsets.
pub(super) struct Operands<const R: usize, const C: usize> {
    pub w: [*const u8; R],
    /// Weight bytes per block of a full group (int8 32; int4 and int4k 18).
    pub bb: usize,
    /// int4k's scales and mins decoded ahead (`Q4Ref::decoded`), each row's first.
    pub decoded: Option<([*const f32; R], [*const f32; R])>,
    pub x: [*const u8; C],
    pub x_scales: [*const f32; C],
    pub x_sums: [*const i32; C],
    pub x_block_sums: [*const f32; C],
}

impl<const R: usize, const C: usize> Operands<R, C> {
    pub fn new(
        rows: [&[u8]; R],
        (bb, decoded): (usize, Option<[DecodedRow; R]>),
        xs: &[QRow; C],
    ) -> Self {
        Operands {
            w: rows.map(|r| r.as_ptr()),
            bb,
            decoded: decoded.map(|d| (d.map(|r| r.0.as_ptr()), d.map(|r| r.1.as_ptr()))),
            x: xs.map(|x| x.q.as_ptr() as *const u8),
            x_scales: xs.map(|x| x.scales.as_ptr()),
            x_sums: xs.map(|x| x.sums.as_ptr()),
            x_block_sums: xs.map(|x| x.block_sums.as_ptr()),
        }
    }
}

/// The block scales of an int4 half group, and for int4k the block mins (`FORMAT`): each
/// weight row's group holds its f16 scales, or int4k's codes (quant.rs), right after its
/// nibbles; or they were decoded ahead.
#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
pub(super) unsafe fn half_scales<
    const R: usize,
    const C: usize,
    const N: usize,
    const FORMAT: u8,
>(
    op: &Operands<R, C>,
    Half { fb, lanes, h }: Half,
) -> ([__m256; R], [__m256; R]) {
    let (mut scales, mut mins) = ([_mm256_setzero_ps(); R], [_mm256_setzero_ps(); R]);
    for r in 0..R {
        // SAFETY: the caller checked that each weight row holds the group: its nibbles (16
        // bytes a block), then its scales (2 bytes a block; lanes 8h..8h + N are in it) or
        // int4k's codes (`kquant_half`), and that decoded scales and mins hold `nb` floats a
        // row (lanes 8h..8h + N of the group among them).
        unsafe {
            let p = op.w[r].add(fb * op.bb + 16 * lanes);
            match (FORMAT, op.decoded) {
                (INT4K_DECODED, Some((s, m))) => {
                    scales[r] = f32s::<N>(s[r].add(fb + 8 * h));
                    mins[r] = f32s::<N>(m[r].add(fb + 8 * h));
                }
                (INT4K, _) => (scales[r], mins[r]) = kquant_half::<N>(p, lanes, h),
                _ => scales[r] = f16s::<N>(p.add(16 * h)),
            }
        }
    }
    (scales, mins)
}

/// `(scale, min)` of lanes `8h..8h + N` (one super-block) of an int4k group of `lanes`
/// blocks from its codes at `p`, as `quant::q4k_scale_min` computes them.
#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
unsafe fn kquant_half<const N: usize>(p: *const u8, lanes: usize, h: usize) -> (__m256, __m256) {
    // SAFETY: the caller's group holds `lanes` code bytes at `p` (lanes 8h..8h + N among them),
    // then `lanes / 2` bytes of top bits and 4 bytes per super-block: each unaligned u32 read
    // ends at or before the group's end (for a half of 4 lanes, the 2 bytes of its top bits
    // are followed by 4 bytes of `d`, `dmin`).
    unsafe {
        let codes = p.add(8 * h);
        let low = if N == 8 {
            _mm_loadl_epi64(codes as *const __m128i)
        } else {
            _mm_cvtsi32_si128((codes as *const i32).read_unaligned())
        };
        let low = _mm256_cvtepu8_epi32(low);
        // Block i's top bits in bits 4i..4i + 4 of the half's 32.
        let tops = (p.add(lanes + 4 * h) as *const i32).read_unaligned();
        let nibbles = _mm256_setr_epi32(0, 4, 8, 12, 16, 20, 24, 28);
        let tops = _mm256_srlv_epi32(_mm256_set1_epi32(tops), nibbles);
        let sc_top = _mm256_slli_epi32(_mm256_and_si256(tops, _mm256_set1_epi32(3)), 4);
        let m_top = _mm256_slli_epi32(_mm256_and_si256(tops, _mm256_set1_epi32(12)), 2);
        let sc = _mm256_or_si256(_mm256_and_si256(low, _mm256_set1_epi32(15)), sc_top);
        let m = _mm256_or_si256(_mm256_srli_epi32(low, 4), m_top);
        // [d, dmin] of the half's super-block.
        let sup = (p.add(lanes + lanes / 2 + 4 * h) as *const i32).read_unaligned();
        let sup = _mm_cvtph_ps(_mm_cvtsi32_si128(sup));
        let (d, dmin) = (
            _mm256_broadcastss_ps(sup),
            _mm256_broadcastss_ps(_mm_movehdup_ps(sup)),
        );
        let scale = _mm256_mul_ps(d, _mm256_cvtepi32_ps(sc));
        (scale, _mm256_mul_ps(dmin, _mm256_cvtepi32_ps(m)))
    }
}

/// int4k's codes of a group of 16 or 12 blocks (two super-blocks, the second of 8 or 4) of one
/// weight row, unpacked to bytes for both halves at once: each block's 6-bit scale and min
/// (past a 12-block group's, bytes of no meaning, which its 4-lane half multiplies by zero),
/// and the super-blocks' `[d, dmin, d, dmin]`.
#[derive(Clone, Copy)]
pub(super) struct GroupCodes {
    sc: __m128i,
    m: __m128i,
    sup: __m128,
}

/// `GroupCodes` of each weight row's group at block `fb` of `lanes` (16 or 12) blocks
/// (`kquant_half` unpacks a half's codes on their own, in 32-bit lanes: about a quarter more
/// instructions a half group).
#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
pub(super) unsafe fn kquant_group<const R: usize, const C: usize>(
    op: &Operands<R, C>,
    fb: usize,
    lanes: usize,
) -> [GroupCodes; R] {
    debug_assert!(lanes == GROUP || lanes == 12);
    let low = _mm_set1_epi8(15);
    let zero = GroupCodes {
        sc: _mm_setzero_si128(),
        m: _mm_setzero_si128(),
        sup: _mm_setzero_ps(),
    };
    let mut out = [zero; R];
    // A loop, not `map`: the closure would not be inlined (it lacks the target features).
    for r in 0..R {
        // SAFETY: the caller checked that the row holds the group: after its nibbles (16 bytes
        // a block) `lanes` code bytes, `lanes / 2` of top bits and 8 of `d`, `dmin` (4 a
        // super-block), which end the group. Each load ends at or before that end (for 12
        // lanes the 16 bytes of codes run into the top bits, the 8 of top bits into `d`).
        unsafe {
            let p = op.w[r].add(fb * op.bb + 16 * lanes);
            let codes = _mm_loadu_si128(p as *const __m128i);
            // Byte i of the top bits holds blocks 2i (low nibble) and 2i + 1: one a byte.
            let t = _mm_loadl_epi64(p.add(lanes) as *const __m128i);
            let tops = _mm_unpacklo_epi8(
                _mm_and_si128(t, low),
                _mm_and_si128(_mm_srli_epi16(t, 4), low),
            );
            let sc_top = _mm_slli_epi16(_mm_and_si128(tops, _mm_set1_epi8(3)), 4);
            let m_top = _mm_slli_epi16(_mm_and_si128(tops, _mm_set1_epi8(12)), 2);
            out[r] = GroupCodes {
                sc: _mm_or_si128(_mm_and_si128(codes, low), sc_top),
                m: _mm_or_si128(_mm_and_si128(_mm_srli_epi16(codes, 4), low), m_top),
                sup: _mm_cvtph_ps(_mm_loadl_epi64(p.add(lanes + lanes / 2) as *const __m128i)),
            };
        }
    }
    out
}

/// `(scale, min)` of half `h` of each row's group from its `GroupCodes`, as
/// `quant::q4k_scale_min` computes them.
#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
pub(super) fn group_half_scales<const R: usize>(
    codes: &[GroupCodes; R],
    h: usize,
) -> ([__m256; R], [__m256; R]) {
    let (mut scales, mut mins) = ([_mm256_setzero_ps(); R], [_mm256_setzero_ps(); R]);
    for r in 0..R {
        let GroupCodes { sc, m, sup } = codes[r];
        let (sc, m, d, dmin) = if h == 0 {
            (sc, m, sup, _mm_movehdup_ps(sup))
        } else {
            (
                _mm_unpackhi_epi64(sc, sc),
                _mm_unpackhi_epi64(m, m),
                _mm_movehl_ps(sup, sup),
                _mm_shuffle_ps::<0xFF>(sup, sup),
            )
        };
        let (d, dmin) = (_mm256_broadcastss_ps(d), _mm256_broadcastss_ps(dmin));
        scales[r] = _mm256_mul_ps(d, _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(sc)));
        mins[r] = _mm256_mul_ps(dmin, _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(m)));
    }
    (scales, mins)
}

/// int4k's part of a half group: `− min · Σx` per block into the float accumulators.
#[target_feature(enable = "avx2,fma")]
#[inline]
pub(super) unsafe fn half_mins<const R: usize, const C: usize, const N: usize>(
    op: &Operands<R, C>,
    Half { fb, h, .. }: Half,
    mins: &[__m256; R],
    mut accf: [[__m256; C]; R],
) -> [[__m256; C]; R] {
    for c in 0..C {
        // SAFETY: the caller checked that each activation row holds the group's block sums.
        let sums = unsafe { f32s::<N>(op.x_block_sums[c].add(fb + 8 * h)) };
        for r in 0..R {
            accf[r][c] = _mm256_fnmadd_ps(mins[r], sums, accf[r][c]);
        }
    }
    accf
}

/// Half group `h` (lanes `8h..8h + N`) of the group at block `fb` of `lanes` blocks.
#[derive(Clone, Copy)]
pub(super) struct Half {
    pub fb: usize,
    pub lanes: usize,
    pub h: usize,
}

/// One int4 half group of `N` lanes into the tile's float accumulators (returned). The nibbles
/// are the unsigned operand of `vpmaddubsw`; its 8 products per lane pair add up in i16 (see
/// the module comment) before one `vpmaddwd`.
/// `kquant_scales`: int4k's block scales, decoded from its codes by the caller (`tile!`'s
/// `@half`, which also adds int4k's mins); without them the half group loads its scales (and
/// decoded-ahead mins) itself.
#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
unsafe fn half_q4<const R: usize, const C: usize, const N: usize, const FORMAT: u8>(
    op: &Operands<R, C>,
    Half { fb, lanes, h }: Half,
    kquant_scales: Option<&[__m256; R]>,
    mut accf: [[__m256; C]; R],
) -> [[__m256; C]; R] {
    let (low, ones) = (_mm256_set1_epi8(0x0F), _mm256_set1_epi16(1));
    let width = lanes * 4;
    // SAFETY: the caller checked that each weight row holds the group (its 4 nibble chunks,
    // then its f16 scales or int4k's codes) and each activation row its 8 steps (32 bytes a
    // block), scales and sums; lanes 8h..8h + N lie inside the group.
    unsafe {
        let w: [*const u8; R] = op.w.map(|p| p.add(fb * op.bb + 32 * h));
        let x: [*const u8; C] = op.x.map(|p| p.add(fb * BLOCK + 32 * h));
        let mut acc = [[_mm256_setzero_si256(); C]; R];
        // The steps in a closure: the same loop written inline measured 18% slower in an int4k
        // prefill (scales decoded ahead) on a Zen 2, the code the compiler made differing.
        let step = |t: usize, acc: &mut [[__m256i; C]; R]| {
            let mut lo = [_mm256_setzero_si256(); R];
            let mut hi = [_mm256_setzero_si256(); R];
            for r in 0..R {
                if h == 0 {
                    // The lines of the group PREFETCH_GROUPS ahead (nibbles, then scales; 288
                    // bytes a group): more misses in flight. A prefetch never faults; the
                    // address may lie past the row (`wrapping_add`).
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
                    let p = _mm256_add_epi16(
                        _mm256_maddubs_epi16(lo[r], xl),
                        _mm256_maddubs_epi16(hi[r], xh),
                    );
                    acc[r][c] = _mm256_add_epi16(acc[r][c], p);
                }
            }
        };
        for t in 0..4 {
            step(t, &mut acc);
        }
        let (ws, mins) = match kquant_scales {
            Some(ws) => (*ws, [_mm256_setzero_ps(); R]),
            None => half_scales::<R, C, N, FORMAT>(op, Half { fb, lanes, h }),
        };
        for c in 0..C {
            let xsc = f32s::<N>(op.x_scales[c].add(fb + 8 * h));
            // int4 weights are u − 8: −8·Σx per block (int4k's dot products take u).
            let bias = if FORMAT == INT4 {
                let sums = op.x_sums[c].add(fb + 8 * h) as *const u8;
                _mm256_slli_epi32(load::<N>(sums), 3)
            } else {
                _mm256_setzero_si256()
            };
            for r in 0..R {
                let d = _mm256_madd_epi16(acc[r][c], ones);
                let d = if FORMAT == INT4 {
                    _mm256_sub_epi32(d, bias)
                } else {
                    d
                };
                let s = _mm256_mul_ps(ws[r], xsc);
                accf[r][c] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(d), s, accf[r][c]);
            }
        }
        if FORMAT == INT4K_DECODED {
            accf = half_mins::<R, C, N>(op, Half { fb, lanes, h }, &mins, accf);
        }
    }
    accf
}

/// One int8 half group of `N` lanes into the tile's float accumulators: `|q|` and
/// `sign(x, q)` keep `vpmaddubsw`'s pair sums within i16, widened at every step.
#[target_feature(enable = "avx2,fma")]
#[inline]
unsafe fn half_q8<const R: usize, const C: usize, const N: usize>(
    op: &Operands<R, C>,
    Half { fb, lanes, h }: Half,
    accf: &mut [[__m256; C]; R],
) {
    let (flip, ones) = (_mm256_set1_epi8(-128), _mm256_set1_epi16(1));
    let width = lanes * 4;
    // SAFETY: the caller checked that each weight row and each activation row holds the
    // group's 8 steps (32 bytes a block) and the activations' scales; lanes 8h..8h + N lie
    // inside the group.
    unsafe {
        let w: [*const u8; R] = op.w.map(|p| p.add(fb * BLOCK + 32 * h));
        let x: [*const u8; C] = op.x.map(|p| p.add(fb * BLOCK + 32 * h));
        let mut acc = [[_mm256_setzero_si256(); C]; R];
        for s in 0..8 {
            let mut q = [_mm256_setzero_si256(); R];
            let mut a = [_mm256_setzero_si256(); R];
            for r in 0..R {
                if h == 0 {
                    // The same line of the next group (512 bytes a group): more misses in
                    // flight. A prefetch never faults; the address may lie past the row.
                    let next = op.w[r].wrapping_add((fb + GROUP) * BLOCK + s * 64);
                    _mm_prefetch::<_MM_HINT_T0>(next as *const i8);
                }
                q[r] = _mm256_xor_si256(load::<N>(w[r].add(s * width)), flip);
                a[r] = _mm256_abs_epi8(q[r]);
            }
            for c in 0..C {
                let xv = load::<N>(x[c].add(s * width));
                for r in 0..R {
                    let p = _mm256_maddubs_epi16(a[r], _mm256_sign_epi8(xv, q[r]));
                    acc[r][c] = _mm256_add_epi32(acc[r][c], _mm256_madd_epi16(p, ones));
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

strip!(batch_strip_q8, half_q8, Q8Ref, "avx2,fma", q8, 4);
strip!(batch_strip_q4, half_q4, Q4Ref, "avx2,fma,f16c", q4, 4);
tile!(tile_q4, half_q4, Q4Ref, "avx2,fma,f16c", q4);
tile!(tile_q8, half_q8, Q8Ref, "avx2,fma", q8);
gemv_tiled!(gemv_q8_imp, tile_q8, Q8Ref, "avx2,fma", 1);
gemv_tiled!(gemv_q4_imp, tile_q4, Q4Ref, "avx2,fma,f16c", 1);
gemm_tiled!(gemm_q8_imp, tile_q8, Q8Ref, "avx2,fma", 2, 4, tile_q8, 1, strip batch_strip_q8);
gemm_tiled!(
    gemm_q4_imp,
    tile_q4,
    Q4Ref,
    "avx2,fma,f16c",
    2,
    2,
    tile_q4,
    1,
    strip batch_strip_q4,
    edge edge_tile_q4
);

/// The int4 prefill's 2 × 1 tiles (an odd activation row), out of line as they were while the
/// decode GEMV used that tile too: inlined into `gemm_q4_imp`, the 2 × 1 tile changed how the
/// compiler inlined the prefill's 2 × 2 tiles, and int4k's prefill ran 10% slower (module docs).
#[target_feature(enable = "avx2,fma,f16c")]
#[inline(never)]
unsafe fn edge_tile_q4<const R: usize, const C: usize>(
    w: Q4Ref,
    j: usize,
    xs: [QRow; C],
) -> [[f32; C]; R] {
    // SAFETY: the caller's contract, passed on (the same target features).
    unsafe { tile_q4::<R, C>(w, j, xs) }
}

#[target_feature(enable = "avx2,fma")]
unsafe fn dot_f32_imp(a: &[f32], b: &[f32]) -> f32 {
    let n = a.len().min(b.len());
    let (pa, pb) = (a.as_ptr(), b.as_ptr());
    let mut acc = [_mm256_setzero_ps(); 4];
    let mut i = 0;
    // SAFETY: full loads read i..i+8 ≤ n; the tail goes through the generic code.
    unsafe {
        while i + 32 <= n {
            for (j, acc) in acc.iter_mut().enumerate() {
                let o = i + 8 * j;
                *acc =
                    _mm256_fmadd_ps(_mm256_loadu_ps(pa.add(o)), _mm256_loadu_ps(pb.add(o)), *acc);
            }
            i += 32;
        }
        while i + 8 <= n {
            acc[0] = _mm256_fmadd_ps(
                _mm256_loadu_ps(pa.add(i)),
                _mm256_loadu_ps(pb.add(i)),
                acc[0],
            );
            i += 8;
        }
    }
    let s = _mm256_add_ps(_mm256_add_ps(acc[0], acc[1]), _mm256_add_ps(acc[2], acc[3]));
    hsum(s) + generic::dot_f32(&a[i..n], &b[i..n])
}

#[target_feature(enable = "avx2,fma")]
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
/// as alone, so results do not depend on the tiling.
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn gemv_f16_imp(w: &[f16], x: &[f32], out: &mut [f32]) {
    const ROWS: usize = 4;
    let k = x.len();
    assert!(w.len() >= out.len() * k);
    let px = x.as_ptr();
    let tiled = out.len() / ROWS * ROWS;
    for (t, o) in out[..tiled].chunks_exact_mut(ROWS).enumerate() {
        let first = t * ROWS * k;
        let pw = w[first..].as_ptr() as *const u16;
        let mut acc = [[_mm256_setzero_ps(); 2]; ROWS];
        let mut i = 0;
        // SAFETY: loads read elements i..i+8 ≤ k of rows t*4..t*4+4 (inside `w`, asserted
        // above) and of x; prefetches do not fault and their addresses are computed with
        // wrapping arithmetic.
        unsafe {
            while i + 16 <= k {
                let xv = [_mm256_loadu_ps(px.add(i)), _mm256_loadu_ps(px.add(i + 8))];
                for (r, acc) in acc.iter_mut().enumerate() {
                    let row = pw.add(r * k + i);
                    if i % 32 == 0 {
                        _mm_prefetch::<_MM_HINT_T0>(row.wrapping_add(ROWS * k) as *const i8);
                    }
                    for (j, acc) in acc.iter_mut().enumerate() {
                        let wv = _mm256_cvtph_ps(_mm_loadu_si128(row.add(8 * j) as *const __m128i));
                        *acc = _mm256_fmadd_ps(wv, xv[j], *acc);
                    }
                }
                i += 16;
            }
            while i + 8 <= k {
                let xv = _mm256_loadu_ps(px.add(i));
                for (r, acc) in acc.iter_mut().enumerate() {
                    let wv = _mm256_cvtph_ps(_mm_loadu_si128(pw.add(r * k + i) as *const __m128i));
                    acc[0] = _mm256_fmadd_ps(wv, xv, acc[0]);
                }
                i += 8;
            }
        }
        for (r, (o, acc)) in o.iter_mut().zip(acc).enumerate() {
            let row = &w[first + r * k..first + (r + 1) * k];
            let tail: f32 = row[i..k]
                .iter()
                .zip(&x[i..k])
                .map(|(w, x)| w.to_f32() * x)
                .sum();
            *o = hsum(_mm256_add_ps(acc[0], acc[1])) + tail;
        }
    }
    for (o, row) in out[tiled..].iter_mut().zip(w[tiled * k..].chunks_exact(k)) {
        let (pw, px) = (row.as_ptr() as *const u16, x.as_ptr());
        let mut acc = [_mm256_setzero_ps(); 2];
        let mut i = 0;
        // SAFETY: loads read elements i..i+8 ≤ k of the row and of x.
        unsafe {
            while i + 16 <= k {
                for (j, acc) in acc.iter_mut().enumerate() {
                    let o = i + 8 * j;
                    let wv = _mm256_cvtph_ps(_mm_loadu_si128(pw.add(o) as *const __m128i));
                    *acc = _mm256_fmadd_ps(wv, _mm256_loadu_ps(px.add(o)), *acc);
                }
                i += 16;
            }
            while i + 8 <= k {
                let wv = _mm256_cvtph_ps(_mm_loadu_si128(pw.add(i) as *const __m128i));
                acc[0] = _mm256_fmadd_ps(wv, _mm256_loadu_ps(px.add(i)), acc[0]);
                i += 8;
            }
        }
        let tail: f32 = row[i..k]
            .iter()
            .zip(&x[i..k])
            .map(|(w, x)| w.to_f32() * x)
            .sum();
        *o = hsum(_mm256_add_ps(acc[0], acc[1])) + tail;
    }
}

#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn axpy_f16_imp(a: f32, x: &[f16], y: &mut [f32]) {
    let n = x.len().min(y.len());
    let av = _mm256_set1_ps(a);
    let (px, py) = (x.as_ptr() as *const u16, y.as_mut_ptr());
    let mut i = 0;
    // SAFETY: elements i..i+8 ≤ n; the tail goes through the generic code.
    unsafe {
        while i + 8 <= n {
            let xv = _mm256_cvtph_ps(_mm_loadu_si128(px.add(i) as *const __m128i));
            let v = _mm256_fmadd_ps(av, xv, _mm256_loadu_ps(py.add(i)));
            _mm256_storeu_ps(py.add(i), v);
            i += 8;
        }
    }
    generic::axpy_f16(a, &x[i..n], &mut y[i..n]);
}

#[target_feature(enable = "avx2,f16c")]
unsafe fn widen_f16_imp(src: &[f16], dst: &mut [f32]) {
    let n = src.len().min(dst.len());
    let (ps, pd) = (src.as_ptr() as *const u16, dst.as_mut_ptr());
    let mut i = 0;
    // SAFETY: elements i..i+8 ≤ n; the tail goes through the generic code.
    unsafe {
        while i + 8 <= n {
            let v = _mm256_cvtph_ps(_mm_loadu_si128(ps.add(i) as *const __m128i));
            _mm256_storeu_ps(pd.add(i), v);
            i += 8;
        }
    }
    generic::widen_f16(&src[i..n], &mut dst[i..n]);
}

#[target_feature(enable = "avx2,fma")]
unsafe fn silu_mul_imp(gate: &mut [f32], up: &[f32]) {
    generic::silu_mul(gate, up)
}

#[target_feature(enable = "avx2,fma")]
unsafe fn softmax_imp(x: &mut [f32]) {
    generic::softmax(x)
}

#[target_feature(enable = "avx2,fma")]
unsafe fn quantize_row_imp(x: &[f32], q: &mut [i8], s: &mut [f32], z: &mut [i32]) {
    generic::quantize_row(x, q, s, z)
}

/// The generic loop under this tier's features: its 64-wide accumulator becomes registers.
#[target_feature(enable = "avx2,fma")]
unsafe fn weighted_sum_imp(p: &[f32], rows: &[f32], out: &mut [f32]) {
    generic::weighted_sum(p, rows, out)
}

#[target_feature(enable = "avx2,fma")]
unsafe fn rmsnorm_imp(x: &[f32], w: &[f32], eps: f32, out: &mut [f32]) {
    generic::rmsnorm(x, w, eps, out)
}

#[target_feature(enable = "avx2,fma")]
unsafe fn rope_imp(x: &mut [f32], cos: &[f32], sin: &[f32]) {
    generic::rope(x, cos, sin)
}

/// `generic::grouped_scores` without the `gemm` crate, whose product packed the keys anew for
/// every query row: as the AVX-512 tier's (its docs), in blocks of 8 keys whose 8 dot products
/// per head are summed together by `sums8`. Head widths that are not a multiple of 8 take the
/// generic product.
#[target_feature(enable = "avx2,fma")]
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
            64 => grouped_scores_chunks::<8>(q, qs, m, keys, n, scale, out, os),
            128 => grouped_scores_chunks::<16>(q, qs, m, keys, n, scale, out, os),
            32 => grouped_scores_chunks::<4>(q, qs, m, keys, n, scale, out, os),
            16 => grouped_scores_chunks::<2>(q, qs, m, keys, n, scale, out, os),
            _ => generic::grouped_scores(q, qs, m, keys, n, k, scale, out, os),
        }
    }
}

/// `grouped_scores` for heads of `8 * CHUNKS` floats: constant offsets within a block of keys.
#[target_feature(enable = "avx2,fma")]
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
    let k = 8 * CHUNKS;
    if !generic::grouped_scores_operands(q, qs, m, keys, n, k, out, os) {
        return;
    }
    let scale_v = _mm256_set1_ps(scale);
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
                let mut acc = [_mm256_setzero_ps(); 8];
                for c in 0..CHUNKS {
                    let qv = _mm256_loadu_ps(qi.add(8 * c));
                    for (t, acc) in acc.iter_mut().enumerate() {
                        let kv = _mm256_loadu_ps(block.add(t * k + 8 * c));
                        *acc = _mm256_fmadd_ps(kv, qv, *acc);
                    }
                }
                _mm256_storeu_ps(po.add(i * os + j0), _mm256_mul_ps(sums8(acc), scale_v));
            }
        }
        // The last keys one at a time.
        for j in whole..n {
            let key = keys.as_ptr().add(j * k);
            for i in 0..m {
                let qi = pq.add(i * qs);
                let mut acc = _mm256_setzero_ps();
                for c in 0..CHUNKS {
                    let kv = _mm256_loadu_ps(key.add(8 * c));
                    acc = _mm256_fmadd_ps(kv, _mm256_loadu_ps(qi.add(8 * c)), acc);
                }
                *po.add(i * os + j) = hsum(acc) * scale;
            }
        }
    }
}

/// The sums of 8 vectors, `v[t]`'s in lane `t`: pairwise horizontal adds within 128-bit
/// halves, then the halves added.
#[target_feature(enable = "avx")]
#[inline]
fn sums8(v: [__m256; 8]) -> __m256 {
    let (a, b) = (_mm256_hadd_ps(v[0], v[1]), _mm256_hadd_ps(v[2], v[3]));
    let (c, d) = (_mm256_hadd_ps(v[4], v[5]), _mm256_hadd_ps(v[6], v[7]));
    // Lanes 0..4: v[0..4]'s low halves summed, 4..8: their high halves; the same for v[4..8].
    let (low, high) = (_mm256_hadd_ps(a, b), _mm256_hadd_ps(c, d));
    _mm256_add_ps(
        _mm256_permute2f128_ps::<0x20>(low, high),
        _mm256_permute2f128_ps::<0x31>(low, high),
    )
}

/// The generic loop under this tier's features, fused, 16 output columns per pass.
#[target_feature(enable = "avx2,fma")]
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
