//! ViT (Dosovitskiy et al. 2021) in Hugging Face's `ViTForImageClassification` layout and names
//! (`vit.encoder.layer.{i}.attention.attention.query`, `…intermediate.dense`, `classifier`) or
//! its backbone `ViTModel` (the same without `vit.`, a `pooler` instead of the classifier), and
//! its DINOv2 variant (Oquab et al. 2023) in HF's `Dinov2Model` layout (`encoder.layer.{i}.norm1`,
//! `…mlp.fc1`, `…layer_scale1.lambda1`): pre-LayerNorm blocks, exact GELU, a cls token, learned
//! position embeddings (interpolated bicubically in f32 when the input grid differs from theirs,
//! as transformers does), attention through `scaled_dot_product_attention`. DINOv2 scales each
//! sublayer's output by its LayerScale vector. Backbones (`ViTModel`, `Dinov2Model`) return the
//! normalised hidden states of every token ([`Output::Features`]); the classifier returns class
//! logits from the cls token.
//! `onnx` imports a DINOv2 backbone from an ONNX export.
//!
//! Gate groups (DESIGN §2), per layer: attention heads (a head's q, k, v rows and its columns of
//! the output projection go together) and MLP units in groups of `channels_per_gate`. A slim export
//! is the stock config plus per-layer `hawada_heads` and `hawada_intermediate_sizes` lists.

mod onnx;

pub use onnx::from_onnx;

use super::layers::{
    check_layer_flags, check_layer_widths, drop_modules, gated, sublayer_gate, sublayer_kept,
    Linear,
};
use crate::error::{Error, Result};
use crate::export::slice::slice_tensors;
use crate::io::safetensors::{load_file_into, load_into, named_tensors};
use crate::model::{
    unit_width, CostSite, Family, Group, KeepSet, Masks, Member, NormFolding, Output, Phase,
    SiteOp, UnitKind, Width, Workload,
};
use serde::{Deserialize, Serialize};
use std::path::Path;
use tch::{nn, nn::VarStore, Device, Kind, Tensor};

