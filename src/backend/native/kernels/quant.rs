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
//! * int4k (`Q4Ref::kquant`, the K-quant blocks): the same nibbles, and after them, instead
//!   of the scales, the group's codes as GGUF's `Q4_K` has them — 6 bits for each block's
//!   scale code `sc` and min code `m`, and per super-block of 8 blocks an f16 `d` and `dmin`:
//!   `G` bytes holding `sc & 15 | (m & 15) << 4` per block, then `G / 2` bytes of the codes'
//!   top two bits, `sc >> 4 | (m >> 4) << 2` in bits `4i..4i+4` of the little-endian integer
//!   for block `i`, then `d`, `dmin` (f16) of each of the group's `ceil(G / 8)` super-blocks
//!   (a group starts at a multiple of 16 blocks, so it holds whole super-blocks but a row's
//!   last). A full group is 288 bytes, 18 a block as int4's (a group of 4 or 12, 2 more): a
//!   nibble `u` means `u · scale − min` with `scale = d·sc` and `min = dmin·m` (both exact in
//!   f32: 11 × 6 significant bits), which the kernels decode per group. Their integer dot
//!   products take `u` itself, not `u − 8` (no `8 · Σ x` correction), and they subtract
//!   `min · Σ x` per block, `Σ x` being the block's sum of quantized activations
//!   (`QRow::block_sums`). (f16 scales and offsets per block, as an
//!   earlier version stored them, were 20 bytes a block: int4k decoded 3–10% slower than int4.)
//!
//! Activations (`QActs`): per row, the same lane layout of int8 values, a scale per block
//! (`amax / 127`, llama.cpp's Q8_0 rule) and each block's sum of int8 values (for the
//! unsigned-weight correction).

/// Elements per quantization block (the bundle's int4 block; int8 rows are cut the same way).
pub const BLOCK: usize = 32;
/// Blocks per full lane group.
pub const GROUP: usize = 16;
/// Bytes per block of a repacked int4 row (16 of nibbles + an f16 scale), and of a full
/// group of an int4k row: a group of `lanes` blocks starts `first * Q4_BLOCK_BYTES` into a row.
pub const Q4_BLOCK_BYTES: usize = 18;
/// Blocks per super-block of int4k's K-quant codes (GGUF's K-quants: 8 × 32 = 256 weights).
pub const KQUANT_SUPER_BLOCK: usize = 8;

/// Blocks of a repacked row of `k` elements (rounded up to a multiple of 4).
pub fn padded_blocks(k: usize) -> usize {
    k.div_ceil(BLOCK).div_ceil(4) * 4
}

/// `(first block, lanes)` of each group of a row of `nb` padded blocks.
pub fn groups(nb: usize) -> impl Iterator<Item = (usize, usize)> {
    groups_in(nb, 0..nb)
}

/// `groups(nb)` of the blocks `blocks` (starting on a group boundary).
pub fn groups_in(
    nb: usize,
    blocks: std::ops::Range<usize>,
) -> impl Iterator<Item = (usize, usize)> {
    blocks
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

/// A repacked int4 matrix `[rows, cols]` (scales, or int4k's codes, inside the rows).
#[derive(Clone, Copy)]
pub struct Q4Ref<'a> {
    pub data: &'a [u8],
    pub rows: usize,
    pub cols: usize,
    /// Whether the groups carry int4k's K-quant codes instead of f16 scales.
    pub kquant: bool,
    /// int4k's scales and mins of some rows decoded ahead (a prefill; `Kernels::gemm`): the
    /// tiles read them there instead of decoding the codes again for every tile of activation
    /// rows. The same values either way (`q4k_scale_min`).
    pub decoded: Option<DecodedCodes<'a>>,
}

/// The `(scale, min)` of every block of a run of an int4k matrix's rows from row `first`, row
/// by row, `blocks` (the padded block count) per row; `decode_kquant_rows` fills them.
#[derive(Clone, Copy)]
pub struct DecodedCodes<'a> {
    pub first: usize,
    pub blocks: usize,
    pub scales: &'a [f32],
    pub mins: &'a [f32],
}

