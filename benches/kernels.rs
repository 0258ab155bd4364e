//! Kernel benchmarks per ISA tier, reported as GB/s of weights streamed.
//!
//! `cargo bench --bench kernels` (filter with e.g. `-- gemv/int4`). The matrices are 256 MB
//! of weights each — more than the caches — so the figures are DRAM streaming rates, the
//! quantity that bounds decode speed. Each product runs once on one thread (the kernel), once
//! through `Kernels::linear` on a pool of 2 (the backend's decode path, with activation
//! quantization and the pool's hand-off included) and once more so for a decode step of four
//! sequences (`2t-batch4`: the same bytes, four activation rows; a rate below `2t`'s means the
//! batched step is bound by arithmetic, not memory). `gemm/…` times prefill products (128
//! tokens) in multiply-adds per second. Rows are the 0.5B's 896 wide; `QWEN2_EDGE_BENCH_COLS=1536
//! cargo bench --bench kernels` times the 1.5B's width instead. `attention/14x2x64@448` times one
//! layer's decode attention in cache, `attention/24x14x2x64@448` a whole step's from memory, with
//! f32 and f16 caches.

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use half::f16;

use qwen2_edge::backend::native::kernels::pool::Pool;
use qwen2_edge::backend::native::kernels::q6k::{self, Q6Bundle, Q6Ref};
use qwen2_edge::backend::native::kernels::quant::{self, padded_blocks, Q4Ref, Q8Ref, QActs};
use qwen2_edge::backend::native::kernels::{
    available, AttentionRows, AttentionShape, Kernels, KvRef, MatData, MatRef, Rows, Scratch,
};

/// The weight rows' width: the 0.5B's hidden size by default; `QWEN2_EDGE_BENCH_COLS` sets
/// another (the 1.5B's 1536: a tile shape can be fast at one width and not at another, as
/// `avx2-vnni`'s first decode GEMV was).
fn cols() -> usize {
    static COLS: std::sync::OnceLock<usize> = std::sync::OnceLock::new();
    *COLS.get_or_init(|| {
        let Ok(value) = std::env::var("QWEN2_EDGE_BENCH_COLS") else {
            return 896;
        };
        match value.parse::<usize>() {
            Ok(k) if k > 0 && k % 32 == 0 => k,
            _ => panic!("QWEN2_EDGE_BENCH_COLS={value:?}: a positive multiple of 32 expected"),
        }
    })
}
const TARGET_BYTES: usize = 256 << 20;

fn pseudo(n: usize, seed: u32) -> impl Iterator<Item = u32> {
    let mut s = seed.wrapping_mul(2_654_435_761).max(1);
    (0..n).map(move |_| {
        s ^= s << 13;
        s ^= s >> 17;
        s ^= s << 5;
        s
    })
}

fn floats(n: usize, seed: u32) -> Vec<f32> {
    pseudo(n, seed)
        .map(|v| (v % 2001) as f32 / 1000.0 - 1.0)
        .collect()
}

struct Weights {
    f32: Vec<f32>,
    f16: Vec<f16>,
    q8: Vec<u8>,
    q8_scales: Vec<f32>,
    q4: Vec<u8>,
    q6: Vec<u8>,
}

fn rows_for(bytes_per_row: usize) -> usize {
    TARGET_BYTES / bytes_per_row
}

/// Pseudo-random int4k codes of a row of `cols()` columns: 6-bit scale (and min) codes per
/// block and small f16 super-block scales.
fn kquant_codes(seed: u32) -> (Vec<u8>, Vec<f16>) {
    let codes = pseudo(cols() / 32, seed).map(|v| (v % 64) as u8).collect();
    let supers = floats((cols() / 32).div_ceil(quant::KQUANT_SUPER_BLOCK), seed + 1)
        .into_iter()
        .map(|v| f16::from_f32(v * 1e-3))
        .collect();
    (codes, supers)
}

/// The codes as `repack_q4k_row` takes them (the same codes for scales and mins).
fn kquant_view<'a>(codes: &'a [u8], supers: &'a [f16]) -> quant::KquantCodes<'a> {
    quant::KquantCodes {
        sc: codes,
        m: codes,
        d: supers,
        dmin: supers,
    }
}

/// One pseudo-random q6k row of `k` weights, repacked into `out`.
fn q6k_row(k: usize, seed: u32, out: &mut [u8]) {
    let low: Vec<u8> = pseudo(k / 2, seed).map(|v| v as u8).collect();
    let high: Vec<u8> = pseudo(k / 4, seed + 1).map(|v| v as u8).collect();
    let sc: Vec<i8> = pseudo(k / 16, seed + 2).map(|v| v as i8).collect();
    let d: Vec<f16> = floats((k / 16).div_ceil(q6k::Q6_SUPER_BLOCK), seed + 3)
        .into_iter()
        .map(|v| f16::from_f32(v * 1e-4))
        .collect();
    let src = Q6Bundle {
        low: &low,
        high: &high,
        sc: &sc,
        d: &d,
    };
    q6k::repack_q6k_row(src, k, out);
}

