//! LLaMA's modules as plain structs whose fields are the checkpoint's names
//! (`model.layers.{i}.self_attn.q_proj`, `…mlp.gate_proj`, `…input_layernorm`): RMSNorm,
//! grouped-query attention through `scaled_dot_product_attention` with `enable_gqa` and a KV cache
//! (and Qwen3's per-head q/k RMSNorm), SwiGLU (`down(silu(gate(x)) · up(x))`), and the decoder
//! layer of two optional sublayers.

use super::super::layers::Linear;
use super::super::layers::MlpGroups;
use super::config::LlamaConfig;
use super::groups::{AttentionGroups, LayerGroups};
use super::rope::Rotary;
use crate::model::Masks;
use tch::{nn, Tensor};

#[derive(Debug)]
pub(super) struct RmsNorm {
    weight: Tensor,
    eps: f64,
}

impl RmsNorm {
    pub(super) fn new(p: nn::Path, dim: i64, eps: f64) -> Self {
        RmsNorm {
            weight: p.ones("weight", &[dim]),
            eps,
        }
    }
    pub(super) fn forward(&self, x: &Tensor) -> Tensor {
        x.rms_norm([self.weight.size()[0]], Some(&self.weight), self.eps)
    }
}

/// Keys and values for decoding, per layer with attention: `[batch, kv_heads, capacity,
/// head_dim]` each.
pub struct KvCache {
    pub(super) layers: Vec<Option<(Tensor, Tensor)>>,
}

#[derive(Debug)]
pub(super) struct Attention {
    pub(super) q_proj: Linear,
    pub(super) k_proj: Linear,
    pub(super) v_proj: Linear,
    pub(super) o_proj: Linear,
    /// Qwen3: RMSNorm of each query / key head, `[head_dim]`, before rope.
    pub(super) q_norm: Option<RmsNorm>,
    pub(super) k_norm: Option<RmsNorm>,
    pub(super) heads: i64,
    pub(super) kv_heads: i64,
    pub(super) head_group: usize,
    pub(super) kv_group: usize,
    /// Inference copies: q, k and v stacked into one projection (one GEMM instead of three).
    pub(super) fused_qkv: Option<Linear>,
}

impl Attention {
    /// `x` `[batch, tokens, hidden]`; with a cache, keys and values are written at
    /// `[start, start + tokens)` and attention reads `[0, start + tokens)`.
    pub(super) fn forward(
        &self,
        x: &Tensor,
        masks: &Masks,
        rotary: &Rotary,
        cache: Option<(&Tensor, &Tensor, i64)>,
        head_dim: i64,
    ) -> Tensor {
        let (b, t, _) = x
            .size3()
            .expect("hidden states are [batch, tokens, hidden]");
        let (q, k, v) = self.rotated_qkv(x, (b, t), rotary, head_dim);
        let (k, v) = match cache {
            Some((keys, values, start)) => {
                keys.narrow(2, start, t).copy_(&k);
                values.narrow(2, start, t).copy_(&v);
                (keys.narrow(2, 0, start + t), values.narrow(2, 0, start + t))
            }
            None => (k, v),
        };
        // Causal within the new tokens; a cached prefix (decode: one new token) is all visible.
        let causal = t > 1;
        let attn = Tensor::scaled_dot_product_attention(
            &q,
            &k,
            &v,
            None::<Tensor>,
            0.0,
            causal,
            None,
            self.heads != self.kv_heads,
        );
        // Out of place: SDPA's backward reads its own output.
        let attn = match self.head_mask(masks, head_dim) {
            Some(g) => attn * g,
            None => attn,
        };
        let attn = attn.transpose(1, 2).reshape([b, t, self.heads * head_dim]);
        self.o_proj.forward(&attn)
    }

    /// Queries, keys (both normed where the variant norms heads, and rotated) and values,
    /// `[batch, heads, tokens, head_dim]` each.
    fn rotated_qkv(
        &self,
        x: &Tensor,
        (b, t): (i64, i64),
        rotary: &Rotary,
        head_dim: i64,
    ) -> (Tensor, Tensor, Tensor) {
        let split = |y: Tensor, heads: i64| y.view([b, t, heads, head_dim]).transpose(1, 2);
        let (q, k, v) = match &self.fused_qkv {
            Some(qkv) => {
                let (h, kv) = (self.heads, self.kv_heads);
                let y = split(qkv.forward(x), h + 2 * kv);
                let v = y.narrow(1, h + kv, kv);
                if self.q_norm.is_none() {
                    // One rotation for the query and key heads together.
                    let qk = rotary.apply(&y.narrow(1, 0, h + kv));
                    return (qk.narrow(1, 0, h), qk.narrow(1, h, kv), v);
                }
                (y.narrow(1, 0, h), y.narrow(1, h, kv), v)
            }
            None => (
                split(self.q_proj.forward(x), self.heads),
                split(self.k_proj.forward(x), self.kv_heads),
                split(self.v_proj.forward(x), self.kv_heads),
            ),
        };
        let (q, k) = match (&self.q_norm, &self.k_norm) {
            (Some(q_norm), Some(k_norm)) => (q_norm.forward(&q), k_norm.forward(&k)),
            _ => (q, k),
        };
        (rotary.apply(&q), rotary.apply(&k), v)
    }

