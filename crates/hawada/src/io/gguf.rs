//! GGUF (llama.cpp's container, version 2 and 3) read and dequantise: metadata, tensor table,
//! and F32 / F16 / BF16 / Q8_0 / Q4_0 / Q4_1 tensors turned into f32 tensors in the reference
//! layout (`[rows, cols]`, GGUF stores the innermost dimension first). The map from GGUF tensor
//! names to HF `LlamaForCausalLM` names, and the undoing of llama.cpp's q/k row permutation,
//! live here too, so the family only ever sees checkpoint names.
//! Format: <https://github.com/ggml-org/ggml/blob/master/docs/gguf.md>.

use crate::error::{Error, Result};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use tch::{Kind, Tensor};

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
}

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
                if count > self.bytes.len() {
                    return Err(self.bad(format!("array of {count} items exceeds the file")));
                }
                let mut items = Vec::with_capacity(count);
                for _ in 0..count {
                    items.push(self.value(item_type)?);
                }
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

/// Bytes per block and elements per block of a ggml type, with its name.
fn block_layout(ggml_type: u32) -> Option<(&'static str, usize, usize)> {
    Some(match ggml_type {
        0 => ("F32", 4, 1),
        1 => ("F16", 2, 1),
        2 => ("Q4_0", 18, 32),
        3 => ("Q4_1", 20, 32),
        8 => ("Q8_0", 34, 32),
        30 => ("BF16", 2, 1),
        _ => return None,
    })
}

fn f16_at(b: &[u8], i: usize) -> f32 {
    half::f16::from_le_bytes([b[i], b[i + 1]]).to_f32()
}

/// Dequantises `count` elements of `ggml_type` from `raw` (see ggml-quants.c for the layouts).
fn dequantise(ggml_type: u32, raw: &[u8], count: usize) -> Vec<f32> {
    let mut out = Vec::with_capacity(count);
    match ggml_type {
        0 => out.extend(
            raw.chunks_exact(4)
                .map(|c| f32::from_le_bytes(c.try_into().expect("4"))),
        ),
        1 => out.extend(raw.chunks_exact(2).map(|c| f16_at(c, 0))),
        30 => out.extend(
            raw.chunks_exact(2)
                .map(|c| half::bf16::from_le_bytes([c[0], c[1]]).to_f32()),
        ),
        // Q8_0: f16 scale d, 32 × i8; x = d·q.
        8 => {
            for block in raw.chunks_exact(34) {
                let d = f16_at(block, 0);
                out.extend(block[2..].iter().map(|&q| d * (q as i8) as f32));
            }
        }
        // Q4_0: f16 scale d, 16 bytes of nibbles; x = d·(q − 8); low nibbles are elements
        // 0..16, high nibbles 16..32.
        2 => {
            for block in raw.chunks_exact(18) {
                let d = f16_at(block, 0);
                let qs = &block[2..];
                out.extend(qs.iter().map(|&q| d * ((q & 0x0f) as f32 - 8.0)));
                out.extend(qs.iter().map(|&q| d * ((q >> 4) as f32 - 8.0)));
            }
        }
        // Q4_1: f16 scale d, f16 minimum m, 16 bytes of nibbles; x = d·q + m.
        3 => {
            for block in raw.chunks_exact(20) {
                let (d, m) = (f16_at(block, 0), f16_at(block, 2));
                let qs = &block[4..];
                out.extend(qs.iter().map(|&q| d * (q & 0x0f) as f32 + m));
                out.extend(qs.iter().map(|&q| d * (q >> 4) as f32 + m));
            }
        }
        _ => unreachable!("checked by block_layout"),
    }
    out
}

