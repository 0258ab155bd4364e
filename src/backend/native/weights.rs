//! A variant's weights, found by Hugging Face name through the weights table in bundle.json
//! and read from its `model.onnx.data`.
//!
//! * float32 / float16 matrices are byte ranges of the shared read-only map: nothing is
//!   copied (row-major `[out, in]` rows are already what the GEMV streams). Where the bytes
//!   cannot be viewed in place (a big-endian host, a misaligned offset) an owned f32 copy is
//!   made instead.
//! * int8 and int4 matrices used in products are repacked once at load into the lane layout
//!   of kernels/quant.rs, in anonymous memory (transparent huge pages requested: one TLB
//!   entry per 2 MiB while streaming ~0.4 GB per token). The rows are repacked in parallel
//!   straight from the map, and the source pages are then dropped from this process
//!   (`MADV_DONTNEED`; they stay in the page cache), so at no time is a second full copy of
//!   the weights resident.
//! * Embedding tables are only gathered from (one row per token): they stay in the map in
//!   their bundle layout, so only the rows a prompt touches become resident.
//! * Small tensors (norms, biases, scales) are copied into owned f32 vectors.
//! * With `mmap = false` (`--no-mmap`) the file is read into anonymous memory instead of being
//!   mapped: it costs the whole file in resident memory at load (and the embedding table stays
//!   resident), but nothing that happens to the file afterwards (truncated, rewritten, a disk
//!   error) can reach the running model as a SIGBUS.

use std::collections::BTreeMap;
use std::fs::File;
use std::io::Read;
use std::ops::Deref;
use std::sync::Arc;

use anyhow::{anyhow, bail, Context, Result};
use half::f16;
use memmap2::{Mmap, MmapMut};

use super::kernels::pool::Pool;
use super::kernels::q6k::{self, Q6_SUB_BLOCK, Q6_SUPER_BLOCK};
use super::kernels::quant::{self, padded_blocks, BLOCK, KQUANT_SUPER_BLOCK};
use super::kernels::{MatData, MatRef};
use crate::bundle::{Bundle, Variant, WeightEntry};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DType {
    F32,
    F16,
    /// int8, one f32 scale per row.
    Q8,
    /// int4 in blocks of 32 along the row, one f32 scale per block.
    Q4,
    /// int4k: 4-bit sub-blocks of 32 with 6-bit scale and min codes under f16 super-block
    /// scales (docs/bundle-format.md).
    Q4K,
    /// q6k: 6-bit values with int8 scale codes per 16 under f16 super-block scales.
    Q6K,
}

/// The variant's data file in memory: mapped from the file, or copied (`mmap = false`).
pub struct Source {
    bytes: Mmap,
    /// Pages of a file mapping can be dropped and fault back in from the file; those of a copy
    /// cannot (dropping them would zero them).
    file_backed: bool,
}

impl Deref for Source {
    type Target = [u8];

    fn deref(&self) -> &[u8] {
        &self.bytes
    }
}

pub struct WeightFile {
    map: Arc<Source>,
    table: BTreeMap<String, WeightEntry>,
    variant: String,
    pool: Arc<Pool>,
}

/// A weight matrix that stays valid as long as it lives (it holds its memory).
pub struct Matrix {
    storage: Storage,
    rows: usize,
    cols: usize,
}

enum Storage {
    Mapped {
        map: Arc<Source>,
        start: usize,
        len: usize,
        dtype: DType,
    },
    Owned(Vec<f32>),
    /// Bundle-layout int8 rows left in the map (embedding tables: gathered, never multiplied).
    MappedQ8Rows {
        map: Arc<Source>,
        start: usize,
        scales: Vec<f32>,
    },
    Q8 {
        data: Mmap,
        scales: Vec<f32>,
    },
    /// int4 in the lane layout, with int4k's codes in place of the scales (kernels/quant.rs).
    Q4 {
        data: Mmap,
        kquant: bool,
    },
    /// q6k in its lane layout (kernels/q6k.rs).
    Q6 {
        data: Mmap,
    },
}

impl Matrix {
    pub fn rows(&self) -> usize {
        self.rows
    }

    pub fn cols(&self) -> usize {
        self.cols
    }

    /// Whether products read this matrix in place from the bundle's map.
    pub fn is_mapped(&self) -> bool {
        matches!(self.storage, Storage::Mapped { .. })
    }

    /// For a table gathered row by row from the map (the embedding): drops the pages this
    /// process has mapped. The kernel maps a whole page-cache folio (up to 2 MiB) around each
    /// row a token touches, so without this the gathered rows pile up in RSS: 36 MiB of the
    /// demo model's 136 MiB int8 table after one 400-token answer, and more with every new
    /// token a long-running service sees. No-op for repacked or owned matrices.
    pub fn release_gathered_rows(&self) {
        match &self.storage {
            Storage::MappedQ8Rows { map, start, .. } => {
                release_pages(map, *start, self.rows * self.cols)
            }
            Storage::Mapped {
                map, start, len, ..
            } => release_pages(map, *start, *len),
            _ => {}
        }
    }

