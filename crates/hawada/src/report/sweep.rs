//! A sweep's page and charts: one row per target, speed-up against agreement and quality.

use super::plot::{Chart, Series};
use crate::error::{Error, Result};
use crate::run_dir::{Summary, Sweep, SweepDir, SweepPoint};

/// A sweep's `sweep.html` (one row per target, linking its run directory) and charts in
/// `dir/plots/`: measured speed-up against the teacher agreement of each target's slim model
/// (before fine-tune, on the calibration split), and, for a real teacher, against its quality
/// metric before and after fine-tune, the teacher at 1×.
pub fn write_sweep_report(dir: &SweepDir, sweep: &Sweep) -> Result<()> {
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
    let path = dir.report();
    crate::io::write_atomic(&path, html.as_bytes())
}

/// Draws the sweep charts; returns the names of those drawn.
fn write_sweep_charts(dir: &SweepDir, sweep: &Sweep) -> Result<Vec<&'static str>> {
    let plots = dir.plots();
    std::fs::create_dir_all(&plots).map_err(|e| Error::io(&plots, e))?;
    let mut points: Vec<&SweepPoint> = sweep.points.iter().collect();
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
