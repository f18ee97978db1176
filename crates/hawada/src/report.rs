//! Run outputs a person reads: `summary.json` (stable keys: add, never rename) and `report.html`
//! with inline SVG charts drawn from `metrics.jsonl` and `latency.json`. Computes nothing the run
//! did not record.

use crate::error::{Error, Result};
use crate::latency::measure::LatencyStats;
use serde::{Deserialize, Serialize};
use std::fmt::Write as _;
use std::path::Path;

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct LatencyPair {
    pub keep_all: LatencyStats,
    pub slim: LatencyStats,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Params {
    pub teacher: i64,
    pub slim: i64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Quality {
    /// e.g. `test_top1_accuracy_percent`.
    pub metric: String,
    pub teacher: f64,
    pub slim_before_finetune: f64,
    pub slim: f64,
    /// Mean KL(teacher ‖ slim) per prediction on the test split, nats.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub slim_kl_to_teacher: Option<f64>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ProxySummary {
    pub mape: f64,
    pub spearman: f64,
    pub n: usize,
    /// Which site cost the proxy used ("flops" or "table").
    pub cost: String,
}

/// One measured candidate architecture of the export.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Candidate {
    pub name: String,
    pub latency_ms: LatencyStats,
    pub params: i64,
    /// Agreement with the teacher on the calibration batch, percent.
    pub agreement: f64,
    pub widths: Vec<i64>,
    /// Measured mean latency at or under the target.
    pub meets_target: bool,
    /// On the Pareto front of (latency, agreement).
    pub pareto: bool,
    /// The exported architecture.
    pub picked: bool,
}

/// `summary.json`: the machine-readable result every run ends with.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Summary {
    pub family: String,
    pub model: String,
    pub device: String,
    pub dtype: String,
    pub target_ms: f64,
    pub latency_ms: LatencyPair,
    /// How forwards were launched when timed: "eager" or "cuda_graph".
    pub timing: String,
    pub speedup: f64,
    pub params: Params,
    pub quality: Quality,
    pub proxy: ProxySummary,
    /// Fidelity of each proxy on the same held-out sub-architectures.
    pub proxy_flops: crate::latency::proxy::Fidelity,
    pub proxy_table: crate::latency::proxy::Fidelity,
    pub search: Vec<Candidate>,
    pub wall_s: f64,
    /// Kept width per gate group of the exported model, `group name → channels`.
    pub slim_widths: Vec<(String, i64)>,
    pub adapt_steps: i64,
    /// The timed shapes the latencies apply to.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub workload: Option<crate::model::Workload>,
}

impl Summary {
    pub fn write(&self, path: &Path) -> Result<()> {
        crate::io::hf_config::write(path, self)
    }
}

struct Series<'a> {
    label: &'a str,
    color: &'a str,
    points: Vec<(f64, f64)>,
    dots: bool,
}

fn fmt_tick(v: f64) -> String {
    if v.abs() >= 100.0 {
        format!("{v:.0}")
    } else if v.abs() >= 1.0 {
        format!("{v:.2}")
    } else {
        format!("{v:.3}")
    }
}

