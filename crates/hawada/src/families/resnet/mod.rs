//! ResNet (He et al. 2015, torchvision v1.5 layout: stride on the Bottleneck's 3×3 conv).
//! Tensor names are torchvision's (`layer2.0.downsample.1.running_var`), so a torchvision state
//! dict saved as safetensors loads as is. A `small` stem (3×3 stride 1, no max-pool) serves
//! 28×28 grey images.
//!
//! Gate groups (DESIGN §2): the inner channels of every block (BasicBlock conv1 out; Bottleneck
//! conv1 and conv2 out) and, optionally, each stage's residual stream: every conv/BN writing into
//! that stream (last conv of each block, the downsample, the stem when it feeds an identity
//! shortcut) shares one keep-set with every reader (next convs, downsample in, `fc` in).
//!
//! Files: `config` (serde config, widths, validation), `modules` (convs, batch norms, blocks,
//! named like torchvision), `groups` (gate groups and cost sites: the coupling as data), `slim`
//! (the slim model of a keep-set).

mod config;
mod groups;
mod modules;
mod slim;

pub use config::{BlockType, ResnetConfig, Stem};

use super::layers::Linear;
use crate::error::Result;
use crate::io::safetensors::load_file_into;
use crate::model::{CostSite, Family, Group, KeepSet, Masks, NormFolding, Phase, Workload};
use groups::GateIndex;
use modules::{channels_last, classifier, fold, mask, BatchNorm2d, Block, BlockShape, Conv2d};
use std::path::Path;
use tch::{nn::VarStore, Device, Kind, Tensor};

pub struct Resnet {
    vs: VarStore,
    cfg: ResnetConfig,
    conv1: Conv2d,
    bn1: BatchNorm2d,
    layers: Vec<Vec<Block>>,
    fc: Linear,
    groups: Vec<Group>,
    gate_index: GateIndex,
    stem_width: i64,
    stream_widths: Vec<i64>,
    /// Set by `fuse_for_inference` on CUDA: weights and inputs in channels-last.
    channels_last: bool,
}

/// The blocks of every stage under `root` (`layer{s}.{b}`), random weights; `inner_groups`
/// holds each block's inner gate groups, stages flattened in order.
fn stages(
    root: &tch::nn::Path,
    cfg: &ResnetConfig,
    widths: &config::Widths,
    inner_groups: Vec<Vec<usize>>,
) -> Vec<Vec<Block>> {
    let mut inner = widths.inner.iter().zip(inner_groups);
    let mut in_width = widths.stem;
    let mut layers = Vec::new();
    for (s, &blocks) in cfg.layers.iter().enumerate() {
        let out_width = widths.streams[s];
        let mut stage = Vec::new();
        for b in 0..blocks {
            let (inner_widths, groups) = inner
                .next()
                .expect("widths and groups hold one entry per block");
            let shape = BlockShape {
                in_width,
                inner: inner_widths,
                out_width,
                stride: if b == 0 { ResnetConfig::stride(s) } else { 1 },
                downsample: cfg.has_downsample(s, b),
            };
            let p = root / format!("layer{}", s + 1) / b;
            stage.push(Block::new(&p, cfg.block_type, shape, groups));
            in_width = out_width;
        }
        layers.push(stage);
    }
    layers
}

impl Resnet {
    /// Builds the architecture with random (torchvision-style) weights on `device` in f32.
    pub fn new(cfg: ResnetConfig, device: Device, file: &Path) -> Result<Self> {
        cfg.validate(file)?;
        let vs = VarStore::new(device);
        let root = vs.root();
        let widths = cfg.widths();
        let (stem_kernel, stem_stride) = match cfg.stem {
            Stem::Imagenet => (7, 2),
            Stem::Small => (3, 1),
        };
        let conv1 = Conv2d::new(
            &root / "conv1",
            cfg.num_channels,
            widths.stem,
            stem_kernel,
            stem_stride,
        );
        let bn1 = BatchNorm2d::new(&root / "bn1", widths.stem);
        let declared = groups::declare_groups(&cfg, &widths);
        let layers = stages(&root, &cfg, &widths, declared.inner);
        let in_width = *widths.streams.last().expect("validate: at least one stage");
        let fc = classifier(&root / "fc", in_width, cfg.num_labels);
        Ok(Resnet {
            vs,
            cfg,
            conv1,
            bn1,
            layers,
            fc,
            groups: declared.groups,
            gate_index: declared.gate_index,
            stem_width: widths.stem,
            stream_widths: widths.streams,
            channels_last: false,
        })
    }

