//! Quantized weight layouts the kernels stream, the repacking from the bundle's layouts
//! (docs/bundle-format.md), and on-the-fly int8 activations.
//!
//! # The lane layout
//!
//! Integer dot-product instructions (x86 `vpdpbusd`, AVX2 `vpmaddubsw`+`vpmaddwd`, Arm
//! `sdot`) all sum four adjacent byte products into each 32-bit lane. We give each lane one
//! 32-element block: a row's blocks are taken in *groups* of up to 16 (the 32-bit lanes of a
//! 512-bit register), and inside a group the bytes are ordered step-major, step `s` (0..8)
//! holding elements `4s..4s+3` of every block of the group:
//!
//! ```text
//! group of G blocks, step s, lane i, byte j  =  element 4s + j of block (first + i)
//! ```
//!
//! A group is then eight dot-product instructions into *one* accumulator whose lane `i` ends
//! up as block `i`'s integer dot product; one int→float conversion and one multiply-add with
//! the 16 block scales finish 512 weights. With the bundle's block-contiguous layout, each
//! block's sum would need a horizontal reduction or a lane shuffle of its scale instead (the
//! per-block float work is what bounds llama.cpp's Q4_0 dot product).
//!
//! A row has `padded_blocks(k)` blocks (a multiple of 4): full groups of 16, then one group of
//! the remaining 4, 8 or 12. Padding weights decode to 0 and padding activations are 0.
//!
//! * int8 (`Q8`): per row `nb * 32` bytes, `u = q + 128` (the unsigned operand `vpdpbusd`
//!   wants; kernels subtract `128 · Σ x` per block, or flip the bit back where they need
//!   signed weights), and one f32 scale per row in a separate vector.
//! * int4 (`Q4`): per row, per group: `G * 16` bytes of nibbles, then the group's `G` block
//!   scales as f16 (little-endian). Byte `(t, i, j)` (t = 0..4) holds element `4t + j` of
//!   block `i` in its low nibble and element `16 + 4t + j` in its high nibble: masking a
//!   64-byte load gives step `t`, shifting it gives step `t + 4`. A nibble `u` means
//!   `(u - 8) · scale`, as in the bundle. The bundle's f32 scales are rounded to f16 (relative
//!   error 2⁻¹¹, a sixty-fourth of an int4 step): 18 bytes per 32 weights instead of 20, 10%
//!   fewer bytes streamed per token and 22 MB less memory for the 0.5B model.
//! * int4 with offsets (`Q4Ref::offsets`, the int4k variant's K-quant blocks): the same, and
//!   after a group's scales its `G` block offsets as f16, so a nibble `u` means
//!   `(u - 8) · scale + offset` (20 bytes per 32 weights). The kernels add `offset · Σ x` per
//!   block, `Σ x` being the block's sum of quantized activations (`QRow::block_sums`).
//!
//! Activations (`QActs`): per row, the same lane layout of int8 values, a scale per block
//! (`amax / 127`, llama.cpp's Q8_0 rule) and each block's sum of int8 values (for the
//! unsigned-weight correction).

/// Elements per quantization block (the bundle's int4 block; int8 rows are cut the same way).
pub const BLOCK: usize = 32;
/// Blocks per full lane group.
pub const GROUP: usize = 16;
/// Bytes per block of a repacked int4 row: 16 of nibbles + an f16 scale.
pub const Q4_BLOCK_BYTES: usize = 18;
/// Bytes per block of a repacked int4 row with offsets: nibbles, f16 scale, f16 offset.
pub const Q4_OFFSET_BLOCK_BYTES: usize = 20;
/// Blocks per super-block of int4k's K-quant codes (GGUF's K-quants: 8 × 32 = 256 weights).
pub const KQUANT_SUPER_BLOCK: usize = 8;

/// Blocks of a repacked row of `k` elements (rounded up to a multiple of 4).
pub fn padded_blocks(k: usize) -> usize {
    k.div_ceil(BLOCK).div_ceil(4) * 4
}

/// `(first block, lanes)` of each group of a row of `nb` padded blocks.
pub fn groups(nb: usize) -> impl Iterator<Item = (usize, usize)> {
    (0..nb)
        .step_by(GROUP)
        .map(move |first| (first, GROUP.min(nb - first)))
}

/// A repacked int8 matrix `[rows, cols]`.
#[derive(Clone, Copy)]
pub struct Q8Ref<'a> {
    pub data: &'a [u8],
    pub scales: &'a [f32],
    pub rows: usize,
    pub cols: usize,
}

impl<'a> Q8Ref<'a> {
    pub fn blocks(&self) -> usize {
        padded_blocks(self.cols)
    }

