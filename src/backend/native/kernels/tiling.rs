//! The loops shared by every tier's tiled quantized products (macros, so each tier compiles
//! them under its own target features and its tile functions inline into them).
//!
//! A tile function `tile::<R, C>(w, j, xs) -> [[f32; C]; R]` multiplies `R` weight rows from
//! row `j` by the `C` activation rows `xs`; the loops below cover a decode GEMV (`rows` × 1
//! tiles: several weight streams in flight where the registers allow) or a prefill column
//! block (2 × `cols` tiles, activations taken `ACT_BLOCK` rows at a time so they and the
//! task's weight rows stay in L2). Each tier picks its sizes (its module doc says why).
//!
//! For a decode batch, the AVX2 tiers instead pass each task's rows to a strip function
//! (`strip!`, x86_64/mod.rs) that loops over them itself, the same tiles inside: a call per tile
//! cost as much as the tile's work on the 0.5B's 896-wide rows there (avx2.rs module docs).

/// Activation rows per pass of a tiled prefill product: 32 rows of the widest input (4864) are
/// 156 KB of int8, which with a task's weight rows stays in a 512 KB L2 (Zen 3, Cortex-A76).
pub const ACT_BLOCK: usize = 32;

/// Runs `$tile::<R, C>` for a runtime tile of `$r` (`$rows` or 1) weight rows × `$c` (1..=4)
/// activation rows and stores the results through `$store(r, c, value)`: the edges of the
/// prefill loop below. A `$rows` × 1 tile runs `$edge::<$rows, 1>` (a tier may keep it out of
/// line: avx2.rs).
macro_rules! dispatch {
    ($tile:ident, $edge:ident, $rows:literal, $w:expr, $j:expr, $r:expr, $xs:expr, $c:expr, $store:expr) => {{
        macro_rules! go {
            ($R:literal, $C:literal) => {
                go!($tile; $R, $C)
            };
            ($f:ident; $R:literal, $C:literal) => {{
                let xs: [QRow; $C] = std::array::from_fn(|c| $xs(c));
                let v = $f::<$R, $C>($w, $j, xs);
                for (r, row) in v.iter().enumerate() {
                    for (c, &x) in row.iter().enumerate() {
                        $store(r, c, x);
                    }
                }
            }};
        }
        match ($r == $rows, $c) {
            (true, 4) => go!($rows, 4),
            (true, 3) => go!($rows, 3),
            (true, 2) => go!($rows, 2),
            (true, _) => go!($edge; $rows, 1),
            (false, 4) => go!(1, 4),
            (false, 3) => go!(1, 3),
            (false, 2) => go!(1, 2),
            (false, _) => go!(1, 1),
        }
    }};
}

/// `unsafe fn $name(w, first, x, out)`: rows `first..first + out.len()` of `w` times one
/// activation row, in `$rows`-row tiles, then single rows. Only these two tile sizes are
/// instantiated, so both inline into the loop (a call per tile cost a third of an int4 GEMV
/// on AVX2).
macro_rules! gemv_tiled {
    ($name:ident, $tile:ident, $w:ty, $features:literal, $rows:literal) => {
        #[target_feature(enable = $features)]
        #[allow(clippy::int_plus_one)] // `$rows` may be 1
        unsafe fn $name(w: $w, first: usize, x: QRow, out: &mut [f32]) {
            let n = out.len();
            let mut i = 0;
            while i + $rows <= n {
                // SAFETY: the tile has the same target features as this function.
                let v = unsafe { $tile::<$rows, 1>(w, first + i, [x]) };
                for (o, v) in out[i..i + $rows].iter_mut().zip(v) {
                    *o = v[0];
                }
                i += $rows;
            }
            while i < n {
                // SAFETY: as above.
                out[i] = unsafe { $tile::<1, 1>(w, first + i, [x]) }[0][0];
                i += 1;
            }
        }
    };
}

