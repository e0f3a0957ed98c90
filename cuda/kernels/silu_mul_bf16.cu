#include <cuda_bf16.h>

#include <algorithm>
#include <cstdint>

#include "cuda/kernels/cuda_check.h"
#include "cuda/kernels/silu_mul_bf16.cuh"

namespace kvgate::ops {

// Grid-stride; each element is read before it is written, so out may alias an input.
static __global__ void SiluMulBf16Kernel(const __nv_bfloat16* gate, const __nv_bfloat16* up,
                                         __nv_bfloat16* out, int64_t n) {
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const float g = __bfloat162float(gate[i]);
    const float u = __bfloat162float(up[i]);
    out[i] = __float2bfloat16_rn(g / (1.0f + expf(-g)) * u);
  }
}

absl::Status LaunchSiluMulBf16(const SiluMulBf16Args& args, cudaStream_t stream) {
  if (args.n < 0) return absl::InvalidArgumentError("SiluMulBf16: negative size");
  if (args.n == 0) return absl::OkStatus();
  const int64_t blocks = std::min<int64_t>((args.n + kSiluMulBf16BlockSize - 1) / kSiluMulBf16BlockSize, 1 << 16);
  SiluMulBf16Kernel<<<static_cast<unsigned>(blocks), kSiluMulBf16BlockSize, 0, stream>>>(
      reinterpret_cast<const __nv_bfloat16*>(args.gate), reinterpret_cast<const __nv_bfloat16*>(args.up),
      reinterpret_cast<__nv_bfloat16*>(args.out), args.n);
  KVGATE_CUDA_RETURN_IF_ERROR(cudaGetLastError());
  return absl::OkStatus();
}

}  // namespace kvgate::ops
