//! `config.json` of a ViT classifier (HF `ViTConfig`), a `ViTModel` backbone or a DINOv2
//! backbone (HF `Dinov2Config`), plus HawAda's gate size and the slim widths (shared with LLaMA,
//! flattened so the `hawada_*` keys stay top-level); presets, validation, and the checkpoint
//! [`Layout`] a config describes.

use super::super::layers::check_positive;
use super::super::slim_widths::SlimWidths;
use crate::error::{Error, Result};
use serde::{Deserialize, Serialize};
use std::path::Path;

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
    /// Slim: per-layer widths and kept sublayers (`hawada_heads`, `hawada_intermediate_sizes`,
    /// `hawada_attention_layers`, `hawada_mlp_layers`).
    #[serde(flatten)]
    pub slim: SlimWidths,
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
            slim: SlimWidths::default(),
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

    pub(super) fn layout(&self) -> Layout {
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
    pub(super) fn tokens(&self) -> i64 {
        (self.input_size() / self.patch_size).pow(2) + 1
    }

    pub(super) fn validate(&self, file: &Path) -> Result<()> {
        self.check_sizes(file)?;
        self.check_shapes(file)?;
        self.slim.validate(file, self.num_hidden_layers)
    }

    /// Every size positive.
    fn check_sizes(&self, file: &Path) -> Result<()> {
        let labels = match self.layout() {
            Layout::Vit => self.labels().unwrap_or(0),
            Layout::VitModel | Layout::Dinov2 => 1, // a backbone: no classifier
        };
        check_positive(
            file,
            &[
                ("hidden_size", self.hidden_size),
                ("num_hidden_layers", self.num_hidden_layers as i64),
                ("num_attention_heads", self.num_attention_heads),
                ("intermediate_size", self.mlp_width()),
                ("image_size", self.image_size),
                ("hawada_input_size", self.input_size()),
                ("patch_size", self.patch_size),
                ("num_channels", self.num_channels),
                ("num_labels", labels),
                ("channels_per_gate", self.channels_per_gate),
            ],
        )
    }

    /// Heads tile the hidden size, patches tile the images, the activation is GELU.
    fn check_shapes(&self, file: &Path) -> Result<()> {
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
        Ok(())
    }
}

/// Which checkpoint layout a config describes: the classifier nests the backbone under `vit.`;
/// DINOv2 names its modules differently, adds LayerScale and a mask token; backbones return
/// features rather than logits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Layout {
    /// `ViTForImageClassification`.
    Vit,
    /// `ViTModel`.
    VitModel,
    /// `Dinov2Model`.
    Dinov2,
}

impl Layout {
    /// Prefix of the backbone's tensors.
    pub(super) fn prefix(self) -> &'static str {
        match self {
            Layout::Vit => "vit.",
            Layout::VitModel | Layout::Dinov2 => "",
        }
    }
    pub(super) fn norm_before(self) -> &'static str {
        match self {
            Layout::Vit | Layout::VitModel => "layernorm_before",
            Layout::Dinov2 => "norm1",
        }
    }
    pub(super) fn norm_after(self) -> &'static str {
        match self {
            Layout::Vit | Layout::VitModel => "layernorm_after",
            Layout::Dinov2 => "norm2",
        }
    }
    /// The MLP's first and second projection.
    pub(super) fn mlp_projections(self) -> [&'static str; 2] {
        match self {
            Layout::Vit | Layout::VitModel => ["intermediate.dense", "output.dense"],
            Layout::Dinov2 => ["mlp.fc1", "mlp.fc2"],
        }
    }
    /// The modules of a layer's attention / MLP sublayer, which a slim export drops together.
    pub(super) fn sublayer_modules(self) -> [&'static [&'static str]; 2] {
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
