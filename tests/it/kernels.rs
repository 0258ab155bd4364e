//! Every per-ISA kernel against its generic twin on random inputs, including odd sizes and
//! tails (randomized property tests: many shapes and values per kernel). A tier this CPU
//! lacks is skipped at run time with a note on stderr.

use half::f16;

use qwen2_edge::backend::native::kernels::pool::Pool;
use qwen2_edge::backend::native::kernels::q6k::{self, Q6Bundle, Q6Ref};
use qwen2_edge::backend::native::kernels::quant::{
    self, padded_blocks, KquantCodes, Q4Ref, Q8Ref, QActs, BLOCK, KQUANT_SUPER_BLOCK,
    Q4_BLOCK_BYTES,
};
use qwen2_edge::backend::native::kernels::{
    available, generic, tiers, Kernels, MatData, MatRef, Rows, Scratch, GENERIC,
};

/// xorshift32: reproducible inputs without a dependency.
struct Rng(u32);

impl Rng {
    fn next(&mut self) -> u32 {
        let mut s = self.0;
        s ^= s << 13;
        s ^= s >> 17;
        s ^= s << 5;
        self.0 = s;
        s
    }
    fn below(&mut self, n: usize) -> usize {
        self.next() as usize % n
    }
    fn float(&mut self) -> f32 {
        (self.next() % 20001) as f32 / 10000.0 - 1.0
    }
    fn floats(&mut self, n: usize, scale: f32) -> Vec<f32> {
        (0..n).map(|_| self.float() * scale).collect()
    }
}

/// The SIMD tiers this CPU has (generic excluded), with a visible note for the others.
fn simd_tiers(test: &str) -> Vec<&'static Kernels> {
    let mut out = Vec::new();
    for (k, ok) in tiers() {
        if k.name == "generic" {
            continue;
        }
        if ok {
            out.push(k);
        } else {
            use std::io::Write;
            let _ = writeln!(
                std::io::stderr(),
                "{test}: tier {} skipped: this CPU lacks its features",
                k.name
            );
        }
    }
    out
}

/// Sizes with every kind of tail: tiny, odd, around vector widths and block groups.
fn sizes(rng: &mut Rng) -> Vec<usize> {
    // 384 and 1408: a row of one twelve-block group, and one ending in such a tail after two
    // whole groups (as 896 after one), which the AVX-512 tier loads with plain loads.
    let mut v = vec![
        1, 2, 3, 7, 8, 15, 16, 17, 31, 32, 33, 63, 64, 65, 100, 128, 384, 513, 896, 1408,
    ];
    v.extend((0..12).map(|_| 1 + rng.below(1500)));
    v
}

fn close(a: f32, b: f32, tol: f32, what: &str) {
    assert!(
        (a - b).abs() <= tol * (1.0 + b.abs()),
        "{what}: {a} vs generic {b}"
    );
}

#[test]
fn expected_tier_is_picked() {
    // CI names the tier a machine must pick as its best (under qemu: `neon` for
    // QEMU_CPU=cortex-a72, `neon-dotprod` for QEMU_CPU=max), so a detection bug cannot turn
    // every comparison here into a silent skip or run the wrong tier.
    if let Ok(name) = std::env::var("QWEN2_EDGE_EXPECT_KERNELS") {
        let best = qwen2_edge::backend::native::kernels::available()[0].name;
        assert_eq!(best, name, "this CPU's best kernel tier");
    }
}

#[test]
fn every_tier_provides_every_kernel() {
    // `bench`, `info` and `serve` report a tier's generic fallbacks; every tier compiled for
    // this architecture (whether or not this CPU runs it) must have none.
    for (k, _) in tiers() {
        assert!(
            k.fallbacks().is_empty(),
            "tier {} falls back to generic for {:?}",
            k.name,
            k.fallbacks()
        );
    }
}

