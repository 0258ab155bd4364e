//! aarch64 kernels: the `generic` names for two tiers detected at run time with pulp tokens,
//! each in its own file with its table:
//!
//! * `neon-dotprod` — Armv8.2+ with the dot-product extension (`sdot`: Cortex-A55/A75/A76 and
//!   later, so Raspberry Pi 5, Jetson Orin).
//! * `neon` — Armv8.0 Advanced SIMD (Cortex-A53/A57/A72: Raspberry Pi 3/4, Jetson Nano/TX2),
//!   whose int8 products are `smull`/`smull2` + `addp` + `sadalp`: four instructions for one
//!   `sdot`, exact because a pair of int8 products fits i16 (2 · 128 · 127).
//!
//! Both run the same tiled quantized loops (`quantized_kernels!`, instantiated per tier with
//! its 4-byte dot product) and share the float and elementwise kernels of `neon.rs`. `sdot`
//! multiplies signed bytes, so the kernels turn the repacked unsigned weights back into signed
//! ones (int8: flip bit 7; int4: subtract 8) and need no per-block correction. A 128-bit
//! register holds 4 lanes = 4 blocks of the lane layout (quant.rs).
//!
//! Rust's f16 NEON intrinsics and `vdotq_s32` are not stable: `fcvtl` and `sdot` are emitted
//! with `asm!`. Tested against the generic twins under qemu-aarch64 (`QEMU_CPU=cortex-a72`
//! for `neon`, `QEMU_CPU=max` for both; cross/build.sh --test).

use std::arch::aarch64::*;
use std::arch::asm;

use half::f16;

use super::generic;
use super::pool::ColumnBlock;
use super::q6k::{q6_group_at, Q6Ref};
use super::quant::{groups, Q4Ref, Q8Ref, QActs, QRow, BLOCK};

pulp::simd_type!({
    /// NEON with the Armv8.2 dot-product instructions.
    pub struct NeonDot {
        pub neon: f!("neon"),
        pub dotprod: f!("dotprod"),
    }

    /// Armv8.0 Advanced SIMD.
    pub struct Neon {
        pub neon: f!("neon"),
    }
});

/// Wraps a `#[target_feature]` kernel in a safe function of the same signature, for one tier.
macro_rules! safe {
    ($token:ty, $name:ident => $imp:ident ($($arg:ident : $ty:ty),*) $(-> $ret:ty)?) => {
        #[allow(clippy::too_many_arguments)] // the kernel's own signature
        pub fn $name($($arg: $ty),*) $(-> $ret)? {
            debug_assert!(<$token>::is_available());
            // SAFETY: this wrapper is only reachable through a kernel table built after
            // `<$token>::try_new()` (or a token whose features include it) succeeded, so the
            // CPU has every feature `$imp` enables.
            unsafe { $imp($($arg),*) }
        }
    };
}

/// Four f16 (as bits) to f32: the base-NEON `fcvtl` instruction (the intrinsic needs Rust's
/// unstable f16 types).
#[target_feature(enable = "neon")]
#[inline]
fn widen_f16x4(h: uint16x4_t) -> float32x4_t {
    let out: float32x4_t;
    // SAFETY: a pure register-to-register Advanced SIMD instruction (Armv8.0).
    unsafe {
        asm!(
            "fcvtl {0:v}.4s, {1:v}.4h",
            out(vreg) out,
            in(vreg) h,
            options(pure, nomem, nostack, preserves_flags)
        );
    }
    out
}

