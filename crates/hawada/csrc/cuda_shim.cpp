// The small C++ shim for what tch does not expose: CUDA graphs (at::cuda::CUDAGraph capture and
// replay) and device properties. Every entry point catches C++ exceptions and reports them as a
// message, so no exception crosses into Rust.
#include <ATen/ATen.h>
#include <ATen/Context.h>
#include <ATen/cuda/CUDAGraph.h>
#include <c10/cuda/CUDACachingAllocator.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime_api.h>

#include <cstring>
#include <optional>
#include <string>

namespace {
void write_error(char* err, int err_len, const std::string& message) {
  if (err == nullptr || err_len <= 0) return;
  std::strncpy(err, message.c_str(), static_cast<size_t>(err_len - 1));
  err[err_len - 1] = '\0';
}

struct Graph {
  at::cuda::CUDAGraph graph;
  std::optional<c10::cuda::CUDAStream> previous;
  int device = 0;
};
}  // namespace

extern "C" {

int hawada_cuda_props(int device, char* name, int name_len, size_t* total_memory_bytes, int* major, int* minor,
                      int* multiprocessors, char* err, int err_len) {
  try {
    cudaDeviceProp props{};
    cudaError_t status = cudaGetDeviceProperties(&props, device);
    if (status != cudaSuccess) {
      write_error(err, err_len, cudaGetErrorString(status));
      return 1;
    }
    write_error(name, name_len, props.name);
    *total_memory_bytes = props.totalGlobalMem;
    *major = props.major;
    *minor = props.minor;
    *multiprocessors = props.multiProcessorCount;
    return 0;
  } catch (const std::exception& e) {
    write_error(err, err_len, e.what());
    return 1;
  }
}

// How many cuDNN algorithms benchmark mode tries per convolution shape (PyTorch's
// torch.backends.cudnn.benchmark_limit; 0 = all of them).
void hawada_cudnn_set_benchmark_limit(int limit) { at::globalContext().setBenchmarkLimitCuDNN(limit); }

int hawada_cuda_versions(int* runtime, int* driver) {
  if (cudaRuntimeGetVersion(runtime) != cudaSuccess) return 1;
  if (cudaDriverGetVersion(driver) != cudaSuccess) return 1;
  return 0;
}

// Frees the caching allocator's unused blocks, those of pools that destroyed CUDA graphs left
// behind included (they are only reused by the graph that owned them).
void hawada_cuda_empty_cache() {
  try {
    c10::cuda::CUDACachingAllocator::emptyCache();
  } catch (...) {
  }
}

// Bytes the caching allocator has handed out and holds from the driver on `device`, now and at
// most since the last reset.
int hawada_cuda_memory(int device, size_t* allocated, size_t* reserved, size_t* peak_allocated,
                       size_t* peak_reserved) {
  try {
    auto stats = c10::cuda::CUDACachingAllocator::getDeviceStats(static_cast<c10::DeviceIndex>(device));
    auto all = static_cast<size_t>(c10::CachingAllocator::StatType::AGGREGATE);
    *allocated = stats.allocated_bytes[all].current;
    *reserved = stats.reserved_bytes[all].current;
    *peak_allocated = stats.allocated_bytes[all].peak;
    *peak_reserved = stats.reserved_bytes[all].peak;
    return 0;
  } catch (...) {
    return 1;
  }
}

void hawada_cuda_reset_peak_memory(int device) {
  try {
    c10::cuda::CUDACachingAllocator::resetPeakStats(static_cast<c10::DeviceIndex>(device));
  } catch (...) {
  }
}

void* hawada_graph_new() {
  try {
    return new Graph();
  } catch (...) {
    return nullptr;
  }
}

void hawada_graph_free(void* graph) { delete static_cast<Graph*>(graph); }

// Capture runs on a side stream (the legacy default stream cannot be captured); every tch op
// issued until capture_end is recorded instead of executed.
int hawada_graph_capture_begin(void* graph, int device, char* err, int err_len) {
  auto* g = static_cast<Graph*>(graph);
  try {
    c10::cuda::CUDAGuard guard(static_cast<c10::DeviceIndex>(device));
    g->device = device;
    g->previous = c10::cuda::getCurrentCUDAStream(device);
    auto stream = c10::cuda::getStreamFromPool(false, device);
    C10_CUDA_CHECK(cudaDeviceSynchronize());
    c10::cuda::setCurrentCUDAStream(stream);
    g->graph.capture_begin();
    return 0;
  } catch (const std::exception& e) {
    if (g->previous) c10::cuda::setCurrentCUDAStream(*g->previous);
    write_error(err, err_len, e.what());
    return 1;
  }
}

int hawada_graph_capture_end(void* graph, char* err, int err_len) {
  auto* g = static_cast<Graph*>(graph);
  try {
    g->graph.capture_end();
    if (g->previous) c10::cuda::setCurrentCUDAStream(*g->previous);
    C10_CUDA_CHECK(cudaDeviceSynchronize());
    return 0;
  } catch (const std::exception& e) {
    if (g->previous) c10::cuda::setCurrentCUDAStream(*g->previous);
    write_error(err, err_len, e.what());
    return 1;
  }
}

int hawada_graph_replay(void* graph, char* err, int err_len) {
  try {
    static_cast<Graph*>(graph)->graph.replay();
    return 0;
  } catch (const std::exception& e) {
    write_error(err, err_len, e.what());
    return 1;
  }
}

}  // extern "C"
