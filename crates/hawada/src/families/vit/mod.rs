//! ViT (Dosovitskiy et al. 2021) in Hugging Face's `ViTForImageClassification` layout and names
//! (`vit.encoder.layer.{i}.attention.attention.query`, `…intermediate.dense`, `classifier`) or
//! its backbone `ViTModel` (the same without `vit.`, a `pooler` instead of the classifier), and
//! its DINOv2 variant (Oquab et al. 2023) in HF's `Dinov2Model` layout (`encoder.layer.{i}.norm1`,
//! `…mlp.fc1`, `…layer_scale1.lambda1`): pre-LayerNorm blocks, exact GELU, a cls token, learned
//! position embeddings (interpolated bicubically in f32 when the input grid differs from theirs,
//! as transformers does), attention through `scaled_dot_product_attention`. DINOv2 scales each
//! sublayer's output by its LayerScale vector. Backbones (`ViTModel`, `Dinov2Model`) return the
//! normalised hidden states of every token ([`Output::Features`]); the classifier returns class
//! logits from the cls token.
//! `onnx` imports a DINOv2 backbone from an ONNX export.
//!
//! Files: `config` (serde config, checkpoint layouts, validation), `modules` (the layers, named
//! like the checkpoint), `groups` (gate groups and cost sites: the coupling as data), `slim` (the
//! slim model of a keep-set), `onnx` (import).
//!
//! Gate groups (DESIGN §2), per layer: attention heads (a head's q, k, v rows and its columns of
//! the output projection go together) and MLP units in groups of `channels_per_gate`. A slim export
//! is the stock config plus per-layer `hawada_heads` and `hawada_intermediate_sizes` lists.

mod config;
mod groups;
mod modules;
mod onnx;
mod slim;

pub use config::VitConfig;
pub use onnx::from_onnx;

use super::layers::Linear;
use crate::error::Result;
use crate::io::safetensors::load_file_into;
use crate::model::{CostSite, Family, Group, KeepSet, Masks, NormFolding, Output, Phase, Workload};
use config::Layout;
use modules::{sub, Layer, LayerNorm};
use std::path::Path;
use tch::{nn::VarStore, Device, Kind, Tensor};

pub struct Vit {
    vs: VarStore,
    cfg: VitConfig,
    layout: Layout,
    cls_token: Tensor,
    /// `[1, 1 + grid², hidden]` for the grid of `image_size`.
    position_embeddings: Tensor,
    /// Inference copies: the position embeddings already resized to the input's grid (the
    /// resize cost DINOv2 at 224² on an H100 0.9 ms of a 5 ms forward at batch 64).
    positions_at_input: Option<Tensor>,
    patch_projection: (Tensor, Tensor),
    layers: Vec<Layer>,
    layernorm: LayerNorm,
    /// The classifier's head; backbones have none.
    classifier: Option<Linear>,
    /// `ViTModel`'s pooler (dense + tanh of the cls token): loaded and exported with the model,
    /// but not its output, which is every token's hidden state.
    _pooler: Option<Linear>,
    groups: Vec<Group>,
}

impl Vit {
    /// Builds the architecture with random weights on `device` in f32.
    pub fn new(cfg: VitConfig, device: Device, file: &Path) -> Result<Self> {
        cfg.validate(file)?;
        let vs = VarStore::new(device);
        let root = vs.root();
        let layout = cfg.layout();
        let backbone = sub(&root, layout.prefix());
        let emb = &backbone / "embeddings";
        let d = cfg.hidden_size;
        let cls_token = emb.randn("cls_token", &[1, 1, d], 0.0, 0.02);
        let positions = (cfg.image_size / cfg.patch_size).pow(2) + 1;
        let position_embeddings = emb.randn("position_embeddings", &[1, positions, d], 0.0, 0.02);
        if layout == Layout::Dinov2 {
            // Only masked-image pretraining reads it; kept so that checkpoints load both ways.
            let _mask_token = emb.zeros("mask_token", &[1, d]);
        }
        let proj = &emb / "patch_embeddings" / "projection";
        let patch_projection = (
            proj.randn(
                "weight",
                &[d, cfg.num_channels, cfg.patch_size, cfg.patch_size],
                0.0,
                0.02,
            ),
            proj.zeros("bias", &[d]),
        );
        let (groups, layer_groups) = groups::declare_groups(&cfg);
        let layers = layer_groups
            .into_iter()
            .enumerate()
            .map(|(i, g)| Layer::new(&(&backbone / "encoder" / "layer" / i), &cfg, i, g))
            .collect();
        let layernorm = LayerNorm::new(&backbone / "layernorm", d, cfg.layer_norm_eps);
        let classifier = (layout == Layout::Vit)
            .then(|| Linear::new(&root / "classifier", d, cfg.labels().unwrap_or(0), true));
        let pooler = (layout == Layout::VitModel)
            .then(|| Linear::new(&root / "pooler" / "dense", d, d, true));
        Ok(Vit {
            vs,
            cfg,
            layout,
            cls_token,
            position_embeddings,
            positions_at_input: None,
            patch_projection,
            layers,
            layernorm,
            classifier,
            _pooler: pooler,
            groups,
        })
    }

    pub fn config(&self) -> &VitConfig {
        &self.cfg
    }

