//! ResNet's coupling as data (DESIGN §2): the inner channels of every block (BasicBlock conv1 out;
//! Bottleneck conv1 and conv2 out) and, optionally, each stage's residual stream: every conv/BN
//! writing into that stream (last conv of each block, the downsample, the stem when it feeds an
//! identity shortcut) shares one keep-set with every reader (next convs, downsample in, `fc` in).
//! And the cost sites the latency proxy tabulates.

use super::super::layers::member;
use super::config::{BlockType, ResnetConfig, Stem, Widths};
use super::modules::{Conv2d, BN_TENSORS};
use super::Resnet;
use crate::model::{unit_width, CostSite, Group, Member, SiteOp, UnitKind, Width};

/// Where each gate group's mask is applied.
#[derive(Debug, Clone)]
pub(super) struct GateIndex {
    pub stem: Option<usize>,
    pub streams: Vec<Option<usize>>,
}

/// Every gate group of a ResNet and where they act.
pub(super) struct ResnetGroups {
    pub groups: Vec<Group>,
    pub gate_index: GateIndex,
    /// Per block (stages flattened in order), the group of each inner width.
    pub inner: Vec<Vec<usize>>,
}

/// A batch norm's four tensors (`{prefix}.weight`, …), each sliced along its channels.
fn bn_members(prefix: &str, block: i64) -> Vec<Member> {
    BN_TENSORS
        .iter()
        .map(|t| member(format!("{prefix}.{t}"), 0, block))
        .collect()
}

/// Adds `members` to group `group`, when the stream is gated.
fn add(groups: &mut [Group], group: Option<usize>, members: Vec<Member>) {
    if let Some(g) = group {
        groups[g].members.extend(members);
    }
}

/// The unit width of a stream's group (1 where the stream is not gated).
fn unit_of(groups: &[Group], group: Option<usize>) -> i64 {
    group.map(|g| groups[g].unit_width).unwrap_or(1)
}

/// A channel group with no members yet.
fn channels(name: String, width: i64, per_gate: i64) -> Group {
    let unit = unit_width(width, per_gate);
    Group {
        name,
        kind: UnitKind::Channels,
        len: width / unit,
        unit_width: unit,
        members: Vec::new(),
        follows: None,
    }
}

/// Every gate group of a model of `cfg` with `widths`: the streams (and the stem's, when it is
/// a stream of its own) first, then each block's inner groups in order; each member names a
/// torchvision tensor.
pub(super) fn declare_groups(cfg: &ResnetConfig, widths: &Widths) -> ResnetGroups {
    let mut groups = Vec::new();
    let gate_index = stream_groups(&mut groups, cfg, widths);
    let stem = gate_index.stem;
    let unit = unit_of(&groups, stem);
    let mut stem_members = vec![member("conv1.weight".into(), 0, unit)];
    stem_members.extend(bn_members("bn1", unit));
    add(&mut groups, stem, stem_members);
    let mut inner = Vec::new();
    let mut in_group = stem;
    for (s, &blocks) in cfg.layers.iter().enumerate() {
        let out_group = gate_index.streams[s];
        for b in 0..blocks {
            let name = format!("layer{}.{b}", s + 1);
            inner.push(inner_groups(
                &mut groups,
                cfg,
                &name,
                &widths.inner[inner.len()],
            ));
            let downsample = cfg.has_downsample(s, b);
            stream_members(&mut groups, cfg, &name, downsample, (in_group, out_group));
            in_group = out_group;
        }
    }
    let unit = unit_of(&groups, in_group);
    add(
        &mut groups,
        in_group,
        vec![member("fc.weight".into(), 1, unit)],
    );
    ResnetGroups {
        groups,
        gate_index,
        inner,
    }
}

/// Appends a group per stage's residual stream, and the stem's when stage 0 opens with a
/// downsample (else the stem feeds stage 0 through an identity shortcut and shares its group);
/// none unless `gate_residual_streams`.
fn stream_groups(groups: &mut Vec<Group>, cfg: &ResnetConfig, widths: &Widths) -> GateIndex {
    let mut index = GateIndex {
        stem: None,
        streams: vec![None; cfg.layers.len()],
    };
    if !cfg.gate_residual_streams {
        return index;
    }
    let per_gate = cfg.channels_per_gate;
    for (s, &width) in widths.streams.iter().enumerate() {
        index.streams[s] = Some(groups.len());
        groups.push(channels(format!("layer{}.stream", s + 1), width, per_gate));
    }
    if cfg.has_downsample(0, 0) {
        index.stem = Some(groups.len());
        groups.push(channels("stem".into(), widths.stem, per_gate));
    } else {
        index.stem = index.streams[0];
    }
    index
}

