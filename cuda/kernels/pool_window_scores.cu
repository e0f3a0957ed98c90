#include "cuda/kernels/pool_window_scores.cuh"

#include <cmath>
#include <string>

#include "cuda/cpu/reference_ops.h"
#include "cuda/kernels/cuda_check.h"

namespace kvgate::ops {
namespace {

constexpr int kThreads = 256;

__global__ void __launch_bounds__(kThreads) PoolWindowScoresKernel(PoolWindowScoresArgs a) {
  const int64_t index = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x;
  const int64_t heads = int64_t{a.num_layers} * a.num_kv_heads;
  if (index >= heads * a.n) return;
  const int64_t head = index / a.n;  // l * num_kv_heads + h
  const int j = static_cast<int>(index % a.n);
  const int group = a.num_q_heads / a.num_kv_heads, m = a.n - a.window, pad = a.kernel / 2;
  if (j >= m) {
    a.out[index] = INFINITY;
    return;
  }
  const int64_t layer = head / a.num_kv_heads, h = head % a.num_kv_heads;
  double group_sum = 0.0;
  for (int g = 0; g < group; ++g) {
    const float* mean = a.probs + (layer * a.num_q_heads + h * group + g) * a.n;
    double pooled = 0.0;
    for (int t = max(0, j - pad); t <= min(m - 1, j + pad); ++t) pooled = __dadd_rn(pooled, mean[t]);
    group_sum = __dadd_rn(group_sum, __ddiv_rn(pooled, a.kernel));
  }
  a.out[index] = __double2float_rn(__ddiv_rn(group_sum, group));
}

}  // namespace

absl::Status LaunchPoolWindowScores(const PoolWindowScoresArgs& args, cudaStream_t stream) {
  if (std::string error = PoolWindowScoresArgsError(args); !error.empty()) return absl::InvalidArgumentError(error);
  const int64_t total = int64_t{args.num_layers} * args.num_kv_heads * args.n;
  const int64_t blocks = (total + kThreads - 1) / kThreads;
  if (blocks > 0x7fffffff) return absl::InvalidArgumentError("PoolWindowScores: too many rows for one launch");
  PoolWindowScoresKernel<<<static_cast<unsigned>(blocks), kThreads, 0, stream>>>(args);
  KVGATE_CUDA_RETURN_IF_ERROR(cudaGetLastError());
  return absl::OkStatus();
}

}  // namespace kvgate::ops