/// One weight row's int4k block scales and mins, decoded ahead (`DecodedCodes::row`).
pub type DecodedRow<'a> = (&'a [f32], &'a [f32]);

impl<'a> DecodedCodes<'a> {
    /// Weight row `row`'s block scales and mins (panics outside the decoded rows).
    #[inline]
    pub fn row(&self, row: usize) -> DecodedRow<'a> {
        let at = (row - self.first) * self.blocks;
        let end = at + self.blocks;
        (&self.scales[at..end], &self.mins[at..end])
    }
}

/// Decodes the codes of rows `first..first + scales.len() / nb` of int4k matrix `w` into
/// `scales` and `mins`, `nb` (the padded block count) per row.
pub fn decode_kquant_rows(w: Q4Ref, first: usize, scales: &mut [f32], mins: &mut [f32]) {
    let nb = w.blocks();
    assert!(w.kquant && scales.len() == mins.len() && scales.len().is_multiple_of(nb));
    let (mut s, mut m) = ([0.0; GROUP], [0.0; GROUP]);
    for (i, (scales, mins)) in scales
        .chunks_exact_mut(nb)
        .zip(mins.chunks_exact_mut(nb))
        .enumerate()
    {
        let row = w.row(first + i);
        for (fb, lanes) in groups(nb) {
            q4k_group_scales_mins(row, fb, lanes, &mut s, &mut m);
            scales[fb..fb + lanes].copy_from_slice(&s[..lanes]);
            mins[fb..fb + lanes].copy_from_slice(&m[..lanes]);
        }
    }
}

impl<'a> Q4Ref<'a> {
    /// The decoded scales and mins of a tile's `R` rows from row `j`, when they were decoded
    /// ahead (checked to hold all `blocks()` of each row).
    #[inline]
    pub fn decoded_rows<const R: usize>(&self, j: usize) -> Option<[DecodedRow<'a>; R]> {
        let decoded = self.decoded?;
        assert_eq!(decoded.blocks, self.blocks());
        Some(std::array::from_fn(|r| decoded.row(j + r)))
    }

    pub fn blocks(&self) -> usize {
        padded_blocks(self.cols)
    }

    /// Bytes per block in a row's full groups (`Q4_BLOCK_BYTES` in both layouts).
    #[inline]
    pub fn block_bytes(&self) -> usize {
        Q4_BLOCK_BYTES
    }

    pub fn row_bytes(&self) -> usize {
        q4_row_bytes(self.blocks(), self.kquant)
    }

    pub fn row(&self, r: usize) -> &'a [u8] {
        let n = self.row_bytes();
        &self.data[r * n..(r + 1) * n]
    }
}

/// Bytes of an int4k group of `lanes` blocks: nibbles, code nibbles, top bits of the scale and
/// min codes, and `d`, `dmin` per super-block.
#[inline]
pub fn kquant_group_bytes(lanes: usize) -> usize {
    16 * lanes + lanes + lanes / 2 + 4 * lanes.div_ceil(KQUANT_SUPER_BLOCK)
}

/// Bytes of a repacked int4 (or int4k) row of `nb` padded blocks.
pub fn q4_row_bytes(nb: usize, kquant: bool) -> usize {
    if kquant {
        groups(nb).map(|(_, lanes)| kquant_group_bytes(lanes)).sum()
    } else {
        nb * Q4_BLOCK_BYTES
    }
}

/// Offset in the lane layout of element `e` (0..32) of the block in lane `lane` of a group of
/// `lanes` blocks, relative to the group's first byte.
#[inline]
pub fn lane_offset(lanes: usize, lane: usize, e: usize) -> usize {
    (e / 4) * lanes * 4 + lane * 4 + e % 4
}

/// Every element of a lane-layout row of `nb` blocks: `f(element, byte)`, its index in the
/// bundle's row and its byte's in the repacked one.
fn for_each_lane_byte(nb: usize, mut f: impl FnMut(usize, usize)) {
    for (first, lanes) in groups(nb) {
        let base = first * BLOCK;
        for lane in 0..lanes {
            let b = first + lane;
            for s in 0..8 {
                let at = base + s * lanes * 4 + lane * 4;
                for j in 0..4 {
                    f(b * BLOCK + 4 * s + j, at + j);
                }
            }
        }
    }
}

