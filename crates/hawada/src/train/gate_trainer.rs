//! The adaptation loop (DESIGN §5): gate logits learn against the frozen teacher under
//! `loss = KD + λ·v + (ρ/2)·v²`, `v = (L̂ − T)/T`. `v` takes the latency of the current hard
//! architecture (the proxy's prediction for its keep-set, or a real measurement at a probe) with
//! the gradient of the proxy at the expected widths. λ ascends on `v` while the architecture is
//! over target and is zero once it meets it. Every `probe_every` steps, and the step the
//! architecture first meets the target, it is measured for real; that measurement is used for
//! `v` and refits the proxy. Checkpoints (atomic) every `checkpoint_every` steps; a rerun
//! resumes from the last one and continues `metrics.jsonl`. With several workers (`dist`) each
//! trains on its rows of the batch, gradients and losses are averaged, rank 0 probes and writes.
//! Contains no family code and no slicing.

use crate::dist::{averaged_scalars, Workers};
use crate::distill;
use crate::error::{Error, Result};
use crate::gates::{GateMode, Gates};
use crate::latency::measure::LatencyStats;
use crate::latency::proxy::{LatencyProxy, Sample};
use crate::model::{Family, KeepSet, Masks, Phase};
use crate::optim::{remove_saved_moments, seed_step, Adam};
use crate::progress::Observer;
use crate::recipe::AdaptSection;
use serde::{Deserialize, Serialize};
use std::io::Write;
use std::path::{Path, PathBuf};
use tch::Tensor;

/// One line of `metrics.jsonl`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct StepMetrics {
    pub stage: String,
    pub step: i64,
    pub loss: f64,
    pub kd: f64,
    pub v: f64,
    pub lambda: f64,
    /// The proxy at the expected widths (what the gates' gradient follows).
    pub proxy_ms: f64,
    /// The proxy at the current hard architecture (the keep-set export would take now); `v`
    /// takes this value on steps without a probe.
    #[serde(default)]
    pub kept_proxy_ms: Option<f64>,
    /// Measured at this step (a probe), if any.
    pub real_ms: Option<f64>,
    pub last_real_ms: Option<f64>,
    /// Kept units per group under hard masks (probe steps only: reading them syncs the device).
    pub kept: Option<Vec<usize>>,
    /// Wall seconds of the training step, the probe left out (batch, forwards, backward,
    /// gradient averaging, update, reading the losses).
    #[serde(default)]
    pub step_s: Option<f64>,
}

/// What survives a crash: everything the loop needs to continue where it was.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct AdaptState {
    /// The next step to run.
    pub step: i64,
    pub lambda: f64,
    pub last_real_ms: Option<f64>,
    pub kd_at_last_probe: Option<f64>,
    pub probe_samples: Vec<Sample>,
    pub finished: bool,
    /// Whether the proxy put the last step's hard architecture over the target: the step it
    /// first does not is probed.
    #[serde(default = "over_target_at_start")]
    pub over_target: bool,
}

fn over_target_at_start() -> bool {
    true
}

/// Result of adaptation.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct AdaptOutcome {
    pub steps: i64,
    pub final_lambda: f64,
    pub last_real_ms: Option<f64>,
    pub keep: KeepSet,
    /// Each probe: step, measured stats, proxy prediction before refit.
    pub probes: Vec<Probe>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Probe {
    pub step: i64,
    pub measured: LatencyStats,
    pub proxy_ms: f64,
}

/// Appends metric lines to `metrics.jsonl`, one JSON object per line.
pub struct MetricsLog {
    path: PathBuf,
}

impl MetricsLog {
    pub fn new(path: PathBuf) -> Self {
        MetricsLog { path }
    }

    /// Drops lines of `stage` at or after `step` (written after the checkpoint a resume starts
    /// from), so the resumed run continues the file without duplicates.
    pub fn truncate_from(&self, stage: &str, step: i64) -> Result<()> {
        let Ok(text) = std::fs::read_to_string(&self.path) else {
            return Ok(());
        };
        let kept: Vec<&str> = text
            .lines()
            .filter(
                |line| match serde_json::from_str::<serde_json::Value>(line) {
                    Ok(v) => {
                        !(v["stage"] == stage && v["step"].as_i64().is_some_and(|s| s >= step))
                    }
                    Err(_) => false, // a line cut by a crash
                },
            )
            .collect();
        let mut body = kept.join("\n");
        if !body.is_empty() {
            body.push('\n');
        }
        crate::io::write_atomic(&self.path, body.as_bytes())
    }

