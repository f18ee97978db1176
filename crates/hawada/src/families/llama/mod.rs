//! LLaMA (Llama-3.x, SmolLM2) in Hugging Face's `LlamaForCausalLM` layout and names
//! (`model.layers.{i}.self_attn.q_proj`, `…mlp.gate_proj`, `lm_head`): RMSNorm, rotary position
//! embeddings (default or `llama3` scaling, HF's half-split `rotate_half` layout), SwiGLU
//! (`down(silu(gate(x)) · up(x))`), grouped-query attention through
//! `scaled_dot_product_attention` with `enable_gqa`, tied or untied embeddings, and a KV cache
//! for decoding. GGUF files load through `io::gguf`, which maps names and undoes llama.cpp's q/k
//! row permutation.
//!
//! Gate groups (DESIGN §2), per layer: whole KV groups (k, v rows), query heads (q rows and
//! o_proj columns) that *follow* their KV group, so a query head keeps its own KV head and a KV
//! group goes with all its query heads; SwiGLU units in groups of `channels_per_gate` (gate and
//! up rows, down columns together). RoPE is untouched by pruning: it acts within a head. A slim
//! export is the stock config plus per-layer `hawada_heads`, `hawada_kv_heads` and
//! `hawada_intermediate_sizes`; when every layer shares one width those lists are dropped and the
//! config is a stock `LlamaConfig`.

use super::layers::{
    check_layer_flags, check_layer_widths, drop_modules, gated, sublayer_gate, sublayer_kept,
    Linear,
};
use crate::error::{Error, Result};
use crate::export::slice::slice_tensors;
use crate::io::safetensors::{load_into, named_tensors};
use crate::model::{
    unit_width, CostSite, Family, Group, KeepSet, Masks, Member, NormFolding, Phase, SiteOp,
    UnitKind, Width, Workload,
};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::path::Path;
use tch::{nn, nn::VarStore, Device, Kind, Tensor};

/// `config.json` of a causal LM (HF `LlamaConfig` fields, plus HawAda's gate size and slim
/// widths). Both rope conventions read: `rope_theta` + `rope_scaling` (transformers 4) and
/// `rope_parameters` (transformers 5).
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
    /// Slim: which layers keep their attention sublayer (absent: all).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hawada_attention_layers: Option<Vec<bool>>,
    /// Slim: which layers keep their MLP sublayer (absent: all).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hawada_mlp_layers: Option<Vec<bool>>,
    /// Slim widths: query heads per layer.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hawada_heads: Option<Vec<i64>>,
    /// Slim widths: KV heads per layer.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hawada_kv_heads: Option<Vec<i64>>,
    /// Slim widths: SwiGLU width per layer.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hawada_intermediate_sizes: Option<Vec<i64>>,
    /// Other HF keys (bos/eos ids, torch_dtype, …) kept as they are.
    #[serde(flatten)]
    pub other: serde_json::Map<String, serde_json::Value>,
}

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

/// Rotary frequencies: base θ and the scaling rule.
#[derive(Debug, Clone, Copy, PartialEq)]
enum RopeScaling {
    Default,
    /// Llama 3.1's frequency-dependent scaling.
    Llama3 {
        factor: f64,
        low_freq_factor: f64,
        high_freq_factor: f64,
        original_max_positions: f64,
    },
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
            hawada_attention_layers: None,
            hawada_mlp_layers: None,
            hawada_heads: None,
            hawada_kv_heads: None,
            hawada_intermediate_sizes: None,
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

    pub fn kv_heads(&self) -> i64 {
        self.num_key_value_heads.unwrap_or(self.num_attention_heads)
    }

    pub fn head_dim(&self) -> i64 {
        self.head_dim
            .unwrap_or(self.hidden_size / self.num_attention_heads.max(1))
    }

    /// Whether layer `i` has its attention and its MLP sublayer.
    fn layer_sublayers(&self, i: usize) -> (bool, bool) {
        (
            self.hawada_attention_layers.as_ref().is_none_or(|l| l[i]),
            self.hawada_mlp_layers.as_ref().is_none_or(|l| l[i]),
        )
    }

    fn layer_widths(&self, i: usize) -> (i64, i64, i64) {
        (
            self.hawada_heads
                .as_ref()
                .map_or(self.num_attention_heads, |w| w[i]),
            self.hawada_kv_heads
                .as_ref()
                .map_or(self.kv_heads(), |w| w[i]),
            self.hawada_intermediate_sizes
                .as_ref()
                .map_or(self.intermediate_size, |w| w[i]),
        )
    }

