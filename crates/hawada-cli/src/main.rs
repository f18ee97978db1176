//! `hawada`: a thin CLI over the library. Parses flags, resolves the recipe once, renders progress
//! bars for the library's observer, prints the result table and the whole error chain.

mod progress;

use anyhow::{bail, Context};
use clap::{Parser, Subcommand};
use hawada::recipe::{Recipe, DEFAULT_RECIPE};
use hawada::run_dir::{RunDir, Summary, SweepDir};
use std::path::{Path, PathBuf};
use std::process::ExitCode;

#[derive(Parser)]
#[command(
    name = "hawada",
    version,
    about = "Adapt a pretrained network to one GPU: learn what it can lose under a measured latency budget, slim it, fine-tune it."
)]
struct Cli {
    /// More logging (-v info, -vv debug); RUST_LOG overrides.
    #[arg(short, long, action = clap::ArgAction::Count, global = true)]
    verbose: u8,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run every stage of a recipe (load, profile, adapt, export, finetune, eval, report);
    /// resumes in an existing run directory. Without RECIPE, runs the embedded default
    /// (self-trained ResNet on Fashion-MNIST, target 0.6× keep-all latency).
    Run {
        recipe: Option<PathBuf>,
        /// Run directory (default: runs/<recipe name>).
        #[arg(long)]
        run_dir: Option<PathBuf>,
        /// A smoke run: every stage of the recipe on the CPU with tiny batches, sequences and
        /// step counts, to check it still runs (default run dir: runs/<file name>-smoke). Its
        /// latencies are no measurement.
        #[arg(long, requires = "recipe")]
        smoke: bool,
        /// Train on N GPUs of this host: one worker process per GPU joined through NCCL (on a
        /// CPU recipe, N processes joined through gloo), each on batch/N rows; rank 0 measures
        /// latency on its GPU and writes the run. Default: the recipe's `gpus` (1). Workers
        /// started by torchrun (RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT set) join as they are.
        #[arg(long)]
        gpus: Option<usize>,
    },
    /// Run a recipe at several latency targets, each in `<run dir>/t<fraction>` (resumed like
    /// `run`), sharing the first target's profile, teacher samples, and teacher baseline or
    /// corrected teacher; writes `sweep.json`, `sweep.html` and charts of speed-up against
    /// agreement and quality (`plots/sweep-*.png`).
    Sweep {
        recipe: PathBuf,
        /// Target fractions of keep-all latency, each in (0, 1].
        #[arg(long, value_delimiter = ',', required = true)]
        targets: Vec<f64>,
        /// Sweep directory (default: runs/<recipe name>-sweep).
        #[arg(long)]
        run_dir: Option<PathBuf>,
        /// Every target as a smoke run (see `run --smoke`).
        #[arg(long)]
        smoke: bool,
    },
    /// Profile a recipe's model on this device: keep-all latency, measured per-site cost tables
    /// (cached), and the fidelity (MAPE, Spearman) of the table and FLOP proxies on held-out
    /// random sub-architectures.
    Profile {
        recipe: PathBuf,
        /// Run directory (default: runs/<recipe name>); `hawada run` there reuses the profile.
        #[arg(long)]
        run_dir: Option<PathBuf>,
    },
    /// Print the device, libtorch and CUDA facts this binary sees.
    Info,
    /// Time HawAda's hot paths for a recipe's model (keep-all forward eager and CUDA graph,
    /// gate-training step, slim forward) and write the JSON rows plus the slim model the PyTorch
    /// baseline (`bench/torch_baseline.py`) times in the same call.
    Bench {
        recipe: PathBuf,
        /// Output folder: bench.json and slim/ (config.json + model.safetensors).
        #[arg(long, default_value = "bench-out")]
        out: PathBuf,
    },
    /// Convert a model (a GGUF or ONNX file, or an HF directory) into an HF directory:
    /// `config.json` + `model.safetensors` (+ `tokenizer.json` for a language model), the layout
    /// every recipe and transformers load.
    Convert {
        model: PathBuf,
        out_dir: PathBuf,
        /// Weight dtype of the output: f32, bf16 or f16.
        #[arg(long, default_value = "f32")]
        dtype: String,
    },
    /// Rewrite report.html and the charts of a finished run directory, or sweep.html and the
    /// charts of a finished sweep directory (one holding `sweep.json`).
    Report { run_dir: PathBuf },
    /// Continue a prompt greedily with a language model (a GGUF file or an HF directory, e.g. a
    /// run's `slim/`), using its own tokenizer and the KV cache.
    Generate {
        model: PathBuf,
        #[arg(long)]
        prompt: String,
        /// New tokens at most (stops at end-of-text).
        #[arg(long, default_value_t = 40)]
        tokens: usize,
        /// `cpu`, `cuda` or `auto`.
        #[arg(long, default_value = "auto")]
        device: String,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let level = match cli.verbose {
        0 => "warn",
        1 => "info",
        _ => "debug",
    };
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(level));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .init();
    // Running out of device memory is reported as an error naming the batch to lower
    // (hawada::pipeline::out_of_memory_as_error); libtorch's panic text would only bury it.
    let default_hook = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        let message = info
            .payload()
            .downcast_ref::<String>()
            .map(String::as_str)
            .or_else(|| info.payload().downcast_ref::<&str>().copied())
            .unwrap_or("");
        if !message.contains("out of memory") {
            default_hook(info);
        }
    }));
    match run(cli) {
        Ok(code) => code,
        Err(err) => {
            eprintln!("hawada: error: {err:#}");
            ExitCode::FAILURE
        }
    }
}

