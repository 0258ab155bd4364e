//! q6k products (kernels/q6k.rs's layout) in 256-bit AVX2, the same code in every x86 tier's
//! table: an AVX-512 or AVX-VNNI CPU runs AVX2, and q6k holds a variant's few wide matrices
//! (the 1.5B's: 15% of its layer weights), not enough to pay for a kernel per tier.
//!
//! A half group (8 blocks, or the 4 that end a 12- or 4-block group) is unpacked once per
//! weight row into eight registers of 6-bit values, one per step (the nibble, and the top bits
//! moved above it by one 16-bit shift and a mask); each activation row then takes eight
//! `vpmaddubsw` (u8 · i8, pairs of 63 · 127 fit i16 twice over) and four `vpmaddwd` that
//! multiply the i16 sums by their sub-block's scale code as they widen them, and one more
//! `vpmaddwd` of the sub-blocks' activation sums by the codes for the `32 · sc · Σx` that `u − 32`
//! asks to subtract (i32 throughout: |Σ sc · u · x| ≤ 2 · 128 · 16 · 63 · 127 < 2²⁶; the result,
//! |Σ sc · (u − 32) · x| < 2²⁴, converts to f32 exactly). A first version widened with ones and
//! multiplied by the codes with `vpmulld` (10 cycles' latency on Zen 2): 5.9 GiB/s on one
//! thread against int8's 9.1 (`cargo bench --bench kernels -- gemv/q6k`).
//!
//! Rows of at least `PREFETCH_FROM` blocks prefetch the group `PREFETCH_GROUPS` ahead (the
//! first seven of its seven or eight lines), as the int4 tiles do. Without it a decode batch over the 1.5B's 8,960-wide
//! down projections waited on the weights' loads (`perf annotate`: the top-bit loads took 29% of
//! the samples) and read 10.4 GiB/s in a batch of four against 18–24 at 4,864 wide (2-core Zen 5,
//! 2026-12-07, `QWEN2_EDGE_BENCH_COLS=8960 cargo bench --bench kernels -- gemv/q6k`, builds
//! alternated, GiB/s): batch of four 10.4 -> 19.0–19.8 (`avx2-vnni`), 10.4–10.7 -> 16.4–17.8
//! (`avx2-fma`), 10.3–10.7 -> 17.9–18.0 (`avx512-vnni`); one thread 20.7 -> 26.9–27.3
//! (`avx2-fma`); at 4,864 wide two threads 37–40 -> 44–48. At 896 wide one thread was 5% slower
//! with it (24.4–26.2 -> 19.4–24.0), so narrower rows keep the hardware's prefetch alone. Column
//! chunks as the int4 strips take wide rows (`strip!`, x86_64/mod.rs) measured slower here:
//! with the prefetch, 14.7–15.0 chunked against 18.0–18.5 whole.

use super::avx2::{hsum, load, PREFETCH_GROUPS};
use super::*;
use crate::backend::native::kernels::q6k::{q6_group_at, Q6Ref};

type T = Avx2Fma;