#[test]
fn grouped_attention_kernels_match_naive_sums() {
    // Every tier's scores and value sums over them, for query heads sharing one key/value
    // head: Qwen2's groups (6, 7; 8 takes two head blocks) and odd ones, head widths of the
    // models (64, 128), others a tier may special-case (16, 32) and tails (24, 80: a partial
    // column pass on every tier), cached positions around the 16-key blocks of the scores
    // (fewer, a whole number of them, one over) and random ones up to 40. Strides wider than
    // the rows, as in the attention scratch. Every tier including generic against plain f64
    // sums.
    let mut rng = Rng(7);
    let mut tiers = simd_tiers("grouped_attention_kernels_match_naive_sums");
    tiers.push(&GENERIC);
    for k in tiers {
        let shapes = [
            (7, 64),
            (6, 128),
            (8, 64),
            (1, 24),
            (3, 80),
            (2, 16),
            (4, 32),
        ];
        let cases: Vec<((usize, usize), usize)> = shapes
            .into_iter()
            .flat_map(|s| [1, 15, 16, 17, 32, 33, 1 + rng.below(40)].map(|n| (s, n)))
            .collect();
        for ((m, width), n) in cases {
            let (q_stride, s_stride, o_stride) = (width + 3, n + 5, 2 * width);
            let q = rng.floats((m - 1) * q_stride + width, 1.0);
            let keys = rng.floats(n * width, 1.0);
            let values = rng.floats(n * width, 1.0);
            let mut scores = vec![f32::NAN; (m - 1) * s_stride + n];
            (k.grouped_scores)(
                &q,
                q_stride,
                m,
                &keys,
                n,
                width,
                0.125,
                &mut scores,
                s_stride,
            );
            let mut out = vec![f32::NAN; (m - 1) * o_stride + width];
            (k.grouped_mix)(&scores, s_stride, m, &values, n, width, &mut out, o_stride);
            let what = format!("{} heads={m} width={width} n={n}", k.name);
            for i in 0..m {
                for j in 0..n {
                    let want: f64 = (0..width)
                        .map(|d| q[i * q_stride + d] as f64 * keys[j * width + d] as f64)
                        .sum::<f64>()
                        * 0.125;
                    close(
                        scores[i * s_stride + j],
                        want as f32,
                        1e-5,
                        &format!("score {what}"),
                    );
                }
                for d in 0..width {
                    let want: f64 = (0..n)
                        .map(|t| scores[i * s_stride + t] as f64 * values[t * width + d] as f64)
                        .sum();
                    close(
                        out[i * o_stride + d],
                        want as f32,
                        1e-5,
                        &format!("mix {what}"),
                    );
                }
            }
        }
    }
}

#[test]
fn float_kernels_match_generic() {
    let mut rng = Rng(1);
    for k in simd_tiers("float_kernels_match_generic") {
        for n in sizes(&mut rng) {
            let a = rng.floats(n, 2.0);
            let b = rng.floats(n, 2.0);
            let what = format!("{} n={n}", k.name);
            close(
                (k.dot_f32)(&a, &b),
                generic::dot_f32(&a, &b),
                1e-4,
                &format!("dot {what}"),
            );

            // Value sums over a head of n outputs (64 in the model: one whole pass; other
            // widths take the tail path) and 1..=9 positions; checked against a naive sum.
            let positions = 1 + n % 9;
            let p = rng.floats(positions, 1.0);
            let rows = rng.floats(positions * n, 2.0);
            for (k, width) in [(k, n), (k, 64), (&GENERIC, n)] {
                let rows = &rows[..positions * width.min(n)];
                let width = width.min(n);
                let mut y1 = rng.floats(width, 1.0);
                let mut naive = y1.clone();
                (k.weighted_sum)(&p, rows, &mut y1);
                for (t, &pt) in p.iter().enumerate() {
                    for (o, &v) in naive.iter_mut().zip(&rows[t * width..]) {
                        *o += pt * v;
                    }
                }
                for (p, q) in y1.iter().zip(&naive) {
                    close(*p, *q, 1e-5, &format!("weighted_sum {what} width={width}"));
                }
            }

            let h: Vec<f16> = a.iter().map(|&x| f16::from_f32(x)).collect();
            let mut y1 = rng.floats(n, 1.0);
            let mut y2 = y1.clone();
            (k.axpy_f16)(-0.61, &h, &mut y1);
            generic::axpy_f16(-0.61, &h, &mut y2);
            for (p, q) in y1.iter().zip(&y2) {
                close(*p, *q, 1e-6, &format!("axpy_f16 {what}"));
            }

            let (mut w1, mut w2) = (vec![0.0; n], vec![0.0; n]);
            (k.widen_f16)(&h, &mut w1);
            generic::widen_f16(&h, &mut w2);
            assert_eq!(w1, w2, "widen_f16 {what}");

            let mut g1 = rng.floats(n, 12.0);
            let mut g2 = g1.clone();
            (k.silu_mul)(&mut g1, &b);
            generic::silu_mul(&mut g2, &b);
            for (p, q) in g1.iter().zip(&g2) {
                close(*p, *q, 1e-5, &format!("silu_mul {what}"));
            }

            let w = rng.floats(n, 1.5);
            let (mut n1, mut n2) = (vec![0.0; n], vec![0.0; n]);
            (k.rmsnorm)(&a, &w, 1e-6, &mut n1);
            generic::rmsnorm(&a, &w, 1e-6, &mut n2);
            for (p, q) in n1.iter().zip(&n2) {
                close(*p, *q, 1e-5, &format!("rmsnorm {what}"));
            }

            // RoPE on an even-width head: cos/sin of half the width.
            let half = n / 2;
            let (cos, sin): (Vec<f32>, Vec<f32>) = (0..half)
                .map(|i| ((i as f32 * 0.3).cos(), (i as f32 * 0.3).sin()))
                .unzip();
            let mut r1 = a[..2 * half].to_vec();
            let mut r2 = r1.clone();
            (k.rope)(&mut r1, &cos, &sin);
            generic::rope(&mut r2, &cos, &sin);
            for (p, q) in r1.iter().zip(&r2) {
                close(*p, *q, 1e-6, &format!("rope {what}"));
            }

            let mut s1 = rng.floats(n, 30.0);
            if n > 3 {
                s1[n / 2] = f32::NEG_INFINITY;
            }
            let mut s2 = s1.clone();
            (k.softmax)(&mut s1);
            generic::softmax(&mut s2);
            for (p, q) in s1.iter().zip(&s2) {
                close(*p, *q, 1e-5, &format!("softmax {what}"));
            }
        }
    }
}

