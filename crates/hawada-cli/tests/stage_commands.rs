//! The stage commands beside `run`, end to end in a temp dir: `hawada export` from another
//! run's gates, `hawada finetune` of the slim model it wrote, `hawada eval` of the result.

#![allow(clippy::unwrap_used)] // tests: a failed unwrap is a failed test

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

/// `hawada ARGS` in `dir`; asserts it succeeded and returns its output.
fn hawada_ok(dir: &Path, args: &[&str]) -> Output {
    let out = Command::new(env!("CARGO_BIN_EXE_hawada"))
        .current_dir(dir)
        .args(args)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "hawada {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// A self-trained tiny ResNet on Fashion-MNIST whose target every shape meets (1000 s a batch,
/// however loaded the machine), so the gates stay open, the trained keep-set is the whole model,
/// and the export's pick is the best agreement: nothing in it depends on a timing.
fn tiny_recipe(dir: &Path) -> PathBuf {
    let data = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../.cache/assets/fashion-mnist");
    let text = format!(
        r#"
name = "tiny"
device = "cpu"
[model]
dir = "{teacher}"
[teacher_training]
epochs = 0.02
batch = 64
lr = 0.003
[teacher_training.config]
architectures = ["ResNet"]
model_type = "resnet"
block_type = "basic"
layers = [1, 1]
stem = "small"
num_channels = 1
image_size = 28
num_labels = 10
base_width = 8
channels_per_gate = 2
[data]
format = "idx"
dir = "{data}"
holdout = 500
[latency]
batch = 32
warmup_runs = 1
timed_runs = 3
fit_archs = 2
holdout_archs = 2
[target]
ms = 1000000.0
[adapt]
steps = 6
batch = 32
probe_every = 3
checkpoint_every = 3
[finetune]
steps = 8
batch = 32
lr = 0.003
checkpoint_every = 4
[eval]
batch = 2000
"#,
        teacher = dir.join("teacher").display(),
        data = data.display(),
    );
    let path = dir.join("tiny.toml");
    std::fs::write(&path, text).unwrap();
    path
}

fn json(path: &Path) -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

#[test]
fn export_from_another_runs_gates_reproduces_its_slim_model_bit_for_bit() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let recipe = tiny_recipe(dir);
    let recipe = recipe.to_str().unwrap();
    hawada_ok(dir, &["run", recipe, "--run-dir", "first"]);
    let out = hawada_ok(
        dir,
        &[
            "export",
            recipe,
            "--gates",
            "first/gates.json",
            "--run-dir",
            "second",
        ],
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        stdout.contains("as trained") && stdout.contains("* the pick"),
        "{stdout}"
    );
    let picked = |run: &str| {
        let export = json(&dir.join(run).join("export.json"));
        let table = export["search_table"].as_array().unwrap().clone();
        let pick = table.iter().find(|c| c["picked"] == true).unwrap().clone();
        (pick["name"].clone(), table.len())
    };
    assert_eq!(picked("first"), picked("second"));
    let weights = |run: &str| {
        std::fs::read(dir.join(run).join("slim-before-finetune/model.safetensors")).unwrap()
    };
    assert!(
        weights("first") == weights("second"),
        "the slim models differ"
    );
    for file in [
        "gates.json",
        "gates.safetensors",
        "plots/pareto.png",
        "profile.json",
    ] {
        assert!(dir.join("second").join(file).exists(), "{file}");
    }

    // Gates of another model are refused, naming the group that differs.
    let other = std::fs::read_to_string(dir.join("tiny.toml"))
        .unwrap()
        .replace("layers = [1, 1]", "layers = [2, 1]")
        .replace(
            &dir.join("teacher").display().to_string(),
            &dir.join("other").display().to_string(),
        );
    std::fs::write(dir.join("other.toml"), other).unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_hawada"))
        .current_dir(dir)
        .args([
            "export",
            "other.toml",
            "--gates",
            "first",
            "--run-dir",
            "third",
        ])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && stderr.contains("gates.json") && stderr.contains("group"),
        "{stderr}"
    );
}

#[test]
fn finetune_of_an_exported_slim_model_lowers_its_kl_and_eval_reports_it() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let recipe = tiny_recipe(dir);
    let recipe = recipe.to_str().unwrap();
    hawada_ok(dir, &["run", recipe, "--run-dir", "run"]);
    // A slimmer model than the run's: its gates exported at a target nothing meets, so the pick
    // is the fastest candidate, a slim one (at half of keep-all the pick hung on a timing, and on
    // a loaded machine was the whole model). In a directory of its own: a run directory belongs
    // to one recipe and target.
    hawada_ok(
        dir,
        &[
            "export",
            recipe,
            "--gates",
            "run",
            "--ms",
            "0.000001",
            "--run-dir",
            "half",
        ],
    );
    let teacher = dir.join("teacher");
    let teacher = teacher.to_str().unwrap();
    hawada_ok(
        dir,
        &[
            "finetune",
            "half/slim-before-finetune",
            "--teacher",
            teacher,
            "--recipe",
            recipe,
            "--run-dir",
            "tuned",
        ],
    );
    let record = json(&dir.join("tuned/finetune.json"));
    let (before, after) = (
        record["kl_to_teacher_before"].as_f64().unwrap(),
        record["kl_to_teacher_after"].as_f64().unwrap(),
    );
    assert!(after < before, "KL to the teacher {before} → {after}");
    let out = hawada_ok(dir, &["eval", "tuned/slim", "--recipe", recipe]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        stdout.contains("test_top1_accuracy_percent") && stdout.contains(&format!("{after:.4}")),
        "{stdout}"
    );
}