/// `config.json` of a ViT classifier (HF `ViTConfig` fields) or a DINOv2 backbone (HF
/// `Dinov2Config`), plus HawAda's slim widths.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct VitConfig {
    pub architectures: Vec<String>,
    pub model_type: String,
    pub hidden_size: i64,
    pub num_hidden_layers: usize,
    pub num_attention_heads: i64,
    /// MLP width (ViT); DINOv2 configs give `mlp_ratio` instead.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub intermediate_size: Option<i64>,
    /// MLP width as a multiple of `hidden_size` (DINOv2; transformers 5 requires an integer).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mlp_ratio: Option<i64>,
    #[serde(default = "default_act")]
    pub hidden_act: String,
    #[serde(default = "default_eps")]
    pub layer_norm_eps: f64,
    /// Side of the square image the position embeddings were learned for.
    pub image_size: i64,
    pub patch_size: i64,
    pub num_channels: i64,
    #[serde(default = "default_true")]
    pub qkv_bias: bool,
    /// Classes of the classification head; HF configs give `id2label` instead, which is used
    /// when this is absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub num_labels: Option<i64>,
    /// Side of the square images the model is run on, when not `image_size` (DINOv2 learned
    /// its position embeddings at 518² and is run at 224²).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hawada_input_size: Option<i64>,
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
            intermediate_size: Some(3072),
            mlp_ratio: None,
            hidden_act: default_act(),
            layer_norm_eps: default_eps(),
            image_size: 224,
            patch_size: 16,
            num_channels: 3,
            qkv_bias: true,
            num_labels: Some(1000),
            hawada_input_size: None,
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
            intermediate_size: Some(32),
            image_size: 8,
            patch_size: 4,
            num_channels: 1,
            num_labels: Some(5),
            channels_per_gate: 4,
            ..Self::base_16()
        }
    }

    /// A two-layer DINOv2 backbone (width 16, LayerScale, MLP ratio 2) whose 3×3 grid of
    /// position embeddings is interpolated to the 2×2 grid of its 8×8 input, for tests.
    pub fn tiny_dinov2() -> Self {
        VitConfig {
            architectures: vec!["Dinov2Model".into()],
            model_type: "dinov2".into(),
            intermediate_size: None,
            mlp_ratio: Some(2),
            layer_norm_eps: 1e-6,
            image_size: 12,
            num_labels: None,
            hawada_input_size: Some(8),
            ..Self::tiny()
        }
    }

    fn layout(&self) -> Layout {
        if self.model_type == "dinov2" {
            Layout::Dinov2
        } else if self.architectures.iter().any(|a| a == "ViTModel") {
            Layout::VitModel
        } else {
            Layout::Vit
        }
    }

    /// MLP width: `intermediate_size`, else `mlp_ratio × hidden_size`.
    pub fn mlp_width(&self) -> i64 {
        self.intermediate_size
            .unwrap_or_else(|| self.mlp_ratio.unwrap_or(0).saturating_mul(self.hidden_size))
    }

    /// Side of the images the model runs on.
    pub fn input_size(&self) -> i64 {
        self.hawada_input_size.unwrap_or(self.image_size)
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

    /// Tokens per image at the input size: the patches and the cls token.
    fn tokens(&self) -> i64 {
        (self.input_size() / self.patch_size).pow(2) + 1
    }

    fn validate(&self, file: &Path) -> Result<()> {
        let labels = match self.layout() {
            Layout::Vit => self.labels().unwrap_or(0),
            Layout::VitModel | Layout::Dinov2 => 1, // a backbone: no classifier
        };
        for (field, v) in [
            ("hidden_size", self.hidden_size),
            ("num_attention_heads", self.num_attention_heads),
            ("intermediate_size", self.mlp_width()),
            ("image_size", self.image_size),
            ("hawada_input_size", self.input_size()),
            ("patch_size", self.patch_size),
            ("num_channels", self.num_channels),
            ("num_labels", labels),
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
        for (field, size) in [
            ("image_size", self.image_size),
            ("hawada_input_size", self.input_size()),
        ] {
            if size % self.patch_size != 0 {
                return Err(Error::config(
                    file,
                    field,
                    format!("{size} is not a multiple of patch_size {}", self.patch_size),
                ));
            }
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

/// Which checkpoint layout a config describes: the classifier nests the backbone under `vit.`;
/// DINOv2 names its modules differently, adds LayerScale and a mask token; backbones return
/// features rather than logits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Layout {
    /// `ViTForImageClassification`.
    Vit,
    /// `ViTModel`.
    VitModel,
    /// `Dinov2Model`.
    Dinov2,
}

impl Layout {
    /// Prefix of the backbone's tensors.
    fn prefix(self) -> &'static str {
        match self {
            Layout::Vit => "vit.",
            Layout::VitModel | Layout::Dinov2 => "",
        }
    }
    fn norm_before(self) -> &'static str {
        match self {
            Layout::Vit | Layout::VitModel => "layernorm_before",
            Layout::Dinov2 => "norm1",
        }
    }
    fn norm_after(self) -> &'static str {
        match self {
            Layout::Vit | Layout::VitModel => "layernorm_after",
            Layout::Dinov2 => "norm2",
        }
    }
    /// The MLP's first and second projection.
    fn mlp_projections(self) -> [&'static str; 2] {
        match self {
            Layout::Vit | Layout::VitModel => ["intermediate.dense", "output.dense"],
            Layout::Dinov2 => ["mlp.fc1", "mlp.fc2"],
        }
    }
    /// The modules of a layer's attention / MLP sublayer, which a slim export drops together.
    fn sublayer_modules(self) -> [&'static [&'static str]; 2] {
        match self {
            Layout::Vit | Layout::VitModel => [
                &["attention", "layernorm_before"],
                &["intermediate", "output", "layernorm_after"],
            ],
            Layout::Dinov2 => [
                &["attention", "norm1", "layer_scale1"],
                &["mlp", "norm2", "layer_scale2"],
            ],
        }
    }
}

