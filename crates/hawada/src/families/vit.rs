//! ViT (Dosovitskiy et al. 2021) in Hugging Face's `ViTForImageClassification` layout and names
//! (`vit.encoder.layer.{i}.attention.attention.query`, `…intermediate.dense`, `classifier`):
//! pre-LayerNorm blocks, exact GELU, a cls token, learned position embeddings, attention through
//! `scaled_dot_product_attention`.
//!
//! Gate groups (DESIGN §2), per layer: attention heads (a head's q, k, v rows and its columns of
//! the output projection go together) and MLP units in groups of `channels_per_gate`. A slim export
//! is the stock config plus per-layer `hawada_heads` and `hawada_intermediate_sizes` lists.

use super::layers::{
    check_layer_flags, check_layer_widths, drop_modules, gated, sublayer_gate, sublayer_kept,
    Linear,
};
use crate::error::{Error, Result};
use crate::export::slice::slice_tensors;
use crate::io::safetensors::{load_file_into, load_into, named_tensors};
use crate::model::{
    unit_width, CostSite, Family, Group, KeepSet, Masks, Member, Phase, SiteOp, UnitKind, Width,
    Workload,
};
use serde::{Deserialize, Serialize};
use std::path::Path;
use tch::{nn, nn::VarStore, Device, Kind, Tensor};

/// `config.json` of a ViT classifier (HF `ViTConfig` fields, plus HawAda's slim widths).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct VitConfig {
    pub architectures: Vec<String>,
    pub model_type: String,
    pub hidden_size: i64,
    pub num_hidden_layers: usize,
    pub num_attention_heads: i64,
    pub intermediate_size: i64,
    #[serde(default = "default_act")]
    pub hidden_act: String,
    #[serde(default = "default_eps")]
    pub layer_norm_eps: f64,
    pub image_size: i64,
    pub patch_size: i64,
    pub num_channels: i64,
    #[serde(default = "default_true")]
    pub qkv_bias: bool,
    /// Classes of the classification head; HF configs give `id2label` instead, which is used
    /// when this is absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub num_labels: Option<i64>,
    /// MLP units per gate.
    #[serde(default = "default_channels_per_gate")]
    pub channels_per_gate: i64,
    /// Also gate whole attention and MLP sublayers (one gate each per layer).
    #[serde(default)]
    pub sublayer_gates: bool,
    /// Slim: which layers keep their attention sublayer (absent: all).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hawada_attention_layers: Option<Vec<bool>>,
    /// Slim: which layers keep their MLP sublayer (absent: all).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hawada_mlp_layers: Option<Vec<bool>>,
    /// Slim widths: kept heads per layer.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hawada_heads: Option<Vec<i64>>,
    /// Slim widths: MLP width per layer.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hawada_intermediate_sizes: Option<Vec<i64>>,
    /// Other HF keys (id2label, initializer_range, …) kept as they are.
    #[serde(flatten)]
    pub other: serde_json::Map<String, serde_json::Value>,
}

fn default_act() -> String {
    "gelu".into()
}
fn default_eps() -> f64 {
    1e-12
}
fn default_true() -> bool {
    true
}
fn default_channels_per_gate() -> i64 {
    8
}

impl VitConfig {
    /// ViT-B/16 at 224².
    pub fn base_16() -> Self {
        VitConfig {
            architectures: vec!["ViTForImageClassification".into()],
            model_type: "vit".into(),
            hidden_size: 768,
            num_hidden_layers: 12,
            num_attention_heads: 12,
            intermediate_size: 3072,
            hidden_act: default_act(),
            layer_norm_eps: default_eps(),
            image_size: 224,
            patch_size: 16,
            num_channels: 3,
            qkv_bias: true,
            num_labels: Some(1000),
            channels_per_gate: 64,
            sublayer_gates: false,
            hawada_attention_layers: None,
            hawada_mlp_layers: None,
            hawada_heads: None,
            hawada_intermediate_sizes: None,
            other: Default::default(),
        }
    }

    /// Two layers, width 16, for tests.
    pub fn tiny() -> Self {
        VitConfig {
            hidden_size: 16,
            num_hidden_layers: 2,
            num_attention_heads: 4,
            intermediate_size: 32,
            image_size: 8,
            patch_size: 4,
            num_channels: 1,
            num_labels: Some(5),
            channels_per_gate: 4,
            ..Self::base_16()
        }
    }

