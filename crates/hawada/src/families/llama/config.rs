//! `config.json` of a LLaMA-style decoder: HF `LlamaConfig` fields (which `MistralConfig`,
//! `Qwen2Config` and `Qwen3Config` share), HawAda's gate size and the slim widths (shared with ViT,
//! flattened so the `hawada_*` keys stay top-level), with presets and validation. `model_type`
//! picks the [`Variant`]; the variants' own keys (`use_sliding_window`, `sliding_window`,
//! `max_window_layers`, `layer_types`) stay in `other`, written back as they were read, and are
//! checked here.

use super::super::layers::check_positive;
use super::super::slim_widths::SlimWidths;
use crate::error::{Error, Result};
use serde::{Deserialize, Serialize};
use std::path::Path;

/// `config.json` of a causal LM (HF `LlamaConfig` fields, plus HawAda's gate size and slim
/// widths); `model_type` is `llama`, `mistral`, `qwen2` or `qwen3` (see [`Variant`]). Both
/// rope conventions read: `rope_theta` + `rope_scaling` (transformers 4) and `rope_parameters`
/// (transformers 5).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LlamaConfig {
    pub architectures: Vec<String>,
    pub model_type: String,
    pub vocab_size: i64,
    pub hidden_size: i64,
    pub intermediate_size: i64,
    pub num_hidden_layers: usize,
    pub num_attention_heads: i64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub num_key_value_heads: Option<i64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub head_dim: Option<i64>,
    #[serde(default = "default_act")]
    pub hidden_act: String,
    #[serde(default = "default_max_positions")]
    pub max_position_embeddings: i64,
    #[serde(default = "default_rms_eps")]
    pub rms_norm_eps: f64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rope_theta: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rope_scaling: Option<serde_json::Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rope_parameters: Option<serde_json::Value>,
    #[serde(default)]
    pub tie_word_embeddings: bool,
    #[serde(default)]
    pub attention_bias: bool,
    #[serde(default)]
    pub mlp_bias: bool,
    /// SwiGLU units per gate.
    #[serde(default = "default_channels_per_gate")]
    pub channels_per_gate: i64,
    /// Also gate whole attention and MLP sublayers (one gate each per layer). Small models at
    /// small decode batches are bound by kernel count, not width: only removing sublayers makes
    /// them faster there.
    #[serde(default = "default_true")]
    pub sublayer_gates: bool,
    /// Slim: per-layer widths and kept sublayers (`hawada_heads`, `hawada_kv_heads`,
    /// `hawada_intermediate_sizes`, `hawada_attention_layers`, `hawada_mlp_layers`).
    #[serde(flatten)]
    pub slim: SlimWidths,
    /// Other HF keys (bos/eos ids, torch_dtype, …) kept as they are.
    #[serde(flatten)]
    pub other: serde_json::Map<String, serde_json::Value>,
}

/// The decoders that share LLaMA's structure (RMSNorm, rotary GQA attention, SwiGLU), by HF
/// `model_type`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Variant {
    /// `LlamaForCausalLM`: biases on q, k, v and o together when `attention_bias`.
    Llama,
    /// `MistralForCausalLM`: no biases; a `sliding_window` that would bite is refused.
    Mistral,
    /// `Qwen2ForCausalLM`: q, k and v always have biases, o never; sliding window refused
    /// where it would bite.
    Qwen2,
    /// `Qwen3ForCausalLM`: Qwen2's window rule, biases as Llama's `attention_bias`, and an
    /// RMSNorm over each query and key head (`q_norm`, `k_norm`, `[head_dim]`) before rope.
    Qwen3,
}

/// The `model_type`s of [`Variant`], for errors.
pub const SUPPORTED_MODEL_TYPES: &str = "llama, mistral, qwen2, qwen3";

fn default_act() -> String {
    "silu".into()
}
fn default_max_positions() -> i64 {
    2048
}
fn default_rms_eps() -> f64 {
    1e-6
}
fn default_channels_per_gate() -> i64 {
    64
}
fn default_true() -> bool {
    true
}

