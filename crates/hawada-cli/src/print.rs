//! What the commands print: result tables of a run, a sweep and a profile, and the device facts.

use hawada::recipe::Recipe;
use hawada::run_dir::{Evaluation, Export, FinetuneRecord, Profile, RunDir, Summary, Sweep};
use std::path::Path;

pub fn print_sweep(sweep: &Sweep, dir: &Path) {
    println!();
    println!("HawAda sweep: {}", sweep.recipe);
    let metric = sweep.points.first().map(|p| &p.summary.quality);
    let digits = metric.map_or(2, |q| q.digits());
    let quality = match metric {
        Some(q) if !sweep.random_init => format!(
            "{}: teacher {:.digits$}; slim before → after fine-tune",
            q.metric, q.teacher
        ),
        _ => "(random-init teacher: speed only)".to_string(),
    };
    println!(
        "{:>7} {:>11} {:>9} {:>9} {:>12} {:>11}   {quality}",
        "target", "keep-all ms", "slim ms", "speed-up", "params", "agreement %"
    );
    for p in &sweep.points {
        let s = &p.summary;
        let agreement = s.picked().map_or(0.0, |c| c.agreement);
        let quality = if sweep.random_init {
            String::new()
        } else {
            format!(
                "{:.digits$} → {:.digits$}",
                s.quality.slim_before_finetune, s.quality.slim
            )
        };
        println!(
            "{:>7} {:>11.3} {:>9.3} {:>8.2}× {:>12} {:>11.2}   {quality}",
            p.target_fraction,
            s.latency_ms.keep_all.mean,
            s.latency_ms.slim.mean,
            s.speedup,
            s.params.slim,
            agreement
        );
    }
    println!(
        "sweep directory: {} (sweep.html, sweep.json, plots/sweep-*.png; each target's run in t<fraction>/)",
        dir.display()
    );
}

pub fn print_table(s: &Summary, run_dir: &Path) {
    let l = &s.latency_ms;
    println!();
    println!(
        "HawAda run: {} ({}) on {} [{}, {} timing], target {:.3} ms",
        s.model, s.family, s.device, s.dtype, s.timing, s.target_ms
    );
    println!("{:<28} {:>14} {:>14}", "", "keep-all", "slim");
    println!(
        "{:<28} {:>14.3} {:>14.3}",
        "latency mean (ms)", l.keep_all.mean, l.slim.mean
    );
    println!(
        "{:<28} {:>14.3} {:>14.3}",
        "latency p95 (ms)", l.keep_all.p95, l.slim.p95
    );
    println!(
        "{:<28} {:>14} {:>14}",
        "parameters", s.params.teacher, s.params.slim
    );
    let (metric, digits) = match s.quality.metric.as_str() {
        "test_perplexity" => ("test perplexity", 2),
        "test_cls_cosine_to_teacher" => ("cls cosine to teacher", 4),
        _ => ("test accuracy (%)", 2),
    };
    println!(
        "{:<28} {:>14.digits$} {:>14.digits$}",
        metric, s.quality.teacher, s.quality.slim
    );
    println!(
        "{:<28} {:>14} {:>14.digits$}",
        "  slim before fine-tune", "", s.quality.slim_before_finetune
    );
    if let Some(q) = s.quality.teacher_finetuned {
        let label = format!("  {}", s.quality.teacher_finetuned_label());
        println!("{label:<28} {q:>14.digits$}");
    }
    if let Some(p) = s.quality.slim_patch_cosine_to_teacher {
        println!(
            "{:<28} {:>14} {:>14.4}",
            "patch cosine to teacher", 1, p.after_finetune
        );
        println!(
            "{:<28} {:>14} {:>14.4}",
            "  slim before fine-tune", "", p.before_finetune
        );
    }
    if let Some(p) = &s.quality.photos {
        println!(
            "{:<28} {:>14} {:>14.4}   ({} photos, {})",
            "photos vs teacher", "", p.slim, p.images, p.metric
        );
        println!(
            "{:<28} {:>14} {:>14.4}",
            "  slim before fine-tune", "", p.slim_before_finetune
        );
    }
    if let Some(kl) = s.quality.slim_kl_to_teacher {
        println!("{:<28} {:>14} {:>14.4}", "  KL to teacher (nats)", "", kl);
    }
    println!(
        "speed-up {:.2}×, proxy ({}) MAPE {:.1}% Spearman {:.3} (n={}), wall {:.0} s",
        s.speedup, s.proxy.cost, s.proxy.mape, s.proxy.spearman, s.proxy.n, s.wall_s
    );
    if let Some(warning) = &s.search_warning {
        println!("warning: {warning}");
    }
    if let Some(noise) = &s.timing_noise {
        let verdict = match s.target_met {
            None => "whether the target is met is unclear (the export search measured the pick under it)",
            Some(_) => "the export search's measurement agrees with the verdict below",
        };
        println!(
            "timing was noisy ({noise}): other work shared the device, so the latencies above are unreliable; {verdict}. Run again in this run directory on an idle device to measure again"
        );
    }
    if s.target_met == Some(false) {
        println!(
            "target not reached: the slim model runs at {:.3}× keep-all, the fastest the gates and \
             the export search found (min_keep and the unit kinds bound what can go; see search \
             in summary.json)",
            l.slim.mean / l.keep_all.mean
        );
    }
    println!(
        "run directory: {} (summary.json, report.html)",
        run_dir.display()
    );
}

