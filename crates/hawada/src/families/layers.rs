//! What several families share: layers as plain structs whose fields are checkpoint names
//! (`weight`, `bias`), built from an `nn::Path` like candle's `with_tracing.rs` layers; and the
//! mechanics of whole-sublayer gates (the group, the gated output, dropping a sublayer's weights
//! from a slim export).

use crate::error::{Error, Result};
use crate::model::{Group, KeepSet, Masks, UnitKind};
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

/// Checks the per-layer width lists of a slim config (`hawada_heads`, …): one positive entry per
/// layer each, naming the first bad field of `file`.
pub fn check_layer_widths(
    file: &Path,
    layers: usize,
    lists: &[(&str, &Option<Vec<i64>>)],
) -> Result<()> {
    for (field, list) in lists {
        if list
            .as_ref()
            .is_some_and(|l| l.len() != layers || l.iter().any(|&w| w <= 0))
        {
            return Err(Error::config(
                file,
                field,
                format!("expected {layers} positive entries, one per layer"),
            ));
        }
    }
    Ok(())
}

/// Checks the per-layer sublayer lists of a slim config (`hawada_attention_layers`, …): one
/// entry per layer each.
pub fn check_layer_flags(
    file: &Path,
    layers: usize,
    lists: &[(&str, &Option<Vec<bool>>)],
) -> Result<()> {
    for (field, list) in lists {
        if list.as_ref().is_some_and(|l| l.len() != layers) {
            return Err(Error::config(
                file,
                field,
                format!("expected {layers} entries, one per layer"),
            ));
        }
    }
    Ok(())
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
