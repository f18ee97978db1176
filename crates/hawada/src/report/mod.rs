//! Run outputs a person reads: PNG charts in `plots/` drawn from `metrics.jsonl` and
//! `summary.json`, and `report.html` showing both; `sweep.html` and its charts for a sweep.
//! Reads the records of a run directory and draws; computes nothing the run did not record.

mod charts;
mod plot;
mod sweep;

pub use sweep::write_sweep_report;

use crate::error::{Error, Result};
use crate::run_dir::{Export, MetricsLog, RunDir, Summary};
use plot::Chart;
use std::fmt::Write as _;
use std::path::Path;

/// Writes `report.html` in `run_dir` from `metrics.jsonl`, `gates.json` and `summary.json`.
pub fn write_html(run_dir: &RunDir) -> Result<()> {
    let summary: Summary = crate::io::json::read(&run_dir.summary())?;
    let metrics = MetricsLog::new(run_dir.metrics()).read();
    let gates = crate::io::json::read_value(&crate::gates::description_path(&run_dir.gates())).ok();
    let validation_label = summary.quality.metric.replacen("test_", "", 1);
    let kept = charts::kept_by_kind(gates.as_ref(), &metrics);
    let charts = charts::run_charts(&summary, &metrics, &kept, &validation_label);
    let images = draw(&run_dir.plots(), &charts)?;
    let html = page(&summary, &summary_table(&summary), &images);
    let path = run_dir.report();
    crate::io::write_atomic(&path, html.as_bytes()).map_err(|e| match e {
        Error::Io { source, .. } => Error::io(&path, source),
        other => other,
    })
}

/// Draws the export search's Pareto chart of `export` into `plots/` of `run_dir` (what
/// `hawada export` leaves beside `export.json`).
pub fn write_export_chart(run_dir: &RunDir, export: &Export) -> Result<()> {
    draw(
        &run_dir.plots(),
        &[charts::pareto_chart(&export.search_table)],
    )
    .map(|_| ())
}

/// Draws `charts` into `plots/<name>.png`; returns the `<img>` tags that show them.
fn draw(plots: &Path, charts: &[(&str, Chart<'_>)]) -> Result<String> {
    std::fs::create_dir_all(plots).map_err(|e| Error::io(plots, e))?;
    let mut images = String::new();
    for (name, chart) in charts {
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
    Ok(images)
}

/// The keep-all vs slim table: latency, parameters, quality.
fn summary_table(summary: &Summary) -> String {
    let row = |name: &str, keep_all: String, slim: String| {
        format!("<tr><td>{name}</td><td>{keep_all}</td><td>{slim}</td></tr>")
    };
    let l = &summary.latency_ms;
    let digits = summary.quality.digits();
    [
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
    .join("")
}

fn page(summary: &Summary, table: &str, images: &str) -> String {
    format!(
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
    )
}
