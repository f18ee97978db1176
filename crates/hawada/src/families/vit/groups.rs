//! ViT's coupling as data (DESIGN §2), per layer: attention heads (a head's query, key and value
//! rows and its columns of the output projection go together), MLP units in groups of
//! `channels_per_gate` (first projection rows and bias, second projection columns), and
//! optionally a gate per whole sublayer; and the cost sites the latency proxy tabulates.

use super::super::layers::{self, declare_layer_groups, member, sublayer_gate, MlpGroups};
use super::config::VitConfig;
use super::Vit;
use crate::model::{CostSite, Group, Member, SiteOp, UnitKind, Width};

/// Gate groups of one layer's attention: its heads and the whole-sublayer gate.
#[derive(Debug, Clone, Copy)]
pub(super) struct AttentionGroups {
    pub head_group: usize,
    pub gate: Option<usize>,
}

/// An encoder layer's groups.
pub(super) type LayerGroups = super::super::layers::LayerGroups<AttentionGroups>;

/// Every gate group of a model of `cfg`, in layer order (per layer: heads, attention gate, MLP
/// units, MLP gate), and where each layer's groups sit in that list.
pub(super) fn declare_groups(cfg: &VitConfig) -> (Vec<Group>, Vec<LayerGroups>) {
    declare_layer_groups(
        cfg.num_hidden_layers,
        &cfg.slim,
        |groups, i| attention_groups(groups, cfg, i),
        |groups, i| mlp_groups(groups, cfg, i),
    )
}

/// The dotted name of layer `i` in the checkpoint.
fn layer_name(cfg: &VitConfig, i: usize) -> String {
    format!("{}encoder.layer.{i}", cfg.layout().prefix())
}

/// Appends layer `i`'s head group (and its sublayer gate).
fn attention_groups(groups: &mut Vec<Group>, cfg: &VitConfig, i: usize) -> AttentionGroups {
    let name = layer_name(cfg, i);
    let head_dim = cfg.head_dim();
    let mut members: Vec<Member> = ["query", "key", "value"]
        .iter()
        .flat_map(|t| {
            let tensor = |part: &str| format!("{name}.attention.attention.{t}.{part}");
            let mut m = vec![member(tensor("weight"), 0, head_dim)];
            if cfg.qkv_bias {
                m.push(member(tensor("bias"), 0, head_dim));
            }
            m
        })
        .collect();
    members.push(member(
        format!("{name}.attention.output.dense.weight"),
        1,
        head_dim,
    ));
    let head_group = groups.len();
    groups.push(Group {
        name: format!("{name}.heads"),
        kind: UnitKind::Heads,
        len: cfg.slim.heads(i, cfg.num_attention_heads),
        unit_width: head_dim,
        members,
        follows: None,
    });
    let gate = sublayer_gate(groups, &format!("{name}.attention"), cfg.sublayer_gates);
    AttentionGroups { head_group, gate }
}

/// Appends layer `i`'s MLP-unit group: first projection rows and bias, second projection
/// columns (and its sublayer gate).
fn mlp_groups(groups: &mut Vec<Group>, cfg: &VitConfig, i: usize) -> MlpGroups {
    let name = layer_name(cfg, i);
    let width = cfg.slim.intermediate_size(i, cfg.mlp_width());
    let [fc1, fc2] = cfg.layout().mlp_projections();
    let per_gate = (width, cfg.channels_per_gate);
    layers::mlp_groups(groups, &name, per_gate, cfg.sublayer_gates, |unit| {
        vec![
            member(format!("{name}.{fc1}.weight"), 0, unit),
            member(format!("{name}.{fc1}.bias"), 0, unit),
            member(format!("{name}.{fc2}.weight"), 1, unit),
        ]
    })
}

impl Vit {
    /// Every projection and attention product of every layer that has them, at the input's
    /// token count.
    pub(super) fn sites(&self) -> Vec<CostSite> {
        let t = self.cfg.tokens();
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
        let fixed = Width::Fixed(self.cfg.hidden_size);
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
                let output = format!("layer{i}.attention.output");
                sites.push(linear(output, heads, fixed, a.gate));
            }
            if let Some(m) = &layer.mlp {
                let mlp = Width::Group(m.mlp_group);
                sites.push(linear(format!("layer{i}.intermediate"), fixed, mlp, m.gate));
                sites.push(linear(format!("layer{i}.output"), mlp, fixed, m.gate));
            }
        }
        sites
    }
}