impl LlamaConfig {
    /// Llama-3.2-1B's shapes (random-init latency studies: no weights are to be had here).
    pub fn llama32_1b() -> Self {
        LlamaConfig {
            architectures: vec!["LlamaForCausalLM".into()],
            model_type: "llama".into(),
            vocab_size: 128256,
            hidden_size: 2048,
            intermediate_size: 8192,
            num_hidden_layers: 16,
            num_attention_heads: 32,
            num_key_value_heads: Some(8),
            head_dim: Some(64),
            hidden_act: default_act(),
            max_position_embeddings: 131072,
            rms_norm_eps: 1e-5,
            rope_theta: Some(500000.0),
            rope_scaling: Some(serde_json::json!({
                "rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0,
                "high_freq_factor": 4.0, "original_max_position_embeddings": 8192
            })),
            rope_parameters: None,
            tie_word_embeddings: true,
            attention_bias: false,
            mlp_bias: false,
            channels_per_gate: 128,
            sublayer_gates: true,
            slim: SlimWidths::default(),
            other: Default::default(),
        }
    }

    /// Two layers, width 32, GQA 4:2, llama3 rope scaling, for tests.
    pub fn tiny() -> Self {
        LlamaConfig {
            vocab_size: 64,
            hidden_size: 32,
            intermediate_size: 48,
            num_hidden_layers: 2,
            num_attention_heads: 4,
            num_key_value_heads: Some(2),
            head_dim: Some(8),
            max_position_embeddings: 256,
            rope_theta: Some(10000.0),
            rope_scaling: Some(serde_json::json!({
                "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                "high_freq_factor": 4.0, "original_max_position_embeddings": 64
            })),
            tie_word_embeddings: false,
            channels_per_gate: 8,
            ..Self::llama32_1b()
        }
    }

    /// A Qwen2 of the tiny shapes (q/k/v biases, no rope scaling, untied head), for tests.
    pub fn tiny_qwen2() -> Self {
        let mut other = serde_json::Map::new();
        other.insert("use_sliding_window".into(), false.into());
        other.insert("sliding_window".into(), 256.into());
        other.insert("max_window_layers".into(), 2.into());
        LlamaConfig {
            architectures: vec!["Qwen2ForCausalLM".into()],
            model_type: "qwen2".into(),
            rope_theta: Some(1_000_000.0),
            rope_scaling: None,
            other,
            ..Self::tiny()
        }
    }

    /// A Qwen3 of the tiny shapes (q/k norms, no biases, no rope scaling, untied head), for
    /// tests.
    pub fn tiny_qwen3() -> Self {
        LlamaConfig {
            architectures: vec!["Qwen3ForCausalLM".into()],
            model_type: "qwen3".into(),
            ..Self::tiny_qwen2()
        }
    }

    /// The variant `model_type` names, or an error listing the supported ones.
    pub fn variant(&self, file: &Path) -> Result<Variant> {
        self.known_variant().ok_or_else(|| {
            Error::config(
                file,
                "model_type",
                format!(
                    "`{}` is not a LLaMA-style decoder; supported: {SUPPORTED_MODEL_TYPES}",
                    self.model_type
                ),
            )
        })
    }

    fn known_variant(&self) -> Option<Variant> {
        match self.model_type.as_str() {
            "llama" => Some(Variant::Llama),
            "mistral" => Some(Variant::Mistral),
            "qwen2" => Some(Variant::Qwen2),
            "qwen3" => Some(Variant::Qwen3),
            _ => None,
        }
    }

    /// Whether q, k and v projections have biases.
    pub(super) fn qkv_bias(&self) -> bool {
        self.attention_bias || self.known_variant() == Some(Variant::Qwen2)
    }

    /// Whether the o projection has a bias (Qwen2's never has).
    pub(super) fn o_bias(&self) -> bool {
        self.attention_bias && self.known_variant() != Some(Variant::Qwen2)
    }

    /// Whether each query and key head is RMS-normed before rope (Qwen3).
    pub(super) fn qk_norm(&self) -> bool {
        self.known_variant() == Some(Variant::Qwen3)
    }