    pub fn append<T: Serialize>(&self, line: &T) -> Result<()> {
        let mut file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.path)
            .map_err(|e| Error::io(&self.path, e))?;
        let text = serde_json::to_string(line).map_err(|e| Error::Invalid(e.to_string()))?;
        writeln!(file, "{text}").map_err(|e| Error::io(&self.path, e))
    }

    /// Every line of the file, parsed (a line cut by a crash is skipped).
    pub fn read(&self) -> Vec<serde_json::Value> {
        std::fs::read_to_string(&self.path)
            .unwrap_or_default()
            .lines()
            .filter_map(|l| serde_json::from_str(l).ok())
            .collect()
    }
}

/// What the loop needs from its caller besides the model and gates.
pub struct AdaptContext<'a> {
    /// Next training batch of inputs, on the model's device and dtype.
    pub next_batch: &'a mut dyn FnMut() -> Tensor,
    /// Builds and measures the slim model of a keep-set (the real probe).
    pub measure_keep: &'a mut dyn FnMut(&KeepSet) -> Result<LatencyStats>,
    pub checkpoint_dir: &'a Path,
    pub metrics: &'a MetricsLog,
    pub observer: &'a dyn Observer,
    /// The run's seed: each step reseeds from it (`optim::seed_step`).
    pub seed: u64,
    /// The processes training together (one, usually); `next_batch` yields this rank's rows.
    pub workers: &'a Workers,
}

fn state_path(dir: &Path) -> PathBuf {
    dir.join("adapt_state.json")
}

/// The terms of `loss = KD + λ·v + (ρ/2)·v²`.
#[derive(Debug, Clone, Copy)]
pub struct Lagrangian {
    pub target_ms: f64,
    pub lambda: f64,
    pub rho: f64,
    pub kd_temperature: f64,
    pub mse_weight: f64,
}

/// The forward half of one adaptation step (scalars, graph attached).
pub struct StepLosses {
    pub loss: Tensor,
    pub kd: Tensor,
    pub proxy_ms: Tensor,
    pub v: Tensor,
}

/// Teacher forward (no grad), gated student forward with sampled masks, KD, latency proxy and
/// the Lagrangian. With `architecture_ms` (the latency of the current hard architecture: measured
/// at a probe, else the proxy's prediction for it), `v` takes that value and keeps the gradient
/// of the proxy at the expected widths; without it, `v` is the expected-width proxy's.
/// Shared by the training loop and the benchmark.
pub fn step_losses(
    models: Models<'_>,
    gates: &Gates,
    proxy: &LatencyProxy,
    x: &Tensor,
    terms: &Lagrangian,
    architecture_ms: Option<f64>,
) -> StepLosses {
    let kind = models.student.var_store().kind();
    let x = &models.student.prepare_input(x.shallow_clone());
    let teacher = tch::no_grad(|| {
        models
            .teacher
            .forward(x, &Masks::none(models.teacher.groups().len()), Phase::Eval)
    });
    let student = models
        .student
        .forward(x, &gates.masks(GateMode::Sample, kind), Phase::Eval);
    let mut kd = distill::to_teacher(
        models.student.output(),
        &student,
        &teacher,
        terms.kd_temperature,
    );
    if terms.mse_weight > 0.0 {
        kd += distill::mse(&student, &teacher) * terms.mse_weight;
    }
    let proxy_ms = proxy.predict_ms(&gates.expected_keep());
    let proxy_v = (&proxy_ms - terms.target_ms) / terms.target_ms;
    let v = match architecture_ms {
        Some(ms) => {
            let architecture_v = (ms - terms.target_ms) / terms.target_ms;
            &proxy_v + (Tensor::from(architecture_v).to_device(proxy_v.device()) - proxy_v.detach())
        }
        None => proxy_v,
    };
    let loss = &kd + &v * terms.lambda + v.square() * (terms.rho / 2.0);
    StepLosses {
        loss,
        kd,
        proxy_ms,
        v,
    }
}

/// The two models of adaptation: the frozen teacher, and the gated student. The student is the
/// teacher itself when only gates learn, or a copy whose weights train too
/// (`cfg.train_weights`).
#[derive(Clone, Copy)]
pub struct Models<'a> {
    pub teacher: &'a dyn Family,
    pub student: &'a dyn Family,
}

