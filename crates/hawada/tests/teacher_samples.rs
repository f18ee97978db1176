//! `finetune.teacher_samples` end to end on a tiny random LLaMA with SmolLM2's tokenizer (from
//! the GGUF the tests fetch): the samples continue prompts cut from the training split, join the
//! fine-tune's data, are written once, and a resumed run reads them back (a file that does not
//! fit the recipe is named, never silently resampled).

#![allow(clippy::unwrap_used)] // tests: a failed unwrap is a failed test

mod tiny_text;

use hawada::data::TextDataset;
use hawada::recipe::Recipe;
use std::path::{Path, PathBuf};
use tch::{Device, Tensor};
use tiny_text::{tiny_text, TinyText};

/// The tiny LLaMA embedding SmolLM2's 49152 ids and a recipe over the three documents with 6
/// teacher-sampled sequences; returns the recipe file.
fn tiny_text_run(dir: &Path) -> PathBuf {
    let TinyText {
        model_dir,
        texts,
        tokenizer_file,
    } = tiny_text(dir, Some(49152));
    let recipe = format!(
        r#"name = "samples"
device = "cpu"
seed = 3
[model]
dir = "{}"
random_init = true
[data]
format = "text"
dir = "{}"
tokenizer = "{}"
seq_len = 16
test_documents = 1
holdout = 2
[latency]
batch = 1
tokens = 16
warmup_runs = 1
timed_runs = 2
fit_archs = 1
holdout_archs = 2
table_grid_step = 1000
table_warmup_runs = 1
table_timed_runs = 1
[target]
fraction = 0.9
[adapt]
steps = 1
batch = 2
probe_every = 1
checkpoint_every = 1
[finetune]
steps = 2
batch = 2
lr = 0.001
checkpoint_every = 1
label_weight = 0.5
[finetune.teacher_samples]
sequences = 6
prompt_tokens = 5
batch = 4
"#,
        model_dir.display(),
        texts.display(),
        tokenizer_file.display()
    );
    let file = dir.join("samples.toml");
    std::fs::write(&file, recipe).unwrap();
    file
}

fn run(recipe_file: &Path) -> hawada::error::Result<hawada::run_dir::Summary> {
    let recipe = Recipe::from_file(recipe_file).unwrap();
    let run_dir = hawada::run_dir::RunDir::new(recipe_file.parent().unwrap().join("run"));
    hawada::pipeline::run(&recipe, recipe_file, &run_dir, &hawada::progress::Silent)
}

fn sample_ids(run_dir: &Path) -> Tensor {
    hawada::io::safetensors::read(&run_dir.join("teacher-samples.safetensors"))
        .unwrap()
        .remove("ids")
        .unwrap()
}

#[test]
fn teacher_samples_continue_training_prompts_and_a_resumed_run_reads_them_back() {
    let dir = tempfile::tempdir().unwrap();
    let recipe_file = tiny_text_run(dir.path());
    let summary = run(&recipe_file).unwrap();
    assert_eq!(summary.quality.finetune_teacher_samples, Some(6));
    let run_dir = dir.path().join("run");
    let ids = sample_ids(&run_dir);
    assert_eq!(ids.size(), vec![6, 17]);

    // Every prompt is the start of a training sequence (the first two documents; the third is
    // the test split), and what follows it is the teacher's, not the document's.
    let vocabulary = hawada::data::load_vocabulary(&dir.path().join("tokenizer.json")).unwrap();
    let (train, _test) = TextDataset::load_dir(
        &dir.path().join("texts"),
        &vocabulary.tokenizer,
        16,
        1,
        None,
        Device::Cpu,
    )
    .unwrap();
    let windows = train.sequences.narrow(1, 0, 5);
    let mut continued_otherwise = 0;
    for row in 0..6 {
        let sample = ids.get(row);
        let prompt = sample.narrow(0, 0, 5).unsqueeze(0);
        let matches = windows.eq_tensor(&prompt).all_dim(1, false);
        let window = i64::try_from(matches.nonzero().get(0).get(0)).unwrap();
        if sample
            .not_equal_tensor(&train.sequences.get(window))
            .any()
            .int64_value(&[])
            == 1
        {
            continued_otherwise += 1;
        }
    }
    // A random teacher over 49152 ids does not write the document's own next 12 tokens.
    assert_eq!(continued_otherwise, 6);

    // A resumed run reads the file back rather than sampling again: one that does not fit
    // the recipe is named.
    let wrong = std::collections::BTreeMap::from([("ids".to_string(), ids.narrow(0, 0, 3).copy())]);
    hawada::io::safetensors::write(&run_dir.join("teacher-samples.safetensors"), &wrong).unwrap();
    let err = run(&recipe_file).err().unwrap().to_string();
    assert!(
        err.contains("teacher-samples.safetensors")
            && err.contains("[6, 17]")
            && err.contains("finetune.teacher_samples.sequences"),
        "{err}"
    );
}
