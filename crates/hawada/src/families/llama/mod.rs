//! LLaMA-style decoders (Llama-3.x, SmolLM2, and the variants Mistral, Qwen2/2.5 with their q/k/v
//! biases and Qwen3 with its per-head q/k norms) in Hugging Face's `LlamaForCausalLM` /
//! `MistralForCausalLM` / `Qwen2ForCausalLM` / `Qwen3ForCausalLM` layout and names
//! (`model.layers.{i}.self_attn.q_proj`, `…mlp.gate_proj`, `lm_head`): RMSNorm, rotary position
//! embeddings (default, linear or `llama3` scaling, HF's half-split `rotate_half` layout), SwiGLU
//! (`down(silu(gate(x)) · up(x))`), grouped-query attention through `scaled_dot_product_attention`
//! with `enable_gqa`, tied or untied embeddings, and a KV cache for decoding. GGUF files (`llama`,
//! `qwen2`, `qwen3`) load through `io::gguf`, which maps names and undoes llama.cpp's q/k row
//! permutation. A slim export keeps the source's `model_type`.
//!
//! Files: `config` (serde config, validation), `rope` (rotary embeddings), `modules` (the
//! layers, named like the checkpoint), `groups` (gate groups and cost sites: the coupling as
//! data), `slim` (the slim model of a keep-set), `decode` (KV-cache generation and workloads).
//!
//! Gate groups (DESIGN §2), per layer: whole KV groups (k, v rows), query heads (q rows and o_proj
//! columns) that *follow* their KV group, so a query head keeps its own KV head and a KV group goes
//! with all its query heads (q/k/v bias rows go with their head); SwiGLU units in groups of
//! `channels_per_gate` (gate and up rows, down columns together). RoPE is untouched by pruning: it
//! acts within a head. A slim export is the stock config plus per-layer `hawada_heads`,
//! `hawada_kv_heads` and `hawada_intermediate_sizes`; when every layer shares one width those lists
//! are dropped and the config is a stock `LlamaConfig`.

mod config;
mod decode;
mod groups;
mod modules;
mod rope;
mod slim;

pub use config::{LlamaConfig, Variant, SUPPORTED_MODEL_TYPES};
pub use modules::KvCache;

use super::layers::{gated, Linear};
use crate::error::{Error, Result};
use crate::io::safetensors::load_into;
use crate::model::{CostSite, Family, Group, KeepSet, Masks, NormFolding, Phase, Workload};
use modules::{DecoderLayer, RmsNorm};
use rope::{inverse_frequencies, Rotary};
use std::collections::BTreeMap;
use std::path::Path;
use tch::{nn::VarStore, Device, Kind, Tensor};

pub struct Llama {
    vs: VarStore,
    cfg: LlamaConfig,
    embed_tokens: Tensor,
    layers: Vec<DecoderLayer>,
    norm: RmsNorm,
    /// `None` when the embeddings are tied.
    lm_head: Option<Linear>,
    /// `[head_dim / 2]` f32 rotary inverse frequencies (after scaling).
    inv_freq: Tensor,
    groups: Vec<Group>,
}

impl Llama {
    /// Builds the architecture with random weights on `device` in f32.
    pub fn new(cfg: LlamaConfig, device: Device, file: &Path) -> Result<Self> {
        Self::new_in(cfg, (Kind::Float, device), file)
    }

    /// Builds the architecture with its variables created in `kind`, for weights loaded next:
    /// an f32 model cast afterwards would hold twice the memory first (an 8B slim copy on an
    /// H100: 32 GB of f32 beside the 16 GB bf16 teacher).
    pub fn new_in(cfg: LlamaConfig, (kind, device): (Kind, Device), file: &Path) -> Result<Self> {
        cfg.validate(file)?;
        let (theta, scaling) = cfg.rope(file)?;
        let mut vs = VarStore::new(device);
        vs.set_kind(kind);
        let root = vs.root();
        let model = &root / "model";
        let d = cfg.hidden_size;
        let head_dim = cfg.head_dim();
        let embed_tokens =
            (&model / "embed_tokens").randn("weight", &[cfg.vocab_size, d], 0.0, 0.02);
        let (groups, layer_groups) = groups::declare_groups(&cfg);
        let layers = layer_groups
            .into_iter()
            .enumerate()
            .map(|(i, g)| DecoderLayer::new(&(&model / "layers" / i), &cfg, i, g))
            .collect();
        let norm = RmsNorm::new(&model / "norm", d, cfg.rms_norm_eps);
        let lm_head = (!cfg.tie_word_embeddings)
            .then(|| Linear::new(&root / "lm_head", d, cfg.vocab_size, false));
        let inv_freq =
            Tensor::from_slice(&inverse_frequencies(head_dim, theta, scaling)).to_device(device);
        Ok(Llama {
            vs,
            cfg,
            embed_tokens,
            layers,
            norm,
            lm_head,
            inv_freq,
            groups,
        })
    }