#[test]
fn matrix_vector_products_match_generic() {
    let mut rng = Rng(2);
    for k in simd_tiers("matrix_vector_products_match_generic") {
        for cols in sizes(&mut rng) {
            let rows = 1 + rng.below(9);
            let w = rng.floats(rows * cols, 1.0);
            let x = rng.floats(cols, 3.0);
            let (mut o1, mut o2) = (vec![0.0; rows], vec![0.0; rows]);
            (k.gemv_f32)(&w, &x, &mut o1);
            generic::gemv_f32(&w, &x, &mut o2);
            for (p, q) in o1.iter().zip(&o2) {
                close(*p, *q, 1e-4, &format!("gemv_f32 {} {rows}x{cols}", k.name));
            }
            let h: Vec<f16> = w.iter().map(|&v| f16::from_f32(v)).collect();
            (k.gemv_f16)(&h, &x, &mut o1);
            generic::gemv_f16(&h, &x, &mut o2);
            for (p, q) in o1.iter().zip(&o2) {
                close(*p, *q, 1e-4, &format!("gemv_f16 {} {rows}x{cols}", k.name));
            }
            // Rows taken in tiles sum exactly as a row alone.
            for (r, &p) in o1.iter().enumerate() {
                let mut one = [0.0];
                (k.gemv_f16)(&h[r * cols..(r + 1) * cols], &x, &mut one);
                assert_eq!(p.to_bits(), one[0].to_bits(), "gemv_f16 {} row {r}", k.name);
            }
        }
    }
}

/// Random int8 / int4 matrices in the bundle layouts, repacked (int4 also as int4k, the same
/// nibbles with random K-quant codes), and a quantized activation.
struct Quantized {
    rows: usize,
    cols: usize,
    q8: Vec<u8>,
    q8_scales: Vec<f32>,
    q4: Vec<u8>,
    q4k: Vec<u8>,
    q6: Vec<u8>,
    acts: QActs,
}

impl Quantized {
    fn q6(&self) -> Q6Ref<'_> {
        Q6Ref {
            data: &self.q6,
            rows: self.rows,
            cols: self.cols,
        }
    }

    fn q4(&self, kquant: bool) -> Q4Ref<'_> {
        Q4Ref {
            data: if kquant { &self.q4k } else { &self.q4 },
            rows: self.rows,
            cols: self.cols,
            kquant,
            decoded: None,
        }
    }
}

