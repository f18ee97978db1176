//! The gate trainer (DESIGN §5): gate logits learn against the frozen teacher under
//! `loss = KD + λ·v + (ρ/2)·v²`, `v = (L̂ − T)/T`. `v` takes the latency of the current hard
//! architecture (the proxy's prediction for its keep-set, or a real measurement at a probe) with
//! the gradient of the proxy at the expected widths. λ ascends on `v` while the architecture is
//! over target and is zero once it meets it. Every `probe_every` steps, and the step the
//! architecture first meets the target, it is measured for real; that measurement is used for
//! `v` and refits the proxy. Checkpoints (atomic) every `checkpoint_every` steps; a rerun
//! resumes from the last one and continues `metrics.jsonl`. With several workers (`dist`) each
//! trains on its rows of the batch, gradients and losses are averaged, rank 0 probes and writes.

use super::{
    check_finite, checkpoint_due, create_checkpoint_dir, descend, diverged, read_state,
    save_weights,
};
use crate::dist::Workers;
use crate::distill;
use crate::error::Result;
use crate::gates::{GateMode, Gates};
use crate::latency::measure::LatencyStats;
use crate::latency::proxy::{LatencyProxy, Sample};
use crate::model::{Family, KeepSet, Masks, Phase};
use crate::optim::{remove_saved_moments, seed_step, Adam};
use crate::progress::Observer;
use crate::run_dir::{MetricsLog, StepMetrics};
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};
use tch::Tensor;

/// `[adapt]`: the gate trainer's steps, batch, learning rates and the Lagrangian's constants.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AdaptOptions {
    pub steps: i64,
    pub batch: i64,
    #[serde(default = "default_gate_lr")]
    pub lr: f64,
    #[serde(default = "default_kd_temperature")]
    pub kd_temperature: f64,
    /// Weight of an MSE term on logits, added to the KL.
    #[serde(default)]
    pub mse_weight: f64,
    /// Dual step size η_λ: λ grows by η_λ·v while the hard architecture is over the target
    /// and is zero once it meets it (`train`).
    #[serde(default = "default_lambda_lr")]
    pub lambda_lr: f64,
    #[serde(default = "default_lambda_max")]
    pub lambda_max: f64,
    /// Quadratic penalty ρ.
    #[serde(default = "default_rho")]
    pub rho: f64,
    /// Steps between real measurements of the hard architecture; the step it first meets the
    /// target (by the proxy) is measured too.
    pub probe_every: i64,
    pub checkpoint_every: i64,
    /// Also train the student's weights (a copy of the teacher's) with a second optimizer, so the
    /// weights adapt to the units being removed (the two-phase scheme's joint variant).
    #[serde(default)]
    pub train_weights: bool,
    #[serde(default = "default_weight_lr")]
    pub weight_lr: f64,
}

fn default_gate_lr() -> f64 {
    0.1
}
/// The KD temperature both the gate trainer and the fine-tune default to.
pub fn default_kd_temperature() -> f64 {
    2.0
}
fn default_lambda_lr() -> f64 {
    1.0
}
fn default_lambda_max() -> f64 {
    100.0
}
fn default_rho() -> f64 {
    10.0
}
fn default_weight_lr() -> f64 {
    1e-3
}

/// The stage name in `metrics.jsonl` and in the step seeds.
const STAGE: &str = "adapt";
/// The student's weights, when they train, under the checkpoint directory.
const STUDENT_WEIGHTS: &str = "student.safetensors";

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

impl AdaptState {
    fn fresh() -> Self {
        AdaptState {
            step: 0,
            lambda: 0.0,
            last_real_ms: None,
            kd_at_last_probe: None,
            probe_samples: Vec::new(),
            finished: false,
            over_target: over_target_at_start(),
        }
    }

