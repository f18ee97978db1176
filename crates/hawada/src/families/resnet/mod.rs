//! ResNet (He et al. 2015, torchvision v1.5 layout: stride on the Bottleneck's 3×3 conv).
//! Tensor names are torchvision's (`layer2.0.downsample.1.running_var`), so a torchvision state
//! dict saved as safetensors loads as is. A `small` stem (3×3 stride 1, no max-pool) serves
//! 28×28 grey images.
//!
//! Gate groups (DESIGN §2): the inner channels of every block (BasicBlock conv1 out; Bottleneck
//! conv1 and conv2 out) and, optionally, each stage's residual stream: every conv/BN writing into
//! that stream (last conv of each block, the downsample, the stem when it feeds an identity
//! shortcut) shares one keep-set with every reader (next convs, downsample in, `fc` in).

use crate::error::{Error, Result};
use crate::export::slice::slice_tensors;
use crate::io::safetensors::{load_file_into, load_into, named_tensors};
use crate::model::{
    unit_width, CostSite, Family, Group, KeepSet, Masks, Member, NormFolding, Phase, SiteOp,
    UnitKind, Width, Workload,
};
use serde::{Deserialize, Serialize};
use std::path::Path;
use tch::{nn, nn::VarStore, Device, Kind, Tensor};

