//! x86-64 kernels: the `generic` names, specialised for two tiers detected at run time with
//! pulp tokens (never `target-cpu`):
//!
//! * `avx512` — AVX-512 F/BW/VL + VNNI (Ice Lake, Sapphire Rapids, Zen 4 and later):
//!   512-bit vectors, masked loads for tails, `vpdpbusd` for int8·int8 dot products.
//! * `avx2` — AVX2 + FMA + F16C (Haswell, Zen 1 and later): 256-bit vectors, int8 dot products
//!   through `vpmaddubsw` + `vpmaddwd`.
//!
//! pulp's portable `Simd` trait has no int8 dot product and no f16 conversion, so each kernel
//! is a `#[target_feature]` function of `std::arch` intrinsics behind a safe wrapper; the
//! wrappers are only put in the kernel table (mod.rs) after the pulp token for their tier was
//! created, which is the proof the instructions exist. Every kernel here is compared with its
//! generic twin in tests/kernels.rs on random inputs of odd sizes.
//!
//! Choices and what measured them (2-core AVX-512 VNNI box, 0.5B demo model, 2 threads; the box
//! was shared with other builds throughout, so only same-run comparisons are meaningful):
//! * Decode GEMV runs the prefill tile kernel with 4 weight rows × 1 token: each activation
//!   vector feeds four rows, four weight streams are in flight, and the per-row overhead
//!   (masks, horizontal sum) is amortized; counted ~2.4x fewer instructions per weight than
//!   the first one-row loop, which perf showed at 45% of a single-thread int4 decode.
//! * Prefill: 2 × 4 tiles (2 weight rows × 4 tokens): ~31 multiply-adds per instruction
//!   against ~13 for a one-row GEMV per token. End to end, int4 prefill of 128 tokens measured
//!   72–180 t/s for both versions depending on the other load: the noise hid the difference,
//!   so the choice rests on the instruction count (`cargo bench --bench kernels -- gemm`
//!   compares the tiers on a quiet machine).
//! * The elementwise kernels (SiLU·mul, softmax, activation quantization) are the generic code
//!   compiled under the tier's target features: LLVM vectorizes them, and the quantizer's
//!   rounding becomes `vroundps` instead of a libm `rintf` call per element (2% of a decode).

use std::arch::x86_64::*;

use half::f16;

use super::generic;
use super::pool::ColumnBlock;
use super::quant::{Q4Ref, Q8Ref, QActs, QRow, BLOCK, GROUP, Q4_BLOCK_BYTES};

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

/// Wraps a `#[target_feature]` kernel in a safe function of the same signature, for one tier.
macro_rules! safe {
    ($token:ty, $name:ident => $imp:ident ($($arg:ident : $ty:ty),*) $(-> $ret:ty)?) => {
        pub fn $name($($arg: $ty),*) $(-> $ret)? {
            debug_assert!(<$token>::is_available());
            // SAFETY: this wrapper is only reachable through a kernel table built after
            // `<$token>::try_new()` succeeded, so the CPU has every feature `$imp` enables.
            unsafe { $imp($($arg),*) }
        }
    };
}

pub mod avx512 {
    use super::tiles::{tile_q4, tile_q8};
    use super::*;
    type T = Avx512Vnni;

