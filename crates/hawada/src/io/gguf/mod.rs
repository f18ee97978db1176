//! GGUF (llama.cpp's container, version 2 and 3) read and dequantise: metadata, tensor table, and
//! tensors of the types in `quants` (F32/F16/BF16, Q4_0 … Q8_0, the K-quants Q2_K … Q6_K) turned
//! into f32 tensors in the reference layout (`[rows, cols]`, GGUF stores the innermost dimension
//! first). `decoder` maps a decoder's GGUF tensors and metadata (`llama`, `qwen2`, `qwen3`
//! architectures) to HF names and an HF config, undoing llama.cpp's q/k row permutation, so the
//! family only ever sees checkpoint names. Format:
//! <https://github.com/ggml-org/ggml/blob/master/docs/gguf.md>.

mod decoder;
mod quants;

pub use decoder::{
    decoder_config, decoder_tensors, for_each_decoder_tensor, rope_factors, RopeFactors,
    ROPE_FREQS, SUPPORTED_ARCHITECTURES,
};

use crate::error::{Error, Result};
use quants::GgmlType;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use tch::Tensor;

/// One metadata value.
#[derive(Debug, Clone, PartialEq)]
pub enum Value {
    Int(i64),
    Float(f64),
    Bool(bool),
    Str(String),
    Array(Vec<Value>),
}

impl Value {
    pub fn as_i64(&self) -> Option<i64> {
        match self {
            Value::Int(v) => Some(*v),
            _ => None,
        }
    }
    pub fn as_f64(&self) -> Option<f64> {
        match self {
            Value::Float(v) => Some(*v),
            Value::Int(v) => Some(*v as f64),
            _ => None,
        }
    }
    pub fn as_str(&self) -> Option<&str> {
        match self {
            Value::Str(s) => Some(s),
            _ => None,
        }
    }
    pub fn as_array(&self) -> Option<&[Value]> {
        match self {
            Value::Array(v) => Some(v),
            _ => None,
        }
    }
}

/// A tensor's entry in the table: shape in GGUF order (innermost first), ggml type, offset into
/// the data section.
#[derive(Debug, Clone)]
struct TensorInfo {
    dims: Vec<u64>,
    ggml_type: u32,
    offset: u64,
}

/// A parsed GGUF file, its bytes kept for dequantising on demand.
pub struct Gguf {
    file: PathBuf,
    bytes: Vec<u8>,
    data_start: usize,
    pub metadata: BTreeMap<String, Value>,
    tensors: BTreeMap<String, TensorInfo>,
}

struct Reader<'a> {
    bytes: &'a [u8],
    pos: usize,
    file: &'a Path,
    /// Arrays open around the value being read.
    depth: usize,
}

/// Arrays nested deeper than this are refused: real files nest none (token lists are flat), and
/// a hostile file nesting hundreds of thousands would overflow the stack.
const MAX_ARRAY_DEPTH: usize = 8;

/// Items reserved up front for an array: a declared count is only believed as the items are
/// read, so a count near the file size allocates nothing it does not fill.
const ARRAY_RESERVE: usize = 4096;

