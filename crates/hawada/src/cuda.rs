//! CUDA facts and CUDA graphs through the C++ shim (`csrc/cuda_shim.cpp`): tch exposes neither.
//! A [`CudaGraph`] records a fixed-shape workload once and replays it with one launch, removing
//! per-kernel CPU launch overhead (small batches, LLM decode steps).

use crate::error::{Error, Result};
use std::ffi::{c_char, c_int, c_void, CStr};
use tch::{Device, Tensor};

extern "C" {
    fn hawada_cuda_props(
        device: c_int,
        name: *mut c_char,
        name_len: c_int,
        total_memory_bytes: *mut usize,
        major: *mut c_int,
        minor: *mut c_int,
        multiprocessors: *mut c_int,
        err: *mut c_char,
        err_len: c_int,
    ) -> c_int;
    fn hawada_cuda_versions(runtime: *mut c_int, driver: *mut c_int) -> c_int;
    fn hawada_cudnn_set_benchmark_limit(limit: c_int);
    fn hawada_cuda_empty_cache();
    fn hawada_cuda_memory(
        device: c_int,
        allocated: *mut usize,
        reserved: *mut usize,
        peak_allocated: *mut usize,
        peak_reserved: *mut usize,
    ) -> c_int;
    fn hawada_cuda_reset_peak_memory(device: c_int);
    fn hawada_graph_new() -> *mut c_void;
    fn hawada_graph_free(graph: *mut c_void);
    fn hawada_graph_capture_begin(
        graph: *mut c_void,
        device: c_int,
        err: *mut c_char,
        err_len: c_int,
    ) -> c_int;
    fn hawada_graph_capture_end(graph: *mut c_void, err: *mut c_char, err_len: c_int) -> c_int;
    fn hawada_graph_replay(graph: *mut c_void, err: *mut c_char, err_len: c_int) -> c_int;
}

const ERR_LEN: usize = 1024;

/// The NUL-terminated text a shim call wrote into `buffer` (an error message, a name).
pub(crate) fn message(buffer: &[u8]) -> String {
    CStr::from_bytes_until_nul(buffer)
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_default()
}

/// What a CUDA device is.
#[derive(Debug, Clone, serde::Serialize)]
pub struct DeviceInfo {
    pub index: usize,
    /// The device's own name, e.g. "NVIDIA H100 80GB HBM3".
    pub name: String,
    pub total_memory_bytes: usize,
    pub compute_capability: (i32, i32),
    pub multiprocessors: i32,
    /// CUDA runtime and driver versions as integers (13000 = 13.0).
    pub cuda_runtime: i32,
    pub cuda_driver: i32,
}

/// Facts about CUDA device `index`; an error when there is none.
pub fn device_info(index: usize) -> Result<DeviceInfo> {
    if !tch::Cuda::is_available() || index >= tch::Cuda::device_count() as usize {
        return Err(Error::Device {
            device: format!("cuda:{index}"),
            reason: format!("libtorch sees {} CUDA device(s)", tch::Cuda::device_count()),
        });
    }
    let mut name = [0u8; 256];
    let mut err = [0u8; ERR_LEN];
    let (mut memory, mut major, mut minor, mut sms) = (0usize, 0, 0, 0);
    // SAFETY: every pointer is to a live local of the size passed beside it.
    let rc = unsafe {
        hawada_cuda_props(
            index as c_int,
            name.as_mut_ptr().cast(),
            name.len() as c_int,
            &mut memory,
            &mut major,
            &mut minor,
            &mut sms,
            err.as_mut_ptr().cast(),
            ERR_LEN as c_int,
        )
    };
    if rc != 0 {
        return Err(Error::Device {
            device: format!("cuda:{index}"),
            reason: message(&err),
        });
    }
    let (mut runtime, mut driver) = (0, 0);
    // SAFETY: two live out-parameters.
    unsafe { hawada_cuda_versions(&mut runtime, &mut driver) };
    Ok(DeviceInfo {
        index,
        name: message(&name),
        total_memory_bytes: memory,
        compute_capability: (major, minor),
        multiprocessors: sms,
        cuda_runtime: runtime,
        cuda_driver: driver,
    })
}

/// Turns on cuDNN benchmark mode for fixed shapes and lets it try every algorithm per shape
/// (`benchmark_limit = 0`; PyTorch's default tries 10): slower first calls, which warm-up
/// absorbs, for the fastest kernels afterwards.
pub fn tune_cudnn_for_fixed_shapes() {
    tch::Cuda::cudnn_set_benchmark(true);
    // SAFETY: sets a global integer in libtorch's context.
    unsafe { hawada_cudnn_set_benchmark_limit(0) };
}