/// Repacks one bundle int8 row (`k` signed bytes) into `out` (`padded_blocks(k) * 32` bytes).
pub fn repack_q8_row(src: &[i8], out: &mut [u8]) {
    let nb = padded_blocks(src.len());
    assert_eq!(out.len(), nb * BLOCK);
    for_each_lane_byte(nb, |e, at| {
        out[at] = (src.get(e).copied().unwrap_or(0) as u8) ^ 0x80;
    });
}

/// The bundle's int8 values of repacked row `row` (`repack_q8_row` undone) into `out`, its
/// first `out.len()` elements.
pub fn unpack_q8_row(row: &[u8], out: &mut [i8]) {
    let nb = row.len() / BLOCK;
    assert!(out.len() <= nb * BLOCK);
    for_each_lane_byte(nb, |e, at| {
        if let Some(q) = out.get_mut(e) {
            *q = (row[at] ^ 0x80) as i8;
        }
    });
}

/// int4k's codes as the bundle stores them (docs/bundle-format.md), of one row or of a matrix's
/// rows in order: a 6-bit scale code and min code per block, f16 `d` and `dmin` per super-block
/// of 8 blocks.
#[derive(Clone, Copy)]
pub struct KquantCodes<'a> {
    pub sc: &'a [u8],
    pub m: &'a [u8],
    pub d: &'a [half::f16],
    pub dmin: &'a [half::f16],
}

/// Writes block `b`'s 32 nibbles (8, zero, past the `blocks` there are) at lane `lane` of the
/// group starting at `group[0]` with `lanes` blocks.
fn put_nibbles(packed: &[u8], b: usize, lanes: usize, lane: usize, group: &mut [u8]) {
    // The block's 32 nibbles in element order; padding blocks are 8 (zero).
    let mut u = [8u8; BLOCK];
    if let Some(bytes) = packed.get(b * 16..(b + 1) * 16) {
        for (j, &byte) in bytes.iter().enumerate() {
            u[2 * j] = byte & 0x0F;
            u[2 * j + 1] = byte >> 4;
        }
    }
    for t in 0..4 {
        let at = t * lanes * 4 + lane * 4;
        for j in 0..4 {
            group[at + j] = u[4 * t + j] | (u[16 + 4 * t + j] << 4);
        }
    }
}

/// Repacks one bundle int4 row (`ceil(k / 32)` blocks of 16 bytes, element 2j in the low
/// nibble of byte j) and its block scales into `out` (`padded_blocks(k) * Q4_BLOCK_BYTES`
/// bytes).
pub fn repack_q4_row(packed: &[u8], scales: &[f32], k: usize, out: &mut [u8]) {
    let blocks = k.div_ceil(BLOCK);
    let nb = padded_blocks(k);
    assert_eq!(packed.len(), blocks * 16);
    assert_eq!(scales.len(), blocks);
    assert_eq!(out.len(), nb * Q4_BLOCK_BYTES);
    for (first, lanes) in groups(nb) {
        let group = &mut out[first * Q4_BLOCK_BYTES..];
        for lane in 0..lanes {
            let b = first + lane;
            put_nibbles(packed, b, lanes, lane, group);
            let scale = half::f16::from_f32(scales.get(b).copied().unwrap_or(0.0));
            let at = lanes * 16 + lane * 2;
            group[at..at + 2].copy_from_slice(&scale.to_le_bytes());
        }
    }
}