/// `(scale, min)` of each quad of blocks (`4q..4q + 4`) of an int4k group of `lanes` blocks from
/// its codes at `p` (right after the nibbles; quant.rs), as `quant::q4k_scale_min` computes them:
/// the codes of all 16 blocks are unpacked at once in bytes (decoding them a quad at a time cost
/// int4k 41% more instructions per token than int4 under qemu's `max` CPU).
///
/// # Safety
/// `p` is the start of such a group's codes: `lanes` code bytes, `lanes / 2` of top bits, 4
/// bytes per super-block.
#[inline]
unsafe fn kquant_group(p: *const u8, lanes: usize) -> ([float32x4_t; 4], [float32x4_t; 4]) {
    // The loads below read 16 bytes of codes, 8 of top bits and 8 of super-block scales: in
    // place for 16 and 12 blocks (they end at or before the group's end, the bytes past a
    // field's own being the next field's), copied out for the shorter tails (constant sizes,
    // so no call to memcpy).
    let mut copy = [0u8; 32];
    // SAFETY: the reads and copies stay inside the group (the caller's contract).
    unsafe {
        let (c, t, s) = match lanes {
            16 | 12 => (p, p.add(lanes), p.add(lanes + lanes / 2)),
            8 => {
                std::ptr::copy_nonoverlapping(p, copy.as_mut_ptr(), 16);
                let c = copy.as_ptr();
                (c, c.add(8), c.add(12))
            }
            _ => {
                std::ptr::copy_nonoverlapping(p, copy.as_mut_ptr(), 10);
                let c = copy.as_ptr();
                (c, c.add(4), c.add(6))
            }
        };
        let codes = vld1q_u8(c);
        // Byte i of the top bits holds blocks 2i (low nibble) and 2i + 1 (high): one per byte.
        let t = vld1_u8(t);
        let (lo, hi) = (vand_u8(t, vdup_n_u8(15)), vshr_n_u8::<4>(t));
        let tops = vcombine_u8(vzip1_u8(lo, hi), vzip2_u8(lo, hi));
        let sc_top = vshlq_n_u8::<4>(vandq_u8(tops, vdupq_n_u8(3)));
        let m_top = vshlq_n_u8::<2>(vandq_u8(tops, vdupq_n_u8(12)));
        let sc = vorrq_u8(vandq_u8(codes, vdupq_n_u8(15)), sc_top);
        let m = vorrq_u8(vshrq_n_u8::<4>(codes), m_top);
        // [d0, dmin0, d1, dmin1]: quads 0 and 1 are super-block 0, quads 2 and 3 super-block 1.
        let sup = widen_f16x4(vld1_u16(s as *const u16));
        let d = [vdupq_laneq_f32::<0>(sup), vdupq_laneq_f32::<2>(sup)];
        let dmin = [vdupq_laneq_f32::<1>(sup), vdupq_laneq_f32::<3>(sup)];
        let floats = |v: uint8x16_t| {
            let (lo, hi) = (vmovl_u8(vget_low_u8(v)), vmovl_high_u8(v));
            [
                vcvtq_f32_u32(vmovl_u16(vget_low_u16(lo))),
                vcvtq_f32_u32(vmovl_high_u16(lo)),
                vcvtq_f32_u32(vmovl_u16(vget_low_u16(hi))),
                vcvtq_f32_u32(vmovl_high_u16(hi)),
            ]
        };
        let (sc, m) = (floats(sc), floats(m));
        (
            std::array::from_fn(|q| vmulq_f32(d[q / 2], sc[q])),
            std::array::from_fn(|q| vmulq_f32(dmin[q / 2], m[q])),
        )
    }
}