    /// Bytes a product with this matrix reads (its weights and scales).
    pub fn bytes(&self) -> usize {
        match &self.storage {
            Storage::Mapped { len, .. } => *len,
            Storage::Owned(v) => v.len() * 4,
            Storage::MappedQ8Rows { scales, .. } => self.rows * self.cols + scales.len() * 4,
            Storage::Q8 { data, scales } => data.len() + scales.len() * 4,
            Storage::Q4 { data, .. } | Storage::Q6 { data } => data.len(),
        }
    }

    pub fn view(&self) -> MatRef<'_> {
        let data = match &self.storage {
            Storage::Mapped {
                map,
                start,
                len,
                dtype,
            } => {
                let bytes = &map[*start..*start + *len];
                // Alignment and length were checked with `try_cast_slice` when the matrix was
                // made, and the map never moves, so these casts cannot fail.
                match dtype {
                    DType::F16 => MatData::F16(bytemuck::cast_slice(bytes)),
                    _ => MatData::F32(bytemuck::cast_slice(bytes)),
                }
            }
            Storage::Owned(v) => MatData::F32(v),
            Storage::MappedQ8Rows { map, start, scales } => MatData::Q8Rows {
                q: bytemuck::cast_slice(&map[*start..*start + self.rows * self.cols]),
                scales,
            },
            Storage::Q8 { data, scales } => MatData::Q8 { data, scales },
            Storage::Q4 { data, kquant } => MatData::Q4 {
                data,
                kquant: *kquant,
            },
            Storage::Q6 { data } => MatData::Q6 { data },
        };
        MatRef {
            data,
            rows: self.rows,
            cols: self.cols,
        }
    }

    /// A matrix of `ids`' rows of this one, in that order, in memory of its own (a draft
    /// model's LM head over part of the vocabulary): int8 rows requantized to int4 blocks as
    /// `WeightFile::matrix_as_int4` does (a draft's guesses are checked anyway). Other
    /// quantized rows keep their bytes, so a product gives each what the whole matrix gives it
    /// (their kernels sum each row alone); f16 rows are widened to f32. Each id must be below
    /// `rows`.
    pub fn select_rows_int8_as_int4(&self, ids: &[u32]) -> Result<Matrix> {
        let rows = ids.iter().map(|&id| id as usize);
        if let Some(bad) = rows.clone().find(|&r| r >= self.rows) {
            bail!("row {bad} of a matrix of {} rows", self.rows);
        }
        // Each selected row, made by `row(r, out)`, in consecutive rows of anonymous memory.
        let build = |row_bytes: usize, row: &dyn Fn(usize, &mut [u8])| -> Result<Mmap> {
            let mut out = anonymous(ids.len() * row_bytes)?;
            for (dst, r) in out.chunks_exact_mut(row_bytes).zip(rows.clone()) {
                row(r, dst);
            }
            Ok(out.make_read_only()?)
        };
        let copy_rows = |data: &[u8]| {
            let n = data.len() / self.rows;
            build(n, &|r, dst| dst.copy_from_slice(&data[r * n..(r + 1) * n]))
        };
        let storage = match (&self.storage, self.view().data) {
            (Storage::Q8 { data, scales }, _) => {
                let n = data.len() / self.rows;
                let q4_bytes = quant::q4_row_bytes(padded_blocks(self.cols), false);
                let requantize = |r: usize, dst: &mut [u8]| {
                    let mut values = vec![0; self.cols];
                    quant::unpack_q8_row(&data[r * n..(r + 1) * n], &mut values);
                    quant::requantize_q8_row_to_q4(&values, scales[r], dst);
                };
                Storage::Q4 {
                    data: build(q4_bytes, &requantize)?,
                    kquant: false,
                }
            }
            (Storage::Q4 { data, kquant }, _) => Storage::Q4 {
                data: copy_rows(data)?,
                kquant: *kquant,
            },
            (Storage::Q6 { data }, _) => Storage::Q6 {
                data: copy_rows(data)?,
            },
            (_, MatData::F32(v)) => Storage::Owned(
                rows.clone()
                    .flat_map(|r| &v[r * self.cols..(r + 1) * self.cols])
                    .copied()
                    .collect(),
            ),
            (_, MatData::F16(v)) => Storage::Owned(
                rows.clone()
                    .flat_map(|r| &v[r * self.cols..(r + 1) * self.cols])
                    .map(|x| x.to_f32())
                    .collect(),
            ),
            _ => bail!("an embedding table in the bundle's int8 rows is not a product's matrix"),
        };
        Ok(Matrix {
            storage,
            rows: ids.len(),
            cols: self.cols,
        })
    }
}