    fn rope(&self, file: &Path) -> Result<(f64, RopeScaling)> {
        let params = self.rope_parameters.as_ref().or(self.rope_scaling.as_ref());
        let field = if self.rope_parameters.is_some() {
            "rope_parameters"
        } else {
            "rope_scaling"
        };
        let theta = params
            .and_then(|p| p.get("rope_theta"))
            .and_then(|v| v.as_f64())
            .or(self.rope_theta)
            .unwrap_or(10000.0);
        let Some(params) = params.filter(|p| !p.is_null()) else {
            return Ok((theta, RopeScaling::Default));
        };
        let rope_type = params
            .get("rope_type")
            .or_else(|| params.get("type"))
            .and_then(|v| v.as_str())
            .unwrap_or("default");
        let number = |key: &str| {
            params.get(key).and_then(|v| v.as_f64()).ok_or_else(|| {
                Error::config(file, field, format!("llama3 rope needs a number `{key}`"))
            })
        };
        match rope_type {
            "default" => Ok((theta, RopeScaling::Default)),
            "llama3" => Ok((
                theta,
                RopeScaling::Llama3 {
                    factor: number("factor")?,
                    low_freq_factor: number("low_freq_factor")?,
                    high_freq_factor: number("high_freq_factor")?,
                    original_max_positions: number("original_max_position_embeddings")?,
                },
            )),
            other => Err(Error::config(
                file,
                field,
                format!("rope type `{other}` is not supported; expected default or llama3"),
            )),
        }
    }