/// Requantizes one bundle int8 row (values `q`, the row's scale `row_scale`) to int4 blocks of
/// 32 by the exporter's int4 rule (the block's value of largest magnitude maps to −8, the others
/// round to the nearest step, clamped to −8..7) and repacks it into `out` as
/// `repack_q4_row` does. Each weight moves by at most half a step (a sixteenth of its block's
/// largest magnitude), one of the other sign beyond 7.5 steps by at most one (it clamps to 7),
/// plus the f16 rounding of the block scale.
pub fn requantize_q8_row_to_q4(q: &[i8], row_scale: f32, out: &mut [u8]) {
    let blocks = q.len().div_ceil(BLOCK);
    let mut packed = vec![0u8; blocks * 16];
    let mut scales = vec![0f32; blocks];
    for (b, block) in q.chunks(BLOCK).enumerate() {
        let extreme = block
            .iter()
            .map(|&v| i32::from(v))
            .max_by_key(|v| v.abs())
            .unwrap_or(0);
        let step = if extreme != 0 {
            extreme as f32 / -8.0
        } else {
            1.0
        };
        for (j, &v) in block.iter().enumerate() {
            let n = (f32::from(v) / step).round().clamp(-8.0, 7.0) as i32 + 8;
            packed[b * 16 + j / 2] |= (n as u8) << (4 * (j % 2));
        }
        scales[b] = step * row_scale;
    }
    repack_q4_row(&packed, &scales, q.len(), out);
}

/// Repacks one bundle int4k row (its nibbles as int4's, and its codes) into `out`
/// (`q4_row_bytes(padded_blocks(k), true)` bytes). Padding blocks get codes 0: weight 0.
pub fn repack_q4k_row(packed: &[u8], codes: KquantCodes, k: usize, out: &mut [u8]) {
    let blocks = k.div_ceil(BLOCK);
    let nb = padded_blocks(k);
    assert_eq!(packed.len(), blocks * 16);
    assert!(codes.sc.len() == blocks && codes.m.len() == blocks);
    let supers = blocks.div_ceil(KQUANT_SUPER_BLOCK);
    assert!(codes.d.len() == supers && codes.dmin.len() == supers);
    assert_eq!(out.len(), q4_row_bytes(nb, true));
    for (first, lanes) in groups(nb) {
        let group = &mut out[first * Q4_BLOCK_BYTES..][..kquant_group_bytes(lanes)];
        let tail = 16 * lanes;
        group[tail..].fill(0);
        for lane in 0..lanes {
            let b = first + lane;
            put_nibbles(packed, b, lanes, lane, group);
            let sc = codes.sc.get(b).copied().unwrap_or(0);
            let m = codes.m.get(b).copied().unwrap_or(0);
            group[tail + lane] = (sc & 15) | (m & 15) << 4;
            group[tail + lanes + lane / 2] |=
                ((sc >> 4 & 3) | (m >> 4 & 3) << 2) << (4 * (lane % 2));
        }
        for s in 0..lanes.div_ceil(KQUANT_SUPER_BLOCK) {
            let super_block = first / KQUANT_SUPER_BLOCK + s;
            let zero = half::f16::ZERO;
            let d = codes.d.get(super_block).copied().unwrap_or(zero);
            let dmin = codes.dmin.get(super_block).copied().unwrap_or(zero);
            let at = tail + lanes + lanes / 2 + 4 * s;
            group[at..at + 2].copy_from_slice(&d.to_le_bytes());
            group[at + 2..at + 4].copy_from_slice(&dmin.to_le_bytes());
        }
    }
}

/// The 6-bit scale and min codes (a byte each, `blocks` a row) of rows of int4k codes packed per
/// super-block as GGUF's Q4_K packs them (docs/bundle-format.md): 12 bytes per super-block of 8
/// blocks, codes 0–3 in the low 6 bits of bytes 0–3 (scale) and 4–7 (min), codes 4–7 in the
/// nibbles of bytes 8–11 (scale low, min high) with their top 2 bits in the top bits of bytes
/// 0–7. A row's last super-block may hold fewer than 8 blocks.
pub fn unpack_kquant_codes(packed: &[u8], blocks: usize) -> (Vec<u8>, Vec<u8>) {
    let per_row = blocks.div_ceil(KQUANT_SUPER_BLOCK) * 12;
    let rows = packed.len() / per_row.max(1);
    let (mut sc, mut m) = (
        Vec::with_capacity(rows * blocks),
        Vec::with_capacity(rows * blocks),
    );
    for row in packed.chunks_exact(per_row) {
        for (s, b) in row.chunks_exact(12).enumerate() {
            let take = (blocks - s * KQUANT_SUPER_BLOCK).min(KQUANT_SUPER_BLOCK);
            for j in 0..take {
                let (code_sc, code_m) = match j {
                    0..4 => (b[j] & 63, b[j + 4] & 63),
                    _ => (
                        (b[j + 4] & 15) | (b[j - 4] >> 6) << 4,
                        (b[j + 4] >> 4) | (b[j] >> 6) << 4,
                    ),
                };
                sc.push(code_sc);
                m.push(code_m);
            }
        }
    }
    (sc, m)
}