    /// The mask of every query head's output, `[1, heads, 1, head_dim]`: its own gate times its
    /// KV group's; `None` when neither group is masked.
    fn head_mask(&self, masks: &Masks, head_dim: i64) -> Option<Tensor> {
        let per_kv = self.heads / self.kv_heads;
        let heads = masks
            .get(self.head_group)
            .map(|m| m.view([self.kv_heads, per_kv, head_dim]));
        let kv = masks
            .get(self.kv_group)
            .map(|m| m.view([self.kv_heads, 1, head_dim]));
        let both = match (heads, kv) {
            (Some(h), Some(k)) => h * k,
            (Some(h), None) => h,
            (None, Some(k)) => k.expand([self.kv_heads, per_kv, head_dim], false),
            (None, None) => return None,
        };
        Some(both.reshape([1, self.heads, 1, head_dim]))
    }
}

#[derive(Debug)]
pub(super) struct Mlp {
    pub(super) gate_proj: Linear,
    pub(super) up_proj: Linear,
    pub(super) down_proj: Linear,
    pub(super) group: usize,
    /// Inference copies: gate and up stacked into one projection.
    pub(super) fused_gate_up: Option<Linear>,
}

impl Mlp {
    pub(super) fn forward(&self, x: &Tensor, masks: &Masks) -> Tensor {
        let u = match &self.fused_gate_up {
            Some(gate_up) => {
                let both = gate_up.forward(x);
                let width = both.size()[both.dim() - 1] / 2;
                both.narrow(-1, 0, width).silu() * both.narrow(-1, width, width)
            }
            None => self.gate_proj.forward(x).silu() * self.up_proj.forward(x),
        };
        let u = match masks.get(self.group) {
            Some(m) => u * m,
            None => u,
        };
        self.down_proj.forward(&u)
    }
}

/// `h + gate · self_attn(input_layernorm(h))`.
#[derive(Debug)]
pub(super) struct AttentionSublayer {
    pub(super) input_layernorm: RmsNorm,
    pub(super) self_attn: Attention,
    /// The sublayer's gate group, when sublayers are gated.
    pub(super) gate: Option<usize>,
}

/// `h + gate · mlp(post_attention_layernorm(h))`.
#[derive(Debug)]
pub(super) struct MlpSublayer {
    pub(super) post_attention_layernorm: RmsNorm,
    pub(super) mlp: Mlp,
    pub(super) gate: Option<usize>,
}

/// A decoder layer; a slim export may have dropped either sublayer.
#[derive(Debug)]
pub(super) struct DecoderLayer {
    pub(super) attention: Option<AttentionSublayer>,
    pub(super) feed_forward: Option<MlpSublayer>,
}

impl DecoderLayer {
    /// Layer `i` of `cfg` under `lp` (`model.layers.{i}`), its modules reading the gate groups
    /// `groups` declared for it; random weights.
    pub(super) fn new(lp: &nn::Path, cfg: &LlamaConfig, i: usize, groups: LayerGroups) -> Self {
        DecoderLayer {
            attention: groups
                .attention
                .map(|g| AttentionSublayer::new(lp, cfg, i, g)),
            feed_forward: groups.mlp.map(|g| MlpSublayer::new(lp, cfg, i, g)),
        }
    }
}

impl AttentionSublayer {
    fn new(lp: &nn::Path, cfg: &LlamaConfig, i: usize, groups: AttentionGroups) -> Self {
        let (d, head_dim, bias) = (cfg.hidden_size, cfg.head_dim(), cfg.qkv_bias());
        let (heads, kv_heads, _) = cfg.layer_widths(i);
        let attn = lp / "self_attn";
        AttentionSublayer {
            input_layernorm: RmsNorm::new(lp / "input_layernorm", d, cfg.rms_norm_eps),
            self_attn: Attention {
                q_proj: Linear::new(&attn / "q_proj", d, heads * head_dim, bias),
                k_proj: Linear::new(&attn / "k_proj", d, kv_heads * head_dim, bias),
                v_proj: Linear::new(&attn / "v_proj", d, kv_heads * head_dim, bias),
                o_proj: Linear::new(&attn / "o_proj", heads * head_dim, d, cfg.o_bias()),
                q_norm: cfg
                    .qk_norm()
                    .then(|| RmsNorm::new(&attn / "q_norm", head_dim, cfg.rms_norm_eps)),
                k_norm: cfg
                    .qk_norm()
                    .then(|| RmsNorm::new(&attn / "k_norm", head_dim, cfg.rms_norm_eps)),
                heads,
                kv_heads,
                head_group: groups.head_group,
                kv_group: groups.kv_group,
                fused_qkv: None,
            },
            gate: groups.gate,
        }
    }
}

impl MlpSublayer {
    fn new(lp: &nn::Path, cfg: &LlamaConfig, i: usize, groups: MlpGroups) -> Self {
        let (d, bias) = (cfg.hidden_size, cfg.mlp_bias);
        let (_, _, width) = cfg.layer_widths(i);
        let mp = lp / "mlp";
        MlpSublayer {
            post_attention_layernorm: RmsNorm::new(
                lp / "post_attention_layernorm",
                d,
                cfg.rms_norm_eps,
            ),
            mlp: Mlp {
                gate_proj: Linear::new(&mp / "gate_proj", d, width, bias),
                up_proj: Linear::new(&mp / "up_proj", d, width, bias),
                down_proj: Linear::new(&mp / "down_proj", width, d, bias),
                group: groups.group,
                fused_gate_up: None,
            },
            gate: groups.gate,
        }
    }
}