safe!(T, gemv_q6 => gemv_q6_imp(w: Q6Ref, first: usize, x: QRow, out: &mut [f32]));
safe!(T, gemm_q6 => gemm_q6_imp(w: Q6Ref, acts: &QActs, out: &mut ColumnBlock<'_>));

// Prefill: one weight row per tile, each unpacked half group serving the tile's (up to 4)
// activation rows, in tiling.rs's loops.
gemm_tiled!(
    gemm_q6_imp,
    tile_q6,
    Q6Ref,
    "avx,avx2,fma,f16c",
    1,
    4,
    tile_q6,
    1
);

/// Decode: the rows one after another, the activation row checked once (through tiling.rs's
/// `gemv_tiled!`, each row paid a tile call and its checks: about 100 instructions by the
/// disassembly, against some 360 for a 896-wide row's groups).
#[target_feature(enable = "avx,avx2,fma,f16c")]
fn gemv_q6_imp(w: Q6Ref, first: usize, x: QRow, out: &mut [f32]) {
    let nb = w.blocks();
    assert_q6_acts(&x, nb);
    for (i, o) in out.iter_mut().enumerate() {
        // SAFETY: the row holds `nb` padded blocks in the q6k layout (`Q6Ref::row`) and the
        // activation row at least `nb` blocks of codes and sums (asserted above).
        *o = unsafe { row_dots::<1>(w.row(first + i), nb, [x]) }[0];
    }
}

/// `R` q6k weight rows from `j` times `C` activation rows (tiling.rs's tile).
#[target_feature(enable = "avx,avx2,fma,f16c")]
#[inline]
unsafe fn tile_q6<const R: usize, const C: usize>(
    w: Q6Ref,
    j: usize,
    xs: [QRow; C],
) -> [[f32; C]; R] {
    let nb = w.blocks();
    for x in &xs {
        assert_q6_acts(x, nb);
    }
    let mut out = [[0.0; C]; R];
    for (r, out) in out.iter_mut().enumerate() {
        // SAFETY: the row holds `nb` padded blocks in the q6k layout (`Q6Ref::row`) and each
        // activation row at least `nb` blocks of codes and sums (asserted above).
        *out = unsafe { row_dots::<C>(w.row(j + r), nb, xs) };
    }
    out
}

/// What `row_dots` reads of an activation row through raw pointers.
fn assert_q6_acts(x: &QRow, nb: usize) {
    x.assert_blocks(nb, false);
    assert!(x.half_sums.len() >= nb);
}

/// Rows of at least this many blocks (4,096 columns) prefetch their groups ahead (module docs).
const PREFETCH_FROM: usize = 128;

/// The dot products of one repacked q6k row of `nb` padded blocks with `C` activation rows.
///
/// # Safety
/// `row` must hold `nb` blocks in the q6k layout and every `xs[c]` at least `nb` blocks of
/// codes, scales, sums and half sums.
#[target_feature(enable = "avx,avx2,fma,f16c")]
#[inline]
unsafe fn row_dots<const C: usize>(row: &[u8], nb: usize, xs: [QRow; C]) -> [f32; C] {
    let mut acc = [_mm256_setzero_ps(); C];
    let full = nb / GROUP * GROUP;
    // SAFETY: each group's bytes and blocks lie in the row and the activation rows (the
    // caller's contract); each half reads only its own lanes of them.
    unsafe {
        for fb in (0..full).step_by(GROUP) {
            if nb >= PREFETCH_FROM {
                // The group `PREFETCH_GROUPS` ahead, the first seven of its seven or eight
                // lines (420 bytes, starting anywhere in a line): more misses in flight. A
                // prefetch never faults; the address may lie past the row (`wrapping_add`).
                let ahead = row
                    .as_ptr()
                    .wrapping_add(q6_group_at(fb + PREFETCH_GROUPS * GROUP));
                for line in 0..7 {
                    _mm_prefetch::<_MM_HINT_T0>(ahead.wrapping_add(64 * line) as *const i8);
                }
            }
            let group = row.as_ptr().add(q6_group_at(fb));
            half_group!(group, 16, 0, 8, fb, xs, acc);
            half_group!(group, 16, 1, 8, fb, xs, acc);
        }
        let group = row.as_ptr().add(q6_group_at(full));
        match nb - full {
            12 => {
                half_group!(group, 12, 0, 8, full, xs, acc);
                half_group!(group, 12, 1, 4, full, xs, acc);
            }
            8 => half_group!(group, 8, 0, 8, full, xs, acc),
            4 => half_group!(group, 4, 0, 4, full, xs, acc),
            _ => {}
        }
    }
    let mut dots = [0.0; C];
    for (dot, acc) in dots.iter_mut().zip(acc) {
        *dot = hsum(acc);
    }
    dots
}

/// Half `$h` (lanes `8 $h..8 $h + $n`) of a group of `$lanes` blocks from block `$fb` at
/// `$group`, into the accumulators `$acc` of the activation rows `$xs`. A macro, not a
/// function: as an `#[inline]` function it was called out of line, its offsets computed at
/// run time (200 instructions a half group, a third of them scalar).
///
/// Safety (of the caller's `unsafe` block): the group and the activation rows' blocks
/// `$fb..$fb + $lanes` are readable. Every offset stays inside the group's layout (q6k.rs):
/// nibbles and top bits `4 $lanes` bytes a chunk, this half's lanes `32 $h..` of each, its
/// `2 $n` scale codes at `24 $lanes + 16 $h`, its super-block's d at `26 $lanes + 2 $h`.
macro_rules! half_group {
    ($group:expr, $lanes:literal, $h:literal, $n:literal, $fb:expr, $xs:expr, $acc:expr) => {{
        let (group, lanes, lane0) = ($group, $lanes, 32 * $h);
        let (nibble_mask, top_mask) = (_mm256_set1_epi8(0x0F), _mm256_set1_epi8(0x30));
        let top0 = load::<$n>(group.add(16 * lanes + lane0));
        let top1 = load::<$n>(group.add(20 * lanes + lane0));
        let mut u = [_mm256_setzero_si256(); 8];
        for t in 0..4 {
            let nibbles = load::<$n>(group.add(4 * lanes * t + lane0));
            let bits = if t < 2 { top0 } else { top1 };
            let (first, second) = if t % 2 == 0 {
                (_mm256_slli_epi16(bits, 4), _mm256_slli_epi16(bits, 2))
            } else {
                (bits, _mm256_srli_epi16(bits, 2))
            };
            let high = _mm256_and_si256(_mm256_srli_epi16(nibbles, 4), nibble_mask);
            u[t] = _mm256_or_si256(
                _mm256_and_si256(nibbles, nibble_mask),
                _mm256_and_si256(first, top_mask),
            );
            u[t + 4] = _mm256_or_si256(high, _mm256_and_si256(second, top_mask));
        }
        // The half's scale codes as i16 pairs (a block's two sub-blocks in its 32-bit lane),
        // and each sub-block's code in both i16 of its block's lane (`vpshufb` indexes bytes
        // within each 128-bit lane: lane i's pair at byte 4i).
        let pairs = codes::<$n>(group.add(24 * lanes + 16 * $h));
        let pick_first = _mm256_setr_epi32(
            0x0100_0100,
            0x0504_0504,
            0x0908_0908,
            0x0D0C_0D0C,
            0x0100_0100,
            0x0504_0504,
            0x0908_0908,
            0x0D0C_0D0C,
        );
        let pick_second = _mm256_add_epi8(pick_first, _mm256_set1_epi8(2));
        let sc0 = _mm256_shuffle_epi8(pairs, pick_first);
        let sc1 = _mm256_shuffle_epi8(pairs, pick_second);
        let d = group.add(26 * lanes + 2 * $h).cast::<u16>().read_unaligned();
        let d = _mm256_broadcastss_ps(_mm_cvtph_ps(_mm_cvtsi32_si128(d as i32)));
        let b = $fb + 8 * $h;
        for (x, acc) in $xs.iter().zip($acc.iter_mut()) {
            let q = x.q.as_ptr().add($fb * BLOCK).cast::<u8>().add(lane0);
            // sc · Σ u · x per sub-block, summed per block: `vpmaddwd` by the codes.
            let first = _mm256_add_epi32(
                _mm256_madd_epi16(step_pair::<$n>(&u, q, lanes, 0), sc0),
                _mm256_madd_epi16(step_pair::<$n>(&u, q, lanes, 2), sc0),
            );
            let second = _mm256_add_epi32(
                _mm256_madd_epi16(step_pair::<$n>(&u, q, lanes, 4), sc1),
                _mm256_madd_epi16(step_pair::<$n>(&u, q, lanes, 6), sc1),
            );
            // − 32 · Σ_h sc_h · Σx_h: the sub-blocks' activation sums (i16 pairs) by the codes.
            let sums = _mm256_madd_epi16(load::<$n>(x.half_sums.as_ptr().add(b).cast()), pairs);
            let total = _mm256_sub_epi32(
                _mm256_add_epi32(first, second),
                _mm256_slli_epi32(sums, 5),
            );
            let scales = _mm256_castsi256_ps(load::<$n>(x.scales.as_ptr().add(b).cast()));
            *acc = _mm256_fmadd_ps(_mm256_cvtepi32_ps(total), _mm256_mul_ps(d, scales), *acc);
        }
    }};
}
use half_group;

/// `N` blocks' scale codes at `at` (two a block) widened to i16: a block's two in its 32-bit
/// lane.
///
/// # Safety
/// `2 N` bytes are readable at `at`.
#[target_feature(enable = "avx,avx2")]
#[inline]
unsafe fn codes<const N: usize>(at: *const u8) -> __m256i {
    // SAFETY: the caller's contract.
    unsafe {
        let bytes = if N == 8 {
            _mm_loadu_si128(at as *const __m128i)
        } else {
            _mm_loadl_epi64(at as *const __m128i)
        };
        _mm256_cvtepi8_epi16(bytes)
    }
}

/// `u · x` over steps `s` and `s + 1` as i16 pairs (each ≤ 4 · 63 · 127), the activation steps
/// from `q` (this half's lanes of its group's step 0).
///
/// # Safety
/// Steps `s` and `s + 1` of `N` lanes are readable at `q + 4 lanes s`.
#[target_feature(enable = "avx,avx2")]
#[inline]
unsafe fn step_pair<const N: usize>(
    u: &[__m256i; 8],
    q: *const u8,
    lanes: usize,
    s: usize,
) -> __m256i {
    // SAFETY: the caller's contract.
    unsafe {
        let a = _mm256_maddubs_epi16(u[s], load::<N>(q.add(4 * lanes * s)));
        let b = _mm256_maddubs_epi16(u[s + 1], load::<N>(q.add(4 * lanes * (s + 1))));
        _mm256_add_epi16(a, b)
    }
}