    fn validate(&self, file: &Path) -> Result<()> {
        for (field, v) in [
            ("vocab_size", self.vocab_size),
            ("hidden_size", self.hidden_size),
            ("intermediate_size", self.intermediate_size),
            ("num_attention_heads", self.num_attention_heads),
            ("num_key_value_heads", self.kv_heads()),
            ("head_dim", self.head_dim()),
            ("channels_per_gate", self.channels_per_gate),
        ] {
            if v <= 0 {
                return Err(Error::config(
                    file,
                    field,
                    format!("must be positive, found {v}"),
                ));
            }
        }
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
        let layers = self.num_hidden_layers;
        check_layer_widths(
            file,
            layers,
            &[
                ("hawada_heads", &self.hawada_heads),
                ("hawada_kv_heads", &self.hawada_kv_heads),
                ("hawada_intermediate_sizes", &self.hawada_intermediate_sizes),
            ],
        )?;
        check_layer_flags(
            file,
            layers,
            &[
                ("hawada_attention_layers", &self.hawada_attention_layers),
                ("hawada_mlp_layers", &self.hawada_mlp_layers),
            ],
        )?;
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
}

#[derive(Debug)]
struct RmsNorm {
    weight: Tensor,
    eps: f64,
}

impl RmsNorm {
    fn new(p: nn::Path, dim: i64, eps: f64) -> Self {
        RmsNorm {
            weight: p.ones("weight", &[dim]),
            eps,
        }
    }
    fn forward(&self, x: &Tensor) -> Tensor {
        x.rms_norm([self.weight.size()[0]], Some(&self.weight), self.eps)
    }
}

/// Cos and sin of the rotary angles for a run of positions, `[tokens, head_dim]`, in the
/// model's dtype (computed in f32 as transformers does).
struct Rotary {
    cos: Tensor,
    sin: Tensor,
}

impl Rotary {
    /// HF's `rotate_half` convention: `x·cos + [−x₂, x₁]·sin`, halves of the head.
    fn apply(&self, x: &Tensor) -> Tensor {
        let half = x.size()[3] / 2;
        let rotated = Tensor::cat(&[-x.narrow(3, half, half), x.narrow(3, 0, half)], 3);
        x * &self.cos + rotated * &self.sin
    }
}

/// Keys and values for decoding, per layer with attention: `[batch, kv_heads, capacity,
/// head_dim]` each.
pub struct KvCache {
    layers: Vec<Option<(Tensor, Tensor)>>,
}

#[derive(Debug)]
struct Attention {
    q_proj: Linear,
    k_proj: Linear,
    v_proj: Linear,
    o_proj: Linear,
    heads: i64,
    kv_heads: i64,
    head_group: usize,
    kv_group: usize,
    /// Inference copies: q, k and v stacked into one projection (one GEMM instead of three).
    fused_qkv: Option<Linear>,
}

impl Attention {
    /// `x` `[batch, tokens, hidden]`; with a cache, keys and values are written at
    /// `[start, start + tokens)` and attention reads `[0, start + tokens)`.
    fn forward(
        &self,
        x: &Tensor,
        masks: &Masks,
        rotary: &Rotary,
        cache: Option<(&Tensor, &Tensor, i64)>,
        head_dim: i64,
    ) -> Tensor {
        let (b, t, _) = x
            .size3()
            .expect("hidden states are [batch, tokens, hidden]");
        let split = |y: Tensor, heads: i64| y.view([b, t, heads, head_dim]).transpose(1, 2);
        let (q, k, v) = match &self.fused_qkv {
            Some(qkv) => {
                let (h, kv) = (self.heads, self.kv_heads);
                let y = split(qkv.forward(x), h + 2 * kv);
                // One rotation for the query and key heads together.
                let qk = rotary.apply(&y.narrow(1, 0, h + kv));
                (
                    qk.narrow(1, 0, h),
                    qk.narrow(1, h, kv),
                    y.narrow(1, h + kv, kv),
                )
            }
            None => (
                rotary.apply(&split(self.q_proj.forward(x), self.heads)),
                rotary.apply(&split(self.k_proj.forward(x), self.kv_heads)),
                split(self.v_proj.forward(x), self.kv_heads),
            ),
        };
        let (k, v) = match cache {
            Some((keys, values, start)) => {
                keys.narrow(2, start, t).copy_(&k);
                values.narrow(2, start, t).copy_(&v);
                (keys.narrow(2, 0, start + t), values.narrow(2, 0, start + t))
            }
            None => (k, v),
        };
        // Causal within the new tokens; a cached prefix (decode: one new token) is all visible.
        let causal = t > 1;
        let attn = Tensor::scaled_dot_product_attention(
            &q,
            &k,
            &v,
            None::<Tensor>,
            0.0,
            causal,
            None,
            self.heads != self.kv_heads,
        );
        let gate = match (masks.get(self.head_group), masks.get(self.kv_group)) {
            (None, None) => None,
            (heads, kv) => {
                let per_kv = self.heads / self.kv_heads;
                let heads = heads.map(|m| m.view([self.kv_heads, per_kv, head_dim]));
                let kv = kv.map(|m| m.view([self.kv_heads, 1, head_dim]));
                let both = match (heads, kv) {
                    (Some(h), Some(k)) => h * k,
                    (Some(h), None) => h,
                    (None, Some(k)) => k.expand([self.kv_heads, per_kv, head_dim], false),
                    (None, None) => unreachable!("matched above"),
                };
                Some(both.reshape([1, self.heads, 1, head_dim]))
            }
        };
        // Out of place: SDPA's backward reads its own output.
        let attn = match gate {
            Some(g) => attn * g,
            None => attn,
        };
        let attn = attn.transpose(1, 2).reshape([b, t, self.heads * head_dim]);
        self.o_proj.forward(&attn)
    }
}

#[derive(Debug)]
struct Mlp {
    gate_proj: Linear,
    up_proj: Linear,
    down_proj: Linear,
    group: usize,
    /// Inference copies: gate and up stacked into one projection.
    fused_gate_up: Option<Linear>,
}

impl Mlp {
    fn forward(&self, x: &Tensor, masks: &Masks) -> Tensor {
        let u = match &self.fused_gate_up {
            Some(gate_up) => {
                let both = gate_up.forward(x);
                let width = both.size()[both.dim() - 1] / 2;
                both.narrow(-1, 0, width).silu() * both.narrow(-1, width, width)
            }
            None => self.gate_proj.forward(x).silu() * self.up_proj.forward(x),
        };
        let u = match masks.get(self.group) {
            Some(m) => u * m,
            None => u,
        };
        self.down_proj.forward(&u)
    }
}

/// `h + gate · self_attn(input_layernorm(h))`.
#[derive(Debug)]
struct AttentionSublayer {
    input_layernorm: RmsNorm,
    self_attn: Attention,
    /// The sublayer's gate group, when sublayers are gated.
    gate: Option<usize>,
}

/// `h + gate · mlp(post_attention_layernorm(h))`.
#[derive(Debug)]
struct MlpSublayer {
    post_attention_layernorm: RmsNorm,
    mlp: Mlp,
    gate: Option<usize>,
}

/// A decoder layer; a slim export may have dropped either sublayer.
#[derive(Debug)]
struct DecoderLayer {
    attention: Option<AttentionSublayer>,
    feed_forward: Option<MlpSublayer>,
}

pub struct Llama {
    vs: VarStore,
    cfg: LlamaConfig,
    embed_tokens: Tensor,
    layers: Vec<DecoderLayer>,
    norm: RmsNorm,
    /// `None` when the embeddings are tied.
    lm_head: Option<Linear>,
    /// `[head_dim / 2]` f32 rotary inverse frequencies (after scaling).
    inv_freq: Tensor,
    groups: Vec<Group>,
}

/// Inverse frequencies `θ^(−2i/d)`, Llama-3.1-scaled when asked (transformers'
/// `_compute_llama3_parameters`).
fn inverse_frequencies(head_dim: i64, theta: f64, scaling: RopeScaling) -> Vec<f32> {
    (0..head_dim / 2)
        .map(|i| {
            let inv = 1.0 / theta.powf((2 * i) as f64 / head_dim as f64);
            let RopeScaling::Llama3 {
                factor,
                low_freq_factor,
                high_freq_factor,
                original_max_positions,
            } = scaling
            else {
                return inv as f32;
            };
            let wavelen = 2.0 * std::f64::consts::PI / inv;
            let low_freq_wavelen = original_max_positions / low_freq_factor;
            let high_freq_wavelen = original_max_positions / high_freq_factor;
            let scaled = if wavelen > low_freq_wavelen {
                inv / factor
            } else if wavelen < high_freq_wavelen {
                inv
            } else {
                let smooth = (original_max_positions / wavelen - low_freq_factor)
                    / (high_freq_factor - low_freq_factor);
                (1.0 - smooth) * inv / factor + smooth * inv
            };
            scaled as f32
        })
        .collect()
}

fn member(tensor: String, axis: i64, block: i64) -> Member {
    Member {
        tensor,
        axis,
        block,
    }
}

impl Llama {
    /// Builds the architecture with random weights on `device` in f32.
    pub fn new(cfg: LlamaConfig, device: Device, file: &Path) -> Result<Self> {
        Self::new_in(cfg, (Kind::Float, device), file)
    }