impl Reader<'_> {
    fn take(&mut self, n: usize) -> Result<&[u8]> {
        let end = self.pos.checked_add(n).filter(|&e| e <= self.bytes.len());
        let Some(end) = end else {
            return Err(Error::Data {
                file: self.file.to_path_buf(),
                reason: format!(
                    "truncated: needed {n} bytes at offset {}, file has {}",
                    self.pos,
                    self.bytes.len()
                ),
            });
        };
        let out = &self.bytes[self.pos..end];
        self.pos = end;
        Ok(out)
    }
    fn u32(&mut self) -> Result<u32> {
        Ok(u32::from_le_bytes(
            self.take(4)?.try_into().expect("4 bytes"),
        ))
    }
    fn u64(&mut self) -> Result<u64> {
        Ok(u64::from_le_bytes(
            self.take(8)?.try_into().expect("8 bytes"),
        ))
    }
    fn string(&mut self) -> Result<String> {
        let len = self.u64()? as usize;
        let bytes = self.take(len)?;
        Ok(String::from_utf8_lossy(bytes).into_owned())
    }
    fn value(&mut self, value_type: u32) -> Result<Value> {
        Ok(match value_type {
            0 => Value::Int(self.take(1)?[0] as i64),
            1 => Value::Int(self.take(1)?[0] as i8 as i64),
            2 => Value::Int(u16::from_le_bytes(self.take(2)?.try_into().expect("2")) as i64),
            3 => Value::Int(i16::from_le_bytes(self.take(2)?.try_into().expect("2")) as i64),
            4 => Value::Int(self.u32()? as i64),
            5 => Value::Int(self.u32()? as i32 as i64),
            6 => Value::Float(f32::from_le_bytes(self.take(4)?.try_into().expect("4")) as f64),
            7 => Value::Bool(self.take(1)?[0] != 0),
            8 => Value::Str(self.string()?),
            9 => {
                let item_type = self.u32()?;
                let count = self.u64()? as usize;
                // Every item takes at least one byte of what is left.
                if count > self.bytes.len() - self.pos {
                    return Err(self.bad(format!("array of {count} items exceeds the file")));
                }
                if self.depth == MAX_ARRAY_DEPTH {
                    return Err(self.bad(format!(
                        "metadata arrays nested deeper than {MAX_ARRAY_DEPTH}"
                    )));
                }
                self.depth += 1;
                let mut items = Vec::with_capacity(count.min(ARRAY_RESERVE));
                for _ in 0..count {
                    items.push(self.value(item_type)?);
                }
                self.depth -= 1;
                Value::Array(items)
            }
            10 => Value::Int(self.u64()? as i64),
            11 => Value::Int(self.u64()? as i64),
            12 => Value::Float(f64::from_le_bytes(self.take(8)?.try_into().expect("8"))),
            other => return Err(self.bad(format!("unknown metadata value type {other}"))),
        })
    }
    fn bad(&self, reason: String) -> Error {
        Error::Data {
            file: self.file.to_path_buf(),
            reason: format!("not a valid GGUF file: {reason}"),
        }
    }
}

impl Gguf {
    /// Reads and parses `path` (header, metadata, tensor table); tensors dequantise on demand.
    pub fn open(path: &Path) -> Result<Self> {
        let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
        let mut r = Reader {
            bytes: &bytes,
            pos: 0,
            file: path,
            depth: 0,
        };
        if r.take(4)? != b"GGUF" {
            return Err(r.bad("magic `GGUF` missing".into()));
        }
        let version = r.u32()?;
        if !(2..=3).contains(&version) {
            return Err(r.bad(format!("version {version}; supported: 2 and 3")));
        }
        let n_tensors = r.u64()?;
        let n_metadata = r.u64()?;
        let mut metadata = BTreeMap::new();
        for _ in 0..n_metadata {
            let key = r.string()?;
            let value_type = r.u32()?;
            metadata.insert(key, r.value(value_type)?);
        }
        let mut tensors = BTreeMap::new();
        for _ in 0..n_tensors {
            let name = r.string()?;
            let n_dims = r.u32()? as usize;
            if n_dims > 4 {
                return Err(r.bad(format!("tensor `{name}` has {n_dims} dims (at most 4)")));
            }
            let dims = (0..n_dims).map(|_| r.u64()).collect::<Result<Vec<_>>>()?;
            let ggml_type = r.u32()?;
            let offset = r.u64()?;
            tensors.insert(
                name,
                TensorInfo {
                    dims,
                    ggml_type,
                    offset,
                },
            );
        }
        let alignment = metadata
            .get("general.alignment")
            .and_then(Value::as_i64)
            .unwrap_or(32)
            .max(1) as usize;
        let data_start = r.pos.div_ceil(alignment) * alignment;
        Ok(Gguf {
            file: path.to_path_buf(),
            bytes,
            data_start,
            metadata,
            tensors,
        })
    }

    pub fn file(&self) -> &Path {
        &self.file
    }

    /// Names of every tensor in the file.
    pub fn tensor_names(&self) -> impl Iterator<Item = &str> {
        self.tensors.keys().map(String::as_str)
    }

    /// A metadata value, or an error naming the key.
    pub fn get(&self, key: &str) -> Result<&Value> {
        self.metadata.get(key).ok_or_else(|| {
            Error::config(
                &self.file,
                key,
                "missing from the GGUF metadata".to_string(),
            )
        })
    }