/// Set by `launch_workers` to its own pid: a worker that finds another parent (the launcher was
/// killed, even by SIGKILL) stops, rather than hold its GPU with no one waiting for it.
const LAUNCHER_PID: &str = "HAWADA_LAUNCHER_PID";

/// In a worker started by `launch_workers`, a thread that ends the process once the launcher is
/// gone (its parent pid changes when the launcher dies).
fn stop_when_launcher_dies() {
    let Some(launcher) = std::env::var(LAUNCHER_PID)
        .ok()
        .and_then(|pid| pid.parse::<u32>().ok())
    else {
        return;
    };
    std::thread::spawn(move || loop {
        if std::os::unix::process::parent_id() != launcher {
            eprintln!("hawada: the launcher (pid {launcher}) is gone; this worker stops");
            std::process::exit(1);
        }
        std::thread::sleep(std::time::Duration::from_millis(500));
    });
}

/// Starts `workers` copies of this command, one per GPU, with the variables torchrun would set
/// (a free local port for the rendezvous), and waits for them; the first to fail stops the rest.
fn launch_workers(workers: usize) -> anyhow::Result<ExitCode> {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|listener| listener.local_addr())
        .context("finding a free port for the workers' rendezvous")?
        .port();
    let exe = std::env::current_exe().context("locating the hawada binary")?;
    let mut children = Vec::with_capacity(workers);
    for rank in 0..workers {
        let child = std::process::Command::new(&exe)
            .args(std::env::args_os().skip(1))
            .env("WORLD_SIZE", workers.to_string())
            .env("LOCAL_WORLD_SIZE", workers.to_string())
            .env("RANK", rank.to_string())
            .env("LOCAL_RANK", rank.to_string())
            .env("MASTER_ADDR", "127.0.0.1")
            .env("MASTER_PORT", port.to_string())
            .env(LAUNCHER_PID, std::process::id().to_string())
            .spawn()
            .with_context(|| format!("starting worker {rank} of {workers}"))?;
        children.push(Some(child));
    }
    loop {
        let mut running = 0;
        for (rank, slot) in children.iter_mut().enumerate() {
            let Some(child) = slot else { continue };
            match child.try_wait().context("waiting for a worker")? {
                None => running += 1,
                Some(status) if status.success() => *slot = None,
                Some(status) => {
                    for other in children.iter_mut().flatten() {
                        let _ = other.kill();
                        let _ = other.wait();
                    }
                    anyhow::bail!(
                        "worker {rank} of {workers} failed ({status}); the others were stopped"
                    );
                }
            }
        }
        if running == 0 {
            return Ok(ExitCode::SUCCESS);
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
}

fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    match cli.command {
        Command::Run {
            recipe,
            run_dir,
            smoke,
            gpus,
        } => {
            let (recipe, file, run_dir) = resolve_recipe(recipe.as_deref(), smoke, run_dir, "")?;
            // Fetched once, before any worker starts: workers fetching at once would race.
            ensure_data(&recipe)?;
            let workers = gpus.unwrap_or(recipe.gpus);
            if workers > 1 && std::env::var_os("WORLD_SIZE").is_none() {
                recipe.check_batches_split(&file, workers)?;
                let device = recipe.device.resolve()?;
                let visible = tch::Cuda::device_count() as usize;
                if device.is_cuda() && workers > visible {
                    anyhow::bail!("--gpus {workers}: this machine shows {visible} CUDA device(s)");
                }
                return launch_workers(workers);
            }
            stop_when_launcher_dies();
            // Rank 0 shows progress and prints the result; the other workers stay quiet.
            let leader = std::env::var("RANK").map_or(true, |rank| rank.trim() == "0");
            let bars = progress::Bars::default();
            let observer: &dyn hawada::progress::Observer = if leader {
                &bars
            } else {
                &hawada::progress::Silent
            };
            let summary =
                hawada::pipeline::run(&recipe, &file, &RunDir::new(&run_dir), observer)
                    .with_context(|| format!("run `{}` in {}", recipe.name, run_dir.display()))?;
            if leader {
                print_table(&summary, &run_dir);
                if smoke {
                    println!("(a smoke run: the recipe runs; its numbers are no measurement)");
                }
            }
        }
        Command::Sweep {
            recipe,
            targets,
            run_dir,
            smoke,
        } => {
            let (recipe, file, dir) = resolve_recipe(Some(&recipe), smoke, run_dir, "-sweep")?;
            if recipe.gpus > 1 {
                bail!(
                    "{}: `gpus = {}`, but a sweep runs in one process on one device; run each target with `hawada run --gpus {}` instead",
                    file.display(),
                    recipe.gpus,
                    recipe.gpus
                );
            }
            ensure_data(&recipe)?;
            let bars = progress::Bars::default();
            let sweep =
                hawada::pipeline::sweep(&recipe, &file, &SweepDir::new(&dir), &targets, &bars)
                    .with_context(|| format!("sweep of `{}` in {}", recipe.name, dir.display()))?;
            print_sweep(&sweep, &dir);
        }
        Command::Profile { recipe, run_dir } => {
            let file = recipe;
            let recipe = Recipe::from_file(&file)
                .with_context(|| format!("reading recipe {}", file.display()))?;
            if hawada::pipeline::needs_teacher_training(&recipe) {
                ensure_data(&recipe)?;
            }
            let run_dir = run_dir.unwrap_or_else(|| hawada::pipeline::default_run_dir(&recipe));
            let observer = progress::Bars::default();
            let p = hawada::pipeline::profile(&recipe, &file, &RunDir::new(&run_dir), &observer)
                .with_context(|| format!("profiling `{}` in {}", recipe.name, run_dir.display()))?;
            println!(
                "profile of `{}` on {} [{}]: keep-all {:.3} ms (p95 {:.3}), target {:.3} ms",
                recipe.name,
                p.device,
                recipe.dtype.name(),
                p.keep_all.mean,
                p.keep_all.p95,
                p.target_ms
            );
            println!(
                "site tables: {} measurements ({})",
                p.table_measurements, p.tables_key
            );
            println!(
                "{:<8} {:>8} {:>9} {:>4}   (held-out random sub-architectures)",
                "proxy", "MAPE %", "Spearman", "n"
            );
            for (name, f) in [("table", p.fidelity_table), ("flops", p.fidelity_flops)] {
                println!("{name:<8} {:>8.2} {:>9.3} {:>4}", f.mape, f.spearman, f.n);
            }
            println!(
                "gates train with the {} proxy; profile.json in {}",
                p.proxy_used,
                run_dir.display()
            );
        }
        Command::Info => print_info()?,
        Command::Bench { recipe, out } => bench(&recipe, &out)?,
        Command::Convert {
            model,
            out_dir,
            dtype,
        } => convert(&model, &out_dir, &dtype)?,
        Command::Report { run_dir } if SweepDir::holds_sweep(&run_dir) => {
            let dir = SweepDir::new(&run_dir);
            hawada::pipeline::write_sweep_report(&dir)
                .with_context(|| format!("writing the sweep report of {}", run_dir.display()))?;
            println!("{}", dir.report().display());
        }
        Command::Report { run_dir } => {
            let dir = RunDir::new(&run_dir);
            hawada::report::write_html(&dir)
                .with_context(|| format!("writing the report of {}", run_dir.display()))?;
            println!("{}", dir.report().display());
        }
        Command::Generate {
            model,
            prompt,
            tokens,
            device,
        } => generate(&model, &prompt, tokens, &device)?,
    }
    Ok(ExitCode::SUCCESS)
}

