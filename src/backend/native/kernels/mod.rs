//! The native backend's compute kernels behind one small interface.
//!
//! `Kernels` is a table of primitive functions. The portable `generic` set is the reference;
//! each tier's file (x86_64/avx512.rs, x86_64/avx2.rs, aarch64/dotprod.rs, aarch64/neon.rs)
//! defines the same names and its table (`tier!`), and `select` picks the best table this CPU
//! can run after run-time feature detection (pulp tokens), so model.rs never changes and no
//! binary is built for one CPU. tiling.rs holds the loops the tiers' quantized tiles share;
//! ops.rs the composite operations (linear layers, attention over a cache) that add the
//! threading on top of the primitives, on the backend's persistent `Pool`. Kernels know
//! nothing about Qwen2: only matrices, vectors and a KV layout.

pub mod generic;
pub mod pool;
pub mod q6k;
pub mod quant;
// The loops the SIMD tiers share; a target with no SIMD tier (32-bit Arm) has no use for them.
#[macro_use]
#[cfg(any(target_arch = "x86_64", target_arch = "aarch64"))]
mod tiling;
mod ops;
pub use ops::{
    AttentionRows, AttentionShape, KvRef, Rows, Scratch, SeqRows, BATCH_ROWS, F16_BLOCK_ROWS,
};

#[cfg(target_arch = "aarch64")]
pub mod aarch64;
#[cfg(target_arch = "x86_64")]
pub mod x86_64;

use anyhow::{bail, Result};
use half::f16;

use pool::ColumnBlock;
use q6k::Q6Ref;
use quant::{Q4Ref, Q8Ref, QActs, QRow};

/// A row-major weight matrix `[rows, cols]` (a Linear weight is `[out, in]`).
#[derive(Clone, Copy)]
pub struct MatRef<'a> {
    pub data: MatData<'a>,
    pub rows: usize,
    pub cols: usize,
}

