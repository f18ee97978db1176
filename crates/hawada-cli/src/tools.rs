//! Commands beside the pipeline: `convert`, `generate`, `bench`.

use anyhow::Context;
use hawada::model::Family;
use hawada::recipe::Recipe;
use std::path::Path;

/// `hawada convert`: the model written as an HF directory. A non-empty `out_dir` is refused
/// unless `force`, and then replaced whole: a conversion into another model's folder once kept
/// that model's `tokenizer.json` beside the new weights (issue 24).
pub fn convert(model: &Path, out_dir: &Path, dtype: &str, force: bool) -> anyhow::Result<()> {
    check_convert_target(model, out_dir, force)?;
    let kind = hawada::recipe::Dtype::parse(dtype)
        .with_context(|| format!("--dtype `{dtype}`: expected f32, bf16 or f16"))?
        .kind();
    let loaded = hawada::families::load(model, tch::Device::Cpu, kind, false)
        .with_context(|| format!("loading {}", model.display()))?;
    let tokenizer = loaded
        .max_tokens()
        .map(|_| hawada::data::load_vocabulary(model).map(|v| v.tokenizer))
        .transpose()
        .with_context(|| format!("reading the tokenizer of {}", model.display()))?;
    // Written beside, then moved into place: a failed conversion leaves `out_dir` as it was.
    let staging = staging_dir(out_dir);
    let _ = std::fs::remove_dir_all(&staging);
    hawada::pipeline::save_model(loaded.as_ref(), tokenizer.as_ref(), &staging)
        .with_context(|| format!("writing {}", staging.display()))?;
    if out_dir.exists() {
        std::fs::remove_dir_all(out_dir)
            .with_context(|| format!("replacing {} (--force)", out_dir.display()))?;
    }
    std::fs::rename(&staging, out_dir)
        .with_context(|| format!("moving {} to {}", staging.display(), out_dir.display()))?;
    println!(
        "{} ({}, {} parameters, {dtype}) → {}",
        model.display(),
        loaded.family(),
        loaded.num_params(),
        out_dir.display()
    );
    Ok(())
}

/// `out_dir` must be new or empty, or `force` given; never the model itself or a folder holding
/// it.
fn check_convert_target(model: &Path, out_dir: &Path, force: bool) -> anyhow::Result<()> {
    if !out_dir.exists() {
        return Ok(());
    }
    if !out_dir.is_dir() {
        anyhow::bail!(
            "output {} exists and is not a directory; convert writes a model folder",
            out_dir.display()
        );
    }
    let mut entries: Vec<String> = std::fs::read_dir(out_dir)
        .with_context(|| format!("reading {}", out_dir.display()))?
        .filter_map(|e| e.ok().map(|e| e.file_name().to_string_lossy().into_owned()))
        .collect();
    if entries.is_empty() {
        return Ok(());
    }
    entries.sort();
    if !force {
        anyhow::bail!(
            "output directory {} is not empty (holds {}); give a new or empty directory, or --force to replace it whole",
            out_dir.display(),
            entries.join(", ")
        );
    }
    let (model_abs, out_abs) = (model.canonicalize()?, out_dir.canonicalize()?);
    if std::env::current_dir()?.starts_with(&out_abs) {
        anyhow::bail!(
            "output directory {} holds the working directory; --force would delete it: give another output directory",
            out_dir.display()
        );
    }
    if model_abs.starts_with(&out_abs) {
        anyhow::bail!(
            "output directory {} holds the model being converted ({}); --force would delete it: give another output directory",
            out_dir.display(),
            model.display()
        );
    }
    Ok(())
}

/// The folder a conversion is written to before it replaces `out_dir`.
fn staging_dir(out_dir: &Path) -> std::path::PathBuf {
    let name = out_dir
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "out".into());
    out_dir.with_file_name(format!(".{name}.converting-{}", std::process::id()))
}