/// Appends block `name`'s inner groups: conv `i` out (and its BN) with conv `i + 1` in.
fn inner_groups(
    groups: &mut Vec<Group>,
    cfg: &ResnetConfig,
    name: &str,
    widths: &[i64],
) -> Vec<usize> {
    widths
        .iter()
        .enumerate()
        .map(|(i, &width)| {
            let mut group = channels(
                format!("{name}.conv{}", i + 1),
                width,
                cfg.channels_per_gate,
            );
            let unit = group.unit_width;
            group.members = vec![member(format!("{name}.conv{}.weight", i + 1), 0, unit)];
            group
                .members
                .extend(bn_members(&format!("{name}.bn{}", i + 1), unit));
            group
                .members
                .push(member(format!("{name}.conv{}.weight", i + 2), 1, unit));
            groups.push(group);
            groups.len() - 1
        })
        .collect()
}

/// Adds block `name`'s readers of its input stream (`in_group`: conv1 in, downsample in) and
/// writers of its output stream (`out_group`: last conv and BN out, downsample out).
fn stream_members(
    groups: &mut [Group],
    cfg: &ResnetConfig,
    name: &str,
    downsample: bool,
    (in_group, out_group): (Option<usize>, Option<usize>),
) {
    let last = match cfg.block_type {
        BlockType::Basic => 2,
        BlockType::Bottleneck => 3,
    };
    let (unit_in, unit_out) = (unit_of(groups, in_group), unit_of(groups, out_group));
    add(
        groups,
        in_group,
        vec![member(format!("{name}.conv1.weight"), 1, unit_in)],
    );
    let mut writers = vec![member(format!("{name}.conv{last}.weight"), 0, unit_out)];
    writers.extend(bn_members(&format!("{name}.bn{last}"), unit_out));
    if downsample {
        let conv = format!("{name}.downsample.0.weight");
        add(groups, in_group, vec![member(conv.clone(), 1, unit_in)]);
        writers.push(member(conv, 0, unit_out));
        writers.extend(bn_members(&format!("{name}.downsample.1"), unit_out));
    }
    add(groups, out_group, writers);
}

/// The cost site of `conv` producing an `out_size`² map (input and output channel widths as
/// given).
fn conv_site(name: String, input: Width, output: Width, conv: &Conv2d, out_size: i64) -> CostSite {
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
}

/// A gated width, or a fixed one where no group gates it.
fn width(group: Option<usize>, fixed: i64) -> Width {
    match group {
        Some(g) => Width::Group(g),
        None => Width::Fixed(fixed),
    }
}

impl Resnet {
    /// Every convolution (stem, blocks, downsamples) and the classifier, at this model's image
    /// size.
    pub(super) fn sites(&self) -> Vec<CostSite> {
        let (stem_size, stage_sizes) = self.spatial_sizes();
        let stem_stride = if self.cfg.stem == Stem::Imagenet {
            2
        } else {
            1
        };
        let stem_width = width(self.gate_index.stem, self.stem_width);
        let mut sites = vec![conv_site(
            "conv1".into(),
            Width::Fixed(self.cfg.num_channels),
            stem_width,
            &self.conv1,
            stem_size * stem_stride,
        )];
        let mut in_w = stem_width;
        for (s, blocks) in self.layers.iter().enumerate() {
            let out_w = width(self.gate_index.streams[s], self.stream_widths[s]);
            for b in 0..blocks.len() {
                sites.extend(self.block_sites(s, b, &stage_sizes, (in_w, out_w)));
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

    /// The convolutions of block `b` of stage `s`, reading stream width `in_w` and writing
    /// `out_w`; `stage_sizes` are the stages' output sides.
    fn block_sites(
        &self,
        s: usize,
        b: usize,
        stage_sizes: &[i64],
        (in_w, out_w): (Width, Width),
    ) -> Vec<CostSite> {
        let block = &self.layers[s][b];
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
        let size = stage_sizes[s];
        let mut sites = vec![conv_site(
            format!("{name}.conv1"),
            in_w,
            inner[0],
            &block.conv1,
            conv1_size,
        )];
        match &block.conv3 {
            None => sites.push(conv_site(
                format!("{name}.conv2"),
                inner[0],
                out_w,
                &block.conv2,
                size,
            )),
            Some((conv3, _)) => {
                sites.push(conv_site(
                    format!("{name}.conv2"),
                    inner[0],
                    inner[1],
                    &block.conv2,
                    size,
                ));
                sites.push(conv_site(
                    format!("{name}.conv3"),
                    inner[1],
                    out_w,
                    conv3,
                    size,
                ));
            }
        }
        if let Some((conv, _)) = &block.downsample {
            sites.push(conv_site(
                format!("{name}.downsample"),
                in_w,
                out_w,
                conv,
                size,
            ));
        }
        sites
    }
}
