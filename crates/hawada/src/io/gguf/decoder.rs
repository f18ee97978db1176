//! A decoder's GGUF (llama.cpp architectures `llama`, `qwen2` and `qwen3`) as an HF checkpoint:
//! tensor names mapped to `LlamaForCausalLM` / `Qwen2ForCausalLM` / `Qwen3ForCausalLM` names (q/k
//! rows of `llama` files un-permuted), and an HF config from the `{arch}.*` metadata. Every
//! `{arch}.*` key is either read or refused by name: a key this reader does not know could change
//! the model (an expert count, a rope scaling), so it is an error, never skipped.
//! `rope_freqs.weight` (llama3 rope factors) is left to the family, which turns it into
//! `rope_scaling`. Keys: llama.cpp `gguf-py/gguf/constants.py` (`Keys.LLM`, `Keys.Attention`,
//! `Keys.Rope`).

use super::{Gguf, Value};
use crate::error::{Error, Result};
use std::collections::BTreeMap;
use std::path::Path;
use tch::{Kind, Tensor};

/// The GGUF architectures (`general.architecture`) this reader maps.
pub const SUPPORTED_ARCHITECTURES: &str = "llama, qwen2, qwen3";

/// llama3-style rope frequency factors, `[head_dim / 2]` f32: llama.cpp divides each inverse
/// frequency by its factor.
pub const ROPE_FREQS: &str = "rope_freqs.weight";

/// A decoder architecture of llama.cpp.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Architecture {
    Llama,
    Qwen2,
    Qwen3,
}

impl Architecture {
    fn of(gguf: &Gguf) -> Result<Architecture> {
        let arch = gguf
            .get("general.architecture")?
            .as_str()
            .unwrap_or_default();
        match arch {
            "llama" => Ok(Architecture::Llama),
            "qwen2" => Ok(Architecture::Qwen2),
            "qwen3" => Ok(Architecture::Qwen3),
            other => Err(Error::config(
                &gguf.file,
                "general.architecture",
                format!("`{other}` is not supported; supported: {SUPPORTED_ARCHITECTURES}"),
            )),
        }
    }

    fn prefix(self) -> &'static str {
        match self {
            Architecture::Llama => "llama",
            Architecture::Qwen2 => "qwen2",
            Architecture::Qwen3 => "qwen3",
        }
    }

    /// (HF `architectures[0]`, HF `model_type`).
    fn hf_names(self) -> (&'static str, &'static str) {
        match self {
            Architecture::Llama => ("LlamaForCausalLM", "llama"),
            Architecture::Qwen2 => ("Qwen2ForCausalLM", "qwen2"),
            Architecture::Qwen3 => ("Qwen3ForCausalLM", "qwen3"),
        }
    }

    /// llama.cpp's converter permutes q/k rows for `llama` (its rope kernel rotates adjacent
    /// pairs); `qwen2`/`qwen3` files keep HF's half-split order (llama.cpp's NEOX rope).
    fn permutes_rotary_rows(self) -> bool {
        self == Architecture::Llama
    }

    /// Whether its layers have per-head q/k norms (`attn_q_norm`, `attn_k_norm`).
    fn has_qk_norm(self) -> bool {
        self == Architecture::Qwen3
    }
}

/// The `{arch}.*` keys read here (suffixes).
const KNOWN_KEYS: &[&str] = &[
    "context_length",
    "embedding_length",
    "block_count",
    "feed_forward_length",
    "vocab_size",
    "attention.head_count",
    "attention.head_count_kv",
    "attention.layer_norm_rms_epsilon",
    "attention.key_length",
    "attention.value_length",
    "rope.freq_base",
    "rope.dimension_count",
    "rope.scaling.type",
    "rope.scaling.factor",
    "rope.scaling.original_context_length",
    "rope.scaling.finetuned",
    "expert_count",
    "expert_used_count",
];

/// Metadata of one architecture: typed reads of `{arch}.*` keys, errors naming the key.
struct Meta<'a> {
    gguf: &'a Gguf,
    arch: Architecture,
}

