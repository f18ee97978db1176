//! What several families share: layers as plain structs whose fields are checkpoint names
//! (`weight`, `bias`), built from an `nn::Path` like candle's `with_tracing.rs` layers; and the
//! mechanics of whole-sublayer gates (the group, the gated output, dropping a sublayer's weights
//! from a slim export); and the gate groups every transformer layer declares alike (its MLP
//! units, its optional sublayers).

use super::slim_widths::SlimWidths;
use crate::error::{Error, Result};
use crate::model::{unit_width, Group, KeepSet, Masks, Member, UnitKind};
use std::collections::BTreeMap;
use std::path::Path;
use tch::{nn, Tensor};

/// A dense layer `x·Wᵀ + b`: `weight` `[out, in]`, optional `bias` `[out]`.
#[derive(Debug)]
pub struct Linear {
    pub weight: Tensor,
    pub bias: Option<Tensor>,
}

impl Linear {
    /// Random weights (N(0, 0.02), as HF initialises), zero bias.
    pub fn new(p: nn::Path, c_in: i64, c_out: i64, bias: bool) -> Self {
        Linear {
            weight: p.randn("weight", &[c_out, c_in], 0.0, 0.02),
            bias: bias.then(|| p.zeros("bias", &[c_out])),
        }
    }

    /// The layers stacked along their outputs: one GEMM computing all of them (inference
    /// copies; the result is outside any VarStore). The parts then read their rows of it, so the
    /// copy holds each weight once (an 8B model's q/k/v and gate/up twice was 8 GB more).
    pub fn stacked(parts: &[&Linear]) -> Linear {
        let _guard = tch::no_grad_guard();
        let weights: Vec<&Tensor> = parts.iter().map(|l| &l.weight).collect();
        let biases: Option<Vec<&Tensor>> = parts.iter().map(|l| l.bias.as_ref()).collect();
        let stacked = Linear {
            weight: Tensor::cat(&weights, 0),
            bias: biases.map(|b| Tensor::cat(&b, 0)),
        };
        let mut row = 0;
        for part in parts {
            let rows = part.weight.size()[0];
            part.weight
                .shallow_clone()
                .set_data(&stacked.weight.narrow(0, row, rows));
            if let (Some(bias), Some(all)) = (&part.bias, &stacked.bias) {
                bias.shallow_clone().set_data(&all.narrow(0, row, rows));
            }
            row += rows;
        }
        stacked
    }

    pub fn forward(&self, x: &Tensor) -> Tensor {
        x.linear(&self.weight, self.bias.as_ref())
    }
}

/// Appends the gate group of a whole sublayer named `{name}.sublayer` (one unit that removes the
/// sublayer) when `enabled`; returns its index.
pub fn sublayer_gate(groups: &mut Vec<Group>, name: &str, enabled: bool) -> Option<usize> {
    enabled.then(|| {
        groups.push(Group {
            name: format!("{name}.sublayer"),
            kind: UnitKind::Sublayer,
            len: 1,
            unit_width: 1,
            members: Vec::new(),
            follows: None,
        });
        groups.len() - 1
    })
}

/// A sublayer's output scaled by its gate's mask, when it has a gate and the masks set it.
pub fn gated(out: Tensor, masks: &Masks, gate: Option<usize>) -> Tensor {
    match gate.and_then(|g| masks.get(g)) {
        Some(m) => out * m,
        None => out,
    }
}

/// Whether a keep-set keeps the sublayer whose gate is `gate` (ungated sublayers always stay).
pub fn sublayer_kept(keep: &KeepSet, gate: Option<usize>) -> bool {
    gate.is_none_or(|g| !keep.0[g].is_empty())
}

/// Removes every tensor under one of `prefixes` (each a dotted module path, e.g.
/// `model.layers.3.mlp`): the weights of a sublayer a slim model drops.
pub fn drop_modules(tensors: &mut BTreeMap<String, Tensor>, prefixes: &[String]) {
    tensors.retain(|name, _| !prefixes.iter().any(|p| name.starts_with(&format!("{p}."))));
}

/// A group member: `tensor` sliced along `axis` in blocks of `block` elements.
pub fn member(tensor: String, axis: i64, block: i64) -> Member {
    Member {
        tensor,
        axis,
        block,
    }
}

/// Gate groups of one transformer layer's MLP: its units and the whole-sublayer gate.
#[derive(Debug, Clone, Copy)]
pub struct MlpGroups {
    pub group: usize,
    pub gate: Option<usize>,
}