/// What an int4 matrix's blocks are scaled by: its f32 block scales (int4), or int4k's K-quant
/// codes of every row (`[rows, blocks]`, and `[rows, ceil(blocks / 8)]` super-block scales).
#[derive(Clone, Copy)]
enum Q4Codes<'a> {
    Scales(&'a [f32]),
    Kquant(quant::KquantCodes<'a>),
}

/// Where a quantized tensor's scales are (byte ranges of the data file, `(start, len)`).
struct Quant {
    bits: u32,
    scales: (usize, usize),
    /// int4k: where its codes are besides `scales`.
    kquant: Option<Kquant>,
    /// q6k: its top bits and super-block scales (`scales` holds its scale codes).
    q6k: Option<[(usize, usize); 2]>,
}

/// An int4k tensor's min codes (`None`: both codes packed per super-block in `Quant::scales`, as
/// the exporter writes them since 2026-12-06; `Some`: a byte per code, the scale codes in
/// `scales`) and the super-block scales of its scale and min codes.
#[derive(Clone, Copy)]
struct Kquant {
    min: Option<(usize, usize)>,
    d: (usize, usize),
    dmin: (usize, usize),
}

impl Quant {
    /// The ranges of rows `part` of `total` (every range holds the same bytes per row).
    fn rows(&self, total: usize, part: &std::ops::Range<usize>) -> Quant {
        let rows = |(start, len): (usize, usize)| {
            let per_row = len / total.max(1);
            (start + part.start * per_row, part.len() * per_row)
        };
        Quant {
            bits: self.bits,
            scales: rows(self.scales),
            kquant: self.kquant.map(|k| Kquant {
                min: k.min.map(rows),
                d: rows(k.d),
                dmin: rows(k.dmin),
            }),
            q6k: self.q6k.map(|parts| parts.map(rows)),
        }
    }
}

impl WeightFile {
    /// Maps (`mmap`) or reads the variant's data file.
    pub fn open(bundle: &Bundle, variant: &Variant, pool: Arc<Pool>, mmap: bool) -> Result<Self> {
        let path = bundle.path(&variant.data);
        let mut file =
            File::open(&path).with_context(|| format!("cannot open {}", path.display()))?;
        let map = if mmap {
            // SAFETY: the map is read-only and the bundle is a deployed artifact that nothing
            // writes while a model is loaded (its size and checksum were just verified; the
            // model store's files are read-only and never rewritten). A file truncated under
            // us anyway (by root, or a failing disk) would fault with SIGBUS: `mmap = false`
            // is for boxes that cannot rule that out.
            let bytes = unsafe { Mmap::map(&file) }
                .with_context(|| format!("cannot memory-map {}", path.display()))?;
            Source {
                bytes,
                file_backed: true,
            }
        } else {
            Source {
                bytes: read_into_memory(&mut file)
                    .with_context(|| format!("cannot read {}", path.display()))?,
                file_backed: false,
            }
        };
        Ok(Self {
            map: Arc::new(map),
            table: variant.weights.clone(),
            variant: variant.name.clone(),
            pool,
        })
    }

    pub fn contains(&self, name: &str) -> bool {
        self.table.contains_key(name)
    }

    fn entry(&self, name: &str) -> Result<&WeightEntry> {
        let entry = self.table.get(name).ok_or_else(|| {
            anyhow!(
                "variant {}: weight {name} is missing from bundle.json",
                self.variant
            )
        })?;
        if entry.transposed {
            bail!(
                "variant {}: weight {name} is stored transposed, which format 1 readers do not handle",
                self.variant
            );
        }
        Ok(entry)
    }

    fn dtype(&self, name: &str, entry: &WeightEntry) -> Result<DType> {
        let bits = entry.quant.as_ref().map(|q| q.bits);
        match (entry.dtype.as_str(), bits) {
            ("float32", None) => Ok(DType::F32),
            ("float16", None) => Ok(DType::F16),
            ("int8", Some(8)) => Ok(DType::Q8),
            ("uint8", Some(4))
                if entry.quant.as_ref().and_then(|q| q.scheme.as_deref())
                    == Some(crate::bundle::KQUANT_SCHEME) =>
            {
                Ok(DType::Q4K)
            }
            ("uint8", Some(4)) => Ok(DType::Q4),
            ("uint8", Some(6))
                if entry.quant.as_ref().and_then(|q| q.scheme.as_deref())
                    == Some(crate::bundle::Q6K_SCHEME) =>
            {
                Ok(DType::Q6K)
            }
            ("uint8", Some(8)) => bail!(
                "variant {}: weight {name} is in 8-bit blocks for ONNX Runtime's MatMulNBits (variant int8-ort); the native backend runs the int8 variant",
                self.variant
            ),
            (other, bits) => bail!(
                "variant {}: weight {name} is {other} (quant bits {bits:?}); the native backend runs float32, float16, int8 (bits 8), packed int4 (uint8, bits 4) and q6k (uint8, bits 6)",
                self.variant
            ),
        }
    }

    /// Checks that `start..start + len` lies in the file.
    fn range(&self, name: &str, start: u64, len: usize) -> Result<usize> {
        let start = usize::try_from(start)?;
        if start
            .checked_add(len)
            .is_none_or(|end| end > self.map.len())
        {
            bail!(
                "variant {}: weight {name} lies outside model.onnx.data",
                self.variant
            );
        }
        Ok(start)
    }

    /// Checks shape and byte count, returns the byte range, dtype and (quantized) scales.
    fn locate(&self, name: &str, shape: &[usize]) -> Result<(usize, usize, DType, Option<Quant>)> {
        let entry = self.entry(name)?;
        let dtype = self.dtype(name, entry)?;
        if entry.shape != shape {
            bail!(
                "variant {}: weight {name} has shape {:?}, config.json implies {shape:?}",
                self.variant,
                entry.shape
            );
        }
        let count: usize = shape.iter().product();
        let (len, scale_count) = match (dtype, shape) {
            (DType::F32, _) => (count * 4, 0),
            (DType::F16, _) => (count * 2, 0),
            (DType::Q8, &[rows, _]) => (count, rows),
            (DType::Q4 | DType::Q4K | DType::Q6K, &[rows, cols]) => {
                let blocks = cols.div_ceil(BLOCK);
                let codes = if dtype == DType::Q6K { 2 } else { 1 };
                (rows * blocks * 16, rows * blocks * codes)
            }
            _ => bail!(
                "variant {}: quantized weight {name} must be a matrix",
                self.variant
            ),
        };
        if entry.nbytes != len as u64 {
            bail!(
                "variant {}: weight {name} has {} bytes, {shape:?} {:?} needs {len}",
                self.variant,
                entry.nbytes,
                dtype
            );
        }
        let start = self.range(name, entry.offset, len)?;
        let quant = match (dtype, &entry.quant) {
            (DType::F32 | DType::F16, _) | (_, None) => None,
            (DType::Q8 | DType::Q4, Some(q)) => {
                let scale = q.scale.as_ref().ok_or_else(|| {
                    anyhow!("variant {}: weight {name} lacks its scales", self.variant)
                })?;
                let scales = self.part(name, "scales", scale, "float32", scale_count * 4)?;
                let expected = if dtype == DType::Q4 {
                    BLOCK as u64
                } else {
                    shape[1] as u64
                };
                self.check_block(name, q.block_size, expected)?;
                Some(Quant {
                    bits: if dtype == DType::Q4 { 4 } else { 8 },
                    scales,
                    kquant: None,
                    q6k: None,
                })
            }
            (DType::Q4K, Some(q)) => {
                self.check_block(name, q.block_size, BLOCK as u64)?;
                self.check_super_block(name, "int4k", q.super_block, KQUANT_SUPER_BLOCK)?;
                let rows = shape[0];
                let supers = rows * shape[1].div_ceil(BLOCK).div_ceil(KQUANT_SUPER_BLOCK);
                let missing = || {
                    anyhow!(
                        "variant {}: int4k weight {name} lacks its codes or super-block scales",
                        self.variant
                    )
                };
                let (scales, min) = match (&q.codes, &q.scale, &q.min) {
                    (Some(codes), _, _) => {
                        let packed = self.part(name, "codes", codes, "uint8", supers * 12)?;
                        (packed, None)
                    }
                    (None, Some(scale), Some(min)) => (
                        self.part(name, "scale codes", scale, "uint8", scale_count)?,
                        Some(self.part(name, "min codes", min, "uint8", scale_count)?),
                    ),
                    _ => return Err(missing()),
                };
                let d = self.part(
                    name,
                    "super-block scales",
                    q.d.as_ref().ok_or_else(missing)?,
                    "float16",
                    supers * 2,
                )?;
                let dmin = self.part(
                    name,
                    "super-block mins",
                    q.dmin.as_ref().ok_or_else(missing)?,
                    "float16",
                    supers * 2,
                )?;
                Some(Quant {
                    bits: 4,
                    scales,
                    kquant: Some(Kquant { min, d, dmin }),
                    q6k: None,
                })
            }
            (DType::Q6K, Some(q)) => {
                self.check_block(name, q.block_size, Q6_SUB_BLOCK as u64)?;
                self.check_super_block(name, "q6k", q.super_block, Q6_SUPER_BLOCK)?;
                let (rows, blocks) = (shape[0], shape[1].div_ceil(BLOCK));
                let supers = rows * (2 * blocks).div_ceil(Q6_SUPER_BLOCK);
                let missing = || {
                    anyhow!(
                        "variant {}: q6k weight {name} lacks its top bits or super-block scales",
                        self.variant
                    )
                };
                let scale = q.scale.as_ref().ok_or_else(missing)?;
                let scales = self.part(name, "scale codes", scale, "int8", scale_count)?;
                let high = q.high.as_ref().ok_or_else(missing)?;
                let high = self.part(name, "top bits", high, "uint8", rows * blocks * 8)?;
                let d = q.d.as_ref().ok_or_else(missing)?;
                let d = self.part(name, "super-block scales", d, "float16", supers * 2)?;
                Some(Quant {
                    bits: 6,
                    scales,
                    kquant: None,
                    q6k: Some([high, d]),
                })
            }
        };
        Ok((start, len, dtype, quant))
    }

    /// Checks a quantized weight's side tensor (`what`: its scales, codes, ...) and returns its
    /// byte range.
    fn part(
        &self,
        name: &str,
        what: &str,
        entry: &crate::bundle::ScaleEntry,
        dtype: &str,
        nbytes: usize,
    ) -> Result<(usize, usize)> {
        if entry.dtype != dtype || entry.nbytes != nbytes as u64 {
            bail!(
                "variant {}: weight {name}: {what} must be {nbytes} bytes of {dtype}",
                self.variant
            );
        }
        Ok((self.range(name, entry.offset, nbytes)?, nbytes))
    }

    fn check_super_block(
        &self,
        name: &str,
        format: &str,
        super_block: Option<u64>,
        expected: usize,
    ) -> Result<()> {
        if super_block != Some(expected as u64) {
            bail!(
                "variant {}: {format} weight {name}: super_block {super_block:?}, expected {expected}",
                self.variant
            );
        }
        Ok(())
    }

    fn check_block(&self, name: &str, block: u64, expected: u64) -> Result<()> {
        if block != expected {
            bail!(
                "variant {}: weight {name}: block_size {block}, expected {expected}",
                self.variant
            );
        }
        Ok(())
    }

    /// A matrix for products: float matrices in place, quantized ones repacked.
    pub fn matrix(&self, name: &str, rows: usize, cols: usize) -> Result<Matrix> {
        self.matrix_rows(name, rows, 0..rows, cols)
    }

    /// Rows `part` of a stored `[total, cols]` matrix as a matrix of its own (a fused Q/K/V
    /// projection of an `ort` profile variant: its rows are the three projections' stacked, and
    /// every format stores and scales rows independently, so a row range is a matrix).
    pub fn matrix_rows(
        &self,
        name: &str,
        total: usize,
        part: std::ops::Range<usize>,
        cols: usize,
    ) -> Result<Matrix> {
        let (start, len, dtype, quant) = self.locate(name, &[total, cols])?;
        if part.end > total || part.start > part.end {
            bail!(
                "variant {}: rows {part:?} of weight {name} with {total} rows",
                self.variant
            );
        }
        let rows = part.len();
        let row_bytes = len / total.max(1);
        let (start, len) = (start + part.start * row_bytes, rows * row_bytes);
        let quant = quant.map(|q| q.rows(total, &part));
        let storage = match quant {
            None => self.float_storage(start, len, dtype),
            Some(q) => {
                let (scale_start, scale_len) = q.scales;
                let scale_bytes = &self.map[scale_start..scale_start + scale_len];
                let storage = match q.kquant {
                    None if q.bits == 6 => {
                        let [high, d] = q.q6k.context("q6k weight without its top bits")?;
                        let bytes = |(start, len): (usize, usize)| &self.map[start..start + len];
                        let storage = self.repack_q6(
                            start,
                            rows,
                            cols,
                            bytes(high),
                            scale_bytes,
                            &f16s(bytes(d)),
                        )?;
                        for part in [high, d] {
                            self.release(part.0, part.1);
                        }
                        storage
                    }
                    None if q.bits == 8 => self.repack_q8(start, rows, cols, f32s(scale_bytes))?,
                    None => {
                        self.repack_q4(start, rows, cols, Q4Codes::Scales(&f32s(scale_bytes)))?
                    }
                    Some(Kquant { min, d, dmin }) => {
                        let bytes = |(start, len): (usize, usize)| &self.map[start..start + len];
                        let unpacked;
                        let (sc, m) = match min {
                            Some(min) => (scale_bytes, bytes(min)),
                            None => {
                                let blocks = cols.div_ceil(BLOCK);
                                unpacked = quant::unpack_kquant_codes(scale_bytes, blocks);
                                (&unpacked.0[..], &unpacked.1[..])
                            }
                        };
                        let codes = Q4Codes::Kquant(quant::KquantCodes {
                            sc,
                            m,
                            d: &f16s(bytes(d)),
                            dmin: &f16s(bytes(dmin)),
                        });
                        let storage = self.repack_q4(start, rows, cols, codes)?;
                        for part in [min.unwrap_or_default(), d, dmin] {
                            self.release(part.0, part.1);
                        }
                        storage
                    }
                };
                self.release(start, len);
                self.release(scale_start, scale_len);
                storage
            }
        };
        Ok(Matrix {
            storage,
            rows,
            cols,
        })
    }

    /// An int8 matrix requantized to int4 blocks of 32 for products (`LmHead::Int4`), by the
    /// exporter's int4 rule (the block's value of largest magnitude maps to −8) applied to its
    /// int8 values; the block scale is that step times the row's scale. Other formats load as
    /// they are (logged).
    pub fn matrix_as_int4(&self, name: &str, rows: usize, cols: usize) -> Result<Matrix> {
        let (start, _, dtype, quant) = self.locate(name, &[rows, cols])?;
        let (DType::Q8, Some(q)) = (dtype, quant) else {
            tracing::warn!(
                "variant {}: {name} is {dtype:?}, not int8: loaded as stored, not as int4",
                self.variant
            );
            return self.matrix(name, rows, cols);
        };
        let row_scales = f32s(&self.map[q.scales.0..q.scales.0 + q.scales.1]);
        let row_bytes = quant::q4_row_bytes(padded_blocks(cols), false);
        let mut data = anonymous(rows * row_bytes)?;
        self.repack_slabs(start, cols, rows, row_bytes, &mut data, &|row, src, out| {
            quant::requantize_q8_row_to_q4(bytemuck::cast_slice(src), row_scales[row], out)
        });
        self.release(q.scales.0, q.scales.1);
        Ok(Matrix {
            storage: Storage::Q4 {
                data: data.make_read_only()?,
                kquant: false,
            },
            rows,
            cols,
        })
    }

    /// An embedding table (rows gathered one at a time): left in the map in every format.
    pub fn embedding(&self, name: &str, rows: usize, cols: usize) -> Result<Matrix> {
        let (start, len, dtype, quant) = self.locate(name, &[rows, cols])?;
        let storage = match (dtype, quant) {
            (DType::Q8, Some(q)) => Storage::MappedQ8Rows {
                map: Arc::clone(&self.map),
                start,
                scales: f32s(&self.map[q.scales.0..q.scales.0 + q.scales.1]),
            },
            (DType::Q4 | DType::Q4K | DType::Q6K, _) => bail!(
                "variant {}: embedding {name} is int4; the exporter writes int8 embeddings",
                self.variant
            ),
            _ => self.float_storage(start, len, dtype),
        };
        Ok(Matrix {
            storage,
            rows,
            cols,
        })
    }

    fn float_storage(&self, start: usize, len: usize, dtype: DType) -> Storage {
        let bytes = &self.map[start..start + len];
        let in_place = cfg!(target_endian = "little")
            && match dtype {
                DType::F16 => bytemuck::try_cast_slice::<u8, f16>(bytes).is_ok(),
                _ => bytemuck::try_cast_slice::<u8, f32>(bytes).is_ok(),
            };
        if in_place {
            Storage::Mapped {
                map: Arc::clone(&self.map),
                start,
                len,
                dtype,
            }
        } else {
            Storage::Owned(to_f32(bytes, dtype))
        }
    }

    fn repack_q8(
        &self,
        start: usize,
        rows: usize,
        cols: usize,
        scales: Vec<f32>,
    ) -> Result<Storage> {
        let row_bytes = padded_blocks(cols) * BLOCK;
        let mut data = anonymous(rows * row_bytes)?;
        self.repack_slabs(start, cols, rows, row_bytes, &mut data, &|_, src, out| {
            quant::repack_q8_row(bytemuck::cast_slice(src), out)
        });
        Ok(Storage::Q8 {
            data: data.make_read_only()?,
            scales,
        })
    }

    fn repack_q4(&self, start: usize, rows: usize, cols: usize, codes: Q4Codes) -> Result<Storage> {
        let blocks = cols.div_ceil(BLOCK);
        let supers = blocks.div_ceil(quant::KQUANT_SUPER_BLOCK);
        let kquant = matches!(codes, Q4Codes::Kquant(_));
        let row_bytes = quant::q4_row_bytes(padded_blocks(cols), kquant);
        let mut data = anonymous(rows * row_bytes)?;
        self.repack_slabs(
            start,
            blocks * 16,
            rows,
            row_bytes,
            &mut data,
            &|row, src, out| {
                let per_row = row * blocks..(row + 1) * blocks;
                match codes {
                    Q4Codes::Scales(scales) => {
                        quant::repack_q4_row(src, &scales[per_row], cols, out)
                    }
                    Q4Codes::Kquant(all) => {
                        let per_super = row * supers..(row + 1) * supers;
                        let codes = quant::KquantCodes {
                            sc: &all.sc[per_row.clone()],
                            m: &all.m[per_row],
                            d: &all.d[per_super.clone()],
                            dmin: &all.dmin[per_super],
                        };
                        quant::repack_q4k_row(src, codes, cols, out)
                    }
                }
            },
        );
        Ok(Storage::Q4 {
            data: data.make_read_only()?,
            kquant,
        })
    }

    /// Repacks a bundle q6k matrix (low nibbles from `start`, then its top bits, scale codes
    /// and super-block scales) into the kernels' layout.
    fn repack_q6(
        &self,
        start: usize,
        rows: usize,
        cols: usize,
        high: &[u8],
        codes: &[u8],
        d: &[f16],
    ) -> Result<Storage> {
        let blocks = cols.div_ceil(BLOCK);
        let supers = (2 * blocks).div_ceil(Q6_SUPER_BLOCK);
        let row_bytes = q6k::q6_row_bytes(padded_blocks(cols));
        let mut data = anonymous(rows * row_bytes)?;
        let codes: &[i8] = bytemuck::cast_slice(codes);
        self.repack_slabs(
            start,
            blocks * 16,
            rows,
            row_bytes,
            &mut data,
            &|row, src, out| {
                let src = q6k::Q6Bundle {
                    low: src,
                    high: &high[row * blocks * 8..(row + 1) * blocks * 8],
                    sc: &codes[row * 2 * blocks..(row + 1) * 2 * blocks],
                    d: &d[row * supers..(row + 1) * supers],
                };
                q6k::repack_q6k_row(src, cols, out)
            },
        );
        Ok(Storage::Q6 {
            data: data.make_read_only()?,
        })
    }

    /// (Repacking whole matrices peaked at 577 MiB RSS for the 0.5B int4 model, with the LM
    /// head resident twice at the end of the load; in slabs, 450 MiB.)
    ///
    /// Repacks `rows` source rows of `src_row` bytes from `start` into `data` (`dst_row`
    /// bytes each; `repack(row index, source, destination)`) on the pool, in slabs of about 4 MB whose source pages are released as
    /// soon as they are repacked: the bundle bytes and their repacked copy of a large
    /// matrix (a 136 MB LM head) are never both resident.
    fn repack_slabs(
        &self,
        start: usize,
        src_row: usize,
        rows: usize,
        dst_row: usize,
        data: &mut [u8],
        repack: RepackRow<'_>,
    ) {
        let slab_rows = ((4 << 20) / src_row.max(1)).clamp(1, rows.max(1));
        for first in (0..rows).step_by(slab_rows) {
            let n = slab_rows.min(rows - first);
            let src = &self.map[start + first * src_row..start + (first + n) * src_row];
            let dst = &mut data[first * dst_row..(first + n) * dst_row];
            let per_task = rows_per_task(n);
            self.pool.for_chunks(dst, per_task * dst_row, &|i, part| {
                for (r, out) in part.chunks_exact_mut(dst_row).enumerate() {
                    let row = i * per_task + r;
                    repack(first + row, &src[row * src_row..(row + 1) * src_row], out);
                }
            });
            self.release(start + first * src_row, n * src_row);
        }
    }

    /// Drops the pages of a repacked source range from this process (not from the page
    /// cache), so the bundle bytes and their repacked copy are never both resident.
    fn release(&self, start: usize, len: usize) {
        release_pages(&self.map, start, len);
    }

    /// A small tensor (norm weight, bias) copied out as f32.
    pub fn vector(&self, name: &str, len: usize) -> Result<Vec<f32>> {
        let (start, nbytes, dtype, _) = self.locate(name, &[len])?;
        Ok(to_f32(&self.map[start..start + nbytes], dtype))
    }

    /// A small float matrix copied out as f32, row-major `[rows, cols]` (a MoE router, a shared
    /// expert's gate: the exporter stores them float32 in every variant).
    pub fn float_matrix(&self, name: &str, rows: usize, cols: usize) -> Result<Vec<f32>> {
        let (start, nbytes, dtype, _) = self.locate(name, &[rows, cols])?;
        if !matches!(dtype, DType::F32 | DType::F16) {
            bail!(
                "variant {}: weight {name} must be float32 or float16, not quantized",
                self.variant
            );
        }
        Ok(to_f32(&self.map[start..start + nbytes], dtype))
    }

    /// Whether the variant's table names this weight.
    pub fn has(&self, name: &str) -> bool {
        self.table.contains_key(name)
    }

    /// The tensors whose names start with `prefix.` (candle's `vb.pp()`): a layer's loader
    /// names `self_attn.q_proj.weight`, not `model.layers.3.self_attn.q_proj.weight`.
    pub fn scope(&self, prefix: &str) -> Scope<'_> {
        Scope {
            file: self,
            prefix: prefix.to_string(),
        }
    }
}