fn quantized(rng: &mut Rng, rows: usize, cols: usize) -> Quantized {
    let nb = padded_blocks(cols);
    let mut q8 = vec![0; rows * nb * BLOCK];
    let mut q4 = vec![0; rows * nb * Q4_BLOCK_BYTES];
    let q4k_row = quant::q4_row_bytes(nb, true);
    let mut q4k = vec![0; rows * q4k_row];
    let q6_row = q6k::q6_row_bytes(nb);
    let mut q6 = vec![0; rows * q6_row];
    let blocks = cols.div_ceil(BLOCK);
    for r in 0..rows {
        let src: Vec<i8> = (0..cols)
            .map(|_| (rng.below(255) as i32 - 127) as i8)
            .collect();
        quant::repack_q8_row(&src, &mut q8[r * nb * BLOCK..(r + 1) * nb * BLOCK]);
        let mut packed: Vec<u8> = (0..blocks * 16).map(|_| rng.next() as u8).collect();
        // Padding nibbles past `cols` are 8 (zero), as the exporter writes them.
        for e in cols..blocks * 32 {
            let byte = &mut packed[e / 2];
            *byte = if e % 2 == 0 {
                (*byte & 0xF0) | 8
            } else {
                (*byte & 0x0F) | 0x80
            };
        }
        let scales = rng.floats(blocks, 0.05);
        quant::repack_q4_row(
            &packed,
            &scales,
            cols,
            &mut q4[r * nb * Q4_BLOCK_BYTES..(r + 1) * nb * Q4_BLOCK_BYTES],
        );
        // Every 6-bit code value; super-block scales of the exporter's magnitude (a code step
        // of the largest scale / 63).
        let sc: Vec<u8> = (0..blocks).map(|_| rng.below(64) as u8).collect();
        let m: Vec<u8> = (0..blocks).map(|_| rng.below(64) as u8).collect();
        let supers = blocks.div_ceil(KQUANT_SUPER_BLOCK);
        let small = |rng: &mut Rng| f16::from_f32(rng.floats(1, 1e-3)[0].abs());
        let d: Vec<f16> = (0..supers).map(|_| small(rng)).collect();
        let dmin: Vec<f16> = (0..supers).map(|_| small(rng)).collect();
        let codes = KquantCodes {
            sc: &sc,
            m: &m,
            d: &d,
            dmin: &dmin,
        };
        quant::repack_q4k_row(
            &packed,
            codes,
            cols,
            &mut q4k[r * q4k_row..(r + 1) * q4k_row],
        );
    }
    for r in 0..rows {
        // Every 6-bit value and every scale code (GGUF's Q6_K uses -128); padding values 32
        // (zero), as the exporter writes them.
        let u: Vec<u8> = (0..blocks * 32)
            .map(|e| if e < cols { rng.below(64) as u8 } else { 32 })
            .collect();
        let (low, high) = q6k::bundle_bits(&u);
        let sc: Vec<i8> = (0..2 * blocks)
            .map(|_| (rng.below(256) as i32 - 128) as i8)
            .collect();
        let supers = (2 * blocks).div_ceil(q6k::Q6_SUPER_BLOCK);
        let d: Vec<f16> = (0..supers)
            .map(|_| f16::from_f32(rng.floats(1, 1e-4)[0].abs()))
            .collect();
        let src = Q6Bundle {
            low: &low,
            high: &high,
            sc: &sc,
            d: &d,
        };
        q6k::repack_q6k_row(src, cols, &mut q6[r * q6_row..(r + 1) * q6_row]);
    }
    let mut x = rng.floats(cols, 4.0);
    if cols > 40 {
        x[cols / 3] = 60.0; // an outlier channel, as real activations have
        x[5..37].fill(0.0); // an all-zero block (scale 0)
    }
    let mut acts = QActs::new(cols, 1);
    let (q, s, z) = acts.row_mut(0);
    generic::quantize_row(&x, q, s, z);
    acts.rows = 1;
    acts.fill_block_sums();
    acts.fill_half_sums();
    Quantized {
        rows,
        cols,
        q8,
        q8_scales: rng.floats(rows, 0.01),
        q4,
        q4k,
        q6,
        acts,
    }
}

/// The same random weights in every format the linear layers take.
struct AllFormats {
    q: Quantized,
    w32: Vec<f32>,
    w16: Vec<f16>,
}

impl AllFormats {
    fn new(rng: &mut Rng, rows: usize, cols: usize) -> Self {
        let q = quantized(rng, rows, cols);
        let w32 = rng.floats(rows * cols, 1.0);
        let w16 = w32.iter().map(|&v| f16::from_f32(v)).collect();
        Self { q, w32, w16 }
    }

    fn matrices(&self) -> [MatRef<'_>; 6] {
        let (rows, cols) = (self.q.rows, self.q.cols);
        [
            MatData::F32(&self.w32),
            MatData::F16(&self.w16),
            MatData::Q8 {
                data: &self.q.q8,
                scales: &self.q.q8_scales,
            },
            MatData::Q4 {
                data: &self.q.q4,
                kquant: false,
            },
            MatData::Q4 {
                data: &self.q.q4k,
                kquant: true,
            },
            MatData::Q6 { data: &self.q.q6 },
        ]
        .map(|data| MatRef { data, rows, cols })
    }
}

