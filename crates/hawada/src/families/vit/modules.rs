//! ViT's and DINOv2's modules as plain structs whose fields follow the checkpoint
//! (`vit.encoder.layer.{i}.attention.attention.query`, `…layernorm_before`; DINOv2's `norm1`,
//! `mlp.fc1`, `layer_scale1.lambda1`): LayerNorm, the attention and MLP sublayers (each optional
//! in a slim export, each scaled by LayerScale in DINOv2) and the encoder layer.

use super::super::layers::MlpGroups;
use super::super::layers::{gated, Linear};
use super::config::{Layout, VitConfig};
use super::groups::{AttentionGroups, LayerGroups};
use crate::model::Masks;
use tch::{nn, Tensor};

/// `p` extended by a dotted module path (`mlp.fc1`; `""` is `p` itself).
pub(super) fn sub<'a>(p: &nn::Path<'a>, dotted: &str) -> nn::Path<'a> {
    dotted
        .split('.')
        .filter(|part| !part.is_empty())
        .fold(p.clone(), |p, part| &p / part)
}

#[derive(Debug)]
pub(super) struct LayerNorm {
    weight: Tensor,
    bias: Tensor,
    eps: f64,
}

impl LayerNorm {
    pub(super) fn new(p: nn::Path, dim: i64, eps: f64) -> Self {
        LayerNorm {
            weight: p.ones("weight", &[dim]),
            bias: p.zeros("bias", &[dim]),
            eps,
        }
    }
    pub(super) fn forward(&self, x: &Tensor) -> Tensor {
        x.layer_norm(
            [self.weight.size()[0]],
            Some(&self.weight),
            Some(&self.bias),
            self.eps,
            true,
        )
    }
}

/// `x + gate · layer_scale1 · attention(layernorm_before(x))`; fields follow
/// `vit.encoder.layer.{i}` (`norm1` in DINOv2).
#[derive(Debug)]
pub(super) struct AttentionSublayer {
    pub(super) layernorm_before: LayerNorm,
    /// DINOv2's `layer_scale1.lambda1`, `[hidden]`.
    pub(super) layer_scale: Option<Tensor>,
    pub(super) query: Linear,
    pub(super) key: Linear,
    pub(super) value: Linear,
    /// Inference copies: query, key and value stacked into one GEMM.
    pub(super) fused_qkv: Option<Linear>,
    pub(super) output_dense: Linear,
    pub(super) heads: i64,
    pub(super) head_group: usize,
    pub(super) gate: Option<usize>,
}

/// `x + gate · layer_scale2 · output(gelu(intermediate(layernorm_after(x))))` (DINOv2:
/// `mlp.fc2(gelu(mlp.fc1(norm2(x))))`).
#[derive(Debug)]
pub(super) struct MlpSublayer {
    pub(super) layernorm_after: LayerNorm,
    /// DINOv2's `layer_scale2.lambda1`, `[hidden]`.
    pub(super) layer_scale: Option<Tensor>,
    pub(super) intermediate_dense: Linear,
    pub(super) mlp_output_dense: Linear,
    pub(super) mlp_group: usize,
    pub(super) gate: Option<usize>,
}

/// One encoder layer; a slim export may have dropped either sublayer.
#[derive(Debug)]
pub(super) struct Layer {
    pub(super) attention: Option<AttentionSublayer>,
    pub(super) mlp: Option<MlpSublayer>,
}

impl AttentionSublayer {
    /// The sublayer's output (before the residual add), `[batch, tokens, hidden]`.
    fn forward(&self, x: &Tensor, masks: &Masks, head_dim: i64) -> Tensor {
        let (b, t, _) = x
            .size3()
            .expect("hidden states are [batch, tokens, hidden]");
        let h = self.layernorm_before.forward(x);
        let split = |y: Tensor| y.view([b, t, self.heads, head_dim]).transpose(1, 2);
        let (q, k, v) = match &self.fused_qkv {
            Some(qkv) => {
                let width = self.heads * head_dim;
                let y = qkv.forward(&h);
                (
                    split(y.narrow(2, 0, width)),
                    split(y.narrow(2, width, width)),
                    split(y.narrow(2, 2 * width, width)),
                )
            }
            None => (
                split(self.query.forward(&h)),
                split(self.key.forward(&h)),
                split(self.value.forward(&h)),
            ),
        };
        let attn = Tensor::scaled_dot_product_attention(
            &q,
            &k,
            &v,
            None::<Tensor>,
            0.0,
            false,
            None,
            false,
        );
        // Out of place: SDPA's backward reads its own output.
        let attn = match masks.get(self.head_group) {
            Some(m) => &attn * m.view([1, self.heads, 1, head_dim]),
            None => attn,
        };
        let attn = attn.transpose(1, 2).reshape([b, t, self.heads * head_dim]);
        scaled(self.output_dense.forward(&attn), self.layer_scale.as_ref())
    }
}

