//! Measured per-site cost tables (DESIGN §4): each cost site run alone on the target device at
//! a grid of widths, with the target's dtype and batch. Tile quantisation makes GPU latency a
//! staircase in width (a 3968-wide bf16 GEMM ran slower than a 4096-wide one on an H200); a
//! measured table sees it, a FLOP count cannot.
//!
//! A site's cost is modelled separably: `c(w_in, w_out) = T_in(w_in) · T_out(w_out) / T(full)`,
//! where `T_in` is measured over input widths at full output width and `T_out` the other way;
//! one dimension of measurements per gated side instead of a full 2-D grid. Tables are cached
//! per (device, driver, libtorch, dtype, batch, grid, model) so a rerun is free.

use crate::error::{Error, Result};
use crate::latency::measure::{measure, replayable, TimingProtocol};
use crate::latency::proxy::SiteCost;
use crate::model::{CostSite, Group, SiteOp, Width};
use crate::progress::Observer;
use serde::{Deserialize, Serialize};
use std::path::Path;
use tch::{Device, Kind, Tensor};

/// One site's tables, milliseconds per call at the profile batch.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SiteTable {
    pub name: String,
    pub in_widths: Vec<i64>,
    pub in_ms: Vec<f64>,
    pub out_widths: Vec<i64>,
    pub out_ms: Vec<f64>,
    /// Both sides at full width.
    pub full_ms: f64,
}

/// Every site's tables and what they were measured for.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SiteTables {
    pub key: String,
    pub tables: Vec<SiteTable>,
    pub measurements: usize,
}

/// How tables are measured.
#[derive(Debug, Clone, Copy)]
pub struct TableOptions {
    /// Grid spacing in elements (channels, units); rounded up to a multiple of a group's unit.
    pub grid_step: i64,
    pub protocol: TimingProtocol,
    pub batch: i64,
}

/// Widths at which a side of `full` elements (units of `unit`) is measured: one unit, every
/// multiple of the step, and the full width.
pub fn grid(full: i64, unit: i64, step: i64) -> Vec<i64> {
    let step = (step.max(unit) + unit - 1) / unit * unit;
    let mut points: Vec<i64> = std::iter::once(unit)
        .chain((1..).map(|i| i * step).take_while(|&w| w < full))
        .chain(std::iter::once(full))
        .collect();
    points.sort_unstable();
    points.dedup();
    points
}

fn full_width(width: Width, groups: &[Group]) -> i64 {
    match width {
        Width::Fixed(n) => n,
        Width::Group(g) => groups[g].len * groups[g].unit_width,
    }
}

fn unit_of(width: Width, groups: &[Group]) -> Option<i64> {
    match width {
        Width::Fixed(_) => None,
        Width::Group(g) => Some(groups[g].unit_width),
    }
}