#[test]
fn quantized_products_match_generic() {
    let mut rng = Rng(3);
    for k in simd_tiers("quantized_products_match_generic") {
        for cols in sizes(&mut rng) {
            let rows = 2 + rng.below(8);
            let m = quantized(&mut rng, rows, cols);
            let q8 = Q8Ref {
                data: &m.q8,
                scales: &m.q8_scales,
                rows: m.rows,
                cols: m.cols,
            };
            // A sub-range of rows, as the pool hands them out.
            let first = 1;
            let n = rows - first;
            let (mut o1, mut o2) = (vec![0.0; n], vec![0.0; n]);
            (k.gemv_q8)(q8, first, m.acts.row(0), &mut o1);
            generic::gemv_q8(q8, first, m.acts.row(0), &mut o2);
            for (p, q) in o1.iter().zip(&o2) {
                close(*p, *q, 1e-4, &format!("gemv_q8 {} {rows}x{cols}", k.name));
            }
            for kquant in [false, true] {
                let q4 = m.q4(kquant);
                (k.gemv_q4)(q4, first, m.acts.row(0), &mut o1);
                generic::gemv_q4(q4, first, m.acts.row(0), &mut o2);
                for (p, q) in o1.iter().zip(&o2) {
                    let what = format!("gemv_q4 (int4k {kquant}) {} {rows}x{cols}", k.name);
                    close(*p, *q, 1e-4, &what);
                }
            }
            (k.gemv_q6)(m.q6(), first, m.acts.row(0), &mut o1);
            generic::gemv_q6(m.q6(), first, m.acts.row(0), &mut o2);
            for (p, q) in o1.iter().zip(&o2) {
                close(*p, *q, 1e-4, &format!("gemv_q6 {} {rows}x{cols}", k.name));
            }
        }
    }
}

#[test]
fn activation_quantization_is_identical_on_every_tier() {
    let mut rng = Rng(4);
    for k in simd_tiers("activation_quantization_is_identical_on_every_tier") {
        for n in sizes(&mut rng) {
            let x = rng.floats(n, 10.0);
            let (mut a, mut b) = (QActs::new(n, 1), QActs::new(n, 1));
            {
                let (q, s, z) = a.row_mut(0);
                (k.quantize_row)(&x, q, s, z);
            }
            let (q, s, z) = b.row_mut(0);
            generic::quantize_row(&x, q, s, z);
            assert_eq!(a.q, b.q, "{} n={n}", k.name);
            assert_eq!(a.scales, b.scales, "{} n={n}", k.name);
            assert_eq!(a.sums, b.sums, "{} n={n}", k.name);
        }
        // Blocks with NaN, infinities, a subnormal maximum (127 / amax overflows) and zeros.
        let mut x = rng.floats(128, 10.0);
        x[3] = f32::NAN;
        x[40] = f32::INFINITY;
        x[41] = f32::NEG_INFINITY;
        x[64..96].fill(0.0);
        x[96..128].fill(1e-40);
        x[100] = -2e-40;
        let (mut a, mut b) = (QActs::new(128, 1), QActs::new(128, 1));
        {
            let (q, s, z) = a.row_mut(0);
            (k.quantize_row)(&x, q, s, z);
        }
        let (q, s, z) = b.row_mut(0);
        generic::quantize_row(&x, q, s, z);
        assert_eq!(a.q, b.q, "{} special values", k.name);
        assert_eq!(
            a.scales.iter().map(|s| s.to_bits()).collect::<Vec<_>>(),
            b.scales.iter().map(|s| s.to_bits()).collect::<Vec<_>>(),
            "{} special values",
            k.name
        );
        assert_eq!(a.sums, b.sums, "{} special values", k.name);
    }
}

#[test]
fn quantized_product_is_the_dequantized_product() {
    // The generic int8/int4 products equal the f32 product of the dequantized weights and
    // activations (up to float rounding): the lane layout and the unsigned-weight
    // correction lose nothing.
    let mut rng = Rng(5);
    for cols in [1, 33, 100, 896] {
        let m = quantized(&mut rng, 3, cols);
        let row = m.acts.row(0);
        let nb = padded_blocks(cols);
        let x: Vec<f32> = (0..cols)
            .map(|e| {
                let (b, within) = (e / BLOCK, e % BLOCK);
                let first = b / quant::GROUP * quant::GROUP;
                let lanes = quant::GROUP.min(nb - first);
                let at = first * BLOCK + quant::lane_offset(lanes, b - first, within);
                row.q[at] as f32 * row.scales[b]
            })
            .collect();
        let q8 = Q8Ref {
            data: &m.q8,
            scales: &m.q8_scales,
            rows: 3,
            cols,
        };
        let mut out = vec![0.0; 3];
        generic::gemv_q8(q8, 0, row, &mut out);
        for (r, &got) in out.iter().enumerate() {
            let want: f32 = (0..cols)
                .map(|e| quant::q8_weight(q8.row(r), e) as f32 * m.q8_scales[r] * x[e])
                .sum();
            close(got, want, 1e-4, "q8 vs dequantized");
        }
        for kquant in [false, true] {
            let q4 = m.q4(kquant);
            generic::gemv_q4(q4, 0, row, &mut out);
            for (r, &got) in out.iter().enumerate() {
                let want: f32 = (0..cols)
                    .map(|e| {
                        let (q, s, offset) = quant::q4_weight_in(q4.row(r), nb, kquant, e);
                        (q as f32 * s + offset) * x[e]
                    })
                    .sum();
                close(
                    got,
                    want,
                    1e-4,
                    &format!("q4 (int4k {kquant}) vs dequantized"),
                );
            }
        }
        let q6 = m.q6();
        generic::gemv_q6(q6, 0, row, &mut out);
        for (r, &got) in out.iter().enumerate() {
            let want: f32 = (0..cols)
                .map(|e| {
                    let (u, sc, d) = q6k::q6_weight(q6.row(r), nb, e);
                    d * sc as f32 * (u as f32 - 32.0) * x[e]
                })
                .sum();
            close(got, want, 1e-4, "q6 vs dequantized");
        }
    }
}