/// `p` extended by a dotted module path (`mlp.fc1`; `""` is `p` itself).
fn sub<'a>(p: &nn::Path<'a>, dotted: &str) -> nn::Path<'a> {
    dotted
        .split('.')
        .filter(|part| !part.is_empty())
        .fold(p.clone(), |p, part| &p / part)
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

/// `x + gate · layer_scale1 · attention(layernorm_before(x))`; fields follow
/// `vit.encoder.layer.{i}` (`norm1` in DINOv2).
#[derive(Debug)]
struct AttentionSublayer {
    layernorm_before: LayerNorm,
    /// DINOv2's `layer_scale1.lambda1`, `[hidden]`.
    layer_scale: Option<Tensor>,
    query: Linear,
    key: Linear,
    value: Linear,
    /// Inference copies: query, key and value stacked into one GEMM.
    fused_qkv: Option<Linear>,
    output_dense: Linear,
    heads: i64,
    head_group: usize,
    gate: Option<usize>,
}

/// `x + gate · layer_scale2 · output(gelu(intermediate(layernorm_after(x))))` (DINOv2:
/// `mlp.fc2(gelu(mlp.fc1(norm2(x))))`).
#[derive(Debug)]
struct MlpSublayer {
    layernorm_after: LayerNorm,
    /// DINOv2's `layer_scale2.lambda1`, `[hidden]`.
    layer_scale: Option<Tensor>,
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
    layout: Layout,
    cls_token: Tensor,
    /// `[1, 1 + grid², hidden]` for the grid of `image_size`.
    position_embeddings: Tensor,
    /// Inference copies: the position embeddings already resized to the input's grid (the
    /// resize cost DINOv2 at 224² on an H100 0.9 ms of a 5 ms forward at batch 64).
    positions_at_input: Option<Tensor>,
    patch_projection: (Tensor, Tensor),
    layers: Vec<Layer>,
    layernorm: LayerNorm,
    /// The classifier's head; backbones have none.
    classifier: Option<Linear>,
    /// `ViTModel`'s pooler (dense + tanh of the cls token): loaded and exported with the model,
    /// but not its output, which is every token's hidden state.
    _pooler: Option<Linear>,
    groups: Vec<Group>,
}