fn make(fmt: &str) -> (Weights, usize) {
    let mut w = Weights {
        f32: Vec::new(),
        f16: Vec::new(),
        q8: Vec::new(),
        q8_scales: Vec::new(),
        q4: Vec::new(),
        q6: Vec::new(),
    };
    let nb = padded_blocks(cols());
    let rows = match fmt {
        "f32" => {
            let rows = rows_for(cols() * 4);
            w.f32 = floats(rows * cols(), 1);
            rows
        }
        "f16" => {
            let rows = rows_for(cols() * 2);
            w.f16 = floats(rows * cols(), 2)
                .into_iter()
                .map(f16::from_f32)
                .collect();
            rows
        }
        "int8" => {
            let rows = rows_for(nb * 32);
            w.q8 = pseudo(rows * nb * 32, 3).map(|v| v as u8 | 1).collect();
            w.q8_scales = floats(rows, 4);
            rows
        }
        "q6k" => {
            let row_bytes = q6k::q6_row_bytes(nb);
            let rows = rows_for(row_bytes);
            w.q6 = vec![0; rows * row_bytes];
            for row in w.q6.chunks_exact_mut(row_bytes) {
                q6k_row(cols(), 8, row);
            }
            rows
        }
        _ => {
            let kquant = fmt == "int4k";
            let row_bytes = quant::q4_row_bytes(nb, kquant);
            let rows = rows_for(row_bytes);
            w.q4 = vec![0; rows * row_bytes];
            let packed: Vec<u8> = pseudo(cols() / 2, 5).map(|v| v as u8).collect();
            let scales = floats(cols() / 32, 6);
            let (codes, supers) = kquant_codes(7);
            for row in w.q4.chunks_exact_mut(row_bytes) {
                if kquant {
                    quant::repack_q4k_row(&packed, kquant_view(&codes, &supers), cols(), row);
                } else {
                    quant::repack_q4_row(&packed, &scales, cols(), row);
                }
            }
            rows
        }
    };
    (w, rows)
}

fn view<'a>(w: &'a Weights, fmt: &str, rows: usize) -> MatRef<'a> {
    let data = match fmt {
        "f32" => MatData::F32(&w.f32),
        "f16" => MatData::F16(&w.f16),
        "int8" => MatData::Q8 {
            data: &w.q8,
            scales: &w.q8_scales,
        },
        "q6k" => MatData::Q6 { data: &w.q6 },
        _ => MatData::Q4 {
            data: &w.q4,
            kquant: fmt == "int4k",
        },
    };
    MatRef {
        data,
        rows,
        cols: cols(),
    }
}

fn gemv(c: &mut Criterion) {
    let x = floats(cols(), 7);
    let x4 = floats(4 * cols(), 17);
    let mut acts = QActs::new(cols(), 1);
    {
        let (q, s, z) = acts.row_mut(0);
        quant::padded_blocks(cols());
        qwen2_edge::backend::native::kernels::generic::quantize_row(&x, q, s, z);
    }
    let pool = Pool::new(2).expect("pool");
    for fmt in ["int4", "int4k", "q6k", "int8", "f16", "f32"] {
        let (w, rows) = make(fmt);
        let bytes = match fmt {
            "f32" => rows * cols() * 4,
            "f16" => rows * cols() * 2,
            "int8" => rows * padded_blocks(cols()) * 32,
            "q6k" => rows * q6k::q6_row_bytes(padded_blocks(cols())),
            _ => rows * quant::q4_row_bytes(padded_blocks(cols()), fmt == "int4k"),
        };
        let mut out = vec![0.0f32; rows];
        let mut group = c.benchmark_group(format!("gemv/{fmt}"));
        group.throughput(Throughput::Bytes(bytes as u64));
        group.sample_size(10);
        for k in available() {
            group.bench_function(format!("{}/1t", k.name), |b| {
                b.iter(|| match fmt {
                    "f32" => (k.gemv_f32)(&w.f32, &x, &mut out),
                    "f16" => (k.gemv_f16)(&w.f16, &x, &mut out),
                    "int8" => {
                        let m = Q8Ref {
                            data: &w.q8,
                            scales: &w.q8_scales,
                            rows,
                            cols: cols(),
                        };
                        (k.gemv_q8)(m, 0, acts.row(0), &mut out)
                    }
                    "q6k" => {
                        let m = Q6Ref {
                            data: &w.q6,
                            rows,
                            cols: cols(),
                        };
                        (k.gemv_q6)(m, 0, acts.row(0), &mut out)
                    }
                    _ => {
                        let m = Q4Ref {
                            data: &w.q4,
                            rows,
                            cols: cols(),
                            kquant: fmt == "int4k",
                            decoded: None,
                        };
                        (k.gemv_q4)(m, 0, acts.row(0), &mut out)
                    }
                })
            });
            let m = view(&w, fmt, rows);
            let mut scratch = Scratch::new(cols(), 1, pool.threads(), false);
            group.bench_function(format!("{}/2t", k.name), |b| {
                b.iter(|| k.linear(&pool, &m, None, &x, Rows::Prompt(1), &mut out, &mut scratch))
            });
            // A decode step of four sequences: the same bytes, four rows of activations.
            let mut scratch4 = Scratch::new(cols(), 4, pool.threads(), false);
            let mut out4 = vec![0.0f32; 4 * rows];
            group.bench_function(format!("{}/2t-batch4", k.name), |b| {
                b.iter(|| {
                    k.linear(
                        &pool,
                        &m,
                        None,
                        &x4,
                        Rows::Batch(4),
                        &mut out4,
                        &mut scratch4,
                    )
                })
            });
        }
        group.finish();
    }
}