#[test]
fn pooled_linear_layers_match_generic() {
    // The composite path (pool split, prefill GEMM over several rows) on each tier against
    // the generic tier on one thread.
    let mut rng = Rng(6);
    let pool = Pool::new(2).unwrap();
    let single = Pool::new(1).unwrap();
    for k in simd_tiers("pooled_linear_layers_match_generic") {
        for (rows_out, cols, m) in [
            (37, 100, 1),
            (300, 896, 1),
            (37, 100, 5),
            (130, 64, 3),
            (45, 896, 9),
            (40, 896, 2),
            (3, 33, 4),
            (70, 160, 37), // more activation rows than one prefill pass (tiling::ACT_BLOCK)
            (150, 96, 6),  // int4k decoded ahead in more than one block of rows a thread
            (20, 5200, 4), // a decode batch over wide rows: column chunks (x86_64 `strip!`)
        ] {
            let weights = AllFormats::new(&mut rng, rows_out, cols);
            let x = rng.floats(m * cols, 2.0);
            for w in weights.matrices() {
                let mut s1 = Scratch::new(cols, m, 2, true);
                let mut s2 = Scratch::new(cols, m, 1, true);
                let (mut o1, mut o2) = (vec![0.0; m * rows_out], vec![0.0; m * rows_out]);
                let rows = Rows::Prompt(m);
                k.linear(&pool, &w, None, &x, rows, &mut o1, &mut s1);
                GENERIC.linear(&single, &w, None, &x, rows, &mut o2, &mut s2);
                for (p, q) in o1.iter().zip(&o2) {
                    close(
                        *p,
                        *q,
                        1e-3,
                        &format!("linear {} {rows_out}x{cols} m={m}", k.name),
                    );
                }
            }
        }
    }
}

#[test]
fn avx_vnni_tier_equals_avx2_tier_bit_for_bit() {
    // `avx2-vnni` only replaces `vpmaddubsw` + `vpmaddwd` by `vpdpbusd`: each block's integer
    // dot product is exact in both and the float epilogue the same, so the two tiers' int8 and
    // int4 products (GEMV, decode batch and prefill tiles) must agree exactly.
    let runnable = |name: &str| tiers().into_iter().find(|(k, ok)| k.name == name && *ok);
    let (Some((vnni, _)), Some((avx2, _))) = (runnable("avx2-vnni"), runnable("avx2-fma")) else {
        eprintln!("avx_vnni_tier_equals_avx2_tier_bit_for_bit skipped: this CPU lacks AVX-VNNI");
        return;
    };
    let mut rng = Rng(11);
    let pool = Pool::new(2).unwrap();
    let shapes = [
        (37, 100, 1),
        (45, 896, 4),
        (130, 64, 3),
        (70, 160, 37),
        (20, 5200, 4),
    ];
    for (rows_out, cols, m) in shapes {
        let weights = AllFormats::new(&mut rng, rows_out, cols);
        let x = rng.floats(m * cols, 2.0);
        for w in weights.matrices().into_iter().filter(|w| w.is_quantized()) {
            for rows in [Rows::Prompt(m), Rows::Batch(m)] {
                let outs = [vnni, avx2].map(|k| {
                    let mut scratch = Scratch::new(cols, m, 2, true);
                    let mut out = vec![0.0; m * rows_out];
                    k.linear(&pool, &w, None, &x, rows, &mut out, &mut scratch);
                    out.iter().map(|v| v.to_bits()).collect::<Vec<_>>()
                });
                assert_eq!(outs[0], outs[1], "{rows_out}x{cols} m={m}");
            }
        }
    }
}

