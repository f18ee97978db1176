//! Run outputs a person reads: `summary.json` (stable keys: add, never rename), PNG charts in
//! `plots/` drawn from `metrics.jsonl` and `summary.json`, and `report.html` showing both.
//! Computes nothing the run did not record.

mod plot;

use plot::{Chart, Series};

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
    /// The whole teacher fine-tuned with the slim model's loss and steps
    /// (`finetune.teacher_baseline`, or before everything else with `correct_teacher`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub teacher_finetuned: Option<f64>,
    /// The teacher the slim model was distilled from and is compared with (KL, agreement).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub distilled_from: Option<DistilledFrom>,
    /// Sequences the teacher sampled into the fine-tune's training data, beside the real ones
    /// (`finetune.teacher_samples`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub finetune_teacher_samples: Option<i64>,
    /// Mean KL(teacher ‖ slim) per prediction on the test split, nats; the teacher of
    /// `distilled_from`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub slim_kl_to_teacher: Option<f64>,
    /// Backbones: mean cosine similarity of the slim model's patch features to the teacher's on
    /// the test split, before and after fine-tuning.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub slim_patch_cosine_to_teacher: Option<PatchCosine>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub photos: Option<PhotoQuality>,
}

/// `quality.distilled_from`, named after the quality key of that teacher.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DistilledFrom {
    /// The teacher as loaded.
    Teacher,
    /// The whole teacher fine-tuned on the data first (`finetune.correct_teacher`).
    TeacherFinetuned,
}

/// Agreement with the teacher on the recipe's photo folder (`data.photos`): the cls cosine for a
/// backbone, top-1 agreement in percent for a classifier.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PhotoQuality {
    pub dir: String,
    pub images: i64,
    /// `cls_cosine_to_teacher` or `top1_agreement_percent`.
    pub metric: String,
    pub slim_before_finetune: f64,
    pub slim: f64,
}

/// Patch-feature cosine similarity to the teacher, before and after fine-tuning.
#[derive(Debug, Clone, Copy, Serialize, Deserialize)]
pub struct PatchCosine {
    pub before_finetune: f64,
    pub after_finetune: f64,
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
    /// How forwards were launched when timed: "eager" or "cuda_graph" (summaries written before
    /// this key existed were eager).
    #[serde(default = "eager")]
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
    /// Whether the slim model meets the target: its measured mean against `target_ms`, or for a
    /// relative target its ratio to keep-all measured alongside against the asked fraction.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target_met: Option<bool>,
    /// The timed shapes the latencies apply to.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub workload: Option<crate::model::Workload>,
}

fn eager() -> String {
    "eager".into()
}

impl Summary {
    pub fn write(&self, path: &Path) -> Result<()> {
        crate::io::hf_config::write(path, self)
    }

    /// The export search's pick: the slim model's architecture.
    pub fn picked(&self) -> Option<&Candidate> {
        self.search.iter().find(|c| c.picked)
    }
}

impl Quality {
    /// Decimals to print the metric with: cosines need four to differ; accuracy and perplexity
    /// read well with two.
    pub fn digits(&self) -> usize {
        if self.metric.contains("cosine") {
            4
        } else {
            2
        }
    }

    /// What `teacher_finetuned` is, in a table row: the baseline fine-tuned beside the slim
    /// model, or the corrected teacher the slim model learnt from.
    pub fn teacher_finetuned_label(&self) -> &'static str {
        if self.distilled_from == Some(DistilledFrom::TeacherFinetuned) {
            "teacher corrected first"
        } else {
            "teacher fine-tuned the same way"
        }
    }
}