/// A transformer layer's groups, `A` those of its attention; `None` for a sublayer a slim
/// export dropped.
#[derive(Debug, Clone, Copy)]
pub struct LayerGroups<A> {
    pub attention: Option<A>,
    pub mlp: Option<MlpGroups>,
}

/// Every gate group of `layers` transformer layers, in layer order (per layer: `attention`'s,
/// then `mlp`'s, for the sublayers `slim` keeps), and where each layer's groups sit in that list.
pub fn declare_layer_groups<A>(
    layers: usize,
    slim: &SlimWidths,
    attention: impl Fn(&mut Vec<Group>, usize) -> A,
    mlp: impl Fn(&mut Vec<Group>, usize) -> MlpGroups,
) -> (Vec<Group>, Vec<LayerGroups<A>>) {
    let mut groups = Vec::new();
    let layers = (0..layers)
        .map(|i| {
            let (has_attention, has_mlp) = slim.sublayers(i);
            LayerGroups {
                attention: has_attention.then(|| attention(&mut groups, i)),
                mlp: has_mlp.then(|| mlp(&mut groups, i)),
            }
        })
        .collect();
    (groups, layers)
}

/// Appends the unit group `{name}.mlp` of an MLP `width` wide (units of `per_gate`, or what
/// tiles the width; `members(unit)` its tensors), then its sublayer gate when `sublayer_gates`.
pub fn mlp_groups(
    groups: &mut Vec<Group>,
    name: &str,
    (width, per_gate): (i64, i64),
    sublayer_gates: bool,
    members: impl FnOnce(i64) -> Vec<Member>,
) -> MlpGroups {
    let unit = unit_width(width, per_gate);
    let group = groups.len();
    groups.push(Group {
        name: format!("{name}.mlp"),
        kind: UnitKind::Channels,
        len: width / unit,
        unit_width: unit,
        members: members(unit),
        follows: None,
    });
    let gate = sublayer_gate(groups, &format!("{name}.mlp"), sublayer_gates);
    MlpGroups { group, gate }
}

/// Checks every `(field, value)` of a config `file` is positive and under its sanity limit
/// ([`size_limit`]), naming the first that is not. The limits keep a typo (`hidden_size = 1e9`)
/// from reaching an allocation that panics, crashes or runs for hours (issue 24).
pub fn check_positive(file: &Path, fields: &[(&str, i64)]) -> Result<()> {
    for &(field, value) in fields {
        let limit = size_limit(field);
        if value <= 0 {
            return Err(Error::config(
                file,
                field,
                format!("must be positive, found {value}"),
            ));
        }
        if value > limit {
            return Err(Error::config(
                file,
                field,
                format!("{value} is beyond the sanity limit {limit}; is the config corrupt?"),
            ));
        }
    }
    Ok(())
}

/// The largest value a config size may take: well above every published model (Llama 3.1
/// 405B: hidden 16 384, intermediate 53 248, 126 layers; vocabularies up to 262 144), far below
/// what a device holds.
pub fn size_limit(field: &str) -> i64 {
    match field {
        "num_hidden_layers" | "layers" => 1 << 10,
        "num_channels" | "patch_size" => 1 << 12,
        "image_size" | "hawada_input_size" => 1 << 14,
        "vocab_size" | "num_labels" => 1 << 20,
        _ => 1 << 17, // widths: hidden, intermediate, heads, head_dim, base_width
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tch::{Device, Kind};

    #[test]
    fn stacked_layers_compute_the_parts_and_hold_each_weight_once() {
        tch::manual_seed(0);
        let opts = (Kind::Float, Device::Cpu);
        let part = |rows| Linear {
            weight: Tensor::randn([rows, 5], opts),
            bias: Some(Tensor::randn([rows], opts)),
        };
        let (a, b) = (part(3), part(4));
        let x = Tensor::randn([2, 5], opts);
        let before = Tensor::cat(&[a.forward(&x), b.forward(&x)], 1);
        let stacked = Linear::stacked(&[&a, &b]);
        let after = stacked.forward(&x);
        assert!(before.allclose(&after, 1e-6, 1e-6, false));
        // The parts now read the stacked tensor's storage: one copy of each weight.
        assert_eq!(a.weight.data_ptr(), stacked.weight.data_ptr());
        assert_eq!(
            b.bias.as_ref().unwrap().data_ptr(),
            stacked.bias.as_ref().unwrap().narrow(0, 3, 4).data_ptr()
        );
        assert!(
            Tensor::cat(&[a.forward(&x), b.forward(&x)], 1).allclose(&before, 1e-6, 1e-6, false)
        );
    }
}
