#include <cuda_bf16.h>

#include <cstdint>

#include "cuda/kernels/cuda_check.h"
#include "cuda/kernels/rms_norm_bf16.cuh"

namespace kvgate::ops {

// One block per row: sum of squares by warp shuffles, then one pass to scale and round.
static __global__ void RmsNormBf16Kernel(const float* x, const float* weight, __nv_bfloat16* out,
                                         int dim, float eps) {
  __shared__ float warp_sums[kRmsNormBf16BlockSize / 32];
  const int64_t row = blockIdx.x;
  const float* xr = x + row * dim;
  __nv_bfloat16* outr = out + row * dim;
  const int lane = threadIdx.x % 32;
  const int warp = threadIdx.x / 32;

  float sum = 0.0f;
  for (int i = threadIdx.x; i < dim; i += blockDim.x) sum += xr[i] * xr[i];
  for (int offset = 16; offset > 0; offset /= 2) sum += __shfl_xor_sync(0xffffffffu, sum, offset);
  if (lane == 0) warp_sums[warp] = sum;
  __syncthreads();
  if (warp == 0) {
    sum = lane < kRmsNormBf16BlockSize / 32 ? warp_sums[lane] : 0.0f;
    for (int offset = 16; offset > 0; offset /= 2) sum += __shfl_xor_sync(0xffffffffu, sum, offset);
    if (lane == 0) warp_sums[0] = sum;
  }
  __syncthreads();
  const float inv_rms = 1.0f / sqrtf(warp_sums[0] / static_cast<float>(dim) + eps);
  for (int i = threadIdx.x; i < dim; i += blockDim.x) {
    outr[i] = __float2bfloat16_rn(weight[i] * (xr[i] * inv_rms));
  }
}

absl::Status LaunchRmsNormBf16(const RmsNormBf16Args& args, cudaStream_t stream) {
  if (args.rows < 0 || args.dim < 0) return absl::InvalidArgumentError("RmsNormBf16: negative size");
  if (args.rows == 0 || args.dim == 0) return absl::OkStatus();
  RmsNormBf16Kernel<<<args.rows, kRmsNormBf16BlockSize, 0, stream>>>(
      args.x, args.weight, reinterpret_cast<__nv_bfloat16*>(args.out), args.dim, args.eps);
  KVGATE_CUDA_RETURN_IF_ERROR(cudaGetLastError());
  return absl::OkStatus();
}

}  // namespace kvgate::ops