    pub fn kv_heads(&self) -> i64 {
        self.num_key_value_heads.unwrap_or(self.num_attention_heads)
    }

    pub fn head_dim(&self) -> i64 {
        self.head_dim
            .unwrap_or(self.hidden_size / self.num_attention_heads.max(1))
    }

    /// Query heads, KV heads and SwiGLU width of layer `i`.
    pub(super) fn layer_widths(&self, i: usize) -> (i64, i64, i64) {
        (
            self.slim.heads(i, self.num_attention_heads),
            self.slim.kv_heads(i, self.kv_heads()),
            self.slim.intermediate_size(i, self.intermediate_size),
        )
    }

    pub(super) fn validate(&self, file: &Path) -> Result<()> {
        let variant = self.variant(file)?;
        self.check_sizes(file)?;
        self.check_sliding_window(file, variant)?;
        self.slim.validate(file, self.num_hidden_layers)?;
        for i in 0..self.num_hidden_layers {
            let (heads, kv_heads, _) = self.layer_widths(i);
            if heads % kv_heads != 0 {
                return Err(Error::config(
                    file,
                    "num_key_value_heads",
                    format!("layer {i}: {kv_heads} KV heads do not divide {heads} query heads"),
                ));
            }
        }
        self.rope(file).map(|_| ())
    }

    /// Sizes positive, heads of even width, a SwiGLU activation.
    fn check_sizes(&self, file: &Path) -> Result<()> {
        check_positive(
            file,
            &[
                ("vocab_size", self.vocab_size),
                ("hidden_size", self.hidden_size),
                ("num_hidden_layers", self.num_hidden_layers as i64),
                ("intermediate_size", self.intermediate_size),
                ("num_attention_heads", self.num_attention_heads),
                ("num_key_value_heads", self.kv_heads()),
                ("head_dim", self.head_dim()),
                ("channels_per_gate", self.channels_per_gate),
            ],
        )?;
        if self.head_dim() % 2 != 0 {
            return Err(Error::config(
                file,
                "head_dim",
                "must be even (rotary embeddings rotate pairs)",
            ));
        }
        if self.hidden_act != "silu" {
            return Err(Error::config(
                file,
                "hidden_act",
                format!("`{}` is not supported; expected silu", self.hidden_act),
            ));
        }
        Ok(())
    }

    /// Sliding-window attention is refused where it would change results: a window shorter than
    /// the context on some layer (Mistral: `sliding_window`; Qwen2/Qwen3: `use_sliding_window` on
    /// the layers from `max_window_layers`, or `layer_types`). HawAda attends to the whole
    /// context.
    fn check_sliding_window(&self, file: &Path, variant: Variant) -> Result<()> {
        let window = self.other.get("sliding_window").and_then(|v| v.as_i64());
        let sliding_layers = match variant {
            Variant::Llama => 0,
            Variant::Mistral => self.num_hidden_layers,
            Variant::Qwen2 | Variant::Qwen3 => {
                match self.other.get("layer_types").and_then(|v| v.as_array()) {
                    Some(types) => types
                        .iter()
                        .filter(|t| t.as_str() == Some("sliding_attention"))
                        .count(),
                    None if self.other.get("use_sliding_window") == Some(&true.into()) => {
                        let first = self
                            .other
                            .get("max_window_layers")
                            .and_then(|v| v.as_u64())
                            .unwrap_or(0) as usize;
                        self.num_hidden_layers.saturating_sub(first)
                    }
                    None => 0,
                }
            }
        };
        match window {
            Some(window) if sliding_layers > 0 && window < self.max_position_embeddings => {
                Err(Error::config(
                    file,
                    "sliding_window",
                    format!(
                        "sliding-window attention ({window} tokens on {sliding_layers} of {} \
                         layers, contexts up to {}) is not supported: HawAda attends to the \
                         whole context, which changes results past {window} tokens",
                        self.num_hidden_layers, self.max_position_embeddings
                    ),
                ))
            }
            _ => Ok(()),
        }
    }
}