/// A `WeightFile` seen below a name prefix; see `WeightFile::scope`.
pub struct Scope<'a> {
    file: &'a WeightFile,
    prefix: String,
}

impl Scope<'_> {
    /// A narrower scope: `model.layers.3` → `model.layers.3.mlp`.
    pub fn scope(&self, name: &str) -> Self {
        self.file.scope(&self.name(name))
    }

    pub fn matrix(&self, name: &str, rows: usize, cols: usize) -> Result<Matrix> {
        self.file.matrix(&self.name(name), rows, cols)
    }

    pub fn vector(&self, name: &str, len: usize) -> Result<Vec<f32>> {
        self.file.vector(&self.name(name), len)
    }

    pub fn float_matrix(&self, name: &str, rows: usize, cols: usize) -> Result<Vec<f32>> {
        self.file.float_matrix(&self.name(name), rows, cols)
    }

    pub fn matrix_rows(
        &self,
        name: &str,
        total: usize,
        part: std::ops::Range<usize>,
        cols: usize,
    ) -> Result<Matrix> {
        self.file.matrix_rows(&self.name(name), total, part, cols)
    }

    pub fn has(&self, name: &str) -> bool {
        self.file.has(&self.name(name))
    }

    fn name(&self, name: &str) -> String {
        format!("{}.{name}", self.prefix)
    }
}