/// Mean ms of `op` alone at widths `w_in → w_out` for `batch` samples; replayed from a CUDA
/// graph when `protocol.cuda_graphs` asks (as whole models are then timed: without it, a small
/// site's table would carry a launch overhead the graph-replayed model does not pay).
pub fn site_ms(
    op: SiteOp,
    w_in: i64,
    w_out: i64,
    batch: i64,
    protocol: TimingProtocol,
    options: (Kind, Device),
) -> f64 {
    let _guard = tch::no_grad_guard();
    let (kind, device) = options;
    let channels_last = |t: Tensor| {
        if device.is_cuda() && t.dim() == 4 {
            t.permute([0, 2, 3, 1]).contiguous().permute([0, 3, 1, 2])
        } else {
            t
        }
    };
    let bias = Tensor::randn([w_out], options);
    let call: Box<dyn FnMut() -> Tensor> = match op {
        SiteOp::Conv2d {
            kernel,
            stride,
            input_size,
        } => {
            let x = channels_last(Tensor::randn(
                [batch, w_in, input_size, input_size],
                options,
            ));
            let weight =
                channels_last(Tensor::randn([w_out, w_in, kernel, kernel], options) * 0.05);
            Box::new(move || {
                x.conv2d(&weight, Some(&bias), [stride], [kernel / 2], [1], 1)
                    .relu_()
            })
        }
        SiteOp::Attention {
            queries,
            keys,
            head_dim,
            q_per_kv,
            causal,
        } => {
            let kv_heads = (w_out / head_dim).max(1);
            let q_heads = if w_in > 1 {
                ((w_in / head_dim).max(1) + kv_heads - 1) / kv_heads * kv_heads
            } else {
                kv_heads * q_per_kv
            };
            let gqa = q_heads > kv_heads;
            let q = Tensor::randn([batch, q_heads, queries, head_dim], options);
            let kv = Tensor::randn([batch, kv_heads, keys, head_dim], options);
            Box::new(move || {
                Tensor::scaled_dot_product_attention(
                    &q,
                    &kv,
                    &kv,
                    None::<Tensor>,
                    0.0,
                    causal,
                    None,
                    gqa,
                )
            })
        }
        SiteOp::Linear { rows } => {
            let x = Tensor::randn([batch * rows, w_in], (kind, device));
            let weight = Tensor::randn([w_out, w_in], options) * 0.05;
            Box::new(move || x.linear(&weight, Some(&bias)))
        }
    };
    let mut run = replayable(device, protocol, call);
    measure(device, protocol, &mut run).mean
}

/// What is measured of one site: its operator, full widths and the grid of each side. Sites
/// with equal plans (every layer of a uniform transformer) share one measured table.
#[derive(Debug, Clone, PartialEq)]
struct SitePlan {
    op: SiteOp,
    full_in: i64,
    full_out: i64,
    in_grid: Vec<i64>,
    out_grid: Vec<i64>,
}

impl SitePlan {
    fn new(site: &CostSite, groups: &[Group], grid_step: i64) -> Self {
        let side_grid = |width: Width, full: i64| {
            unit_of(width, groups)
                .map(|unit| grid(full, unit, grid_step))
                .unwrap_or_else(|| vec![full])
        };
        let (full_in, full_out) = (
            full_width(site.input, groups),
            full_width(site.output, groups),
        );
        SitePlan {
            op: site.op,
            full_in,
            full_out,
            in_grid: side_grid(site.input, full_in),
            out_grid: side_grid(site.output, full_out),
        }
    }

    /// Timings its table takes: both grids, the full width (on both) once.
    fn measurements(&self) -> usize {
        self.in_grid.len() + self.out_grid.len() - 1
    }

    /// Times `op` at every grid point through `time(w_in, w_out)`: the full width first, then
    /// each side's other widths at the other side's full width.
    fn measure(&self, name: &str, mut time: impl FnMut(i64, i64) -> f64) -> SiteTable {
        let full_ms = time(self.full_in, self.full_out);
        let in_ms = side_ms(&self.in_grid, self.full_in, full_ms, |w| {
            time(w, self.full_out)
        });
        let out_ms = side_ms(&self.out_grid, self.full_out, full_ms, |w| {
            time(self.full_in, w)
        });
        SiteTable {
            name: name.to_string(),
            in_widths: self.in_grid.clone(),
            in_ms,
            out_widths: self.out_grid.clone(),
            out_ms,
            full_ms,
        }
    }
}

/// One side's table: `full_ms` at its full width, `time_at(w)` at every other width of `grid`.
fn side_ms(grid: &[i64], full: i64, full_ms: f64, mut time_at: impl FnMut(i64) -> f64) -> Vec<f64> {
    grid.iter()
        .map(|&w| if w == full { full_ms } else { time_at(w) })
        .collect()
}

