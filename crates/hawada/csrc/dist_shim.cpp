// PyTorch c10d for Rust: a TCPStore rendezvous and a process group (NCCL on CUDA, gloo on CPU),
// one per process, as torchrun's workers have. tch exposes none of c10d. Every function returns
// 0 on success or -1 with the libtorch message in `err`.
#define USE_C10D_GLOO
#define USE_C10D_NCCL
#include <torch/csrc/distributed/c10d/ProcessGroupGloo.hpp>
#include <torch/csrc/distributed/c10d/ProcessGroupNCCL.hpp>
#include <torch/csrc/distributed/c10d/TCPStore.hpp>

#include <chrono>
#include <cstring>
#include <string>
#include <vector>

namespace {

struct Group {
  c10::intrusive_ptr<c10d::Store> store;
  c10::intrusive_ptr<c10d::Backend> backend;
};

void write_error(const std::exception& e, char* err, int err_len) {
  if (err_len > 0) {
    std::strncpy(err, e.what(), err_len - 1);
    err[err_len - 1] = 0;
  }
}

}  // namespace

extern "C" {

// `backend` is "nccl" or "gloo"; rank 0 serves the store on host:port, the others connect.
void* hawada_dist_new(const char* backend, const char* host, int port, int rank, int world,
                      int timeout_s, char* err, int err_len) {
  try {
    const auto timeout = std::chrono::milliseconds(1000LL * timeout_s);
    c10d::TCPStoreOptions store_options;
    store_options.port = static_cast<std::uint16_t>(port);
    store_options.isServer = rank == 0;
    store_options.numWorkers = world;
    store_options.timeout = timeout;
    auto group = new Group();
    group->store = c10::make_intrusive<c10d::TCPStore>(host, store_options);
    if (std::string(backend) == "nccl") {
      auto options = c10d::ProcessGroupNCCL::Options::create();
      options->timeout = timeout;
      group->backend =
          c10::make_intrusive<c10d::ProcessGroupNCCL>(group->store, rank, world, options);
    } else {
      auto options = c10d::ProcessGroupGloo::Options::create(timeout);
      options->devices.push_back(c10d::ProcessGroupGloo::createDeviceForHostname(host));
      group->backend =
          c10::make_intrusive<c10d::ProcessGroupGloo>(group->store, rank, world, options);
    }
    return group;
  } catch (const std::exception& e) {
    write_error(e, err, err_len);
    return nullptr;
  }
}

// Shuts the backend down first: NCCL otherwise warns at exit that its communicators leak.
void hawada_dist_free(void* group) {
  auto g = static_cast<Group*>(group);
  try {
    g->backend->shutdown();
  } catch (...) {
  }
  delete g;
}

// Sums `tensor` over every rank, in place; returns when the result is ready on this rank's stream.
int hawada_dist_all_reduce_sum(void* group, at::Tensor* tensor, char* err, int err_len) {
  try {
    std::vector<at::Tensor> tensors{*tensor};
    c10d::AllreduceOptions options;
    options.reduceOp = c10d::ReduceOp::SUM;
    static_cast<Group*>(group)->backend->allreduce(tensors, options)->wait();
    return 0;
  } catch (const std::exception& e) {
    write_error(e, err, err_len);
    return -1;
  }
}

int hawada_dist_store_set(void* group, const char* key, const char* value, int value_len,
                          char* err, int err_len) {
  try {
    std::vector<uint8_t> bytes(value, value + value_len);
    static_cast<Group*>(group)->store->set(key, bytes);
    return 0;
  } catch (const std::exception& e) {
    write_error(e, err, err_len);
    return -1;
  }
}

// Waits until `key` is set (up to the store's timeout); copies at most `out_len` bytes of its
// value and returns the value's full length, or -1.
long long hawada_dist_store_get(void* group, const char* key, char* out, long long out_len,
                                char* err, int err_len) {
  try {
    auto bytes = static_cast<Group*>(group)->store->get(key);
    std::memcpy(out, bytes.data(), std::min<long long>(out_len, bytes.size()));
    return static_cast<long long>(bytes.size());
  } catch (const std::exception& e) {
    write_error(e, err, err_len);
    return -1;
  }
}

}  // extern "C"