    safe!(T, gemv_q8 => gemv_q8_imp(w: Q8Ref, first: usize, x: QRow, out: &mut [f32]));
    safe!(T, gemv_q4 => gemv_q4_imp(w: Q4Ref, first: usize, x: QRow, out: &mut [f32]));
    safe!(T, gemv_f32 => gemv_f32_imp(w: &[f32], x: &[f32], out: &mut [f32]));
    safe!(T, gemv_f16 => gemv_f16_imp(w: &[f16], x: &[f32], out: &mut [f32]));
    safe!(T, dot_f32 => dot_f32_imp(a: &[f32], b: &[f32]) -> f32);
    safe!(T, axpy => axpy_imp(a: f32, x: &[f32], y: &mut [f32]));
    safe!(T, axpy_f16 => axpy_f16_imp(a: f32, x: &[f16], y: &mut [f32]));
    safe!(T, widen_f16 => widen_f16_imp(src: &[f16], dst: &mut [f32]));
    safe!(T, silu_mul => silu_mul_imp(gate: &mut [f32], up: &[f32]));
    safe!(T, softmax => softmax_imp(x: &mut [f32]));
    safe!(T, quantize_row => quantize_row_imp(x: &[f32], q: &mut [i8], s: &mut [f32], z: &mut [i32]));
    safe!(T, gemm_q8 => gemm_q8_imp(w: Q8Ref, acts: &QActs, out: &mut ColumnBlock<'_>));
    safe!(T, gemm_q4 => gemm_q4_imp(w: Q4Ref, acts: &QActs, out: &mut ColumnBlock<'_>));

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

    /// Decode: rows in tiles of 4 (each activation vector feeds four rows; four independent
    /// weight streams and accumulator chains).
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni")]
    unsafe fn gemv_q8_imp(w: Q8Ref, first: usize, x: QRow, out: &mut [f32]) {
        let n = out.len();
        let mut i = 0;
        while i < n {
            let r = if n - i >= 4 { 4 } else { (n - i).min(2) };
            // SAFETY: same features as this function.
            unsafe {
                super::tiles::dispatch!(tile_q8, w, first + i, r, |_| x, 1, |r, _, v| {
                    out[i + r] = v
                })
            };
            i += r;
        }
    }

    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni")]
    unsafe fn gemv_q4_imp(w: Q4Ref, first: usize, x: QRow, out: &mut [f32]) {
        let n = out.len();
        let mut i = 0;
        while i < n {
            let r = if n - i >= 4 { 4 } else { (n - i).min(2) };
            // SAFETY: same features as this function.
            unsafe {
                super::tiles::dispatch!(tile_q4, w, first + i, r, |_| x, 1, |r, _, v| {
                    out[i + r] = v
                })
            };
            i += r;
        }
    }

    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni")]
    unsafe fn gemm_q4_imp(w: Q4Ref, acts: &QActs, out: &mut ColumnBlock<'_>) {
        let (mut j, m) = (out.start, acts.rows);
        while j < out.end {
            let r = (out.end - j).min(2);
            let mut i = 0;
            while i < m {
                let c = (m - i).min(4);
                let base = j - out.start;
                // SAFETY: same features as this function.
                unsafe {
                    super::tiles::dispatch!(tile_q4, w, j, r, |c| acts.row(i + c), c, |r, c, v| {
                        out.row(i + c)[base + r] = v
                    })
                };
                i += c;
            }
            j += r;
        }
    }

    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni")]
    unsafe fn gemm_q8_imp(w: Q8Ref, acts: &QActs, out: &mut ColumnBlock<'_>) {
        let (mut j, m) = (out.start, acts.rows);
        while j < out.end {
            let r = (out.end - j).min(2);
            let mut i = 0;
            while i < m {
                let c = (m - i).min(4);
                let base = j - out.start;
                // SAFETY: same features as this function.
                unsafe {
                    super::tiles::dispatch!(tile_q8, w, j, r, |c| acts.row(i + c), c, |r, c, v| {
                        out.row(i + c)[base + r] = v
                    })
                };
                i += c;
            }
            j += r;
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
                    *acc = _mm512_fmadd_ps(
                        _mm512_loadu_ps(pa.add(o)),
                        _mm512_loadu_ps(pb.add(o)),
                        *acc,
                    );
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

    #[target_feature(enable = "avx512f,f16c")]
    unsafe fn gemv_f16_imp(w: &[f16], x: &[f32], out: &mut [f32]) {
        let k = x.len();
        assert!(w.len() >= out.len() * k);
        for (o, row) in out.iter_mut().zip(w.chunks_exact(k)) {
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

    #[target_feature(enable = "avx512f")]
    unsafe fn axpy_imp(a: f32, x: &[f32], y: &mut [f32]) {
        let n = x.len().min(y.len());
        let av = _mm512_set1_ps(a);
        let (px, py) = (x.as_ptr(), y.as_mut_ptr());
        let mut i = 0;
        // SAFETY: elements i..i+16 ≤ n, or masked to n.
        unsafe {
            while i < n {
                let m = lanes_mask(n - i);
                let yv = _mm512_fmadd_ps(
                    av,
                    _mm512_maskz_loadu_ps(m, px.add(i)),
                    _mm512_maskz_loadu_ps(m, py.add(i)),
                );
                _mm512_mask_storeu_ps(py.add(i), m, yv);
                i += 16;
            }
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
    // vectors; LLVM vectorizes it once the target features allow.
    #[target_feature(enable = "avx512f,avx512dq")]
    unsafe fn silu_mul_imp(gate: &mut [f32], up: &[f32]) {
        generic::silu_mul(gate, up)
    }

    #[target_feature(enable = "avx512f,avx512dq")]
    unsafe fn softmax_imp(x: &mut [f32]) {
        generic::softmax(x)
    }

    // The generic quantizer with SSE4.1 rounding inline (baseline x86-64 calls libm's rintf
    // per element: 2% of a decode step); identical bytes.
    #[target_feature(enable = "avx512f,avx512dq,avx512bw,avx512vl")]
    unsafe fn quantize_row_imp(x: &[f32], q: &mut [i8], s: &mut [f32], z: &mut [i32]) {
        generic::quantize_row(x, q, s, z)
    }
}

/// Prefill products with quantized weights: tiles of `R` weight rows × `C` activation rows.
/// Each unpacked weight vector feeds `C` dot products and each activation vector `R`, so a
/// 2 × 4 tile does 64 `vpdpbusd` per 16-block group for 24 unpacking and 32 load
/// instructions, against 8 per 20 in a one-row loop (0.5B int4 prefill of 128 tokens,
/// 2 threads: see README "Benchmarks"). 8 int32 + 8 float accumulators, 4 weight and 2
/// activation vectors: 22 of the 32 zmm registers.
mod tiles {
    use super::*;

    /// Runs `$tile::<R, C>` for the runtime tile size `$c` (1..=4) with `$r` = 2 weight rows
    /// (or 1 for the last odd row) and stores the results through `$store(r, c, value)`.
    macro_rules! dispatch {
        ($tile:ident, $w:expr, $j:expr, $r:expr, $xs:expr, $c:expr, $store:expr) => {{
            macro_rules! go {
                ($R:literal, $C:literal) => {{
                    let xs: [QRow; $C] = std::array::from_fn(|c| $xs(c));
                    let v = $tile::<$R, $C>($w, $j, xs);
                    for (r, row) in v.iter().enumerate() {
                        for (c, &x) in row.iter().enumerate() {
                            $store(r, c, x);
                        }
                    }
                }};
            }
            match ($r, $c) {
                (4, _) => go!(4, 1),
                (2, 4) => go!(2, 4),
                (2, 3) => go!(2, 3),
                (2, 2) => go!(2, 2),
                (2, 1) => go!(2, 1),
                (1, 4) => go!(1, 4),
                (1, 3) => go!(1, 3),
                (1, 2) => go!(1, 2),
                _ => go!(1, 1),
            }
        }};
    }
    pub(super) use dispatch;

    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni")]
    #[inline]
    pub(super) unsafe fn tile_q4<const R: usize, const C: usize>(
        w: Q4Ref,
        j: usize,
        xs: [QRow; C],
    ) -> [[f32; C]; R] {
        let nb = w.blocks();
        let low = _mm512_set1_epi8(0x0F);
        let rows: [&[u8]; R] = std::array::from_fn(|r| w.row(j + r));
        for x in &xs {
            assert!(x.q.len() >= nb * BLOCK && x.scales.len() >= nb && x.sums.len() >= nb);
        }
        let mut accf = [[_mm512_setzero_ps(); C]; R];
        let mut fb = 0;
        while fb < nb {
            let lanes = GROUP.min(nb - fb);
            let width = lanes * 4;
            let (km, kl) = (avx512::bytes_mask(width), avx512::lanes_mask(lanes));
            // SAFETY: as in `gemv_q4_imp`, for each of the R rows (nb*20 bytes, checked by
            // `row`) and C activation rows (asserted above); masked loads stay in the group.
            unsafe {
                let mut acc = [[_mm512_setzero_si512(); C]; R];
                for c in 0..C {
                    let sums = _mm512_maskz_loadu_epi32(kl, xs[c].sums.as_ptr().add(fb));
                    let init = _mm512_sub_epi32(_mm512_setzero_si512(), _mm512_slli_epi32(sums, 3));
                    for a in acc.iter_mut() {
                        a[c] = init;
                    }
                }
                for t in 0..4 {
                    let mut lo = [_mm512_setzero_si512(); R];
                    let mut hi = [_mm512_setzero_si512(); R];
                    for r in 0..R {
                        let p = rows[r].as_ptr().add(fb * Q4_BLOCK_BYTES + t * width);
                        let v = _mm512_maskz_loadu_epi8(km, p as *const i8);
                        lo[r] = _mm512_and_si512(v, low);
                        hi[r] = _mm512_and_si512(_mm512_srli_epi16(v, 4), low);
                    }
                    for c in 0..C {
                        let xg = xs[c].q.as_ptr().add(fb * BLOCK);
                        let xl = _mm512_maskz_loadu_epi8(km, xg.add(t * width));
                        let xh = _mm512_maskz_loadu_epi8(km, xg.add((t + 4) * width));
                        for r in 0..R {
                            acc[r][c] = _mm512_dpbusd_epi32(acc[r][c], lo[r], xl);
                            acc[r][c] = _mm512_dpbusd_epi32(acc[r][c], hi[r], xh);
                        }
                    }
                }
                for r in 0..R {
                    let p = rows[r].as_ptr().add(fb * Q4_BLOCK_BYTES + width * 4);
                    let ws = _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(kl, p as *const i16));
                    for c in 0..C {
                        let x = _mm512_maskz_loadu_ps(kl, xs[c].scales.as_ptr().add(fb));
                        let d = _mm512_cvtepi32_ps(acc[r][c]);
                        accf[r][c] = _mm512_fmadd_ps(d, _mm512_mul_ps(ws, x), accf[r][c]);
                    }
                }
            }
            fb += lanes;
        }
        std::array::from_fn(|r| std::array::from_fn(|c| _mm512_reduce_add_ps(accf[r][c])))
    }

    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni")]
    #[inline]
    pub(super) unsafe fn tile_q8<const R: usize, const C: usize>(
        w: Q8Ref,
        j: usize,
        xs: [QRow; C],
    ) -> [[f32; C]; R] {
        let nb = w.blocks();
        let rows: [&[u8]; R] = std::array::from_fn(|r| w.row(j + r));
        for x in &xs {
            assert!(x.q.len() >= nb * BLOCK && x.scales.len() >= nb && x.sums.len() >= nb);
        }
        let mut accf = [[_mm512_setzero_ps(); C]; R];
        let mut fb = 0;
        while fb < nb {
            let lanes = GROUP.min(nb - fb);
            let width = lanes * 4;
            let (km, kl) = (avx512::bytes_mask(width), avx512::lanes_mask(lanes));
            // SAFETY: as in `gemv_q8_imp`, for each of the R rows (nb*32 bytes, checked by
            // `row`) and C activation rows (asserted above); masked loads stay in the group.
            unsafe {
                let mut acc = [[_mm512_setzero_si512(); C]; R];
                for c in 0..C {
                    let sums = _mm512_maskz_loadu_epi32(kl, xs[c].sums.as_ptr().add(fb));
                    let init = _mm512_sub_epi32(_mm512_setzero_si512(), _mm512_slli_epi32(sums, 7));
                    for a in acc.iter_mut() {
                        a[c] = init;
                    }
                }
                for s in 0..8 {
                    let mut wv = [_mm512_setzero_si512(); R];
                    for r in 0..R {
                        let p = rows[r].as_ptr().add(fb * BLOCK + s * width);
                        wv[r] = _mm512_maskz_loadu_epi8(km, p as *const i8);
                    }
                    for c in 0..C {
                        let p = xs[c].q.as_ptr().add(fb * BLOCK + s * width);
                        let xv = _mm512_maskz_loadu_epi8(km, p);
                        for r in 0..R {
                            acc[r][c] = _mm512_dpbusd_epi32(acc[r][c], wv[r], xv);
                        }
                    }
                }
                for c in 0..C {
                    let x = _mm512_maskz_loadu_ps(kl, xs[c].scales.as_ptr().add(fb));
                    for r in 0..R {
                        let d = _mm512_cvtepi32_ps(acc[r][c]);
                        accf[r][c] = _mm512_fmadd_ps(d, x, accf[r][c]);
                    }
                }
            }
            fb += lanes;
        }
        std::array::from_fn(|r| {
            std::array::from_fn(|c| _mm512_reduce_add_ps(accf[r][c]) * w.scales[j + r])
        })
    }
}

pub mod avx2 {
    use super::*;
    type T = Avx2Fma;

    safe!(T, gemv_q8 => gemv_q8_imp(w: Q8Ref, first: usize, x: QRow, out: &mut [f32]));
    safe!(T, gemv_q4 => gemv_q4_imp(w: Q4Ref, first: usize, x: QRow, out: &mut [f32]));
    safe!(T, gemv_f32 => gemv_f32_imp(w: &[f32], x: &[f32], out: &mut [f32]));
    safe!(T, gemv_f16 => gemv_f16_imp(w: &[f16], x: &[f32], out: &mut [f32]));
    safe!(T, dot_f32 => dot_f32_imp(a: &[f32], b: &[f32]) -> f32);
    safe!(T, axpy => axpy_imp(a: f32, x: &[f32], y: &mut [f32]));
    safe!(T, axpy_f16 => axpy_f16_imp(a: f32, x: &[f16], y: &mut [f32]));
    safe!(T, widen_f16 => widen_f16_imp(src: &[f16], dst: &mut [f32]));
    safe!(T, silu_mul => silu_mul_imp(gate: &mut [f32], up: &[f32]));
    safe!(T, softmax => softmax_imp(x: &mut [f32]));
    safe!(T, quantize_row => quantize_row_imp(x: &[f32], q: &mut [i8], s: &mut [f32], z: &mut [i32]));

    #[target_feature(enable = "avx")]
    fn hsum(v: __m256) -> f32 {
        let s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
        let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
        let s = _mm_add_ss(s, _mm_shuffle_ps(s, s, 1));
        _mm_cvtss_f32(s)
    }

    /// Dword mask for the first `n` (< 8) 32-bit lanes.
    #[target_feature(enable = "avx2")]
    fn dword_mask(n: usize) -> __m256i {
        _mm256_cmpgt_epi32(
            _mm256_set1_epi32(n as i32),
            _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7),
        )
    }

    /// 8 lanes of 4 bytes from `p`, only the first `n` (1..=8) read.
    #[target_feature(enable = "avx2")]
    #[inline]
    unsafe fn load_lanes(p: *const u8, n: usize) -> __m256i {
        // SAFETY: the caller guarantees `n * 4` readable bytes at `p`.
        unsafe {
            if n == 8 {
                _mm256_loadu_si256(p as *const __m256i)
            } else {
                _mm256_maskload_epi32(p as *const i32, dword_mask(n))
            }
        }
    }

    #[target_feature(enable = "avx2")]
    #[inline]
    unsafe fn load_f32s(p: *const f32, n: usize) -> __m256 {
        // SAFETY: the caller guarantees `n` readable floats at `p`.
        unsafe {
            if n == 8 {
                _mm256_loadu_ps(p)
            } else {
                _mm256_maskload_ps(p, dword_mask(n))
            }
        }
    }

    /// `n` (1..=8) f16 values from `p`, widened; lanes past `n` are 0.
    #[target_feature(enable = "avx2,f16c")]
    #[inline]
    unsafe fn load_f16s(p: *const u8, n: usize) -> __m256 {
        // SAFETY: the caller guarantees `2 * n` readable bytes at `p`.
        unsafe {
            if n == 8 {
                _mm256_cvtph_ps(_mm_loadu_si128(p as *const __m128i))
            } else {
                let mut buf = [0u16; 8];
                std::ptr::copy_nonoverlapping(p, buf.as_mut_ptr() as *mut u8, 2 * n);
                _mm256_cvtph_ps(_mm_loadu_si128(buf.as_ptr() as *const __m128i))
            }
        }
    }

    #[target_feature(enable = "avx2,fma")]
    unsafe fn gemv_q8_imp(w: Q8Ref, first: usize, x: QRow, out: &mut [f32]) {
        let nb = w.blocks();
        assert!(x.q.len() >= nb * BLOCK && x.scales.len() >= nb);
        assert!((first + out.len()) * w.row_bytes() <= w.data.len());
        assert!(w.scales.len() >= first + out.len());
        let (ones, flip) = (_mm256_set1_epi16(1), _mm256_set1_epi8(-128));
        for (i, o) in out.iter_mut().enumerate() {
            let row = w.row(first + i);
            let mut acc = _mm256_setzero_ps();
            let mut fb = 0;
            while fb < nb {
                let lanes = GROUP.min(nb - fb);
                let width = lanes * 4;
                for h in 0..lanes.div_ceil(8) {
                    let n = (lanes - 8 * h).min(8);
                    // SAFETY: lanes 8h..8h+n of each step of the group: inside the row and
                    // x.q (nb*32 bytes each) and x.scales (nb).
                    unsafe {
                        let wg = row.as_ptr().add(fb * BLOCK + 32 * h);
                        let xg = (x.q.as_ptr() as *const u8).add(fb * BLOCK + 32 * h);
                        let mut a = _mm256_setzero_si256();
                        for s in 0..8 {
                            // Signed weights back (q = u ^ 0x80); |q| and sign(x, q) keep
                            // vpmaddubsw's pair sums within i16 (2 · 127 · 127).
                            let q = _mm256_xor_si256(load_lanes(wg.add(s * width), n), flip);
                            let xv = load_lanes(xg.add(s * width), n);
                            let p =
                                _mm256_maddubs_epi16(_mm256_abs_epi8(q), _mm256_sign_epi8(xv, q));
                            a = _mm256_add_epi32(a, _mm256_madd_epi16(p, ones));
                        }
                        let xs = load_f32s(x.scales.as_ptr().add(fb + 8 * h), n);
                        acc = _mm256_fmadd_ps(_mm256_cvtepi32_ps(a), xs, acc);
                    }
                }
                fb += lanes;
            }
            *o = hsum(acc) * w.scales[first + i];
        }
    }

    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn gemv_q4_imp(w: Q4Ref, first: usize, x: QRow, out: &mut [f32]) {
        let nb = w.blocks();
        assert!(x.q.len() >= nb * BLOCK && x.scales.len() >= nb && x.sums.len() >= nb);
        assert!((first + out.len()) * w.row_bytes() <= w.data.len());
        let (ones, low) = (_mm256_set1_epi16(1), _mm256_set1_epi8(0x0F));
        for (i, o) in out.iter_mut().enumerate() {
            let row = w.row(first + i);
            let mut acc = _mm256_setzero_ps();
            let mut fb = 0;
            while fb < nb {
                let lanes = GROUP.min(nb - fb);
                let width = lanes * 4;
                for h in 0..lanes.div_ceil(8) {
                    let n = (lanes - 8 * h).min(8);
                    // SAFETY: lanes 8h..8h+n of the group's chunks, scales and activations,
                    // all inside the row (nb*20 bytes) and x (nb*32 bytes, nb sums/scales).
                    unsafe {
                        let wg = row.as_ptr().add(fb * Q4_BLOCK_BYTES + 32 * h);
                        let xg = (x.q.as_ptr() as *const u8).add(fb * BLOCK + 32 * h);
                        let sums = load_lanes(x.sums.as_ptr().add(fb + 8 * h) as *const u8, n);
                        let mut a =
                            _mm256_sub_epi32(_mm256_setzero_si256(), _mm256_slli_epi32(sums, 3));
                        for t in 0..4 {
                            let wv = load_lanes(wg.add(t * width), n);
                            let lo = _mm256_and_si256(wv, low);
                            let hi = _mm256_and_si256(_mm256_srli_epi16(wv, 4), low);
                            let plo = _mm256_maddubs_epi16(lo, load_lanes(xg.add(t * width), n));
                            let phi =
                                _mm256_maddubs_epi16(hi, load_lanes(xg.add((t + 4) * width), n));
                            a = _mm256_add_epi32(
                                a,
                                _mm256_madd_epi16(_mm256_add_epi16(plo, phi), ones),
                            );
                        }
                        let ws = load_f16s(
                            row.as_ptr().add(fb * Q4_BLOCK_BYTES + width * 4 + 16 * h),
                            n,
                        );
                        let xs = load_f32s(x.scales.as_ptr().add(fb + 8 * h), n);
                        acc = _mm256_fmadd_ps(_mm256_cvtepi32_ps(a), _mm256_mul_ps(ws, xs), acc);
                    }
                }
                fb += lanes;
            }
            *o = hsum(acc);
        }
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
                    *acc = _mm256_fmadd_ps(
                        _mm256_loadu_ps(pa.add(o)),
                        _mm256_loadu_ps(pb.add(o)),
                        *acc,
                    );
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

    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn gemv_f16_imp(w: &[f16], x: &[f32], out: &mut [f32]) {
        let k = x.len();
        assert!(w.len() >= out.len() * k);
        for (o, row) in out.iter_mut().zip(w.chunks_exact(k)) {
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

    #[target_feature(enable = "avx2,fma")]
    unsafe fn axpy_imp(a: f32, x: &[f32], y: &mut [f32]) {
        let n = x.len().min(y.len());
        let av = _mm256_set1_ps(a);
        let (px, py) = (x.as_ptr(), y.as_mut_ptr());
        let mut i = 0;
        // SAFETY: elements i..i+8 ≤ n; the tail is scalar.
        unsafe {
            while i + 8 <= n {
                let v = _mm256_fmadd_ps(av, _mm256_loadu_ps(px.add(i)), _mm256_loadu_ps(py.add(i)));
                _mm256_storeu_ps(py.add(i), v);
                i += 8;
            }
        }
        generic::axpy(a, &x[i..n], &mut y[i..n]);
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
}