/// Measures every site's tables (see the module doc).
pub fn measure_tables(
    sites: &[CostSite],
    groups: &[Group],
    options: TableOptions,
    dtype: (Kind, Device),
    key: String,
    observer: &dyn Observer,
) -> SiteTables {
    let plans: Vec<SitePlan> = sites
        .iter()
        .map(|site| SitePlan::new(site, groups, options.grid_step))
        .collect();
    let mut distinct: Vec<&SitePlan> = Vec::new();
    for plan in &plans {
        if !distinct.contains(&plan) {
            distinct.push(plan);
        }
    }
    let total: usize = distinct.iter().map(|plan| plan.measurements()).sum();
    observer.begin("site tables", total as u64);
    let mut done = 0u64;
    let mut measured: Vec<(&SitePlan, SiteTable)> = Vec::new();
    let mut tables = Vec::with_capacity(sites.len());
    for (site, plan) in sites.iter().zip(&plans) {
        if let Some((_, table)) = measured.iter().find(|(p, _)| *p == plan) {
            tables.push(SiteTable {
                name: site.name.clone(),
                ..table.clone()
            });
            continue;
        }
        let table = plan.measure(&site.name, |w_in, w_out| {
            done += 1;
            let ms = site_ms(site.op, w_in, w_out, options.batch, options.protocol, dtype);
            observer.advance(done, &format!("{} {w_in}→{w_out}: {ms:.4} ms", site.name));
            ms
        });
        measured.push((plan, table.clone()));
        tables.push(table);
    }
    observer.end();
    SiteTables {
        key,
        tables,
        measurements: total,
    }
}

/// FNV-1a, for cache file names (stable across runs and platforms).
pub fn fingerprint(text: &str) -> u64 {
    text.bytes().fold(0xcbf29ce484222325u64, |h, b| {
        (h ^ b as u64).wrapping_mul(0x100000001b3)
    })
}

/// The cache key: everything the tables depend on.
pub fn cache_key(
    device_name: &str,
    driver: &str,
    kind: Kind,
    options: &TableOptions,
    sites: &[CostSite],
    groups: &[Group],
) -> String {
    let model = serde_json::to_string(&(
        sites,
        groups
            .iter()
            .map(|g| (g.len, g.unit_width))
            .collect::<Vec<_>>(),
    ))
    .unwrap_or_default();
    format!(
        "device={device_name}|driver={driver}|libtorch=2.11.0|dtype={kind:?}|batch={}|grid={}|runs={}+{}{}|model={:016x}",
        options.batch,
        options.grid_step,
        options.protocol.warmup_runs,
        options.protocol.timed_runs,
        if options.protocol.cuda_graphs {
            "|graphs"
        } else {
            ""
        },
        fingerprint(&model)
    )
}

/// Loads cached tables for `key` from `dir`, if present and for the same key.
pub fn load_cached(dir: &Path, key: &str) -> Option<SiteTables> {
    let path = dir.join(format!("{:016x}.json", fingerprint(key)));
    let value = crate::io::json::read_value(&path).ok()?;
    let tables: SiteTables = crate::io::json::parse(&path, value).ok()?;
    (tables.key == key).then_some(tables)
}

pub fn store_cached(dir: &Path, tables: &SiteTables) -> Result<()> {
    std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
    crate::io::json::write(
        &dir.join(format!("{:016x}.json", fingerprint(&tables.key))),
        tables,
    )
}

/// Table-driven site costs: linear interpolation in the measured tables, separable in the two
/// widths, vectorised over sites.
///
/// The value is the table's; the gradient is not the local segment's slope. Measured GPU
/// latency is a staircase in width (and noisy between neighbouring grid points), so a local
/// slope is often zero or negative at full width and the gates would never learn to shrink.
/// The gradient is the secant slope over a window of a quarter of the full width around the
/// current width, floored at zero (latency does not fall as width grows).
pub struct TableCost {
    in_x: Tensor,
    in_y: Tensor,
    in_full: Tensor,
    out_x: Tensor,
    out_y: Tensor,
    out_full: Tensor,
    full: Tensor,
}

/// Fraction of a side's full width over which the gradient's secant is taken.
const SECANT_WINDOW: f64 = 0.25;

