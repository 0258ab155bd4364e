//! A variant's weights, memory-mapped from its `model.onnx.data` and found by Hugging Face
//! name through the weights table in bundle.json. Nothing is copied for float32 and float16
//! matrices: a `Matrix` is a byte range of the shared map. Small tensors (norms, biases) are
//! copied into owned f32 vectors. Where the bytes cannot be viewed in place (a big-endian
//! host, or an offset that is not a multiple of the element size) a matrix is converted
//! into an owned copy instead.

use std::collections::BTreeMap;
use std::fs::File;
use std::sync::Arc;

use anyhow::{anyhow, bail, Context, Result};
use half::f16;
use memmap2::Mmap;

use super::kernels::{MatData, MatRef};
use crate::bundle::{Bundle, Variant, WeightEntry};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DType {
    F32,
    F16,
}

impl DType {
    fn size(self) -> usize {
        match self {
            DType::F32 => 4,
            DType::F16 => 2,
        }
    }
}

pub struct WeightFile {
    map: Arc<Mmap>,
    table: BTreeMap<String, WeightEntry>,
    variant: String,
}

/// A weight matrix that stays valid as long as it lives (it holds the map).
pub struct Matrix {
    storage: Storage,
    rows: usize,
    cols: usize,
}

enum Storage {
    Mapped {
        map: Arc<Mmap>,
        start: usize,
        len: usize,
        dtype: DType,
    },
    Owned(Vec<f32>),
}

impl Matrix {
    pub fn rows(&self) -> usize {
        self.rows
    }

    pub fn cols(&self) -> usize {
        self.cols
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
                    DType::F32 => MatData::F32(bytemuck::cast_slice(bytes)),
                    DType::F16 => MatData::F16(bytemuck::cast_slice(bytes)),
                }
            }
            Storage::Owned(v) => MatData::F32(v),
        };
        MatRef {
            data,
            rows: self.rows,
            cols: self.cols,
        }
    }
}

impl WeightFile {
    pub fn open(bundle: &Bundle, variant: &Variant) -> Result<Self> {
        let path = bundle.path(&variant.data);
        let file = File::open(&path).with_context(|| format!("cannot open {}", path.display()))?;
        // SAFETY: the map is read-only and the bundle is a deployed artifact that nothing
        // writes while a model is loaded (its size and checksum were just verified). A file
        // truncated under us would fault, which a read-only model store rules out.
        let map = unsafe { Mmap::map(&file) }
            .with_context(|| format!("cannot memory-map {}", path.display()))?;
        Ok(Self {
            map: Arc::new(map),
            table: variant.weights.clone(),
            variant: variant.name.clone(),
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
        match entry.dtype.as_str() {
            "float32" => Ok(DType::F32),
            "float16" => Ok(DType::F16),
            other => bail!(
                "variant {}: weight {name} is {other}; the native backend runs float32 and float16 weights only",
                self.variant
            ),
        }
    }

    /// Checks shape and byte count, returns the byte range and dtype.
    fn locate(&self, name: &str, shape: &[usize]) -> Result<(usize, usize, DType)> {
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
        let len = count * dtype.size();
        if entry.nbytes != len as u64 {
            bail!(
                "variant {}: weight {name} has {} bytes, {shape:?} {:?} needs {len}",
                self.variant,
                entry.nbytes,
                dtype
            );
        }
        let start = usize::try_from(entry.offset)?;
        if start
            .checked_add(len)
            .is_none_or(|end| end > self.map.len())
        {
            bail!(
                "variant {}: weight {name} lies outside model.onnx.data",
                self.variant
            );
        }
        Ok((start, len, dtype))
    }

    pub fn matrix(&self, name: &str, rows: usize, cols: usize) -> Result<Matrix> {
        let (start, len, dtype) = self.locate(name, &[rows, cols])?;
        let bytes = &self.map[start..start + len];
        let in_place = cfg!(target_endian = "little")
            && match dtype {
                DType::F32 => bytemuck::try_cast_slice::<u8, f32>(bytes).is_ok(),
                DType::F16 => bytemuck::try_cast_slice::<u8, f16>(bytes).is_ok(),
            };
        let storage = if in_place {
            Storage::Mapped {
                map: Arc::clone(&self.map),
                start,
                len,
                dtype,
            }
        } else {
            Storage::Owned(to_f32(bytes, dtype))
        };
        Ok(Matrix {
            storage,
            rows,
            cols,
        })
    }

    /// A small tensor (norm weight, bias) copied out as f32.
    pub fn vector(&self, name: &str, len: usize) -> Result<Vec<f32>> {
        let (start, nbytes, dtype) = self.locate(name, &[len])?;
        Ok(to_f32(&self.map[start..start + nbytes], dtype))
    }
}

/// Little-endian bytes (ONNX external data) to f32, on any host.
fn to_f32(bytes: &[u8], dtype: DType) -> Vec<f32> {
    match dtype {
        DType::F32 => bytes
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
            .collect(),
        DType::F16 => bytes
            .chunks_exact(2)
            .map(|b| f16::from_le_bytes([b[0], b[1]]).to_f32())
            .collect(),
    }
}