pub fn generate(
    model_path: &Path,
    prompt: &str,
    tokens: usize,
    device: &str,
) -> anyhow::Result<()> {
    let device = match device {
        "auto" => tch::Device::cuda_if_available(),
        "cpu" => tch::Device::Cpu,
        "cuda" => tch::Device::Cuda(0),
        other => anyhow::bail!("unknown device `{other}`; expected auto, cpu or cuda"),
    };
    let kind = if device.is_cuda() {
        tch::Kind::BFloat16
    } else {
        tch::Kind::Float
    };
    if prompt.is_empty() {
        anyhow::bail!("--prompt is empty; give at least one word to continue");
    }
    hawada::families::check_language_model(model_path)
        .with_context(|| format!("generate: {}", model_path.display()))?;
    let model = hawada::families::llama::open(model_path, device, kind)
        .with_context(|| format!("loading {}", model_path.display()))?;
    let hawada::data::Vocabulary { tokenizer, eos } = hawada::data::load_vocabulary(model_path)?;
    let encoding = tokenizer
        .encode(prompt, false)
        .map_err(|e| anyhow::anyhow!("tokenizing the prompt: {e}"))?;
    let prompt_ids: Vec<i64> = encoding.get_ids().iter().map(|&i| i as i64).collect();
    if prompt_ids.is_empty() {
        anyhow::bail!(
            "--prompt {prompt:?} is empty once tokenised (0 tokens); give at least one word to continue"
        );
    }
    if let Some(max) = model.max_tokens() {
        let needed = prompt_ids.len() + tokens;
        if needed as i64 > max {
            anyhow::bail!("--prompt ({} tokens) plus --tokens {tokens} is {needed} tokens; the model's context is {max}", prompt_ids.len());
        }
    }
    let started = std::time::Instant::now();
    let ids = model.generate(&prompt_ids, tokens, eos);
    let elapsed = started.elapsed().as_secs_f64();
    let ids_u32: Vec<u32> = ids.iter().map(|&i| i as u32).collect();
    let text = tokenizer
        .decode(&ids_u32, true)
        .map_err(|e| anyhow::anyhow!("decoding: {e}"))?;
    println!("{prompt}{text}");
    eprintln!(
        "[{} prompt tokens, {} new in {elapsed:.2} s on {device:?}]",
        prompt_ids.len(),
        ids.len()
    );
    Ok(())
}

pub fn bench(recipe_path: &Path, out: &Path) -> anyhow::Result<()> {
    let recipe = Recipe::from_file(recipe_path)
        .with_context(|| format!("reading recipe {}", recipe_path.display()))?;
    let device = recipe.device.resolve()?;
    let kind = recipe.dtype.kind();
    tch::manual_seed(recipe.seed as i64);
    if device.is_cuda() {
        hawada::cuda::tune_cudnn_for_fixed_shapes();
    }
    let mut model =
        hawada::families::load(&recipe.model.dir, device, kind, recipe.model.random_init)?;
    model.var_store_mut().freeze();
    model.to_device_layout();
    let slim_keep = hawada::bench::half_keep(model.as_ref());
    std::fs::create_dir_all(out).with_context(|| format!("creating {}", out.display()))?;
    let slim = model.slim(&slim_keep)?;
    slim.save(&out.join("slim"))?;
    hawada::bench::write_reference_io(slim.as_ref(), recipe.data.seq_len, &out.join("slim"))?;
    drop(slim);
    let plan = hawada::bench::BenchPlan {
        workloads: recipe
            .bench
            .as_ref()
            .map_or_else(|| vec![recipe.latency.workload()], |b| b.workloads.clone()),
        step_batch: recipe.adapt.batch,
        step_tokens: recipe.data.seq_len,
        protocol: recipe.latency.protocol(),
        gates: &recipe.gates,
        slim_keep: &slim_keep,
    };
    let bench = hawada::bench::run_bench(model.as_ref(), &plan)?;
    let rows = &bench.rows;
    let device_name = match device {
        tch::Device::Cuda(i) => hawada::cuda::device_info(i)?.name,
        other => hawada::latency::measure::device_name(other),
    };
    let report = serde_json::json!({ "device": device_name, "dtype": recipe.dtype.name(), "recipe": recipe.name, "rows": rows, "fused_vs_reference_rel_diff": bench.fused_vs_reference_rel_diff });
    std::fs::write(
        out.join("bench.json"),
        serde_json::to_string_pretty(&report)?,
    )
    .with_context(|| format!("writing {}", out.join("bench.json").display()))?;
    println!("HawAda bench on {device_name} [{}]", recipe.dtype.name());
    println!(
        "{:<34} {:>6} {:>10} {:>10} {:>10}",
        "", "batch", "mean ms", "p50 ms", "p95 ms"
    );
    println!(
        "fused inference copy vs reference forward: max rel diff {:.2e}",
        bench.fused_vs_reference_rel_diff
    );
    for row in rows {
        let diff = row
            .max_abs_diff_vs_eager
            .map(|d| format!("  (max |graph−eager| {d:.2e})"))
            .unwrap_or_default();
        println!(
            "{:<34} {:>6} {:>10.3} {:>10.3} {:>10.3}{diff}",
            row.name, row.batch, row.latency_ms.mean, row.latency_ms.p50, row.latency_ms.p95
        );
    }
    Ok(())
}
