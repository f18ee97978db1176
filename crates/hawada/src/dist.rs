//! Data parallelism: one process per GPU, joined through PyTorch's c10d (`csrc/dist_shim.cpp`):
//! a TCPStore rendezvous and an NCCL process group (gloo on CPU). Processes find each other
//! through the variables torchrun sets (`RANK`, `WORLD_SIZE`, `LOCAL_RANK`, `MASTER_ADDR`,
//! `MASTER_PORT`), so `hawada run --gpus N` and any launcher that sets them start the same
//! binary.
//!
//! Each rank trains on its rows of the global batch and gradients are averaged over ranks, so a
//! step equals the single-process step on the whole batch. Everything else that must agree (the
//! profile, each probe's measurement, the export's keep-set, the summary) is computed by rank 0,
//! which alone measures latency (on its own GPU) and writes files, and is read by the others from
//! the store.

use crate::cuda::message;
use crate::error::{Error, Result};
use serde::{de::DeserializeOwned, Serialize};
use std::ffi::{c_char, c_int, c_longlong, c_void, CString};
use tch::{Device, Kind, Tensor};

extern "C" {
    fn hawada_dist_new(
        backend: *const c_char,
        host: *const c_char,
        port: c_int,
        rank: c_int,
        world: c_int,
        timeout_s: c_int,
        err: *mut c_char,
        err_len: c_int,
    ) -> *mut c_void;
    fn hawada_dist_free(group: *mut c_void);
    fn hawada_dist_all_reduce_sum(
        group: *mut c_void,
        tensor: *mut c_void,
        err: *mut c_char,
        err_len: c_int,
    ) -> c_int;
    fn hawada_dist_store_set(
        group: *mut c_void,
        key: *const c_char,
        value: *const c_char,
        value_len: c_int,
        err: *mut c_char,
        err_len: c_int,
    ) -> c_int;
    fn hawada_dist_store_get(
        group: *mut c_void,
        key: *const c_char,
        out: *mut c_char,
        out_len: c_longlong,
        err: *mut c_char,
        err_len: c_int,
    ) -> c_longlong;
}

const ERR_LEN: usize = 2048;

/// How long a rank waits for the others (rank 0's profile and export search included) before
/// giving up.
const TIMEOUT_S: i32 = 4 * 3600;

/// At most this many elements are averaged in one call: bounds the extra memory of flattening
/// the gradients (DDP's buckets, larger).
const BUCKET_ELEMENTS: i64 = 1 << 26;

fn c_string(what: &str, text: &str) -> Result<CString> {
    CString::new(text).map_err(|_| Error::Invalid(format!("{what} contains a NUL byte: {text:?}")))
}

/// This process's place among the workers of one run.
pub struct Workers {
    pub rank: usize,
    pub world: usize,
    /// This process's GPU on its host (torchrun's `LOCAL_RANK`).
    pub local_rank: usize,
    group: Option<*mut c_void>,
}

impl Drop for Workers {
    fn drop(&mut self) {
        if let Some(group) = self.group {
            // SAFETY: the pointer came from hawada_dist_new and is freed once.
            unsafe { hawada_dist_free(group) };
        }
    }
}

fn env_number(name: &str) -> Result<Option<usize>> {
    match std::env::var(name) {
        Err(_) => Ok(None),
        Ok(text) => text.trim().parse().map(Some).map_err(|_| Error::Config {
            file: "environment".into(),
            field: name.into(),
            reason: format!("{text:?} is not a non-negative integer"),
        }),
    }
}

impl Workers {
    /// One process, no communication.
    pub fn single() -> Self {
        Workers {
            rank: 0,
            world: 1,
            local_rank: 0,
            group: None,
        }
    }

    /// Joins the run's workers described by torchrun's variables (one process when
    /// `WORLD_SIZE` is unset or 1). `device` chooses the backend: NCCL for CUDA, gloo for CPU.
    pub fn from_env(device: Device) -> Result<Self> {
        let world = env_number("WORLD_SIZE")?.unwrap_or(1);
        if world <= 1 {
            return Ok(Workers::single());
        }
        let missing = |name: &str| {
            Error::Config {
            file: "environment".into(),
            field: name.into(),
            reason: format!("WORLD_SIZE = {world} but {name} is not set (torchrun sets RANK, LOCAL_RANK, MASTER_ADDR and MASTER_PORT; or use `hawada run --gpus {world}`)"),
        }
        };
        let rank = env_number("RANK")?.ok_or_else(|| missing("RANK"))?;
        let local_rank = env_number("LOCAL_RANK")?.unwrap_or(rank);
        let port = env_number("MASTER_PORT")?.ok_or_else(|| missing("MASTER_PORT"))?;
        let host = std::env::var("MASTER_ADDR").map_err(|_| missing("MASTER_ADDR"))?;
        if rank >= world {
            return Err(Error::Config {
                file: "environment".into(),
                field: "RANK".into(),
                reason: format!("{rank} is not below WORLD_SIZE = {world}"),
            });
        }
        Workers::join(&host, port, rank, world, local_rank, device)
    }

