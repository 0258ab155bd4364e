//! The `neon-dotprod` tier: Armv8.2 `sdot` for the int8/int4 products; the float and
//! elementwise kernels are the `neon` tier's (the dot-product extension adds nothing there).

use super::*;
use crate::backend::native::kernels::{complete_tier, Kernels};
type T = NeonDot;

pub use super::neon::{
    axpy_f16, dot_f32, gemm_xwt, gemv_f16, gemv_f32, grouped_mix, grouped_scores, quantize_row,
    rmsnorm, rope, silu_mul, softmax, weighted_sum, widen_f16,
};

pub static TABLE: Kernels = complete_tier!("neon-dotprod");

safe!(T, gemv_q8 => gemv_q8_imp(w: Q8Ref, first: usize, x: QRow, out: &mut [f32]));
safe!(T, gemv_q4 => gemv_q4_imp(w: Q4Ref, first: usize, x: QRow, out: &mut [f32]));
safe!(T, gemm_q8 => gemm_q8_imp(w: Q8Ref, acts: &QActs, out: &mut ColumnBlock<'_>));
safe!(T, gemm_q4 => gemm_q4_imp(w: Q4Ref, acts: &QActs, out: &mut ColumnBlock<'_>));
safe!(T, gemv_q6 => gemv_q6_imp(w: Q6Ref, first: usize, x: QRow, out: &mut [f32]));
safe!(T, gemm_q6 => gemm_q6_imp(w: Q6Ref, acts: &QActs, out: &mut ColumnBlock<'_>));

/// `acc += a · b` per 32-bit lane (four byte products each): the `sdot` instruction.
#[target_feature(enable = "neon,dotprod")]
#[inline]
fn sdot(acc: int32x4_t, a: int8x16_t, b: int8x16_t) -> int32x4_t {
    let mut acc = acc;
    // SAFETY: a pure register-to-register instruction of the dotprod extension, which this
    // function's target features (and so its callers') guarantee.
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

quantized_kernels!(sdot, "neon,dotprod");