    fn has_steps_left(&self, steps: i64) -> bool {
        self.step < steps && !self.finished
    }
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
    cfg: &AdaptOptions,
    target_ms: f64,
    ctx: AdaptContext<'_>,
) -> Result<AdaptOutcome> {
    let dir = ctx.checkpoint_dir;
    create_checkpoint_dir(dir)?;
    let saved = resume(models.student, gates, proxy, cfg.train_weights, dir)?;
    let resumed = saved.is_some();
    let state = saved.unwrap_or_else(AdaptState::fresh);
    if ctx.workers.is_leader() {
        ctx.metrics.truncate_from(STAGE, state.step)?;
    }
    let mut optimizers = GateOptimizers::new(gates, models.student, cfg, dir);
    // A complete stage has no moments left (`remove_saved_moments`) and needs none.
    if resumed && state.has_steps_left(cfg.steps) {
        optimizers.restore()?;
    }
    GateTrainer {
        models,
        gates,
        proxy,
        cfg,
        target_ms,
        ctx,
        optimizers,
        state,
        probes: Vec::new(),
        kd_ema: None,
    }
    .run()
}

/// The state of the last checkpoint under `dir`, with the gates, the student's weights (when
/// they train) and the proxy's samples restored to it; `None` where no checkpoint was written.
fn resume(
    student: &dyn Family,
    gates: &mut Gates,
    proxy: &mut LatencyProxy,
    train_weights: bool,
    dir: &Path,
) -> Result<Option<AdaptState>> {
    let saved_state = state_path(dir);
    if !saved_state.exists() {
        return Ok(None);
    }
    let state: AdaptState = read_state(&saved_state)?;
    gates.load(dir)?;
    check_finite(gates.var_store(), dir)?;
    let weights = dir.join(STUDENT_WEIGHTS);
    if train_weights && weights.exists() {
        crate::io::safetensors::load_file_into(student.var_store(), &weights)?;
        check_finite(student.var_store(), &weights)?;
    }
    // The optimisers' moments are restored later, once the optimisers exist.
    for &sample in &state.probe_samples {
        proxy.add_sample(sample);
    }
    tracing::info!(
        step = state.step,
        lambda = state.lambda,
        "resuming adaptation from checkpoint"
    );
    Ok(Some(state))
}

/// The gate logits' Adam and, when the student's weights train too, theirs, with the files
/// their moments are saved in.
struct GateOptimizers {
    gates: Adam,
    weights: Option<Adam>,
    gates_file: PathBuf,
    weights_file: PathBuf,
}

impl GateOptimizers {
    fn new(gates: &Gates, student: &dyn Family, cfg: &AdaptOptions, dir: &Path) -> Self {
        GateOptimizers {
            gates: Adam::new(gates.var_store(), cfg.lr),
            weights: cfg
                .train_weights
                .then(|| Adam::new(student.var_store(), cfg.weight_lr)),
            gates_file: dir.join("gates_adam.safetensors"),
            weights_file: dir.join("student_adam.safetensors"),
        }
    }

    /// Loads the saved moments, if the gates' were saved.
    fn restore(&mut self) -> Result<()> {
        if self.gates_file.exists() {
            self.gates.load(&self.gates_file)?;
            if let Some(weights) = self.weights.as_mut() {
                weights.load(&self.weights_file)?;
            }
        }
        Ok(())
    }

    fn all(&mut self) -> Vec<&mut Adam> {
        std::iter::once(&mut self.gates)
            .chain(self.weights.as_mut())
            .collect()
    }

    fn remove_saved(&self) -> Result<()> {
        remove_saved_moments(&self.gates_file)?;
        remove_saved_moments(&self.weights_file)
    }
}

/// One adaptation run in progress: what its steps read and update.
struct GateTrainer<'a, 'c> {
    models: Models<'a>,
    gates: &'a mut Gates,
    proxy: &'a mut LatencyProxy,
    cfg: &'a AdaptOptions,
    target_ms: f64,
    ctx: AdaptContext<'c>,
    optimizers: GateOptimizers,
    state: AdaptState,
    probes: Vec<Probe>,
    /// KD smoothed over steps, for the stop rule.
    kd_ema: Option<f64>,
}

/// A step's scalars, averaged over the workers.
struct StepValues {
    loss: f64,
    kd: f64,
    v: f64,
    proxy_ms: f64,
    step_s: f64,
}