/// The scale of block `lane` of the group starting at block `first` in a repacked int4 row.
#[inline]
pub fn q4_scale(row: &[u8], first: usize, lanes: usize, lane: usize) -> f32 {
    let at = first * Q4_BLOCK_BYTES + lanes * 16 + lane * 2;
    half::f16::from_le_bytes([row[at], row[at + 1]]).to_f32()
}

/// `(scale, min)` of block `lane` of the group starting at block `first` in a repacked int4k
/// row: its weights are `u · scale − min` (`u` the nibble, 0..16). Both are exact products in
/// f32, so every tier's decoding gives the same values.
#[inline]
pub fn q4k_scale_min(row: &[u8], first: usize, lanes: usize, lane: usize) -> (f32, f32) {
    let (sc, m) = kquant_codes(row, first, lanes, lane);
    let (d, dmin) = kquant_super_block(row, first, lanes, lane / KQUANT_SUPER_BLOCK);
    (d * sc as f32, dmin * m as f32)
}

/// `q4k_scale_min` of every block of a group, each super-block's `d` and `dmin` converted once.
/// The group's codes are sliced once and walked a top-bits byte (two blocks) at a time: called
/// per group and per row, a lookup with bounds checks per block took 12% of the generic tier's
/// int4k decode (`perf`), outside the product's loop.
#[inline]
pub fn q4k_group_scales_mins(
    row: &[u8],
    first: usize,
    lanes: usize,
    scales: &mut [f32; GROUP],
    mins: &mut [f32; GROUP],
) {
    let supers = lanes.div_ceil(KQUANT_SUPER_BLOCK);
    let mut steps = [(0.0, 0.0); GROUP / KQUANT_SUPER_BLOCK];
    for (s, step) in steps.iter_mut().enumerate().take(supers) {
        *step = kquant_super_block(row, first, lanes, s);
    }
    let tail = codes_at(first, lanes);
    let (codes, tops) = (
        &row[tail..tail + lanes],
        &row[tail + lanes..tail + lanes + lanes / 2],
    );
    let pairs = codes.chunks_exact(2).zip(tops);
    let outs = scales.chunks_exact_mut(2).zip(mins.chunks_exact_mut(2));
    for (pair, ((low, &top), (sc, m))) in pairs.zip(outs).enumerate() {
        // Blocks 2·pair and 2·pair + 1: one super-block (8 blocks each).
        let (d, dmin) = steps[2 * pair / KQUANT_SUPER_BLOCK];
        for k in 0..2 {
            let (code_sc, code_m) = split_codes(low[k], top >> (4 * k));
            (sc[k], m[k]) = (d * code_sc as f32, dmin * code_m as f32);
        }
    }
}

/// The 6-bit scale and min codes of block `lane` of an int4k group.
#[inline]
fn kquant_codes(row: &[u8], first: usize, lanes: usize, lane: usize) -> (u8, u8) {
    let tail = codes_at(first, lanes);
    let top = row[tail + lanes + lane / 2] >> (4 * (lane % 2));
    split_codes(row[tail + lane], top)
}

/// Where the codes of an int4k row's group of `lanes` blocks from block `first` start (after
/// its nibbles).
#[inline]
fn codes_at(first: usize, lanes: usize) -> usize {
    first * Q4_BLOCK_BYTES + 16 * lanes
}

/// A block's 6-bit `(scale, min)` codes from its code byte (the low 4 bits of each) and its
/// top-bits nibble in the low bits of `top` (bits 0–1 the scale's top, 2–3 the min's).
#[inline]
fn split_codes(low: u8, top: u8) -> (u8, u8) {
    (
        (low & 15) | (top & 3) << 4,
        (low >> 4) | (top >> 2 & 3) << 4,
    )
}