impl Meta<'_> {
    fn key(&self, suffix: &str) -> String {
        format!("{}.{suffix}", self.arch.prefix())
    }
    fn value(&self, suffix: &str) -> Option<&Value> {
        self.gguf.metadata.get(&self.key(suffix))
    }
    fn int(&self, suffix: &str) -> Result<Option<i64>> {
        self.value(suffix)
            .map(|v| {
                v.as_i64().ok_or_else(|| {
                    Error::config(&self.gguf.file, &self.key(suffix), "expected an integer")
                })
            })
            .transpose()
    }
    fn float(&self, suffix: &str) -> Result<Option<f64>> {
        self.value(suffix)
            .map(|v| {
                v.as_f64().ok_or_else(|| {
                    Error::config(&self.gguf.file, &self.key(suffix), "expected a number")
                })
            })
            .transpose()
    }
    fn required_int(&self, suffix: &str) -> Result<i64> {
        self.int(suffix)?.ok_or_else(|| self.missing(suffix))
    }
    fn required_float(&self, suffix: &str) -> Result<f64> {
        self.float(suffix)?.ok_or_else(|| self.missing(suffix))
    }
    fn missing(&self, suffix: &str) -> Error {
        Error::config(
            &self.gguf.file,
            &self.key(suffix),
            "missing from the GGUF metadata",
        )
    }
    fn refuse(&self, suffix: &str, reason: String) -> Error {
        Error::config(&self.gguf.file, &self.key(suffix), reason)
    }

    /// Every `{arch}.*` key is one this reader handles, and `split.count` (a GGUF split over
    /// several files) is at most 1.
    fn check_keys(&self) -> Result<()> {
        let prefix = format!("{}.", self.arch.prefix());
        for key in self.gguf.metadata.keys() {
            let Some(suffix) = key.strip_prefix(&prefix) else {
                continue;
            };
            if !KNOWN_KEYS.contains(&suffix) {
                return Err(self.refuse(
                    suffix,
                    format!(
                        "metadata key not supported (a {} feature this reader does not \
                         implement); supported: {}",
                        self.arch.prefix(),
                        KNOWN_KEYS.join(", ")
                    ),
                ));
            }
        }
        for suffix in ["expert_count", "expert_used_count"] {
            if self.int(suffix)?.unwrap_or(0) != 0 {
                return Err(
                    self.refuse(suffix, "mixture-of-experts models are not supported".into())
                );
            }
        }
        let parts = self
            .gguf
            .metadata
            .get("split.count")
            .and_then(Value::as_i64)
            .unwrap_or(1);
        if parts > 1 {
            return Err(Error::config(
                &self.gguf.file,
                "split.count",
                format!(
                    "a GGUF split into {parts} files is not supported; merge it first \
                     (llama-gguf-split --merge)"
                ),
            ));
        }
        Ok(())
    }

    /// `rope_scaling` of the metadata: `None` for none, linear as HF's `linear` rope type (as
    /// llama.cpp, a factor without a type is linear). (llama3 scaling comes as
    /// `rope_freqs.weight`, read by the family.)
    fn rope_scaling(&self) -> Result<serde_json::Value> {
        let factor = self.float("rope.scaling.factor")?;
        let kind = match self.value("rope.scaling.type") {
            Some(v) => Some(v.as_str().unwrap_or("?").to_string()),
            None if factor.is_some_and(|f| f != 0.0 && f != 1.0) => Some("linear".into()),
            None => None,
        };
        match kind.as_deref() {
            None | Some("none") => Ok(serde_json::Value::Null),
            Some("linear") => Ok(serde_json::json!({
                "rope_type": "linear",
                "factor": self.required_float("rope.scaling.factor")?,
            })),
            Some(other) => Err(self.refuse(
                "rope.scaling.type",
                format!(
                    "rope scaling `{other}` is not supported; supported: none, linear, and \
                     llama3 factors in `{ROPE_FREQS}`"
                ),
            )),
        }
    }
}

