//! The per-layer widths a slim export records in `config.json` on top of a stock config
//! (`hawada_heads`, `hawada_kv_heads`, `hawada_intermediate_sizes`, `hawada_attention_layers`,
//! `hawada_mlp_layers`), shared by the transformer families: one struct, flattened into each
//! family's config so the keys stay where they always were, with its validation and the rule that
//! turns a keep-set's per-layer widths into it.

use crate::error::{Error, Result};
use serde::{Deserialize, Serialize};
use std::path::Path;

/// Slim widths of a transformer, one entry per layer in each list; an absent list means every
/// layer has the stock width (or keeps its sublayer).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct SlimWidths {
    /// Which layers keep their attention sublayer (absent: all).
    #[serde(
        rename = "hawada_attention_layers",
        default,
        skip_serializing_if = "Option::is_none"
    )]
    pub attention_layers: Option<Vec<bool>>,
    /// Which layers keep their MLP sublayer (absent: all).
    #[serde(
        rename = "hawada_mlp_layers",
        default,
        skip_serializing_if = "Option::is_none"
    )]
    pub mlp_layers: Option<Vec<bool>>,
    /// Query (attention) heads per layer.
    #[serde(
        rename = "hawada_heads",
        default,
        skip_serializing_if = "Option::is_none"
    )]
    pub heads: Option<Vec<i64>>,
    /// KV heads per layer (grouped-query attention only).
    #[serde(
        rename = "hawada_kv_heads",
        default,
        skip_serializing_if = "Option::is_none"
    )]
    pub kv_heads: Option<Vec<i64>>,
    /// MLP width per layer.
    #[serde(
        rename = "hawada_intermediate_sizes",
        default,
        skip_serializing_if = "Option::is_none"
    )]
    pub intermediate_sizes: Option<Vec<i64>>,
}

/// What a slim export keeps of one layer: its widths (a dropped sublayer records the width it
/// had) and which sublayers stay.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct KeptLayer {
    pub heads: i64,
    /// `None` where the family has no separate KV heads.
    pub kv_heads: Option<i64>,
    pub intermediate_size: i64,
    pub attention: bool,
    pub mlp: bool,
}

/// The entry of layer `layer` in `list`, or `stock` when there is no list.
fn width_at(list: &Option<Vec<i64>>, layer: usize, stock: i64) -> i64 {
    list.as_ref().map_or(stock, |w| w[layer])
}

