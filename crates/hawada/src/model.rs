//! The contract between the core and the model families: the `Family` trait and the data it
//! declares (groups of prunable units and how they couple, cost sites for the latency model).
//! No model code lives here; coupling is data, as in Torch-Pruning's dependency groups.

use crate::error::Result;
use std::path::Path;
use tch::{nn::VarStore, Device, Kind, Tensor};

/// What kind of structural unit a gate group removes; the export search rounds per kind.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum UnitKind {
    /// Convolution channels or FFN/MLP units (rounded to multiples of 8, 16, ...).
    Channels,
    /// Attention query heads.
    Heads,
    /// Whole KV groups (GQA).
    KvGroups,
    /// A whole sublayer (attention or MLP), one unit.
    Sublayer,
}

/// One tensor axis that a group's units index: keeping unit `i` keeps
/// `[i·block, (i+1)·block)` along `axis` of `tensor`.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Member {
    /// Checkpoint name of the tensor, e.g. `layer1.0.conv1.weight`.
    pub tensor: String,
    pub axis: i64,
    /// Elements per unit along `axis` (channels per gate group, head_dim for a head).
    pub block: i64,
}

/// A set of units pruned together: one gate logit per unit, and every tensor axis the units index.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Group {
    /// Stable name, e.g. `layer2.1.inner` or `stage3.stream`.
    pub name: String,
    pub kind: UnitKind,
    /// Number of units (gates).
    pub len: i64,
    /// Width of one unit in elements (channels per unit); a kept count `k` is `k·unit_width` wide.
    pub unit_width: i64,
    pub members: Vec<Member>,
    /// Index of the group this one follows: unit `i` here needs unit `i / (len / parent.len)` of
    /// the parent (a query head and its KV group); a parent unit with no kept follower goes too.
    pub follows: Option<usize>,
}

/// Elements per gate for a dimension of `width`: `per_gate` where it divides the width, else
/// their greatest common divisor, so that units always tile the width exactly.
pub fn unit_width(width: i64, per_gate: i64) -> i64 {
    let (mut a, mut b) = (width, per_gate);
    while b != 0 {
        (a, b) = (b, a % b);
    }
    a
}

/// Element indices along a member axis for kept units: unit `i` keeps `[i·block, (i+1)·block)`.
pub fn element_indices(kept: &[i64], block: i64) -> Vec<i64> {
    kept.iter()
        .flat_map(|&i| (i * block)..((i + 1) * block))
        .collect()
}

/// Kept unit indices per group, ascending; same order as `Family::groups`.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct KeepSet(pub Vec<Vec<i64>>);

impl KeepSet {
    /// Keeps every unit of every group.
    pub fn all(groups: &[Group]) -> Self {
        KeepSet(groups.iter().map(|g| (0..g.len).collect()).collect())
    }
}

/// Per-group multiplicative masks, already expanded to elements (`len · unit_width` each, one
/// value per channel), in the model's dtype and device. `None` for a group means "all kept".
pub struct Masks(pub Vec<Option<Tensor>>);

impl Masks {
    /// No gating at all: the teacher's forward.
    pub fn none(n_groups: usize) -> Self {
        Masks((0..n_groups).map(|_| None).collect())
    }

    /// The channel mask of group `g`, `[len · unit_width]`, or `None`.
    pub fn get(&self, g: usize) -> Option<&Tensor> {
        self.0.get(g).and_then(|m| m.as_ref())
    }

    /// Expands unit values `[Σ len]` (groups concatenated in order) to channel masks with one
    /// `repeat_interleave` and splits them per group (views of one tensor).
    /// `repeats` is `[Σ len]` i64 on the same device: each unit's `unit_width`.
    pub fn from_units(groups: &[Group], units: &Tensor, repeats: &Tensor) -> Self {
        let total: i64 = groups.iter().map(|g| g.len * g.unit_width).sum();
        let channels = units.repeat_interleave_self_tensor(repeats, 0, Some(total));
        let mut offset = 0;
        Masks(
            groups
                .iter()
                .map(|g| {
                    let width = g.len * g.unit_width;
                    let m = channels.narrow(0, offset, width);
                    offset += width;
                    Some(m)
                })
                .collect(),
        )
    }

    /// Hard 0/1 masks from a keep-set.
    pub fn from_keep(groups: &[Group], keep: &KeepSet, options: (Kind, Device)) -> Self {
        Masks(
            groups
                .iter()
                .zip(&keep.0)
                .map(|(g, kept)| {
                    let mut m = Tensor::zeros([g.len * g.unit_width], options);
                    if !kept.is_empty() {
                        let elements = element_indices(kept, g.unit_width);
                        let idx = Tensor::from_slice(&elements).to_device(options.1);
                        let _ = m.index_fill_(0, &idx, 1.0);
                    }
                    Some(m)
                })
                .collect(),
        )
    }
}

