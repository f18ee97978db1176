//! `config.json` of a ResNet: the torchvision architecture's shape (block type, blocks per stage,
//! stem, base width), HawAda's gate size, and a slim export's widths; presets and validation.

use super::super::layers::{check_positive, size_limit};
use crate::error::{Error, Result};
use serde::{Deserialize, Serialize};
use std::path::Path;

/// Most stages a ResNet may have: each doubles the width, so more overflow any sane width.
const MAX_STAGES: usize = 8;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum BlockType {
    Basic,
    Bottleneck,
}

impl BlockType {
    fn expansion(self) -> i64 {
        match self {
            BlockType::Basic => 1,
            BlockType::Bottleneck => 4,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Stem {
    /// 7×7 stride-2 conv + 3×3 stride-2 max-pool (ImageNet).
    Imagenet,
    /// 3×3 stride-1 conv, no max-pool (small images such as Fashion-MNIST).
    Small,
}

/// `config.json` of a ResNet. Widths default to torchvision's; a slim export records its own.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ResnetConfig {
    pub architectures: Vec<String>,
    pub model_type: String,
    pub block_type: BlockType,
    /// Blocks per stage, e.g. `[2, 2, 2, 2]` for ResNet-18.
    pub layers: Vec<usize>,
    pub stem: Stem,
    pub num_channels: i64,
    pub image_size: i64,
    pub num_labels: i64,
    /// Width of the first stage's inner channels (64 in torchvision); stage `s` has `base·2^s`.
    pub base_width: i64,
    /// Channels per gate (the unit of pruning).
    #[serde(default = "default_channels_per_gate")]
    pub channels_per_gate: i64,
    /// Whether each stage's residual stream is gated too.
    #[serde(default = "default_true")]
    pub gate_residual_streams: bool,
    /// Slim widths: stem output, if it differs from the default.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stem_width: Option<i64>,
    /// Slim widths: per stage, the residual stream.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stream_widths: Option<Vec<i64>>,
    /// Slim widths: per block (stages flattened in order), its inner widths (1 for Basic, 2 for
    /// Bottleneck).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub inner_widths: Option<Vec<Vec<i64>>>,
}

fn default_channels_per_gate() -> i64 {
    8
}
fn default_true() -> bool {
    true
}

impl ResnetConfig {
    fn preset(block_type: BlockType, layers: Vec<usize>) -> Self {
        ResnetConfig {
            architectures: vec!["ResNet".into()],
            model_type: "resnet".into(),
            block_type,
            layers,
            stem: Stem::Imagenet,
            num_channels: 3,
            image_size: 224,
            num_labels: 1000,
            base_width: 64,
            channels_per_gate: 8,
            gate_residual_streams: true,
            stem_width: None,
            stream_widths: None,
            inner_widths: None,
        }
    }
    pub fn resnet18() -> Self {
        Self::preset(BlockType::Basic, vec![2, 2, 2, 2])
    }
    pub fn resnet34() -> Self {
        Self::preset(BlockType::Basic, vec![3, 4, 6, 3])
    }
    pub fn resnet50() -> Self {
        Self::preset(BlockType::Bottleneck, vec![3, 4, 6, 3])
    }
    /// ResNet-18 layout with a 3×3 stem and no max-pool, for small grey images.
    pub fn resnet18_small(
        base_width: i64,
        num_channels: i64,
        image_size: i64,
        num_labels: i64,
    ) -> Self {
        ResnetConfig {
            stem: Stem::Small,
            num_channels,
            image_size,
            num_labels,
            base_width,
            channels_per_gate: (base_width / 8).max(1),
            ..Self::resnet18()
        }
    }
    /// A two-stage, width-16 model for tests.
    pub fn tiny() -> Self {
        ResnetConfig {
            layers: vec![1, 1],
            channels_per_gate: 4,
            ..Self::resnet18_small(16, 1, 12, 5)
        }
    }

    pub(super) fn default_stream_width(&self, stage: usize) -> i64 {
        (self.base_width << stage) * self.block_type.expansion()
    }
    fn default_inner_width(&self, stage: usize) -> i64 {
        self.base_width << stage
    }
    pub(super) fn stride(stage: usize) -> i64 {
        if stage == 0 {
            1
        } else {
            2
        }
    }
    /// Whether block `b` of stage `s` has a downsample, decided by the *original* widths so a slim
    /// export keeps the same topology whatever its widths.
    pub(super) fn has_downsample(&self, stage: usize, block: usize) -> bool {
        if block != 0 {
            return false;
        }
        let in_width = if stage == 0 {
            self.base_width
        } else {
            self.default_stream_width(stage - 1)
        };
        Self::stride(stage) != 1 || in_width != self.default_stream_width(stage)
    }

    /// Inner widths per block: 1 for Basic, 2 for Bottleneck.
    fn inner_widths_per_block(&self) -> usize {
        match self.block_type {
            BlockType::Basic => 1,
            BlockType::Bottleneck => 2,
        }
    }

    /// Every width of the model: the slim export's where recorded, else the defaults.
    pub(super) fn widths(&self) -> Widths {
        let per_block = self.inner_widths_per_block();
        Widths {
            stem: self.stem_width.unwrap_or(self.base_width),
            streams: self.stream_widths.clone().unwrap_or_else(|| {
                (0..self.layers.len())
                    .map(|s| self.default_stream_width(s))
                    .collect()
            }),
            inner: self.inner_widths.clone().unwrap_or_else(|| {
                self.layers
                    .iter()
                    .enumerate()
                    .flat_map(|(s, &n)| {
                        std::iter::repeat_n(vec![self.default_inner_width(s); per_block], n)
                    })
                    .collect()
            }),
        }
    }

    pub(super) fn validate(&self, file: &Path) -> Result<()> {
        check_positive(
            file,
            &[
                ("num_channels", self.num_channels),
                ("image_size", self.image_size),
                ("num_labels", self.num_labels),
                ("base_width", self.base_width),
                ("channels_per_gate", self.channels_per_gate),
            ],
        )?;
        let max_blocks = size_limit("layers");
        if self.layers.is_empty()
            || self.layers.len() > MAX_STAGES
            || self.layers.iter().any(|&b| b == 0 || b as i64 > max_blocks)
        {
            return Err(Error::config(
                file,
                "layers",
                format!(
                    "needs 1 to {MAX_STAGES} stages, each with 1 to {max_blocks} blocks, found {:?}",
                    self.layers
                ),
            ));
        }
        self.check_width_lists(file)?;
        let widths = self.widths();
        let all = std::iter::once(widths.stem)
            .chain(widths.streams)
            .chain(widths.inner.into_iter().flatten());
        let max_width = size_limit("width");
        if let Some(width) = all.into_iter().find(|&w| !(1..=max_width).contains(&w)) {
            return Err(Error::config(
                file,
                "base_width",
                format!("gives a layer {width} channels wide; widths must be in [1, {max_width}]"),
            ));
        }
        self.check_shortcuts(file)
    }

    /// `stream_widths` and `inner_widths`, where recorded, have one entry per stage and block.
    fn check_width_lists(&self, file: &Path) -> Result<()> {
        if let Some(w) = &self.stream_widths {
            if w.len() != self.layers.len() {
                return Err(Error::config(
                    file,
                    "stream_widths",
                    format!(
                        "expected {} entries (one per stage), found {}",
                        self.layers.len(),
                        w.len()
                    ),
                ));
            }
        }
        if let Some(w) = &self.inner_widths {
            let blocks: usize = self.layers.iter().sum();
            let per_block = self.inner_widths_per_block();
            if w.len() != blocks || w.iter().any(|b| b.len() != per_block) {
                return Err(Error::config(
                    file,
                    "inner_widths",
                    format!("expected {blocks} blocks of {per_block} widths each"),
                ));
            }
        }
        Ok(())
    }

    /// A block without a downsample adds its input to its output: their widths must match.
    fn check_shortcuts(&self, file: &Path) -> Result<()> {
        let widths = self.widths();
        let mut in_width = widths.stem;
        for (s, &blocks) in self.layers.iter().enumerate() {
            let out_width = widths.streams[s];
            for b in 0..blocks {
                if !self.has_downsample(s, b) && in_width != out_width {
                    let name = format!("layer{}.{b}", s + 1);
                    return Err(Error::config(
                        file,
                        "stream_widths",
                        format!(
                            "{name} has an identity shortcut, so its input width {in_width} \
                             must equal its output width {out_width}"
                        ),
                    ));
                }
                in_width = out_width;
            }
        }
        Ok(())
    }
}

/// The widths of a model, resolved from its config.
#[derive(Debug, Clone, PartialEq)]
pub(super) struct Widths {
    /// The stem's output channels.
    pub stem: i64,
    /// Per stage, its residual stream.
    pub streams: Vec<i64>,
    /// Per block (stages flattened in order), its inner widths.
    pub inner: Vec<Vec<i64>>,
}