/// `(d, dmin)` of super-block `s` of an int4k group.
#[inline]
fn kquant_super_block(row: &[u8], first: usize, lanes: usize, s: usize) -> (f32, f32) {
    let at = codes_at(first, lanes) + lanes + lanes / 2 + 4 * s;
    let d = half::f16::from_le_bytes([row[at], row[at + 1]]).to_f32();
    let dmin = half::f16::from_le_bytes([row[at + 2], row[at + 3]]).to_f32();
    (d, dmin)
}

/// Weight `e` of repacked int8 row `row` (a test and debugging helper).
pub fn q8_weight(row: &[u8], e: usize) -> i8 {
    let nb = row.len() / BLOCK;
    let (b, within) = (e / BLOCK, e % BLOCK);
    let first = b / GROUP * GROUP;
    let lanes = GROUP.min(nb - first);
    (row[first * BLOCK + lane_offset(lanes, b - first, within)] ^ 0x80) as i8
}

/// Nibble value (`u - 8`) and block scale of weight `e` of a repacked int4 row of `nb`
/// padded blocks.
pub fn q4_weight(row: &[u8], nb: usize, e: usize) -> (i8, f32) {
    let (q, scale, _) = q4_weight_in(row, nb, false, e);
    (q, scale)
}

/// Nibble value (`u - 8`), block scale and block offset (0 for int4) of weight `e` of a
/// repacked int4 (`kquant`: int4k) row of `nb` padded blocks: the weight is
/// `q · scale + offset`.
pub fn q4_weight_in(row: &[u8], nb: usize, kquant: bool, e: usize) -> (i8, f32, f32) {
    let (b, within) = (e / BLOCK, e % BLOCK);
    let first = b / GROUP * GROUP;
    let lanes = GROUP.min(nb - first);
    let lane = b - first;
    let (t, j, high) = ((within % 16) / 4, within % 4, within >= 16);
    let byte = row[first * Q4_BLOCK_BYTES + t * lanes * 4 + lane * 4 + j];
    let u = if high { byte >> 4 } else { byte & 0x0F };
    let (scale, offset) = if kquant {
        let (scale, min) = q4k_scale_min(row, first, lanes, lane);
        (scale, 8.0 * scale - min)
    } else {
        (q4_scale(row, first, lanes, lane), 0.0)
    };
    (u as i8 - 8, scale, offset)
}

/// The two sub-block sums of a `QRow::half_sums` entry.
#[inline]
pub fn half_sums(packed: i32) -> [i32; 2] {
    [packed as i16 as i32, packed >> 16]
}

/// One activation row quantized to int8 in the lane layout.
#[derive(Clone, Copy)]
pub struct QRow<'a> {
    pub q: &'a [i8],
    pub scales: &'a [f32],
    pub sums: &'a [i32],
    /// Per block `scale · Σ q` (what int4k's block mins multiply).
    pub block_sums: &'a [f32],
    /// Per block `Σ q` of its first 16 elements and of its last 16 (q6k's sub-blocks), as two
    /// i16 in one i32 (`half_sums`): the pair `vpmaddwd` multiplies by a block's scale codes.
    pub half_sums: &'a [i32],
}

