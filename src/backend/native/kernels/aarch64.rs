//! aarch64 kernels: the `generic` names for NEON with the dot-product extension (`sdot`,
//! Armv8.2+: Cortex-A55/A75 and later, so Raspberry Pi 5, Jetson Orin), detected at run time
//! with a pulp token. A Cortex-A72 (Raspberry Pi 4) lacks `sdot` and runs the generic set,
//! which tests/native_quantized.rs also checks on x86 (`QWEN2_EDGE_KERNELS=generic`).
//!
//! `sdot` multiplies signed bytes, so the kernels turn the repacked unsigned weights back
//! into signed ones (int8: flip bit 7; int4: subtract 8) and need no per-block correction.
//! Same lane layout as every tier (quant.rs): a 128-bit register holds 4 lanes = 4 blocks.
//! f16 weights use the generic kernels (Rust's f16 NEON intrinsics are not stable), and
//! `vdotq_s32` is not stable either: `sdot` is emitted with `asm!` (see `sdot`).
//! Tested against the generic twins under qemu-aarch64 (scripts/cross-test.sh).

use std::arch::aarch64::*;
use std::arch::asm;

use super::generic;
use super::quant::{Q4Ref, Q8Ref, QRow, BLOCK, GROUP, Q4_BLOCK_BYTES};

pulp::simd_type!({
    /// NEON with the Armv8.2 dot-product instructions.
    pub struct NeonDot {
        pub neon: f!("neon"),
        pub dotprod: f!("dotprod"),
    }
});

macro_rules! safe {
    ($name:ident => $imp:ident ($($arg:ident : $ty:ty),*) $(-> $ret:ty)?) => {
        pub fn $name($($arg: $ty),*) $(-> $ret)? {
            debug_assert!(NeonDot::is_available());
            // SAFETY: reachable only through the kernel table built after
            // `NeonDot::try_new()` succeeded: the CPU has NEON and dotprod.
            unsafe { $imp($($arg),*) }
        }
    };
}

pub mod neon {
    use super::*;

    /// `acc += a · b` per 32-bit lane (four byte products each): the `sdot` instruction.
    #[target_feature(enable = "neon,dotprod")]
    #[inline]
    fn sdot(acc: int32x4_t, a: int8x16_t, b: int8x16_t) -> int32x4_t {
        let mut acc = acc;
        // SAFETY: a pure register-to-register instruction of the dotprod extension, which
        // this function's target features (and so its callers') guarantee.
        unsafe {
            asm!(
                "sdot {0:v}.4s, {1:v}.16b, {2:v}.16b",
                inout(vreg) acc,
                in(vreg) a,
                in(vreg) b,
                options(pure, nomem, nostack, preserves_flags)
            );
        }
        acc
    }

    safe!(gemv_q8 => gemv_q8_imp(w: Q8Ref, first: usize, x: QRow, out: &mut [f32]));
    safe!(gemv_q4 => gemv_q4_imp(w: Q4Ref, first: usize, x: QRow, out: &mut [f32]));
    safe!(gemv_f32 => gemv_f32_imp(w: &[f32], x: &[f32], out: &mut [f32]));
    safe!(dot_f32 => dot_f32_imp(a: &[f32], b: &[f32]) -> f32);
    safe!(axpy => axpy_imp(a: f32, x: &[f32], y: &mut [f32]));

    /// Four f16 (as bits) to f32: the base-NEON `fcvtl` instruction (the intrinsic needs
    /// Rust's unstable f16 types).
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

    #[target_feature(enable = "neon,dotprod")]
    unsafe fn gemv_q8_imp(w: Q8Ref, first: usize, x: QRow, out: &mut [f32]) {
        let nb = w.blocks();
        assert!(x.q.len() >= nb * BLOCK && x.scales.len() >= nb);
        assert!((first + out.len()) * w.row_bytes() <= w.data.len());
        assert!(w.scales.len() >= first + out.len());
        let flip = vdupq_n_u8(0x80);
        for (i, o) in out.iter_mut().enumerate() {
            let row = w.row(first + i);
            let mut acc = [vdupq_n_f32(0.0); 2];
            let mut fb = 0;
            while fb < nb {
                let lanes = GROUP.min(nb - fb);
                let width = lanes * 4;
                for quad in 0..lanes / 4 {
                    // SAFETY: 16 bytes at 16*quad of each of the group's 8 steps, inside the
                    // row and x.q (nb*32 bytes each); 4 scales at fb + 4*quad < nb.
                    unsafe {
                        let wg = row.as_ptr().add(fb * BLOCK + 16 * quad);
                        let xg = x.q.as_ptr().add(fb * BLOCK + 16 * quad);
                        let mut d0 = vdupq_n_s32(0);
                        let mut d1 = vdupq_n_s32(0);
                        for s in (0..8).step_by(2) {
                            let w0 =
                                vreinterpretq_s8_u8(veorq_u8(vld1q_u8(wg.add(s * width)), flip));
                            let w1 = vreinterpretq_s8_u8(veorq_u8(
                                vld1q_u8(wg.add((s + 1) * width)),
                                flip,
                            ));
                            d0 = sdot(d0, w0, vld1q_s8(xg.add(s * width)));
                            d1 = sdot(d1, w1, vld1q_s8(xg.add((s + 1) * width)));
                        }
                        let xs = vld1q_f32(x.scales.as_ptr().add(fb + 4 * quad));
                        let d = vcvtq_f32_s32(vaddq_s32(d0, d1));
                        acc[quad % 2] = vfmaq_f32(acc[quad % 2], d, xs);
                    }
                }
                fb += lanes;
            }
            *o = vaddvq_f32(vaddq_f32(acc[0], acc[1])) * w.scales[first + i];
        }
    }