/// The recipe to run (a file, its smoke version, or the embedded default), its file name for
/// errors, and the run directory: `run_dir`, or `runs/<name><suffix>` (`runs/<file
/// stem>-smoke<suffix>` for a smoke run).
fn resolve_recipe(
    recipe: Option<&Path>,
    smoke: bool,
    run_dir: Option<PathBuf>,
    suffix: &str,
) -> anyhow::Result<(Recipe, PathBuf, PathBuf)> {
    let default_dir = |recipe: &Recipe| {
        let dir = hawada::pipeline::default_run_dir(recipe);
        PathBuf::from(format!("{}{suffix}", dir.display()))
    };
    Ok(match (recipe, smoke) {
        (Some(path), true) => {
            let run_dir = run_dir.unwrap_or_else(|| {
                let stem = path.file_stem().unwrap_or_default().to_string_lossy();
                PathBuf::from("runs").join(format!("{stem}-smoke{suffix}"))
            });
            let recipe = Recipe::smoke_from_file(path, &RunDir::new(&run_dir))
                .with_context(|| format!("reading recipe {} for a smoke run", path.display()))?;
            (recipe, path.to_path_buf(), run_dir)
        }
        (Some(path), false) => {
            let recipe = Recipe::from_file(path)
                .with_context(|| format!("reading recipe {}", path.display()))?;
            let run_dir = run_dir.unwrap_or_else(|| default_dir(&recipe));
            (recipe, path.to_path_buf(), run_dir)
        }
        (None, _) => {
            let file = PathBuf::from("<embedded default recipe>");
            let recipe = Recipe::parse(DEFAULT_RECIPE, &file)?;
            let run_dir = run_dir.unwrap_or_else(|| default_dir(&recipe));
            (recipe, file, run_dir)
        }
    })
}

