//! `finetune.keep_best`: weight training scores the model at every checkpoint and ends with the
//! best-scoring weights, which a resume of the finished stage loads too.

#![allow(clippy::unwrap_used)] // tests: a failed unwrap is a failed test

use hawada::dist::Workers;
use hawada::families::llama::{Llama, LlamaConfig};
use hawada::model::Family;
use hawada::progress::Silent;
use hawada::run_dir::MetricsLog;
use hawada::train::{train_weights, Objective, Validation, WeightTraining};
use std::cell::RefCell;
use std::collections::BTreeMap;
use std::path::Path;
use tch::{Device, Kind, Tensor};

fn weights(model: &dyn Family) -> BTreeMap<String, Tensor> {
    model
        .var_store()
        .variables()
        .into_iter()
        .map(|(name, t)| (name, t.detach().copy()))
        .collect()
}

fn same(a: &BTreeMap<String, Tensor>, b: &BTreeMap<String, Tensor>) -> bool {
    a.len() == b.len() && a.iter().all(|(name, t)| t.equal(&b[name]))
}

fn tiny_llama() -> Box<dyn Family> {
    tch::manual_seed(5);
    Box::new(Llama::new(LlamaConfig::tiny(), Device::Cpu, Path::new("test")).unwrap())
}

#[test]
fn training_ends_with_the_best_scoring_checkpoint_and_a_resume_keeps_it() {
    let dir = tempfile::tempdir().unwrap();
    let metrics = MetricsLog::new(dir.path().join("metrics.jsonl"));
    let tokens = Tensor::randint(64, [4, 9], (Kind::Int64, Device::Cpu));
    // Scores of the checkpoints after steps 2, 4 and 6 (lower is better): the second is best.
    let scores = [5.0, 1.0, 3.0];
    let scored = RefCell::new(Vec::new());
    let score = |model: &dyn Family| {
        let mut scored = scored.borrow_mut();
        scored.push(weights(model));
        scores[scored.len() - 1]
    };
    let workers = Workers::single();
    let opts = WeightTraining {
        stage: "finetune",
        steps: 6,
        lr: 0.01,
        checkpoint_every: 2,
        checkpoint_dir: &dir.path().join("checkpoints"),
        seed: 0,
        workers: &workers,
        keep_best: Some(Validation {
            score: &score,
            higher_is_better: false,
        }),
    };
    let train = |model: &mut dyn Family| {
        let mut next = || (tokens.narrow(1, 0, 8), tokens.narrow(1, 1, 8));
        train_weights(
            model,
            Objective::Labels,
            &mut next,
            &opts,
            &metrics,
            &Silent,
        )
        .unwrap();
    };
    let mut model = tiny_llama();
    let start = weights(model.as_ref());
    train(model.as_mut());
    let snapshots = scored.take();
    assert_eq!(snapshots.len(), 3);
    assert!(
        !same(&snapshots[1], &snapshots[2]),
        "training moved the weights"
    );
    assert!(!same(&start, &snapshots[1]));
    assert!(same(&weights(model.as_ref()), &snapshots[1]));
    assert!(!dir.path().join("checkpoints/best.safetensors").exists());
    let validation: Vec<(i64, f64)> = metrics
        .read()
        .iter()
        .filter(|m| m.get("validation").is_some())
        .map(|m| {
            (
                m["step"].as_i64().unwrap(),
                m["validation"].as_f64().unwrap(),
            )
        })
        .collect();
    assert_eq!(validation, vec![(1, 5.0), (3, 1.0), (5, 3.0)]);

    // A rerun finds the stage complete: it trains no step, and loads the kept weights.
    let mut resumed = tiny_llama();
    train(resumed.as_mut());
    assert!(scored.borrow().is_empty(), "no step ran again");
    assert!(same(&weights(resumed.as_ref()), &snapshots[1]));
    assert_eq!(
        metrics
            .read()
            .iter()
            .filter(|m| m.get("validation").is_some())
            .count(),
        3,
        "the resume kept the validation lines"
    );
}