#[derive(Clone, Copy)]
pub enum MatData<'a> {
    F32(&'a [f32]),
    F16(&'a [f16]),
    /// The bundle's int8 layout (row-major, a scale per row): embedding tables, gathered only.
    Q8Rows {
        q: &'a [i8],
        scales: &'a [f32],
    },
    /// int8 repacked into the lane layout (quant.rs).
    Q8 {
        data: &'a [u8],
        scales: &'a [f32],
    },
    /// int4 repacked into the lane layout (quant.rs); `kquant`: int4k's, with the K-quant
    /// codes in place of the block scales.
    Q4 {
        data: &'a [u8],
        kquant: bool,
    },
    /// q6k (an int4k variant's wide matrices) repacked into its lane layout (q6k.rs).
    Q6 {
        data: &'a [u8],
    },
}

impl<'a> MatRef<'a> {
    /// Lane-layout int8 weights (`MatData::Q8`'s parts) as the kernels take them.
    fn q8(&self, data: &'a [u8], scales: &'a [f32]) -> Q8Ref<'a> {
        Q8Ref {
            data,
            scales,
            rows: self.rows,
            cols: self.cols,
        }
    }

    /// Lane-layout int4 weights (`MatData::Q4`'s parts) as the kernels take them.
    fn q4(&self, data: &'a [u8], kquant: bool) -> Q4Ref<'a> {
        Q4Ref {
            data,
            rows: self.rows,
            cols: self.cols,
            kquant,
            decoded: None,
        }
    }

    /// Lane-layout q6k weights (`MatData::Q6`'s bytes) as the kernels take them.
    fn q6(&self, data: &'a [u8]) -> Q6Ref<'a> {
        Q6Ref {
            data,
            rows: self.rows,
            cols: self.cols,
        }
    }

    /// Whether products with this matrix read the activations' `half_sums` (q6k).
    pub fn is_q6k(&self) -> bool {
        matches!(self.data, MatData::Q6 { .. })
    }

    pub fn is_quantized(&self) -> bool {
        matches!(
            self.data,
            MatData::Q8 { .. } | MatData::Q4 { .. } | MatData::Q6 { .. }
        )
    }
}

/// Declares the kernel table once: the `Kernels` struct, the names of its kernels and the
/// generic table, so a kernel added here is added everywhere (a tier that does not provide it
/// falls back to the generic twin and says so through `Kernels::fallbacks`).
macro_rules! kernel_table {
    // `$d` is a `$` token, for the metavariables of the macro this one defines.
    ($d:tt; $($(#[$doc:meta])* $field:ident: $ty:ty,)*) => {
        /// The primitive kernels; every field has a twin of the same name in `generic`.
        pub struct Kernels {
            pub name: &'static str,
            /// The kernels this tier provides itself; the others are the generic twins.
            pub own: &'static [&'static str],
            $($(#[$doc])* pub $field: $ty,)*
        }

        /// Every kernel of the table, in its order.
        pub const KERNEL_NAMES: &[&str] = &[$(stringify!($field)),*];

        /// The portable table (a const, so tier tables can take their missing kernels from it).
        pub(crate) const GENERIC_TABLE: Kernels = Kernels {
            name: "generic",
            own: KERNEL_NAMES,
            $($field: generic::$field,)*
        };

        /// `complete_tier!("name")`: a tier's table providing every kernel, each taken from
        /// the function of its name in the tier's module.
        #[cfg_attr(not(any(target_arch = "x86_64", target_arch = "aarch64")), allow(unused_macros))]
        macro_rules! complete_tier {
            ($d name:literal) => {
                $crate::backend::native::kernels::tier!($d name, [$($field),*])
            };
        }
        #[cfg_attr(not(any(target_arch = "x86_64", target_arch = "aarch64")), allow(unused_imports))]
        pub(crate) use complete_tier;
    };
}

kernel_table! {
    $;
    dot_f32: fn(&[f32], &[f32]) -> f32,
    widen_f16: fn(&[f16], &mut [f32]),
    axpy_f16: fn(f32, &[f16], &mut [f32]),
    /// `weighted_sum(p, rows, out)`: `out += Σ_t p[t] · rows[t]` (attention's value sum).
    weighted_sum: fn(&[f32], &[f32], &mut [f32]),
    /// The scores of the query heads sharing one key head (`generic::grouped_scores`).
    grouped_scores: GroupedScores,
    /// The probability-weighted value sums of the query heads sharing one value head
    /// (`generic::grouped_mix`).
    grouped_mix: GroupedMix,
    rmsnorm: fn(&[f32], &[f32], f32, &mut [f32]),
    silu_mul: fn(&mut [f32], &[f32]),
    softmax: fn(&mut [f32]),
    rope: fn(&mut [f32], &[f32], &[f32]),
    gemm_xwt: GemmXwt,
    gemv_f32: fn(&[f32], &[f32], &mut [f32]),
    gemv_f16: fn(&[f16], &[f32], &mut [f32]),
    quantize_row: QuantizeRow,
    gemv_q8: fn(Q8Ref, usize, QRow, &mut [f32]),
    gemv_q4: fn(Q4Ref, usize, QRow, &mut [f32]),
    gemv_q6: fn(Q6Ref, usize, QRow, &mut [f32]),
    /// Prefill products: `out`'s columns (weight rows) × every row of the activations.
    gemm_q8: fn(Q8Ref, &QActs, &mut ColumnBlock<'_>),
    gemm_q4: fn(Q4Ref, &QActs, &mut ColumnBlock<'_>),
    gemm_q6: fn(Q6Ref, &QActs, &mut ColumnBlock<'_>),
}

/// A tier's table, in its ISA module: `tier!("name", [kernel, ...])` takes each named kernel
/// from the functions of that name in scope and the rest from `generic` (tract's `plug`
/// pattern: the table lives next to the kernels it lists).
#[cfg_attr(
    not(any(target_arch = "x86_64", target_arch = "aarch64", test)),
    allow(unused_macros)
)]
macro_rules! tier {
    ($name:literal, [$($field:ident),* $(,)?]) => {{
        // A complete tier names every field, which leaves the update nothing to do.
        #[allow(clippy::needless_update)]
        let table = $crate::backend::native::kernels::Kernels {
            name: $name,
            own: &[$(stringify!($field)),*],
            $($field,)*
            ..$crate::backend::native::kernels::GENERIC_TABLE
        };
        table
    }};
}
#[cfg_attr(
    not(any(target_arch = "x86_64", target_arch = "aarch64")),
    allow(unused_imports)
)]
pub(crate) use tier;

impl Kernels {
    /// The kernels this tier takes from `generic` (a complete tier has none).
    pub fn fallbacks(&self) -> Vec<&'static str> {
        KERNEL_NAMES
            .iter()
            .copied()
            .filter(|k| !self.own.contains(k))
            .collect()
    }
}

/// `quantize_row(x, q, scales, sums)`: one activation row to int8 in the lane layout.
pub type QuantizeRow = fn(&[f32], &mut [i8], &mut [f32], &mut [i32]);

/// `gemm_xwt(x, m, k, w, out)`: `out[i, j] = x[i] · w[j]` for the columns of `out`'s block
/// (`w` holds exactly the block's weight rows).
pub type GemmXwt = fn(&[f32], usize, usize, &[f32], &mut ColumnBlock<'_>);

/// `grouped_scores(q, q_stride, heads, keys, n, k, scale, out, out_stride)`.
pub type GroupedScores = fn(&[f32], usize, usize, &[f32], usize, usize, f32, &mut [f32], usize);

/// `grouped_mix(p, p_stride, heads, values, n, k, out, out_stride)`.
pub type GroupedMix = fn(&[f32], usize, usize, &[f32], usize, usize, &mut [f32], usize);

pub static GENERIC: Kernels = GENERIC_TABLE;

/// Every kernel table compiled for this architecture, best first, with whether this CPU
/// can run it (`generic` always can).
// Where no SIMD tier is compiled (32-bit Arm), `generic` is the only push.
#[cfg_attr(
    not(any(target_arch = "x86_64", target_arch = "aarch64")),
    allow(clippy::vec_init_then_push)
)]
pub fn tiers() -> Vec<(&'static Kernels, bool)> {
    let mut tiers = Vec::new();
    #[cfg(target_arch = "x86_64")]
    {
        tiers.push((
            &x86_64::avx512::TABLE,
            x86_64::Avx512Vnni::try_new().is_some(),
        ));
        tiers.push((
            &x86_64::avx2_vnni::TABLE,
            x86_64::Avx2Vnni::try_new().is_some(),
        ));
        tiers.push((&x86_64::avx2::TABLE, x86_64::Avx2Fma::try_new().is_some()));
    }
    #[cfg(target_arch = "aarch64")]
    {
        tiers.push((
            &aarch64::dotprod::TABLE,
            aarch64::NeonDot::try_new().is_some(),
        ));
        tiers.push((&aarch64::neon::TABLE, aarch64::Neon::try_new().is_some()));
    }
    tiers.push((&GENERIC, true));
    tiers
}

/// Why this binary cannot run on this CPU, if it cannot: the 32-bit Arm release build
/// (thumbv7neon, see build.rs) is compiled with NEON throughout (stable Rust has no per-function
/// NEON there), so a CPU without it would die of SIGILL at the first vector instruction. Checked
/// first thing in `main`: a best effort (std, built for the same target, could use NEON before).
/// The kernel's AT_HWCAP says it, also for a 32-bit program under a 64-bit kernel (whose
/// /proc/cpuinfo lists the 64-bit features) and under qemu-arm.
pub fn missing_cpu_feature() -> Option<String> {
    /// HWCAP_NEON of 32-bit Arm Linux (arch/arm/include/uapi/asm/hwcap.h).
    const HWCAP_NEON: usize = 1 << 12;
    if cfg!(neon_throughout) {
        let auxv = std::fs::read("/proc/self/auxv").ok()?;
        if auxv_value(&auxv, AT_HWCAP).is_some_and(|caps| caps & HWCAP_NEON == 0) {
            return Some(
                "this build of qwen2-edge needs a CPU with NEON (every Armv7 Raspberry Pi has \
                 it), and the kernel says this one has none (AT_HWCAP)"
                    .into(),
            );
        }
    }
    None
}

/// AT_HWCAP: the CPU features the kernel reports in the auxiliary vector.
const AT_HWCAP: usize = 16;

/// The value of `key` in an auxiliary vector as /proc/self/auxv holds it: pairs of native-width
/// words (key, value), ending with key 0.
fn auxv_value(auxv: &[u8], key: usize) -> Option<usize> {
    const W: usize = std::mem::size_of::<usize>();
    let word = |bytes: &[u8]| bytes.try_into().ok().map(usize::from_ne_bytes);
    auxv.chunks_exact(2 * W)
        .map_while(|pair| Some((word(&pair[..W])?, word(&pair[W..])?)))
        .take_while(|&(k, _)| k != 0)
        .find(|&(k, _)| k == key)
        .map(|(_, v)| v)
}

/// Every kernel table this CPU can run, best first (the last is always `generic`).
pub fn available() -> Vec<&'static Kernels> {
    tiers()
        .into_iter()
        .filter(|(_, ok)| *ok)
        .map(|(k, _)| k)
        .collect()
}

/// The kernel table of this name compiled for this architecture (whether or not the CPU can
/// run it).
pub fn by_name(name: &str) -> Option<&'static Kernels> {
    tiers().into_iter().map(|(k, _)| k).find(|k| k.name == name)
}

