//! Recipes: TOML parsed, defaulted and validated once into typed structs (ripgrep's low → high
//! args). Unknown keys are errors. Downstream code takes typed fields, never a path to re-parse.

use crate::error::{Error, Result};
use crate::gates::GateOptions;
use crate::latency::measure::TimingProtocol;
use crate::latency::proxy::ProxyCost;
use crate::model::Workload;
use crate::train::AdaptOptions;
use serde::{Deserialize, Serialize};
mod check;
mod choices;
mod smoke;

pub use choices::{DeviceChoice, Dtype, Target};

use std::path::{Path, PathBuf};

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Recipe {
    /// Run name; the run directory defaults to `runs/<name>`.
    pub name: String,
    #[serde(default)]
    pub seed: u64,
    /// `auto` (CUDA if available), `cpu`, `cuda` or `cuda:N`.
    #[serde(default)]
    pub device: DeviceChoice,
    /// `f32`, `bf16` or `f16`.
    #[serde(default)]
    pub dtype: Dtype,
    /// Worker processes training together, one per GPU of this host (NCCL; on the CPU, processes
    /// joined by gloo). Each takes `batch / gpus` rows of every batch; rank 0 alone measures
    /// latency. `hawada run --gpus N` overrides it.
    #[serde(default = "default_gpus")]
    pub gpus: usize,
    pub model: ModelSection,
    #[serde(default)]
    pub teacher_training: Option<TeacherTraining>,
    pub data: DataSection,
    pub latency: LatencySection,
    pub target: Target,
    #[serde(default)]
    pub gates: GateOptions,
    pub adapt: AdaptOptions,
    /// The export search's rounding multiples.
    #[serde(default)]
    pub export: crate::export::search::SearchOptions,
    pub finetune: FinetuneSection,
    #[serde(default)]
    pub eval: EvalSection,
    /// What `hawada bench` times; default: the latency workload.
    #[serde(default)]
    pub bench: Option<BenchSection>,
}

/// `hawada bench`'s workloads, e.g. `workloads = [{ forward = { batch = 8, tokens = 512 } },
/// { decode = { batch = 1, context = 512 } }]`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BenchSection {
    pub workloads: Vec<Workload>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelSection {
    /// A model directory: `config.json` + `model.safetensors`.
    pub dir: PathBuf,
    /// Ignore the weights file and use random weights (latency studies).
    #[serde(default)]
    pub random_init: bool,
}