    /// Position embeddings for a `[rows, cols]` grid of patches: the learned ones, or their patch
    /// part resized bicubically (align_corners off, in f32) as transformers' DINOv2 does.
    fn position_embeddings_for(&self, grid: [i64; 2]) -> Tensor {
        let learned = self.position_embeddings.size()[1] - 1;
        if grid[0] == grid[1] && grid[0] * grid[1] == learned {
            return self.position_embeddings.shallow_clone();
        }
        let d = self.cfg.hidden_size;
        let side = self.cfg.image_size / self.cfg.patch_size;
        let patch = self
            .position_embeddings
            .narrow(1, 1, learned)
            .reshape([1, side, side, d])
            .permute([0, 3, 1, 2])
            .to_kind(Kind::Float)
            .upsample_bicubic2d(grid, false, None, None)
            .to_kind(self.position_embeddings.kind())
            .permute([0, 2, 3, 1])
            .reshape([1, grid[0] * grid[1], d]);
        Tensor::cat(&[self.position_embeddings.narrow(1, 0, 1), patch], 1)
    }
}

impl Family for Vit {
    fn family(&self) -> &'static str {
        match self.layout {
            Layout::Vit | Layout::VitModel => "vit",
            Layout::Dinov2 => "dinov2",
        }
    }

    /// Stacks each layer's query, key and value into one GEMM and resizes the position
    /// embeddings to the input grid once. Layer norms do not fold.
    fn fuse_for_inference(&mut self, _folding: NormFolding) -> Result<()> {
        for layer in &mut self.layers {
            if let Some(a) = &mut layer.attention {
                a.fused_qkv = Some(Linear::stacked(&[&a.query, &a.key, &a.value]));
            }
        }
        let side = self.cfg.input_size() / self.cfg.patch_size;
        self.positions_at_input = Some(tch::no_grad(|| self.position_embeddings_for([side, side])));
        Ok(())
    }

    fn output(&self) -> Output {
        match self.classifier {
            Some(_) => Output::Logits,
            None => Output::Features,
        }
    }

    fn groups(&self) -> &[Group] {
        &self.groups
    }

    fn forward(&self, x: &Tensor, masks: &Masks, _phase: Phase) -> Tensor {
        let _span = tracing::trace_span!("vit").entered();
        let p = self.cfg.patch_size;
        let (b, c, height, width) = x.size4().expect("images are [batch, channels, h, w]");
        let grid = [height / p, width / p];
        // The patch embedding's stride-p convolution as the GEMM it is: on an H100 in bf16
        // at batch 64, 0.08 ms instead of cuDNN's 0.54 ms for ViT-B/16 (0.12 vs 0.27 ms for
        // DINOv2-S/14; bench/vit_patch_embedding.py).
        let (weight, bias) = &self.patch_projection;
        // A remainder narrower than a patch is dropped, as the convolution would.
        let patches = x
            .narrow(2, 0, grid[0] * p)
            .narrow(3, 0, grid[1] * p)
            .reshape([b, c, grid[0], p, grid[1], p])
            .permute([0, 2, 4, 1, 3, 5])
            .reshape([b, grid[0] * grid[1], c * p * p])
            .linear(&weight.reshape([weight.size()[0], -1]), Some(bias));
        let positions = match &self.positions_at_input {
            Some(cached) if cached.size()[1] == grid[0] * grid[1] + 1 => cached.shallow_clone(),
            _ => self.position_embeddings_for(grid),
        };
        let mut h =
            Tensor::cat(&[self.cls_token.expand([b, -1, -1], false), patches], 1) + positions;
        for layer in &self.layers {
            h = layer.forward(&h, masks, self.cfg.head_dim());
        }
        let h = self.layernorm.forward(&h);
        match &self.classifier {
            Some(classifier) => classifier.forward(&h.select(1, 0)),
            None => h,
        }
    }

    /// Images have one workload shape; `workload` only brings the batch, which the profiler adds.
    fn cost_sites(&self, _workload: Workload) -> Vec<CostSite> {
        self.sites()
    }

    fn var_store(&self) -> &VarStore {
        &self.vs
    }

    fn var_store_mut(&mut self) -> &mut VarStore {
        &mut self.vs
    }

    fn config_json(&self) -> serde_json::Value {
        serde_json::to_value(&self.cfg).expect("VitConfig always serialises")
    }

    fn slim(&self, keep: &KeepSet) -> Result<Box<dyn Family>> {
        Ok(Box::new(self.slim_model(keep)?))
    }

    fn random_input(&self, batch: i64, _tokens: i64) -> Tensor {
        let side = self.cfg.input_size();
        Tensor::randn(
            [batch, self.cfg.num_channels, side, side],
            (self.vs.kind(), self.vs.device()),
        )
    }
}

/// Builds a ViT or DINOv2 from a `config.json` value (+ `model.safetensors` unless
/// `random_init`).
pub fn load(
    dir: &Path,
    config: serde_json::Value,
    device: Device,
    kind: Kind,
    random_init: bool,
) -> Result<Box<dyn Family>> {
    let file = dir.join("config.json");
    let cfg: VitConfig = crate::io::json::parse(&file, config)?;
    let mut model = Vit::new(cfg, device, &file)?;
    if !random_init {
        load_file_into(&model.vs, &dir.join("model.safetensors"))?;
    }
    model.vs.set_kind(kind);
    Ok(Box::new(model))
}