#[test]
fn batched_rows_equal_single_rows() {
    // Batched decoding runs one token of each of several sequences through one product: each
    // row must come out bit for bit as if it ran alone, on every tier (generic included) and
    // weight type, or a sequence's greedy output would depend on its batch.
    let mut rng = Rng(7);
    let pool = Pool::new(2).unwrap();
    for k in available() {
        // m > 4: int4k's codes decoded ahead (ops.rs), in two blocks of rows for 150.
        let shapes = [
            (37, 100, 2),
            (130, 64, 3),
            (45, 896, 4),
            (40, 896, 2), // int4k: 896-wide rows end in 12 blocks (avx2.rs `kquant_group`)
            (70, 160, 9),
            (150, 96, 6),
            // Rows wider than 5,120 columns: the AVX2 tiers' strips take them in column chunks
            // (x86_64 `strip!`), against the one-row GEMV's whole rows.
            (20, 5200, 4),
            (11, 8960, 3),
        ];
        for (rows_out, cols, m) in shapes {
            let weights = AllFormats::new(&mut rng, rows_out, cols);
            let x = rng.floats(m * cols, 2.0);
            for w in weights.matrices() {
                let mut scratch = Scratch::new(cols, m, 2, true);
                let mut batched = vec![0.0; m * rows_out];
                k.linear(
                    &pool,
                    &w,
                    None,
                    &x,
                    Rows::Batch(m),
                    &mut batched,
                    &mut scratch,
                );
                for r in 0..m {
                    let mut single = vec![0.0; rows_out];
                    let row = &x[r * cols..(r + 1) * cols];
                    k.linear(
                        &pool,
                        &w,
                        None,
                        row,
                        Rows::Batch(1),
                        &mut single,
                        &mut scratch,
                    );
                    let got = &batched[r * rows_out..(r + 1) * rows_out];
                    for (j, (a, b)) in got.iter().zip(&single).enumerate() {
                        assert_eq!(
                            a.to_bits(),
                            b.to_bits(),
                            "{} {rows_out}x{cols} batch {m}: row {r} column {j}: {a} vs {b} alone",
                            k.name
                        );
                    }
                }
            }
        }
    }
}

/// Not a test: a fixed amount of single-thread GEMV work for `perf stat` (cycles per byte of
/// weights, independent of other processes on the machine):
/// `QWEN2_EDGE_STREAM=int4:20 perf stat -e cycles:u cargo test --release --test it -- --ignored kernels::stream`.
#[test]
#[ignore]
fn stream() {
    let spec = std::env::var("QWEN2_EDGE_STREAM").unwrap_or_else(|_| "int4:10".into());
    let (fmt, iters) = spec.split_once(':').unwrap();
    let iters: usize = iters.parse().unwrap();
    let k = match std::env::var("QWEN2_EDGE_TIER") {
        Ok(tier) => tiers().into_iter().find(|(k, _)| k.name == tier).unwrap().0,
        Err(_) => qwen2_edge::backend::native::kernels::available()[0],
    };
    let mut rng = Rng(9);
    let cols = 896;
    let nb = padded_blocks(cols);
    let x = rng.floats(cols, 1.0);
    let mut acts = QActs::new(cols, 1);
    {
        let (q, s, z) = acts.row_mut(0);
        generic::quantize_row(&x, q, s, z);
    }
    let bytes = 256 << 20;
    let t = std::time::Instant::now();
    // `iters` runs of one GEMV over `weight_bytes` of weights, reported as GB/s.
    let timed = |name: &str, weight_bytes: usize, gemv: &mut dyn FnMut()| {
        let t = std::time::Instant::now();
        for _ in 0..iters {
            gemv();
        }
        let rate = (iters * weight_bytes) as f64 / t.elapsed().as_secs_f64() / 1e9;
        eprintln!("{name} {rate:.2} GB/s");
    };
    match fmt {
        "int4" => {
            let rows = bytes / (nb * Q4_BLOCK_BYTES);
            let m = quantized(&mut rng, 1, cols);
            let len = rows * nb * Q4_BLOCK_BYTES;
            let data: Vec<u8> = m.q4.iter().copied().cycle().take(len).collect();
            let w = Q4Ref {
                data: &data,
                rows,
                cols,
                kquant: false,
                decoded: None,
            };
            let mut out = vec![0.0; rows];
            timed("int4", len, &mut || {
                (k.gemv_q4)(w, 0, acts.row(0), &mut out)
            });
        }
        "int8" => {
            let rows = bytes / (nb * BLOCK);
            let len = rows * nb * BLOCK;
            let data: Vec<u8> = (0..len).map(|i| (i * 7 % 251) as u8).collect();
            let scales = vec![0.01; rows];
            let w = Q8Ref {
                data: &data,
                scales: &scales,
                rows,
                cols,
            };
            let mut out = vec![0.0; rows];
            timed("int8", len, &mut || {
                (k.gemv_q8)(w, 0, acts.row(0), &mut out)
            });
        }
        _ => {
            let rows = bytes / (cols * 4);
            let data = rng.floats(rows * cols, 1.0);
            let mut out = vec![0.0; rows];
            timed("f32", rows * cols * 4, &mut || {
                (k.gemv_f32)(&data, &x, &mut out)
            });
        }
    }
    eprintln!("setup+run {:?}", t.elapsed());
}