fn elementwise(c: &mut Criterion) {
    let n = 4864;
    let up = floats(n, 8);
    let mut gate = floats(n, 9);
    let mut group = c.benchmark_group("silu_mul/4864");
    group.throughput(Throughput::Elements(n as u64));
    for k in available() {
        group.bench_function(k.name, |b| {
            b.iter(|| {
                (k.silu_mul)(&mut gate, &up);
                gate[0] = 0.5;
            })
        });
    }
    group.finish();
    let x = floats(n, 10);
    let mut acts = QActs::new(n, 1);
    let mut group = c.benchmark_group("quantize_row/4864");
    group.throughput(Throughput::Elements(n as u64));
    for k in available() {
        group.bench_function(k.name, |b| {
            b.iter(|| {
                let (q, s, z) = acts.row_mut(0);
                (k.quantize_row)(&x, q, s, z)
            })
        });
    }
    group.finish();
}

/// Prefill products: 128 tokens through a 4864 × `cols()` matrix (a 0.5B gate projection by
/// default; the group is named by its shape), on a pool of 2, per format and tier; throughput
/// in multiply-adds.
fn gemm(c: &mut Criterion) {
    let (n, k, m) = (4864, cols(), 128);
    let pool = Pool::new(2).expect("pool");
    let x = floats(m * k, 11);
    let nb = padded_blocks(k);
    let packed: Vec<u8> = pseudo(k / 2, 12).map(|v| v as u8).collect();
    let scales = floats(k / 32, 13);
    let mut q4 = vec![0u8; n * nb * quant::Q4_BLOCK_BYTES];
    for row in q4.chunks_exact_mut(nb * quant::Q4_BLOCK_BYTES) {
        quant::repack_q4_row(&packed, &scales, k, row);
    }
    let k4 = quant::q4_row_bytes(nb, true);
    let mut q4k = vec![0u8; n * k4];
    let (codes, supers) = kquant_codes(17);
    for row in q4k.chunks_exact_mut(k4) {
        quant::repack_q4k_row(&packed, kquant_view(&codes, &supers), k, row);
    }
    let k6 = q6k::q6_row_bytes(nb);
    let mut q6 = vec![0u8; n * k6];
    for row in q6.chunks_exact_mut(k6) {
        q6k_row(k, 18, row);
    }
    let q8: Vec<u8> = pseudo(n * nb * 32, 14).map(|v| v as u8 | 1).collect();
    let q8_scales = floats(n, 15);
    let f32w = floats(n * k, 16);
    let mut out = vec![0.0f32; m * n];
    let mut group = c.benchmark_group(format!("gemm/{m}x{n}x{k}"));
    group.throughput(Throughput::Elements((m * n * k) as u64));
    group.sample_size(10);
    for kern in available() {
        for (fmt, data) in [
            (
                "int4",
                MatData::Q4 {
                    data: &q4,
                    kquant: false,
                },
            ),
            (
                "int4k",
                MatData::Q4 {
                    data: &q4k,
                    kquant: true,
                },
            ),
            ("q6k", MatData::Q6 { data: &q6 }),
            (
                "int8",
                MatData::Q8 {
                    data: &q8,
                    scales: &q8_scales,
                },
            ),
            ("f32", MatData::F32(&f32w)),
        ] {
            let w = MatRef {
                data,
                rows: n,
                cols: k,
            };
            let mut scratch = Scratch::new(k, m, pool.threads(), false);
            group.bench_function(format!("{fmt}/{}", kern.name), |b| {
                b.iter(|| kern.linear(&pool, &w, None, &x, Rows::Prompt(m), &mut out, &mut scratch))
            });
        }
    }
    group.finish();
}