impl MlpSublayer {
    fn forward(&self, x: &Tensor, masks: &Masks) -> Tensor {
        let u = self
            .intermediate_dense
            .forward(&self.layernorm_after.forward(x))
            .gelu("none");
        let u = match masks.get(self.mlp_group) {
            Some(m) => &u * m,
            None => u,
        };
        scaled(self.mlp_output_dense.forward(&u), self.layer_scale.as_ref())
    }
}

/// A sublayer's output times its LayerScale vector, where it has one.
fn scaled(out: Tensor, layer_scale: Option<&Tensor>) -> Tensor {
    match layer_scale {
        Some(lambda) => out * lambda,
        None => out,
    }
}

impl Layer {
    pub(super) fn forward(&self, x: &Tensor, masks: &Masks, head_dim: i64) -> Tensor {
        let mut x = x.shallow_clone();
        if let Some(a) = &self.attention {
            x = &x + gated(a.forward(&x, masks, head_dim), masks, a.gate);
        }
        if let Some(m) = &self.mlp {
            x = &x + gated(m.forward(&x, masks), masks, m.gate);
        }
        x
    }
}

/// DINOv2's LayerScale vector `lambda1` under `p` (`[hidden]`, the config's `layerscale_value`,
/// else 1); other layouts have none.
fn layer_scale(p: nn::Path, cfg: &VitConfig) -> Option<Tensor> {
    (cfg.layout() == Layout::Dinov2).then(|| {
        let value = cfg
            .other
            .get("layerscale_value")
            .and_then(|v| v.as_f64())
            .unwrap_or(1.0);
        p.var("lambda1", &[cfg.hidden_size], nn::Init::Const(value))
    })
}

impl Layer {
    /// Layer `i` of `cfg` under `lp` (`…encoder.layer.{i}`), its modules reading the gate groups
    /// `groups` declared for it; random weights.
    pub(super) fn new(lp: &nn::Path, cfg: &VitConfig, i: usize, groups: LayerGroups) -> Self {
        Layer {
            attention: groups
                .attention
                .map(|g| AttentionSublayer::new(lp, cfg, i, g)),
            mlp: groups.mlp.map(|g| MlpSublayer::new(lp, cfg, i, g)),
        }
    }
}

impl AttentionSublayer {
    fn new(lp: &nn::Path, cfg: &VitConfig, i: usize, groups: AttentionGroups) -> Self {
        let (d, bias) = (cfg.hidden_size, cfg.qkv_bias);
        let heads = cfg.slim.heads(i, cfg.num_attention_heads);
        let width = heads * cfg.head_dim();
        let attn = lp / "attention" / "attention";
        AttentionSublayer {
            layernorm_before: LayerNorm::new(
                lp / cfg.layout().norm_before(),
                d,
                cfg.layer_norm_eps,
            ),
            layer_scale: layer_scale(lp / "layer_scale1", cfg),
            query: Linear::new(&attn / "query", d, width, bias),
            key: Linear::new(&attn / "key", d, width, bias),
            value: Linear::new(&attn / "value", d, width, bias),
            fused_qkv: None,
            output_dense: Linear::new(lp / "attention" / "output" / "dense", width, d, true),
            heads,
            head_group: groups.head_group,
            gate: groups.gate,
        }
    }
}

impl MlpSublayer {
    fn new(lp: &nn::Path, cfg: &VitConfig, i: usize, groups: MlpGroups) -> Self {
        let d = cfg.hidden_size;
        let width = cfg.slim.intermediate_size(i, cfg.mlp_width());
        let [fc1, fc2] = cfg.layout().mlp_projections();
        MlpSublayer {
            layernorm_after: LayerNorm::new(lp / cfg.layout().norm_after(), d, cfg.layer_norm_eps),
            layer_scale: layer_scale(lp / "layer_scale2", cfg),
            intermediate_dense: Linear::new(sub(lp, fc1), d, width, true),
            mlp_output_dense: Linear::new(sub(lp, fc2), width, d, true),
            mlp_group: groups.group,
            gate: groups.gate,
        }
    }
}
