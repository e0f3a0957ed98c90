#include <cuda_bf16.h>

#include <algorithm>
#include <cstdint>

#include "cuda/kernels/cast_bf16.cuh"
#include "cuda/kernels/cuda_check.h"

namespace kvgate::ops {

static __global__ void CastToBf16Kernel(const float* x, __nv_bfloat16* out, int64_t n) {
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    out[i] = __float2bfloat16_rn(x[i]);
  }
}

absl::Status LaunchCastToBf16(const CastToBf16Args& args, cudaStream_t stream) {
  if (args.n < 0) return absl::InvalidArgumentError("CastToBf16: negative size");
  if (args.n == 0) return absl::OkStatus();
  const int64_t blocks = std::min<int64_t>((args.n + kCastToBf16BlockSize - 1) / kCastToBf16BlockSize, 1 << 16);
  CastToBf16Kernel<<<static_cast<unsigned>(blocks), kCastToBf16BlockSize, 0, stream>>>(
      args.x, reinterpret_cast<__nv_bfloat16*>(args.out), args.n);
  KVGATE_CUDA_RETURN_IF_ERROR(cudaGetLastError());
  return absl::OkStatus();
}

}  // namespace kvgate::ops
