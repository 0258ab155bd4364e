//! The q6k lane layout: 6-bit weights of GGUF's `Q6_K` class (docs/bundle-format.md, "q6k"),
//! what an int4k variant may store its wide matrices in, repacked for the kernels.
//!
//! A weight is `d · sc · (u − 32)`: `u` in 0..64, an int8 scale code `sc` per sub-block of 16
//! weights and an f16 `d` per super-block of 256 (8 blocks of 32). A row's 32-weight blocks are
//! walked in the lane groups of quant.rs (up to 16 blocks, one per 32-bit lane); inside a
//! group of `G` blocks:
//!
//! * `16 G` bytes of low nibbles, int4's layout: byte `(t, i, j)` (t = 0..4) holds the low 4
//!   bits of element `4t + j` of block `i` in its low nibble and of element `16 + 4t + j` in
//!   its high nibble, so a masked load gives step `t` and a shifted one step `t + 4`.
//! * `8 G` bytes of top bits: byte `(h, i, j)` (h = 0, 1) serves steps `t = 2h` and `2h + 1`:
//!   bits `4 (t % 2)`.. hold the top 2 bits of element `4t + j`, the next two those of element
//!   `16 + 4t + j`. One 16-bit shift and a mask `0x30` put a step's top bits above its nibble.
//! * `2 G` bytes of scale codes, a block's two together (elements 0..16, then 16..32): widened
//!   to i16 they are the pairs `vpmaddwd` multiplies a block's two sub-block sums by.
//! * `d` (f16) of each of the group's `ceil(G / 8)` super-blocks (a half group has one).
//!
//! 26.25 bytes per 32 weights (6.56 bits), as GGUF's 210 per 256. Steps 0–3 make a block's first
//! sub-block, steps 4–7 its second. The x86 kernels take `u` itself into the unsigned side of
//! their byte dot products and subtract `32 · Σx` per sub-block (the activations' sums per
//! sub-block, `QRow::half_sums`); NEON's make `u − 32` signed.

use half::f16;

use super::quant::{groups, padded_blocks, BLOCK, GROUP};

/// Weights per sub-block (each with its own scale code).
pub const Q6_SUB_BLOCK: usize = 16;
/// Sub-blocks per super-block (one f16 `d` each): 256 weights, 8 of the lane layout's blocks.
pub const Q6_SUPER_BLOCK: usize = 16;
/// Blocks of 32 per super-block.
const BLOCKS_PER_SUPER: usize = Q6_SUPER_BLOCK * Q6_SUB_BLOCK / BLOCK;

/// Bytes of a q6k group of `lanes` blocks.
#[inline]
pub fn q6_group_bytes(lanes: usize) -> usize {
    26 * lanes + 2 * lanes.div_ceil(BLOCKS_PER_SUPER)
}

/// Where the group starting at block `first` (a multiple of 16) starts in a row.
#[inline]
pub fn q6_group_at(first: usize) -> usize {
    first / GROUP * q6_group_bytes(GROUP)
}

/// Bytes of a repacked q6k row of `nb` padded blocks.
pub fn q6_row_bytes(nb: usize) -> usize {
    groups(nb).map(|(_, lanes)| q6_group_bytes(lanes)).sum()
}

/// A repacked q6k matrix `[rows, cols]`.
#[derive(Clone, Copy)]
pub struct Q6Ref<'a> {
    pub data: &'a [u8],
    pub rows: usize,
    pub cols: usize,
}

impl<'a> Q6Ref<'a> {
    pub fn blocks(&self) -> usize {
        padded_blocks(self.cols)
    }

    pub fn row_bytes(&self) -> usize {
        q6_row_bytes(self.blocks())
    }

    pub fn row(&self, r: usize) -> &'a [u8] {
        let n = self.row_bytes();
        &self.data[r * n..(r + 1) * n]
    }
}

/// One row of a q6k matrix as the bundle stores it: low nibbles (16 bytes per block, element
/// `2j` in the low nibble of byte `j`), top bits (8 bytes per block, element `4j + i` in bits
/// `2i..2i + 2` of byte `j`), a scale code per sub-block of 16, a `d` per super-block of 256.
#[derive(Clone, Copy)]
pub struct Q6Bundle<'a> {
    pub low: &'a [u8],
    pub high: &'a [u8],
    pub sc: &'a [i8],
    pub d: &'a [f16],
}