/// The `safe!` wrappers' SAFETY claim, checked on the source of every tier (x86-64 and aarch64
/// alike, whatever this machine is): a tier's pulp token proves every CPU feature its kernels
/// enable. `#[target_feature]` takes string literals only, so the token's list (`simd_type!` in
/// each architecture's mod.rs) is the one list, and every feature string in a tier's file must
/// be a subset of its token's; code shared by an architecture's tiers, of all its tokens.
#[test]
fn every_kernel_enables_only_features_its_tier_token_proves() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("src/backend/native/kernels");
    let read = |path: &str| std::fs::read_to_string(dir.join(path)).expect(path);
    // Every string literal of the file that reads as a feature list: comma-separated names, one
    // of them a feature some token knows (so an unknown one such as `avx512dq` is caught).
    let feature_lists = |text: &str, known: &[&str]| -> Vec<Vec<String>> {
        let name = |f: &str| {
            !f.is_empty()
                && f.bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit())
        };
        text.split('"')
            .skip(1)
            .step_by(2)
            .map(|lit| lit.split(',').map(str::to_string).collect::<Vec<_>>())
            .filter(|list| {
                list.iter().all(|f| name(f)) && list.iter().any(|f| known.contains(&f.as_str()))
            })
            .collect()
    };
    for (arch, tiers) in [
        ("x86_64", &["avx2.rs", "avx2_vnni.rs", "avx512.rs"][..]),
        ("aarch64", &["neon.rs", "dotprod.rs"][..]),
    ] {
        let shared = read(&format!("{arch}/mod.rs"));
        let tokens = pulp_tokens(&shared);
        assert!(tokens.len() >= 2, "{arch}: tokens not found");
        let known: Vec<&str> = tokens.values().flatten().map(String::as_str).collect();
        let common: Vec<&str> = known
            .iter()
            .copied()
            .filter(|f| tokens.values().all(|t| t.iter().any(|g| g == f)))
            .collect();
        // The token declarations (and a token's own detection) are the list, not a use of it.
        let declares = |l: &str| {
            ["f!(\"", "FEATURES: &", "is_x86_feature_detected!"]
                .iter()
                .any(|d| l.contains(d))
        };
        let uses: String = shared.lines().filter(|l| !declares(l)).collect();
        for list in feature_lists(&uses, &known) {
            let extra: Vec<&String> = list
                .iter()
                .filter(|f| !common.contains(&f.as_str()))
                .collect();
            assert!(
                extra.is_empty(),
                "{arch}/mod.rs enables {extra:?}, not in every token"
            );
        }
        for tier in tiers {
            let text = read(&format!("{arch}/{tier}"));
            let token = text
                .lines()
                .find_map(|l| l.strip_prefix("type T = "))
                .and_then(|t| t.strip_suffix(';'))
                .unwrap_or_else(|| panic!("{arch}/{tier}: no `type T = Token;`"));
            let proven = &tokens[token];
            let lists = feature_lists(&text, &known);
            assert!(!lists.is_empty(), "{arch}/{tier}: no feature lists found");
            for list in lists {
                let extra: Vec<&String> = list.iter().filter(|f| !proven.contains(f)).collect();
                assert!(
                    extra.is_empty(),
                    "{arch}/{tier} enables {extra:?}, which {token} does not prove"
                );
            }
        }
    }
}

/// The tokens a `pulp::simd_type!` block declares, with their features.
fn pulp_tokens(text: &str) -> std::collections::HashMap<String, Vec<String>> {
    let mut tokens = std::collections::HashMap::new();
    let mut current: Option<(String, Vec<String>)> = None;
    for line in text.lines().map(str::trim) {
        if let Some(name) = line
            .strip_prefix("pub struct ")
            .and_then(|l| l.strip_suffix(" {"))
        {
            current = Some((name.to_string(), Vec::new()));
        } else if let (Some((_, features)), Some(at)) = (&mut current, line.find("f!(\"")) {
            let feature = line[at + 4..].split('"').next().unwrap_or_default();
            features.push(feature.to_string());
        } else if line == "}" {
            if let Some((name, features)) = current.take() {
                tokens.insert(name, features);
            }
        }
    }
    // Tokens of our own (a feature pulp does not know): `impl Name {` then
    // `const FEATURES: &'static str = "a,b";`.
    let mut owner = None;
    for line in text.lines().map(str::trim) {
        if let Some(name) = line
            .strip_prefix("impl ")
            .and_then(|l| l.strip_suffix(" {"))
        {
            owner = Some(name.to_string());
        } else if let (Some(name), Some(at)) = (&owner, line.find("FEATURES: &'static str = \"")) {
            let list = line[at..].split('"').nth(1).unwrap_or_default();
            tokens.insert(name.clone(), list.split(',').map(str::to_string).collect());
        }
    }
    tokens
}