impl GateTrainer<'_, '_> {
    fn run(mut self) -> Result<AdaptOutcome> {
        self.ctx.observer.begin(STAGE, self.cfg.steps as u64);
        while self.state.has_steps_left(self.cfg.steps) {
            self.step()?;
        }
        self.ctx.observer.end();
        if self.ctx.workers.is_leader() {
            self.optimizers.remove_saved()?;
        }
        Ok(AdaptOutcome {
            steps: self.state.step,
            final_lambda: self.state.lambda,
            last_real_ms: self.state.last_real_ms,
            keep: self.gates.keep_set(),
            probes: self.probes,
        })
    }

    /// One step: a probe if one is due, a gradient step, λ, the metrics line, the stop rule
    /// and, at an interval's end, a checkpoint.
    fn step(&mut self) -> Result<()> {
        let step = self.state.step;
        // The hard architecture, not the expected widths, is what export keeps: `v` follows it,
        // else the gates can meet the target in expectation while every hard mask is unchanged
        // (measured: a 0.8× Llama prefill ran all 200 steps with the proxy under target and
        // every probe at keep-all).
        let keep = self.gates.keep_set();
        let kept_proxy_ms = self.proxy.predict_keep_ms(&keep);
        let real_ms = if self.probe_due(step, kept_proxy_ms) {
            Some(self.probe(step, &keep, kept_proxy_ms)?)
        } else {
            None
        };
        let values = self.train_step(step, real_ms.unwrap_or(kept_proxy_ms))?;
        self.update_lambda(values.v);
        self.kd_ema = Some(self.kd_ema.map_or(values.kd, |e| 0.9 * e + 0.1 * values.kd));
        let leader = self.ctx.workers.is_leader();
        if leader {
            self.ctx.metrics.append(&StepMetrics {
                stage: STAGE.into(),
                step,
                loss: values.loss,
                kd: values.kd,
                v: values.v,
                lambda: self.state.lambda,
                proxy_ms: values.proxy_ms,
                kept_proxy_ms: Some(kept_proxy_ms),
                real_ms,
                last_real_ms: self.state.last_real_ms,
                kept: real_ms.map(|_| keep.0.iter().map(Vec::len).collect()),
                step_s: Some(values.step_s),
            })?;
        }
        if let Some(real) = real_ms {
            self.apply_stop_rule(step, real, values.kd);
        }
        self.state.step += 1;
        self.ctx.observer.advance(
            self.state.step as u64,
            &format!(
                "kd {:.4} λ {:.3} proxy {:.2}ms real {}",
                values.kd,
                self.state.lambda,
                values.proxy_ms,
                self.state
                    .last_real_ms
                    .map_or("-".into(), |m| format!("{m:.2}ms"))
            ),
        );
        let done = self.state.step;
        if leader
            && (checkpoint_due(done, self.cfg.checkpoint_every, self.cfg.steps)
                || self.state.finished)
        {
            self.checkpoint()?;
        }
        Ok(())
    }

    /// Whether `step` probes, its hard architecture predicted at `kept_proxy_ms`; records
    /// whether that architecture is over the target.
    fn probe_due(&mut self, step: i64, kept_proxy_ms: f64) -> bool {
        // Besides every `probe_every` steps, the step the architecture first meets the target
        // is probed, so the stop rule sees it there and not after more cutting.
        let first_under_target = self.state.over_target && kept_proxy_ms <= self.target_ms;
        self.state.over_target = kept_proxy_ms > self.target_ms;
        (step + 1) % self.cfg.probe_every == 0 || first_under_target
    }

    /// Measures the hard architecture `keep` (rank 0 times it), refits the proxy with it and
    /// returns the measured mean ms.
    fn probe(&mut self, step: i64, keep: &KeepSet, kept_proxy_ms: f64) -> Result<f64> {
        let measured = self
            .ctx
            .workers
            .from_leader(&format!("probe-{step}"), || (self.ctx.measure_keep)(keep))?;
        self.probes.push(Probe {
            step,
            measured,
            proxy_ms: kept_proxy_ms,
        });
        let sample = Sample {
            cost: self.proxy.cost_of_keep(keep),
            ms: measured.mean,
        };
        self.proxy.add_sample(sample);
        self.state.probe_samples.push(sample);
        self.state.last_real_ms = Some(measured.mean);
        tracing::info!(
            step,
            real_ms = measured.mean,
            proxy_ms = kept_proxy_ms,
            target_ms = self.target_ms,
            "probe"
        );
        Ok(measured.mean)
    }