/// Runs (or resumes) gate training. The teacher must be frozen; the gates learn, and the
/// student's weights too when `cfg.train_weights`.
pub fn adapt(
    models: Models<'_>,
    gates: &mut Gates,
    proxy: &mut LatencyProxy,
    cfg: &AdaptSection,
    target_ms: f64,
    ctx: AdaptContext<'_>,
) -> Result<AdaptOutcome> {
    let Models {
        teacher: model,
        student,
    } = models;
    std::fs::create_dir_all(ctx.checkpoint_dir).map_err(|e| Error::io(ctx.checkpoint_dir, e))?;
    let mut state = AdaptState {
        step: 0,
        lambda: 0.0,
        last_real_ms: None,
        kd_at_last_probe: None,
        probe_samples: Vec::new(),
        finished: false,
        over_target: true,
    };
    let saved_state = state_path(ctx.checkpoint_dir);
    if saved_state.exists() {
        state = crate::io::hf_config::parse(
            &saved_state,
            crate::io::hf_config::read_value(&saved_state)?,
        )?;
        gates.load(ctx.checkpoint_dir)?;
        let weights = ctx.checkpoint_dir.join("student.safetensors");
        if cfg.train_weights && weights.exists() {
            crate::io::safetensors::load_file_into(student.var_store(), &weights)?;
        }
        // The optimisers' moments are restored below, once the optimisers exist.
        for &sample in &state.probe_samples {
            proxy.add_sample(sample);
        }
        tracing::info!(
            step = state.step,
            lambda = state.lambda,
            "resuming adaptation from checkpoint"
        );
    }
    let leader = ctx.workers.is_leader();
    if leader {
        ctx.metrics.truncate_from("adapt", state.step)?;
    }
    let mut probes = Vec::new();
    let gates_adam_file = ctx.checkpoint_dir.join("gates_adam.safetensors");
    let weights_adam_file = ctx.checkpoint_dir.join("student_adam.safetensors");
    let mut opt = Adam::new(gates.var_store(), cfg.lr);
    let mut weight_opt = cfg
        .train_weights
        .then(|| Adam::new(student.var_store(), cfg.weight_lr));
    // A complete stage has no moments left (`remove_saved_moments`) and needs none.
    let stage_left = state.step < cfg.steps && !state.finished;
    if saved_state.exists() && stage_left && gates_adam_file.exists() {
        opt.load(&gates_adam_file)?;
        if let Some(weight_opt) = weight_opt.as_mut() {
            weight_opt.load(&weights_adam_file)?;
        }
    }
    ctx.observer.begin("adapt", cfg.steps as u64);
    let mut kd_ema: Option<f64> = None;
    while state.step < cfg.steps && !state.finished {
        let step = state.step;
        // The hard architecture, not the expected widths, is what export keeps: `v` follows it,
        // else the gates can meet the target in expectation while every hard mask is unchanged
        // (measured: a 0.8× Llama prefill ran all 200 steps with the proxy under target and
        // every probe at keep-all).
        let keep = gates.keep_set();
        let kept_proxy_ms = proxy.predict_keep_ms(&keep);
        // Besides every `probe_every` steps, the step the architecture first meets the target
        // is probed, so the stop rule sees it there and not after more cutting.
        let first_under_target = state.over_target && kept_proxy_ms <= target_ms;
        state.over_target = kept_proxy_ms > target_ms;
        let probe_now = (step + 1) % cfg.probe_every == 0 || first_under_target;
        let mut real_ms = None;
        let mut kept = None;
        if probe_now {
            let measured = ctx
                .workers
                .from_leader(&format!("probe-{step}"), || (ctx.measure_keep)(&keep))?;
            probes.push(Probe {
                step,
                measured,
                proxy_ms: kept_proxy_ms,
            });
            let sample = Sample {
                cost: proxy.cost_of_keep(&keep),
                ms: measured.mean,
            };
            proxy.add_sample(sample);
            state.probe_samples.push(sample);
            state.last_real_ms = Some(measured.mean);
            real_ms = Some(measured.mean);
            kept = Some(keep.0.iter().map(Vec::len).collect());
            tracing::info!(
                step,
                real_ms = measured.mean,
                proxy_ms = kept_proxy_ms,
                target_ms,
                "probe"
            );
        }
        // Seeded after the probe, whose timing inputs only rank 0 draws: every rank then draws
        // the same batch and gate noise.
        seed_step(ctx.seed, "adapt", step);
        let started = std::time::Instant::now();
        let x = (ctx.next_batch)();
        let terms = Lagrangian {
            target_ms,
            lambda: state.lambda,
            rho: cfg.rho,
            kd_temperature: cfg.kd_temperature,
            mse_weight: cfg.mse_weight,
        };
        let StepLosses {
            loss,
            kd,
            proxy_ms,
            v,
        } = step_losses(
            Models {
                teacher: model,
                student,
            },
            gates,
            proxy,
            &x,
            &terms,
            Some(real_ms.unwrap_or(kept_proxy_ms)),
        );
        opt.zero_grad();
        if let Some(weight_opt) = weight_opt.as_mut() {
            weight_opt.zero_grad();
        }
        loss.backward();
        let mut grads = gradients(gates.var_store());
        if cfg.train_weights {
            grads.extend(gradients(student.var_store()));
        }
        ctx.workers.average(&grads)?;
        opt.step();
        if let Some(weight_opt) = weight_opt.as_mut() {
            weight_opt.step();
        }
        let [kd_value, v_value, loss_value] = averaged_scalars(ctx.workers, [&kd, &v, &loss])?;
        let step_s = started.elapsed().as_secs_f64();
        if !loss_value.is_finite() {
            return Err(Error::Training { step, reason: format!("loss is {loss_value} (KD {kd_value}, v {v_value}); the last good checkpoint is in {}", ctx.checkpoint_dir.display()) });
        }
        // λ accumulates only while the architecture is over the target. Once it meets it, what λ
        // built up on the way would go on cutting far past it (measured: a 0.4× target got
        // 9.8× with λ decaying 0.08 a step from 5.5), so it restarts from zero and (ρ/2)·v²
        // alone holds the latency at the target.
        state.lambda = if v_value <= 0.0 {
            0.0
        } else {
            (state.lambda + cfg.lambda_lr * v_value).min(cfg.lambda_max)
        };
        kd_ema = Some(kd_ema.map_or(kd_value, |e| 0.9 * e + 0.1 * kd_value));
        if leader {
            ctx.metrics.append(&StepMetrics {
                stage: "adapt".into(),
                step,
                loss: loss_value,
                kd: kd_value,
                v: v_value,
                lambda: state.lambda,
                proxy_ms: proxy_ms.double_value(&[]),
                kept_proxy_ms: Some(kept_proxy_ms),
                real_ms,
                last_real_ms: state.last_real_ms,
                kept,
                step_s: Some(step_s),
            })?;
        }
        if let Some(real) = real_ms {
            let kd_now = kd_ema.unwrap_or(kd_value);
            // KD has settled when it no longer rises by more than 10% between probes: per-step KD
            // is noisy, and a falling KD (weights adapting) is no reason to keep pruning past the
            // target, which only costs quality.
            let plateau = state
                .kd_at_last_probe
                .is_some_and(|prev| kd_now <= 1.1 * prev.abs().max(1e-6));
            if real <= target_ms && plateau {
                tracing::info!(
                    step,
                    real_ms = real,
                    "target met and KD plateaued: stopping"
                );
                state.finished = true;
            }
            state.kd_at_last_probe = Some(kd_now);
        }
        state.step += 1;
        ctx.observer.advance(
            state.step as u64,
            &format!(
                "kd {kd_value:.4} λ {:.3} proxy {:.2}ms real {}",
                state.lambda,
                proxy_ms.double_value(&[]),
                state
                    .last_real_ms
                    .map_or("-".into(), |m| format!("{m:.2}ms"))
            ),
        );
        let checkpoint =
            state.step % cfg.checkpoint_every == 0 || state.finished || state.step == cfg.steps;
        if leader && checkpoint {
            if let Some(weight_opt) = &weight_opt {
                crate::io::safetensors::write(
                    &ctx.checkpoint_dir.join("student.safetensors"),
                    &crate::io::safetensors::named_tensors(student.var_store()),
                )?;
                weight_opt.save(&weights_adam_file)?;
            }
            opt.save(&gates_adam_file)?;
            // Last: the state names the step the files above belong to.
            save_checkpoint(gates, &state, ctx.checkpoint_dir)?;
        }
    }
    ctx.observer.end();
    if leader {
        remove_saved_moments(&gates_adam_file)?;
        remove_saved_moments(&weights_adam_file)?;
    }
    Ok(AdaptOutcome {
        steps: state.step,
        final_lambda: state.lambda,
        last_real_ms: state.last_real_ms,
        keep: gates.keep_set(),
        probes,
    })
}

/// The gradients of a store's trainable variables (undefined before the first backward).
pub fn gradients(store: &tch::nn::VarStore) -> Vec<Tensor> {
    store
        .trainable_variables()
        .iter()
        .map(Tensor::grad)
        .collect()
}

fn save_checkpoint(gates: &Gates, state: &AdaptState, dir: &Path) -> Result<()> {
    // Gates first, then the state that points at them: a crash between the two resumes from the
    // older state with newer gates, which loses at most one interval.
    gates.save(dir)?;
    crate::io::hf_config::write(&state_path(dir), state)
}
