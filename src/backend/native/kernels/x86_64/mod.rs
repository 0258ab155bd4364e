//! x86-64 kernels: the `generic` names, specialised for three tiers detected at run time with
//! pulp tokens (never `target-cpu`), each in its own file with its table:
//!
//! * `avx512` — AVX-512 F/BW/VL + VNNI (Ice Lake, Sapphire Rapids, Zen 4 and later):
//!   512-bit vectors, masked loads for tails, `vpdpbusd` for int8·int8 dot products.
//! * `avx2_vnni` — AVX2 + FMA + F16C + AVX-VNNI (Alder Lake and later, Alder Lake-N, Zen 5):
//!   `avx2`'s kernels with the 256-bit `vpdpbusd` in the int8 and int4 products.
//! * `avx2` — AVX2 + FMA + F16C (Haswell, Zen 1 and later): 256-bit vectors, int8 dot products
//!   through `vpmaddubsw` + `vpmaddwd`.
//!
//! pulp's portable `Simd` trait has no int8 dot product and no f16 conversion, so each kernel
//! is a `#[target_feature]` function of `std::arch` intrinsics behind a safe wrapper; the
//! wrappers are only put in the kernel table (mod.rs) after the pulp token for their tier was
//! created, which is the proof the instructions exist. Every kernel here is compared with its
//! generic twin in tests/it/kernels.rs on random inputs of odd sizes.
//!
//! The elementwise kernels (RMSNorm, RoPE, SiLU·mul, softmax, activation quantization) are the
//! generic code compiled under each tier's target features: LLVM vectorizes them to the tier's
//! width, and the quantizer's rounding becomes `vroundps` instead of a libm `rintf` call per
//! element (2% of a decode). f32/f16 prefill products go through the `gemm` crate, which picks
//! its own microkernels for the CPU.

use std::arch::x86_64::*;

use half::f16;

use super::generic;
use super::ops::BATCH_ROWS;
use super::pool::ColumnBlock;
use super::quant::{groups, groups_in, DecodedRow, Q4Ref, Q8Ref, QActs, QRow, BLOCK, GROUP};

pulp::simd_type!({
    /// AVX-512 with VNNI.
    pub struct Avx512Vnni {
        pub avx512f: f!("avx512f"),
        pub avx512bw: f!("avx512bw"),
        pub avx512vl: f!("avx512vl"),
        pub avx512vnni: f!("avx512vnni"),
        pub avx2: f!("avx2"),
        pub fma: f!("fma"),
        pub f16c: f!("f16c"),
    }

    /// AVX2 with FMA and F16C.
    pub struct Avx2Fma {
        pub avx: f!("avx"),
        pub avx2: f!("avx2"),
        pub fma: f!("fma"),
        pub f16c: f!("f16c"),
    }
});

/// AVX2 with FMA, F16C and AVX-VNNI. pulp 0.22 knows no AVX-VNNI feature, so this token is
/// the `Avx2Fma` one plus the standard library's run-time detection of `avxvnni`.
#[derive(Clone, Copy, Debug)]
pub struct Avx2Vnni {
    _avx2: Avx2Fma,
}

impl Avx2Vnni {
    /// What the token proves (tests/it/kernels.rs reads it as the pulp tokens' lists).
    pub const FEATURES: &'static str = "avx,avx2,fma,f16c,avxvnni";

    pub fn try_new() -> Option<Self> {
        let avx2 = Avx2Fma::try_new()?;
        std::arch::is_x86_feature_detected!("avxvnni").then_some(Avx2Vnni { _avx2: avx2 })
    }

    pub fn is_available() -> bool {
        Self::try_new().is_some()
    }
}

/// Wraps a `#[target_feature]` kernel in a safe function of the same signature, for one tier.
macro_rules! safe {
    ($token:ty, $name:ident => $imp:ident ($($arg:ident : $ty:ty),*) $(-> $ret:ty)?) => {
        #[allow(clippy::too_many_arguments)] // the kernel's own signature
        pub fn $name($($arg: $ty),*) $(-> $ret)? {
            debug_assert!(<$token>::is_available());
            // SAFETY: this wrapper is only reachable through a kernel table built after
            // `<$token>::try_new()` succeeded, so the CPU has every feature `$imp` enables.
            unsafe { $imp($($arg),*) }
        }
    };
}