    /// Number of classes: `num_labels`, else the size of `id2label`.
    pub fn labels(&self) -> Option<i64> {
        self.num_labels.or_else(|| {
            self.other
                .get("id2label")
                .and_then(|m| m.as_object())
                .map(|m| m.len() as i64)
        })
    }

    pub fn head_dim(&self) -> i64 {
        self.hidden_size / self.num_attention_heads
    }

    fn tokens(&self) -> i64 {
        (self.image_size / self.patch_size).pow(2) + 1
    }

    fn validate(&self, file: &Path) -> Result<()> {
        for (field, v) in [
            ("hidden_size", self.hidden_size),
            ("num_attention_heads", self.num_attention_heads),
            ("intermediate_size", self.intermediate_size),
            ("image_size", self.image_size),
            ("patch_size", self.patch_size),
            ("num_channels", self.num_channels),
            ("num_labels", self.labels().unwrap_or(0)),
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
        if self.hidden_size % self.num_attention_heads != 0 {
            return Err(Error::config(
                file,
                "num_attention_heads",
                format!(
                    "{} does not divide hidden_size {}",
                    self.num_attention_heads, self.hidden_size
                ),
            ));
        }
        if self.image_size % self.patch_size != 0 {
            return Err(Error::config(
                file,
                "patch_size",
                format!(
                    "{} does not divide image_size {}",
                    self.patch_size, self.image_size
                ),
            ));
        }
        if self.hidden_act != "gelu" {
            return Err(Error::config(
                file,
                "hidden_act",
                format!(
                    "`{}` is not supported; expected gelu (exact)",
                    self.hidden_act
                ),
            ));
        }
        let layers = self.num_hidden_layers;
        check_layer_flags(
            file,
            layers,
            &[
                ("hawada_attention_layers", &self.hawada_attention_layers),
                ("hawada_mlp_layers", &self.hawada_mlp_layers),
            ],
        )?;
        check_layer_widths(
            file,
            layers,
            &[
                ("hawada_heads", &self.hawada_heads),
                ("hawada_intermediate_sizes", &self.hawada_intermediate_sizes),
            ],
        )
    }
}

#[derive(Debug)]
struct LayerNorm {
    weight: Tensor,
    bias: Tensor,
    eps: f64,
}

impl LayerNorm {
    fn new(p: nn::Path, dim: i64, eps: f64) -> Self {
        LayerNorm {
            weight: p.ones("weight", &[dim]),
            bias: p.zeros("bias", &[dim]),
            eps,
        }
    }
    fn forward(&self, x: &Tensor) -> Tensor {
        x.layer_norm(
            [self.weight.size()[0]],
            Some(&self.weight),
            Some(&self.bias),
            self.eps,
            true,
        )
    }
}

/// `x + gate · attention(layernorm_before(x))`; fields follow `vit.encoder.layer.{i}`.
#[derive(Debug)]
struct AttentionSublayer {
    layernorm_before: LayerNorm,
    query: Linear,
    key: Linear,
    value: Linear,
    output_dense: Linear,
    heads: i64,
    head_group: usize,
    gate: Option<usize>,
}

/// `x + gate · output(gelu(intermediate(layernorm_after(x))))`.
#[derive(Debug)]
struct MlpSublayer {
    layernorm_after: LayerNorm,
    intermediate_dense: Linear,
    mlp_output_dense: Linear,
    mlp_group: usize,
    gate: Option<usize>,
}

/// One encoder layer; a slim export may have dropped either sublayer.
#[derive(Debug)]
struct Layer {
    attention: Option<AttentionSublayer>,
    mlp: Option<MlpSublayer>,
}

pub struct Vit {
    vs: VarStore,
    cfg: VitConfig,
    cls_token: Tensor,
    position_embeddings: Tensor,
    patch_projection: (Tensor, Tensor),
    layers: Vec<Layer>,
    layernorm: LayerNorm,
    classifier: Linear,
    groups: Vec<Group>,
}

impl Vit {
    /// Builds the architecture with random weights on `device` in f32.
    pub fn new(cfg: VitConfig, device: Device, file: &Path) -> Result<Self> {
        cfg.validate(file)?;
        let vs = VarStore::new(device);
        let root = vs.root();
        let vit = &root / "vit";
        let emb = &vit / "embeddings";
        let d = cfg.hidden_size;
        let head_dim = cfg.head_dim();
        let cls_token = emb.randn("cls_token", &[1, 1, d], 0.0, 0.02);
        let position_embeddings =
            emb.randn("position_embeddings", &[1, cfg.tokens(), d], 0.0, 0.02);
        let proj = &emb / "patch_embeddings" / "projection";
        let patch_projection = (
            proj.randn(
                "weight",
                &[d, cfg.num_channels, cfg.patch_size, cfg.patch_size],
                0.0,
                0.02,
            ),
            proj.zeros("bias", &[d]),
        );
        let mut groups = Vec::new();
        let mut layers = Vec::new();
        for i in 0..cfg.num_hidden_layers {
            let lp = &vit / "encoder" / "layer" / i;
            let name = format!("vit.encoder.layer.{i}");
            let heads = cfg
                .hawada_heads
                .as_ref()
                .map_or(cfg.num_attention_heads, |h| h[i]);
            let mlp = cfg
                .hawada_intermediate_sizes
                .as_ref()
                .map_or(cfg.intermediate_size, |m| m[i]);
            let has_attention = cfg.hawada_attention_layers.as_ref().is_none_or(|l| l[i]);
            let has_mlp = cfg.hawada_mlp_layers.as_ref().is_none_or(|l| l[i]);
            let eps = cfg.layer_norm_eps;
            let attention = has_attention.then(|| {
                let attn = &lp / "attention" / "attention";
                let width = heads * head_dim;
                let head_group = groups.len();
                let mut members: Vec<Member> = ["query", "key", "value"]
                    .iter()
                    .flat_map(|t| {
                        let mut m = vec![Member {
                            tensor: format!("{name}.attention.attention.{t}.weight"),
                            axis: 0,
                            block: head_dim,
                        }];
                        if cfg.qkv_bias {
                            m.push(Member {
                                tensor: format!("{name}.attention.attention.{t}.bias"),
                                axis: 0,
                                block: head_dim,
                            });
                        }
                        m
                    })
                    .collect();
                members.push(Member {
                    tensor: format!("{name}.attention.output.dense.weight"),
                    axis: 1,
                    block: head_dim,
                });
                groups.push(Group {
                    name: format!("{name}.heads"),
                    kind: UnitKind::Heads,
                    len: heads,
                    unit_width: head_dim,
                    members,
                    follows: None,
                });
                let gate = sublayer_gate(
                    &mut groups,
                    &format!("{name}.attention"),
                    cfg.sublayer_gates,
                );
                AttentionSublayer {
                    layernorm_before: LayerNorm::new(&lp / "layernorm_before", d, eps),
                    query: Linear::new(&attn / "query", d, width, cfg.qkv_bias),
                    key: Linear::new(&attn / "key", d, width, cfg.qkv_bias),
                    value: Linear::new(&attn / "value", d, width, cfg.qkv_bias),
                    output_dense: Linear::new(
                        &lp / "attention" / "output" / "dense",
                        width,
                        d,
                        true,
                    ),
                    heads,
                    head_group,
                    gate,
                }
            });
            let mlp_sublayer = has_mlp.then(|| {
                let unit = unit_width(mlp, cfg.channels_per_gate);
                let mlp_group = groups.len();
                groups.push(Group {
                    name: format!("{name}.mlp"),
                    kind: UnitKind::Channels,
                    len: mlp / unit,
                    unit_width: unit,
                    members: vec![
                        Member {
                            tensor: format!("{name}.intermediate.dense.weight"),
                            axis: 0,
                            block: unit,
                        },
                        Member {
                            tensor: format!("{name}.intermediate.dense.bias"),
                            axis: 0,
                            block: unit,
                        },
                        Member {
                            tensor: format!("{name}.output.dense.weight"),
                            axis: 1,
                            block: unit,
                        },
                    ],
                    follows: None,
                });
                let gate = sublayer_gate(&mut groups, &format!("{name}.mlp"), cfg.sublayer_gates);
                MlpSublayer {
                    layernorm_after: LayerNorm::new(&lp / "layernorm_after", d, eps),
                    intermediate_dense: Linear::new(&lp / "intermediate" / "dense", d, mlp, true),
                    mlp_output_dense: Linear::new(&lp / "output" / "dense", mlp, d, true),
                    mlp_group,
                    gate,
                }
            });
            layers.push(Layer {
                attention,
                mlp: mlp_sublayer,
            });
        }
        let layernorm = LayerNorm::new(&vit / "layernorm", d, cfg.layer_norm_eps);
        let classifier = Linear::new(&root / "classifier", d, cfg.labels().unwrap_or(0), true);
        Ok(Vit {
            vs,
            cfg,
            cls_token,
            position_embeddings,
            patch_projection,
            layers,
            layernorm,
            classifier,
            groups,
        })
    }