impl Vit {
    /// Builds the architecture with random weights on `device` in f32.
    pub fn new(cfg: VitConfig, device: Device, file: &Path) -> Result<Self> {
        cfg.validate(file)?;
        let vs = VarStore::new(device);
        let root = vs.root();
        let layout = cfg.layout();
        let backbone = sub(&root, layout.prefix());
        let emb = &backbone / "embeddings";
        let d = cfg.hidden_size;
        let head_dim = cfg.head_dim();
        let cls_token = emb.randn("cls_token", &[1, 1, d], 0.0, 0.02);
        let positions = (cfg.image_size / cfg.patch_size).pow(2) + 1;
        let position_embeddings = emb.randn("position_embeddings", &[1, positions, d], 0.0, 0.02);
        if layout == Layout::Dinov2 {
            // Only masked-image pretraining reads it; kept so that checkpoints load both ways.
            let _mask_token = emb.zeros("mask_token", &[1, d]);
        }
        let layer_scale = |p: nn::Path| {
            (layout == Layout::Dinov2).then(|| {
                let value = cfg
                    .other
                    .get("layerscale_value")
                    .and_then(|v| v.as_f64())
                    .unwrap_or(1.0);
                p.var("lambda1", &[d], nn::Init::Const(value))
            })
        };
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
            let lp = &backbone / "encoder" / "layer" / i;
            let name = format!("{}encoder.layer.{i}", layout.prefix());
            let heads = cfg
                .hawada_heads
                .as_ref()
                .map_or(cfg.num_attention_heads, |h| h[i]);
            let mlp = cfg
                .hawada_intermediate_sizes
                .as_ref()
                .map_or(cfg.mlp_width(), |m| m[i]);
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
                    layernorm_before: LayerNorm::new(&lp / layout.norm_before(), d, eps),
                    layer_scale: layer_scale(&lp / "layer_scale1"),
                    query: Linear::new(&attn / "query", d, width, cfg.qkv_bias),
                    key: Linear::new(&attn / "key", d, width, cfg.qkv_bias),
                    value: Linear::new(&attn / "value", d, width, cfg.qkv_bias),
                    fused_qkv: None,
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
                let [fc1, fc2] = layout.mlp_projections();
                groups.push(Group {
                    name: format!("{name}.mlp"),
                    kind: UnitKind::Channels,
                    len: mlp / unit,
                    unit_width: unit,
                    members: vec![
                        Member {
                            tensor: format!("{name}.{fc1}.weight"),
                            axis: 0,
                            block: unit,
                        },
                        Member {
                            tensor: format!("{name}.{fc1}.bias"),
                            axis: 0,
                            block: unit,
                        },
                        Member {
                            tensor: format!("{name}.{fc2}.weight"),
                            axis: 1,
                            block: unit,
                        },
                    ],
                    follows: None,
                });
                let gate = sublayer_gate(&mut groups, &format!("{name}.mlp"), cfg.sublayer_gates);
                MlpSublayer {
                    layernorm_after: LayerNorm::new(&lp / layout.norm_after(), d, eps),
                    layer_scale: layer_scale(&lp / "layer_scale2"),
                    intermediate_dense: Linear::new(sub(&lp, fc1), d, mlp, true),
                    mlp_output_dense: Linear::new(sub(&lp, fc2), mlp, d, true),
                    mlp_group,
                    gate,
                }
            });
            layers.push(Layer {
                attention,
                mlp: mlp_sublayer,
            });
        }
        let layernorm = LayerNorm::new(&backbone / "layernorm", d, cfg.layer_norm_eps);
        let classifier = (layout == Layout::Vit)
            .then(|| Linear::new(&root / "classifier", d, cfg.labels().unwrap_or(0), true));
        let pooler = (layout == Layout::VitModel)
            .then(|| Linear::new(&root / "pooler" / "dense", d, d, true));
        Ok(Vit {
            vs,
            cfg,
            layout,
            cls_token,
            position_embeddings,
            positions_at_input: None,
            patch_projection,
            layers,
            layernorm,
            classifier,
            _pooler: pooler,
            groups,
        })
    }

    pub fn config(&self) -> &VitConfig {
        &self.cfg
    }

    /// Position embeddings for a `[rows, cols]` grid of patches: the learned ones, or their patch
    /// part resized bicubically (align_corners off, in f32) as transformers' DINOv2 does.
    fn position_embeddings_for(&self, grid: [i64; 2]) -> Tensor {
        let learned = self.position_embeddings.size()[1] - 1;
        if grid[0] == grid[1] && grid[0] * grid[1] == learned {
            return self.position_embeddings.shallow_clone();
        }
        let d = self.cfg.hidden_size;
        let side = self.cfg.image_size / self.cfg.patch_size;
        let patch = self
            .position_embeddings
            .narrow(1, 1, learned)
            .reshape([1, side, side, d])
            .permute([0, 3, 1, 2])
            .to_kind(Kind::Float)
            .upsample_bicubic2d(grid, false, None, None)
            .to_kind(self.position_embeddings.kind())
            .permute([0, 2, 3, 1])
            .reshape([1, grid[0] * grid[1], d]);
        Tensor::cat(&[self.position_embeddings.narrow(1, 0, 1), patch], 1)
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
        let (q, k, v) = match &self.fused_qkv {
            Some(qkv) => {
                let width = self.heads * head_dim;
                let y = qkv.forward(&h);
                (
                    split(y.narrow(2, 0, width)),
                    split(y.narrow(2, width, width)),
                    split(y.narrow(2, 2 * width, width)),
                )
            }
            None => (
                split(self.query.forward(&h)),
                split(self.key.forward(&h)),
                split(self.value.forward(&h)),
            ),
        };
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
        scaled(self.output_dense.forward(&attn), self.layer_scale.as_ref())
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
        scaled(self.mlp_output_dense.forward(&u), self.layer_scale.as_ref())
    }
}