/// `unsafe fn $name(w, acts, out)`: the column block's weight rows times every activation
/// row, in `$rows` × `$cols` tiles (for a decode batch of at most 4 activation rows,
/// `$batch_tile` in `$batch_rows` × `$cols` tiles, `$batch_rows` 1 or `$rows`: its weights
/// stream from memory, and a tier may prefetch further for it; 1 × `$cols` for the block's
/// last weight rows), `ACT_BLOCK` activation rows at a time. Every output is the same sequence
/// of operations whatever the tile, so a row's result does not depend on the others (batched
/// decoding relies on it). Optional: `strip` (x86_64/mod.rs) for decode batches, and `edge`, a
/// function for the prefill's `$rows` × 1 tiles (an odd activation row) instead of `$tile`.
macro_rules! gemm_tiled {
    (
        $name:ident, $tile:ident, $w:ty, $features:literal, $rows:literal, $cols:literal,
        $batch_tile:ident, $batch_rows:literal $(, strip $strip:ident)? $(, edge $edge:ident)?
    ) => {
        // `[$($edge)? $tile]`: the edge tile is the first ident, the tier's `edge` or else `$tile`.
        gemm_tiled!(@product $name, $tile, $w, $features, $rows, $cols, $batch_tile, $batch_rows,
            [$($strip)?], [$($edge)? $tile]);
    };
    (
        @product $name:ident, $tile:ident, $w:ty, $features:literal, $rows:literal,
        $cols:literal, $batch_tile:ident, $batch_rows:literal, [$($strip:ident)?],
        [$edge:ident $($unused_default:ident)?]
    ) => {
        #[target_feature(enable = $features)]
        unsafe fn $name(w: $w, acts: &QActs, out: &mut ColumnBlock<'_>) {
            let m = acts.rows;
            $(
                // A tier with a strip function (x86_64/mod.rs) takes a decode batch in one call
                // (a task of one weight row keeps the tile below: with no batch tile left in
                // this function, the compiler inlined the prefill tile differently, int4k's
                // prefill 11% slower).
                if m <= $crate::backend::native::kernels::BATCH_ROWS && out.end - out.start > 1 {
                    let xs: [QRow; $crate::backend::native::kernels::BATCH_ROWS] =
                        std::array::from_fn(|c| acts.row(c.min(m - 1)));
                    let (rows, first) = (out.start..out.end, out.start);
                    // SAFETY: the strip has the same target features as this function.
                    unsafe {
                        $strip(w, rows, &xs[..m], &mut |j, c, v| out.row(c)[j - first] = v)
                    };
                    return;
                }
            )?
            // A decode batch of up to 4 sequences streams its weights from memory: each tier
            // says how many weight rows a tile takes then (module docs).
            let batch = m <= $crate::backend::native::kernels::BATCH_ROWS;
            let rows = if batch { $batch_rows } else { $rows };
            for i0 in (0..m).step_by($crate::backend::native::kernels::tiling::ACT_BLOCK) {
                let i1 = (i0 + $crate::backend::native::kernels::tiling::ACT_BLOCK).min(m);
                // The block's activation rows, sliced once rather than per tile: a call per
                // tile and row took 6% of a decode batch's samples (the head alone is 50,000
                // tiles).
                let block: [QRow; $crate::backend::native::kernels::tiling::ACT_BLOCK] =
                    std::array::from_fn(|c| acts.row((i0 + c).min(i1 - 1)));
                let mut j = out.start;
                while j < out.end {
                    let r = if out.end - j >= rows { rows } else { 1 };
                    let base = j - out.start;
                    let mut i = i0;
                    while i < i1 {
                        let c = (i1 - i).min($cols);
                        let xs = |c| block[i - i0 + c];
                        // SAFETY: the tiles have the same target features as this function.
                        unsafe {
                            if batch {
                                dispatch!($batch_tile, $batch_tile, $batch_rows, w, j, r, xs, c, |r, c, v| out
                                    .row(i + c)[base + r] =
                                    v)
                            } else {
                                dispatch!($tile, $edge, $rows, w, j, r, xs, c, |r, c, v| out.row(i + c)
                                    [base + r] =
                                    v)
                            }
                        };
                        i += c;
                    }
                    j += r;
                }
            }
        }
    };
}