    pub fn config(&self) -> &VitConfig {
        &self.cfg
    }
}

impl AttentionSublayer {
    /// The sublayer's output (before the residual add), `[batch, tokens, hidden]`.
    fn forward(&self, x: &Tensor, masks: &Masks, head_dim: i64) -> Tensor {
        let (b, t, _) = x
            .size3()
            .expect("hidden states are [batch, tokens, hidden]");
        let h = self.layernorm_before.forward(x);
        let split = |y: Tensor| y.view([b, t, self.heads, head_dim]).transpose(1, 2);
        let (q, k, v) = (
            split(self.query.forward(&h)),
            split(self.key.forward(&h)),
            split(self.value.forward(&h)),
        );
        let attn = Tensor::scaled_dot_product_attention(
            &q,
            &k,
            &v,
            None::<Tensor>,
            0.0,
            false,
            None,
            false,
        );
        // Out of place: SDPA's backward reads its own output.
        let attn = match masks.get(self.head_group) {
            Some(m) => &attn * m.view([1, self.heads, 1, head_dim]),
            None => attn,
        };
        let attn = attn.transpose(1, 2).reshape([b, t, self.heads * head_dim]);
        self.output_dense.forward(&attn)
    }
}

impl MlpSublayer {
    fn forward(&self, x: &Tensor, masks: &Masks) -> Tensor {
        let u = self
            .intermediate_dense
            .forward(&self.layernorm_after.forward(x))
            .gelu("none");
        let u = match masks.get(self.mlp_group) {
            Some(m) => &u * m,
            None => u,
        };
        self.mlp_output_dense.forward(&u)
    }
}

impl Layer {
    fn forward(&self, x: &Tensor, masks: &Masks, head_dim: i64) -> Tensor {
        let mut x = x.shallow_clone();
        if let Some(a) = &self.attention {
            x = &x + gated(a.forward(&x, masks, head_dim), masks, a.gate);
        }
        if let Some(m) = &self.mlp {
            x = &x + gated(m.forward(&x, masks), masks, m.gate);
        }
        x
    }
}

impl Family for Vit {
    fn family(&self) -> &'static str {
        "vit"
    }