    /// Builds the architecture with its variables created in `kind`, for weights loaded next:
    /// an f32 model cast afterwards would hold twice the memory first (an 8B slim copy on an
    /// H100: 32 GB of f32 beside the 16 GB bf16 teacher).
    pub fn new_in(cfg: LlamaConfig, (kind, device): (Kind, Device), file: &Path) -> Result<Self> {
        cfg.validate(file)?;
        let (theta, scaling) = cfg.rope(file)?;
        let mut vs = VarStore::new(device);
        vs.set_kind(kind);
        let root = vs.root();
        let model = &root / "model";
        let d = cfg.hidden_size;
        let head_dim = cfg.head_dim();
        let embed_tokens =
            (&model / "embed_tokens").randn("weight", &[cfg.vocab_size, d], 0.0, 0.02);
        let mut groups = Vec::new();
        let mut layers = Vec::new();
        for i in 0..cfg.num_hidden_layers {
            let lp = &model / "layers" / i;
            let name = format!("model.layers.{i}");
            let (heads, kv_heads, mlp_width) = cfg.layer_widths(i);
            let (has_attention, has_mlp) = cfg.layer_sublayers(i);
            let eps = cfg.rms_norm_eps;
            let attention = has_attention.then(|| {
                let attn = &lp / "self_attn";
                let bias = cfg.attention_bias;
                let rows = |proj: &str| {
                    let mut m = vec![member(
                        format!("{name}.self_attn.{proj}.weight"),
                        0,
                        head_dim,
                    )];
                    if bias {
                        m.push(member(format!("{name}.self_attn.{proj}.bias"), 0, head_dim));
                    }
                    m
                };
                let kv_group = groups.len();
                groups.push(Group {
                    name: format!("{name}.kv_groups"),
                    kind: UnitKind::KvGroups,
                    len: kv_heads,
                    unit_width: head_dim,
                    members: rows("k_proj").into_iter().chain(rows("v_proj")).collect(),
                    follows: None,
                });
                let head_group = groups.len();
                let mut head_members = rows("q_proj");
                head_members.push(member(
                    format!("{name}.self_attn.o_proj.weight"),
                    1,
                    head_dim,
                ));
                groups.push(Group {
                    name: format!("{name}.heads"),
                    kind: UnitKind::Heads,
                    len: heads,
                    unit_width: head_dim,
                    members: head_members,
                    follows: Some(kv_group),
                });
                let gate = sublayer_gate(
                    &mut groups,
                    &format!("{name}.self_attn"),
                    cfg.sublayer_gates,
                );
                AttentionSublayer {
                    input_layernorm: RmsNorm::new(&lp / "input_layernorm", d, eps),
                    self_attn: Attention {
                        q_proj: Linear::new(&attn / "q_proj", d, heads * head_dim, bias),
                        k_proj: Linear::new(&attn / "k_proj", d, kv_heads * head_dim, bias),
                        v_proj: Linear::new(&attn / "v_proj", d, kv_heads * head_dim, bias),
                        o_proj: Linear::new(&attn / "o_proj", heads * head_dim, d, bias),
                        heads,
                        kv_heads,
                        head_group,
                        kv_group,
                        fused_qkv: None,
                    },
                    gate,
                }
            });
            let feed_forward = has_mlp.then(|| {
                let unit = unit_width(mlp_width, cfg.channels_per_gate);
                let group = groups.len();
                let mut members = vec![
                    member(format!("{name}.mlp.gate_proj.weight"), 0, unit),
                    member(format!("{name}.mlp.up_proj.weight"), 0, unit),
                    member(format!("{name}.mlp.down_proj.weight"), 1, unit),
                ];
                if cfg.mlp_bias {
                    members.push(member(format!("{name}.mlp.gate_proj.bias"), 0, unit));
                    members.push(member(format!("{name}.mlp.up_proj.bias"), 0, unit));
                }
                groups.push(Group {
                    name: format!("{name}.mlp"),
                    kind: UnitKind::Channels,
                    len: mlp_width / unit,
                    unit_width: unit,
                    members,
                    follows: None,
                });
                let gate = sublayer_gate(&mut groups, &format!("{name}.mlp"), cfg.sublayer_gates);
                let mp = &lp / "mlp";
                MlpSublayer {
                    post_attention_layernorm: RmsNorm::new(
                        &lp / "post_attention_layernorm",
                        d,
                        eps,
                    ),
                    mlp: Mlp {
                        gate_proj: Linear::new(&mp / "gate_proj", d, mlp_width, cfg.mlp_bias),
                        up_proj: Linear::new(&mp / "up_proj", d, mlp_width, cfg.mlp_bias),
                        down_proj: Linear::new(&mp / "down_proj", mlp_width, d, cfg.mlp_bias),
                        group,
                        fused_gate_up: None,
                    },
                    gate,
                }
            });
            layers.push(DecoderLayer {
                attention,
                feed_forward,
            });
        }
        let norm = RmsNorm::new(&model / "norm", d, cfg.rms_norm_eps);
        let lm_head = (!cfg.tie_word_embeddings)
            .then(|| Linear::new(&root / "lm_head", d, cfg.vocab_size, false));
        let inv_freq =
            Tensor::from_slice(&inverse_frequencies(head_dim, theta, scaling)).to_device(device);
        Ok(Llama {
            vs,
            cfg,
            embed_tokens,
            layers,
            norm,
            lm_head,
            inv_freq,
            groups,
        })
    }

    pub fn config(&self) -> &LlamaConfig {
        &self.cfg
    }