    pub fn row_bytes(&self) -> usize {
        self.blocks() * BLOCK
    }

    pub fn row(&self, r: usize) -> &'a [u8] {
        let n = self.row_bytes();
        &self.data[r * n..(r + 1) * n]
    }
}

/// A repacked int4 matrix `[rows, cols]` (scales, and offsets if it has them, inside the rows).
#[derive(Clone, Copy)]
pub struct Q4Ref<'a> {
    pub data: &'a [u8],
    pub rows: usize,
    pub cols: usize,
    /// Whether each block has an offset (int4k) after the group's scales.
    pub offsets: bool,
}

impl<'a> Q4Ref<'a> {
    pub fn blocks(&self) -> usize {
        padded_blocks(self.cols)
    }

    /// Bytes per block in the rows: `Q4_BLOCK_BYTES`, or `Q4_OFFSET_BLOCK_BYTES` with offsets.
    #[inline]
    pub fn block_bytes(&self) -> usize {
        q4_block_bytes(self.offsets)
    }

    pub fn row_bytes(&self) -> usize {
        self.blocks() * self.block_bytes()
    }

    pub fn row(&self, r: usize) -> &'a [u8] {
        let n = self.row_bytes();
        &self.data[r * n..(r + 1) * n]
    }
}

/// Bytes per block of a repacked int4 row with or without offsets.
#[inline]
pub fn q4_block_bytes(offsets: bool) -> usize {
    if offsets {
        Q4_OFFSET_BLOCK_BYTES
    } else {
        Q4_BLOCK_BYTES
    }
}

/// Offset in the lane layout of element `e` (0..32) of the block in lane `lane` of a group of
/// `lanes` blocks, relative to the group's first byte.
#[inline]
pub fn lane_offset(lanes: usize, lane: usize, e: usize) -> usize {
    (e / 4) * lanes * 4 + lane * 4 + e % 4
}

/// Repacks one bundle int8 row (`k` signed bytes) into `out` (`padded_blocks(k) * 32` bytes).
pub fn repack_q8_row(src: &[i8], out: &mut [u8]) {
    let nb = padded_blocks(src.len());
    assert_eq!(out.len(), nb * BLOCK);
    for (first, lanes) in groups(nb) {
        let base = first * BLOCK;
        for lane in 0..lanes {
            let b = first + lane;
            for s in 0..8 {
                let at = base + s * lanes * 4 + lane * 4;
                for j in 0..4 {
                    let q = src.get(b * BLOCK + 4 * s + j).copied().unwrap_or(0);
                    out[at + j] = (q as u8) ^ 0x80;
                }
            }
        }
    }
}

/// Repacks one bundle int4 row (`ceil(k / 32)` blocks of 16 bytes, element 2j in the low
/// nibble of byte j, and their scales, and for int4k their offsets) into `out`
/// (`padded_blocks(k) * q4_block_bytes(offsets.is_some())` bytes).
pub fn repack_q4_row(
    packed: &[u8],
    scales: &[f32],
    offsets: Option<&[f32]>,
    k: usize,
    out: &mut [u8],
) {
    let blocks = k.div_ceil(BLOCK);
    let nb = padded_blocks(k);
    let block_bytes = q4_block_bytes(offsets.is_some());
    assert_eq!(packed.len(), blocks * 16);
    assert_eq!(scales.len(), blocks);
    assert!(offsets.is_none_or(|o| o.len() == blocks));
    assert_eq!(out.len(), nb * block_bytes);
    for (first, lanes) in groups(nb) {
        let base = first * block_bytes;
        for lane in 0..lanes {
            let b = first + lane;
            // The block's 32 nibbles in element order; padding blocks are 8 (zero).
            let mut u = [8u8; BLOCK];
            if b < blocks {
                for (j, &byte) in packed[b * 16..(b + 1) * 16].iter().enumerate() {
                    u[2 * j] = byte & 0x0F;
                    u[2 * j + 1] = byte >> 4;
                }
            }
            for t in 0..4 {
                let at = base + t * lanes * 4 + lane * 4;
                for j in 0..4 {
                    out[at + j] = u[4 * t + j] | (u[16 + 4 * t + j] << 4);
                }
            }
            let scale = half::f16::from_f32(scales.get(b).copied().unwrap_or(0.0));
            let at = base + lanes * 16 + lane * 2;
            out[at..at + 2].copy_from_slice(&scale.to_le_bytes());
            if let Some(offsets) = offsets {
                let offset = half::f16::from_f32(offsets.get(b).copied().unwrap_or(0.0));
                let at = base + lanes * 18 + lane * 2;
                out[at..at + 2].copy_from_slice(&offset.to_le_bytes());
            }
        }
    }
}

