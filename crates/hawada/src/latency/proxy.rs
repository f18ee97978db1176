//! The differentiable latency proxy `L̂(p) = a · Σ_sites c_s(w_in, w_out) + b` (DESIGN §4).
//! `c_s` comes from a [`SiteCost`]: by default the per-site tables measured on the device
//! (`latency::tables::TableCost`, `latency.cost = "table"`), or a FLOP count ([`FlopCost`],
//! `"flops"`), which misses the staircase of tile quantisation. `(a, b)` are fitted by least
//! squares to whole-model measurements and refitted from every probe. Reads measurements, never
//! the clock.

use crate::model::{CostSite, Group, KeepSet, Width};
use serde::{Deserialize, Serialize};
use tch::{Device, Kind, Tensor};

/// Total cost of all sites at per-site widths, differentiable. Vectorised over sites: one
/// kernel chain per call, whatever the model size.
pub trait SiteCost: Send {
    /// `w_in`, `w_out`: `[n_sites]` f32; each site's cost is multiplied by `presence`
    /// `[n_sites]` (1, or the keep probability of the sublayer it belongs to). Returns a scalar.
    fn total(&self, w_in: &Tensor, w_out: &Tensor, presence: &Tensor) -> Tensor;
    /// A short name for reports ("flops", "table").
    fn name(&self) -> &'static str;
}

/// Which site cost the proxy sums (`latency.cost`): tables measured on the device (default), or
/// a FLOP count (which misses the staircase of tile quantisation, DESIGN §4).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ProxyCost {
    Table,
    Flops,
}

impl std::fmt::Display for ProxyCost {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            ProxyCost::Table => "table",
            ProxyCost::Flops => "flops",
        })
    }
}

/// FLOPs in GFLOP: `2·macs·w_in·w_out` plus a few FLOPs per output element (norm + activation).
pub struct FlopCost {
    /// `[n_sites]`: 2·macs_per_in_out, and ELEMENTWISE_FLOPS·elems_per_out.
    matmul_flops: Tensor,
    elementwise_flops: Tensor,
}

const ELEMENTWISE_FLOPS: f64 = 4.0;

impl FlopCost {
    pub fn new(sites: &[CostSite], device: Device) -> Self {
        let matmul: Vec<f32> = sites
            .iter()
            .map(|s| (2.0 * s.macs_per_in_out) as f32)
            .collect();
        let elementwise: Vec<f32> = sites
            .iter()
            .map(|s| (ELEMENTWISE_FLOPS * s.elems_per_out) as f32)
            .collect();
        FlopCost {
            matmul_flops: Tensor::from_slice(&matmul).to_device(device),
            elementwise_flops: Tensor::from_slice(&elementwise).to_device(device),
        }
    }
}

impl SiteCost for FlopCost {
    fn total(&self, w_in: &Tensor, w_out: &Tensor, presence: &Tensor) -> Tensor {
        ((w_in * &self.matmul_flops + &self.elementwise_flops) * w_out * presence).sum(Kind::Float)
            / 1e9
    }
    fn name(&self) -> &'static str {
        "flops"
    }
}

/// One whole-model measurement: the proxy's cost sum and the measured mean ms.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Sample {
    pub cost: f64,
    pub ms: f64,
}

/// Proxy fidelity on held-out measurements.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Fidelity {
    /// Mean absolute percentage error, percent.
    pub mape: f64,
    pub spearman: f64,
    pub n: usize,
}

pub struct LatencyProxy {
    cost: Box<dyn SiteCost>,
    /// `[n_groups, Σ len]`: row g holds `unit_width` at group g's units, so `membership · p`
    /// gives every group's expected width.
    membership: Tensor,
    /// `[n_sites, n_groups + 1]`: picks a site's input (output) width from
    /// `[widths…, 1]`: a one-hot on its group, or its fixed width in the last column.
    select_in: Tensor,
    select_out: Tensor,
    /// `[n_sites, n_groups + 1]`: the site's calls per workload, on the column of the sublayer
    /// group that switches it, or on the constant last column.
    select_presence: Tensor,
    group_lens: Vec<i64>,
    device: Device,
    pub a: f64,
    pub b: f64,
    samples: Vec<Sample>,
}

fn selection(
    sites: &[CostSite],
    n_groups: usize,
    side: impl Fn(&CostSite) -> Width,
    device: Device,
) -> Tensor {
    let cols = n_groups + 1;
    let mut m = vec![0f32; sites.len() * cols];
    for (i, site) in sites.iter().enumerate() {
        match side(site) {
            Width::Group(g) => m[i * cols + g] = 1.0,
            Width::Fixed(n) => m[i * cols + n_groups] = n as f32,
        }
    }
    Tensor::from_slice(&m)
        .view([sites.len() as i64, cols as i64])
        .to_device(device)
}