    fn rotary(&self, start: i64, tokens: i64) -> Rotary {
        let kind = self.embed_tokens.kind();
        let positions =
            Tensor::arange_start(start, start + tokens, (Kind::Float, self.inv_freq.device()));
        let freqs = positions.outer(&self.inv_freq);
        let angles = Tensor::cat(&[&freqs, &freqs], -1);
        Rotary {
            cos: angles.cos().to_kind(kind),
            sin: angles.sin().to_kind(kind),
        }
    }

    /// An empty KV cache for `batch` sequences of up to `capacity` tokens.
    pub fn new_cache(&self, batch: i64, capacity: i64) -> KvCache {
        let options = (self.embed_tokens.kind(), self.embed_tokens.device());
        KvCache {
            layers: self
                .layers
                .iter()
                .map(|l| {
                    l.attention.as_ref().map(|a| {
                        let shape = [batch, a.self_attn.kv_heads, capacity, self.cfg.head_dim()];
                        (Tensor::zeros(shape, options), Tensor::zeros(shape, options))
                    })
                })
                .collect(),
        }
    }

    /// Logits `[batch, tokens, vocab]` for token ids `[batch, tokens]` (i64). With a cache, the
    /// tokens sit at positions `[start, start + tokens)` after the cached ones; several new
    /// tokens need `start == 0` (prefill), later calls bring one token each (decode).
    pub fn forward_cached(
        &self,
        ids: &Tensor,
        masks: &Masks,
        cache: Option<(&KvCache, i64)>,
    ) -> Tensor {
        self.logits(&self.hidden_states(ids, masks, cache))
    }

    /// `[batch, tokens, vocab]` logits of final hidden states `[batch, tokens, hidden]`.
    fn logits(&self, h: &Tensor) -> Tensor {
        match &self.lm_head {
            Some(head) => head.forward(h),
            None => h.linear(&self.embed_tokens, None::<Tensor>),
        }
    }

    /// The final (normed) hidden states `[batch, tokens, hidden]` (see [`Self::forward_cached`]).
    fn hidden_states(&self, ids: &Tensor, masks: &Masks, cache: Option<(&KvCache, i64)>) -> Tensor {
        let _span = tracing::trace_span!("llama").entered();
        let tokens = ids.size()[1];
        let start = cache.as_ref().map_or(0, |(_, s)| *s);
        let rotary = self.rotary(start, tokens);
        let head_dim = self.cfg.head_dim();
        let mut h = Tensor::embedding(&self.embed_tokens, ids, -1, false, false);
        for (i, layer) in self.layers.iter().enumerate() {
            if let Some(a) = &layer.attention {
                let layer_cache = cache
                    .as_ref()
                    .and_then(|(c, s)| c.layers[i].as_ref().map(|(k, v)| (k, v, *s)));
                let out = a.self_attn.forward(
                    &a.input_layernorm.forward(&h),
                    masks,
                    &rotary,
                    layer_cache,
                    head_dim,
                );
                h = &h + gated(out, masks, a.gate);
            }
            if let Some(f) = &layer.feed_forward {
                let out = f
                    .mlp
                    .forward(&f.post_attention_layernorm.forward(&h), masks);
                h = &h + gated(out, masks, f.gate);
            }
        }
        self.norm.forward(&h)
    }

    /// Cost sites of one pass over `queries` new tokens per sequence attending to `keys`
    /// tokens (causal when they are the same tokens), each site called `calls` times per
    /// workload; names prefixed with `prefix`.
    fn sites_of_pass(&self, prefix: &str, queries: i64, keys: i64, calls: f64) -> Vec<CostSite> {
        let d = self.cfg.hidden_size;
        let head_dim = self.cfg.head_dim();
        let rows = queries;
        let causal = queries == keys && queries > 1;
        let linear = |name: String, input: Width, output: Width, gate: Option<usize>| CostSite {
            name,
            input,
            output,
            macs_per_in_out: rows as f64,
            elems_per_out: rows as f64,
            op: SiteOp::Linear { rows },
            enabled_by: gate,
            calls,
        };
        let fixed = Width::Fixed(d);
        let mut sites = Vec::new();
        for (i, layer) in self.layers.iter().enumerate() {
            if let Some(sub) = &layer.attention {
                let a = &sub.self_attn;
                let (heads, kv) = (Width::Group(a.head_group), Width::Group(a.kv_group));
                sites.push(linear(
                    format!("{prefix}layer{i}.q_proj"),
                    fixed,
                    heads,
                    sub.gate,
                ));
                sites.push(linear(
                    format!("{prefix}layer{i}.k_proj"),
                    fixed,
                    kv,
                    sub.gate,
                ));
                sites.push(linear(
                    format!("{prefix}layer{i}.v_proj"),
                    fixed,
                    kv,
                    sub.gate,
                ));
                let q_per_kv = a.heads / a.kv_heads;
                // Query channels in, KV channels out: pruning either changes the cost (QKᵀ and
                // AV work per query channel; K and V reads per KV channel). MACs: 2 per query
                // channel and (query, key) pair (halved when causal), spread over the full KV
                // width so the FLOP count is exact at full KV width.
                let pairs = (queries * keys) as f64 * if causal { 0.5 } else { 1.0 };
                sites.push(CostSite {
                    name: format!("{prefix}layer{i}.sdpa"),
                    input: heads,
                    output: kv,
                    macs_per_in_out: 2.0 * pairs / (a.kv_heads * head_dim) as f64,
                    elems_per_out: keys as f64,
                    op: SiteOp::Attention {
                        queries,
                        keys,
                        head_dim,
                        q_per_kv,
                        causal,
                    },
                    enabled_by: sub.gate,
                    calls,
                });
                sites.push(linear(
                    format!("{prefix}layer{i}.o_proj"),
                    heads,
                    fixed,
                    sub.gate,
                ));
            }
            if let Some(sub) = &layer.feed_forward {
                let mlp = Width::Group(sub.mlp.group);
                sites.push(linear(
                    format!("{prefix}layer{i}.gate_proj"),
                    fixed,
                    mlp,
                    sub.gate,
                ));
                sites.push(linear(
                    format!("{prefix}layer{i}.up_proj"),
                    fixed,
                    mlp,
                    sub.gate,
                ));
                sites.push(linear(
                    format!("{prefix}layer{i}.down_proj"),
                    mlp,
                    fixed,
                    sub.gate,
                ));
            }
        }
        sites
    }

