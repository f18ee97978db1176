//! Data parallelism through c10d with the gloo backend on CPU: two workers, each on its half of
//! a global batch, average their gradients to the gradients one process computes on the whole
//! batch (gate logits and trained weights alike), and read the same averaged losses.

#![allow(clippy::unwrap_used)] // tests: a failed unwrap is a failed test

use hawada::dist::{averaged_scalars, Workers};
use hawada::families::llama::{Llama, LlamaConfig};
use hawada::gates::{GateOptions, Gates};
use hawada::latency::proxy::LatencyProxy;
use hawada::model::{Family, KeepSet, Workload};
use hawada::optim::seed_step;
use hawada::train::{gradients, step_losses, Lagrangian, Models};
use std::path::Path;
use std::sync::{Arc, Barrier, Mutex};
use tch::{Device, Tensor};

const TERMS: Lagrangian = Lagrangian {
    target_ms: 1.0,
    lambda: 0.7,
    rho: 0.1,
    kd_temperature: 2.0,
    mse_weight: 0.0,
};

/// The frozen teacher and a trainable keep-all student copy of it.
fn models() -> (Box<dyn Family>, Box<dyn Family>) {
    tch::manual_seed(3);
    let mut teacher: Box<dyn Family> =
        Box::new(Llama::new(LlamaConfig::tiny(), Device::Cpu, Path::new("test")).unwrap());
    // Off the 0.02 init, so the student's gradients are far from zero; in name order, so that
    // every call draws the same noise for the same tensor.
    tch::no_grad(|| {
        let variables: std::collections::BTreeMap<_, _> =
            teacher.var_store().variables().into_iter().collect();
        for (_, mut t) in variables {
            let _ = t.g_add_(&(Tensor::randn_like(&t) * 0.2));
        }
    });
    teacher.var_store_mut().freeze();
    let mut student = teacher.slim(&KeepSet::all(teacher.groups())).unwrap();
    student.var_store_mut().unfreeze();
    (teacher, student)
}

/// One gate-training step's gradients (gates, then student weights) and its KD and loss, on the
/// rows of `batch` this worker owns. The weights and the gate noise come from seeds (the noise
/// from the step's, as in `train::adapt`); `rng` serialises the forward halves because
/// libtorch's generator is process-wide.
fn step_gradients(workers: &Workers, batch: &Tensor, rng: &Mutex<()>) -> (Vec<Tensor>, [f64; 2]) {
    let only_this_thread_draws = rng.lock().unwrap();
    let (teacher, student) = models();
    let gates = Gates::new(teacher.groups(), GateOptions::default(), Device::Cpu).unwrap();
    let sites = teacher.cost_sites(Workload::Forward {
        batch: 4,
        tokens: 8,
    });
    let proxy = LatencyProxy::with_flop_cost(&sites, teacher.groups(), Device::Cpu);
    seed_step(11, "adapt", 0);
    let losses = step_losses(
        Models {
            teacher: teacher.as_ref(),
            student: student.as_ref(),
        },
        &gates,
        &proxy,
        &workers.shard(batch),
        &TERMS,
        None,
    );
    drop(only_this_thread_draws);
    losses.loss.backward();
    let mut grads = gradients(gates.var_store());
    grads.extend(gradients(student.var_store()));
    workers.average(&grads).unwrap();
    let scalars = averaged_scalars(workers, [&losses.kd, &losses.loss]).unwrap();
    (grads, scalars)
}

#[test]
fn averaged_gradients_of_two_gloo_workers_equal_one_process_on_the_whole_batch() {
    tch::manual_seed(5);
    let batch = Tensor::randint(64, [8, 8], (tch::Kind::Int64, Device::Cpu));
    let rng = Arc::new(Mutex::new(()));
    let (single, [single_kd, single_loss]) = step_gradients(&Workers::single(), &batch, &rng);
    assert!(single.len() > 10);

    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port() as usize;
    let joined = Arc::new(Barrier::new(2));
    let results: Vec<_> = (0..2)
        .map(|rank| {
            let (batch, rng, joined) = (batch.shallow_clone(), rng.clone(), joined.clone());
            std::thread::spawn(move || {
                let workers = Workers::join("127.0.0.1", port, rank, 2, rank, Device::Cpu).unwrap();
                joined.wait();
                let (grads, scalars) = step_gradients(&workers, &batch, &rng);
                (rank, grads, scalars)
            })
        })
        .collect::<Vec<_>>()
        .into_iter()
        .map(|thread| thread.join().unwrap())
        .collect();
    for (rank, grads, [kd, loss]) in results {
        assert_eq!(grads.len(), single.len());
        let mut worst = 0.0f64;
        for (g, reference) in grads.iter().zip(&single) {
            let scale = reference.abs().max().double_value(&[]).max(1e-6);
            worst = worst.max((g - reference).abs().max().double_value(&[]) / scale);
        }
        eprintln!(
            "rank {rank}: worst relative gradient difference {worst:.2e}, kd {kd} vs {single_kd}"
        );
        // f32, sums over 4 + 4 rows instead of 8: rounding only.
        assert!(worst < 1e-5, "rank {rank}: {worst}");
        assert!((kd - single_kd).abs() <= 1e-5 * single_kd.abs().max(1.0));
        assert!((loss - single_loss).abs() <= 1e-5 * single_loss.abs().max(1.0));
    }
}

#[test]
fn a_worker_without_its_rendezvous_variables_is_told_which_one_is_missing() {
    // One process reads WORLD_SIZE unset as a single worker; the launch variables are checked
    // only when several are asked for (set in a child process: the environment is global).
    if std::env::var_os("HAWADA_TEST_CHILD").is_some() {
        let err = Workers::from_env(Device::Cpu).err().unwrap().to_string();
        assert!(err.contains("RANK") && err.contains("--gpus 2"), "{err}");
        return;
    }
    assert_eq!(Workers::from_env(Device::Cpu).unwrap().world, 1);
    let out = std::process::Command::new(std::env::current_exe().unwrap())
        .args([
            "--exact",
            "a_worker_without_its_rendezvous_variables_is_told_which_one_is_missing",
        ])
        .env("HAWADA_TEST_CHILD", "1")
        .env("WORLD_SIZE", "2")
        .env_remove("RANK")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
}