    fn groups(&self) -> &[Group] {
        &self.groups
    }

    fn forward(&self, x: &Tensor, masks: &Masks, _phase: Phase) -> Tensor {
        let _span = tracing::trace_span!("vit").entered();
        let p = self.cfg.patch_size;
        let patches = x
            .conv2d(
                &self.patch_projection.0,
                Some(&self.patch_projection.1),
                [p],
                [0],
                [1],
                1,
            )
            .flatten(2, -1)
            .transpose(1, 2);
        let b = patches.size()[0];
        let mut h = Tensor::cat(&[self.cls_token.expand([b, -1, -1], false), patches], 1)
            + &self.position_embeddings;
        for layer in &self.layers {
            h = layer.forward(&h, masks, self.cfg.head_dim());
        }
        let cls = self.layernorm.forward(&h).select(1, 0);
        self.classifier.forward(&cls)
    }

    /// Images have one workload shape; `workload` only brings the batch, which the profiler adds.
    fn cost_sites(&self, _workload: Workload) -> Vec<CostSite> {
        let t = self.cfg.tokens();
        let d = self.cfg.hidden_size;
        let head_dim = self.cfg.head_dim();
        let linear = |name: String, input: Width, output: Width, gate: Option<usize>| CostSite {
            name,
            input,
            output,
            macs_per_in_out: t as f64,
            elems_per_out: t as f64,
            op: SiteOp::Linear { rows: t },
            enabled_by: gate,
            calls: 1.0,
        };
        let fixed = Width::Fixed(d);
        let mut sites = Vec::new();
        for (i, layer) in self.layers.iter().enumerate() {
            if let Some(a) = &layer.attention {
                let heads = Width::Group(a.head_group);
                for proj in ["query", "key", "value"] {
                    sites.push(linear(format!("layer{i}.{proj}"), fixed, heads, a.gate));
                }
                // QKᵀ and AV: 2·t² MACs per query/value channel.
                sites.push(CostSite {
                    name: format!("layer{i}.sdpa"),
                    input: Width::Fixed(1),
                    output: heads,
                    macs_per_in_out: (2 * t * t) as f64,
                    elems_per_out: (t * t / head_dim) as f64,
                    op: SiteOp::Attention {
                        queries: t,
                        keys: t,
                        head_dim,
                        q_per_kv: 1,
                        causal: false,
                    },
                    enabled_by: a.gate,
                    calls: 1.0,
                });
                sites.push(linear(
                    format!("layer{i}.attention.output"),
                    heads,
                    fixed,
                    a.gate,
                ));
            }
            if let Some(m) = &layer.mlp {
                let mlp = Width::Group(m.mlp_group);
                sites.push(linear(format!("layer{i}.intermediate"), fixed, mlp, m.gate));
                sites.push(linear(format!("layer{i}.output"), mlp, fixed, m.gate));
            }
        }
        sites
    }

