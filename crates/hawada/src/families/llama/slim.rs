//! A slim LLaMA for a keep-set: the sliced tensors (minus the sublayers the keep-set drops) in a
//! model whose config records each layer's kept widths. When every layer keeps one width and
//! both sublayers, the per-layer lists are dropped and the config is a stock `LlamaConfig`.

use super::super::layers::{drop_modules, sublayer_kept};
use super::super::slim_widths::{KeptLayer, SlimWidths};
use super::config::LlamaConfig;
use super::Llama;
use crate::error::Result;
use crate::export::slice::slice_tensors;
use crate::io::safetensors::{load_into, named_tensors};
use crate::model::KeepSet;
use std::collections::BTreeMap;
use std::path::Path;
use tch::Tensor;

impl Llama {
    /// The slim model `keep` selects, in this model's dtype and device.
    pub(super) fn slim_model(&self, keep: &KeepSet) -> Result<Llama> {
        let mut tensors = slice_tensors(&self.groups, &named_tensors(&self.vs), keep)?;
        let kept: Vec<KeptLayer> = (0..self.layers.len())
            .map(|i| self.kept_layer(keep, i, &mut tensors))
            .collect();
        let cfg = self.slim_config(SlimWidths::of_layers(&kept)?);
        let slim = Llama::new_in(
            cfg,
            (self.vs.kind(), self.vs.device()),
            Path::new("<slim config>"),
        )?;
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
        let (heads, kv_heads, intermediate_size) = self.cfg.layer_widths(i);
        let module = |part: &str| format!("model.layers.{i}.{part}");
        let mut kept = KeptLayer {
            heads,
            kv_heads: Some(kv_heads),
            intermediate_size,
            attention: true,
            mlp: true,
        };
        match layer
            .attention
            .as_ref()
            .filter(|a| sublayer_kept(keep, a.gate))
        {
            Some(a) => {
                kept.heads = keep.0[a.self_attn.head_group].len() as i64;
                kept.kv_heads = Some(keep.0[a.self_attn.kv_group].len() as i64);
            }
            None => {
                drop_modules(tensors, &[module("self_attn"), module("input_layernorm")]);
                kept.attention = false;
            }
        }
        match layer
            .feed_forward
            .as_ref()
            .filter(|f| sublayer_kept(keep, f.gate))
        {
            Some(f) => {
                let group = f.mlp.group;
                kept.intermediate_size = keep.0[group].len() as i64 * self.groups[group].unit_width;
            }
            None => {
                drop_modules(
                    tensors,
                    &[module("mlp"), module("post_attention_layernorm")],
                );
                kept.mlp = false;
            }
        }
        kept
    }

    /// This model's config with the slim widths `slim`: a stock config where every layer is
    /// alike.
    fn slim_config(&self, slim: SlimWidths) -> LlamaConfig {
        let mut cfg = self.cfg.clone();
        if slim.is_uniform() {
            let first = |list: &Option<Vec<i64>>| list.as_ref().map(|w| w[0]);
            cfg.num_attention_heads = first(&slim.heads).unwrap_or(cfg.num_attention_heads);
            cfg.num_key_value_heads = first(&slim.kv_heads).or(cfg.num_key_value_heads);
            cfg.intermediate_size =
                first(&slim.intermediate_sizes).unwrap_or(cfg.intermediate_size);
            cfg.head_dim = Some(self.cfg.head_dim());
            cfg.slim = SlimWidths::default();
        } else {
            cfg.slim = slim;
        }
        cfg
    }
}