/// `[n_sites, n_groups + 1]`: a site's calls per workload, on its sublayer gate's column or on
/// the constant last column.
fn presence(sites: &[CostSite], n_groups: usize, device: Device) -> Tensor {
    let cols = n_groups + 1;
    let mut m = vec![0f32; sites.len() * cols];
    for (i, site) in sites.iter().enumerate() {
        m[i * cols + site.enabled_by.unwrap_or(n_groups)] = site.calls as f32;
    }
    Tensor::from_slice(&m)
        .view([sites.len() as i64, cols as i64])
        .to_device(device)
}

impl LatencyProxy {
    pub fn new(
        sites: &[CostSite],
        groups: &[Group],
        cost: Box<dyn SiteCost>,
        device: Device,
    ) -> Self {
        let total: i64 = groups.iter().map(|g| g.len).sum();
        let mut membership = vec![0f32; groups.len() * total as usize];
        let mut offset = 0usize;
        for (g, group) in groups.iter().enumerate() {
            for u in 0..group.len as usize {
                membership[g * total as usize + offset + u] = group.unit_width as f32;
            }
            offset += group.len as usize;
        }
        LatencyProxy {
            cost,
            membership: Tensor::from_slice(&membership)
                .view([groups.len() as i64, total])
                .to_device(device),
            select_in: selection(sites, groups.len(), |s| s.input, device),
            select_out: selection(sites, groups.len(), |s| s.output, device),
            select_presence: presence(sites, groups.len(), device),
            group_lens: groups.iter().map(|g| g.len).collect(),
            device,
            a: 1.0,
            b: 0.0,
            samples: Vec::new(),
        }
    }

    /// The proxy with FLOP site costs (this cost model).
    pub fn with_flop_cost(sites: &[CostSite], groups: &[Group], device: Device) -> Self {
        Self::new(
            sites,
            groups,
            Box::new(FlopCost::new(sites, device)),
            device,
        )
    }

    /// Σ site costs at expected widths `Σ p · unit_width`; `keep_prob[g]` is `[len]` f32.
    pub fn cost(&self, keep_prob: &[Tensor]) -> Tensor {
        let widths = self.membership.mv(&Tensor::cat(keep_prob, 0));
        let extended = Tensor::cat(&[widths, Tensor::ones([1], (Kind::Float, self.device))], 0);
        self.cost.total(
            &self.select_in.mv(&extended),
            &self.select_out.mv(&extended),
            &self.select_presence.mv(&extended),
        )
    }

    /// Cost sum of a hard keep-set.
    pub fn cost_of_keep(&self, keep: &KeepSet) -> f64 {
        let _guard = tch::no_grad_guard();
        let p: Vec<Tensor> = keep
            .0
            .iter()
            .zip(&self.group_lens)
            .map(|(kept, &len)| {
                let mut indicator = vec![0f32; len as usize];
                for &unit in kept {
                    indicator[unit as usize] = 1.0;
                }
                Tensor::from_slice(&indicator).to_device(self.device)
            })
            .collect();
        self.cost(&p).double_value(&[])
    }

    /// Predicted ms, differentiable in `keep_prob`.
    pub fn predict_ms(&self, keep_prob: &[Tensor]) -> Tensor {
        self.cost(keep_prob) * self.a + self.b
    }

    pub fn predict_keep_ms(&self, keep: &KeepSet) -> f64 {
        self.a * self.cost_of_keep(keep) + self.b
    }

    pub fn samples(&self) -> &[Sample] {
        &self.samples
    }

    /// Adds a whole-model measurement and refits `(a, b)`.
    pub fn add_sample(&mut self, sample: Sample) {
        self.samples.push(sample);
        (self.a, self.b) = fit(&self.samples);
    }

    pub fn cost_name(&self) -> &'static str {
        self.cost.name()
    }

    /// MAPE and Spearman of predictions vs measurements.
    pub fn fidelity(&self, held_out: &[Sample]) -> Fidelity {
        let predicted: Vec<f64> = held_out.iter().map(|s| self.a * s.cost + self.b).collect();
        let measured: Vec<f64> = held_out.iter().map(|s| s.ms).collect();
        let mape = if held_out.is_empty() {
            0.0
        } else {
            100.0
                * predicted
                    .iter()
                    .zip(&measured)
                    .map(|(p, m)| ((p - m) / m).abs())
                    .sum::<f64>()
                / held_out.len() as f64
        };
        Fidelity {
            mape,
            spearman: spearman(&predicted, &measured),
            n: held_out.len(),
        }
    }
}