    /// Joins `world` workers as `rank` through the store rank 0 serves at `host:port`.
    pub fn join(
        host: &str,
        port: usize,
        rank: usize,
        world: usize,
        local_rank: usize,
        device: Device,
    ) -> Result<Self> {
        let backend = if device.is_cuda() { "nccl" } else { "gloo" };
        let (c_backend, c_host) = (
            c_string("backend", backend)?,
            c_string("MASTER_ADDR", host)?,
        );
        let mut err = [0u8; ERR_LEN];
        // SAFETY: NUL-terminated strings and an error buffer of the length passed.
        let group = unsafe {
            hawada_dist_new(
                c_backend.as_ptr(),
                c_host.as_ptr(),
                port as c_int,
                rank as c_int,
                world as c_int,
                TIMEOUT_S,
                err.as_mut_ptr().cast(),
                ERR_LEN as c_int,
            )
        };
        if group.is_null() {
            return Err(Error::Device {
                device: format!("rank {rank} of {world}"),
                reason: format!(
                    "joining the {backend} process group at {host}:{port} failed: {}",
                    message(&err)
                ),
            });
        }
        tracing::info!(rank, world, local_rank, backend, "joined the workers");
        Ok(Workers {
            rank,
            world,
            local_rank,
            group: Some(group),
        })
    }

    /// Rank 0: the one that measures latency, writes files and decides.
    pub fn is_leader(&self) -> bool {
        self.rank == 0
    }

    /// The device this rank computes on: the recipe's CUDA device moved to `LOCAL_RANK` when
    /// there are several workers.
    pub fn device(&self, recipe_device: Device) -> Device {
        match recipe_device {
            Device::Cuda(_) if self.world > 1 => Device::Cuda(self.local_rank),
            other => other,
        }
    }

    /// This rank's rows of a global batch `[batch, …]` (the batch divides evenly: checked when
    /// the recipe is read).
    pub fn shard(&self, batch: &Tensor) -> Tensor {
        if self.world == 1 {
            return batch.shallow_clone();
        }
        let rows = batch.size()[0] / self.world as i64;
        batch.narrow(0, self.rank as i64 * rows, rows)
    }

    /// Replaces each tensor by its mean over the ranks (in place). Tensors are flattened into
    /// buckets of one dtype and device so that a step makes a few calls, not one per tensor.
    pub fn average(&self, tensors: &[Tensor]) -> Result<()> {
        let Some(group) = self.group else {
            return Ok(());
        };
        let mut rest: Vec<&Tensor> = tensors.iter().filter(|t| t.defined()).collect();
        while let Some(first) = rest.first() {
            let (kind, device) = (first.kind(), first.device());
            let mut bucket = Vec::new();
            let mut elements = 0;
            rest.retain(|t| {
                let fits = t.kind() == kind
                    && t.device() == device
                    && (bucket.is_empty() || elements + t.numel() as i64 <= BUCKET_ELEMENTS);
                if fits {
                    elements += t.numel() as i64;
                    bucket.push(*t);
                }
                !fits
            });
            let mut flat = Tensor::cat(
                &bucket.iter().map(|t| t.reshape([-1])).collect::<Vec<_>>(),
                0,
            );
            let mut err = [0u8; ERR_LEN];
            // SAFETY: `flat` is a live tensor for the duration of the call; the error buffer has
            // the length passed.
            let rc = unsafe {
                hawada_dist_all_reduce_sum(
                    group,
                    flat.as_mut_ptr().cast(),
                    err.as_mut_ptr().cast(),
                    ERR_LEN as c_int,
                )
            };
            if rc != 0 {
                return Err(self.failed("all-reduce", &err));
            }
            let flat = flat / self.world as f64;
            let mut offset = 0;
            for t in bucket {
                let n = t.numel() as i64;
                t.shallow_clone()
                    .copy_(&flat.narrow(0, offset, n).view_as(t));
                offset += n;
            }
        }
        Ok(())
    }

