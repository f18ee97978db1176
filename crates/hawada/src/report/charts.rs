//! The charts of one run's report, from its records.

use super::plot::{Chart, Series};
use crate::export::search::Candidate;
use crate::run_dir::Summary;

type Points = Vec<(f64, f64)>;

/// `(file name, chart)` for every chart of a run's report.
pub fn run_charts<'a>(
    summary: &Summary,
    metrics: &[serde_json::Value],
    kept: &'a [(String, Points)],
    validation_label: &'a str,
) -> Vec<(&'static str, Chart<'a>)> {
    let mut charts = adapt_charts(summary, metrics, kept);
    charts.extend(finetune_charts(metrics, validation_label));
    charts.push(pareto_chart(&summary.search));
    charts
}

/// `(step, value)` of `key` on every line of `stage` in `metrics.jsonl`.
fn stage_points(metrics: &[serde_json::Value], stage: &str, key: &str) -> Points {
    metrics
        .iter()
        .filter(|m| m["stage"] == stage)
        .filter_map(|m| Some((m["step"].as_f64()?, m[key].as_f64()?)))
        .collect()
}

fn line(label: &str, color: u32, points: Points) -> Series<'_> {
    Series {
        label,
        color,
        points,
        dots: false,
    }
}

/// The gate training: KD, λ, latency (proxy, probes, target) and kept units against step.
fn adapt_charts<'a>(
    summary: &Summary,
    metrics: &[serde_json::Value],
    kept: &'a [(String, Points)],
) -> Vec<(&'static str, Chart<'a>)> {
    let adapt = |key: &str| stage_points(metrics, "adapt", key);
    let probes = adapt("real_ms");
    let target: Points = adapt("proxy_ms")
        .iter()
        .map(|&(x, _)| (x, summary.target_ms))
        .collect();
    vec![
        (
            "kd",
            Chart {
                title: "Gate training: KD loss",
                x_label: "step",
                y_label: "KD loss",
                series: vec![line("KD", 0x1f77b4, adapt("kd"))],
            },
        ),
        (
            "lambda",
            Chart {
                title: "Gate training: lambda (dual variable)",
                x_label: "step",
                y_label: "λ",
                series: vec![line("lambda", 0xff7f0e, adapt("lambda"))],
            },
        ),
        (
            "latency",
            Chart {
                title: "Latency vs step: proxy, measured probes, target",
                x_label: "step",
                y_label: "latency (ms)",
                series: vec![
                    line("proxy, expected widths", 0x2ca02c, adapt("proxy_ms")),
                    line("proxy, hard architecture", 0x17becf, adapt("kept_proxy_ms")),
                    Series {
                        label: "measured (probe)",
                        color: 0xd62728,
                        points: probes,
                        dots: true,
                    },
                    line("target", 0x7f7f7f, target),
                ],
            },
        ),
        (
            "kept",
            Chart {
                title: "Kept units per kind of site (at each probe)",
                x_label: "step",
                y_label: "kept units (%)",
                series: kept
                    .iter()
                    .zip([0x1f77b4, 0xff7f0e, 0x2ca02c, 0xd62728, 0x9467bd])
                    .map(|((kind, points), color)| Series {
                        label: kind.as_str(),
                        color,
                        points: points.clone(),
                        dots: false,
                    })
                    .collect(),
            },
        ),
    ]
}

/// The weight training: loss and calibration quality, one series per stage: the slim model's
/// fine-tune and, with `finetune.teacher_baseline` or `correct_teacher`, the whole teacher's (a
/// stage that did not log `key` has no points, and the chart leaves it out).
fn finetune_charts<'a>(
    metrics: &[serde_json::Value],
    validation_label: &'a str,
) -> Vec<(&'static str, Chart<'a>)> {
    let per_stage = |key: &str, dots: bool| -> Vec<Series<'a>> {
        [
            ("slim model", 0x9467bd, "finetune"),
            ("whole teacher, fine-tuned", 0x7f7f7f, "teacher-baseline"),
        ]
        .into_iter()
        .map(|(label, color, stage)| Series {
            label,
            color,
            points: stage_points(metrics, stage, key),
            dots,
        })
        .collect()
    };
    vec![
        (
            "finetune",
            Chart {
                // KD alone, or mixed with the labels' cross-entropy (`finetune.label_weight`).
                title: "Fine-tune: loss",
                x_label: "step",
                y_label: "loss",
                series: per_stage("loss", false),
            },
        ),
        (
            "validation",
            Chart {
                // `finetune.keep_best`: each stage ends with its best point here.
                title: "Fine-tune: quality on the calibration split",
                x_label: "step",
                y_label: validation_label,
                series: per_stage("validation", true),
            },
        ),
    ]
}

/// The export search: every measured candidate and the Pareto front.
pub fn pareto_chart(search: &[Candidate]) -> (&'static str, Chart<'static>) {
    let candidates: Points = search
        .iter()
        .map(|c| (c.latency_ms.mean, c.agreement))
        .collect();
    let mut pareto: Points = search
        .iter()
        .filter(|c| c.pareto)
        .map(|c| (c.latency_ms.mean, c.agreement))
        .collect();
    pareto.sort_by(|a, b| a.0.total_cmp(&b.0));
    (
        "pareto",
        Chart {
            title: "Export search: measured latency vs agreement",
            x_label: "measured latency (ms)",
            y_label: "agreement with the teacher (%)",
            series: vec![
                Series {
                    label: "candidates",
                    color: 0xff7f0e,
                    points: candidates,
                    dots: true,
                },
                // Dots over the candidates' (a front of one point has no line).
                Series {
                    label: "Pareto front",
                    color: 0x1f77b4,
                    points: pareto,
                    dots: true,
                },
            ],
        },
    )
}

/// Percent of each unit kind's units kept (heads, channels, …) at every probe of the gate
/// training, from the groups in `gates.json` and the kept counts in `metrics.jsonl`.
pub fn kept_by_kind(
    gates: Option<&serde_json::Value>,
    metrics: &[serde_json::Value],
) -> Vec<(String, Points)> {
    let groups: Vec<(String, f64)> = gates
        .and_then(|g| g.get("groups").and_then(|g| g.as_array()).cloned())
        .unwrap_or_default()
        .iter()
        .filter_map(|g| Some((g["kind"].as_str()?.to_string(), g["len"].as_f64()?)))
        .collect();
    let mut kinds: Vec<String> = groups.iter().map(|(k, _)| k.clone()).collect();
    kinds.sort();
    kinds.dedup();
    kinds
        .into_iter()
        .map(|kind| {
            let total: f64 = groups.iter().filter(|(k, _)| *k == kind).map(|g| g.1).sum();
            let points = metrics
                .iter()
                .filter(|m| m["stage"] == "adapt")
                .filter_map(|m| {
                    let counts = m["kept"].as_array()?;
                    let kept: f64 = counts
                        .iter()
                        .zip(&groups)
                        .filter(|(_, (k, _))| *k == kind)
                        .filter_map(|(c, _)| c.as_f64())
                        .sum();
                    Some((m["step"].as_f64()?, 100.0 * kept / total.max(1.0)))
                })
                .collect();
            (kind, points)
        })
        .collect()
}
