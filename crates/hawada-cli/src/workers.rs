//! Data-parallel launch: `hawada run --gpus N` starts one worker process per GPU with the
//! variables torchrun would set, and each worker stops when its launcher is gone.

use anyhow::Context;
use std::process::ExitCode;

/// Set by `launch_workers` to its own pid: a worker that finds another parent (the launcher was
/// killed, even by SIGKILL) stops, rather than hold its GPU with no one waiting for it.
const LAUNCHER_PID: &str = "HAWADA_LAUNCHER_PID";

/// In a worker started by `launch_workers`, a thread that ends the process once the launcher is
/// gone (its parent pid changes when the launcher dies).
pub fn stop_when_launcher_dies() {
    let Some(launcher) = std::env::var(LAUNCHER_PID)
        .ok()
        .and_then(|pid| pid.parse::<u32>().ok())
    else {
        return;
    };
    std::thread::spawn(move || loop {
        if std::os::unix::process::parent_id() != launcher {
            eprintln!("hawada: the launcher (pid {launcher}) is gone; this worker stops");
            std::process::exit(1);
        }
        std::thread::sleep(std::time::Duration::from_millis(500));
    });
}

/// Starts `workers` copies of this command, one per GPU, with the variables torchrun would set
/// (a free local port for the rendezvous), and waits for them; the first to fail stops the rest.
pub fn launch_workers(workers: usize) -> anyhow::Result<ExitCode> {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|listener| listener.local_addr())
        .context("finding a free port for the workers' rendezvous")?
        .port();
    let exe = std::env::current_exe().context("locating the hawada binary")?;
    let mut children = Vec::with_capacity(workers);
    for rank in 0..workers {
        let child = std::process::Command::new(&exe)
            .args(std::env::args_os().skip(1))
            .env("WORLD_SIZE", workers.to_string())
            .env("LOCAL_WORLD_SIZE", workers.to_string())
            .env("RANK", rank.to_string())
            .env("LOCAL_RANK", rank.to_string())
            .env("MASTER_ADDR", "127.0.0.1")
            .env("MASTER_PORT", port.to_string())
            .env(LAUNCHER_PID, std::process::id().to_string())
            .spawn()
            .with_context(|| format!("starting worker {rank} of {workers}"))?;
        children.push(Some(child));
    }
    loop {
        let mut running = 0;
        for (rank, slot) in children.iter_mut().enumerate() {
            let Some(child) = slot else { continue };
            match child.try_wait().context("waiting for a worker")? {
                None => running += 1,
                Some(status) if status.success() => *slot = None,
                Some(status) => {
                    for other in children.iter_mut().flatten() {
                        let _ = other.kill();
                        let _ = other.wait();
                    }
                    anyhow::bail!(
                        "worker {rank} of {workers} failed ({status}); the others were stopped"
                    );
                }
            }
        }
        if running == 0 {
            return Ok(ExitCode::SUCCESS);
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
}