/// An HF config (config.json body) from a decoder GGUF's metadata: `LlamaConfig` for `llama`,
/// `Qwen2Config` for `qwen2`. Rope scaling from `rope_freqs.weight` is not in it (see
/// [`ROPE_FREQS`]).
pub fn decoder_config(gguf: &Gguf) -> Result<serde_json::Value> {
    let arch = Architecture::of(gguf)?;
    let meta = Meta { gguf, arch };
    meta.check_keys()?;
    let heads = meta.required_int("attention.head_count")?;
    let hidden = meta.required_int("embedding_length")?;
    let vocab = match meta.int("vocab_size")? {
        Some(v) => v,
        None => gguf
            .get("tokenizer.ggml.tokens")?
            .as_array()
            .map(|a| a.len() as i64)
            .unwrap_or(0),
    };
    let head_dim = meta
        .int("attention.key_length")?
        .unwrap_or(hidden / heads.max(1));
    if let Some(v) = meta.int("attention.value_length")? {
        if v != head_dim {
            return Err(meta.refuse(
                "attention.value_length",
                format!("{v} differs from the key length {head_dim}; not supported"),
            ));
        }
    }
    if let Some(d) = meta.int("rope.dimension_count")? {
        if d != head_dim {
            return Err(meta.refuse(
                "rope.dimension_count",
                format!("{d}: partial rotary embeddings are not supported (head_dim {head_dim})"),
            ));
        }
    }
    let token = |key: &str| {
        gguf.metadata
            .get(key)
            .and_then(Value::as_i64)
            .map_or(serde_json::Value::Null, serde_json::Value::from)
    };
    let (architecture, model_type) = arch.hf_names();
    let mut config = serde_json::json!({
        "architectures": [architecture],
        "model_type": model_type,
        "vocab_size": vocab,
        "hidden_size": hidden,
        "intermediate_size": meta.required_int("feed_forward_length")?,
        "num_hidden_layers": meta.required_int("block_count")?,
        "num_attention_heads": heads,
        "num_key_value_heads": meta.int("attention.head_count_kv")?.unwrap_or(heads),
        "head_dim": head_dim,
        "hidden_act": "silu",
        "max_position_embeddings": meta.required_int("context_length")?,
        "rms_norm_eps": meta.required_float("attention.layer_norm_rms_epsilon")?,
        "rope_theta": meta.float("rope.freq_base")?.unwrap_or(10000.0),
        "tie_word_embeddings": !gguf.tensors.contains_key("output.weight"),
        "bos_token_id": token("tokenizer.ggml.bos_token_id"),
        "eos_token_id": token("tokenizer.ggml.eos_token_id"),
    });
    let rope_scaling = meta.rope_scaling()?;
    if !rope_scaling.is_null() {
        config["rope_scaling"] = rope_scaling;
    }
    match arch {
        // A llama/qwen3 GGUF with q biases comes from a checkpoint with `attention_bias` (q, k,
        // v and o biases).
        Architecture::Llama => {
            config["attention_bias"] = gguf.tensors.contains_key("blk.0.attn_q.bias").into();
        }
        // llama.cpp attends over the whole context for qwen2/qwen3: no sliding window.
        Architecture::Qwen2 => config["use_sliding_window"] = false.into(),
        Architecture::Qwen3 => {
            config["attention_bias"] = gguf.tensors.contains_key("blk.0.attn_q.bias").into();
            config["use_sliding_window"] = false.into();
        }
    }
    Ok(config)
}

/// A GGUF's llama3 rope factors ([`ROPE_FREQS`]) and the original context length they were made
/// for.
#[derive(Debug, Clone, PartialEq)]
pub struct RopeFactors {
    /// `[head_dim / 2]`: llama.cpp divides inverse frequency i by `factors[i]`.
    pub factors: Vec<f32>,
    /// `{arch}.rope.scaling.original_context_length`, or 8192 where absent (what llama.cpp's
    /// converter assumes when it computes the factors).
    pub original_context: f64,
}

/// The file's [`RopeFactors`], if it has `rope_freqs.weight`; a file that also names another
/// rope scaling is refused (llama.cpp would apply both).
pub fn rope_factors(gguf: &Gguf) -> Result<Option<RopeFactors>> {
    if !gguf.tensors.contains_key(ROPE_FREQS) {
        return Ok(None);
    }
    let meta = Meta {
        gguf,
        arch: Architecture::of(gguf)?,
    };
    if !meta.rope_scaling()?.is_null() {
        return Err(meta.refuse(
            "rope.scaling.type",
            format!("a rope scaling beside `{ROPE_FREQS}` is not supported"),
        ));
    }
    let t = gguf.tensor(ROPE_FREQS)?.flatten(0, -1).to_kind(Kind::Float);
    let factors = Vec::<f32>::try_from(&t).map_err(|e| Error::Data {
        file: gguf.file.clone(),
        reason: format!("tensor `{ROPE_FREQS}`: {e}"),
    })?;
    Ok(Some(RopeFactors {
        factors,
        original_context: meta
            .float("rope.scaling.original_context_length")?
            .unwrap_or(8192.0),
    }))
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

/// The GGUF tensor names of a layer (suffixes of `blk.{i}.`) and their HF names (suffixes of
/// `model.layers.{i}.`).
const LAYER_TENSORS: &[(&str, &str)] = &[
    ("attn_q.weight", "self_attn.q_proj.weight"),
    ("attn_k.weight", "self_attn.k_proj.weight"),
    ("attn_v.weight", "self_attn.v_proj.weight"),
    ("attn_output.weight", "self_attn.o_proj.weight"),
    ("attn_q.bias", "self_attn.q_proj.bias"),
    ("attn_k.bias", "self_attn.k_proj.bias"),
    ("attn_v.bias", "self_attn.v_proj.bias"),
    ("attn_output.bias", "self_attn.o_proj.bias"),
    ("ffn_gate.weight", "mlp.gate_proj.weight"),
    ("ffn_up.weight", "mlp.up_proj.weight"),
    ("ffn_down.weight", "mlp.down_proj.weight"),
    ("attn_norm.weight", "input_layernorm.weight"),
    ("ffn_norm.weight", "post_attention_layernorm.weight"),
];

/// Per-head q/k norms, for architectures that have them.
const QK_NORM_TENSORS: &[(&str, &str)] = &[
    ("attn_q_norm.weight", "self_attn.q_norm.weight"),
    ("attn_k_norm.weight", "self_attn.k_norm.weight"),
];

/// The layer tensors of `arch`.
fn layer_tensors(
    arch: Architecture,
) -> impl Iterator<Item = &'static (&'static str, &'static str)> {
    let norms = if arch.has_qk_norm() {
        QK_NORM_TENSORS
    } else {
        &[]
    };
    LAYER_TENSORS.iter().chain(norms)
}