/// Drops this process's pages of `map[start..start + len]` (whole pages inside the range);
/// the page cache keeps them, and a later access faults them back in.
fn release_pages(map: &Source, start: usize, len: usize) {
    #[cfg(unix)]
    if map.file_backed {
        // madvise wants a page-aligned start: shrink the range to whole pages inside it.
        let page = 4096;
        let first = start.div_ceil(page) * page;
        let end = (start + len) / page * page;
        if end > first {
            // SAFETY: the map is a private, read-only file mapping that was never written, so
            // dropping its pages loses nothing: a later access (an embedding gather, a tied
            // table) faults the same bytes back in from the file.
            let _ = unsafe {
                map.bytes.unchecked_advise_range(
                    memmap2::UncheckedAdvice::DontNeed,
                    first,
                    end - first,
                )
            };
        }
    }
    #[cfg(not(unix))]
    let _ = (map, start, len);
}

/// `repack(row index, source row, destination row)`.
type RepackRow<'a> = &'a (dyn Fn(usize, &[u8], &mut [u8]) + Sync);

/// Enough rows per repacking task to amortize scheduling, few enough to balance threads.
fn rows_per_task(rows: usize) -> usize {
    rows.div_ceil(16).max(8)
}

/// The whole file in anonymous memory, read-only once read.
fn read_into_memory(file: &mut File) -> Result<Mmap> {
    let len = usize::try_from(file.metadata()?.len()).context("the file is too large")?;
    let mut copy = anonymous(len)?;
    file.read_exact(&mut copy[..len])?;
    Ok(copy.make_read_only()?)
}

/// Zeroed anonymous memory for repacked weights, with huge pages requested.
fn anonymous(len: usize) -> Result<MmapMut> {
    let map = MmapMut::map_anon(len.max(1)).context("cannot allocate memory for weights")?;
    #[cfg(target_os = "linux")]
    let _ = map.advise(memmap2::Advice::HugePage);
    Ok(map)
}

fn f32s(bytes: &[u8]) -> Vec<f32> {
    to_f32(bytes, DType::F32)
}

/// Little-endian float16 bytes as f16 values, on any host.
fn f16s(bytes: &[u8]) -> Vec<f16> {
    bytes
        .chunks_exact(2)
        .map(|b| f16::from_le_bytes([b[0], b[1]]))
        .collect()
}

/// Little-endian bytes (ONNX external data) to f32, on any host.
fn to_f32(bytes: &[u8], dtype: DType) -> Vec<f32> {
    match dtype {
        DType::F16 => bytes
            .chunks_exact(2)
            .map(|b| f16::from_le_bytes([b[0], b[1]]).to_f32())
            .collect(),
        _ => bytes
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
            .collect(),
    }
}
