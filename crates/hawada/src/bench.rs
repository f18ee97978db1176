//! Benchmarks of HawAda's own hot paths, for a same-call comparison with the PyTorch baselines
//! (`bench/*.py`): keep-all workloads (forwards and decoding steps, eager and CUDA graph), one
//! gate-training step, and the same workloads on a slim export. Family-agnostic.

use crate::cuda::CudaGraph;
use crate::error::{Error, Result};
use crate::gates::{enforce_follows, GateOptions, Gates};
use crate::latency::inference::{inference_copy, measure_model, workload_call};
use crate::latency::measure::{measure, LatencyStats, TimingProtocol};
use crate::latency::proxy::LatencyProxy;
use crate::model::{Family, KeepSet, Masks, Phase, Workload};
use crate::train::{step_losses, Lagrangian, Models};
use serde::Serialize;
use std::path::Path;
use tch::{nn, nn::OptimizerConfig, Tensor};

#[derive(Debug, Clone, Serialize)]
pub struct BenchRow {
    pub name: String,
    pub batch: i64,
    pub latency_ms: LatencyStats,
    /// For CUDA-graph rows: max |graph − eager| of the outputs.
    pub max_abs_diff_vs_eager: Option<f64>,
}

/// What to benchmark.
pub struct BenchPlan<'a> {
    /// Timed on keep-all and on the slim model.
    pub workloads: Vec<Workload>,
    /// The gate-training step's batch (and tokens per sequence, for language models).
    pub step_batch: i64,
    pub step_tokens: i64,
    pub protocol: TimingProtocol,
    pub gates: &'a GateOptions,
    /// The slim architecture whose forward is timed.
    pub slim_keep: &'a KeepSet,
}

/// Keeps the first half (at least one) of every group's units, with the `follows` rule applied:
/// a fixed, reproducible slim model.
pub fn half_keep(model: &dyn Family) -> KeepSet {
    let groups = model.groups();
    let keep = KeepSet(
        groups
            .iter()
            .map(|g| (0..(g.len / 2).max(1)).collect())
            .collect(),
    );
    let logits: Vec<Vec<f32>> = groups.iter().map(|g| vec![0.0; g.len as usize]).collect();
    enforce_follows(groups, &logits, keep)
}

/// Writes `model`'s output on a random input as `io.safetensors` (`input`, `logits` in f32)
/// into `dir`, where its export lies, so another framework can check it loads the same model.
pub fn write_reference_io(model: &dyn Family, tokens: i64, dir: &Path) -> Result<()> {
    let _guard = tch::no_grad_guard();
    let input = model.random_input(2, tokens);
    let logits = model.forward(
        &model.prepare_input(input.shallow_clone()),
        &Masks::none(model.groups().len()),
        Phase::Eval,
    );
    let float = |t: &Tensor| {
        if t.is_floating_point() {
            t.to_kind(tch::Kind::Float)
        } else {
            t.shallow_clone()
        }
    };
    let tensors = [("input", &input), ("logits", &logits)]
        .into_iter()
        .map(|(name, t)| (name.to_string(), float(t)))
        .collect();
    crate::io::safetensors::write(&dir.join("io.safetensors"), &tensors)
}

fn workload_name(workload: Workload) -> String {
    match workload {
        Workload::Forward { tokens, .. } if tokens > 1 => format!("forward {tokens} tok"),
        Workload::Forward { .. } => "forward".into(),
        Workload::Prefill { tokens, .. } => format!("prefill {tokens} tok"),
        Workload::Decode { context, .. } => format!("decode @{context}"),
        Workload::Generate {
            prompt, new_tokens, ..
        } => format!("generate {prompt}+{new_tokens}"),
    }
}

/// `workload` on `model`, eager, and on CUDA also replayed from a CUDA graph (checked against
/// the eager output).
fn workload_rows(
    name: &str,
    model: &dyn Family,
    workload: Workload,
    protocol: TimingProtocol,
) -> Result<Vec<BenchRow>> {
    let label = format!("{name} {}", workload_name(workload));
    let batch = workload.batch();
    let eager = TimingProtocol {
        cuda_graphs: false,
        ..protocol
    };
    let mut rows = vec![BenchRow {
        name: format!("{label} (eager)"),
        batch,
        latency_ms: measure_model(model, workload, eager)?,
        max_abs_diff_vs_eager: None,
    }];
    let device = model.var_store().device();
    if device.is_cuda() {
        let _guard = tch::no_grad_guard();
        let mut call = workload_call(model, workload)?;
        let eager_output = call();
        let (graph, output) = CudaGraph::capture(device, &mut call)?;
        graph.replay()?;
        let diff = (&output - &eager_output)
            .abs()
            .max()
            .to_kind(tch::Kind::Float)
            .double_value(&[]);
        let mut failure = None;
        let stats = measure(device, protocol, || {
            if let Err(e) = graph.replay() {
                failure.get_or_insert(e);
            }
        });
        if let Some(e) = failure {
            return Err(e);
        }
        rows.push(BenchRow {
            name: format!("{label} (CUDA graph)"),
            batch,
            latency_ms: stats,
            max_abs_diff_vs_eager: Some(diff),
        });
    }
    Ok(rows)
}

