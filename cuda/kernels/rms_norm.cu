#include <cstdint>

#include "cuda/kernels/cuda_check.h"
#include "cuda/kernels/rms_norm.cuh"

namespace kvgate::ops {

// One block per row: sum of squares by warp shuffles, then one pass to scale. Each
// thread reads x[i] before writing out[i] of the same i, so out may alias x.
static __global__ void RmsNormKernel(const float* x, const float* weight, float* out, int dim,
                                     float eps) {
  __shared__ float warp_sums[kRmsNormBlockSize / 32];
  const int64_t row = blockIdx.x;
  const float* xr = x + row * dim;
  float* outr = out + row * dim;
  const int lane = threadIdx.x % 32;
  const int warp = threadIdx.x / 32;

  float sum = 0.0f;
  for (int i = threadIdx.x; i < dim; i += blockDim.x) sum += xr[i] * xr[i];
  for (int offset = 16; offset > 0; offset /= 2) sum += __shfl_xor_sync(0xffffffffu, sum, offset);
  if (lane == 0) warp_sums[warp] = sum;
  __syncthreads();
  if (warp == 0) {
    sum = lane < kRmsNormBlockSize / 32 ? warp_sums[lane] : 0.0f;
    for (int offset = 16; offset > 0; offset /= 2) sum += __shfl_xor_sync(0xffffffffu, sum, offset);
    if (lane == 0) warp_sums[0] = sum;
  }
  __syncthreads();
  const float denom = sqrtf(warp_sums[0] / static_cast<float>(dim) + eps);
  for (int i = threadIdx.x; i < dim; i += blockDim.x) outr[i] = xr[i] / denom * weight[i];
}

absl::Status LaunchRmsNorm(const RmsNormArgs& args, cudaStream_t stream) {
  if (args.rows < 0 || args.dim < 0) return absl::InvalidArgumentError("RmsNorm: negative size");
  if (args.rows == 0 || args.dim == 0) return absl::OkStatus();
  RmsNormKernel<<<args.rows, kRmsNormBlockSize, 0, stream>>>(args.x, args.weight, args.out,
                                                             args.dim, args.eps);
  KVGATE_CUDA_RETURN_IF_ERROR(cudaGetLastError());
  return absl::OkStatus();
}

}  // namespace kvgate::ops