impl SlimWidths {
    /// Checks every list has one entry per layer (`layers` of them), widths positive; the error
    /// names the first bad field of `file`.
    pub fn validate(&self, file: &Path, layers: usize) -> Result<()> {
        for (field, list) in [
            ("hawada_heads", &self.heads),
            ("hawada_kv_heads", &self.kv_heads),
            ("hawada_intermediate_sizes", &self.intermediate_sizes),
        ] {
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
        for (field, list) in [
            ("hawada_attention_layers", &self.attention_layers),
            ("hawada_mlp_layers", &self.mlp_layers),
        ] {
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

    /// Whether layer `layer` has its attention and its MLP sublayer.
    pub fn sublayers(&self, layer: usize) -> (bool, bool) {
        (
            self.attention_layers.as_ref().is_none_or(|l| l[layer]),
            self.mlp_layers.as_ref().is_none_or(|l| l[layer]),
        )
    }

    /// Query heads of layer `layer` (`stock` where no list is recorded).
    pub fn heads(&self, layer: usize, stock: i64) -> i64 {
        width_at(&self.heads, layer, stock)
    }

    /// KV heads of layer `layer` (`stock` where no list is recorded).
    pub fn kv_heads(&self, layer: usize, stock: i64) -> i64 {
        width_at(&self.kv_heads, layer, stock)
    }

    /// MLP width of layer `layer` (`stock` where no list is recorded).
    pub fn intermediate_size(&self, layer: usize, stock: i64) -> i64 {
        width_at(&self.intermediate_sizes, layer, stock)
    }

    /// The slim widths of the kept layers: every width list, and a sublayer list only where some
    /// layer drops that sublayer. Errors when a kept sublayer would have no unit left.
    pub fn of_layers(layers: &[KeptLayer]) -> Result<SlimWidths> {
        let widths = layers
            .iter()
            .flat_map(|l| [Some(l.heads), l.kv_heads, Some(l.intermediate_size)])
            .flatten();
        if widths.into_iter().any(|w| w == 0) {
            return Err(Error::Invalid(
                "keep-set removes every unit of a kept sublayer; min_keep must be ≥ 1".into(),
            ));
        }
        let flags = |kept: fn(&KeptLayer) -> bool| {
            let flags: Vec<bool> = layers.iter().map(kept).collect();
            (!flags.iter().all(|&f| f)).then_some(flags)
        };
        let kv_heads: Option<Vec<i64>> = layers.iter().map(|l| l.kv_heads).collect();
        Ok(SlimWidths {
            attention_layers: flags(|l| l.attention),
            mlp_layers: flags(|l| l.mlp),
            heads: Some(layers.iter().map(|l| l.heads).collect()),
            kv_heads,
            intermediate_sizes: Some(layers.iter().map(|l| l.intermediate_size).collect()),
        })
    }

    /// Whether every layer has the same widths and keeps both sublayers: then a stock config
    /// says it all.
    pub fn is_uniform(&self) -> bool {
        let same =
            |list: &Option<Vec<i64>>| list.as_ref().is_none_or(|w| w.iter().all(|&x| x == w[0]));
        same(&self.heads)
            && same(&self.kv_heads)
            && same(&self.intermediate_sizes)
            && self.attention_layers.is_none()
            && self.mlp_layers.is_none()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The slim-width keys of a config.json as exports before this struct wrote them (a
    /// SmolLM2-style slim LLaMA with a dropped MLP sublayer).
    const SLIM_LLAMA_KEYS: &str = r#"{
        "hawada_attention_layers": [true, true],
        "hawada_mlp_layers": [true, false],
        "hawada_heads": [4, 2],
        "hawada_kv_heads": [2, 1],
        "hawada_intermediate_sizes": [48, 48],
        "torch_dtype": "bfloat16"
    }"#;

    #[derive(Debug, Serialize, Deserialize)]
    struct Flattened {
        #[serde(flatten)]
        slim: SlimWidths,
        #[serde(flatten)]
        other: serde_json::Map<String, serde_json::Value>,
    }

    #[test]
    fn slim_width_keys_read_and_write_back_unchanged_beside_other_keys() {
        let value: serde_json::Value = serde_json::from_str(SLIM_LLAMA_KEYS).unwrap();
        let parsed: Flattened = serde_json::from_value(value.clone()).unwrap();
        assert_eq!(parsed.slim.heads, Some(vec![4, 2]));
        assert_eq!(parsed.slim.kv_heads, Some(vec![2, 1]));
        assert_eq!(parsed.slim.mlp_layers, Some(vec![true, false]));
        // The flattened struct takes its keys: only the others stay in the catch-all map.
        assert_eq!(parsed.other.keys().collect::<Vec<_>>(), vec!["torch_dtype"]);
        assert_eq!(serde_json::to_value(&parsed).unwrap(), value);
        assert!(parsed.slim.validate(Path::new("c"), 2).is_ok());
    }

    #[test]
    fn a_list_of_the_wrong_length_is_named() {
        let slim = SlimWidths {
            kv_heads: Some(vec![1]),
            ..SlimWidths::default()
        };
        let err = slim.validate(Path::new("c"), 2).unwrap_err().to_string();
        assert!(err.contains("hawada_kv_heads"), "{err}");
    }

    #[test]
    fn kept_layers_become_lists_and_sublayer_lists_only_when_one_goes() {
        let layer = |heads, mlp| KeptLayer {
            heads,
            kv_heads: None,
            intermediate_size: 8,
            attention: true,
            mlp,
        };
        let slim = SlimWidths::of_layers(&[layer(2, true), layer(2, true)]).unwrap();
        assert_eq!(slim.attention_layers, None);
        assert_eq!(slim.kv_heads, None);
        assert!(slim.is_uniform());
        let slim = SlimWidths::of_layers(&[layer(2, true), layer(1, false)]).unwrap();
        assert_eq!(slim.mlp_layers, Some(vec![true, false]));
        assert!(!slim.is_uniform());
        assert!(SlimWidths::of_layers(&[layer(0, true)]).is_err());
    }
}