    /// Greedy continuation of `prompt` by up to `new_tokens` tokens (stops after `eos`).
    pub fn generate(&self, prompt: &[i64], new_tokens: usize, eos: Option<i64>) -> Vec<i64> {
        let device = self.vs.device();
        let prompt_ids = Tensor::from_slice(prompt).view([1, -1]).to_device(device);
        // One row stops right after its end of text, as a chat would.
        let ids = self.continue_tokens(&prompt_ids, new_tokens as i64, 0.0, eos);
        let generated = ids.size()[1] - prompt.len() as i64;
        Vec::try_from(ids.select(0, 0).narrow(0, prompt.len() as i64, generated))
            .expect("token ids are i64 on the host")
    }

    /// `prompts` `[batch, prompt]` (i64) continued by up to `new_tokens` tokens each through the
    /// KV cache: greedy at `temperature` 0, else sampled from `softmax(logits / temperature)`
    /// by the global (seeded) generator. Stops early once every row has produced `eos`.
    /// Returns `[batch, prompt + generated]`, prompts included.
    pub fn continue_tokens(
        &self,
        prompts: &Tensor,
        new_tokens: i64,
        temperature: f64,
        eos: Option<i64>,
    ) -> Tensor {
        let _guard = tch::no_grad_guard();
        let (batch, prompt) = prompts.size2().expect("prompts are [batch, prompt]");
        let masks = Masks::none(self.groups.len());
        let cache = self.new_cache(batch, prompt + new_tokens);
        let mut ids = prompts.shallow_clone();
        let mut pieces = vec![prompts.shallow_clone()];
        let mut ended = Tensor::zeros([batch], (Kind::Bool, prompts.device()));
        let mut position = 0;
        for _ in 0..new_tokens {
            let h = self.hidden_states(&ids, &masks, Some((&cache, position)));
            position += ids.size()[1];
            let last = self
                .logits(&h.narrow(1, h.size()[1] - 1, 1))
                .select(1, 0)
                .to_kind(Kind::Float);
            let next = if temperature > 0.0 {
                (last / temperature)
                    .softmax(-1, Kind::Float)
                    .multinomial(1, true)
            } else {
                last.argmax(-1, true)
            };
            pieces.push(next.shallow_clone());
            ids = next;
            if let Some(eos) = eos {
                ended = ended.logical_or(&ids.select(1, 0).eq(eos));
                // A host read per token: only where a caller asked to stop at the end of text.
                if ended.all().int64_value(&[]) == 1 {
                    break;
                }
            }
        }
        Tensor::cat(&pieces, 1)
    }
}

impl Family for Llama {
    fn family(&self) -> &'static str {
        "llama"
    }

    fn groups(&self) -> &[Group] {
        &self.groups
    }

    fn forward(&self, x: &Tensor, masks: &Masks, _phase: Phase) -> Tensor {
        self.forward_cached(x, masks, None)
    }