/// Whether an inference copy folds normalisation into the preceding layer. Which is faster
/// depends on the card and the widths (on an H100, folding slowed ResNet-18 keep-all and sped up
/// its slim exports), so `latency::inference::inference_copy` measures both.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NormFolding {
    Keep,
    Fold,
}

/// How batch-norm style layers behave in a forward.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    /// Running statistics are used (inference, gate training, distillation targets).
    Eval,
    /// Batch statistics are used and running statistics are updated (teacher training, finetune).
    Train,
}

/// The width of one side of a cost site: fixed, or set by a gate group.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize, serde::Deserialize)]
pub enum Width {
    Fixed(i64),
    /// Width = kept units of this group × its `unit_width`.
    Group(usize),
}

/// One operator whose cost the latency model tabulates, e.g. a convolution or a projection.
/// Its FLOP count is `2 · macs_per_in_out · w_in · w_out`, and it touches
/// `elems_per_out · w_out` output elements (elementwise work: norms, activations).
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct CostSite {
    pub name: String,
    pub input: Width,
    pub output: Width,
    pub macs_per_in_out: f64,
    pub elems_per_out: f64,
    /// The operator, so the latency profiler can run this site alone at any widths.
    pub op: SiteOp,
    /// Calls of this site per timed workload (decoding steps of a generation); its cost counts
    /// that many times.
    #[serde(default = "one_call")]
    pub calls: f64,
    /// The sublayer group whose gate switches this site on or off; its cost scales with that
    /// gate's keep probability. `None`: always present.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub enabled_by: Option<usize>,
}

fn one_call() -> f64 {
    1.0
}

/// A generic operator a cost site runs, per input sample (the profiler adds the batch).
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize, serde::Deserialize)]
pub enum SiteOp {
    /// Square 2-D convolution (padding `kernel / 2`, then bias and ReLU) on a square input.
    Conv2d {
        kernel: i64,
        stride: i64,
        input_size: i64,
    },
    /// Dense layer on `rows` rows per sample (tokens; 1 for a classifier head), bias included.
    Linear { rows: i64 },
    /// Scaled dot-product attention of `queries` over `keys` tokens per sample; the output
    /// width counts KV heads × `head_dim` channels; a gated input width counts query heads ×
    /// `head_dim` (rounded up to a multiple of the KV heads), a fixed one means `q_per_kv` query
    /// heads per KV head (1 without GQA).
    Attention {
        queries: i64,
        keys: i64,
        head_dim: i64,
        q_per_kv: i64,
        causal: bool,
    },
}

/// What one timed call runs (DESIGN §4): the fixed shapes a latency target applies to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Workload {
    /// One forward over `batch` inputs: images, or sequences of `tokens` tokens with the logits
    /// of every position (as a training or scoring pass needs them).
    Forward { batch: i64, tokens: i64 },
    /// A generation's prefill alone (time to first token): `batch` prompts of `tokens` tokens
    /// written into a KV cache, logits of the last position only.
    Prefill { batch: i64, tokens: i64 },
    /// One decoding step: a new token for each of `batch` sequences after `context` cached ones.
    Decode { batch: i64, context: i64 },
    /// A whole generation request: a prefill of `prompt` tokens (last-token logits only) into a
    /// KV cache, then `new_tokens` decoding steps, for `batch` sequences. Prefill and decode
    /// weighted as a request spends its time.
    Generate {
        batch: i64,
        prompt: i64,
        new_tokens: i64,
    },
}

impl Workload {
    pub fn batch(&self) -> i64 {
        match *self {
            Workload::Forward { batch, .. }
            | Workload::Prefill { batch, .. }
            | Workload::Decode { batch, .. }
            | Workload::Generate { batch, .. } => batch,
        }
    }
}

/// What a forward returns, which decides how a student is distilled and judged against its
/// teacher.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Output {
    /// Class or next-token logits (last axis): KD is tempered KL, agreement is top-1.
    Logits,
    /// Hidden states `[batch, tokens, hidden]`, token 0 the cls token (a backbone such as
    /// DINOv2): KD is relative MSE, agreement is cosine similarity.
    Features,
}