/// int4k's K-quant codes as per-block scales and offsets of the lane layout:
/// `d·sc·u − dmin·m = (u − 8)·scale + offset` with `scale = d·sc` and
/// `offset = 8·scale − dmin·m`, both `[rows, ceil(cols / 32)]`. `sc`, `m`: the 6-bit codes
/// `[rows, blocks]`; `d`, `dmin`: f16 per super-block of 8 blocks `[rows, ceil(blocks / 8)]`.
/// `d·sc` is exact in f32 (11 × 6 significant bits); the offset is taken from the scale as
/// `repack_q4_row` rounds it to f16, so only the offset's own rounding to f16 (2⁻¹² of it) and
/// the scale's (2⁻¹² of it per unit of `u − 8`) move a weight.
pub fn kquant_scales_and_offsets(
    rows: usize,
    cols: usize,
    sc: &[u8],
    m: &[u8],
    d: &[half::f16],
    dmin: &[half::f16],
) -> (Vec<f32>, Vec<f32>) {
    let blocks = cols.div_ceil(BLOCK);
    let ns = blocks.div_ceil(KQUANT_SUPER_BLOCK);
    let mut scales = vec![0.0; rows * blocks];
    let mut offsets = vec![0.0; rows * blocks];
    for r in 0..rows {
        for b in 0..blocks {
            let (i, s) = (r * blocks + b, r * ns + b / KQUANT_SUPER_BLOCK);
            let scale = d[s].to_f32() * sc[i] as f32;
            let rounded = half::f16::from_f32(scale).to_f32();
            scales[i] = scale;
            offsets[i] = 8.0 * rounded - dmin[s].to_f32() * m[i] as f32;
        }
    }
    (scales, offsets)
}

/// The scale of block `lane` of the group starting at block `first` in a repacked int4 row
/// of `block_bytes` per block.
#[inline]
pub fn q4_scale(row: &[u8], block_bytes: usize, first: usize, lanes: usize, lane: usize) -> f32 {
    let at = first * block_bytes + lanes * 16 + lane * 2;
    half::f16::from_le_bytes([row[at], row[at + 1]]).to_f32()
}

/// The offset of block `lane` of the group starting at block `first` in a repacked int4 row
/// with offsets.
#[inline]
pub fn q4_offset(row: &[u8], first: usize, lanes: usize, lane: usize) -> f32 {
    let at = first * Q4_OFFSET_BLOCK_BYTES + lanes * 18 + lane * 2;
    half::f16::from_le_bytes([row[at], row[at + 1]]).to_f32()
}

/// Weight `e` of repacked int8 row `row` (a test and debugging helper).
pub fn q8_weight(row: &[u8], e: usize) -> i8 {
    let nb = row.len() / BLOCK;
    let (b, within) = (e / BLOCK, e % BLOCK);
    let first = b / GROUP * GROUP;
    let lanes = GROUP.min(nb - first);
    (row[first * BLOCK + lane_offset(lanes, b - first, within)] ^ 0x80) as i8
}

/// Nibble value (`u - 8`) and block scale of weight `e` of a repacked int4 row.
pub fn q4_weight(row: &[u8], e: usize) -> (i8, f32) {
    let (q, scale, _) = q4_weight_in(row, false, e);
    (q, scale)
}

/// Nibble value (`u - 8`), block scale and block offset (0 without offsets) of weight `e` of a
/// repacked int4 row: the weight is `q · scale + offset`.
pub fn q4_weight_in(row: &[u8], offsets: bool, e: usize) -> (i8, f32, f32) {
    let block_bytes = q4_block_bytes(offsets);
    let nb = row.len() / block_bytes;
    let (b, within) = (e / BLOCK, e % BLOCK);
    let first = b / GROUP * GROUP;
    let lanes = GROUP.min(nb - first);
    let lane = b - first;
    let (t, j, high) = ((within % 16) / 4, within % 4, within >= 16);
    let byte = row[first * block_bytes + t * lanes * 4 + lane * 4 + j];
    let u = if high { byte >> 4 } else { byte & 0x0F };
    let offset = if offsets {
        q4_offset(row, first, lanes, lane)
    } else {
        0.0
    };
    (
        u as i8 - 8,
        q4_scale(row, block_bytes, first, lanes, lane),
        offset,
    )
}

/// One activation row quantized to int8 in the lane layout.
#[derive(Clone, Copy)]
pub struct QRow<'a> {
    pub q: &'a [i8],
    pub scales: &'a [f32],
    pub sums: &'a [i32],
    /// Per block `scale · Σ q` (what int4k's block offsets multiply).
    pub block_sums: &'a [f32],
}