    fn cached_workload(&self, workload: Workload) -> Result<Box<dyn FnMut() -> Tensor + '_>> {
        let (batch, prompt, steps, prefill) = match workload {
            Workload::Prefill { batch, tokens } => (batch, tokens, 0, true),
            Workload::Decode { batch, context } => (batch, context, 1, false),
            Workload::Generate {
                batch,
                prompt,
                new_tokens,
            } => (batch, prompt, new_tokens, true),
            Workload::Forward { .. } => {
                return Err(Error::Invalid(
                    "a forward workload runs without a cache".into(),
                ))
            }
        };
        let cache = self.new_cache(batch, prompt + steps);
        if !prefill {
            // A decoding step reads what a prefill would have cached: random, never zeros.
            for (k, v) in cache.layers.iter().flatten() {
                let _ = k.shallow_clone().normal_(0.0, 1.0);
                let _ = v.shallow_clone().normal_(0.0, 1.0);
            }
        }
        let device = self.vs.device();
        let vocab = self.cfg.vocab_size;
        let prompt_ids = Tensor::randint(vocab, [batch, prompt], (Kind::Int64, device));
        let step_ids = Tensor::randint(vocab, [batch, 1], (Kind::Int64, device));
        let masks = Masks::none(self.groups.len());
        Ok(Box::new(move || {
            let mut logits = Tensor::new();
            if prefill {
                // A generation prefill needs the last position's logits only.
                let h = self.hidden_states(&prompt_ids, &masks, Some((&cache, 0)));
                logits = self.logits(&h.narrow(1, prompt - 1, 1));
            }
            for step in 0..steps {
                logits = self.forward_cached(&step_ids, &masks, Some((&cache, prompt + step)));
            }
            logits
        }))
    }

    fn cost_sites(&self, workload: Workload) -> Vec<CostSite> {
        match workload {
            Workload::Forward { tokens, .. } | Workload::Prefill { tokens, .. } => {
                self.sites_of_pass("", tokens, tokens, 1.0)
            }
            Workload::Decode { context, .. } => self.sites_of_pass("", 1, context + 1, 1.0),
            Workload::Generate {
                prompt, new_tokens, ..
            } => {
                // The prefill once, then each decoding step, timed at its mean context length.
                let mut sites = self.sites_of_pass("prefill.", prompt, prompt, 1.0);
                sites.extend(self.sites_of_pass(
                    "decode.",
                    1,
                    prompt + (new_tokens + 1) / 2,
                    new_tokens as f64,
                ));
                sites
            }
        }
    }

    fn var_store(&self) -> &VarStore {
        &self.vs
    }

    fn var_store_mut(&mut self) -> &mut VarStore {
        &mut self.vs
    }

    fn config_json(&self) -> serde_json::Value {
        serde_json::to_value(&self.cfg).expect("LlamaConfig always serialises")
    }

    /// Stacks q/k/v and gate/up into single projections (fewer, larger GEMMs; decoding is
    /// bound by kernel count at small batches). Outputs are unchanged.
    fn fuse_for_inference(&mut self, _folding: NormFolding) -> Result<()> {
        for layer in &mut self.layers {
            if let Some(sub) = &mut layer.attention {
                let a = &mut sub.self_attn;
                a.fused_qkv = Some(Linear::stacked(&[&a.q_proj, &a.k_proj, &a.v_proj]));
            }
            if let Some(sub) = &mut layer.feed_forward {
                let m = &mut sub.mlp;
                m.fused_gate_up = Some(Linear::stacked(&[&m.gate_proj, &m.up_proj]));
            }
        }
        Ok(())
    }

    fn slim(&self, keep: &KeepSet) -> Result<Box<dyn Family>> {
        let mut tensors = slice_tensors(&self.groups, &named_tensors(&self.vs), keep)?;
        let width = |group: usize| keep.0[group].len() as i64 * self.groups[group].unit_width;
        let (mut heads, mut kv_heads, mut mlp) = (Vec::new(), Vec::new(), Vec::new());
        let (mut attention_layers, mut mlp_layers) = (Vec::new(), Vec::new());
        for (i, layer) in self.layers.iter().enumerate() {
            let (h, kv, m) = self.cfg.layer_widths(i);
            let module = |part: &str| format!("model.layers.{i}.{part}");
            match layer
                .attention
                .as_ref()
                .filter(|a| sublayer_kept(keep, a.gate))
            {
                Some(a) => {
                    heads.push(keep.0[a.self_attn.head_group].len() as i64);
                    kv_heads.push(keep.0[a.self_attn.kv_group].len() as i64);
                    attention_layers.push(true);
                }
                None => {
                    drop_modules(
                        &mut tensors,
                        &[module("self_attn"), module("input_layernorm")],
                    );
                    heads.push(h);
                    kv_heads.push(kv);
                    attention_layers.push(false);
                }
            }
            match layer
                .feed_forward
                .as_ref()
                .filter(|f| sublayer_kept(keep, f.gate))
            {
                Some(f) => {
                    mlp.push(width(f.mlp.group));
                    mlp_layers.push(true);
                }
                None => {
                    drop_modules(
                        &mut tensors,
                        &[module("mlp"), module("post_attention_layernorm")],
                    );
                    mlp.push(m);
                    mlp_layers.push(false);
                }
            }
        }
        if heads.iter().chain(&kv_heads).chain(&mlp).any(|&w| w == 0) {
            return Err(Error::Invalid(
                "keep-set removes every unit of a kept sublayer; min_keep must be ≥ 1".into(),
            ));
        }
        let mut cfg = self.cfg.clone();
        let uniform = |w: &[i64]| w.iter().all(|&x| x == w[0]);
        let all = |l: &[bool]| l.iter().all(|&x| x);
        if uniform(&heads)
            && uniform(&kv_heads)
            && uniform(&mlp)
            && all(&attention_layers)
            && all(&mlp_layers)
        {
            // Every layer alike: a stock LlamaConfig.
            cfg.num_attention_heads = heads[0];
            cfg.num_key_value_heads = Some(kv_heads[0]);
            cfg.intermediate_size = mlp[0];
            cfg.head_dim = Some(self.cfg.head_dim());
            cfg.hawada_heads = None;
            cfg.hawada_kv_heads = None;
            cfg.hawada_intermediate_sizes = None;
            cfg.hawada_attention_layers = None;
            cfg.hawada_mlp_layers = None;
        } else {
            cfg.hawada_heads = Some(heads);
            cfg.hawada_kv_heads = Some(kv_heads);
            cfg.hawada_intermediate_sizes = Some(mlp);
            cfg.hawada_attention_layers = (!all(&attention_layers)).then_some(attention_layers);
            cfg.hawada_mlp_layers = (!all(&mlp_layers)).then_some(mlp_layers);
        }
        let slim = Llama::new_in(
            cfg,
            (self.vs.kind(), self.vs.device()),
            Path::new("<slim config>"),
        )?;
        load_into(&slim.vs, &tensors, Path::new("<sliced tensors>"))?;
        Ok(Box::new(slim))
    }

    fn max_tokens(&self) -> Option<i64> {
        Some(self.cfg.max_position_embeddings)
    }

    fn vocab_size(&self) -> Option<i64> {
        Some(self.cfg.vocab_size)
    }

    fn sample_continuations(
        &self,
        prompts: &Tensor,
        new_tokens: i64,
        temperature: f64,
    ) -> Result<Tensor> {
        Ok(self.continue_tokens(prompts, new_tokens, temperature, None))
    }

    fn random_input(&self, batch: i64, tokens: i64) -> Tensor {
        Tensor::randint(
            self.cfg.vocab_size,
            [batch, tokens.max(1)],
            (Kind::Int64, self.vs.device()),
        )
    }
}

