//! The adaptation loop's latency controller: `v` follows the hard architecture (not the expected
//! widths), λ ascends only while that architecture is over the target and is zero once it meets
//! it, and the step it first meets the target is probed. The "measurement" here is the FLOP
//! cost of the keep-set, so the proxy is exact and every number below is known.

#![allow(clippy::unwrap_used)] // tests: a failed unwrap is a failed test

use hawada::dist::Workers;
use hawada::families::llama::{Llama, LlamaConfig};
use hawada::gates::{GateOptions, Gates};
use hawada::latency::measure::LatencyStats;
use hawada::latency::proxy::LatencyProxy;
use hawada::model::{Family, KeepSet, Workload};
use hawada::progress::Silent;
use hawada::run_dir::{MetricsLog, StepMetrics};
use hawada::train::{adapt, AdaptContext, AdaptOptions, Models};
use std::path::Path;
use tch::{Device, Kind, Tensor};

#[test]
fn lambda_ascends_over_target_is_zero_under_it_and_the_first_step_under_is_probed() {
    tch::manual_seed(3);
    let mut model = Llama::new(LlamaConfig::tiny(), Device::Cpu, Path::new("test")).unwrap();
    model.var_store_mut().freeze();
    let workload = Workload::Forward {
        batch: 2,
        tokens: 8,
    };
    let groups = model.groups().to_vec();
    let exact = || LatencyProxy::with_flop_cost(&model.cost_sites(workload), &groups, Device::Cpu);
    let truth = exact();
    let mut proxy = exact();
    let keep_all = KeepSet(groups.iter().map(|g| (0..g.len).collect()).collect());
    let target_ms = 0.6 * truth.predict_keep_ms(&keep_all);
    let mut gates = Gates::new(&groups, GateOptions::default(), Device::Cpu).unwrap();
    let cfg = AdaptOptions {
        steps: 120,
        batch: 2,
        lr: 0.1,
        kd_temperature: 1.0,
        mse_weight: 0.0,
        lambda_lr: 0.5,
        lambda_max: 20.0,
        rho: 10.0,
        // No periodic probe within the run: any probe is the controller's.
        probe_every: 1000,
        checkpoint_every: 1000,
        train_weights: false,
        weight_lr: 0.0,
    };
    let dir = tempfile::tempdir().unwrap();
    let metrics = MetricsLog::new(dir.path().join("metrics.jsonl"));
    let tokens = Tensor::randint(64, [2, 8], (Kind::Int64, Device::Cpu));
    let mut next_batch = || tokens.shallow_clone();
    let mut measure_keep = |keep: &KeepSet| {
        let ms = truth.predict_keep_ms(keep);
        Ok(LatencyStats {
            mean: ms,
            p50: ms,
            p95: ms,
            std: 0.0,
            runs: 1,
        })
    };
    let workers = Workers::single();
    let outcome = adapt(
        Models {
            teacher: &model,
            student: &model,
        },
        &mut gates,
        &mut proxy,
        &cfg,
        target_ms,
        AdaptContext {
            next_batch: &mut next_batch,
            measure_keep: &mut measure_keep,
            checkpoint_dir: &dir.path().join("checkpoints"),
            metrics: &metrics,
            observer: &Silent,
            seed: 0,
            workers: &workers,
        },
    )
    .unwrap();

    let steps: Vec<StepMetrics> = metrics
        .read()
        .into_iter()
        .map(|line| serde_json::from_value(line).unwrap())
        .collect();
    assert_eq!(steps.len() as i64, outcome.steps);
    let mut lambda = 0.0;
    for step in &steps {
        let architecture_ms = step.real_ms.or(step.kept_proxy_ms).unwrap();
        // `v` is the hard architecture's, whatever the expected widths say.
        let v = (architecture_ms - target_ms) / target_ms;
        assert!(
            (step.v - v).abs() < 1e-4,
            "step {}: v {} ≠ {v}",
            step.step,
            step.v
        );
        lambda = if step.v <= 0.0 {
            0.0
        } else {
            (lambda + cfg.lambda_lr * step.v).min(cfg.lambda_max)
        };
        assert!((step.lambda - lambda).abs() < 1e-9, "step {}", step.step);
    }
    // The expected widths met the target before any hard mask changed: without the hard `v`,
    // λ would have stopped growing there and the architecture would never have been cut.
    let first_under = steps
        .iter()
        .position(|s| s.kept_proxy_ms.unwrap() <= target_ms)
        .expect("the architecture reaches the target within the run");
    assert!(steps[..first_under]
        .iter()
        .any(|s| s.proxy_ms <= target_ms && s.v > 0.0));
    // That step is probed, and so is every later step whose architecture is back under the
    // target after one over it; no other (no periodic probe falls within the run).
    let crossings: Vec<i64> = (0..steps.len())
        .filter(|&i| {
            steps[i].kept_proxy_ms.unwrap() <= target_ms
                && (i == 0 || steps[i - 1].kept_proxy_ms.unwrap() > target_ms)
        })
        .map(|i| steps[i].step)
        .collect();
    let probed: Vec<i64> = steps
        .iter()
        .filter(|s| s.real_ms.is_some())
        .map(|s| s.step)
        .collect();
    assert_eq!(probed[0], steps[first_under].step);
    assert_eq!(probed, crossings);
    assert_eq!(outcome.probes.len(), probed.len());
    assert_eq!(steps[first_under].lambda, 0.0);
    assert!(steps[first_under - 1].lambda > 0.0);
}
