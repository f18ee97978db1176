//! The run directory's lock: one run at a time writes a directory. Two runs started into one
//! directory interleaved `metrics.jsonl` (836 lines for 460 steps, issue 24); the second now
//! stops at once. The lock file holds the owner's pid, so a lock left by a killed run is
//! recognised as stale and taken over.

use super::RunDir;
use crate::error::{Error, Result};
use std::io::Write;
use std::path::PathBuf;

/// Held while a run writes its directory; the lock file is removed on drop.
#[derive(Debug)]
pub struct RunLock {
    file: PathBuf,
}

impl RunLock {
    /// Takes the lock of `run_dir` (which must exist), taking over a stale one whose process
    /// is gone. Another live run holding it is an error naming its pid and the lock file.
    pub fn acquire(run_dir: &RunDir) -> Result<RunLock> {
        let file = run_dir.lock();
        let pid = std::process::id();
        for _ in 0..2 {
            match std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .open(&file)
            {
                Ok(mut handle) => {
                    writeln!(handle, "{pid}").map_err(|e| Error::io(&file, e))?;
                    return Ok(RunLock { file });
                }
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
                    let text = std::fs::read_to_string(&file).unwrap_or_default();
                    match text.trim().parse::<u32>() {
                        Ok(owner) if process_is_alive(owner) => {
                            return Err(Error::run_dir(
                                run_dir.root(),
                                format!(
                                    "in use by another hawada run (pid {owner}, lock file {}); wait for it to finish, use another --run-dir, or delete the lock file if that process is no hawada run",
                                    file.display()
                                ),
                            ));
                        }
                        // A killed run's lock, or one cut before its pid was written.
                        _ => {
                            tracing::warn!(lock = %file.display(), owner = text.trim(), "taking over a stale run directory lock");
                            std::fs::remove_file(&file).map_err(|e| Error::io(&file, e))?;
                        }
                    }
                }
                Err(e) => return Err(Error::io(&file, e)),
            }
        }
        Err(Error::run_dir(
            run_dir.root(),
            format!(
                "another run took the lock file {} while a stale one was removed; try again",
                file.display()
            ),
        ))
    }
}

impl Drop for RunLock {
    fn drop(&mut self) {
        // Only our own lock: a run that found it stale may have taken it over.
        let ours = std::fs::read_to_string(&self.file)
            .is_ok_and(|text| text.trim() == std::process::id().to_string());
        if ours {
            let _ = std::fs::remove_file(&self.file);
        }
    }
}

/// Whether process `pid` exists on this host (`/proc`, Linux); elsewhere a lock is assumed
/// live and the error says how to remove it.
fn process_is_alive(pid: u32) -> bool {
    if !std::path::Path::new("/proc/self").exists() {
        return true;
    }
    // A zombie (killed, not yet reaped) holds no lock.
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => !stat
            .rsplit_once(')')
            .is_some_and(|(_, rest)| rest.trim_start().starts_with('Z')),
        Err(_) => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_second_lock_is_refused_naming_the_owner_and_a_stale_one_is_taken_over() {
        let dir = std::env::temp_dir().join(format!("hawada-lock-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let run_dir = RunDir::new(&dir);
        let held = RunLock::acquire(&run_dir).unwrap();
        let err = RunLock::acquire(&run_dir).unwrap_err().to_string();
        assert!(
            err.contains(&format!("pid {}", std::process::id())) && err.contains("lock"),
            "{err}"
        );
        drop(held);
        assert!(!run_dir.lock().exists());
        // pid 0 is never a user process: a stale lock.
        std::fs::write(run_dir.lock(), "0\n").unwrap();
        let taken = RunLock::acquire(&run_dir).unwrap();
        assert_eq!(
            std::fs::read_to_string(run_dir.lock()).unwrap().trim(),
            std::process::id().to_string()
        );
        drop(taken);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