/// HF name of a GGUF decoder tensor of `arch`, or `None` if it is not one this reader maps.
fn hf_name(arch: Architecture, gguf_name: &str) -> Option<String> {
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
    let (_, hf) = layer_tensors(arch).find(|(g, _)| *g == tail)?;
    Some(format!("model.layers.{layer}.{hf}"))
}

/// Every tensor of a decoder GGUF under its HF name, f32, q/k rows back in HF order; a tensor
/// that is neither mapped nor [`ROPE_FREQS`] is an error naming it.
pub fn decoder_tensors(gguf: &Gguf) -> Result<BTreeMap<String, Tensor>> {
    let mut out = BTreeMap::new();
    for_each_decoder_tensor(gguf, |name, t| {
        out.insert(name, t);
        Ok(())
    })?;
    Ok(out)
}

/// [`decoder_tensors`] one at a time: `each(hf_name, tensor)` for every tensor, dequantised
/// when its turn comes. A model's f32 weights are ~7× its Q4_K bytes; this way they are never
/// all held beside the model they are copied into.
pub fn for_each_decoder_tensor(
    gguf: &Gguf,
    mut each: impl FnMut(String, Tensor) -> Result<()>,
) -> Result<()> {
    let arch = Architecture::of(gguf)?;
    let meta = Meta { gguf, arch };
    let heads = meta.required_int("attention.head_count")?;
    let kv_heads = meta.int("attention.head_count_kv")?.unwrap_or(heads);
    let file = gguf.file.as_path();
    for name in gguf.tensor_names() {
        if name == ROPE_FREQS {
            continue;
        }
        let Some(hf) = hf_name(arch, name) else {
            let known: Vec<&str> = layer_tensors(arch).map(|(g, _)| *g).collect();
            return Err(Error::Data {
                file: file.to_path_buf(),
                reason: format!(
                    "tensor `{name}` is not supported for a {} GGUF; supported: token_embd, \
                     output_norm, output, {ROPE_FREQS} and per block blk.N.{{{}}}",
                    arch.prefix(),
                    known.join(", ")
                ),
            });
        };
        let mut t = gguf.tensor(name)?;
        if arch.permutes_rotary_rows() {
            let rotary_heads = if name.contains("attn_q.") {
                Some(heads)
            } else if name.contains("attn_k.") {
                Some(kv_heads)
            } else {
                None
            };
            if let Some(h) = rotary_heads {
                t = if name.ends_with(".bias") {
                    unpermute_rotary_rows(&t.view([-1, 1]), h, name, file)?.view([-1])
                } else {
                    unpermute_rotary_rows(&t, h, name, file)?
                };
            }
        }
        each(hf, t.to_kind(Kind::Float))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

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
        let hf_name = |name| hf_name(Architecture::Qwen2, name);
        assert_eq!(
            hf_name("blk.7.ffn_gate.weight").as_deref(),
            Some("model.layers.7.mlp.gate_proj.weight")
        );
        assert_eq!(
            hf_name("blk.0.attn_output.weight").as_deref(),
            Some("model.layers.0.self_attn.o_proj.weight")
        );
        assert_eq!(
            hf_name("blk.3.attn_v.bias").as_deref(),
            Some("model.layers.3.self_attn.v_proj.bias")
        );
        assert_eq!(hf_name("blk.x.attn_q.weight"), None);
        assert_eq!(hf_name("blk.0.attn_q_norm.weight"), None);
        assert_eq!(hf_name("something"), None);
        assert_eq!(
            super::hf_name(Architecture::Qwen3, "blk.1.attn_k_norm.weight").as_deref(),
            Some("model.layers.1.self_attn.k_norm.weight")
        );
    }
}