    /// Rank 0 computes `value` and publishes it under `key`; the other ranks wait for it and
    /// return the same value (or rank 0's error). Every rank returns what rank 0 computed.
    pub fn from_leader<T: Serialize + DeserializeOwned>(
        &self,
        key: &str,
        value: impl FnOnce() -> Result<T>,
    ) -> Result<T> {
        let Some(group) = self.group else {
            return value();
        };
        if self.is_leader() {
            let value = value();
            let published: std::result::Result<&T, String> =
                value.as_ref().map_err(|e| e.to_string());
            let bytes = serde_json::to_vec(&published)
                .map_err(|e| Error::Invalid(format!("{key} does not serialise: {e}")))?;
            self.store_set(group, key, &bytes)?;
            return value;
        }
        let bytes = self.store_get(group, key)?;
        let published: std::result::Result<T, String> = serde_json::from_slice(&bytes)
            .map_err(|e| Error::Invalid(format!("rank 0's {key} does not parse: {e}")))?;
        published.map_err(|reason| Error::Device {
            device: format!("rank {} of {}", self.rank, self.world),
            reason: format!("rank 0 failed at {key}: {reason}"),
        })
    }

    /// Ends the run together: rank 0 serves the store, so it waits until every other rank has
    /// read what it published before it may exit.
    pub fn finish(&self) -> Result<()> {
        let Some(group) = self.group else {
            return Ok(());
        };
        if self.is_leader() {
            for rank in 1..self.world {
                self.store_get(group, &format!("finished-{rank}"))?;
            }
            Ok(())
        } else {
            self.store_set(group, &format!("finished-{}", self.rank), b"1")
        }
    }

    fn store_set(&self, group: *mut c_void, key: &str, bytes: &[u8]) -> Result<()> {
        let c_key = c_string("store key", key)?;
        let mut err = [0u8; ERR_LEN];
        // SAFETY: key is NUL-terminated; `bytes` is live for the call with its length passed.
        let rc = unsafe {
            hawada_dist_store_set(
                group,
                c_key.as_ptr(),
                bytes.as_ptr().cast(),
                bytes.len() as c_int,
                err.as_mut_ptr().cast(),
                ERR_LEN as c_int,
            )
        };
        if rc != 0 {
            return Err(self.failed(&format!("publishing {key}"), &err));
        }
        Ok(())
    }

    /// Waits until `key` is set in the store and returns its value.
    fn store_get(&self, group: *mut c_void, key: &str) -> Result<Vec<u8>> {
        let c_key = c_string("store key", key)?;
        let mut err = [0u8; ERR_LEN];
        let mut buffer = vec![0u8; 1 << 16];
        loop {
            // SAFETY: key is NUL-terminated; the output and error buffers have the lengths passed.
            let len = unsafe {
                hawada_dist_store_get(
                    group,
                    c_key.as_ptr(),
                    buffer.as_mut_ptr().cast(),
                    buffer.len() as c_longlong,
                    err.as_mut_ptr().cast(),
                    ERR_LEN as c_int,
                )
            };
            if len < 0 {
                return Err(self.failed(&format!("waiting for {key}"), &err));
            }
            if len as usize > buffer.len() {
                buffer.resize(len as usize, 0);
                continue;
            }
            buffer.truncate(len as usize);
            return Ok(buffer);
        }
    }

    fn failed(&self, what: &str, err: &[u8]) -> Error {
        Error::Device {
            device: format!("rank {} of {}", self.rank, self.world),
            reason: format!("{what} failed: {}", message(err)),
        }
    }
}

/// Scalars (0-dim tensors, e.g. a step's losses) averaged over the ranks and read to the host,
/// so that every rank logs and decides on the same values.
pub fn averaged_scalars<const N: usize>(
    workers: &Workers,
    values: [&Tensor; N],
) -> Result<[f64; N]> {
    let stacked = Tensor::stack(&values.map(|v| v.detach().to_kind(Kind::Float)), 0);
    workers.average(std::slice::from_ref(&stacked))?;
    let host = Vec::<f64>::try_from(&stacked.to_kind(Kind::Double))
        .map_err(|e| Error::Invalid(format!("averaged losses: {e}")))?;
    Ok(std::array::from_fn(|i| host[i]))
}