/// Benchmark rows plus the correctness check of the fused inference path.
#[derive(Debug, Clone, Serialize)]
pub struct BenchReport {
    pub rows: Vec<BenchRow>,
    /// max |inference copy − reference forward| / max |reference| on a random batch of 8.
    pub fused_vs_reference_rel_diff: f64,
}

/// Runs every benchmark of `plan` on `model` (the frozen teacher, in its final device and dtype).
pub fn run_bench(model: &dyn Family, plan: &BenchPlan<'_>) -> Result<BenchReport> {
    let first = *plan
        .workloads
        .first()
        .ok_or_else(|| Error::Invalid("a bench needs at least one workload".into()))?;
    let keep_all = inference_copy(model, &KeepSet::all(model.groups()), first)?;
    let fused_vs_reference_rel_diff =
        fused_vs_reference_rel_diff(model, keep_all.as_ref(), plan.step_tokens);
    let mut rows = workloads_rows("keep-all", keep_all.as_ref(), plan)?;
    rows.push(gate_step_row(model, plan, first)?);
    let slim = inference_copy(model, plan.slim_keep, first)?;
    rows.extend(workloads_rows("slim", slim.as_ref(), plan)?);
    Ok(BenchReport {
        rows,
        fused_vs_reference_rel_diff,
    })
}

/// max |`fused` − `model`| / max |`model`| of the logits of a random batch of 8.
fn fused_vs_reference_rel_diff(model: &dyn Family, fused: &dyn Family, tokens: i64) -> f64 {
    let _guard = tch::no_grad_guard();
    let x = model.random_input(8, tokens);
    let no_masks = Masks::none(model.groups().len());
    let reference = model
        .forward(
            &model.prepare_input(x.shallow_clone()),
            &no_masks,
            Phase::Eval,
        )
        .to_kind(tch::Kind::Float);
    let fused = fused
        .forward(&fused.prepare_input(x), &no_masks, Phase::Eval)
        .to_kind(tch::Kind::Float);
    (fused - &reference).abs().max().double_value(&[])
        / reference.abs().max().double_value(&[]).max(1e-12)
}

/// Every workload of `plan` on `model` (see [`workload_rows`]).
fn workloads_rows(name: &str, model: &dyn Family, plan: &BenchPlan<'_>) -> Result<Vec<BenchRow>> {
    let mut rows = Vec::new();
    for &workload in &plan.workloads {
        rows.extend(workload_rows(name, model, workload, plan.protocol)?);
    }
    Ok(rows)
}

/// One gate-training step: teacher forward without grad, gated student forward, KD + latency
/// terms, backward to the gate logits only, Adam step. The student is the frozen teacher.
fn gate_step_row(model: &dyn Family, plan: &BenchPlan<'_>, workload: Workload) -> Result<BenchRow> {
    let device = model.var_store().device();
    let gates = Gates::new(model.groups(), plan.gates.clone(), device)?;
    let proxy = LatencyProxy::with_flop_cost(&model.cost_sites(workload), model.groups(), device);
    let mut opt = nn::Adam::default()
        .build(gates.var_store(), 0.1)
        .map_err(|e| Error::torch("adam", "gates", e))?;
    let x = model.random_input(plan.step_batch, plan.step_tokens);
    let terms = Lagrangian {
        target_ms: 1.0,
        lambda: 1.0,
        rho: 1.0,
        kd_temperature: 2.0,
        mse_weight: 0.0,
    };
    let step = measure(device, plan.protocol, || {
        let losses = step_losses(
            Models {
                teacher: model,
                student: model,
            },
            &gates,
            &proxy,
            &x,
            &terms,
            None,
        );
        opt.zero_grad();
        losses.loss.backward();
        opt.step();
    });
    Ok(BenchRow {
        name: "gate-training step".into(),
        batch: plan.step_batch,
        latency_ms: step,
        max_abs_diff_vs_eager: None,
    })
}
