#include <algorithm>
#include <cstdint>

#include "cuda/kernels/cuda_check.h"
#include "cuda/kernels/rope.cuh"

namespace kvgate::ops {

// Grid-stride over num_tokens * num_heads * half pairs. The rotation uses explicit
// round-to-nearest multiplies so nvcc does not contract it into FMAs, matching the
// plain host reference more closely.
static __global__ void RopeKernel(float* x, const int32_t* positions, const float* inv_freq,
                                  int num_heads, int head_dim, int64_t num_pairs) {
  const int half = head_dim / 2;
  for (int64_t idx = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; idx < num_pairs;
       idx += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int i = static_cast<int>(idx % half);
    const int64_t token_head = idx / half;
    const int64_t t = token_head / num_heads;
    const float angle = static_cast<float>(positions[t]) * inv_freq[i];
    float sin_a, cos_a;
    sincosf(angle, &sin_a, &cos_a);
    float* xh = x + token_head * head_dim;
    const float x0 = xh[i];
    const float x1 = xh[i + half];
    xh[i] = __fsub_rn(__fmul_rn(x0, cos_a), __fmul_rn(x1, sin_a));
    xh[i + half] = __fadd_rn(__fmul_rn(x1, cos_a), __fmul_rn(x0, sin_a));
  }
}

absl::Status LaunchRope(const RopeArgs& args, cudaStream_t stream) {
  if (args.num_tokens < 0 || args.num_heads < 0 || args.head_dim < 0) {
    return absl::InvalidArgumentError("Rope: negative size");
  }
  if (args.head_dim % 2 != 0) return absl::InvalidArgumentError("Rope: head_dim must be even");
  const int64_t num_pairs =
      static_cast<int64_t>(args.num_tokens) * args.num_heads * (args.head_dim / 2);
  if (num_pairs == 0) return absl::OkStatus();
  const int64_t blocks =
      std::min<int64_t>((num_pairs + kRopeBlockSize - 1) / kRopeBlockSize, 65536);
  RopeKernel<<<static_cast<unsigned>(blocks), kRopeBlockSize, 0, stream>>>(
      args.x, args.positions, args.inv_freq, args.num_heads, args.head_dim, num_pairs);
  KVGATE_CUDA_RETURN_IF_ERROR(cudaGetLastError());
  return absl::OkStatus();
}

}  // namespace kvgate::ops
