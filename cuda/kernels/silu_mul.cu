#include <algorithm>
#include <cstdint>

#include "cuda/kernels/cuda_check.h"
#include "cuda/kernels/silu_mul.cuh"

namespace kvgate::ops {

// Grid-stride; each element is read before it is written, so aliasing is safe.
static __global__ void SiluMulKernel(const float* gate, const float* up, float* out, int64_t n) {
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const float g = gate[i];
    out[i] = g / (1.0f + expf(-g)) * up[i];
  }
}

absl::Status LaunchSiluMul(const SiluMulArgs& args, cudaStream_t stream) {
  if (args.n < 0) return absl::InvalidArgumentError("SiluMul: negative n");
  if (args.n == 0) return absl::OkStatus();
  const int64_t blocks =
      std::min<int64_t>((args.n + kSiluMulBlockSize - 1) / kSiluMulBlockSize, 65536);
  SiluMulKernel<<<static_cast<unsigned>(blocks), kSiluMulBlockSize, 0, stream>>>(args.gate, args.up,
                                                                                 args.out, args.n);
  KVGATE_CUDA_RETURN_IF_ERROR(cudaGetLastError());
  return absl::OkStatus();
}

}  // namespace kvgate::ops