/// A line chart as an SVG string: axes, four ticks per axis, one polyline (or dots) per series.
fn svg_chart(title: &str, x_label: &str, y_label: &str, series: &[Series<'_>]) -> String {
    let (w, h, left, right, top, bottom) = (560.0, 300.0, 60.0, 20.0, 30.0, 40.0);
    let all: Vec<(f64, f64)> = series
        .iter()
        .flat_map(|s| s.points.iter().copied())
        .filter(|(x, y)| x.is_finite() && y.is_finite())
        .collect();
    let mut svg = format!(
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" font-family="sans-serif" font-size="11"><rect width="100%" height="100%" fill="white"/><text x="{}" y="18" text-anchor="middle" font-size="14">{title}</text>"#,
        w / 2.0
    );
    if all.is_empty() {
        svg.push_str(r#"<text x="280" y="150" text-anchor="middle">no data</text></svg>"#);
        return svg;
    }
    let (mut x0, mut x1, mut y0, mut y1) = (f64::MAX, f64::MIN, f64::MAX, f64::MIN);
    for &(x, y) in &all {
        (x0, x1, y0, y1) = (x0.min(x), x1.max(x), y0.min(y), y1.max(y));
    }
    if x1 <= x0 {
        x1 = x0 + 1.0;
    }
    if y1 <= y0 {
        y1 = y0 + 1.0;
    }
    let pad = 0.05 * (y1 - y0);
    (y0, y1) = (y0 - pad, y1 + pad);
    let px = |x: f64| left + (x - x0) / (x1 - x0) * (w - left - right);
    let py = |y: f64| h - bottom - (y - y0) / (y1 - y0) * (h - top - bottom);
    let _ = write!(
        svg,
        r#"<line x1="{left}" y1="{}" x2="{}" y2="{}" stroke="black"/><line x1="{left}" y1="{top}" x2="{left}" y2="{}" stroke="black"/>"#,
        h - bottom,
        w - right,
        h - bottom,
        h - bottom
    );
    for i in 0..=4 {
        let fx = x0 + (x1 - x0) * i as f64 / 4.0;
        let fy = y0 + (y1 - y0) * i as f64 / 4.0;
        let _ = write!(
            svg,
            r#"<text x="{}" y="{}" text-anchor="middle">{}</text>"#,
            px(fx),
            h - bottom + 14.0,
            fmt_tick(fx)
        );
        let _ = write!(
            svg,
            r##"<text x="{}" y="{}" text-anchor="end">{}</text><line x1="{left}" y1="{}" x2="{}" y2="{}" stroke="#ddd"/>"##,
            left - 4.0,
            py(fy) + 4.0,
            fmt_tick(fy),
            py(fy),
            w - right,
            py(fy)
        );
    }
    let _ = write!(
        svg,
        r#"<text x="{}" y="{}" text-anchor="middle">{x_label}</text><text x="12" y="{}" text-anchor="middle" transform="rotate(-90 12 {})">{y_label}</text>"#,
        (left + w - right) / 2.0,
        h - 6.0,
        h / 2.0,
        h / 2.0
    );
    for (i, s) in series.iter().enumerate() {
        let pts: Vec<(f64, f64)> = s
            .points
            .iter()
            .copied()
            .filter(|(x, y)| x.is_finite() && y.is_finite())
            .collect();
        if s.dots {
            for (x, y) in &pts {
                let _ = write!(
                    svg,
                    r#"<circle cx="{:.1}" cy="{:.1}" r="3" fill="{}"/>"#,
                    px(*x),
                    py(*y),
                    s.color
                );
            }
        } else {
            let line: Vec<String> = pts
                .iter()
                .map(|(x, y)| format!("{:.1},{:.1}", px(*x), py(*y)))
                .collect();
            let _ = write!(
                svg,
                r#"<polyline fill="none" stroke="{}" stroke-width="1.5" points="{}"/>"#,
                s.color,
                line.join(" ")
            );
        }
        let _ = write!(
            svg,
            r#"<text x="{}" y="{}" fill="{}">{}</text>"#,
            w - right - 150.0,
            top + 14.0 * (i as f64 + 1.0),
            s.color,
            s.label
        );
    }
    svg.push_str("</svg>");
    svg
}

/// Writes `report.html` in `run_dir` from `metrics.jsonl`, `latency.json` and `summary.json`.
pub fn write_html(run_dir: &Path) -> Result<()> {
    let summary_path = run_dir.join("summary.json");
    let summary: Summary = crate::io::hf_config::parse(
        &summary_path,
        crate::io::hf_config::read_value(&summary_path)?,
    )?;
    let metrics = crate::train::MetricsLog::new(run_dir.join("metrics.jsonl")).read();
    let stage_points = |stage: &str, key: &str| -> Vec<(f64, f64)> {
        metrics
            .iter()
            .filter(|m| m["stage"] == stage)
            .filter_map(|m| Some((m["step"].as_f64()?, m[key].as_f64()?)))
            .collect()
    };
    let mut charts = vec![
        svg_chart(
            "Gate training: KD loss",
            "step",
            "KD",
            &[Series {
                label: "KD",
                color: "#1f77b4",
                points: stage_points("adapt", "kd"),
                dots: false,
            }],
        ),
        svg_chart(
            "Gate training: λ",
            "step",
            "λ",
            &[Series {
                label: "λ",
                color: "#d62728",
                points: stage_points("adapt", "lambda"),
                dots: false,
            }],
        ),
        svg_chart(
            "Latency vs step",
            "step",
            "ms",
            &[
                Series {
                    label: "proxy",
                    color: "#2ca02c",
                    points: stage_points("adapt", "proxy_ms"),
                    dots: false,
                },
                Series {
                    label: "measured (probe)",
                    color: "#d62728",
                    points: stage_points("adapt", "real_ms"),
                    dots: true,
                },
                Series {
                    label: "target",
                    color: "#7f7f7f",
                    points: stage_points("adapt", "proxy_ms")
                        .iter()
                        .map(|&(x, _)| (x, summary.target_ms))
                        .collect(),
                    dots: false,
                },
            ],
        ),
        svg_chart(
            "Fine-tune: KD loss",
            "step",
            "KD",
            &[Series {
                label: "KD",
                color: "#9467bd",
                points: stage_points("finetune", "loss"),
                dots: false,
            }],
        ),
    ];
    let candidates: Vec<(f64, f64)> = summary
        .search
        .iter()
        .map(|c| (c.latency_ms.mean, c.agreement))
        .collect();
    charts.push(svg_chart(
        "Measured candidates: latency vs agreement",
        "ms",
        "agreement %",
        &[Series {
            label: "candidates",
            color: "#ff7f0e",
            points: candidates,
            dots: true,
        }],
    ));
    let row = |name: &str, keep_all: String, slim: String| {
        format!("<tr><td>{name}</td><td>{keep_all}</td><td>{slim}</td></tr>")
    };
    let l = &summary.latency_ms;
    let table = [
        row(
            "latency mean (ms)",
            format!("{:.3}", l.keep_all.mean),
            format!("{:.3}", l.slim.mean),
        ),
        row(
            "latency p95 (ms)",
            format!("{:.3}", l.keep_all.p95),
            format!("{:.3}", l.slim.p95),
        ),
        row(
            "parameters",
            summary.params.teacher.to_string(),
            summary.params.slim.to_string(),
        ),
        row(
            &summary.quality.metric,
            format!("{:.2}", summary.quality.teacher),
            format!(
                "{:.2} (before fine-tune {:.2})",
                summary.quality.slim, summary.quality.slim_before_finetune
            ),
        ),
    ]
    .join("");
    let html = format!(
        r#"<!doctype html><html><head><meta charset="utf-8"><title>HawAda report: {model}</title>
<style>body{{font-family:sans-serif;margin:2em;max-width:1200px}}table{{border-collapse:collapse}}td,th{{border:1px solid #ccc;padding:4px 10px}}.charts svg{{margin:6px;border:1px solid #eee}}</style></head>
<body><h1>HawAda report: {model}</h1>
<p>family <b>{family}</b> · device <b>{device}</b> · dtype <b>{dtype}</b> · timing <b>{timing}</b> · target <b>{target:.3} ms</b> · speed-up <b>{speedup:.2}×</b> · wall {wall:.0} s · proxy ({cost}) MAPE {mape:.1}% Spearman {spearman:.3} (n={n})</p>
<table><tr><th></th><th>keep-all (teacher)</th><th>slim</th></tr>{table}</table>
<div class="charts">{charts}</div></body></html>"#,
        model = summary.model,
        family = summary.family,
        device = summary.device,
        dtype = summary.dtype,
        timing = summary.timing,
        target = summary.target_ms,
        speedup = summary.speedup,
        wall = summary.wall_s,
        cost = summary.proxy.cost,
        mape = summary.proxy.mape,
        spearman = summary.proxy.spearman,
        n = summary.proxy.n,
        charts = charts.join("\n"),
    );
    let path = run_dir.join("report.html");
    crate::io::write_atomic(&path, html.as_bytes()).map_err(|e| match e {
        Error::Io { source, .. } => Error::io(&path, source),
        other => other,
    })
}