/// Table value at `w` with the secant gradient described on [`TableCost`].
fn smoothed(xs: &Tensor, ys: &Tensor, side_full: &Tensor, w: &Tensor) -> Tensor {
    let value = interpolate(xs, ys, &w.detach());
    let slope = tch::no_grad(|| {
        let first = xs.select(1, 0);
        let half = side_full * SECANT_WINDOW;
        let lo = (w - &half).maximum(&first).minimum(side_full);
        let hi = (w + &half).minimum(side_full).maximum(&first);
        let span = (&hi - &lo).clamp_min(1e-6);
        ((interpolate(xs, ys, &hi) - interpolate(xs, ys, &lo)) / span).clamp_min(0.0)
    });
    value + slope * (w - w.detach())
}

/// `[n_sites, P]` padded rows: past the last point x keeps rising and y stays flat, so every
/// segment has a positive length.
fn padded(rows: &[(Vec<i64>, Vec<f64>)], device: Device) -> (Tensor, Tensor) {
    let width = rows.iter().map(|(x, _)| x.len()).max().unwrap_or(1).max(2);
    let mut xs = Vec::with_capacity(rows.len() * width);
    let mut ys = Vec::with_capacity(rows.len() * width);
    for (x, y) in rows {
        for i in 0..width {
            let last = x.len() - 1;
            xs.push(if i <= last {
                x[i] as f32
            } else {
                (x[last] + (i - last) as i64) as f32
            });
            ys.push(y[i.min(last)] as f32);
        }
    }
    let shape = [rows.len() as i64, width as i64];
    (
        Tensor::from_slice(&xs).view(shape).to_device(device),
        Tensor::from_slice(&ys).view(shape).to_device(device),
    )
}

/// Piecewise-linear `y(w)` per row; `w` `[n]`; differentiable in `w` (slope of its segment).
fn interpolate(xs: &Tensor, ys: &Tensor, w: &Tensor) -> Tensor {
    let last = xs.size()[1] - 1;
    let query = w.detach().unsqueeze(1).contiguous();
    let upper = query
        .searchsorted(xs, false, false, "left", None::<Tensor>)
        .clamp(1, last);
    let lower = &upper - 1;
    let (x0, x1) = (
        xs.gather(1, &lower, false).squeeze_dim(1),
        xs.gather(1, &upper, false).squeeze_dim(1),
    );
    let (y0, y1) = (
        ys.gather(1, &lower, false).squeeze_dim(1),
        ys.gather(1, &upper, false).squeeze_dim(1),
    );
    &y0 + (w - &x0) * (y1 - &y0) / (x1 - x0)
}

impl TableCost {
    pub fn new(tables: &SiteTables, device: Device) -> Self {
        let ins: Vec<(Vec<i64>, Vec<f64>)> = tables
            .tables
            .iter()
            .map(|t| (t.in_widths.clone(), t.in_ms.clone()))
            .collect();
        let outs: Vec<(Vec<i64>, Vec<f64>)> = tables
            .tables
            .iter()
            .map(|t| (t.out_widths.clone(), t.out_ms.clone()))
            .collect();
        let (in_x, in_y) = padded(&ins, device);
        let (out_x, out_y) = padded(&outs, device);
        let full: Vec<f32> = tables
            .tables
            .iter()
            .map(|t| t.full_ms.max(1e-9) as f32)
            .collect();
        let side = |widths: fn(&SiteTable) -> &Vec<i64>| -> Tensor {
            let last: Vec<f32> = tables
                .tables
                .iter()
                .map(|t| *widths(t).last().expect("a table has a point") as f32)
                .collect();
            Tensor::from_slice(&last).to_device(device)
        };
        TableCost {
            in_x,
            in_y,
            in_full: side(|t| &t.in_widths),
            out_x,
            out_y,
            out_full: side(|t| &t.out_widths),
            full: Tensor::from_slice(&full).to_device(device),
        }
    }
}