/// Least squares `ms ≈ a·cost + b`. With fewer than two distinct costs, or a non-positive slope
/// (noise dominating), falls back to a line through the origin so that cost stays monotone.
pub fn fit(samples: &[Sample]) -> (f64, f64) {
    let n = samples.len() as f64;
    if samples.is_empty() {
        return (1.0, 0.0);
    }
    let through_origin = || {
        let num: f64 = samples.iter().map(|s| s.cost * s.ms).sum();
        let den: f64 = samples.iter().map(|s| s.cost * s.cost).sum();
        if den > 0.0 {
            (num / den, 0.0)
        } else {
            (1.0, 0.0)
        }
    };
    let mean_c = samples.iter().map(|s| s.cost).sum::<f64>() / n;
    let mean_m = samples.iter().map(|s| s.ms).sum::<f64>() / n;
    let var_c: f64 = samples.iter().map(|s| (s.cost - mean_c).powi(2)).sum();
    if samples.len() < 2 || var_c <= 1e-12 * mean_c.powi(2).max(1e-30) {
        return through_origin();
    }
    let cov: f64 = samples
        .iter()
        .map(|s| (s.cost - mean_c) * (s.ms - mean_m))
        .sum();
    let a = cov / var_c;
    if a <= 0.0 {
        return through_origin();
    }
    (a, mean_m - a * mean_c)
}

fn ranks(values: &[f64]) -> Vec<f64> {
    let mut order: Vec<usize> = (0..values.len()).collect();
    order.sort_by(|&i, &j| values[i].total_cmp(&values[j]));
    let mut ranks = vec![0.0; values.len()];
    let mut i = 0;
    while i < order.len() {
        let mut j = i;
        while j + 1 < order.len() && values[order[j + 1]] == values[order[i]] {
            j += 1;
        }
        let average = (i + j) as f64 / 2.0 + 1.0;
        for &k in &order[i..=j] {
            ranks[k] = average;
        }
        i = j + 1;
    }
    ranks
}

/// Spearman rank correlation (average ranks for ties); 0 when undefined.
pub fn spearman(x: &[f64], y: &[f64]) -> f64 {
    if x.len() < 2 {
        return 0.0;
    }
    let (rx, ry) = (ranks(x), ranks(y));
    let n = x.len() as f64;
    let (mx, my) = (rx.iter().sum::<f64>() / n, ry.iter().sum::<f64>() / n);
    let cov: f64 = rx.iter().zip(&ry).map(|(a, b)| (a - mx) * (b - my)).sum();
    let sx: f64 = rx.iter().map(|a| (a - mx).powi(2)).sum::<f64>().sqrt();
    let sy: f64 = ry.iter().map(|b| (b - my).powi(2)).sum::<f64>().sqrt();
    if sx == 0.0 || sy == 0.0 {
        0.0
    } else {
        cov / (sx * sy)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::UnitKind;

    #[test]
    fn fit_recovers_a_line() {
        let samples: Vec<Sample> = [1.0, 2.0, 4.0]
            .iter()
            .map(|&c| Sample {
                cost: c,
                ms: 3.0 * c + 0.5,
            })
            .collect();
        let (a, b) = fit(&samples);
        assert!((a - 3.0).abs() < 1e-9 && (b - 0.5).abs() < 1e-9);
    }

    #[test]
    fn spearman_of_monotone_and_reversed() {
        assert!((spearman(&[1., 2., 3.], &[10., 20., 35.]) - 1.0).abs() < 1e-12);
        assert!((spearman(&[1., 2., 3.], &[3., 2., 1.]) + 1.0).abs() < 1e-12);
    }

    #[test]
    fn proxy_gradient_is_positive_in_keep_probability() {
        let groups = vec![Group {
            name: "g".into(),
            kind: UnitKind::Channels,
            len: 4,
            unit_width: 2,
            members: vec![],
            follows: None,
        }];
        let sites = vec![CostSite {
            name: "conv".into(),
            input: Width::Fixed(3),
            output: Width::Group(0),
            macs_per_in_out: 9.0,
            elems_per_out: 1.0,
            op: crate::model::SiteOp::Linear { rows: 1 },
            enabled_by: None,
            calls: 1.0,
        }];
        let proxy = LatencyProxy::new(
            &sites,
            &groups,
            Box::new(FlopCost::new(&sites, Device::Cpu)),
            Device::Cpu,
        );
        let p = Tensor::full([4], 0.5, (Kind::Float, Device::Cpu)).set_requires_grad(true);
        let ms = proxy.predict_ms(std::slice::from_ref(&p));
        ms.backward();
        let grad = Vec::<f32>::try_from(&p.grad()).unwrap();
        assert!(grad.iter().all(|&g| g > 0.0));
        // Keeping everything equals the hard keep-all cost.
        let all = proxy.cost_of_keep(&KeepSet(vec![vec![0, 1, 2, 3]]));
        let expected = (2.0 * 9.0 * 3.0 * 8.0 + 4.0 * 8.0) / 1e9;
        assert!((all - expected).abs() <= 1e-6 * expected);
        // A site called three times per workload costs three times as much.
        let thrice = [CostSite {
            calls: 3.0,
            ..sites[0].clone()
        }];
        let proxy = LatencyProxy::new(
            &thrice,
            &groups,
            Box::new(FlopCost::new(&thrice, Device::Cpu)),
            Device::Cpu,
        );
        let cost = proxy.cost_of_keep(&KeepSet(vec![vec![0, 1, 2, 3]]));
        assert!((cost - 3.0 * expected).abs() <= 1e-6 * expected);
    }
}
