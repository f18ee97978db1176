//! A slim ViT for a keep-set: the sliced tensors (minus the sublayers the keep-set drops) in a
//! model whose config records each layer's kept heads and MLP width.

use super::super::layers::{drop_modules, sublayer_kept};
use super::super::slim_widths::{KeptLayer, SlimWidths};
use super::Vit;
use crate::error::Result;
use crate::export::slice::slice_tensors;
use crate::io::safetensors::{load_into, named_tensors};
use crate::model::KeepSet;
use std::collections::BTreeMap;
use std::path::Path;
use tch::Tensor;

impl Vit {
    /// The slim model `keep` selects, in this model's dtype and device.
    pub(super) fn slim_model(&self, keep: &KeepSet) -> Result<Vit> {
        let mut tensors = slice_tensors(&self.groups, &named_tensors(&self.vs), keep)?;
        let kept: Vec<KeptLayer> = (0..self.layers.len())
            .map(|i| self.kept_layer(keep, i, &mut tensors))
            .collect();
        let mut cfg = self.cfg.clone();
        cfg.slim = SlimWidths::of_layers(&kept)?;
        let kind = self.vs.kind();
        let mut slim = Vit::new(cfg, self.vs.device(), Path::new("<slim config>"))?;
        slim.vs.set_kind(kind);
        load_into(&slim.vs, &tensors, Path::new("<sliced tensors>"))?;
        Ok(slim)
    }

    /// What `keep` keeps of layer `i`; the tensors of a sublayer it drops leave `tensors`.
    fn kept_layer(
        &self,
        keep: &KeepSet,
        i: usize,
        tensors: &mut BTreeMap<String, Tensor>,
    ) -> KeptLayer {
        let layer = &self.layers[i];
        let prefix = self.layout.prefix();
        let [attention_modules, mlp_modules] = self.layout.sublayer_modules();
        let modules = |parts: &[&str]| -> Vec<String> {
            parts
                .iter()
                .map(|part| format!("{prefix}encoder.layer.{i}.{part}"))
                .collect()
        };
        let mut kept = KeptLayer {
            heads: self.cfg.slim.heads(i, self.cfg.num_attention_heads),
            kv_heads: None,
            intermediate_size: self.cfg.slim.intermediate_size(i, self.cfg.mlp_width()),
            attention: true,
            mlp: true,
        };
        match layer
            .attention
            .as_ref()
            .filter(|a| sublayer_kept(keep, a.gate))
        {
            Some(a) => kept.heads = keep.0[a.head_group].len() as i64,
            None => {
                drop_modules(tensors, &modules(attention_modules));
                kept.attention = false;
            }
        }
        match layer.mlp.as_ref().filter(|m| sublayer_kept(keep, m.gate)) {
            Some(m) => {
                let group = m.mlp_group;
                kept.intermediate_size = keep.0[group].len() as i64 * self.groups[group].unit_width;
            }
            None => {
                drop_modules(tensors, &modules(mlp_modules));
                kept.mlp = false;
            }
        }
        kept
    }
}
