//! Datasets as tensors already on the device: labelled images (IDX) and tokenised text corpora,
//! behind one trait the stages use. No model code.

mod images;
mod text;

pub use images::{parse_idx, BatchShape, ImageDataset};
pub use text::{load_vocabulary, tokenizer_from_gguf, TextDataset, Vocabulary};

use tch::{Kind, Tensor};

/// How quality on a split is judged.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Metric {
    /// Percent of examples whose top logit is the label (higher is better).
    Top1Accuracy,
    /// exp(mean next-token cross-entropy) (lower is better).
    Perplexity,
    /// Mean cosine similarity of the cls embedding to the teacher's (a backbone without labels;
    /// the teacher scores 1, higher is better).
    ClsCosine,
}

impl Metric {
    /// The key written into `summary.json`'s `quality.metric`.
    pub fn name(&self) -> &'static str {
        match self {
            Metric::Top1Accuracy => "test_top1_accuracy_percent",
            Metric::Perplexity => "test_perplexity",
            Metric::ClsCosine => "test_cls_cosine_to_teacher",
        }
    }

    pub fn higher_is_better(&self) -> bool {
        *self != Metric::Perplexity
    }
}

/// A split of examples: model inputs with their targets (class labels `[batch]`, or next tokens
/// `[batch, tokens]`).
pub trait Examples {
    fn len(&self) -> i64;
    fn is_empty(&self) -> bool {
        self.len() == 0
    }
    /// A random batch drawn by the global (seeded) generator; float inputs in `kind` (token ids
    /// stay i64).
    fn random_batch(&self, batch: i64, kind: Kind) -> (Tensor, Tensor);
    /// Consecutive batches in order.
    fn batches(&self, batch: i64, kind: Kind) -> Box<dyn Iterator<Item = (Tensor, Tensor)> + '_>;
    fn metric(&self) -> Metric;
    /// Class labels: one more than the largest label of the split's file (`None` where the
    /// targets are next tokens).
    fn classes(&self) -> Option<i64> {
        None
    }
}
