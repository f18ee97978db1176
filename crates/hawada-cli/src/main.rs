//! `hawada`: a thin CLI over the library. Parses flags, resolves the recipe once, renders progress
//! bars for the library's observer, prints the result table and the whole error chain.

mod print;
mod progress;
mod stages;
mod tools;
mod workers;

use anyhow::Context;
use clap::{Parser, Subcommand};
use hawada::run_dir::{RunDir, SweepDir};
use std::path::PathBuf;
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
    /// Export a slim model from trained gates (the run directory's own, or a gates.safetensors +
    /// gates.json pair from another run or a publisher): the export search at the target,
    /// every candidate measured on this device; writes export.json, slim-before-finetune/ and
    /// plots/pareto.png into the run directory.
    Export {
        recipe: PathBuf,
        /// Directory holding gates.safetensors + gates.json (or either file). Default: the run
        /// directory's own.
        #[arg(long)]
        gates: Option<PathBuf>,
        /// Target latency in ms on this device (replaces the recipe's target).
        #[arg(long, conflicts_with = "fraction")]
        ms: Option<f64>,
        /// Target as a fraction of keep-all latency, in (0, 1] (replaces the recipe's target).
        #[arg(long)]
        fraction: Option<f64>,
        /// Run directory (default: runs/<recipe name>).
        #[arg(long)]
        run_dir: Option<PathBuf>,
    },
    /// Fine-tune a slim model by distillation from its teacher with the recipe's [finetune] and
    /// [data], on any device; resumable. Writes slim/ and finetune.json (quality and KL before
    /// and after) into the run directory.
    Finetune {
        /// The slim model's directory (config.json + model.safetensors), e.g. a run's
        /// slim-before-finetune/.
        slim: PathBuf,
        /// The teacher's directory (or GGUF): replaces the recipe's model.dir.
        #[arg(long)]
        teacher: PathBuf,
        #[arg(long)]
        recipe: PathBuf,
        /// Run directory (default: runs/<recipe name>-finetune).
        #[arg(long)]
        run_dir: Option<PathBuf>,
    },
    /// Print a model's quality on the recipe's test data beside its teacher's (the recipe's
    /// metric: accuracy, perplexity or cls cosine), and its KL to the teacher.
    Eval {
        model: PathBuf,
        #[arg(long)]
        recipe: PathBuf,
        /// The teacher to compare with (default: the recipe's model.dir).
        #[arg(long)]
        teacher: Option<PathBuf>,
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
        /// Replace OUT_DIR whole when it is not empty (by default that is an error).
        #[arg(long)]
        force: bool,
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
        if !hawada::pipeline::is_out_of_memory(message) {
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

fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    match cli.command {
        Command::Run {
            recipe,
            run_dir,
            smoke,
            gpus,
        } => return stages::run(recipe, run_dir, smoke, gpus),
        Command::Sweep {
            recipe,
            targets,
            run_dir,
            smoke,
        } => stages::sweep(recipe, targets, run_dir, smoke)?,
        Command::Profile { recipe, run_dir } => stages::profile(recipe, run_dir)?,
        Command::Export {
            recipe,
            gates,
            ms,
            fraction,
            run_dir,
        } => stages::export(&recipe, gates, (ms, fraction), run_dir)?,
        Command::Finetune {
            slim,
            teacher,
            recipe,
            run_dir,
        } => stages::finetune(&slim, teacher, &recipe, run_dir)?,
        Command::Eval {
            model,
            recipe,
            teacher,
        } => stages::eval(&model, &recipe, teacher)?,
        Command::Info => print::print_info()?,
        Command::Bench { recipe, out } => tools::bench(&recipe, &out)?,
        Command::Convert {
            model,
            out_dir,
            dtype,
            force,
        } => tools::convert(&model, &out_dir, &dtype, force)?,
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
        } => tools::generate(&model, &prompt, tokens, &device)?,
    }
    Ok(ExitCode::SUCCESS)
}