/// Repacks one bundle q6k row of `k` weights into `out` (`q6_row_bytes(padded_blocks(k))`
/// bytes). Padding weights get `u = 32` and scale 0: weight 0.
pub fn repack_q6k_row(src: Q6Bundle, k: usize, out: &mut [u8]) {
    let blocks = k.div_ceil(BLOCK);
    let nb = padded_blocks(k);
    let supers = (2 * blocks).div_ceil(Q6_SUPER_BLOCK);
    assert!(src.low.len() == blocks * 16 && src.high.len() == blocks * 8);
    assert!(src.sc.len() == 2 * blocks && src.d.len() == supers);
    assert_eq!(out.len(), q6_row_bytes(nb));
    for (first, lanes) in groups(nb) {
        let group = &mut out[q6_group_at(first)..][..q6_group_bytes(lanes)];
        group.fill(0);
        for lane in 0..lanes {
            let b = first + lane;
            let u: [u8; BLOCK] = std::array::from_fn(|e| bundle_value(src, b, e));
            for t in 0..4 {
                let at = t * lanes * 4 + lane * 4;
                let top = 16 * lanes + (t / 2) * lanes * 4 + lane * 4;
                let shift = 4 * (t % 2);
                for j in 0..4 {
                    let (a, b) = (u[4 * t + j], u[16 + 4 * t + j]);
                    group[at + j] = (a & 15) | (b & 15) << 4;
                    group[top + j] |= ((a >> 4) | (b >> 4) << 2) << shift;
                }
            }
            for half in 0..2 {
                let code = src.sc.get(2 * b + half).copied().unwrap_or(0);
                group[24 * lanes + 2 * lane + half] = code as u8;
            }
        }
        for s in 0..lanes.div_ceil(BLOCKS_PER_SUPER) {
            let super_block = first / BLOCKS_PER_SUPER + s;
            let d = src.d.get(super_block).copied().unwrap_or(f16::ZERO);
            let at = 26 * lanes + 2 * s;
            group[at..at + 2].copy_from_slice(&d.to_le_bytes());
        }
    }
}

/// 6-bit values (0..64) packed as a bundle row stores them: `(low nibbles, top bits)` for
/// `Q6Bundle` (a test and benchmark helper; the exporter writes bundles).
pub fn bundle_bits(u: &[u8]) -> (Vec<u8>, Vec<u8>) {
    let low = u
        .chunks(2)
        .map(|p| (p[0] & 15) | (p[1] & 15) << 4)
        .collect();
    let high = u
        .chunks(4)
        .map(|q| (0..4).fold(0, |a, i| a | (q[i] >> 4) << (2 * i)))
        .collect();
    (low, high)
}

/// The 6-bit value of element `e` of block `b` of a bundle row (32, weight 0, past its end).
fn bundle_value(src: Q6Bundle, b: usize, e: usize) -> u8 {
    let i = b * BLOCK + e;
    match (src.low.get(i / 2), src.high.get(i / 4)) {
        (Some(&low), Some(&high)) => (low >> (4 * (i % 2)) & 15) | (high >> (2 * (i % 4)) & 3) << 4,
        _ => 32,
    }
}

/// The value `u` (0..64), scale code and `d` of weight `e` of a repacked q6k row of `nb`
/// padded blocks: the weight is `d · sc · (u − 32)` (a test and debugging helper).
pub fn q6_weight(row: &[u8], nb: usize, e: usize) -> (u8, i8, f32) {
    let (b, within) = (e / BLOCK, e % BLOCK);
    let first = b / GROUP * GROUP;
    let lanes = GROUP.min(nb - first);
    let (lane, group) = (b - first, &row[q6_group_at(first)..]);
    let (t, j, second) = ((within % 16) / 4, within % 4, within >= 16);
    let byte = group[t * lanes * 4 + lane * 4 + j];
    let top = group[16 * lanes + (t / 2) * lanes * 4 + lane * 4 + j] >> (4 * (t % 2));
    let u = match second {
        false => (byte & 15) | (top & 3) << 4,
        true => (byte >> 4) | (top >> 2 & 3) << 4,
    };
    let sc = group[24 * lanes + 2 * lane + usize::from(second)] as i8;
    (u, sc, q6_super_scale(group, lanes, lane / BLOCKS_PER_SUPER))
}

/// `d` of super-block `s` of a q6k group of `lanes` blocks (`group` from its first byte).
#[inline]
pub fn q6_super_scale(group: &[u8], lanes: usize, s: usize) -> f32 {
    let at = 26 * lanes + 2 * s;
    f16::from_le_bytes([group[at], group[at + 1]]).to_f32()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn repacked_rows_decode_to_the_bundle_values() {
        for k in [32usize, 48, 256, 896, 4864] {
            let blocks = k.div_ceil(BLOCK);
            let nb = padded_blocks(k);
            let u: Vec<u8> = (0..blocks * 32).map(|i| (i * 37 % 64) as u8).collect();
            let (low, high) = bundle_bits(&u);
            let sc: Vec<i8> = (0..2 * blocks).map(|s| (s * 53 % 255) as i8).collect();
            let supers = (2 * blocks).div_ceil(Q6_SUPER_BLOCK);
            let d: Vec<f16> = (0..supers)
                .map(|s| f16::from_f32(1e-3 + s as f32 * 1e-4))
                .collect();
            let src = Q6Bundle {
                low: &low,
                high: &high,
                sc: &sc,
                d: &d,
            };
            let mut out = vec![0xAA; q6_row_bytes(nb)];
            repack_q6k_row(src, k, &mut out);
            for (e, &want) in u.iter().enumerate() {
                let (b, second) = (e / 32, e % 32 >= 16);
                let got = q6_weight(&out, nb, e);
                let code = sc[2 * b + usize::from(second)];
                assert_eq!(got, (want, code, d[b / 8].to_f32()), "k {k} element {e}");
            }
            for e in blocks * 32..nb * 32 {
                let (u, sc, _) = q6_weight(&out, nb, e);
                assert_eq!((u, sc), (32, 0), "k {k} padding element {e}");
            }
        }
    }
}