/// Trains the teacher on the labelled data when `model.dir` holds no model yet (self-trained
/// teachers); the result is cached in `model.dir`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TeacherTraining {
    /// A config.json body (family-specific) for the model to train.
    pub config: serde_json::Value,
    pub epochs: f64,
    pub batch: i64,
    pub lr: f64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DataFormat {
    /// gzipped IDX files `{train,t10k}-{images-idx3,labels-idx1}-ubyte.gz`.
    Idx,
    /// A folder of `.txt` documents, taken in name order (SOTU: by year), tokenised with the
    /// model's tokenizer into fixed-length sequences; the last `test_documents` are held out.
    Text,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DataSection {
    pub format: DataFormat,
    pub dir: PathBuf,
    /// Asset name for `scripts/fetch-assets.sh` when `dir` is missing.
    #[serde(default)]
    pub asset: Option<String>,
    /// Training examples held out (from the end of the training split) as the calibration batch
    /// for probes and quality checks during adaptation.
    #[serde(default = "default_holdout")]
    pub holdout: i64,
    /// Resize images to this square size for the model (bilinear); default: as stored.
    #[serde(default)]
    pub image_size: Option<i64>,
    /// Repeat grey images to this many channels; default: as stored.
    #[serde(default)]
    pub channels: Option<i64>,
    /// Use only the first `limit` test examples for evaluation (long GPU runs); default: all.
    #[serde(default)]
    pub test_limit: Option<i64>,
    /// Text: tokens per training/evaluation sequence.
    #[serde(default = "default_seq_len")]
    pub seq_len: i64,
    /// Text: documents (the last in name order) held out as the test split.
    #[serde(default = "default_test_documents")]
    pub test_documents: usize,
    /// Text: where the tokenizer comes from, when not the model: a model directory, a GGUF file,
    /// or a bare `tokenizer.json` (documents are then joined without an end-of-text token).
    /// Random-init models (Llama-3.2-1B shapes) have none of their own.
    #[serde(default)]
    pub tokenizer: Option<PathBuf>,
    /// Images: a folder of PNG photos (e.g. scikit-image's samples, `scripts/fetch-assets.sh
    /// skimage-photos`), resized and centre-cropped to `image_size`, ImageNet-normalised, on
    /// which teacher and slim model are also compared (`quality.photos` in `summary.json`).
    #[serde(default)]
    pub photos: Option<PathBuf>,
}

/// What the latency target applies to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum WorkloadKind {
    /// A forward over `batch` inputs (for language models: `tokens` tokens, every position's
    /// logits).
    Forward,
    /// A generation's prefill alone: `tokens` tokens per sequence into a KV cache, last-token
    /// logits only (time to first token).
    Prefill,
    /// One decoding step per sequence with a KV cache of `context` tokens.
    Decode,
    /// A generation request: prefill of `tokens` tokens, then `new_tokens` decoding steps.
    Generate,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LatencySection {
    /// Batch size the target latency applies to.
    pub batch: i64,
    /// `forward` (default), `prefill`, `decode` or `generate`.
    #[serde(default = "default_workload")]
    pub workload: WorkloadKind,
    /// Tokens per sequence of a timed forward (language models).
    #[serde(default = "default_tokens")]
    pub tokens: i64,
    /// Cached tokens before a timed decoding step.
    #[serde(default = "default_context")]
    pub context: i64,
    /// Decoding steps of a timed generation request.
    #[serde(default = "default_new_tokens")]
    pub new_tokens: i64,
    #[serde(default = "default_warmup_runs")]
    pub warmup_runs: usize,
    #[serde(default = "default_timed_runs")]
    pub timed_runs: usize,
    /// Random sub-architectures measured to fit the proxy's `(a, b)`.
    #[serde(default = "default_fit_archs")]
    pub fit_archs: usize,
    /// Further random sub-architectures held out to report proxy fidelity.
    #[serde(default = "default_fit_archs")]
    pub holdout_archs: usize,
    /// Time whole-model forwards replayed from CUDA graphs (as a graph-launching deployment
    /// runs them); eager launches when false.
    #[serde(default)]
    pub cuda_graphs: bool,
    /// Which proxy trains the gates: `table` (measured per-site tables) or `flops`.
    #[serde(default = "default_cost")]
    pub cost: ProxyCost,
    /// Site tables: grid spacing in channels/units, and the (lighter) per-site timing protocol.
    #[serde(default = "default_grid_step")]
    pub table_grid_step: i64,
    #[serde(default = "default_table_warmup")]
    pub table_warmup_runs: usize,
    #[serde(default = "default_table_timed")]
    pub table_timed_runs: usize,
    /// Where site tables are cached.
    #[serde(default = "default_cache_dir")]
    pub cache_dir: PathBuf,
}

impl LatencySection {
    /// The timed shapes.
    pub fn workload(&self) -> Workload {
        match self.workload {
            WorkloadKind::Forward => Workload::Forward {
                batch: self.batch,
                tokens: self.tokens,
            },
            WorkloadKind::Prefill => Workload::Prefill {
                batch: self.batch,
                tokens: self.tokens,
            },
            WorkloadKind::Decode => Workload::Decode {
                batch: self.batch,
                context: self.context,
            },
            WorkloadKind::Generate => Workload::Generate {
                batch: self.batch,
                prompt: self.tokens,
                new_tokens: self.new_tokens,
            },
        }
    }
    pub fn protocol(&self) -> TimingProtocol {
        TimingProtocol {
            warmup_runs: self.warmup_runs,
            timed_runs: self.timed_runs,
            cuda_graphs: self.cuda_graphs,
        }
    }
    /// Site tables are timed as the whole model is: replayed from CUDA graphs when it is.
    pub fn table_protocol(&self) -> TimingProtocol {
        TimingProtocol {
            warmup_runs: self.table_warmup_runs,
            timed_runs: self.table_timed_runs,
            cuda_graphs: self.cuda_graphs,
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FinetuneSection {
    pub steps: i64,
    pub batch: i64,
    pub lr: f64,
    #[serde(default = "crate::train::default_kd_temperature")]
    pub kd_temperature: f64,
    #[serde(default = "default_checkpoint_every")]
    pub checkpoint_every: i64,
    /// Weight of cross-entropy on the data's own labels (classes, or next tokens) in the
    /// fine-tune loss, `(1 − w)·KD + w·CE`; 0 distils only. Above 0 the slim model also learns
    /// the data's domain, which the teacher never saw: see `teacher_baseline`.
    #[serde(default)]
    pub label_weight: f64,
    /// Also fine-tune a copy of the whole teacher with the same loss, steps and batches, and
    /// report its quality (`quality.teacher_finetuned`): the fair reference for a slim model
    /// fine-tuned with labels.
    #[serde(default)]
    pub teacher_baseline: bool,
    /// Minitron's teacher correction: fine-tune the whole teacher first (as `teacher_baseline`
    /// does, whose result it is) and make that fine-tuned teacher the teacher of every later
    /// stage: gate training, the export search's scores, the slim model's fine-tune and its KL.
    /// With labels mixed in, the original teacher's distribution is worse on the data than the
    /// slim model can become, and distilling from it holds the slim model back. Needs
    /// `label_weight` > 0 and `steps` > 0.
    #[serde(default)]
    pub correct_teacher: bool,
    /// Score the model with the run's quality metric on the calibration split (`data.holdout`:
    /// training data never trained on, disjoint from test) at every checkpoint, and end with the
    /// best-scoring weights rather than the last: a long fine-tune on a small dataset with
    /// labels can over-fit it. Applies to the teacher baseline too.
    #[serde(default)]
    pub keep_best: bool,
    /// Text sampled from the (original) teacher added to the fine-tune's training data, for
    /// the slim model and the teacher baseline alike (the gates and every score keep to the
    /// real data). A small corpus runs out before a slim model has relearned what it lost; the
    /// teacher's own continuations of it are more text from the distribution being distilled.
    #[serde(default)]
    pub teacher_samples: Option<TeacherSamples>,
}

/// `[finetune.teacher_samples]`: `sequences` sequences of `data.seq_len + 1` tokens, each the
/// first `prompt_tokens` tokens of a random training sequence continued by the teacher at
/// `temperature`, `batch` sequences at a time. Sampled once and kept in the run directory
/// (`teacher-samples.safetensors`), so a resumed run trains on the same text.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TeacherSamples {
    pub sequences: i64,
    #[serde(default = "default_prompt_tokens")]
    pub prompt_tokens: i64,
    #[serde(default = "default_sample_temperature")]
    pub temperature: f64,
    #[serde(default = "default_sample_batch")]
    pub batch: i64,
}

fn default_prompt_tokens() -> i64 {
    32
}
fn default_sample_temperature() -> f64 {
    1.0
}
fn default_sample_batch() -> i64 {
    256
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EvalSection {
    #[serde(default = "default_eval_batch")]
    pub batch: i64,
}

impl Default for EvalSection {
    fn default() -> Self {
        EvalSection {
            batch: default_eval_batch(),
        }
    }
}

fn default_gpus() -> usize {
    1
}
fn default_holdout() -> i64 {
    2000
}
fn default_seq_len() -> i64 {
    256
}
fn default_test_documents() -> usize {
    8
}
fn default_workload() -> WorkloadKind {
    WorkloadKind::Forward
}
fn default_tokens() -> i64 {
    1
}
fn default_context() -> i64 {
    512
}
fn default_new_tokens() -> i64 {
    64
}
fn default_warmup_runs() -> usize {
    TimingProtocol::default().warmup_runs
}
fn default_timed_runs() -> usize {
    TimingProtocol::default().timed_runs
}
fn default_cost() -> ProxyCost {
    ProxyCost::Table
}
fn default_grid_step() -> i64 {
    8
}
fn default_table_warmup() -> usize {
    3
}
fn default_table_timed() -> usize {
    10
}
fn default_cache_dir() -> PathBuf {
    PathBuf::from(".cache/latency")
}
fn default_fit_archs() -> usize {
    4
}
fn default_checkpoint_every() -> i64 {
    100
}
fn default_eval_batch() -> i64 {
    1000
}

/// The embedded default: a self-trained ResNet on Fashion-MNIST, adapted to 0.6× keep-all latency.
pub const DEFAULT_RECIPE: &str = include_str!("../../../../recipes/cpu/fmnist-resnet18-small.toml");

impl Recipe {
    /// Parses and validates recipe text; `file` names it in errors.
    pub fn parse(text: &str, file: &Path) -> Result<Self> {
        let recipe = Self::deserialize(text, file)?;
        recipe.validate(file)?;
        Ok(recipe)
    }

    /// The TOML as a recipe, unvalidated; an error names the field by its dotted path
    /// (`latency.cost`) and, where the text is at fault, its line and column. Syntax errors and
    /// numbers too large for their field come from the parser without a path: the key is read
    /// from the line the error points at, under its `[section]`.
    fn deserialize(text: &str, file: &Path) -> Result<Self> {
        serde_path_to_error::deserialize(toml::Deserializer::new(text)).map_err(|e| {
            let path = e.path().to_string();
            let path = if path == "." { String::new() } else { path };
            let inner = e.into_inner();
            let message = inner.message().trim().replace('\n', "; ");
            let join = |a: &str, b: &str| match (a.is_empty(), b.is_empty()) {
                (true, _) => b.to_string(),
                (_, true) => a.to_string(),
                _ => format!("{a}.{b}"),
            };
            if let Some(missing) = message
                .strip_prefix("missing field `")
                .and_then(|rest| rest.split('`').next())
            {
                return Error::config(
                    file,
                    &join(&path, missing),
                    "missing; the recipe must set it",
                );
            }
            // A span over the whole text points nowhere in particular.
            let span = inner.span().filter(|s| s.end - s.start < text.len());
            let Some(span) = span else {
                let field = if path.is_empty() { "<recipe>" } else { &path };
                return Error::config(file, field, message);
            };
            let (line, column) = line_column(text, span.start);
            // At a line's first column the parser is past the faulty line: no key to name.
            let field = if path.is_empty() {
                (column > 1)
                    .then(|| key_at(text, span.start))
                    .flatten()
                    .unwrap_or_else(|| "<recipe>".into())
            } else {
                path
            };
            Error::config(
                file,
                &field,
                format!("{message} (line {line}, column {column})"),
            )
        })
    }

    pub fn from_file(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
        Self::parse(&text, path)
    }

    /// This recipe with its target replaced (`hawada export --ms/--fraction`).
    pub fn with_target(&self, target: Target) -> Recipe {
        Recipe {
            target,
            ..self.clone()
        }
    }

    /// This recipe with the latency target `fraction` of keep-all (replacing its target), named
    /// `<name>-t<fraction>`: one point of a sweep.
    pub fn at_fraction(&self, fraction: f64, file: &Path) -> Result<Recipe> {
        let mut recipe = self.clone();
        recipe.name = format!("{}-t{fraction}", self.name);
        recipe.target = Target::fraction(fraction)
            .map_err(|reason| Error::config(file, "target.fraction", reason))?;
        recipe.validate(file)?;
        Ok(recipe)
    }
}

/// 1-based line and column (in characters) of byte `offset` of `text`.
fn line_column(text: &str, offset: usize) -> (usize, usize) {
    let before = &text[..offset.min(text.len())];
    let line = before.matches('\n').count() + 1;
    let column = before.rsplit('\n').next().unwrap_or("").chars().count() + 1;
    (line, column)
}

/// The dotted key of the line holding byte `offset` (`latency.batch` for `batch = …` under
/// `[latency]`), when that line is a `key = value` line.
fn key_at(text: &str, offset: usize) -> Option<String> {
    let start = text[..offset.min(text.len())]
        .rfind('\n')
        .map_or(0, |i| i + 1);
    let line = text[start..].lines().next().unwrap_or("");
    let (key, _) = line.split_once('=')?;
    let key = key.trim().trim_matches('"');
    if key.is_empty() || key.starts_with('[') || key.starts_with('#') {
        return None;
    }
    let section = text[..start].lines().rev().find_map(|l| {
        let l = l.trim();
        l.starts_with('[')
            .then(|| l.trim_matches(|c| c == '[' || c == ']').trim().to_string())
    });
    Some(match section {
        Some(section) => format!("{section}.{key}"),
        None => key.to_string(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_recipe_parses() {
        let r = Recipe::parse(DEFAULT_RECIPE, Path::new("default")).unwrap();
        assert_eq!(r.target, Target::Fraction(0.6));
    }

    #[test]
    fn unknown_key_is_an_error_naming_it() {
        let text = format!("{DEFAULT_RECIPE}\nbogus_key = 1\n");
        let err = Recipe::parse(&text, Path::new("r.toml"))
            .unwrap_err()
            .to_string();
        assert!(err.contains("r.toml") && err.contains("bogus_key"), "{err}");
    }

    #[test]
    fn both_targets_is_an_error() {
        let text = DEFAULT_RECIPE.replace("fraction = 0.6", "fraction = 0.6\nms = 3.0");
        let err = Recipe::parse(&text, Path::new("r.toml"))
            .unwrap_err()
            .to_string();
        assert!(err.contains("exactly one"), "{err}");
    }

    #[test]
    fn correcting_the_teacher_without_labels_is_an_error_naming_both_fields() {
        let text = DEFAULT_RECIPE.replace("[finetune]", "[finetune]\ncorrect_teacher = true");
        let err = Recipe::parse(&text, Path::new("r.toml"))
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("finetune.correct_teacher") && err.contains("finetune.label_weight"),
            "{err}"
        );
        let with_labels = text.replace("[finetune]", "[finetune]\nlabel_weight = 0.5");
        assert!(Recipe::parse(&with_labels, Path::new("r.toml")).is_ok());
    }

    #[test]
    fn teacher_samples_need_text_data_and_a_prompt_shorter_than_a_sequence() {
        let samples = |data: &str, prompt_tokens: i64| {
            let text = format!(
                "{}\n[finetune.teacher_samples]\nsequences = 8\nprompt_tokens = {prompt_tokens}\n",
                DEFAULT_RECIPE.replace("format = \"idx\"", data)
            );
            Recipe::parse(&text, Path::new("r.toml"))
        };
        let err = samples("format = \"idx\"", 4).unwrap_err().to_string();
        assert!(
            err.contains("finetune.teacher_samples.sequences") && err.contains("text data"),
            "{err}"
        );
        let text = "format = \"text\"\nseq_len = 16";
        let err = samples(text, 17).unwrap_err().to_string();
        assert!(
            err.contains("finetune.teacher_samples.prompt_tokens") && err.contains("16"),
            "{err}"
        );
        let recipe = samples(text, 16).unwrap();
        let parsed = recipe.finetune.teacher_samples.unwrap();
        assert_eq!((parsed.sequences, parsed.batch), (8, 256));
        assert_eq!(parsed.temperature, 1.0);
    }
}