/// Returns the caching allocator's unused device memory to the driver: after timing a pair of
/// models, the pools their CUDA graphs owned (a graph's pool is reused by no one else), which
/// otherwise pile up over an export search's candidates.
pub fn release_cached_memory(device: Device) {
    if device.is_cuda() {
        // SAFETY: no arguments; the allocator is initialised once CUDA is.
        unsafe { hawada_cuda_empty_cache() };
        if let Some(memory) = device_memory(device) {
            tracing::debug!(
                allocated_mib = memory.allocated_bytes >> 20,
                reserved_mib = memory.reserved_bytes >> 20,
                "device memory after release"
            );
        }
    }
}

/// What the caching allocator holds on a CUDA device, now and at its peak since
/// [`reset_peak_memory`].
#[derive(Debug, Clone, Copy, serde::Serialize, serde::Deserialize)]
pub struct DeviceMemory {
    pub allocated_bytes: usize,
    pub reserved_bytes: usize,
    pub peak_allocated_bytes: usize,
    pub peak_reserved_bytes: usize,
}

/// The allocator's figures for `device`; `None` on the CPU.
pub fn device_memory(device: Device) -> Option<DeviceMemory> {
    let Device::Cuda(index) = device else {
        return None;
    };
    let mut m = DeviceMemory {
        allocated_bytes: 0,
        reserved_bytes: 0,
        peak_allocated_bytes: 0,
        peak_reserved_bytes: 0,
    };
    // SAFETY: out-pointers to live fields.
    let rc = unsafe {
        hawada_cuda_memory(
            index as c_int,
            &mut m.allocated_bytes,
            &mut m.reserved_bytes,
            &mut m.peak_allocated_bytes,
            &mut m.peak_reserved_bytes,
        )
    };
    (rc == 0).then_some(m)
}

/// Starts a new peak for [`device_memory`] on `device` (nothing on the CPU).
pub fn reset_peak_memory(device: Device) {
    if let Device::Cuda(index) = device {
        // SAFETY: an integer argument; errors are swallowed by the shim.
        unsafe { hawada_cuda_reset_peak_memory(index as c_int) };
    }
}

/// A captured CUDA graph. Inputs read during capture must stay alive and be updated in place
/// (`copy_`) before a replay; the output returned by [`CudaGraph::capture`] is overwritten by
/// every replay.
pub struct CudaGraph {
    graph: *mut c_void,
}

// SAFETY: the graph is only touched through &self/&mut self methods; CUDA graphs may be replayed
// from any host thread.
unsafe impl Send for CudaGraph {}

impl CudaGraph {
    /// Warms `workload` up on a side stream, then captures one call of it. Returns the graph and
    /// the output tensor that replays write into.
    pub fn capture(
        device: Device,
        mut workload: impl FnMut() -> Tensor,
    ) -> Result<(CudaGraph, Tensor)> {
        let Device::Cuda(index) = device else {
            return Err(Error::Device {
                device: format!("{device:?}"),
                reason: "CUDA graphs need a CUDA device".into(),
            });
        };
        let _guard = tch::no_grad_guard();
        // Warm-up outside capture: cuDNN/cuBLAS pick algorithms and allocate workspaces, which
        // must not happen during capture.
        for _ in 0..3 {
            let _ = workload();
        }
        tch::Cuda::synchronize(index as i64);
        // SAFETY: a fresh graph object owned by the returned value.
        let graph = unsafe { hawada_graph_new() };
        if graph.is_null() {
            return Err(Error::Device {
                device: format!("cuda:{index}"),
                reason: "could not allocate a CUDA graph".into(),
            });
        }
        let graph = CudaGraph { graph };
        let mut err = [0u8; ERR_LEN];
        // SAFETY: live graph, error buffer of the given size.
        if unsafe {
            hawada_graph_capture_begin(
                graph.graph,
                index as c_int,
                err.as_mut_ptr().cast(),
                ERR_LEN as c_int,
            )
        } != 0
        {
            return Err(Error::Device {
                device: format!("cuda:{index}"),
                reason: format!("CUDA graph capture failed to start: {}", message(&err)),
            });
        }
        let output = workload();
        // SAFETY: as above; capture was begun on this graph.
        if unsafe {
            hawada_graph_capture_end(graph.graph, err.as_mut_ptr().cast(), ERR_LEN as c_int)
        } != 0
        {
            return Err(Error::Device {
                device: format!("cuda:{index}"),
                reason: format!("CUDA graph capture failed: {}", message(&err)),
            });
        }
        Ok((graph, output))
    }

    /// Replays the captured work (asynchronously, on the current stream's device).
    pub fn replay(&self) -> Result<()> {
        let mut err = [0u8; ERR_LEN];
        // SAFETY: live, captured graph.
        if unsafe { hawada_graph_replay(self.graph, err.as_mut_ptr().cast(), ERR_LEN as c_int) }
            != 0
        {
            return Err(Error::Device {
                device: "cuda".into(),
                reason: format!("CUDA graph replay failed: {}", message(&err)),
            });
        }
        Ok(())
    }
}

impl Drop for CudaGraph {
    fn drop(&mut self) {
        // SAFETY: allocated by hawada_graph_new, freed once.
        unsafe { hawada_graph_free(self.graph) };
    }
}