/// Up to `capacity` quantized activation rows of width `k`, allocated once.
pub struct QActs {
    pub blocks: usize,
    pub rows: usize,
    pub q: Vec<i8>,
    pub scales: Vec<f32>,
    pub sums: Vec<i32>,
    /// Each block's sum of activations as quantized (`scale · Σ q`), what int4k's per-block
    /// offsets multiply (`fill_block_sums`).
    pub block_sums: Vec<f32>,
}

impl QActs {
    pub fn new(k: usize, capacity: usize) -> Self {
        let blocks = padded_blocks(k);
        Self {
            blocks,
            rows: 0,
            q: vec![0; capacity * blocks * BLOCK],
            scales: vec![0.0; capacity * blocks],
            sums: vec![0; capacity * blocks],
            block_sums: vec![0.0; capacity * blocks],
        }
    }

    /// Computes `block_sums` of the quantized rows.
    pub fn fill_block_sums(&mut self) {
        let n = self.rows * self.blocks;
        for ((out, &s), &z) in self.block_sums[..n]
            .iter_mut()
            .zip(&self.scales[..n])
            .zip(&self.sums[..n])
        {
            *out = s * z as f32;
        }
    }

    // Inlined: the prefill tiles take C rows per tile (a call each was 3% of int4 prefill).
    #[inline]
    pub fn row(&self, i: usize) -> QRow<'_> {
        let nb = self.blocks;
        QRow {
            q: &self.q[i * nb * BLOCK..(i + 1) * nb * BLOCK],
            scales: &self.scales[i * nb..(i + 1) * nb],
            sums: &self.sums[i * nb..(i + 1) * nb],
            block_sums: &self.block_sums[i * nb..(i + 1) * nb],
        }
    }

    /// Mutable parts of row `i`: (q, scales, sums).
    pub fn row_mut(&mut self, i: usize) -> (&mut [i8], &mut [f32], &mut [i32]) {
        let nb = self.blocks;
        (
            &mut self.q[i * nb * BLOCK..(i + 1) * nb * BLOCK],
            &mut self.scales[i * nb..(i + 1) * nb],
            &mut self.sums[i * nb..(i + 1) * nb],
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn groups_cover_padded_blocks() {
        assert_eq!(padded_blocks(896), 28);
        assert_eq!(padded_blocks(4864), 152);
        assert_eq!(padded_blocks(48), 4);
        let g: Vec<_> = groups(28).collect();
        assert_eq!(g, vec![(0, 16), (16, 12)]);
        let g: Vec<_> = groups(152).collect();
        assert_eq!(g.last(), Some(&(144, 8)));
    }

    #[test]
    fn repacked_rows_decode_to_the_bundle_values() {
        for k in [32, 48, 100, 896] {
            let src: Vec<i8> = (0..k)
                .map(|i| ((i * 37 % 255) as i32 - 127) as i8)
                .collect();
            let mut out = vec![0; padded_blocks(k) * BLOCK];
            repack_q8_row(&src, &mut out);
            for (e, &q) in src.iter().enumerate() {
                assert_eq!(q8_weight(&out, e), q, "k {k} element {e}");
            }
            for e in k..padded_blocks(k) * BLOCK {
                assert_eq!(q8_weight(&out, e), 0);
            }

            let blocks = k.div_ceil(BLOCK);
            let nibbles: Vec<u8> = (0..blocks * 32).map(|i| (i * 7 % 16) as u8).collect();
            let packed: Vec<u8> = nibbles.chunks(2).map(|p| p[0] | (p[1] << 4)).collect();
            let scales: Vec<f32> = (0..blocks).map(|b| b as f32 * 0.5 - 1.0).collect();
            let mut out = vec![0; padded_blocks(k) * Q4_BLOCK_BYTES];
            repack_q4_row(&packed, &scales, None, k, &mut out);
            for e in 0..blocks * 32 {
                let (v, s) = q4_weight(&out, e);
                assert_eq!(v, nibbles[e] as i8 - 8, "k {k} element {e}");
                assert_eq!(s, half::f16::from_f32(scales[e / 32]).to_f32());
            }
            let offsets: Vec<f32> = (0..blocks).map(|b| 0.25 - b as f32 * 0.125).collect();
            let mut out = vec![0; padded_blocks(k) * Q4_OFFSET_BLOCK_BYTES];
            repack_q4_row(&packed, &scales, Some(&offsets), k, &mut out);
            for e in 0..blocks * 32 {
                let (v, s, o) = q4_weight_in(&out, true, e);
                assert_eq!(v, nibbles[e] as i8 - 8, "k {k} element {e}");
                assert_eq!(s, half::f16::from_f32(scales[e / 32]).to_f32());
                assert_eq!(o, half::f16::from_f32(offsets[e / 32]).to_f32());
            }
        }
    }
}