const BN_EPS: f64 = 1e-5;
const BN_MOMENTUM: f64 = 0.1;
const BN_TENSORS: [&str; 4] = ["weight", "bias", "running_mean", "running_var"];

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

    fn default_stream_width(&self, stage: usize) -> i64 {
        (self.base_width << stage) * self.block_type.expansion()
    }
    fn default_inner_width(&self, stage: usize) -> i64 {
        self.base_width << stage
    }
    fn stride(stage: usize) -> i64 {
        if stage == 0 {
            1
        } else {
            2
        }
    }
    /// Whether block `b` of stage `s` has a downsample, decided by the *original* widths so a slim
    /// export keeps the same topology whatever its widths.
    fn has_downsample(&self, stage: usize, block: usize) -> bool {
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

    fn validate(&self, file: &Path) -> Result<()> {
        let positive = |field: &str, v: i64| {
            if v <= 0 {
                Err(Error::config(
                    file,
                    field,
                    format!("must be positive, found {v}"),
                ))
            } else {
                Ok(())
            }
        };
        positive("num_channels", self.num_channels)?;
        positive("image_size", self.image_size)?;
        positive("num_labels", self.num_labels)?;
        positive("base_width", self.base_width)?;
        positive("channels_per_gate", self.channels_per_gate)?;
        if self.layers.is_empty() || self.layers.contains(&0) {
            return Err(Error::config(
                file,
                "layers",
                "needs at least one stage, each with ≥ 1 block",
            ));
        }
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
            let per_block = match self.block_type {
                BlockType::Basic => 1,
                BlockType::Bottleneck => 2,
            };
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
}

/// Convolution without bias (every torchvision ResNet conv).
#[derive(Debug)]
struct Conv2d {
    weight: Tensor,
    /// Only after batch-norm folding (torchvision's convs have none).
    bias: Option<Tensor>,
    stride: i64,
    padding: i64,
}

impl Conv2d {
    fn new(p: nn::Path, c_in: i64, c_out: i64, kernel: i64, stride: i64) -> Self {
        let fan_out = (c_out * kernel * kernel) as f64;
        let weight = p.randn(
            "weight",
            &[c_out, c_in, kernel, kernel],
            0.0,
            (2.0 / fan_out).sqrt(),
        );
        Conv2d {
            weight,
            bias: None,
            stride,
            padding: kernel / 2,
        }
    }
    fn forward(&self, x: &Tensor) -> Tensor {
        x.conv2d(
            &self.weight,
            self.bias.as_ref(),
            [self.stride],
            [self.padding],
            [1],
            1,
        )
    }
}

#[derive(Debug)]
struct BatchNorm2d {
    weight: Tensor,
    bias: Tensor,
    running_mean: Tensor,
    running_var: Tensor,
    /// Folded into the preceding convolution: the identity.
    folded: bool,
}

impl BatchNorm2d {
    fn new(p: nn::Path, c: i64) -> Self {
        BatchNorm2d {
            weight: p.ones("weight", &[c]),
            bias: p.zeros("bias", &[c]),
            running_mean: p.zeros_no_train("running_mean", &[c]),
            running_var: p.ones_no_train("running_var", &[c]),
            folded: false,
        }
    }
    fn forward(&self, x: &Tensor, phase: Phase) -> Tensor {
        if self.folded {
            return x.shallow_clone();
        }
        x.batch_norm(
            Some(&self.weight),
            Some(&self.bias),
            Some(&self.running_mean),
            Some(&self.running_var),
            phase == Phase::Train,
            BN_MOMENTUM,
            BN_EPS,
            true,
        )
    }
}

#[derive(Debug)]
struct Linear {
    weight: Tensor,
    bias: Tensor,
}

impl Linear {
    fn new(p: nn::Path, c_in: i64, c_out: i64) -> Self {
        let bound = 1.0 / (c_in as f64).sqrt();
        Linear {
            weight: p.uniform("weight", &[c_out, c_in], -bound, bound),
            bias: p.uniform("bias", &[c_out], -bound, bound),
        }
    }
}

/// `[n, c, h, w]` with NHWC strides: PyTorch's channels-last memory format, which cuDNN runs
/// natively on tensor cores.
fn channels_last(t: &Tensor) -> Tensor {
    t.permute([0, 2, 3, 1]).contiguous().permute([0, 3, 1, 2])
}

/// Folds eval-mode batch-norm into the convolution before it: `w·s`, bias `β − μ·s`,
/// `s = γ/√(σ² + ε)`. The new tensors are not the VarStore's, which keeps the checkpoint layout.
fn fold(conv: &mut Conv2d, bn: &mut BatchNorm2d) {
    let _guard = tch::no_grad_guard();
    let scale = &bn.weight / (&bn.running_var + BN_EPS).sqrt();
    conv.weight = &conv.weight * scale.view([-1, 1, 1, 1]);
    conv.bias = Some(&bn.bias - &bn.running_mean * &scale);
    bn.folded = true;
}

/// BasicBlock (conv1, conv2) or Bottleneck (conv1 1×1, conv2 3×3 strided, conv3 1×1).
#[derive(Debug)]
struct Block {
    conv1: Conv2d,
    bn1: BatchNorm2d,
    conv2: Conv2d,
    bn2: BatchNorm2d,
    conv3: Option<(Conv2d, BatchNorm2d)>,
    downsample: Option<(Conv2d, BatchNorm2d)>,
    /// Gate group of each inner width (conv1 out; and conv2 out for a Bottleneck).
    inner_groups: Vec<usize>,
}

/// Where each gate group's mask is applied.
#[derive(Debug, Clone)]
struct GateIndex {
    stem: Option<usize>,
    streams: Vec<Option<usize>>,
}

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

fn mask(x: Tensor, masks: &Masks, group: Option<usize>) -> Tensor {
    match group.and_then(|g| masks.get(g)) {
        Some(m) => x * m.view([1, -1, 1, 1]),
        None => x,
    }
}

fn bn_members(prefix: &str, block: i64) -> Vec<Member> {
    BN_TENSORS
        .iter()
        .map(|t| Member {
            tensor: format!("{prefix}.{t}"),
            axis: 0,
            block,
        })
        .collect()
}

impl Resnet {
    /// Builds the architecture with random (torchvision-style) weights on `device` in f32.
    pub fn new(cfg: ResnetConfig, device: Device, file: &Path) -> Result<Self> {
        cfg.validate(file)?;
        let vs = VarStore::new(device);
        let root = vs.root();
        let stem_width = cfg.stem_width.unwrap_or(cfg.base_width);
        let stream_widths: Vec<i64> = cfg.stream_widths.clone().unwrap_or_else(|| {
            (0..cfg.layers.len())
                .map(|s| cfg.default_stream_width(s))
                .collect()
        });
        let per_block = match cfg.block_type {
            BlockType::Basic => 1,
            BlockType::Bottleneck => 2,
        };
        let inner_widths: Vec<Vec<i64>> = cfg.inner_widths.clone().unwrap_or_else(|| {
            cfg.layers
                .iter()
                .enumerate()
                .flat_map(|(s, &n)| {
                    std::iter::repeat_n(vec![cfg.default_inner_width(s); per_block], n)
                })
                .collect()
        });

        let (stem_kernel, stem_stride) = match cfg.stem {
            Stem::Imagenet => (7, 2),
            Stem::Small => (3, 1),
        };
        let conv1 = Conv2d::new(
            &root / "conv1",
            cfg.num_channels,
            stem_width,
            stem_kernel,
            stem_stride,
        );
        let bn1 = BatchNorm2d::new(&root / "bn1", stem_width);

        let mut groups = Vec::new();
        let g = cfg.channels_per_gate;
        // The stem feeds stage 0 through an identity shortcut unless stage 0 opens with a
        // downsample; then it is a stream of its own.
        let stem_is_stream0 = !cfg.has_downsample(0, 0);
        let mut stream_groups: Vec<Option<usize>> = vec![None; cfg.layers.len()];
        let mut stem_group = None;
        if cfg.gate_residual_streams {
            for (s, &width) in stream_widths.iter().enumerate() {
                let u = unit_width(width, g);
                stream_groups[s] = Some(groups.len());
                groups.push(Group {
                    name: format!("layer{}.stream", s + 1),
                    kind: UnitKind::Channels,
                    len: width / u,
                    unit_width: u,
                    members: Vec::new(),
                    follows: None,
                });
            }
            if stem_is_stream0 {
                stem_group = stream_groups[0];
            } else {
                let u = unit_width(stem_width, g);
                stem_group = Some(groups.len());
                groups.push(Group {
                    name: "stem".into(),
                    kind: UnitKind::Channels,
                    len: stem_width / u,
                    unit_width: u,
                    members: Vec::new(),
                    follows: None,
                });
            }
        }
        let add = |groups: &mut Vec<Group>, gi: Option<usize>, members: Vec<Member>| {
            if let Some(gi) = gi {
                groups[gi].members.extend(members);
            }
        };
        let block_of =
            |groups: &[Group], gi: Option<usize>| gi.map(|i| groups[i].unit_width).unwrap_or(1);

        let bs = block_of(&groups, stem_group);
        let mut stem_members = vec![Member {
            tensor: "conv1.weight".into(),
            axis: 0,
            block: bs,
        }];
        stem_members.extend(bn_members("bn1", bs));
        add(&mut groups, stem_group, stem_members);

        let mut layers = Vec::new();
        let mut in_width = stem_width;
        let mut in_group = stem_group;
        let mut flat_block = 0;
        for (s, &n_blocks) in cfg.layers.iter().enumerate() {
            let out_width = stream_widths[s];
            let out_group = stream_groups[s];
            let mut blocks = Vec::new();
            for b in 0..n_blocks {
                let p = &root / format!("layer{}", s + 1) / b;
                let name = format!("layer{}.{b}", s + 1);
                let stride = if b == 0 { ResnetConfig::stride(s) } else { 1 };
                let widths = &inner_widths[flat_block];
                flat_block += 1;
                let mut inner_groups = Vec::new();
                for (i, &w) in widths.iter().enumerate() {
                    let u = unit_width(w, g);
                    let conv = format!("conv{}", i + 1);
                    let bn = format!("bn{}", i + 1);
                    let mut members = vec![Member {
                        tensor: format!("{name}.{conv}.weight"),
                        axis: 0,
                        block: u,
                    }];
                    members.extend(bn_members(&format!("{name}.{bn}"), u));
                    members.push(Member {
                        tensor: format!("{name}.conv{}.weight", i + 2),
                        axis: 1,
                        block: u,
                    });
                    inner_groups.push(groups.len());
                    groups.push(Group {
                        name: format!("{name}.{conv}"),
                        kind: UnitKind::Channels,
                        len: w / u,
                        unit_width: u,
                        members,
                        follows: None,
                    });
                }
                let (conv1, conv2, conv3) = match cfg.block_type {
                    BlockType::Basic => (
                        Conv2d::new(&p / "conv1", in_width, widths[0], 3, stride),
                        Conv2d::new(&p / "conv2", widths[0], out_width, 3, 1),
                        None,
                    ),
                    BlockType::Bottleneck => (
                        Conv2d::new(&p / "conv1", in_width, widths[0], 1, 1),
                        Conv2d::new(&p / "conv2", widths[0], widths[1], 3, stride),
                        Some((
                            Conv2d::new(&p / "conv3", widths[1], out_width, 1, 1),
                            BatchNorm2d::new(&p / "bn3", out_width),
                        )),
                    ),
                };
                let bn1 = BatchNorm2d::new(&p / "bn1", widths[0]);
                let bn2 = BatchNorm2d::new(&p / "bn2", conv2.weight.size()[0]);
                let last = if conv3.is_some() { 3 } else { 2 };
                let ub_in = block_of(&groups, in_group);
                let ub_out = block_of(&groups, out_group);
                add(
                    &mut groups,
                    in_group,
                    vec![Member {
                        tensor: format!("{name}.conv1.weight"),
                        axis: 1,
                        block: ub_in,
                    }],
                );
                let mut writers = vec![Member {
                    tensor: format!("{name}.conv{last}.weight"),
                    axis: 0,
                    block: ub_out,
                }];
                writers.extend(bn_members(&format!("{name}.bn{last}"), ub_out));
                let downsample = if cfg.has_downsample(s, b) {
                    let dp = &p / "downsample";
                    add(
                        &mut groups,
                        in_group,
                        vec![Member {
                            tensor: format!("{name}.downsample.0.weight"),
                            axis: 1,
                            block: ub_in,
                        }],
                    );
                    writers.push(Member {
                        tensor: format!("{name}.downsample.0.weight"),
                        axis: 0,
                        block: ub_out,
                    });
                    writers.extend(bn_members(&format!("{name}.downsample.1"), ub_out));
                    Some((
                        Conv2d::new(&dp / "0", in_width, out_width, 1, stride),
                        BatchNorm2d::new(&dp / "1", out_width),
                    ))
                } else {
                    if in_width != out_width {
                        return Err(Error::config(file, "stream_widths", format!("{name} has an identity shortcut, so its input width {in_width} must equal its output width {out_width}")));
                    }
                    None
                };
                add(&mut groups, out_group, writers);
                blocks.push(Block {
                    conv1,
                    bn1,
                    conv2,
                    bn2,
                    conv3,
                    downsample,
                    inner_groups,
                });
                in_width = out_width;
                in_group = out_group;
            }
            layers.push(blocks);
        }
        let fc = Linear::new(&root / "fc", in_width, cfg.num_labels);
        let ub = block_of(&groups, in_group);
        add(
            &mut groups,
            in_group,
            vec![Member {
                tensor: "fc.weight".into(),
                axis: 1,
                block: ub,
            }],
        );
        let gate_index = GateIndex {
            stem: stem_group,
            streams: stream_groups,
        };
        Ok(Resnet {
            vs,
            cfg,
            conv1,
            bn1,
            layers,
            fc,
            groups,
            gate_index,
            stem_width,
            stream_widths,
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

impl Block {
    fn forward(&self, x: &Tensor, masks: &Masks, phase: Phase, out_group: Option<usize>) -> Tensor {
        let mut h = self.bn1.forward(&self.conv1.forward(x), phase).relu_();
        h = mask(h, masks, Some(self.inner_groups[0]));
        h = self.bn2.forward(&self.conv2.forward(&h), phase);
        if let Some((conv3, bn3)) = &self.conv3 {
            h = mask(h.relu_(), masks, Some(self.inner_groups[1]));
            h = bn3.forward(&conv3.forward(&h), phase);
        }
        let identity = match &self.downsample {
            Some((conv, bn)) => mask(bn.forward(&conv.forward(x), phase), masks, out_group),
            None => x.shallow_clone(),
        };
        let mut out = mask(h, masks, out_group);
        let _ = out.g_add_(&identity);
        out.relu_()
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
        h.adaptive_avg_pool2d([1, 1])
            .flatten(1, -1)
            .linear(&self.fc.weight, Some(&self.fc.bias))
    }

    /// Images have one workload shape; `workload` only brings the batch, which the profiler adds.
    fn cost_sites(&self, _workload: Workload) -> Vec<CostSite> {
        let (stem_size, stage_sizes) = self.spatial_sizes();
        let width = |group: Option<usize>, fixed: i64| match group {
            Some(g) => Width::Group(g),
            None => Width::Fixed(fixed),
        };
        let conv_site =
            |name: String, input: Width, output: Width, conv: &Conv2d, out_size: i64| {
                let k = conv.weight.size();
                let pixels = (out_size * out_size) as f64;
                CostSite {
                    name,
                    input,
                    output,
                    macs_per_in_out: (k[2] * k[3]) as f64 * pixels,
                    elems_per_out: pixels,
                    op: SiteOp::Conv2d {
                        kernel: k[2],
                        stride: conv.stride,
                        input_size: out_size * conv.stride,
                    },
                    enabled_by: None,
                    calls: 1.0,
                }
            };
        let mut sites = vec![conv_site(
            "conv1".into(),
            Width::Fixed(self.cfg.num_channels),
            width(self.gate_index.stem, self.stem_width),
            &self.conv1,
            stem_size
                * if self.cfg.stem == Stem::Imagenet {
                    2
                } else {
                    1
                },
        )];
        let mut in_w = width(self.gate_index.stem, self.stem_width);
        for (s, blocks) in self.layers.iter().enumerate() {
            let out_w = width(self.gate_index.streams[s], self.stream_widths[s]);
            for (b, block) in blocks.iter().enumerate() {
                let name = format!("layer{}.{b}", s + 1);
                // Bottleneck: stride sits on conv2, so conv1 runs at the input resolution.
                let conv1_size = if block.conv3.is_some() && b == 0 && s > 0 {
                    stage_sizes[s - 1]
                } else {
                    stage_sizes[s]
                };
                let inner: Vec<Width> = block
                    .inner_groups
                    .iter()
                    .map(|&g| Width::Group(g))
                    .collect();
                sites.push(conv_site(
                    format!("{name}.conv1"),
                    in_w,
                    inner[0],
                    &block.conv1,
                    conv1_size,
                ));
                match &block.conv3 {
                    None => sites.push(conv_site(
                        format!("{name}.conv2"),
                        inner[0],
                        out_w,
                        &block.conv2,
                        stage_sizes[s],
                    )),
                    Some((conv3, _)) => {
                        sites.push(conv_site(
                            format!("{name}.conv2"),
                            inner[0],
                            inner[1],
                            &block.conv2,
                            stage_sizes[s],
                        ));
                        sites.push(conv_site(
                            format!("{name}.conv3"),
                            inner[1],
                            out_w,
                            conv3,
                            stage_sizes[s],
                        ));
                    }
                }
                if let Some((conv, _)) = &block.downsample {
                    sites.push(conv_site(
                        format!("{name}.downsample"),
                        in_w,
                        out_w,
                        conv,
                        stage_sizes[s],
                    ));
                }
                in_w = out_w;
            }
        }
        sites.push(CostSite {
            name: "fc".into(),
            input: in_w,
            output: Width::Fixed(self.cfg.num_labels),
            macs_per_in_out: 1.0,
            elems_per_out: 1.0,
            op: SiteOp::Linear { rows: 1 },
            enabled_by: None,
            calls: 1.0,
        });
        sites
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
        let tensors = slice_tensors(&self.groups, &named_tensors(&self.vs), keep)?;
        let width_of = |g: Option<usize>, current: i64| match g {
            Some(g) => keep.0[g].len() as i64 * self.groups[g].unit_width,
            None => current,
        };
        let mut cfg = self.cfg.clone();
        cfg.stem_width = Some(width_of(self.gate_index.stem, self.stem_width));
        cfg.stream_widths = Some(
            self.stream_widths
                .iter()
                .enumerate()
                .map(|(s, &w)| width_of(self.gate_index.streams[s], w))
                .collect(),
        );
        cfg.inner_widths = Some(
            self.layers
                .iter()
                .flatten()
                .map(|b| {
                    b.inner_groups
                        .iter()
                        .map(|&g| keep.0[g].len() as i64 * self.groups[g].unit_width)
                        .collect()
                })
                .collect(),
        );
        if let Some(empty) = cfg
            .inner_widths
            .iter()
            .flatten()
            .flatten()
            .chain(cfg.stream_widths.iter().flatten())
            .find(|&&w| w == 0)
        {
            return Err(Error::Invalid(format!(
                "keep-set removes every unit of a site (width {empty}); min_keep must be ≥ 1"
            )));
        }
        let kind = self.vs.kind();
        let mut slim = Resnet::new(cfg, self.vs.device(), Path::new("<slim config>"))?;
        slim.vs.set_kind(kind);
        load_into(&slim.vs, &tensors, Path::new("<sliced tensors>"))?;
        Ok(Box::new(slim))
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
    let cfg: ResnetConfig = crate::io::hf_config::parse(&dir.join("config.json"), config)?;
    let mut model = Resnet::from_dir(dir, cfg, device, random_init)?;
    model.vs.set_kind(kind);
    Ok(Box::new(model))
}