    #[target_feature(enable = "neon,dotprod")]
    unsafe fn gemv_q4_imp(w: Q4Ref, first: usize, x: QRow, out: &mut [f32]) {
        let nb = w.blocks();
        assert!(x.q.len() >= nb * BLOCK && x.scales.len() >= nb);
        assert!((first + out.len()) * w.row_bytes() <= w.data.len());
        let (low, eight) = (vdupq_n_u8(0x0F), vdupq_n_s8(8));
        for (i, o) in out.iter_mut().enumerate() {
            let row = w.row(first + i);
            let mut acc = [vdupq_n_f32(0.0); 2];
            let mut fb = 0;
            while fb < nb {
                let lanes = GROUP.min(nb - fb);
                let width = lanes * 4;
                for quad in 0..lanes / 4 {
                    // SAFETY: 16 bytes at 16*quad of the group's 4 nibble chunks and 4 f16 scales
                    // at 8*quad past them, inside the row (nb*18 bytes); activations as in gemv_q8.
                    unsafe {
                        let gp = row.as_ptr().add(fb * Q4_BLOCK_BYTES);
                        let wg = gp.add(16 * quad);
                        let xg = x.q.as_ptr().add(fb * BLOCK + 16 * quad);
                        let mut d0 = vdupq_n_s32(0);
                        let mut d1 = vdupq_n_s32(0);
                        for t in 0..4 {
                            let v = vld1q_u8(wg.add(t * width));
                            let lo = vsubq_s8(vreinterpretq_s8_u8(vandq_u8(v, low)), eight);
                            let hi = vsubq_s8(vreinterpretq_s8_u8(vshrq_n_u8(v, 4)), eight);
                            d0 = sdot(d0, lo, vld1q_s8(xg.add(t * width)));
                            d1 = sdot(d1, hi, vld1q_s8(xg.add((t + 4) * width)));
                        }
                        let ws = widen_f16x4(vld1_u16(gp.add(width * 4 + 8 * quad) as *const u16));
                        let xs = vld1q_f32(x.scales.as_ptr().add(fb + 4 * quad));
                        let d = vcvtq_f32_s32(vaddq_s32(d0, d1));
                        acc[quad % 2] = vfmaq_f32(acc[quad % 2], d, vmulq_f32(ws, xs));
                    }
                }
                fb += lanes;
            }
            *o = vaddvq_f32(vaddq_f32(acc[0], acc[1]));
        }
    }

    #[target_feature(enable = "neon")]
    unsafe fn dot_f32_imp(a: &[f32], b: &[f32]) -> f32 {
        let n = a.len().min(b.len());
        let (pa, pb) = (a.as_ptr(), b.as_ptr());
        let mut acc = [vdupq_n_f32(0.0); 4];
        let mut i = 0;
        // SAFETY: loads read floats i..i+4 ≤ n; the tail goes through the generic code.
        unsafe {
            while i + 16 <= n {
                for (j, acc) in acc.iter_mut().enumerate() {
                    let o = i + 4 * j;
                    *acc = vfmaq_f32(*acc, vld1q_f32(pa.add(o)), vld1q_f32(pb.add(o)));
                }
                i += 16;
            }
            while i + 4 <= n {
                acc[0] = vfmaq_f32(acc[0], vld1q_f32(pa.add(i)), vld1q_f32(pb.add(i)));
                i += 4;
            }
        }
        let s = vaddq_f32(vaddq_f32(acc[0], acc[1]), vaddq_f32(acc[2], acc[3]));
        vaddvq_f32(s) + generic::dot_f32(&a[i..n], &b[i..n])
    }

    #[target_feature(enable = "neon")]
    unsafe fn gemv_f32_imp(w: &[f32], x: &[f32], out: &mut [f32]) {
        let k = x.len();
        assert!(w.len() >= out.len() * k);
        for (o, row) in out.iter_mut().zip(w.chunks_exact(k)) {
            // SAFETY: same features as this function.
            *o = unsafe { dot_f32_imp(row, x) };
        }
    }

    #[target_feature(enable = "neon")]
    unsafe fn axpy_imp(a: f32, x: &[f32], y: &mut [f32]) {
        let n = x.len().min(y.len());
        let av = vdupq_n_f32(a);
        let (px, py) = (x.as_ptr(), y.as_mut_ptr());
        let mut i = 0;
        // SAFETY: elements i..i+4 ≤ n; the tail is scalar.
        unsafe {
            while i + 4 <= n {
                vst1q_f32(
                    py.add(i),
                    vfmaq_f32(vld1q_f32(py.add(i)), av, vld1q_f32(px.add(i))),
                );
                i += 4;
            }
        }
        generic::axpy(a, &x[i..n], &mut y[i..n]);
    }
}