/// Fetches the recipe's data asset with the project script when its directory is missing.
fn ensure_data(recipe: &Recipe) -> anyhow::Result<()> {
    if recipe.data.dir.exists() {
        return Ok(());
    }
    let Some(asset) = &recipe.data.asset else {
        bail!(
            "data directory {} does not exist and the recipe names no `data.asset` to fetch",
            recipe.data.dir.display()
        );
    };
    let script = Path::new("scripts/fetch-assets.sh");
    if !script.exists() {
        bail!("data directory {} is missing; run `scripts/fetch-assets.sh {asset}` from the HawAda checkout", recipe.data.dir.display());
    }
    eprintln!(
        "hawada: fetching asset `{asset}` into {}",
        recipe.data.dir.display()
    );
    let status = std::process::Command::new("bash")
        .arg(script)
        .arg(asset)
        .status()
        .with_context(|| format!("starting {}", script.display()))?;
    if !status.success() {
        bail!("{} {asset} failed ({status})", script.display());
    }
    Ok(())
}

fn convert(model: &Path, out_dir: &Path, dtype: &str) -> anyhow::Result<()> {
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
    hawada::pipeline::save_model(loaded.as_ref(), tokenizer.as_ref(), out_dir)
        .with_context(|| format!("writing {}", out_dir.display()))?;
    println!(
        "{} ({}, {} parameters, {dtype}) → {}",
        model.display(),
        loaded.family(),
        loaded.num_params(),
        out_dir.display()
    );
    Ok(())
}

fn print_sweep(sweep: &hawada::run_dir::Sweep, dir: &Path) {
    println!();
    println!("HawAda sweep: {}", sweep.recipe);
    let metric = sweep.points.first().map(|p| &p.summary.quality);
    let digits = metric.map_or(2, |q| q.digits());
    let quality = match metric {
        Some(q) if !sweep.random_init => format!(
            "{}: teacher {:.digits$}; slim before → after fine-tune",
            q.metric, q.teacher
        ),
        _ => "(random-init teacher: speed only)".to_string(),
    };
    println!(
        "{:>7} {:>11} {:>9} {:>9} {:>12} {:>11}   {quality}",
        "target", "keep-all ms", "slim ms", "speed-up", "params", "agreement %"
    );
    for p in &sweep.points {
        let s = &p.summary;
        let agreement = s.picked().map_or(0.0, |c| c.agreement);
        let quality = if sweep.random_init {
            String::new()
        } else {
            format!(
                "{:.digits$} → {:.digits$}",
                s.quality.slim_before_finetune, s.quality.slim
            )
        };
        println!(
            "{:>7} {:>11.3} {:>9.3} {:>8.2}× {:>12} {:>11.2}   {quality}",
            p.target_fraction,
            s.latency_ms.keep_all.mean,
            s.latency_ms.slim.mean,
            s.speedup,
            s.params.slim,
            agreement
        );
    }
    println!(
        "sweep directory: {} (sweep.html, sweep.json, plots/sweep-*.png; each target's run in t<fraction>/)",
        dir.display()
    );
}