impl SiteCost for TableCost {
    fn total(&self, w_in: &Tensor, w_out: &Tensor, presence: &Tensor) -> Tensor {
        (smoothed(&self.in_x, &self.in_y, &self.in_full, w_in)
            * smoothed(&self.out_x, &self.out_y, &self.out_full, w_out)
            / &self.full
            * presence)
            .sum(Kind::Float)
    }
    fn name(&self) -> &'static str {
        "table"
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grid_has_unit_steps_and_full() {
        assert_eq!(grid(64, 8, 16), vec![8, 16, 32, 48, 64]);
        assert_eq!(grid(20, 4, 8), vec![4, 8, 16, 20]);
        assert_eq!(grid(8, 8, 8), vec![8]);
    }

    fn two_site_tables() -> SiteTables {
        SiteTables {
            key: "k".into(),
            measurements: 0,
            tables: vec![
                SiteTable {
                    name: "a".into(),
                    in_widths: vec![3],
                    in_ms: vec![2.0],
                    out_widths: vec![8, 16, 24],
                    out_ms: vec![1.0, 1.0, 2.0],
                    full_ms: 2.0,
                },
                SiteTable {
                    name: "b".into(),
                    in_widths: vec![8, 16, 24],
                    in_ms: vec![0.5, 1.5, 3.0],
                    out_widths: vec![10],
                    out_ms: vec![3.0],
                    full_ms: 3.0,
                },
            ],
        }
    }

    #[test]
    fn tables_interpolate_exactly_at_grid_points_and_linearly_between() {
        let cost = TableCost::new(&two_site_tables(), Device::Cpu);
        let opts = (Kind::Float, Device::Cpu);
        for (w, expected_a, expected_b) in [
            (8.0, 1.0, 0.5),
            (16.0, 1.0, 1.5),
            (24.0, 2.0, 3.0),
            (20.0, 1.5, 2.25),
        ] {
            let w_in = Tensor::from_slice(&[3.0f32, w]).to_kind(opts.0);
            let w_out = Tensor::from_slice(&[w, 10.0f32]);
            let total = cost
                .total(&w_in, &w_out, &Tensor::ones([2], opts))
                .double_value(&[]);
            // a: 2.0 · T_out(w) / 2.0; b: T_in(w) · 3.0 / 3.0.
            assert!(
                (total - (expected_a + expected_b)).abs() < 1e-5,
                "w {w}: {total}"
            );
        }
    }

    #[test]
    fn table_gradient_is_the_windowed_secant_and_never_negative() {
        let cost = TableCost::new(&two_site_tables(), Device::Cpu);
        let w = Tensor::from_slice(&[20.0f32]).set_requires_grad(true);
        let w_in = Tensor::cat(&[Tensor::from_slice(&[3.0f32]), w.shallow_clone()], 0);
        let w_out = Tensor::cat(&[w.shallow_clone(), Tensor::from_slice(&[10.0f32])], 0);
        cost.total(
            &w_in,
            &w_out,
            &Tensor::ones([2], (Kind::Float, Device::Cpu)),
        )
        .backward();
        // Window ±6 around 20, clamped to [8, 24]: a's secant (2 − 1)/10 · T_in/full = 0.1;
        // b's secant (3 − 1.25)/10 · T_out/full = 0.175.
        assert!(
            (w.grad().double_value(&[0]) - 0.275).abs() < 1e-6,
            "{}",
            w.grad().double_value(&[0])
        );
        // A table that falls with width (a staircase, or noise) still gives a gradient ≥ 0.
        let falling = SiteTables {
            key: "k".into(),
            measurements: 0,
            tables: vec![SiteTable {
                name: "c".into(),
                in_widths: vec![3],
                in_ms: vec![1.0],
                out_widths: vec![8, 16],
                out_ms: vec![2.0, 1.0],
                full_ms: 1.0,
            }],
        };
        let w = Tensor::from_slice(&[12.0f32]).set_requires_grad(true);
        TableCost::new(&falling, Device::Cpu)
            .total(
                &Tensor::from_slice(&[3.0f32]),
                &w,
                &Tensor::from_slice(&[1.0f32]),
            )
            .backward();
        assert_eq!(w.grad().double_value(&[0]), 0.0);
    }
}
