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

__device__ __forceinline__ uint32_t SiluMulPair(uint32_t gate2, uint32_t up2) {
  const float2 g = __bfloat1622float2(*reinterpret_cast<const __nv_bfloat162*>(&gate2));
  const float2 u = __bfloat1622float2(*reinterpret_cast<const __nv_bfloat162*>(&up2));
  __nv_bfloat162 r = __floats2bfloat162_rn(g.x / (1.0f + expf(-g.x)) * u.x, g.y / (1.0f + expf(-g.y)) * u.y);
  return *reinterpret_cast<uint32_t*>(&r);
}

// The same arithmetic, 4 elements (8 bytes) per load: for n % 4 == 0 and 8-byte aligned
// pointers (half the time of the scalar kernel at 8192 x 14336, by ncu on an H200).
static __global__ void SiluMulBf16x4Kernel(const uint2* gate, const uint2* up, uint2* out, int64_t n4) {
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < n4;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const uint2 g = gate[i], u = up[i];
    out[i] = make_uint2(SiluMulPair(g.x, u.x), SiluMulPair(g.y, u.y));
  }
}

absl::Status LaunchSiluMulBf16(const SiluMulBf16Args& args, cudaStream_t stream) {
  if (args.n < 0) return absl::InvalidArgumentError("SiluMulBf16: negative size");
  if (args.n == 0) return absl::OkStatus();
  const auto aligned8 = [](const void* p) { return reinterpret_cast<uintptr_t>(p) % 8 == 0; };
  if (args.n % 4 == 0 && aligned8(args.gate) && aligned8(args.up) && aligned8(args.out)) {
    const int64_t n4 = args.n / 4;
    const int64_t blocks = std::min<int64_t>((n4 + kSiluMulBf16BlockSize - 1) / kSiluMulBf16BlockSize, 1 << 16);
    SiluMulBf16x4Kernel<<<static_cast<unsigned>(blocks), kSiluMulBf16BlockSize, 0, stream>>>(
        static_cast<const uint2*>(static_cast<const void*>(args.gate)),
        static_cast<const uint2*>(static_cast<const void*>(args.up)), static_cast<uint2*>(static_cast<void*>(args.out)), n4);
    KVGATE_CUDA_RETURN_IF_ERROR(cudaGetLastError());
    return absl::OkStatus();
  }
  const int64_t blocks = std::min<int64_t>((args.n + kSiluMulBf16BlockSize - 1) / kSiluMulBf16BlockSize, 1 << 16);
  SiluMulBf16Kernel<<<static_cast<unsigned>(blocks), kSiluMulBf16BlockSize, 0, stream>>>(
      reinterpret_cast<const __nv_bfloat16*>(args.gate), reinterpret_cast<const __nv_bfloat16*>(args.up),
      reinterpret_cast<__nv_bfloat16*>(args.out), args.n);
  KVGATE_CUDA_RETURN_IF_ERROR(cudaGetLastError());
  return absl::OkStatus();
}

}  // namespace kvgate::ops