/// A sublayer's output times its LayerScale vector, where it has one.
fn scaled(out: Tensor, layer_scale: Option<&Tensor>) -> Tensor {
    match layer_scale {
        Some(lambda) => out * lambda,
        None => out,
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
        match self.layout {
            Layout::Vit | Layout::VitModel => "vit",
            Layout::Dinov2 => "dinov2",
        }
    }

    /// Stacks each layer's query, key and value into one GEMM and resizes the position
    /// embeddings to the input grid once. Layer norms do not fold.
    fn fuse_for_inference(&mut self, _folding: NormFolding) -> Result<()> {
        for layer in &mut self.layers {
            if let Some(a) = &mut layer.attention {
                a.fused_qkv = Some(Linear::stacked(&[&a.query, &a.key, &a.value]));
            }
        }
        let side = self.cfg.input_size() / self.cfg.patch_size;
        self.positions_at_input = Some(tch::no_grad(|| self.position_embeddings_for([side, side])));
        Ok(())
    }

    fn output(&self) -> Output {
        match self.classifier {
            Some(_) => Output::Logits,
            None => Output::Features,
        }
    }

    fn groups(&self) -> &[Group] {
        &self.groups
    }

    fn forward(&self, x: &Tensor, masks: &Masks, _phase: Phase) -> Tensor {
        let _span = tracing::trace_span!("vit").entered();
        let p = self.cfg.patch_size;
        let (b, c, height, width) = x.size4().expect("images are [batch, channels, h, w]");
        let grid = [height / p, width / p];
        // The patch embedding's stride-p convolution as the GEMM it is: on an H100 in bf16
        // at batch 64, 0.08 ms instead of cuDNN's 0.54 ms for ViT-B/16 (0.12 vs 0.27 ms for
        // DINOv2-S/14; bench/vit_patch_embedding.py).
        let (weight, bias) = &self.patch_projection;
        // A remainder narrower than a patch is dropped, as the convolution would.
        let patches = x
            .narrow(2, 0, grid[0] * p)
            .narrow(3, 0, grid[1] * p)
            .reshape([b, c, grid[0], p, grid[1], p])
            .permute([0, 2, 4, 1, 3, 5])
            .reshape([b, grid[0] * grid[1], c * p * p])
            .linear(&weight.reshape([weight.size()[0], -1]), Some(bias));
        let positions = match &self.positions_at_input {
            Some(cached) if cached.size()[1] == grid[0] * grid[1] + 1 => cached.shallow_clone(),
            _ => self.position_embeddings_for(grid),
        };
        let mut h =
            Tensor::cat(&[self.cls_token.expand([b, -1, -1], false), patches], 1) + positions;
        for layer in &self.layers {
            h = layer.forward(&h, masks, self.cfg.head_dim());
        }
        let h = self.layernorm.forward(&h);
        match &self.classifier {
            Some(classifier) => classifier.forward(&h.select(1, 0)),
            None => h,
        }
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
        let prefix = self.layout.prefix();
        let [attention_modules, mlp_modules] = self.layout.sublayer_modules();
        for (i, layer) in self.layers.iter().enumerate() {
            let modules = |parts: &[&str]| -> Vec<String> {
                parts
                    .iter()
                    .map(|part| format!("{prefix}encoder.layer.{i}.{part}"))
                    .collect()
            };
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
                    drop_modules(&mut tensors, &modules(attention_modules));
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
                    drop_modules(&mut tensors, &modules(mlp_modules));
                    mlp.push(
                        self.cfg
                            .hawada_intermediate_sizes
                            .as_ref()
                            .map_or(self.cfg.mlp_width(), |m| m[i]),
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
        let side = self.cfg.input_size();
        Tensor::randn(
            [batch, self.cfg.num_channels, side, side],
            (self.vs.kind(), self.vs.device()),
        )
    }
}

/// Builds a ViT or DINOv2 from a `config.json` value (+ `model.safetensors` unless
/// `random_init`).
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