/// Percent of each unit kind's units kept (heads, channels, …) at every probe of the gate
/// training, from the groups in `gates.json` and the kept counts in `metrics.jsonl`.
fn kept_by_kind(run_dir: &Path, metrics: &[serde_json::Value]) -> Vec<(String, Vec<(f64, f64)>)> {
    let groups: Vec<(String, f64)> = crate::io::hf_config::read_value(&run_dir.join("gates.json"))
        .ok()
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
    let line = |label, color, points| Series {
        label,
        color,
        points,
        dots: false,
    };
    let probes = stage_points("adapt", "real_ms");
    let target: Vec<(f64, f64)> = stage_points("adapt", "proxy_ms")
        .iter()
        .map(|&(x, _)| (x, summary.target_ms))
        .collect();
    let candidates: Vec<(f64, f64)> = summary
        .search
        .iter()
        .map(|c| (c.latency_ms.mean, c.agreement))
        .collect();
    let mut pareto: Vec<(f64, f64)> = summary
        .search
        .iter()
        .filter(|c| c.pareto)
        .map(|c| (c.latency_ms.mean, c.agreement))
        .collect();
    pareto.sort_by(|a, b| a.0.total_cmp(&b.0));
    let kept = kept_by_kind(run_dir, &metrics);
    let validation_label = summary.quality.metric.replacen("test_", "", 1);
    // One series per weight-training stage: the slim model's fine-tune and, with
    // `finetune.teacher_baseline` or `correct_teacher`, the whole teacher's (a stage that did not
    // log `key` has no points, and the chart leaves it out).
    let per_stage = |key: &str, dots: bool| -> Vec<Series> {
        [
            ("slim model", 0x9467bd, "finetune"),
            ("whole teacher, fine-tuned", 0x7f7f7f, "teacher-baseline"),
        ]
        .into_iter()
        .map(|(label, color, stage)| Series {
            label,
            color,
            points: stage_points(stage, key),
            dots,
        })
        .collect()
    };
    let charts = [
        (
            "kd",
            Chart {
                title: "Gate training: KD loss",
                x_label: "step",
                y_label: "KD loss",
                series: vec![line("KD", 0x1f77b4, stage_points("adapt", "kd"))],
            },
        ),
        (
            "lambda",
            Chart {
                title: "Gate training: lambda (dual variable)",
                x_label: "step",
                y_label: "λ",
                series: vec![line("lambda", 0xff7f0e, stage_points("adapt", "lambda"))],
            },
        ),
        (
            "latency",
            Chart {
                title: "Latency vs step: proxy, measured probes, target",
                x_label: "step",
                y_label: "latency (ms)",
                series: vec![
                    line(
                        "proxy, expected widths",
                        0x2ca02c,
                        stage_points("adapt", "proxy_ms"),
                    ),
                    line(
                        "proxy, hard architecture",
                        0x17becf,
                        stage_points("adapt", "kept_proxy_ms"),
                    ),
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
                y_label: &validation_label,
                series: per_stage("validation", true),
            },
        ),
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
        ),
    ];
    let plots = run_dir.join("plots");
    std::fs::create_dir_all(&plots).map_err(|e| Error::io(&plots, e))?;
    let mut images = String::new();
    for (name, chart) in &charts {
        // A run without validation (no `keep_best`) has nothing to draw there.
        if *name == "validation" && chart.series.iter().all(|s| s.points.is_empty()) {
            continue;
        }
        chart.write_png(&plots.join(format!("{name}.png")))?;
        let _ = write!(
            images,
            r#"<img src="plots/{name}.png" alt="{}">"#,
            chart.title
        );
    }
    let row = |name: &str, keep_all: String, slim: String| {
        format!("<tr><td>{name}</td><td>{keep_all}</td><td>{slim}</td></tr>")
    };
    let l = &summary.latency_ms;
    let digits = summary.quality.digits();
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
            format!("{:.digits$}", summary.quality.teacher),
            format!(
                "{:.digits$} (before fine-tune {:.digits$})",
                summary.quality.slim, summary.quality.slim_before_finetune
            ),
        ),
    ]
    .into_iter()
    .chain(summary.quality.teacher_finetuned.map(|q| {
        row(
            &format!("  {}", summary.quality.teacher_finetuned_label()),
            format!("{q:.digits$}"),
            "".into(),
        )
    }))
    .chain(summary.quality.slim_patch_cosine_to_teacher.map(|p| {
        row(
            "patch cosine to teacher",
            "1".into(),
            format!(
                "{:.4} (before fine-tune {:.4})",
                p.after_finetune, p.before_finetune
            ),
        )
    }))
    .chain(summary.quality.photos.as_ref().map(|p| {
        row(
            &format!("photos ({} in {}): {}", p.images, p.dir, p.metric),
            "".into(),
            format!(
                "{:.4} (before fine-tune {:.4})",
                p.slim, p.slim_before_finetune
            ),
        )
    }))
    .collect::<Vec<_>>()
    .join("");
    let html = format!(
        r#"<!doctype html><html><head><meta charset="utf-8"><title>HawAda report: {model}</title>
<style>body{{font-family:sans-serif;margin:2em;max-width:1200px}}table{{border-collapse:collapse}}td,th{{border:1px solid #ccc;padding:4px 10px}}.charts img{{margin:6px;border:1px solid #eee}}</style></head>
<body><h1>HawAda report: {model}</h1>
<p>family <b>{family}</b> · device <b>{device}</b> · dtype <b>{dtype}</b> · timing <b>{timing}</b> · target <b>{target:.3} ms</b> · speed-up <b>{speedup:.2}×</b> · wall {wall:.0} s · proxy ({cost}) MAPE {mape:.1}% Spearman {spearman:.3} (n={n})</p>
<table><tr><th></th><th>keep-all (teacher)</th><th>slim</th></tr>{table}</table>
<div class="charts">{images}</div></body></html>"#,
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
    );
    let path = run_dir.join("report.html");
    crate::io::write_atomic(&path, html.as_bytes()).map_err(|e| match e {
        Error::Io { source, .. } => Error::io(&path, source),
        other => other,
    })
}

/// A sweep's `sweep.html` (one row per target, linking its run directory) and charts in
/// `dir/plots/`: measured speed-up against the teacher agreement of each target's slim model
/// (before fine-tune, on the calibration split), and, for a real teacher, against its quality
/// metric before and after fine-tune, the teacher at 1×.
pub fn write_sweep_report(dir: &Path, sweep: &crate::sweep::Sweep) -> Result<()> {
    let charts = write_sweep_charts(dir, sweep)?;
    let real = !sweep.random_init;
    let first = sweep.points.first().map(|p| &p.summary);
    let digits = first.map_or(2, |s| s.quality.digits());
    let rows: String = sweep
        .points
        .iter()
        .map(|p| {
            let s = &p.summary;
            let agreement = s
                .picked()
                .map_or(String::new(), |c| format!("{:.2}", c.agreement));
            let quality = if real {
                format!(
                    "<td>{:.digits$}</td><td>{:.digits$}</td>",
                    s.quality.slim_before_finetune, s.quality.slim
                )
            } else {
                String::new()
            };
            format!(
                r#"<tr><td><a href="{dir}/">{target}×</a></td><td>{keep:.3}</td><td>{slim:.3}</td><td>{p95:.3}</td><td><b>{speedup:.2}×</b></td><td>{met}</td><td>{params}</td><td>{agreement}</td>{quality}<td>{wall:.0}</td></tr>"#,
                dir = p.run_dir,
                target = p.target_fraction,
                keep = s.latency_ms.keep_all.mean,
                slim = s.latency_ms.slim.mean,
                p95 = s.latency_ms.slim.p95,
                speedup = s.speedup,
                met = if s.target_met == Some(false) { "no" } else { "yes" },
                params = s.params.slim,
                wall = s.wall_s,
            )
        })
        .collect();
    let quality_head = match first {
        Some(s) if real => format!(
            "<th>{m} before fine-tune</th><th>{m} (teacher {t:.digits$})</th>",
            m = s.quality.metric,
            t = s.quality.teacher
        ),
        _ => String::new(),
    };
    let images: String = charts
        .iter()
        .map(|name| format!(r#"<img src="plots/{name}.png" alt="{name}">"#))
        .collect();
    let html = format!(
        r#"<!doctype html><html><head><meta charset="utf-8"><title>HawAda sweep: {recipe}</title>
<style>body{{font-family:sans-serif;margin:2em;max-width:1200px}}table{{border-collapse:collapse}}td,th{{border:1px solid #ccc;padding:4px 10px}}img{{margin:6px;border:1px solid #eee}}</style></head>
<body><h1>HawAda sweep: {recipe}</h1>
<p>{model} ({family}) on <b>{device}</b> · {dtype} · {timing} timing · teacher params {teacher_params}{random}</p>
<table><tr><th>target</th><th>keep-all ms</th><th>slim ms</th><th>slim p95 ms</th><th>speed-up</th><th>target met</th><th>slim params</th><th>agreement %</th>{quality_head}<th>wall s</th></tr>{rows}</table>
<div>{images}</div></body></html>"#,
        recipe = sweep.recipe,
        model = first.map_or("", |s| &s.model),
        family = first.map_or("", |s| &s.family),
        device = first.map_or("", |s| &s.device),
        dtype = first.map_or("", |s| &s.dtype),
        timing = first.map_or("", |s| &s.timing),
        teacher_params = first.map_or(0, |s| s.params.teacher),
        random = if real {
            ""
        } else {
            " · <b>random-init teacher: speed only</b>"
        },
    );
    let path = dir.join("sweep.html");
    crate::io::write_atomic(&path, html.as_bytes())
}

/// Draws the sweep charts; returns the names of those drawn.
fn write_sweep_charts(dir: &Path, sweep: &crate::sweep::Sweep) -> Result<Vec<&'static str>> {
    let plots = dir.join("plots");
    std::fs::create_dir_all(&plots).map_err(|e| Error::io(&plots, e))?;
    let mut points: Vec<&crate::sweep::SweepPoint> = sweep.points.iter().collect();
    points.sort_by(|a, b| a.summary.speedup.total_cmp(&b.summary.speedup));
    let at_speedup = |value: &dyn Fn(&Summary) -> Option<f64>| -> Vec<(f64, f64)> {
        points
            .iter()
            .filter_map(|p| Some((p.summary.speedup, value(&p.summary)?)))
            .collect()
    };
    let agreement = Chart {
        title: "Sweep: measured speed-up vs agreement with the teacher",
        x_label: "measured speed-up (×)",
        y_label: "agreement with the teacher (%)",
        series: vec![Series {
            label: "slim model (before fine-tune)",
            color: 0x1f77b4,
            points: at_speedup(&|s| Some(s.picked()?.agreement)),
            dots: true,
        }],
    };
    agreement.write_png(&plots.join("sweep-agreement.png"))?;
    if sweep.random_init {
        return Ok(vec!["sweep-agreement"]);
    }
    let Some(first) = points.first() else {
        return Ok(vec!["sweep-agreement"]);
    };
    let quality = &first.summary.quality;
    let from_teacher = |mut points: Vec<(f64, f64)>| {
        points.insert(0, (1.0, quality.teacher));
        points
    };
    let label = quality.metric.replacen("test_", "", 1);
    let mut series = vec![
        Series {
            label: "teacher (1x), slim fine-tuned",
            color: 0x9467bd,
            points: from_teacher(at_speedup(&|s| Some(s.quality.slim))),
            dots: false,
        },
        Series {
            label: "slim before fine-tune",
            color: 0xff7f0e,
            points: at_speedup(&|s| Some(s.quality.slim_before_finetune)),
            dots: true,
        },
    ];
    if let Some(q) = quality.teacher_finetuned {
        series.push(Series {
            label: "teacher fine-tuned the same way",
            color: 0x7f7f7f,
            points: vec![(1.0, q)],
            dots: true,
        });
    }
    Chart {
        title: "Sweep: measured speed-up vs quality",
        x_label: "measured speed-up (×)",
        y_label: &label,
        series,
    }
    .write_png(&plots.join("sweep-quality.png"))?;
    Ok(vec!["sweep-agreement", "sweep-quality"])
}