    /// The forward, backward and update of one step, with `v` at `architecture_ms`.
    fn train_step(&mut self, step: i64, architecture_ms: f64) -> Result<StepValues> {
        // Seeded after the probe, whose timing inputs only rank 0 draws: every rank then draws
        // the same batch and gate noise.
        seed_step(self.ctx.seed, STAGE, step);
        let started = std::time::Instant::now();
        let x = (self.ctx.next_batch)();
        let terms = Lagrangian {
            target_ms: self.target_ms,
            lambda: self.state.lambda,
            rho: self.cfg.rho,
            kd_temperature: self.cfg.kd_temperature,
            mse_weight: self.cfg.mse_weight,
        };
        let StepLosses {
            loss,
            kd,
            proxy_ms,
            v,
        } = step_losses(
            self.models,
            self.gates,
            self.proxy,
            &x,
            &terms,
            Some(architecture_ms),
        );
        let mut stores = vec![self.gates.var_store()];
        if self.cfg.train_weights {
            stores.push(self.models.student.var_store());
        }
        let [kd, v, loss] = descend(
            &loss,
            &mut self.optimizers.all(),
            &stores,
            self.ctx.workers,
            [&kd, &v, &loss],
        )?;
        let step_s = started.elapsed().as_secs_f64();
        if !loss.is_finite() {
            let what = format!("loss is {loss} (KD {kd}, v {v})");
            return Err(diverged(step, what, self.ctx.checkpoint_dir));
        }
        Ok(StepValues {
            loss,
            kd,
            v,
            proxy_ms: proxy_ms.double_value(&[]),
            step_s,
        })
    }

    fn update_lambda(&mut self, v: f64) {
        // λ accumulates only while the architecture is over the target. Once it meets it, what λ
        // built up on the way would go on cutting far past it (measured: a 0.4× target got
        // 9.8× with λ decaying 0.08 a step from 5.5), so it restarts from zero and (ρ/2)·v²
        // alone holds the latency at the target.
        self.state.lambda = if v <= 0.0 {
            0.0
        } else {
            (self.state.lambda + self.cfg.lambda_lr * v).min(self.cfg.lambda_max)
        };
    }

    /// At a probe measuring `real_ms`: stops once the target is met and KD has plateaued.
    fn apply_stop_rule(&mut self, step: i64, real_ms: f64, kd: f64) {
        let kd_now = self.kd_ema.unwrap_or(kd);
        // KD has settled when it no longer rises by more than 10% between probes: per-step KD
        // is noisy, and a falling KD (weights adapting) is no reason to keep pruning past the
        // target, which only costs quality.
        let plateau = self
            .state
            .kd_at_last_probe
            .is_some_and(|prev| kd_now <= 1.1 * prev.abs().max(1e-6));
        if real_ms <= self.target_ms && plateau {
            tracing::info!(step, real_ms, "target met and KD plateaued: stopping");
            self.state.finished = true;
        }
        self.state.kd_at_last_probe = Some(kd_now);
    }

    fn checkpoint(&self) -> Result<()> {
        let dir = self.ctx.checkpoint_dir;
        if let Some(weights) = &self.optimizers.weights {
            save_weights(self.models.student.var_store(), &dir.join(STUDENT_WEIGHTS))?;
            weights.save(&self.optimizers.weights_file)?;
        }
        self.optimizers.gates.save(&self.optimizers.gates_file)?;
        // Last the gates, then the state: it names the step the files above belong to. A crash
        // between the two resumes from the older state with newer gates, which loses at most one
        // interval.
        self.gates.save(dir)?;
        crate::io::json::write(&state_path(dir), &self.state)
    }
}
