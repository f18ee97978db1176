//! LLaMA's coupling as data (DESIGN §2): per layer, whole KV groups (k, v rows), query heads (q
//! rows and o_proj columns) that *follow* their KV group, SwiGLU units in groups of
//! `channels_per_gate` (gate and up rows, down columns), and optionally a gate per whole
//! sublayer; and the cost sites the latency proxy tabulates for one pass.

use super::super::layers::{self, declare_layer_groups, member, sublayer_gate, MlpGroups};
use super::config::LlamaConfig;
use super::Llama;
use crate::model::{CostSite, Group, SiteOp, UnitKind, Width, Workload};

/// Gate groups of one layer's attention: its KV groups, its query heads (which follow them) and
/// the whole-sublayer gate, when sublayers are gated.
#[derive(Debug, Clone, Copy)]
pub(super) struct AttentionGroups {
    pub kv_group: usize,
    pub head_group: usize,
    pub gate: Option<usize>,
}

/// A decoder layer's groups.
pub(super) type LayerGroups = super::super::layers::LayerGroups<AttentionGroups>;

/// Every gate group of a model of `cfg`, in layer order (per layer: KV groups, heads, attention
/// gate, MLP units, MLP gate), and where each layer's groups sit in that list.
pub(super) fn declare_groups(cfg: &LlamaConfig) -> (Vec<Group>, Vec<LayerGroups>) {
    declare_layer_groups(
        cfg.num_hidden_layers,
        &cfg.slim,
        |groups, i| attention_groups(groups, cfg, i),
        |groups, i| mlp_groups(groups, cfg, i),
    )
}

/// Appends layer `i`'s KV-group and query-head groups (and its sublayer gate).
fn attention_groups(groups: &mut Vec<Group>, cfg: &LlamaConfig, i: usize) -> AttentionGroups {
    let name = format!("model.layers.{i}");
    let head_dim = cfg.head_dim();
    let (heads, kv_heads, _) = cfg.layer_widths(i);
    let rows = |proj: &str| {
        let mut m = vec![member(
            format!("{name}.self_attn.{proj}.weight"),
            0,
            head_dim,
        )];
        if cfg.qkv_bias() {
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
    let gate = sublayer_gate(groups, &format!("{name}.self_attn"), cfg.sublayer_gates);
    AttentionGroups {
        kv_group,
        head_group,
        gate,
    }
}

/// Appends layer `i`'s SwiGLU-unit group: gate and up rows, down columns (and its sublayer
/// gate).
fn mlp_groups(groups: &mut Vec<Group>, cfg: &LlamaConfig, i: usize) -> MlpGroups {
    let name = format!("model.layers.{i}");
    let (_, _, width) = cfg.layer_widths(i);
    let per_gate = (width, cfg.channels_per_gate);
    layers::mlp_groups(groups, &name, per_gate, cfg.sublayer_gates, |unit| {
        let mut members = vec![
            member(format!("{name}.mlp.gate_proj.weight"), 0, unit),
            member(format!("{name}.mlp.up_proj.weight"), 0, unit),
            member(format!("{name}.mlp.down_proj.weight"), 1, unit),
        ];
        if cfg.mlp_bias {
            members.push(member(format!("{name}.mlp.gate_proj.bias"), 0, unit));
            members.push(member(format!("{name}.mlp.up_proj.bias"), 0, unit));
        }
        members
    })
}

/// One pass over `queries` new tokens per sequence attending to `keys` tokens (causal when they
/// are the same tokens), each site called `calls` times per workload; names prefixed with
/// `prefix`.
struct Pass<'a> {
    prefix: &'a str,
    queries: i64,
    keys: i64,
    calls: f64,
}

impl Pass<'_> {
    /// A projection of the pass's `queries` rows.
    fn linear(&self, name: String, input: Width, output: Width, gate: Option<usize>) -> CostSite {
        let rows = self.queries;
        CostSite {
            name: format!("{}{name}", self.prefix),
            input,
            output,
            macs_per_in_out: rows as f64,
            elems_per_out: rows as f64,
            op: SiteOp::Linear { rows },
            enabled_by: gate,
            calls: self.calls,
        }
    }
}

impl Llama {
    /// Cost sites of `workload`: one pass, or a prefill and its decoding steps.
    pub(super) fn workload_sites(&self, workload: Workload) -> Vec<CostSite> {
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

    /// Cost sites of one pass (see [`Pass`]): every projection and attention product of every
    /// layer that has them.
    fn sites_of_pass(&self, prefix: &str, queries: i64, keys: i64, calls: f64) -> Vec<CostSite> {
        let pass = Pass {
            prefix,
            queries,
            keys,
            calls,
        };
        (0..self.layers.len())
            .flat_map(|i| {
                let mut sites = self.attention_sites(&pass, i);
                sites.extend(self.mlp_sites(&pass, i));
                sites
            })
            .collect()
    }

    /// Layer `i`'s gate, up and down projections.
    fn mlp_sites(&self, pass: &Pass, i: usize) -> Vec<CostSite> {
        let Some(sub) = &self.layers[i].feed_forward else {
            return Vec::new();
        };
        let fixed = Width::Fixed(self.cfg.hidden_size);
        let mlp = Width::Group(sub.mlp.group);
        [
            ("gate_proj", fixed, mlp),
            ("up_proj", fixed, mlp),
            ("down_proj", mlp, fixed),
        ]
        .into_iter()
        .map(|(proj, input, output)| {
            pass.linear(format!("layer{i}.{proj}"), input, output, sub.gate)
        })
        .collect()
    }

    /// Layer `i`'s q, k, v projections, attention product and o projection.
    fn attention_sites(&self, pass: &Pass, i: usize) -> Vec<CostSite> {
        let Some(sub) = &self.layers[i].attention else {
            return Vec::new();
        };
        let a = &sub.self_attn;
        let head_dim = self.cfg.head_dim();
        let fixed = Width::Fixed(self.cfg.hidden_size);
        let (heads, kv) = (Width::Group(a.head_group), Width::Group(a.kv_group));
        let (queries, keys) = (pass.queries, pass.keys);
        let causal = queries == keys && queries > 1;
        let mut sites = vec![
            pass.linear(format!("layer{i}.q_proj"), fixed, heads, sub.gate),
            pass.linear(format!("layer{i}.k_proj"), fixed, kv, sub.gate),
            pass.linear(format!("layer{i}.v_proj"), fixed, kv, sub.gate),
        ];
        // Query channels in, KV channels out: pruning either changes the cost (QKᵀ and AV work
        // per query channel; K and V reads per KV channel). MACs: 2 per query channel and
        // (query, key) pair (halved when causal), spread over the full KV width so the FLOP
        // count is exact at full KV width.
        let pairs = (queries * keys) as f64 * if causal { 0.5 } else { 1.0 };
        sites.push(CostSite {
            name: format!("{}layer{i}.sdpa", pass.prefix),
            input: heads,
            output: kv,
            macs_per_in_out: 2.0 * pairs / (a.kv_heads * head_dim) as f64,
            elems_per_out: keys as f64,
            op: SiteOp::Attention {
                queries,
                keys,
                head_dim,
                q_per_kv: a.heads / a.kv_heads,
                causal,
            },
            enabled_by: sub.gate,
            calls: pass.calls,
        });
        sites.push(pass.linear(format!("layer{i}.o_proj"), heads, fixed, sub.gate));
        sites
    }
}