impl Gguf {
    /// Reads and parses `path` (header, metadata, tensor table); tensors dequantise on demand.
    pub fn open(path: &Path) -> Result<Self> {
        let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
        let mut r = Reader {
            bytes: &bytes,
            pos: 0,
            file: path,
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

    /// The tensor `name` dequantised to f32, in reference order (GGUF dims reversed).
    pub fn tensor(&self, name: &str) -> Result<Tensor> {
        let info = self.tensors.get(name).ok_or_else(|| Error::MissingTensor {
            file: self.file.clone(),
            name: name.to_string(),
        })?;
        let bad = |reason: String| Error::Data {
            file: self.file.clone(),
            reason: format!("tensor `{name}`: {reason}"),
        };
        let (type_name, block_bytes, block_elems) =
            block_layout(info.ggml_type).ok_or_else(|| {
                bad(format!(
                    "ggml type {} is not supported (F32, F16, BF16, Q8_0, Q4_0, Q4_1 are)",
                    info.ggml_type
                ))
            })?;
        let count = info
            .dims
            .iter()
            .try_fold(1u64, |n, &d| n.checked_mul(d))
            .filter(|&n| n <= self.bytes.len() as u64 * 2)
            .ok_or_else(|| bad(format!("dims {:?} exceed the file", info.dims)))?;
        if !count.is_multiple_of(block_elems as u64) {
            return Err(bad(format!(
                "{count} elements are not whole {type_name} blocks of {block_elems}"
            )));
        }
        let len = (count as usize / block_elems) * block_bytes;
        let start = self.data_start.saturating_add(info.offset as usize);
        let raw = self
            .bytes
            .get(start..start.saturating_add(len))
            .ok_or_else(|| {
                bad(format!(
                    "{len} bytes of data at offset {start} lie past the file end ({} bytes)",
                    self.bytes.len()
                ))
            })?;
        let values = dequantise(info.ggml_type, raw, count as usize);
        let shape: Vec<i64> = info.dims.iter().rev().map(|&d| d as i64).collect();
        Ok(Tensor::from_slice(&values).view(shape.as_slice()))
    }
}

/// llama.cpp's converter permutes q/k rows of each head from HF's half-split rotary layout to
/// interleaved pairs; this undoes it. `w` is `[heads · head_dim, cols]`; `name` and `file` name
/// it in errors.
fn unpermute_rotary_rows(w: &Tensor, heads: i64, name: &str, file: &Path) -> Result<Tensor> {
    let shape = w.size();
    let (rows, cols) = match shape[..] {
        [rows, cols] if heads > 0 && rows % (2 * heads) == 0 => (rows, cols),
        _ => {
            return Err(Error::Data {
                file: file.to_path_buf(),
                reason: format!(
                    "tensor `{name}` has shape {shape:?}; expected [heads · head_dim, cols] with \
                     {heads} heads of an even head_dim"
                ),
            })
        }
    };
    let head_dim = rows / heads;
    Ok(w.reshape([heads, head_dim / 2, 2, cols])
        .transpose(1, 2)
        .reshape([rows, cols]))
}

/// HF `LlamaForCausalLM` name of a GGUF llama tensor, or `None` if it is not model state.
fn hf_name(gguf_name: &str) -> Option<String> {
    let fixed = match gguf_name {
        "token_embd.weight" => Some("model.embed_tokens.weight"),
        "output_norm.weight" => Some("model.norm.weight"),
        "output.weight" => Some("lm_head.weight"),
        _ => None,
    };
    if let Some(name) = fixed {
        return Some(name.to_string());
    }
    let rest = gguf_name.strip_prefix("blk.")?;
    let (layer, tail) = rest.split_once('.')?;
    let layer: usize = layer.parse().ok()?;
    let hf = match tail {
        "attn_q.weight" => "self_attn.q_proj.weight",
        "attn_k.weight" => "self_attn.k_proj.weight",
        "attn_v.weight" => "self_attn.v_proj.weight",
        "attn_output.weight" => "self_attn.o_proj.weight",
        "attn_q.bias" => "self_attn.q_proj.bias",
        "attn_k.bias" => "self_attn.k_proj.bias",
        "attn_v.bias" => "self_attn.v_proj.bias",
        "ffn_gate.weight" => "mlp.gate_proj.weight",
        "ffn_up.weight" => "mlp.up_proj.weight",
        "ffn_down.weight" => "mlp.down_proj.weight",
        "attn_norm.weight" => "input_layernorm.weight",
        "ffn_norm.weight" => "post_attention_layernorm.weight",
        _ => return None,
    };
    Some(format!("model.layers.{layer}.{hf}"))
}

/// Every tensor of a GGUF llama model under its HF name, f32, q/k rows back in HF order.
pub fn llama_tensors(gguf: &Gguf) -> Result<BTreeMap<String, Tensor>> {
    let heads = meta_i64(gguf, "llama.attention.head_count")?;
    let kv_heads = gguf
        .metadata
        .get("llama.attention.head_count_kv")
        .and_then(Value::as_i64)
        .unwrap_or(heads);
    let mut out = BTreeMap::new();
    for name in gguf.tensor_names() {
        let Some(hf) = hf_name(name) else {
            if name != "rope_freqs.weight" {
                return Err(Error::UnexpectedTensor {
                    file: gguf.file.clone(),
                    name: name.to_string(),
                });
            }
            continue;
        };
        let mut t = gguf.tensor(name)?;
        let file = gguf.file.as_path();
        if name.ends_with("attn_q.weight") {
            t = unpermute_rotary_rows(&t, heads, name, file)?;
        } else if name.ends_with("attn_k.weight") {
            t = unpermute_rotary_rows(&t, kv_heads, name, file)?;
        } else if name.ends_with("attn_q.bias") || name.ends_with("attn_k.bias") {
            let h = if name.ends_with("attn_q.bias") {
                heads
            } else {
                kv_heads
            };
            t = unpermute_rotary_rows(&t.view([-1, 1]), h, name, file)?.view([-1]);
        }
        out.insert(hf, t.to_kind(Kind::Float));
    }
    Ok(out)
}

fn meta_i64(gguf: &Gguf, key: &str) -> Result<i64> {
    gguf.get(key)?
        .as_i64()
        .ok_or_else(|| Error::config(&gguf.file, key, "expected an integer"))
}

fn meta_f64(gguf: &Gguf, key: &str) -> Result<f64> {
    gguf.get(key)?
        .as_f64()
        .ok_or_else(|| Error::config(&gguf.file, key, "expected a number"))
}

/// An HF `LlamaConfig` (config.json body) from a GGUF file's `llama.*` metadata.
pub fn llama_config(gguf: &Gguf) -> Result<serde_json::Value> {
    let arch = gguf
        .get("general.architecture")?
        .as_str()
        .unwrap_or_default();
    if arch != "llama" {
        return Err(Error::config(
            &gguf.file,
            "general.architecture",
            format!("`{arch}`; only llama GGUF files are supported"),
        ));
    }
    let heads = meta_i64(gguf, "llama.attention.head_count")?;
    let hidden = meta_i64(gguf, "llama.embedding_length")?;
    let vocab = match gguf
        .metadata
        .get("llama.vocab_size")
        .and_then(Value::as_i64)
    {
        Some(v) => v,
        None => gguf
            .get("tokenizer.ggml.tokens")?
            .as_array()
            .map(|a| a.len() as i64)
            .unwrap_or(0),
    };
    let tied = !gguf.tensors.contains_key("output.weight");
    let token = |key: &str| {
        gguf.metadata
            .get(key)
            .and_then(Value::as_i64)
            .map_or(serde_json::Value::Null, serde_json::Value::from)
    };
    let head_dim = gguf
        .metadata
        .get("llama.attention.key_length")
        .and_then(Value::as_i64)
        .unwrap_or(hidden / heads.max(1));
    Ok(serde_json::json!({
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": vocab,
        "hidden_size": hidden,
        "intermediate_size": meta_i64(gguf, "llama.feed_forward_length")?,
        "num_hidden_layers": meta_i64(gguf, "llama.block_count")?,
        "num_attention_heads": heads,
        "num_key_value_heads": gguf.metadata.get("llama.attention.head_count_kv").and_then(Value::as_i64).unwrap_or(heads),
        "head_dim": head_dim,
        "hidden_act": "silu",
        "max_position_embeddings": meta_i64(gguf, "llama.context_length")?,
        "rms_norm_eps": meta_f64(gguf, "llama.attention.layer_norm_rms_epsilon")?,
        "rope_theta": gguf.metadata.get("llama.rope.freq_base").and_then(Value::as_f64).unwrap_or(10000.0),
        "tie_word_embeddings": tied,
        "bos_token_id": token("tokenizer.ggml.bos_token_id"),
        "eos_token_id": token("tokenizer.ggml.eos_token_id"),
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn f16_bytes(x: f32) -> [u8; 2] {
        half::f16::from_f32(x).to_le_bytes()
    }

    #[test]
    fn q4_1_and_q8_0_blocks_dequantise_by_the_reference_formulas() {
        // Q4_1: d = 0.5, m = -1; nibble j (low) = j % 16, high = 15 - j % 16.
        let mut block = Vec::new();
        block.extend(f16_bytes(0.5));
        block.extend(f16_bytes(-1.0));
        block.extend((0..16u8).map(|j| j | ((15 - j) << 4)));
        let x = dequantise(3, &block, 32);
        for j in 0..16 {
            assert_eq!(x[j], 0.5 * j as f32 - 1.0);
            assert_eq!(x[16 + j], 0.5 * (15 - j) as f32 - 1.0);
        }
        let mut block = Vec::new();
        block.extend(f16_bytes(0.25));
        block.extend((0..32).map(|j| (j as i8 - 16) as u8));
        let x = dequantise(8, &block, 32);
        for (j, v) in x.iter().enumerate() {
            assert_eq!(*v, 0.25 * (j as f32 - 16.0));
        }
    }

    #[test]
    fn unpermute_inverts_the_converters_permutation() {
        // llama.cpp's `permute`: reshape(heads, 2, hd/2, cols).swapaxes(1, 2).
        let heads = 3;
        let w = Tensor::arange(3 * 8 * 5, (Kind::Float, tch::Device::Cpu)).view([24, 5]);
        let permuted = w.reshape([heads, 2, 4, 5]).transpose(1, 2).reshape([24, 5]);
        let file = Path::new("t.gguf");
        assert!(unpermute_rotary_rows(&permuted, heads, "q", file)
            .unwrap()
            .equal(&w));
        // Rows that are not whole heads: an error naming the tensor, not a panic.
        let err = unpermute_rotary_rows(&w.narrow(0, 0, 10), heads, "blk.0.attn_q.weight", file)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("blk.0.attn_q.weight") && err.contains("t.gguf"),
            "{err}"
        );
    }

    #[test]
    fn names_map_to_hf_and_unknown_ones_do_not() {
        assert_eq!(
            hf_name("blk.7.ffn_gate.weight").as_deref(),
            Some("model.layers.7.mlp.gate_proj.weight")
        );
        assert_eq!(
            hf_name("blk.0.attn_output.weight").as_deref(),
            Some("model.layers.0.self_attn.o_proj.weight")
        );
        assert_eq!(hf_name("blk.x.attn_q.weight"), None);
        assert_eq!(hf_name("something"), None);
    }

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
}