/// Where an int4 tile's block scales come from, a constant of each 256-bit half-group
/// instantiation (so no format branch runs in the group loops): int4's f16 scales, int4k's
/// codes decoded per group, or int4k's scales and mins decoded ahead (`Q4Ref::decoded`, a
/// prefill). int8 tiles take `INT4` and ignore it.
pub(super) const INT4: u8 = 0;
pub(super) const INT4K: u8 = 1;
pub(super) const INT4K_DECODED: u8 = 2;

/// `unsafe fn $tile<R, C>(w, j, xs) -> [[f32; C]; R]` of the 256-bit tiers (decode GEMVs and
/// prefill; a decode batch runs the same parts in `strip!` below): `R` weight rows from `j`
/// times `C` activation rows, one `$half::<R, C, N, FORMAT>` per half group (`N` = 8
/// lanes, or 4 for a group's odd half; int4k's codes decoded around it, `@half`); `$kind`
/// (`q8` or `q4`) says whether rows end multiplied by a row scale and how the groups are
/// walked (`@groups`). The operands' lengths are checked here once, so the half groups use
/// plain pointer offsets; the sums pass by value. With the width read at run time and the
/// format tested in every half group, `perf` showed an int4 tile's step addresses kept in
/// spilled registers and reloaded every step.
macro_rules! tile {
    ($tile:ident, $half:ident, $w:ty, $features:literal, $kind:ident) => {
        #[target_feature(enable = $features)]
        #[inline]
        unsafe fn $tile<const R: usize, const C: usize>(
            w: $w,
            j: usize,
            xs: [QRow; C],
        ) -> [[f32; C]; R] {
            #[target_feature(enable = $features)]
            #[inline]
            unsafe fn format<const R: usize, const C: usize, const FORMAT: u8>(
                w: $w,
                j: usize,
                xs: [QRow; C],
            ) -> [[f32; C]; R] {
                let nb = w.blocks();
                let mut rows: [&[u8]; R] = [&[]; R];
                for (r, row) in rows.iter_mut().enumerate() {
                    *row = w.row(j + r);
                }
                let layout = tile!(@layout $kind, w, j);
                for x in &xs {
                    x.assert_blocks(nb, FORMAT != INT4);
                }
                let scales = tile!(@scales $kind, w, j);
                let op = &Operands::new(rows, layout, &xs);
                let accf = tile!(@groups $kind, $half, op, nb);
                let mut out = [[0.0; C]; R];
                for r in 0..R {
                    for c in 0..C {
                        out[r][c] = hsum(accf[r][c]) * tile!(@scale $kind, scales, r);
                    }
                }
                out
            }
            // One instantiation per format.
            // SAFETY: the caller's contract, passed on.
            unsafe {
                match tile!(@format $kind, w) {
                    INT4K => format::<R, C, INT4K>(w, j, xs),
                    INT4K_DECODED => format::<R, C, INT4K_DECODED>(w, j, xs),
                    _ => format::<R, C, INT4>(w, j, xs),
                }
            }
        }
    };
    // The sums of the tile's groups. int4: whole groups, both halves with the lane count a
    // constant, then the last group (4, 8 or 12 lanes) with it read at run time (avx2.rs
    // module docs, measured). int8: every group alike, the sums by reference; in int4's shape
    // the compiler called a decode-batch tile's half groups out of line (20% slower).
    (@groups $kind:ident, $half:ident, $op:ident, $nb:ident) => {{
        let accf = [[_mm256_setzero_ps(); C]; R];
        tile!(@span $kind, $half, $op, $nb, 0, $nb, accf)
    }};
    // `@groups` over blocks `$from..$to` (group boundaries, or `$nb`), added to `$accf`: a
    // row's groups taken in order over several calls give its sums exactly (`strip!`).
    (@span q4, $half:ident, $op:ident, $nb:ident, $from:expr, $to:expr, $accf:expr) => {{
        let mut accf = $accf;
        let whole = $nb / GROUP * GROUP;
        let (from, to): (usize, usize) = ($from, $to);
        let mut fb = from;
        while fb < whole.min(to) {
            // SAFETY: same features; the operands' lengths were checked by the tile.
            unsafe {
                let at = |h| Half { fb, lanes: GROUP, h };
                if FORMAT == INT4K {
                    // int4k's codes of both halves unpacked together (avx2.rs module docs).
                    let codes = kquant_group::<R, C>($op, fb, GROUP);
                    accf = tile!(@kquant_half $half, $op, 8, at(0), &codes, accf);
                    accf = tile!(@kquant_half $half, $op, 8, at(1), &codes, accf);
                } else {
                    accf = tile!(@half $half, $op, 8, at(0), accf);
                    accf = tile!(@half $half, $op, 8, at(1), accf);
                }
            }
            fb += GROUP;
        }
        if fb < $nb && to == $nb {
            let lanes = $nb - fb;
            let at = |h| Half { fb, lanes, h };
            // SAFETY: as above.
            unsafe {
                if R * C <= 2 {
                    // Decode and decode-batch tiles: one call of each half size, so the
                    // compiler inlines both.
                    if FORMAT == INT4K && lanes == 12 {
                        // The 0.5B's 896-wide rows end in 12 blocks: codes unpacked together.
                        let codes = kquant_group::<R, C>($op, fb, lanes);
                        accf = tile!(@kquant_half $half, $op, 8, at(0), &codes, accf);
                        accf = tile!(@kquant_half $half, $op, 4, at(1), &codes, accf);
                    } else {
                        if lanes >= 8 {
                            accf = tile!(@half $half, $op, 8, at(0), accf);
                        }
                        if lanes % 8 != 0 {
                            accf = tile!(@half $half, $op, 4, at(lanes / 8), accf);
                        }
                    }
                } else {
                    // The prefill tile: the compiler calls these out of line, ~10% faster
                    // than with them inlined (avx2.rs module docs).
                    accf = if lanes >= 8 {
                        tile!(@half $half, $op, 8, at(0), accf)
                    } else {
                        tile!(@half $half, $op, 4, at(0), accf)
                    };
                    if lanes > 8 {
                        accf = tile!(@half $half, $op, 4, at(1), accf);
                    }
                }
            }
        }
        accf
    }};
    // One int4 half group. int4k's codes are decoded (scales and mins) before it and its
    // `− min · Σx` added after it, each its own inlined function: in one function that half
    // group was too big to inline, and `perf` showed decode tiles calling it. The other
    // formats load their scales inside, after the dot products (loaded first, model prefill
    // lost 6–8%; avx2.rs module docs).
    (@half $half:ident, $op:ident, $n:literal, $at:expr, $accf:ident) => {{
        let at = $at;
        if FORMAT == INT4K {
            let (scales, mins) = half_scales::<R, C, $n, FORMAT>($op, at);
            let accf = $half::<R, C, $n, FORMAT>($op, at, Some(&scales), $accf);
            half_mins::<R, C, $n>($op, at, &mins, accf)
        } else {
            $half::<R, C, $n, FORMAT>($op, at, None, $accf)
        }
    }};
    // An int4k half group whose codes were unpacked with its group's (`kquant_group`).
    (@kquant_half $half:ident, $op:ident, $n:literal, $at:expr, $codes:expr, $accf:ident) => {{
        let at = $at;
        let (scales, mins) = group_half_scales::<R>($codes, at.h);
        let accf = $half::<R, C, $n, FORMAT>($op, at, Some(&scales), $accf);
        half_mins::<R, C, $n>($op, at, &mins, accf)
    }};
    (@span q8, $half:ident, $op:ident, $nb:ident, $from:expr, $to:expr, $accf:expr) => {{
        let mut accf = $accf;
        for (fb, lanes) in groups_in($nb, $from..$to) {
            for h in 0..lanes.div_ceil(8) {
                let at = Half { fb, lanes, h };
                // SAFETY: same features; the operands' lengths were checked by the tile.
                unsafe {
                    if lanes - 8 * h >= 8 {
                        $half::<R, C, 8>($op, at, &mut accf)
                    } else {
                        $half::<R, C, 4>($op, at, &mut accf)
                    }
                }
            }
        }
        accf
    }};
    (@format q8, $w:ident) => { INT4 };
    (@format q4, $w:ident) => {
        if !$w.kquant {
            INT4
        } else if $w.decoded.is_some() {
            INT4K_DECODED
        } else {
            INT4K
        }
    };
    // Weight bytes per block of a full group, and int4k's scales and mins of the tile's rows
    // if they were decoded ahead.
    (@layout q8, $w:ident, $j:ident) => { (BLOCK, None) };
    (@layout q4, $w:ident, $j:ident) => { ($w.block_bytes(), $w.decoded_rows::<R>($j)) };
    // int8 rows end multiplied by their scale; int4 scales are per block, inside the half groups.
    (@scales q8, $w:ident, $j:ident) => { &$w.scales[$j..$j + R] };
    (@scales q4, $w:ident, $j:ident) => { () };
    (@scale q8, $scales:ident, $r:ident) => { $scales[$r] };
    (@scale q4, $scales:ident, $r:ident) => {{
        let () = $scales;
        1.0
    }};
}

