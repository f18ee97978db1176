//! The data splits a run reads: training examples, a held-out calibration tail of the training
//! split (export scoring, `finetune.keep_best`), and the test split for quality.

use crate::data::{load_vocabulary, BatchShape, Examples, ImageDataset, TextDataset};
use crate::error::{Error, Result};
use crate::recipe::{DataFormat, Recipe};
use tch::Device;

/// The splits a run uses: training examples, a held-out calibration tail of the training
/// split, and the test split for quality.
pub struct Splits {
    pub train: Box<dyn Examples>,
    pub calibration: Box<dyn Examples>,
    pub test: Box<dyn Examples>,
    /// Text models: the tokenizer the data was cut with, saved beside every export.
    pub tokenizer: Option<tokenizers::Tokenizer>,
    /// Text data: the training split's sequences (the same storage as `train`), which
    /// `finetune.teacher_samples` takes its prompts from and extends.
    pub text_train: Option<TextDataset>,
}

pub fn load_splits(recipe: &Recipe, device: Device) -> Result<Splits> {
    match recipe.data.format {
        DataFormat::Idx => load_image_splits(recipe, device),
        DataFormat::Text => load_text_splits(recipe, device),
    }
}

/// Documents tokenised with the model's tokenizer; the calibration tail is `data.holdout`
/// sequences of the training split.
fn load_text_splits(recipe: &Recipe, device: Device) -> Result<Splits> {
    let vocabulary = load_vocabulary(recipe.data.tokenizer.as_ref().unwrap_or(&recipe.model.dir))?;
    let (full_train, mut test) = TextDataset::load_dir(
        &recipe.data.dir,
        &vocabulary.tokenizer,
        recipe.data.seq_len,
        recipe.data.test_documents,
        vocabulary.eos,
        device,
    )?;
    if let Some(limit) = recipe.data.test_limit {
        test = test.slice(0, limit);
    }
    check_test_split(recipe, test.len())?;
    let holdout = checked_holdout(recipe, full_train.len(), "sequences")?;
    let train_len = full_train.len() - holdout;
    Ok(Splits {
        train: Box::new(full_train.slice(0, train_len)),
        calibration: Box::new(full_train.slice(train_len, holdout)),
        test: Box::new(test),
        tokenizer: Some(vocabulary.tokenizer),
        text_train: Some(full_train.slice(0, train_len)),
    })
}

fn load_image_splits(recipe: &Recipe, device: Device) -> Result<Splits> {
    let mut full_train = ImageDataset::load_idx(&recipe.data.dir, "train", device)?;
    let mut test = ImageDataset::load_idx(&recipe.data.dir, "t10k", device)?;
    if recipe.data.image_size.is_some() || recipe.data.channels.is_some() {
        let shape = BatchShape {
            image_size: recipe
                .data
                .image_size
                .unwrap_or(full_train.images.size()[2]),
            channels: recipe.data.channels.unwrap_or(1),
        };
        full_train.batch_shape = Some(shape);
        test.batch_shape = Some(shape);
    }
    if let Some(limit) = recipe.data.test_limit {
        test = test.take(limit);
    }
    check_test_split(recipe, test.len())?;
    let holdout = checked_holdout(recipe, full_train.len(), "images")?;
    Ok(Splits {
        train: Box::new(full_train.take(full_train.len() - holdout)),
        calibration: Box::new(full_train.slice(full_train.len() - holdout, holdout)),
        test: Box::new(test),
        tokenizer: None,
        text_train: None,
    })
}

/// `data.holdout` examples taken from the end of a training split of `len` `examples`: at least
/// one must stay to train on and one to calibrate with, so the holdout is never clamped silently
/// (a clamped `holdout = 1e9` trained on one image, issue 24).
fn checked_holdout(recipe: &Recipe, len: i64, examples: &str) -> Result<i64> {
    let holdout = recipe.data.holdout;
    if len < 2 {
        return Err(Error::Data {
            file: recipe.data.dir.clone(),
            reason: format!(
                "the training split holds {len} {examples}; a run needs at least 2 (one to train on, one held out by data.holdout for calibration)"
            ),
        });
    }
    if !(1..len).contains(&holdout) {
        return Err(Error::Data {
            file: recipe.data.dir.clone(),
            reason: format!(
                "data.holdout = {holdout} must be in [1, {}]: the training split holds {len} {examples} and at least one must be left to train on",
                len - 1
            ),
        });
    }
    Ok(holdout)
}

/// The test split must hold an example, or every quality is a mean over nothing.
fn check_test_split(recipe: &Recipe, len: i64) -> Result<()> {
    if len == 0 {
        return Err(Error::Data {
            file: recipe.data.dir.clone(),
            reason: "the test split is empty; the run's quality would be computed on nothing"
                .into(),
        });
    }
    Ok(())
}