    /// The tensor `name` dequantised to f32, in reference order (GGUF dims reversed). Its type
    /// must be one `quants` reads, its rows whole blocks, and its bytes inside the data section
    /// without running into the next tensor's.
    pub fn tensor(&self, name: &str) -> Result<Tensor> {
        let info = self.tensors.get(name).ok_or_else(|| Error::MissingTensor {
            file: self.file.clone(),
            name: name.to_string(),
        })?;
        let bad = |reason: String| Error::Data {
            file: self.file.clone(),
            reason: format!("tensor `{name}`: {reason}"),
        };
        let ggml_type = GgmlType::from_id(info.ggml_type).ok_or_else(|| {
            bad(format!(
                "ggml type {} is not supported (supported: {})",
                info.ggml_type,
                quants::SUPPORTED
            ))
        })?;
        let (block_bytes, block_elems) = ggml_type.block_layout();
        let type_name = ggml_type.name();
        let count = info
            .dims
            .iter()
            .try_fold(1u64, |n, &d| n.checked_mul(d))
            .filter(|&n| n <= self.bytes.len() as u64 * 2)
            .ok_or_else(|| bad(format!("dims {:?} exceed the file", info.dims)))?;
        // ggml quantises each row on its own: a row must be whole blocks.
        let row = info.dims.first().copied().unwrap_or(1);
        if !row.is_multiple_of(block_elems as u64) {
            return Err(bad(format!(
                "rows of {row} elements are not whole {type_name} blocks of {block_elems}"
            )));
        }
        let len = (count as usize / block_elems) * block_bytes;
        let start = self.data_start.saturating_add(info.offset as usize);
        let end = start.saturating_add(len);
        if let Some((next, next_start)) = self.next_tensor(info.offset) {
            if end > next_start {
                return Err(bad(format!(
                    "{count} {type_name} elements take {len} bytes from offset {start}, past the \
                     start of tensor `{next}` at {next_start}: its dims or type are wrong"
                )));
            }
        }
        let raw = self.bytes.get(start..end).ok_or_else(|| {
            bad(format!(
                "{len} bytes of {type_name} data at offset {start} lie past the file end ({} \
                 bytes)",
                self.bytes.len()
            ))
        })?;
        let mut values = Vec::new();
        ggml_type.dequantise(raw, &mut values);
        let shape: Vec<i64> = info.dims.iter().rev().map(|&d| d as i64).collect();
        Ok(Tensor::from_slice(&values).view(shape.as_slice()))
    }

    /// The tensor stored right after `offset` in the data section, and its absolute start.
    fn next_tensor(&self, offset: u64) -> Option<(&str, usize)> {
        self.tensors
            .iter()
            .filter(|(_, t)| t.offset > offset)
            .min_by_key(|(_, t)| t.offset)
            .map(|(n, t)| {
                (
                    n.as_str(),
                    self.data_start.saturating_add(t.offset as usize),
                )
            })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_truncated_file_names_itself() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("t.gguf");
        let mut bytes = b"GGUF".to_vec();
        bytes.extend(3u32.to_le_bytes());
        bytes.extend(1u64.to_le_bytes());
        std::fs::write(&path, &bytes).unwrap();
        let err = Gguf::open(&path).err().unwrap().to_string();
        assert!(err.contains("t.gguf") && err.contains("truncated"), "{err}");
    }

    /// A GGUF header with one metadata key whose value is `depth` arrays, each declaring
    /// `count` items of the next.
    fn nested_arrays(depth: usize, count: u64) -> Vec<u8> {
        let mut bytes = b"GGUF".to_vec();
        bytes.extend(3u32.to_le_bytes());
        bytes.extend(0u64.to_le_bytes()); // tensors
        bytes.extend(1u64.to_le_bytes()); // metadata
        bytes.extend(1u64.to_le_bytes());
        bytes.push(b'k');
        bytes.extend(9u32.to_le_bytes());
        for _ in 0..depth {
            bytes.extend(9u32.to_le_bytes());
            bytes.extend(count.to_le_bytes());
        }
        bytes.extend(vec![0u8; 64]);
        bytes
    }

    #[test]
    fn gguf_metadata_recursion_is_capped_in_depth_and_in_what_a_count_reserves() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("deep.gguf");
        // Issue 24: 400 000 nested arrays overflowed the stack.
        std::fs::write(&path, nested_arrays(400_000, 1)).unwrap();
        let err = Gguf::open(&path).err().unwrap().to_string();
        assert!(
            err.contains("deep.gguf") && err.contains("nested deeper"),
            "{err}"
        );
        // Counts just under the file size at every level: refused as the items run out, having
        // reserved only a few KB per level.
        let bytes = nested_arrays(6, 0);
        let count = (bytes.len() - 40) as u64;
        std::fs::write(&path, nested_arrays(6, count)).unwrap();
        let err = Gguf::open(&path).err().unwrap().to_string();
        assert!(err.contains("deep.gguf"), "{err}");
    }
}