    pub fn config(&self) -> &LlamaConfig {
        &self.cfg
    }

    fn rotary(&self, start: i64, tokens: i64) -> Rotary {
        Rotary::new(&self.inv_freq, start, tokens, self.embed_tokens.kind())
    }

    /// Logits `[batch, tokens, vocab]` for token ids `[batch, tokens]` (i64). With a cache, the
    /// tokens sit at positions `[start, start + tokens)` after the cached ones; several new
    /// tokens need `start == 0` (prefill), later calls bring one token each (decode).
    pub fn forward_cached(
        &self,
        ids: &Tensor,
        masks: &Masks,
        cache: Option<(&KvCache, i64)>,
    ) -> Tensor {
        self.logits(&self.hidden_states(ids, masks, cache))
    }

    /// `[batch, tokens, vocab]` logits of final hidden states `[batch, tokens, hidden]`.
    fn logits(&self, h: &Tensor) -> Tensor {
        match &self.lm_head {
            Some(head) => head.forward(h),
            None => h.linear(&self.embed_tokens, None::<Tensor>),
        }
    }

    /// The final (normed) hidden states `[batch, tokens, hidden]` (see [`Self::forward_cached`]).
    fn hidden_states(&self, ids: &Tensor, masks: &Masks, cache: Option<(&KvCache, i64)>) -> Tensor {
        let _span = tracing::trace_span!("llama").entered();
        let tokens = ids.size()[1];
        let start = cache.as_ref().map_or(0, |(_, s)| *s);
        let rotary = self.rotary(start, tokens);
        let head_dim = self.cfg.head_dim();
        let mut h = Tensor::embedding(&self.embed_tokens, ids, -1, false, false);
        for (i, layer) in self.layers.iter().enumerate() {
            if let Some(a) = &layer.attention {
                let layer_cache = cache
                    .as_ref()
                    .and_then(|(c, s)| c.layers[i].as_ref().map(|(k, v)| (k, v, *s)));
                let out = a.self_attn.forward(
                    &a.input_layernorm.forward(&h),
                    masks,
                    &rotary,
                    layer_cache,
                    head_dim,
                );
                h = &h + gated(out, masks, a.gate);
            }
            if let Some(f) = &layer.feed_forward {
                let out = f
                    .mlp
                    .forward(&f.post_attention_layernorm.forward(&h), masks);
                h = &h + gated(out, masks, f.gate);
            }
        }
        self.norm.forward(&h)
    }
}

impl Family for Llama {
    fn family(&self) -> &'static str {
        "llama"
    }

    fn groups(&self) -> &[Group] {
        &self.groups
    }

    fn forward(&self, x: &Tensor, masks: &Masks, _phase: Phase) -> Tensor {
        self.forward_cached(x, masks, None)
    }

    fn cached_workload(&self, workload: Workload) -> Result<Box<dyn FnMut() -> Tensor + '_>> {
        self.cached_workload_run(workload)
    }

    fn cost_sites(&self, workload: Workload) -> Vec<CostSite> {
        self.workload_sites(workload)
    }

    fn var_store(&self) -> &VarStore {
        &self.vs
    }

    fn var_store_mut(&mut self) -> &mut VarStore {
        &mut self.vs
    }

    fn config_json(&self) -> serde_json::Value {
        serde_json::to_value(&self.cfg).expect("LlamaConfig always serialises")
    }

    /// Stacks q/k/v and gate/up into single projections (fewer, larger GEMMs; decoding is
    /// bound by kernel count at small batches). Outputs are unchanged.
    fn fuse_for_inference(&mut self, _folding: NormFolding) -> Result<()> {
        for layer in &mut self.layers {
            if let Some(sub) = &mut layer.attention {
                let a = &mut sub.self_attn;
                a.fused_qkv = Some(Linear::stacked(&[&a.q_proj, &a.k_proj, &a.v_proj]));
            }
            if let Some(sub) = &mut layer.feed_forward {
                let m = &mut sub.mlp;
                m.fused_gate_up = Some(Linear::stacked(&[&m.gate_proj, &m.up_proj]));
            }
        }
        Ok(())
    }

    fn slim(&self, keep: &KeepSet) -> Result<Box<dyn Family>> {
        Ok(Box::new(self.slim_model(keep)?))
    }

    fn max_tokens(&self) -> Option<i64> {
        Some(self.cfg.max_position_embeddings)
    }

    fn vocab_size(&self) -> Option<i64> {
        Some(self.cfg.vocab_size)
    }

    fn sample_continuations(
        &self,
        prompts: &Tensor,
        new_tokens: i64,
        temperature: f64,
    ) -> Result<Tensor> {
        Ok(self.continue_tokens(prompts, new_tokens, temperature, None))
    }

    fn random_input(&self, batch: i64, tokens: i64) -> Tensor {
        Tensor::randint(
            self.cfg.vocab_size,
            [batch, tokens.max(1)],
            (Kind::Int64, self.vs.device()),
        )
    }
}

