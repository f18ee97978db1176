//! The timing protocol: warm-up runs (cuDNN autotune, allocator growth, lazy loading), then timed
//! runs each synchronised on the device; mean, median, p95 and std in milliseconds. Times a closure
//! it is handed and builds no model.

use crate::cuda::CudaGraph;
use serde::{Deserialize, Serialize};
use std::time::Instant;
use tch::{Device, Tensor};

/// Warm-up and timed run counts (DESIGN §4: ≥ 10 and ≥ 50 by default).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TimingProtocol {
    #[serde(default = "default_warmup")]
    pub warmup_runs: usize,
    #[serde(default = "default_timed")]
    pub timed_runs: usize,
    /// Time forwards replayed from a captured CUDA graph (one launch per forward) instead of
    /// eager launches; only on CUDA, only for workloads that support it.
    #[serde(default)]
    pub cuda_graphs: bool,
}

fn default_warmup() -> usize {
    10
}
fn default_timed() -> usize {
    50
}

impl Default for TimingProtocol {
    fn default() -> Self {
        TimingProtocol {
            warmup_runs: default_warmup(),
            timed_runs: default_timed(),
            cuda_graphs: false,
        }
    }
}

/// Summary of timed runs, milliseconds.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct LatencyStats {
    pub mean: f64,
    pub p50: f64,
    pub p95: f64,
    pub std: f64,
    pub runs: usize,
}

impl LatencyStats {
    /// Every statistic multiplied by `factor` (a rescaling to a reference measurement).
    pub fn scaled(self, factor: f64) -> Self {
        LatencyStats {
            mean: self.mean * factor,
            p50: self.p50 * factor,
            p95: self.p95 * factor,
            std: self.std * factor,
            runs: self.runs,
        }
    }

    /// Statistics of per-run times in milliseconds. Percentiles use the nearest-rank method.
    pub fn from_samples(samples_ms: &[f64]) -> Self {
        let n = samples_ms.len().max(1);
        let mut sorted = samples_ms.to_vec();
        sorted.sort_by(f64::total_cmp);
        let mean = sorted.iter().sum::<f64>() / n as f64;
        let var = sorted.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / n as f64;
        let rank = |q: f64| {
            sorted
                .get(((q * n as f64).ceil() as usize).clamp(1, n) - 1)
                .copied()
                .unwrap_or(0.0)
        };
        LatencyStats {
            mean,
            p50: rank(0.5),
            p95: rank(0.95),
            std: var.sqrt(),
            runs: samples_ms.len(),
        }
    }
}

fn synchronize(device: Device) {
    if let Device::Cuda(index) = device {
        tch::Cuda::synchronize(index as i64);
    }
}

/// Times `run` under `protocol` on `device`, synchronising before and after every run. Gradient
/// mode is the caller's: inference callers hold a `no_grad_guard`, training-step benchmarks not.
pub fn measure(device: Device, protocol: TimingProtocol, mut run: impl FnMut()) -> LatencyStats {
    measure_interleaved(device, protocol, &mut [&mut run])[0]
}

/// Times several workloads round-robin (one run of each per round), so that drift of the
/// machine's speed (shared hosts, clocks) affects all of them alike; for A/B comparisons.
pub fn measure_interleaved(
    device: Device,
    protocol: TimingProtocol,
    runs: &mut [&mut dyn FnMut()],
) -> Vec<LatencyStats> {
    for run in runs.iter_mut() {
        for _ in 0..protocol.warmup_runs {
            run();
        }
    }
    synchronize(device);
    let mut samples = vec![Vec::with_capacity(protocol.timed_runs); runs.len()];
    for _ in 0..protocol.timed_runs.max(1) {
        for (run, samples) in runs.iter_mut().zip(&mut samples) {
            synchronize(device);
            let start = Instant::now();
            run();
            synchronize(device);
            samples.push(start.elapsed().as_secs_f64() * 1e3);
        }
    }
    samples
        .iter()
        .map(|s| LatencyStats::from_samples(s))
        .collect()
}

/// The device's own name: "cpu", or the CUDA device as libtorch reports it.
pub fn device_name(device: Device) -> String {
    match device {
        Device::Cpu => "cpu".to_string(),
        Device::Cuda(i) => crate::cuda::device_info(i)
            .map(|d| d.name)
            .unwrap_or_else(|_| format!("cuda:{i}")),
        other => format!("{other:?}"),
    }
}

/// `call` ready to time as `protocol` asks: replayed from a CUDA graph captured once when
/// `protocol.cuda_graphs` is set and `device` is CUDA (a capture that fails falls back to eager
/// calls, with a warning), else called eagerly. The graph replays into the buffers `call` owns,
/// so the returned closure keeps `call` alive.
pub fn replayable<'a>(
    device: Device,
    protocol: TimingProtocol,
    mut call: Box<dyn FnMut() -> Tensor + 'a>,
) -> Box<dyn FnMut() + 'a> {
    if protocol.cuda_graphs && device.is_cuda() {
        match CudaGraph::capture(device, &mut call) {
            Ok((graph, _output)) => {
                return Box::new(move || {
                    let _ = &call;
                    if let Err(e) = graph.replay() {
                        tracing::warn!(error = %e, "CUDA graph replay failed");
                    }
                })
            }
            Err(e) => tracing::warn!(error = %e, "CUDA graph capture failed; timing eager calls"),
        }
    }
    Box::new(move || {
        let _ = call();
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stats_of_known_samples() {
        let samples: Vec<f64> = (1..=100).map(f64::from).collect();
        let s = LatencyStats::from_samples(&samples);
        assert_eq!(s.mean, 50.5);
        assert_eq!(s.p50, 50.0);
        assert_eq!(s.p95, 95.0);
        assert!((s.std - 28.866).abs() < 1e-3);
    }

    #[test]
    fn measures_real_work_longer_than_no_work() {
        let x = tch::Tensor::randn([256, 256], (tch::Kind::Float, Device::Cpu));
        let protocol = TimingProtocol {
            warmup_runs: 2,
            timed_runs: 10,
            cuda_graphs: false,
        };
        let heavy = measure(Device::Cpu, protocol, || {
            let _ = x.matmul(&x).matmul(&x);
        });
        let light = measure(Device::Cpu, protocol, || {});
        assert!(heavy.p50 > light.p50);
        assert_eq!(heavy.runs, 10);
    }
}