/// Every candidate the export search measured, the pick marked.
pub fn print_export(export: &Export, run_dir: &RunDir) {
    println!();
    println!(
        "{:<28} {:>10} {:>10} {:>12} {:>11}  meets  front",
        "candidate", "mean ms", "p95 ms", "params", "agreement %"
    );
    for c in &export.search_table {
        println!(
            "{}{:<27} {:>10.3} {:>10.3} {:>12} {:>11.2}  {:<5}  {}",
            if c.picked { "*" } else { " " },
            c.name,
            c.latency_ms.mean,
            c.latency_ms.p95,
            c.params,
            c.agreement,
            if c.meets_target { "yes" } else { "no" },
            if c.pareto { "yes" } else { "" }
        );
    }
    if let Some(warning) = &export.search_warning {
        println!("warning: {warning}");
    }
    println!(
        "* the pick: quality before fine-tune {:.4}; slim model in {}",
        export.quality,
        run_dir.slim_before_finetune().display()
    );
    println!(
        "run directory: {} (export.json, plots/pareto.png)",
        run_dir.root().display()
    );
}

/// Quality and KL to the teacher before and after `hawada finetune`.
pub fn print_finetune(record: &FinetuneRecord, run_dir: &RunDir) {
    println!();
    println!("{:<28} {:>14} {:>14}", "", "before", "after");
    println!(
        "{:<28} {:>14.4} {:>14.4}   (teacher {:.4})",
        record.metric, record.before, record.after, record.teacher_quality
    );
    if let (Some(before), Some(after)) = (record.kl_to_teacher_before, record.kl_to_teacher_after) {
        println!(
            "{:<28} {before:>14.4} {after:>14.4}",
            "KL to teacher (nats)"
        );
    }
    println!(
        "{} fine-tune steps; slim model in {}, finetune.json beside it",
        record.steps,
        run_dir.slim().display()
    );
}

/// A model's quality beside its teacher's.
pub fn print_evaluation(e: &Evaluation) {
    println!("{:<28} {:>14} {:>14}", "", "teacher", "model");
    println!(
        "{:<28} {:>14.4} {:>14.4}",
        e.metric, e.teacher_quality, e.quality
    );
    println!(
        "{:<28} {:>14} {:>14}",
        "parameters", e.teacher_params, e.params
    );
    if let Some(kl) = e.kl_to_teacher {
        println!("{:<28} {:>14} {kl:>14.4}", "KL to teacher (nats)", "");
    }
    println!("model {}, teacher {}", e.model, e.teacher);
}

/// The profile's keep-all latency, site tables and the fidelity of both proxies.
pub fn print_profile(recipe: &Recipe, p: &Profile, run_dir: &Path) {
    println!(
        "profile of `{}` on {} [{}]: keep-all {:.3} ms (p95 {:.3}), target {:.3} ms",
        recipe.name,
        p.device,
        recipe.dtype.name(),
        p.keep_all.mean,
        p.keep_all.p95,
        p.target_ms
    );
    println!(
        "site tables: {} measurements ({})",
        p.table_measurements, p.tables_key
    );
    println!(
        "{:<8} {:>8} {:>9} {:>4}   (held-out random sub-architectures)",
        "proxy", "MAPE %", "Spearman", "n"
    );
    for (name, f) in [("table", p.fidelity_table), ("flops", p.fidelity_flops)] {
        println!("{name:<8} {:>8.2} {:>9.3} {:>4}", f.mape, f.spearman, f.n);
    }
    println!(
        "gates train with the {} proxy; profile.json in {}",
        p.proxy_used,
        run_dir.display()
    );
}

pub fn print_info() -> anyhow::Result<()> {
    println!(
        "hawada {} (tch 0.24.0, libtorch 2.11.0)",
        env!("CARGO_PKG_VERSION")
    );
    println!("cpu threads: {}", tch::get_num_threads());
    println!("cudnn available: {}", tch::Cuda::cudnn_is_available());
    let count = tch::Cuda::device_count();
    if count == 0 {
        println!("cuda devices: none (CPU only)");
    }
    for index in 0..count as usize {
        let info = hawada::cuda::device_info(index)?;
        println!(
            "cuda:{index}: {} | {:.1} GiB | compute capability {}.{} | {} SMs | CUDA runtime {}.{} | driver {}.{}",
            info.name,
            info.total_memory_bytes as f64 / (1u64 << 30) as f64,
            info.compute_capability.0,
            info.compute_capability.1,
            info.multiprocessors,
            info.cuda_runtime / 1000,
            info.cuda_runtime % 1000 / 10,
            info.cuda_driver / 1000,
            info.cuda_driver % 1000 / 10
        );
    }
    Ok(())
}