/// A model family: built from a config and weights, gated, tabulated, and slimmed.
/// The core speaks only this trait.
pub trait Family: Send {
    /// Family registry key, e.g. the value of `model_type`.
    fn family(&self) -> &'static str;
    /// The groups of prunable units and their coupling.
    fn groups(&self) -> &[Group];
    /// Logits for input `x`, with gates applied as multiplicative masks: `[batch, classes]` for
    /// images, `[batch, tokens, vocab]` for token ids `[batch, tokens]`; or hidden states
    /// `[batch, tokens, hidden]` where [`Family::output`] says `Features`.
    fn forward(&self, x: &Tensor, masks: &Masks, phase: Phase) -> Tensor;
    /// What `forward` returns.
    fn output(&self) -> Output {
        Output::Logits
    }
    /// Cost sites for the latency proxy, for the shapes of `workload`.
    fn cost_sites(&self, workload: Workload) -> Vec<CostSite>;
    /// A `Prefill`, `Decode` or `Generate` workload with a KV cache, ready to time: buffers
    /// allocated once and every position fixed, so that a CUDA graph can replay it (a decoding
    /// step writes the same cache slot each call, after a random cache). Families that do not
    /// decode say so.
    fn cached_workload(&self, workload: Workload) -> Result<Box<dyn FnMut() -> Tensor + '_>> {
        let _ = workload;
        Err(crate::error::Error::Invalid(format!(
            "the {} family has no decoding; use latency.workload = \"forward\"",
            self.family()
        )))
    }
    /// The store holding all weights; the unit of trainability.
    fn var_store(&self) -> &VarStore;
    fn var_store_mut(&mut self) -> &mut VarStore;
    /// The model's `config.json` content.
    fn config_json(&self) -> serde_json::Value;
    /// Physically smaller model keeping only `keep`.
    fn slim(&self, keep: &KeepSet) -> Result<Box<dyn Family>>;
    /// A random input of `batch` samples in the model's device and dtype (never zeros): images,
    /// or token ids `[batch, tokens]` (image families ignore `tokens`).
    fn random_input(&self, batch: i64, tokens: i64) -> Tensor;
    /// Rewrites the forward for inference where that changes no output beyond rounding: the
    /// device's preferred layout, and normalisation folded into the preceding layer when
    /// `folding` asks and the family can. Only for inference copies (timing, deployment): the
    /// VarStore keeps the checkpoint layout, so training after this is wrong.
    fn fuse_for_inference(&mut self, folding: NormFolding) -> Result<()> {
        let _ = folding;
        self.to_device_layout();
        Ok(())
    }

    /// Whether `fuse_for_inference(NormFolding::Fold)` changes anything (batch-norm after a
    /// convolution can be folded; layer-norm cannot).
    fn can_fold_norms(&self) -> bool {
        false
    }

    /// Puts the weights in the memory layout the device runs fastest (channels-last convolutions
    /// on CUDA), in place; `prepare_input` then brings inputs to match. Default: nothing to do.
    fn to_device_layout(&mut self) {}

    /// Puts an input into the layout the (fused) model wants, once, outside the timed forward.
    fn prepare_input(&self, x: Tensor) -> Tensor {
        x
    }

    /// The longest sequence (tokens) the model takes, for sequence models.
    fn max_tokens(&self) -> Option<i64> {
        None
    }

    /// The number of token ids the model embeds, for sequence models.
    fn vocab_size(&self) -> Option<i64> {
        None
    }

    /// `prompts` `[batch, prompt]` (i64 token ids) each continued by `new_tokens` tokens sampled
    /// from the model at `temperature`: `[batch, prompt + new_tokens]`, prompts included. Only
    /// language models generate.
    fn sample_continuations(
        &self,
        prompts: &Tensor,
        new_tokens: i64,
        temperature: f64,
    ) -> Result<Tensor> {
        let _ = (prompts, new_tokens, temperature);
        Err(crate::error::Error::Invalid(format!(
            "the {} family does not generate text",
            self.family()
        )))
    }

    /// Number of parameters (excluding buffers such as batch-norm running statistics).
    fn num_params(&self) -> i64 {
        self.var_store()
            .variables()
            .iter()
            .filter(|(name, _)| !name.contains("running_"))
            .map(|(_, t)| t.numel() as i64)
            .sum()
    }

    /// Writes `config.json` + `model.safetensors` into `dir`.
    fn save(&self, dir: &Path) -> Result<()> {
        std::fs::create_dir_all(dir).map_err(|e| crate::error::Error::io(dir, e))?;
        crate::io::json::write(&dir.join("config.json"), &self.config_json())?;
        crate::io::safetensors::write(
            &dir.join("model.safetensors"),
            &crate::io::safetensors::named_tensors(self.var_store()),
        )
    }
}
