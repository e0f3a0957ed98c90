#include <algorithm>
#include <cstdint>

#include "cuda/kernels/add.cuh"
#include "cuda/kernels/cuda_check.h"

namespace kvgate::ops {

static __global__ void AddKernel(float* x, const float* y, int64_t n) {
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    x[i] += y[i];
  }
}

absl::Status LaunchAdd(const AddArgs& args, cudaStream_t stream) {
  if (args.n < 0) return absl::InvalidArgumentError("Add: negative n");
  if (args.n == 0) return absl::OkStatus();
  const int64_t blocks = std::min<int64_t>((args.n + kAddBlockSize - 1) / kAddBlockSize, 65536);
  AddKernel<<<static_cast<unsigned>(blocks), kAddBlockSize, 0, stream>>>(args.x, args.y, args.n);
  KVGATE_CUDA_RETURN_IF_ERROR(cudaGetLastError());
  return absl::OkStatus();
}

}  // namespace kvgate::ops