/// The tiled int8/int4 products of a tier, over its 4-byte dot product `$dot(acc, a, b)`
/// (`acc[i] += Σ_j a[4i + j] · b[4i + j]`, signed bytes): `tile_q8`/`tile_q4` and the decode
/// and prefill loops of tiling.rs, all compiled with `$features`. Prefill tiles are 2 weight
/// rows × 4 activation rows (8 integer + 8 float accumulators of the 32 vector registers).
macro_rules! quantized_kernels {
    ($dot:ident, $features:literal) => {
        /// `R` int4 weight rows from `j` times `C` activation rows.
        #[target_feature(enable = $features)]
        #[inline]
        unsafe fn tile_q4<const R: usize, const C: usize>(
            w: Q4Ref,
            j: usize,
            xs: [QRow; C],
        ) -> [[f32; C]; R] {
            // One body per format, so that int4k's nibbles, which enter the dot products as
            // they are, skip int4's `− 8` (two instructions per row and step).
            // SAFETY: the same features; the caller keeps `tile_q4_in`'s contract.
            unsafe {
                if w.kquant {
                    tile_q4_in::<R, C, true>(w, j, xs)
                } else {
                    tile_q4_in::<R, C, false>(w, j, xs)
                }
            }
        }

        /// `tile_q4` for int4 (`KQUANT` false) or int4k weights.
        #[target_feature(enable = $features)]
        #[inline]
        unsafe fn tile_q4_in<const R: usize, const C: usize, const KQUANT: bool>(
            w: Q4Ref,
            j: usize,
            xs: [QRow; C],
        ) -> [[f32; C]; R] {
            debug_assert_eq!(w.kquant, KQUANT);
            let nb = w.blocks();
            let mut rows: [&[u8]; R] = [&[]; R];
            for (r, row) in rows.iter_mut().enumerate() {
                *row = w.row(j + r);
            }
            for x in &xs {
                assert!(x.q.len() >= nb * BLOCK && x.scales.len() >= nb);
                assert!(!KQUANT || x.block_sums.len() >= nb);
            }
            // int4k's scales and mins decoded ahead, when they were (`nb` of each a row).
            let decoded = w.decoded_rows::<R>(j);
            let bb = w.block_bytes();
            // int4 weights are u − 8; int4k's dot products take u (its mins are subtracted).
            let (low, eight) = (vdupq_n_u8(0x0F), vdupq_n_s8(8));
            let mut accf = [[vdupq_n_f32(0.0); C]; R];
            for (fb, lanes) in groups(nb) {
                let width = lanes * 4;
                let mut codes = [([vdupq_n_f32(0.0); 4], [vdupq_n_f32(0.0); 4]); R];
                if KQUANT {
                    for (r, codes) in codes.iter_mut().enumerate() {
                        if let Some((scales, mins)) = decoded.map(|d| d[r]) {
                            // A prefill's, decoded ahead: `nb` of each (asserted above).
                            for quad in 0..lanes / 4 {
                                let at = fb + 4 * quad;
                                let (s, m) = (&scales[at..at + 4], &mins[at..at + 4]);
                                // SAFETY: 4 floats at each (sliced just above).
                                unsafe {
                                    codes.0[quad] = vld1q_f32(s.as_ptr());
                                    codes.1[quad] = vld1q_f32(m.as_ptr());
                                }
                            }
                            continue;
                        }
                        // SAFETY: int4k's codes follow the group's nibbles inside each row
                        // (checked by `row`).
                        *codes = unsafe {
                            kquant_group(rows[r].as_ptr().add(fb * bb + width * 4), lanes)
                        };
                    }
                }
                for quad in 0..lanes / 4 {
                    // SAFETY: 16 bytes at 16*quad of the group's 4 nibble chunks and 4 f16
                    // scales at 8*quad past them (int4; int4k's codes are decoded above),
                    // inside each row (checked by `row`); 16 bytes of each of the activations'
                    // 8 steps (nb*32 bytes) and 4 scales (and block sums) at fb + 4*quad < nb,
                    // asserted above.
                    unsafe {
                        let mut acc = [[vdupq_n_s32(0); C]; R];
                        for t in 0..4 {
                            let mut lo = [vdupq_n_s8(0); R];
                            let mut hi = [vdupq_n_s8(0); R];
                            for r in 0..R {
                                let p = rows[r].as_ptr().add(fb * bb + t * width);
                                let v = vld1q_u8(p.add(16 * quad));
                                lo[r] = vreinterpretq_s8_u8(vandq_u8(v, low));
                                hi[r] = vreinterpretq_s8_u8(vshrq_n_u8(v, 4));
                                if !KQUANT {
                                    lo[r] = vsubq_s8(lo[r], eight);
                                    hi[r] = vsubq_s8(hi[r], eight);
                                }
                            }
                            for c in 0..C {
                                let xg = xs[c].q.as_ptr().add(fb * BLOCK + 16 * quad);
                                let xl = vld1q_s8(xg.add(t * width));
                                let xh = vld1q_s8(xg.add((t + 4) * width));
                                for r in 0..R {
                                    acc[r][c] = $dot(acc[r][c], lo[r], xl);
                                    acc[r][c] = $dot(acc[r][c], hi[r], xh);
                                }
                            }
                        }
                        let mut ws = [vdupq_n_f32(0.0); R];
                        let mut mins = [vdupq_n_f32(0.0); R];
                        for r in 0..R {
                            // The group's scales, or int4k's codes, follow its nibbles.
                            let p = rows[r].as_ptr().add(fb * bb + width * 4);
                            if KQUANT {
                                (ws[r], mins[r]) = (codes[r].0[quad], codes[r].1[quad]);
                            } else {
                                ws[r] = widen_f16x4(vld1_u16(p.add(8 * quad) as *const u16));
                            }
                        }
                        for c in 0..C {
                            let xs = vld1q_f32(xs[c].scales.as_ptr().add(fb + 4 * quad));
                            for r in 0..R {
                                let d = vcvtq_f32_s32(acc[r][c]);
                                accf[r][c] = vfmaq_f32(accf[r][c], d, vmulq_f32(ws[r], xs));
                            }
                        }
                        if KQUANT {
                            // int4k: − min · Σx per block.
                            for c in 0..C {
                                let sums = xs[c].block_sums.as_ptr().add(fb + 4 * quad);
                                let sums = vld1q_f32(sums);
                                for r in 0..R {
                                    accf[r][c] = vfmsq_f32(accf[r][c], mins[r], sums);
                                }
                            }
                        }
                    }
                }
            }
            let mut out = [[0.0; C]; R];
            for r in 0..R {
                for c in 0..C {
                    out[r][c] = vaddvq_f32(accf[r][c]);
                }
            }
            out
        }

        /// `R` int8 weight rows from `j` times `C` activation rows.
        #[target_feature(enable = $features)]
        #[inline]
        unsafe fn tile_q8<const R: usize, const C: usize>(
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
                assert!(x.q.len() >= nb * BLOCK && x.scales.len() >= nb);
            }
            assert!(w.scales.len() >= j + R);
            let flip = vdupq_n_u8(0x80);
            let mut accf = [[vdupq_n_f32(0.0); C]; R];
            for (fb, lanes) in groups(nb) {
                let width = lanes * 4;
                for quad in 0..lanes / 4 {
                    // SAFETY: 16 bytes at 16*quad of each of the group's 8 steps, inside each
                    // row (nb*32 bytes, checked by `row`) and each activation row (nb*32 bytes);
                    // 4 scales at fb + 4*quad < nb, asserted above.
                    unsafe {
                        let mut acc = [[vdupq_n_s32(0); C]; R];
                        for s in 0..8 {
                            let mut q = [vdupq_n_s8(0); R];
                            for r in 0..R {
                                let p = rows[r].as_ptr().add(fb * BLOCK + s * width + 16 * quad);
                                q[r] = vreinterpretq_s8_u8(veorq_u8(vld1q_u8(p), flip));
                            }
                            for c in 0..C {
                                let xg = xs[c].q.as_ptr().add(fb * BLOCK + s * width);
                                let xv = vld1q_s8(xg.add(16 * quad));
                                for r in 0..R {
                                    acc[r][c] = $dot(acc[r][c], q[r], xv);
                                }
                            }
                        }
                        for c in 0..C {
                            let xs = vld1q_f32(xs[c].scales.as_ptr().add(fb + 4 * quad));
                            for r in 0..R {
                                let d = vcvtq_f32_s32(acc[r][c]);
                                accf[r][c] = vfmaq_f32(accf[r][c], d, xs);
                            }
                        }
                    }
                }
            }
            let mut out = [[0.0; C]; R];
            for r in 0..R {
                for c in 0..C {
                    out[r][c] = vaddvq_f32(accf[r][c]) * w.scales[j + r];
                }
            }
            out
        }

        /// `R` q6k weight rows from `j` times `C` activation rows (kernels/q6k.rs): each step's
        /// 6-bit values made signed (`u − 32`, which `sdot` takes as they are: no `32 · Σx`
        /// correction), steps 0–3 and 4–7 summed apart for the two sub-blocks' scale codes.
        #[target_feature(enable = $features)]
        #[inline]
        unsafe fn tile_q6<const R: usize, const C: usize>(
            w: Q6Ref,
            j: usize,
            xs: [QRow; C],
        ) -> [[f32; C]; R] {
            let nb = w.blocks();
            let mut rows: [&[u8]; R] = [&[]; R];
            for (r, row) in rows.iter_mut().enumerate() {
                *row = w.row(j + r);
            }
            for x in &xs {
                assert!(x.q.len() >= nb * BLOCK && x.scales.len() >= nb);
            }
            let (low, top, bias) = (vdupq_n_u8(0x0F), vdupq_n_u8(0x30), vdupq_n_u8(32));
            let mut accf = [[vdupq_n_f32(0.0); C]; R];
            for (fb, lanes) in groups(nb) {
                let width = lanes * 4;
                let at = q6_group_at(fb);
                for quad in 0..lanes / 4 {
                    // SAFETY: 16 bytes at 16*quad of the group's 4 nibble and 2 top-bit chunks,
                    // the quad's 8 scale codes at 8*quad past their start and its super-block
                    // d, inside each row (q6k.rs layout; checked by `row`);
                    // 16 bytes of each of the activations' 8 steps (nb*32 bytes) and 4 scales
                    // at fb + 4*quad < nb, asserted above.
                    unsafe {
                        let mut acc = [[[vdupq_n_s32(0); 2]; C]; R];
                        for t in 0..4 {
                            let mut first = [vdupq_n_s8(0); R];
                            let mut second = [vdupq_n_s8(0); R];
                            for r in 0..R {
                                let g = rows[r].as_ptr().add(at);
                                let v = vld1q_u8(g.add(t * width + 16 * quad));
                                let bits =
                                    vld1q_u8(g.add(16 * lanes + (t / 2) * width + 16 * quad));
                                let (a, b) = if t % 2 == 0 {
                                    (vshlq_n_u8::<4>(bits), vshlq_n_u8::<2>(bits))
                                } else {
                                    (bits, vshrq_n_u8::<2>(bits))
                                };
                                let a = vorrq_u8(vandq_u8(v, low), vandq_u8(a, top));
                                let b = vorrq_u8(vshrq_n_u8::<4>(v), vandq_u8(b, top));
                                first[r] = vreinterpretq_s8_u8(vsubq_u8(a, bias));
                                second[r] = vreinterpretq_s8_u8(vsubq_u8(b, bias));
                            }
                            for c in 0..C {
                                let xg = xs[c].q.as_ptr().add(fb * BLOCK + 16 * quad);
                                let xl = vld1q_s8(xg.add(t * width));
                                let xh = vld1q_s8(xg.add((t + 4) * width));
                                for r in 0..R {
                                    acc[r][c][0] = $dot(acc[r][c][0], first[r], xl);
                                    acc[r][c][1] = $dot(acc[r][c][1], second[r], xh);
                                }
                            }
                        }
                        let mut codes = [[vdupq_n_s32(0); 2]; R];
                        let mut d = [vdupq_n_f32(0.0); R];
                        for r in 0..R {
                            let g = rows[r].as_ptr().add(at);
                            // The quad's codes, a block's two together: even ones first sub-blocks.
                            let pairs =
                                vmovl_s8(vld1_s8(g.add(24 * lanes + 8 * quad) as *const i8));
                            let firsts = vuzp1q_s16(pairs, pairs);
                            let seconds = vuzp2q_s16(pairs, pairs);
                            codes[r] = [
                                vmovl_s16(vget_low_s16(firsts)),
                                vmovl_s16(vget_low_s16(seconds)),
                            ];
                            let p = g.add(26 * lanes + 2 * (quad / 2));
                            d[r] = vdupq_n_f32(f16::from_le_bytes([*p, *p.add(1)]).to_f32());
                        }
                        for c in 0..C {
                            let xs = vld1q_f32(xs[c].scales.as_ptr().add(fb + 4 * quad));
                            for r in 0..R {
                                let [a, b] = acc[r][c];
                                let total = vmlaq_s32(vmulq_s32(codes[r][0], a), codes[r][1], b);
                                let scale = vmulq_f32(d[r], xs);
                                accf[r][c] = vfmaq_f32(accf[r][c], vcvtq_f32_s32(total), scale);
                            }
                        }
                    }
                }
            }
            let mut out = [[0.0; C]; R];
            for r in 0..R {
                for c in 0..C {
                    out[r][c] = vaddvq_f32(accf[r][c]);
                }
            }
            out
        }

        gemv_tiled!(gemv_q8_imp, tile_q8, Q8Ref, $features, 4);
        gemv_tiled!(gemv_q4_imp, tile_q4, Q4Ref, $features, 4);
        // A decode batch (at most 4 rows) takes one weight row per tile, as measured on x86
        // with 2-row tiles (AVX2, Zen 3); no Arm timing is possible here.
        gemm_tiled!(gemm_q8_imp, tile_q8, Q8Ref, $features, 2, 4, tile_q8, 1);
        gemm_tiled!(gemm_q4_imp, tile_q4, Q4Ref, $features, 2, 4, tile_q4, 1);
        gemv_tiled!(gemv_q6_imp, tile_q6, Q6Ref, $features, 4);
        gemm_tiled!(gemm_q6_imp, tile_q6, Q6Ref, $features, 2, 4, tile_q6, 1);
    };
}

// After the macros above: a file module sees only the macros defined before its declaration.
pub mod dotprod;
pub mod neon;