/// The 0.5B's attention: 14 query heads over 2 key/value heads of 64.
fn attention_shape() -> AttentionShape {
    AttentionShape {
        heads: 14,
        kv_heads: 2,
        head_dim: 64,
        scale: 0.125,
        window: None,
        dual_chunk: None,
    }
}

/// One decode step's attention for one and for four sequences of the 0.5B (14 query heads over
/// 2 key/value heads of 64), each at 448 cached positions of its own f32 cache, on a pool of 2:
/// per layer of a decode step (the four in one call, as a batch's step makes it).
fn attention(c: &mut Criterion) {
    let shape = attention_shape();
    let (capacity, pos) = (512, 447);
    let pool = Pool::new(2).expect("pool");
    let cache_len = shape.kv_heads * capacity * shape.head_dim;
    let caches: Vec<_> = (0..4)
        .map(|s| (floats(cache_len, 11 + s), floats(cache_len, 21 + s)))
        .collect();
    let q = floats(4 * shape.heads * shape.head_dim, 13);
    let mut out = vec![0.0; 4 * shape.heads * shape.head_dim];
    let seq = |i: usize| AttentionRows {
        keys: KvRef::F32(&caches[i].0),
        values: KvRef::F32(&caches[i].1),
        capacity,
        first_pos: pos,
        rows: 1,
    };
    let (scores, head_major) = Kernels::attention_scratch(&shape, 4, &seq);
    let (mut scores, mut head_major) = (vec![0.0; scores], vec![0.0; head_major]);
    let mut group = c.benchmark_group("attention/14x2x64@448");
    for seqs in [1, 4] {
        group.throughput(Throughput::Elements((seqs * (pos + 1)) as u64));
        for k in available() {
            let name = if seqs == 1 {
                k.name.to_string()
            } else {
                format!("{}/batch{seqs}", k.name)
            };
            group.bench_function(name, |b| {
                b.iter(|| {
                    k.attention(
                        &pool,
                        &shape,
                        &q,
                        seqs,
                        &seq,
                        &mut scores,
                        &mut head_major,
                        &mut out,
                    )
                })
            });
        }
    }
    group.finish();
}

/// A whole decode step's attention of the 0.5B (24 layers, each with its own caches) for four
/// sequences at 448 positions: ~46 MB of f32 keys and values a step (23 MB in f16), read from
/// memory as the service's batched steps read them (`attention` above stays in cache).
fn attention_step(c: &mut Criterion) {
    let shape = attention_shape();
    let (layers, seqs, capacity, pos) = (24, 4, 512, 447);
    let pool = Pool::new(2).expect("pool");
    let cache_len = shape.kv_heads * capacity * shape.head_dim;
    let caches: Vec<_> = (0..layers * seqs)
        .map(|s| {
            (
                floats(cache_len, 31 + s as u32),
                floats(cache_len, 97 + s as u32),
            )
        })
        .collect();
    let halves = |v: &Vec<f32>| v.iter().map(|&x| f16::from_f32(x)).collect::<Vec<_>>();
    let caches_f16: Vec<_> = caches.iter().map(|(k, v)| (halves(k), halves(v))).collect();
    let q = floats(seqs * shape.heads * shape.head_dim, 13);
    let mut out = vec![0.0; seqs * shape.heads * shape.head_dim];
    let seq = |halved: bool, layer: usize, i: usize| {
        let at = layer * seqs + i;
        let (keys, values) = if halved {
            (KvRef::F16(&caches_f16[at].0), KvRef::F16(&caches_f16[at].1))
        } else {
            (KvRef::F32(&caches[at].0), KvRef::F32(&caches[at].1))
        };
        AttentionRows {
            keys,
            values,
            capacity,
            first_pos: pos,
            rows: 1,
        }
    };
    let (scores, head_major) = Kernels::attention_scratch(&shape, seqs, &|i| seq(true, 0, i));
    let (mut scores, mut head_major) = (vec![0.0; scores], vec![0.0; head_major]);
    let mut group = c.benchmark_group("attention/24x14x2x64@448");
    group.throughput(Throughput::Elements((layers * seqs * (pos + 1)) as u64));
    for k in available() {
        for halved in [false, true] {
            let cache = if halved { "f16" } else { "f32" };
            group.bench_function(format!("{}/{cache}/batch{seqs}", k.name), |b| {
                b.iter(|| {
                    for layer in 0..layers {
                        k.attention(
                            &pool,
                            &shape,
                            &q,
                            seqs,
                            &|i| seq(halved, layer, i),
                            &mut scores,
                            &mut head_major,
                            &mut out,
                        )
                    }
                })
            });
        }
    }
    group.finish();
}

criterion_group!(benches, gemv, gemm, elementwise, attention, attention_step);
criterion_main!(benches);