    /// Builds from `config.json` (+ `model.safetensors` unless `random_init`) in `dir`.
    pub fn from_dir(
        dir: &Path,
        cfg: ResnetConfig,
        device: Device,
        random_init: bool,
    ) -> Result<Self> {
        let model = Resnet::new(cfg, device, &dir.join("config.json"))?;
        if !random_init {
            load_file_into(&model.vs, &dir.join("model.safetensors"))?;
        }
        Ok(model)
    }

    pub fn config(&self) -> &ResnetConfig {
        &self.cfg
    }

    fn spatial_sizes(&self) -> (i64, Vec<i64>) {
        let conv_out = |size: i64, stride: i64| (size - 1) / stride + 1;
        let stem = match self.cfg.stem {
            Stem::Imagenet => conv_out(conv_out(self.cfg.image_size, 2), 2),
            Stem::Small => self.cfg.image_size,
        };
        let mut size = stem;
        let stages = (0..self.cfg.layers.len())
            .map(|s| {
                size = conv_out(size, ResnetConfig::stride(s));
                size
            })
            .collect();
        (stem, stages)
    }
}

impl Family for Resnet {
    fn family(&self) -> &'static str {
        "resnet"
    }

    fn groups(&self) -> &[Group] {
        &self.groups
    }

    fn forward(&self, x: &Tensor, masks: &Masks, phase: Phase) -> Tensor {
        let _span = tracing::trace_span!("resnet").entered();
        let h = self.bn1.forward(&self.conv1.forward(x), phase).relu_();
        let mut h = mask(h, masks, self.gate_index.stem);
        if self.cfg.stem == Stem::Imagenet {
            h = h.max_pool2d([3, 3], [2, 2], [1, 1], [1, 1], false);
        }
        for (s, blocks) in self.layers.iter().enumerate() {
            for block in blocks {
                h = block.forward(&h, masks, phase, self.gate_index.streams[s]);
            }
        }
        self.fc
            .forward(&h.adaptive_avg_pool2d([1, 1]).flatten(1, -1))
    }

    /// Images have one workload shape; `workload` only brings the batch, which the profiler adds.
    fn cost_sites(&self, _workload: Workload) -> Vec<CostSite> {
        self.sites()
    }

    fn var_store(&self) -> &VarStore {
        &self.vs
    }

    fn var_store_mut(&mut self) -> &mut VarStore {
        &mut self.vs
    }

    fn config_json(&self) -> serde_json::Value {
        serde_json::to_value(&self.cfg).expect("ResnetConfig always serialises")
    }

    fn slim(&self, keep: &KeepSet) -> Result<Box<dyn Family>> {
        Ok(Box::new(self.slim_model(keep)?))
    }

    fn fuse_for_inference(&mut self, folding: NormFolding) -> Result<()> {
        self.to_device_layout();
        if folding == NormFolding::Fold {
            fold(&mut self.conv1, &mut self.bn1);
            for block in self.layers.iter_mut().flatten() {
                fold(&mut block.conv1, &mut block.bn1);
                fold(&mut block.conv2, &mut block.bn2);
                if let Some((conv, bn)) = block.conv3.as_mut() {
                    fold(conv, bn);
                }
                if let Some((conv, bn)) = block.downsample.as_mut() {
                    fold(conv, bn);
                }
            }
        }
        Ok(())
    }

    fn can_fold_norms(&self) -> bool {
        true
    }

    fn to_device_layout(&mut self) {
        if !self.vs.device().is_cuda() {
            return;
        }
        let _guard = tch::no_grad_guard();
        for (_, mut var) in self.vs.variables() {
            if var.dim() == 4 {
                // set_data keeps the variable (and every shallow handle on it) but swaps its
                // strides to NHWC.
                var.set_data(&channels_last(&var));
            }
        }
        self.channels_last = true;
    }

    fn prepare_input(&self, x: Tensor) -> Tensor {
        if self.channels_last {
            channels_last(&x)
        } else {
            x
        }
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

/// Builds a ResNet from a `config.json` value.
pub fn load(
    dir: &Path,
    config: serde_json::Value,
    device: Device,
    kind: Kind,
    random_init: bool,
) -> Result<Box<dyn Family>> {
    let cfg: ResnetConfig = crate::io::json::parse(&dir.join("config.json"), config)?;
    let mut model = Resnet::from_dir(dir, cfg, device, random_init)?;
    model.vs.set_kind(kind);
    Ok(Box::new(model))
}
