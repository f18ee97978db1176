# Sourced by the scripts/gpu-*.sh that run on the GPU machine (shared/GPU.md): puts the
# libraries of its PyTorch environment (libtorch, CUDA 13, cuDNN, NCCL) on the loader path, and
# defines `check_libraries SCRIPT BINARY`, which stops the calling script when the binary built
# here does not find a library it links there.
GPU_SITE=/opt/torch/.venv/lib/python3.12/site-packages
export LD_LIBRARY_PATH="$GPU_SITE/torch/lib:$GPU_SITE/nvidia/cu13/lib:$GPU_SITE/nvidia/cudnn/lib:$GPU_SITE/nvidia/nccl/lib:/usr/local/cuda/lib64${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"

check_libraries() {
  if ldd "$2" | grep 'not found'; then
    echo "$1: missing libraries (above)" >&2
    exit 1
  fi
}