/// `strip!` takes rows of more than `WIDE_FROM` blocks (5,120 columns) in column chunks of
/// `WIDE_BLOCKS` (2,048 columns: four activation rows' codes, scales and sums in ~11 KB of L1),
/// `WIDE_ROWS` weight rows over each chunk (avx2.rs module docs). A whole group count, so
/// chunks end on group boundaries.
pub(super) const WIDE_FROM: usize = 160;
pub(super) const WIDE_BLOCKS: usize = 4 * GROUP;
pub(super) const WIDE_ROWS: usize = 8;

/// `unsafe fn $strip(w, rows, xs, store)` of the 256-bit tiers: weight rows `rows` (a task's)
/// times the activation rows `xs` of a decode batch (at most `BATCH_ROWS`) in tiles of one
/// weight row × `$chunk` activation rows (a smaller chunk at the end), every chunk taken while
/// the weight row is in L1, each result passed to `store(weight row, activation row, value)`.
/// Every output is the same sequence of operations whatever the tile, so a batch's row gets its
/// one-row result. One call per task rather than one per tile: a tile over one of the 0.5B's
/// 896-wide rows is four int4 half groups, and around them a call, its operand checks and the
/// latency of the final sums took about as long again (avx2.rs module docs, which also say why
/// decode GEMVs and prefill keep `$tile` calls).
macro_rules! strip {
    ($strip:ident, $half:ident, $w:ty, $features:literal, $kind:ident, $chunk:literal) => {
        #[target_feature(enable = $features)]
        unsafe fn $strip(
            w: $w,
            rows: std::ops::Range<usize>,
            xs: &[QRow],
            store: &mut dyn FnMut(usize, usize, f32),
        ) {
            /// Weight row `j` times `C` activation rows from `xs[c0]`.
            #[target_feature(enable = $features)]
            #[inline]
            unsafe fn tile<const C: usize, const FORMAT: u8>(
                w: $w,
                j: usize,
                xs: &[QRow],
                c0: usize,
                store: &mut dyn FnMut(usize, usize, f32),
            ) {
                const R: usize = 1;
                let nb = w.blocks();
                let xs: [QRow; C] = std::array::from_fn(|c| xs[c0 + c]);
                let layout = tile!(@layout $kind, w, j);
                let scales = tile!(@scales $kind, w, j);
                let op = &Operands::<R, C>::new([w.row(j)], layout, &xs);
                // The half groups' operands: the caller checked the activations' lengths,
                // and `w.row` the weight row's.
                let accf = tile!(@groups $kind, $half, op, nb);
                let r = 0;
                for c in 0..C {
                    store(j, c0 + c, hsum(accf[r][c]) * tile!(@scale $kind, scales, r));
                }
            }
            /// Weight rows `rows` times `C` activation rows from `xs[c0]` for rows of more than
            /// `WIDE_FROM` blocks: `WIDE_ROWS` weight rows at a time over each `WIDE_BLOCKS` of their
            /// blocks, so that part of the activation rows stays in L1 while they pass (each
            /// row's sums carried over in order: the same results as `tile`'s).
            #[target_feature(enable = $features)]
            #[inline]
            unsafe fn wide<const C: usize, const FORMAT: u8>(
                w: $w,
                rows: std::ops::Range<usize>,
                xs: &[QRow],
                c0: usize,
                store: &mut dyn FnMut(usize, usize, f32),
            ) {
                const R: usize = 1;
                let nb = w.blocks();
                let xs: [QRow; C] = std::array::from_fn(|c| xs[c0 + c]);
                let mut first = rows.start;
                while first < rows.end {
                    let last = (first + WIDE_ROWS).min(rows.end);
                    let mut sums = [[[_mm256_setzero_ps(); C]; R]; WIDE_ROWS];
                    let mut from = 0;
                    while from < nb {
                        let to = (from + WIDE_BLOCKS).min(nb);
                        for j in first..last {
                            let layout = tile!(@layout $kind, w, j);
                            let op = &Operands::<R, C>::new([w.row(j)], layout, &xs);
                            // The half groups' operands: the caller checked the activations'
                            // lengths, and `w.row` the weight row's.
                            let s = sums[j - first];
                            sums[j - first] = tile!(@span $kind, $half, op, nb, from, to, s);
                        }
                        from = to;
                    }
                    for j in first..last {
                        let scales = tile!(@scales $kind, w, j);
                        let r = 0;
                        for c in 0..C {
                            let v = hsum(sums[j - first][r][c]) * tile!(@scale $kind, scales, r);
                            store(j, c0 + c, v);
                        }
                    }
                    first = last;
                }
            }
            #[target_feature(enable = $features)]
            unsafe fn format<const FORMAT: u8>(
                w: $w,
                rows: std::ops::Range<usize>,
                xs: &[QRow],
                store: &mut dyn FnMut(usize, usize, f32),
            ) {
                let nb = w.blocks();
                for x in xs {
                    x.assert_blocks(nb, FORMAT != INT4);
                }
                // SAFETY: same features; the activations' lengths were checked above.
                unsafe {
                    if nb > WIDE_FROM {
                        strip!(@chunks wide, $chunk, w, rows.clone(), xs, store);
                    } else {
                        for j in rows {
                            strip!(@chunks tile, $chunk, w, j, xs, store);
                        }
                    }
                }
            }
            assert!(xs.len() <= BATCH_ROWS);
            // SAFETY: the caller's contract, passed on.
            unsafe {
                match tile!(@format $kind, w) {
                    INT4K => format::<INT4K>(w, rows, xs, store),
                    INT4K_DECODED => format::<INT4K_DECODED>(w, rows, xs, store),
                    _ => format::<INT4>(w, rows, xs, store),
                }
            }
        }
    };
    // `$f` (`tile` over row `$at`, or `wide` over rows `$at`) for every chunk of `$chunk`
    // activation rows, then the rest, fewer (only the tile sizes that can run are
    // instantiated).
    (@chunks $f:ident, $chunk:literal, $w:expr, $at:expr, $xs:expr, $store:expr) => {{
        let whole = $xs.len() / $chunk * $chunk;
        let rest = $xs.len() - whole;
        for c0 in (0..whole).step_by($chunk) {
            $f::<$chunk, FORMAT>($w, $at, $xs, c0, $store);
        }
        if $chunk > 1 && rest == 1 {
            $f::<1, FORMAT>($w, $at, $xs, whole, $store);
        } else if $chunk > 2 && rest == 2 {
            $f::<2, FORMAT>($w, $at, $xs, whole, $store);
        } else if $chunk > 3 && rest == 3 {
            $f::<3, FORMAT>($w, $at, $xs, whole, $store);
        }
    }};
}

pub mod avx2;
pub mod avx2_vnni;
pub mod avx512;
pub mod q6k;
