#include <algorithm>
#include <cstdint>

#include "cuda/kernels/cuda_check.h"
#include "cuda/kernels/matmul_bias.cuh"

namespace kvgate::ops {

static __global__ void MatMulBiasKernel(float* y, const float* bias, int n, int64_t num_elements) {
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < num_elements;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    y[i] += bias[i % n];
  }
}

absl::Status LaunchMatMulBias(const MatMulArgs& args, cudaStream_t stream) {
  if (args.m < 0 || args.n < 0) return absl::InvalidArgumentError("MatMulBias: negative size");
  const int64_t num_elements = static_cast<int64_t>(args.m) * args.n;
  if (args.bias == nullptr || num_elements == 0) return absl::OkStatus();
  const int64_t blocks =
      std::min<int64_t>((num_elements + kMatMulBiasBlockSize - 1) / kMatMulBiasBlockSize, 65536);
  MatMulBiasKernel<<<static_cast<unsigned>(blocks), kMatMulBiasBlockSize, 0, stream>>>(
      args.y, args.bias, args.n, num_elements);
  KVGATE_CUDA_RETURN_IF_ERROR(cudaGetLastError());
  return absl::OkStatus();
}

}  // namespace kvgate::ops