/// Reads every `*.safetensors` of an HF directory (one file, or the shards listed in
/// `model.safetensors.index.json`).
fn read_checkpoint(dir: &Path) -> Result<(BTreeMap<String, Tensor>, std::path::PathBuf)> {
    let single = dir.join("model.safetensors");
    if single.exists() {
        return Ok((crate::io::safetensors::read(&single)?, single));
    }
    let index = dir.join("model.safetensors.index.json");
    let value = crate::io::hf_config::read_value(&index).map_err(|_| Error::Data {
        file: single.clone(),
        reason: "missing, and no model.safetensors.index.json lists shards; give an HF \
                     directory with weights, or set model.random_init"
            .into(),
    })?;
    let shards: std::collections::BTreeSet<String> = value
        .get("weight_map")
        .and_then(|m| m.as_object())
        .ok_or_else(|| Error::config(&index, "weight_map", "missing or not an object"))?
        .values()
        .filter_map(|v| v.as_str().map(str::to_string))
        .collect();
    let mut tensors = BTreeMap::new();
    for shard in shards {
        tensors.extend(crate::io::safetensors::read(&dir.join(shard))?);
    }
    Ok((tensors, index))
}

/// Loads `tensors` into `model`'s variables (checked both ways); a tied model ignores a stored
/// `lm_head.weight`, which some tied checkpoints carry anyway.
fn load_weights(model: &Llama, mut tensors: BTreeMap<String, Tensor>, file: &Path) -> Result<()> {
    if model.cfg.tie_word_embeddings {
        tensors.remove("lm_head.weight");
    }
    load_into(&model.vs, &tensors, file)
}

/// Builds a LLaMA from an HF directory's `config.json` value (+ its safetensors unless
/// `random_init`), in `kind`.
pub fn from_dir(
    dir: &Path,
    config: serde_json::Value,
    device: Device,
    kind: Kind,
    random_init: bool,
) -> Result<Llama> {
    let file = dir.join("config.json");
    let cfg: LlamaConfig = crate::io::hf_config::parse(&file, config)?;
    if random_init {
        // Drawn in f32 and then cast, as before: the same random model in every dtype.
        let mut model = Llama::new(cfg, device, &file)?;
        model.vs.set_kind(kind);
        return Ok(model);
    }
    let model = Llama::new_in(cfg, (kind, device), &file)?;
    let (tensors, source) = read_checkpoint(dir)?;
    load_weights(&model, tensors, &source)?;
    Ok(model)
}

/// Registry entry: [`from_dir`] as a family.
pub fn load(
    dir: &Path,
    config: serde_json::Value,
    device: Device,
    kind: Kind,
    random_init: bool,
) -> Result<Box<dyn Family>> {
    Ok(Box::new(from_dir(dir, config, device, kind, random_init)?))
}

/// Builds a LLaMA from a GGUF file, dequantised (see `io::gguf`), in `kind`.
pub fn from_gguf(path: &Path, device: Device, kind: Kind) -> Result<Llama> {
    let gguf = crate::io::gguf::Gguf::open(path)?;
    let config = crate::io::gguf::llama_config(&gguf)?;
    let cfg: LlamaConfig = crate::io::hf_config::parse(path, config)?;
    let model = Llama::new_in(cfg, (kind, device), path)?;
    load_weights(&model, crate::io::gguf::llama_tensors(&gguf)?, path)?;
    Ok(model)
}

/// A LLaMA from a GGUF file or an HF directory, as its concrete type (generation needs more than
/// the family trait).
pub fn open(path: &Path, device: Device, kind: Kind) -> Result<Llama> {
    if path.extension().is_some_and(|e| e == "gguf") {
        return from_gguf(path, device, kind);
    }
    let config = crate::io::hf_config::read_value(&path.join("config.json"))?;
    from_dir(path, config, device, kind, false)
}