/// Reads every `*.safetensors` of an HF directory (one file, or the shards listed in
/// `model.safetensors.index.json`).
fn read_checkpoint(dir: &Path) -> Result<(BTreeMap<String, Tensor>, std::path::PathBuf)> {
    let single = dir.join("model.safetensors");
    if single.exists() {
        return Ok((crate::io::safetensors::read(&single)?, single));
    }
    let index = dir.join("model.safetensors.index.json");
    let value = crate::io::json::read_value(&index).map_err(|_| Error::Data {
        file: single.clone(),
        reason: "missing, and no model.safetensors.index.json lists shards; give an HF \
                     directory with weights, or set model.random_init"
            .into(),
    })?;
    let shards: std::collections::BTreeSet<String> = value
        .get("weight_map")
        .and_then(|m| m.as_object())
        .ok_or_else(|| Error::config(&index, "weight_map", "missing or not an object"))?
        .values()
        .filter_map(|v| v.as_str().map(str::to_string))
        .collect();
    let mut tensors = BTreeMap::new();
    for shard in shards {
        tensors.extend(crate::io::safetensors::read(&dir.join(shard))?);
    }
    Ok((tensors, index))
}

/// Loads `tensors` into `model`'s variables (checked both ways); a tied model ignores a stored
/// `lm_head.weight`, which some tied checkpoints carry anyway.
fn load_weights(model: &Llama, mut tensors: BTreeMap<String, Tensor>, file: &Path) -> Result<()> {
    if model.cfg.tie_word_embeddings {
        tensors.remove("lm_head.weight");
    }
    load_into(&model.vs, &tensors, file)
}

/// Builds a LLaMA from an HF directory's `config.json` value (+ its safetensors unless
/// `random_init`), in `kind`.
pub fn from_dir(
    dir: &Path,
    config: serde_json::Value,
    device: Device,
    kind: Kind,
    random_init: bool,
) -> Result<Llama> {
    let file = dir.join("config.json");
    let cfg: LlamaConfig = crate::io::json::parse(&file, config)?;
    if random_init {
        // Drawn in f32 and then cast, as before: the same random model in every dtype.
        let mut model = Llama::new(cfg, device, &file)?;
        model.vs.set_kind(kind);
        return Ok(model);
    }
    let model = Llama::new_in(cfg, (kind, device), &file)?;
    let (tensors, source) = read_checkpoint(dir)?;
    load_weights(&model, tensors, &source)?;
    Ok(model)
}

/// Registry entry: [`from_dir`] as a family.
pub fn load(
    dir: &Path,
    config: serde_json::Value,
    device: Device,
    kind: Kind,
    random_init: bool,
) -> Result<Box<dyn Family>> {
    Ok(Box::new(from_dir(dir, config, device, kind, random_init)?))
}

/// Builds a decoder from a GGUF file (`llama`, `qwen2` or `qwen3` architecture), dequantised (see
/// `io::gguf`), in `kind`; llama3 rope factors become the config's `rope_scaling`.
pub fn from_gguf(path: &Path, device: Device, kind: Kind) -> Result<Llama> {
    use crate::io::gguf;
    let file = gguf::Gguf::open(path)?;
    let mut cfg: LlamaConfig = crate::io::json::parse(path, gguf::decoder_config(&file)?)?;
    if let Some(rope) = gguf::rope_factors(&file)? {
        cfg.set_rope_factors(&rope, path)?;
    }
    let model = Llama::new_in(cfg, (kind, device), path)?;
    // Each tensor dequantised, checked and copied in turn: all the f32 weights at once beside
    // the model doubled the memory (the real Qwen2.5-Coder-0.5B test peaked at 7.3 GB, now 5.8).
    let vars = model.vs.variables();
    let mut loaded = std::collections::BTreeSet::new();
    gguf::for_each_decoder_tensor(&file, |name, tensor| {
        let Some(var) = vars.get(&name) else {
            // A tied model ignores a stored head, as `load_weights` does.
            if model.cfg.tie_word_embeddings && name == "lm_head.weight" {
                return Ok(());
            }
            return Err(Error::UnexpectedTensor {
                file: path.to_path_buf(),
                name,
            });
        };
        crate::io::safetensors::copy_into_variable(var, &name, &tensor, path)?;
        loaded.insert(name);
        Ok(())
    })?;
    match vars.keys().find(|name| !loaded.contains(*name)) {
        Some(name) => Err(Error::MissingTensor {
            file: path.to_path_buf(),
            name: name.clone(),
        }),
        None => Ok(model),
    }
}

/// A LLaMA from a GGUF file or an HF directory, as its concrete type (generation needs more than
/// the family trait).
pub fn open(path: &Path, device: Device, kind: Kind) -> Result<Llama> {
    if path.extension().is_some_and(|e| e == "gguf") {
        return from_gguf(path, device, kind);
    }
    let config = crate::io::json::read_value(&path.join("config.json"))?;
    from_dir(path, config, device, kind, false)
}