impl QRow<'_> {
    /// Asserts that the row holds `nb` blocks of codes, scales and sums, and of block sums
    /// where `block_sums` (int4k): what the x86 tiles check once before their pointer loops.
    #[inline]
    pub fn assert_blocks(&self, nb: usize, block_sums: bool) {
        assert!(self.q.len() >= nb * BLOCK && self.scales.len() >= nb && self.sums.len() >= nb);
        assert!(!block_sums || self.block_sums.len() >= nb);
    }
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
    /// Each block's `Σ q` over its first and its last 16 elements (`fill_half_sums`; q6k's
    /// sub-blocks), packed as `QRow::half_sums` says.
    pub half_sums: Vec<i32>,
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
            half_sums: vec![0; capacity * blocks],
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

    /// Computes `half_sums` of the quantized rows: only q6k products read them, so the
    /// callers fill them only for those.
    pub fn fill_half_sums(&mut self) {
        let nb = self.blocks;
        for (q, half_sums) in self
            .q
            .chunks_exact(nb * BLOCK)
            .zip(self.half_sums.chunks_exact_mut(nb))
            .take(self.rows)
        {
            for (first, lanes) in groups(nb) {
                // Steps 0-3 of the group: elements 0..16 of each of its blocks; 4-7: 16..32.
                let steps = &q[first * BLOCK..][..32 * lanes];
                let mut halves = [[0i32; GROUP]; 2];
                for (s, step) in steps.chunks_exact(4 * lanes).enumerate() {
                    for (sum, four) in halves[s / 4].iter_mut().zip(step.chunks_exact(4)) {
                        *sum += four.iter().map(|&v| v as i32).sum::<i32>();
                    }
                }
                for (lane, out) in half_sums[first..first + lanes].iter_mut().enumerate() {
                    // |Σ| ≤ 16 · 127: each fits i16.
                    *out = (halves[0][lane] & 0xFFFF) | halves[1][lane] << 16;
                }
            }
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
            half_sums: &self.half_sums[i * nb..(i + 1) * nb],
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
    fn packed_kquant_codes_unpack_as_gguf_packs_them() {
        // Two rows of 28 blocks (3.5 super-blocks, as the 0.5B's 896-wide rows), every code
        // value; packed here by the rule docs/bundle-format.md states.
        let blocks = 28;
        let sc: Vec<u8> = (0..2 * blocks).map(|i| (i * 29 % 64) as u8).collect();
        let m: Vec<u8> = (0..2 * blocks).map(|i| (63 - i * 17 % 64) as u8).collect();
        let mut packed = Vec::new();
        for (sc, m) in sc.chunks(blocks).zip(m.chunks(blocks)) {
            for s in 0..blocks.div_ceil(8) {
                let code = |v: &[u8], j: usize| v.get(8 * s + j).copied().unwrap_or(0);
                let mut b = [0u8; 12];
                for j in 0..4 {
                    b[j] = code(sc, j) | (code(sc, j + 4) >> 4) << 6;
                    b[j + 4] = code(m, j) | (code(m, j + 4) >> 4) << 6;
                    b[j + 8] = (code(sc, j + 4) & 15) | (code(m, j + 4) & 15) << 4;
                }
                packed.extend_from_slice(&b);
            }
        }
        assert_eq!(unpack_kquant_codes(&packed, blocks), (sc, m));
    }

    #[test]
    fn int8_rows_requantized_to_int4_stay_within_half_a_step() {
        for k in [32, 48, 100, 896] {
            let src: Vec<i8> = (0..k)
                .map(|i| ((i * 37 % 255) as i32 - 127) as i8)
                .collect();
            let row_scale = 0.01;
            let mut out = vec![0; padded_blocks(k) * Q4_BLOCK_BYTES];
            requantize_q8_row_to_q4(&src, row_scale, &mut out);
            for (b, block) in src.chunks(BLOCK).enumerate() {
                let largest = block
                    .iter()
                    .map(|&v| f32::from(v).abs())
                    .fold(0.0, f32::max);
                let step = largest / 8.0;
                for (j, &v) in block.iter().enumerate() {
                    // Half a step (one where +8 steps clamps to 7), and the f16 scale's relative
                    // rounding (2^-11) over up to 8 steps.
                    let steps = if f32::from(v).abs() > 7.5 * step {
                        1.0
                    } else {
                        0.5
                    };
                    let bound = row_scale * step * (steps + 8.0 / 2048.0);
                    let (n, scale) = q4_weight(&out, padded_blocks(k), b * BLOCK + j);
                    let err = (f32::from(n) * scale - f32::from(v) * row_scale).abs();
                    assert!(
                        err <= bound,
                        "k {k} element {}: {err} > {bound}",
                        b * BLOCK + j
                    );
                }
            }
            // Each block's value of largest magnitude is the −8 level (all 16 levels used).
            for (b, block) in src.chunks(BLOCK).enumerate() {
                let j = (0..block.len())
                    .max_by_key(|&j| i32::from(block[j]).abs())
                    .expect("a block");
                assert_eq!(q4_weight(&out, padded_blocks(k), b * BLOCK + j).0, -8);
            }
        }
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
            let mut unpacked = vec![0; k];
            unpack_q8_row(&out, &mut unpacked);
            assert_eq!(unpacked, src, "k {k}");

            let blocks = k.div_ceil(BLOCK);
            let nibbles: Vec<u8> = (0..blocks * 32).map(|i| (i * 7 % 16) as u8).collect();
            let packed: Vec<u8> = nibbles.chunks(2).map(|p| p[0] | (p[1] << 4)).collect();
            let scales: Vec<f32> = (0..blocks).map(|b| b as f32 * 0.5 - 1.0).collect();
            let nb = padded_blocks(k);
            let mut out = vec![0; nb * Q4_BLOCK_BYTES];
            repack_q4_row(&packed, &scales, k, &mut out);
            for e in 0..blocks * 32 {
                let (v, s) = q4_weight(&out, nb, e);
                assert_eq!(v, nibbles[e] as i8 - 8, "k {k} element {e}");
                assert_eq!(s, half::f16::from_f32(scales[e / 32]).to_f32());
            }
            // Every 6-bit code and super-block scale pair its own value.
            let sc: Vec<u8> = (0..blocks).map(|b| (b * 29 % 64) as u8).collect();
            let m: Vec<u8> = (0..blocks).map(|b| (63 - b * 13 % 64) as u8).collect();
            let supers = blocks.div_ceil(KQUANT_SUPER_BLOCK);
            let d: Vec<_> = (0..supers)
                .map(|s| half::f16::from_f32(0.01 + s as f32 * 1e-3))
                .collect();
            let dmin: Vec<_> = (0..supers)
                .map(|s| half::f16::from_f32(0.02 - s as f32 * 1e-3))
                .collect();
            let mut out = vec![0xAA; q4_row_bytes(nb, true)];
            let codes = KquantCodes {
                sc: &sc,
                m: &m,
                d: &d,
                dmin: &dmin,
            };
            repack_q4k_row(&packed, codes, k, &mut out);
            for e in blocks * 32..nb * 32 {
                let got = q4_weight_in(&out, nb, true, e);
                assert_eq!(got, (0, 0.0, 0.0), "k {k} padding element {e}");
            }
            for (e, &u) in nibbles.iter().enumerate() {
                let (v, s, o) = q4_weight_in(&out, nb, true, e);
                let b = e / 32;
                let (d, dmin) = (d[b / 8].to_f32(), dmin[b / 8].to_f32());
                let want = d * sc[b] as f32 * u as f32 - dmin * m[b] as f32;
                assert_eq!(v, u as i8 - 8, "k {k} element {e}");
                assert_eq!(s, d * sc[b] as f32, "k {k} element {e}");
                let (got, tolerance) = (v as f32 * s + o, 1e-6 * want.abs().max(1.0));
                assert!((got - want).abs() <= tolerance, "k {k} element {e}");
            }
            // Decoded ahead (a prefill's): row 1 of a matrix whose row 0 is other bytes.
            let data = [vec![0x5C; out.len()], out].concat();
            let w = Q4Ref {
                data: &data,
                rows: 2,
                cols: k,
                kquant: true,
                decoded: None,
            };
            let (mut scales, mut mins) = (vec![f32::NAN; nb], vec![f32::NAN; nb]);
            decode_kquant_rows(w, 1, &mut scales, &mut mins);
            let decoded = DecodedCodes {
                first: 1,
                blocks: nb,
                scales: &scales,
                mins: &mins,
            };
            let (scales, mins) = decoded.row(1);
            for b in 0..nb {
                let want = match b < blocks {
                    true => (
                        d[b / 8].to_f32() * sc[b] as f32,
                        dmin[b / 8].to_f32() * m[b] as f32,
                    ),
                    false => (0.0, 0.0),
                };
                assert_eq!((scales[b], mins[b]), want, "k {k} block {b}");
            }
        }
    }
}