fn print_table(s: &Summary, run_dir: &Path) {
    let l = &s.latency_ms;
    println!();
    println!(
        "HawAda run: {} ({}) on {} [{}, {} timing], target {:.3} ms",
        s.model, s.family, s.device, s.dtype, s.timing, s.target_ms
    );
    println!("{:<28} {:>14} {:>14}", "", "keep-all", "slim");
    println!(
        "{:<28} {:>14.3} {:>14.3}",
        "latency mean (ms)", l.keep_all.mean, l.slim.mean
    );
    println!(
        "{:<28} {:>14.3} {:>14.3}",
        "latency p95 (ms)", l.keep_all.p95, l.slim.p95
    );
    println!(
        "{:<28} {:>14} {:>14}",
        "parameters", s.params.teacher, s.params.slim
    );
    let (metric, digits) = match s.quality.metric.as_str() {
        "test_perplexity" => ("test perplexity", 2),
        "test_cls_cosine_to_teacher" => ("cls cosine to teacher", 4),
        _ => ("test accuracy (%)", 2),
    };
    println!(
        "{:<28} {:>14.digits$} {:>14.digits$}",
        metric, s.quality.teacher, s.quality.slim
    );
    println!(
        "{:<28} {:>14} {:>14.digits$}",
        "  slim before fine-tune", "", s.quality.slim_before_finetune
    );
    if let Some(q) = s.quality.teacher_finetuned {
        let label = format!("  {}", s.quality.teacher_finetuned_label());
        println!("{label:<28} {q:>14.digits$}");
    }
    if let Some(p) = s.quality.slim_patch_cosine_to_teacher {
        println!(
            "{:<28} {:>14} {:>14.4}",
            "patch cosine to teacher", 1, p.after_finetune
        );
        println!(
            "{:<28} {:>14} {:>14.4}",
            "  slim before fine-tune", "", p.before_finetune
        );
    }
    if let Some(p) = &s.quality.photos {
        println!(
            "{:<28} {:>14} {:>14.4}   ({} photos, {})",
            "photos vs teacher", "", p.slim, p.images, p.metric
        );
        println!(
            "{:<28} {:>14} {:>14.4}",
            "  slim before fine-tune", "", p.slim_before_finetune
        );
    }
    if let Some(kl) = s.quality.slim_kl_to_teacher {
        println!("{:<28} {:>14} {:>14.4}", "  KL to teacher (nats)", "", kl);
    }
    println!(
        "speed-up {:.2}×, proxy ({}) MAPE {:.1}% Spearman {:.3} (n={}), wall {:.0} s",
        s.speedup, s.proxy.cost, s.proxy.mape, s.proxy.spearman, s.proxy.n, s.wall_s
    );
    if s.target_met == Some(false) {
        println!(
            "target not reached: the slim model runs at {:.3}× keep-all, the fastest the gates and \
             the export search found (min_keep and the unit kinds bound what can go; see search \
             in summary.json)",
            l.slim.mean / l.keep_all.mean
        );
    }
    println!(
        "run directory: {} (summary.json, report.html)",
        run_dir.display()
    );
}

fn print_info() -> anyhow::Result<()> {
    println!(
        "hawada {} (tch 0.24.0, libtorch 2.11.0)",
        env!("CARGO_PKG_VERSION")
    );
    println!("cpu threads: {}", tch::get_num_threads());
    println!("cudnn available: {}", tch::Cuda::cudnn_is_available());
    let count = tch::Cuda::device_count();
    if count == 0 {
        println!("cuda devices: none (CPU only)");
    }
    for index in 0..count as usize {
        let info = hawada::cuda::device_info(index)?;
        println!(
            "cuda:{index}: {} | {:.1} GiB | compute capability {}.{} | {} SMs | CUDA runtime {}.{} | driver {}.{}",
            info.name,
            info.total_memory_bytes as f64 / (1u64 << 30) as f64,
            info.compute_capability.0,
            info.compute_capability.1,
            info.multiprocessors,
            info.cuda_runtime / 1000,
            info.cuda_runtime % 1000 / 10,
            info.cuda_driver / 1000,
            info.cuda_driver % 1000 / 10
        );
    }
    Ok(())
}

fn generate(model_path: &Path, prompt: &str, tokens: usize, device: &str) -> anyhow::Result<()> {
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
    let model = hawada::families::llama::open(model_path, device, kind)
        .with_context(|| format!("loading {}", model_path.display()))?;
    let hawada::data::Vocabulary { tokenizer, eos } = hawada::data::load_vocabulary(model_path)?;
    let encoding = tokenizer
        .encode(prompt, false)
        .map_err(|e| anyhow::anyhow!("tokenizing the prompt: {e}"))?;
    let prompt_ids: Vec<i64> = encoding.get_ids().iter().map(|&i| i as i64).collect();
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

fn bench(recipe_path: &Path, out: &Path) -> anyhow::Result<()> {
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