    fn var_store(&self) -> &VarStore {
        &self.vs
    }

    fn var_store_mut(&mut self) -> &mut VarStore {
        &mut self.vs
    }

    fn config_json(&self) -> serde_json::Value {
        serde_json::to_value(&self.cfg).expect("VitConfig always serialises")
    }

    fn slim(&self, keep: &KeepSet) -> Result<Box<dyn Family>> {
        let mut tensors = slice_tensors(&self.groups, &named_tensors(&self.vs), keep)?;
        let (mut heads, mut mlp) = (Vec::new(), Vec::new());
        let (mut attention_layers, mut mlp_layers) = (Vec::new(), Vec::new());
        for (i, layer) in self.layers.iter().enumerate() {
            let module = |part: &str| format!("vit.encoder.layer.{i}.{part}");
            match layer
                .attention
                .as_ref()
                .filter(|a| sublayer_kept(keep, a.gate))
            {
                Some(a) => {
                    heads.push(keep.0[a.head_group].len() as i64);
                    attention_layers.push(true);
                }
                None => {
                    drop_modules(
                        &mut tensors,
                        &[module("attention"), module("layernorm_before")],
                    );
                    heads.push(
                        self.cfg
                            .hawada_heads
                            .as_ref()
                            .map_or(self.cfg.num_attention_heads, |h| h[i]),
                    );
                    attention_layers.push(false);
                }
            }
            match layer.mlp.as_ref().filter(|m| sublayer_kept(keep, m.gate)) {
                Some(m) => {
                    mlp.push(
                        keep.0[m.mlp_group].len() as i64 * self.groups[m.mlp_group].unit_width,
                    );
                    mlp_layers.push(true);
                }
                None => {
                    drop_modules(
                        &mut tensors,
                        &[
                            module("intermediate"),
                            module("output"),
                            module("layernorm_after"),
                        ],
                    );
                    mlp.push(
                        self.cfg
                            .hawada_intermediate_sizes
                            .as_ref()
                            .map_or(self.cfg.intermediate_size, |m| m[i]),
                    );
                    mlp_layers.push(false);
                }
            }
        }
        if heads.iter().chain(&mlp).any(|&w| w == 0) {
            return Err(Error::Invalid(
                "keep-set removes every unit of a kept sublayer; min_keep must be ≥ 1".into(),
            ));
        }
        let all = |l: &[bool]| l.iter().all(|&x| x);
        let mut cfg = self.cfg.clone();
        cfg.hawada_heads = Some(heads);
        cfg.hawada_intermediate_sizes = Some(mlp);
        cfg.hawada_attention_layers = (!all(&attention_layers)).then_some(attention_layers);
        cfg.hawada_mlp_layers = (!all(&mlp_layers)).then_some(mlp_layers);
        let kind = self.vs.kind();
        let mut slim = Vit::new(cfg, self.vs.device(), Path::new("<slim config>"))?;
        slim.vs.set_kind(kind);
        load_into(&slim.vs, &tensors, Path::new("<sliced tensors>"))?;
        Ok(Box::new(slim))
    }

    fn random_input(&self, batch: i64, _tokens: i64) -> Tensor {
        Tensor::randn(
            [
                batch,
                self.cfg.num_channels,
                self.cfg.image_size,
                self.cfg.image_size,
            ],
            (self.vs.kind(), self.vs.device()),
        )
    }
}

/// Builds a ViT from a `config.json` value (+ `model.safetensors` unless `random_init`).
pub fn load(
    dir: &Path,
    config: serde_json::Value,
    device: Device,
    kind: Kind,
    random_init: bool,
) -> Result<Box<dyn Family>> {
    let file = dir.join("config.json");
    let cfg: VitConfig = crate::io::hf_config::parse(&file, config)?;
    let mut model = Vit::new(cfg, device, &file)?;
    if !random_init {
        load_file_into(&model.vs, &dir.join("model.safetensors"))?;
    }
    model.vs.set_kind(kind);
    Ok(Box::new(model))
}