/// The kernel table to use: `requested` ("auto" or empty = the best this CPU has, `generic`,
/// or a tier name; flag, environment and config already resolved by `config::environment`).
/// Naming a set the CPU lacks is an error. A tier that takes kernels from `generic` is logged
/// as a warning.
pub fn select(requested: &str) -> Result<&'static Kernels> {
    let tiers = available();
    let chosen = match requested {
        "" | "auto" => tiers[0],
        name => match find(&tiers, name) {
            Some(k) => k,
            None => bail!(
                "kernel set {name:?} is not available on this CPU (available: {})",
                tiers.iter().map(|k| k.name).collect::<Vec<_>>().join(", ")
            ),
        },
    };
    tracing::info!(
        kernels = chosen.name,
        available = %tiers.iter().map(|k| k.name).collect::<Vec<_>>().join(","),
        "native kernels selected"
    );
    let fallbacks = chosen.fallbacks();
    if !fallbacks.is_empty() {
        tracing::warn!(
            kernels = chosen.name,
            generic = %fallbacks.join(","),
            "kernel tier falls back to the portable code for some kernels"
        );
    }
    Ok(chosen)
}

/// A tier by its full name, else by its short one (`avx512-vnni` → `avx512`, `avx2-fma` →
/// `avx2`); the full name wins, so `neon` is the Armv8.0 tier, not `neon-dotprod`, and a short
/// name shared by several tiers picks the base one of them (`avx2` is `avx2-fma`, not
/// `avx2-vnni`), as it did before the family grew.
fn find(tiers: &[&'static Kernels], name: &str) -> Option<&'static Kernels> {
    tiers
        .iter()
        .find(|k| k.name == name)
        .or_else(|| tiers.iter().rev().find(|k| short(k.name) == name))
        .copied()
}

/// `avx512-vnni` → `avx512`: either spelling selects a tier.
fn short(name: &str) -> &str {
    name.split('-').next().unwrap_or(name)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_partial_tier_reports_its_fallbacks() {
        use generic::{dot_f32, softmax};
        let partial: Kernels = tier!("partial", [dot_f32, softmax]);
        let fallbacks = partial.fallbacks();
        assert_eq!(fallbacks.len(), KERNEL_NAMES.len() - 2);
        assert!(!fallbacks.contains(&"dot_f32") && fallbacks.contains(&"gemm_q4"));
        assert!(GENERIC.fallbacks().is_empty());
        // The full name wins over a short one (`neon` is not `neon-dotprod`); a shared short
        // name is the family's base tier.
        let tiers = available();
        for k in &tiers {
            assert_eq!(find(&tiers, k.name).map(|t| t.name), Some(k.name));
        }
        if tiers.iter().any(|k| k.name == "avx2-fma") {
            assert_eq!(find(&tiers, "avx2").map(|t| t.name), Some("avx2-fma"));
        }
    }

    #[test]
    fn the_auxiliary_vector_is_read_by_key() {
        let words = |pairs: &[(usize, usize)]| -> Vec<u8> {
            pairs
                .iter()
                .flat_map(|&(k, v)| [k.to_ne_bytes(), v.to_ne_bytes()])
                .flatten()
                .collect()
        };
        let auxv = words(&[(6, 4096), (AT_HWCAP, 0x37b0d6), (0, 0), (AT_HWCAP, 1)]);
        assert_eq!(auxv_value(&auxv, AT_HWCAP), Some(0x37b0d6));
        assert_eq!(auxv_value(&auxv, 6), Some(4096));
        assert_eq!(auxv_value(&auxv, 25), None);
        // A truncated vector is read as far as it goes.
        assert_eq!(auxv_value(&auxv[..auxv.len() / 4 + 3], AT_HWCAP), None);
        // This process's own: the page size (AT_PAGESZ = 6) is there on every Linux.
        let own = std::fs::read("/proc/self/auxv").expect("/proc/self/auxv");
        assert!(auxv_value(&own, 6).is_some_and(|p| p.is_power_of_two() && p >= 4096));
        // This machine's build is not the NEON-only one, or this CPU has NEON.
        assert_eq!(missing_cpu_feature(), None);
    }
}
