#include "cuda/kernels/window_attention_probs.cuh"

#include <cmath>
#include <string>
#include <type_traits>

#include "absl/status/status.h"
#include "cuda/cpu/reference_ops.h"
#include "cuda/kernels/cuda_check.h"

namespace kvgate::ops {
namespace {

constexpr int kWarps = 8;
constexpr int kThreads = kWarps * 32;
constexpr int kMaxHeadDim = 512;
constexpr int kKeysPerBlock = 64;    // pass 2: keys of one block
constexpr int kQueriesPerStage = 8;  // pass 2: window queries staged in shared memory at once

__device__ __forceinline__ float WarpSum(float v) {
  for (int offset = 16; offset > 0; offset /= 2) v += __shfl_xor_sync(0xffffffffu, v, offset);
  return v;
}

// Pass 1: one block per (window query i, query head h). Warps take keys in turn; every
// lane of a warp holds the same running (max, sum) of exp(logit - max).
template <int kMaxPerLane>  // head_dim <= 32 * kMaxPerLane
__global__ void __launch_bounds__(kThreads) WindowStatsKernel(WindowAttentionProbsArgs a, float* stats) {
  const int i = blockIdx.x, h = blockIdx.y;
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  const int d = a.head_dim, group = a.num_q_heads / a.num_kv_heads;
  const int pos = a.length - a.window + i;
  const float* q = a.q + (static_cast<int64_t>(i) * a.num_q_heads + h) * d;
  const float* keys = a.k_cache + static_cast<int64_t>(h / group) * a.capacity_tokens * d;
  float q_part[kMaxPerLane];
  for (int t = 0; t < kMaxPerLane; ++t) {
    const int c = lane + 32 * t;
    q_part[t] = c < d ? q[c] : 0.0f;
  }
  float max_logit = -INFINITY, sum = 0.0f;
  for (int j = warp; j <= pos; j += kWarps) {
    const float* k = keys + static_cast<int64_t>(j) * d;
    float dot = 0.0f;
    for (int t = 0; t < kMaxPerLane; ++t) {
      const int c = lane + 32 * t;
      if (c < d) dot = fmaf(q_part[t], k[c], dot);
    }
    const float logit = WarpSum(dot) * a.scale;
    if (logit > max_logit) {
      sum = sum * expf(max_logit - logit) + 1.0f;
      max_logit = logit;
    } else {
      sum += expf(logit - max_logit);
    }
  }
  __shared__ float warp_max[kWarps], warp_sum[kWarps];
  if (lane == 0) {
    warp_max[warp] = max_logit;
    warp_sum[warp] = sum;
  }
  __syncthreads();
  if (threadIdx.x == 0) {
    float m = -INFINITY;
    for (int w = 0; w < kWarps; ++w) m = fmaxf(m, warp_max[w]);
    float s = 0.0f;
    for (int w = 0; w < kWarps; ++w) {
      if (warp_sum[w] > 0.0f) s += warp_sum[w] * expf(warp_max[w] - m);
    }
    float* out = stats + (static_cast<int64_t>(h) * a.window + i) * 2;
    out[0] = m;
    out[1] = s;
  }
}

// Pass 2: one block per (64 keys, query head h); each warp owns 8 keys and, for each,
// sums the probabilities of the window queries that see it, in window order.
template <int kMaxPerLane>
__global__ void __launch_bounds__(kThreads) WindowProbsKernel(WindowAttentionProbsArgs a, const float* stats) {
  const int h = blockIdx.y;
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  const int d = a.head_dim, group = a.num_q_heads / a.num_kv_heads;
  const int first_key = blockIdx.x * kKeysPerBlock;
  const float* keys = a.k_cache + static_cast<int64_t>(h / group) * a.capacity_tokens * d;
  constexpr int kKeysPerWarp = kKeysPerBlock / kWarps;
  float k_part[kKeysPerWarp][kMaxPerLane];
  float acc[kKeysPerWarp];
  for (int r = 0; r < kKeysPerWarp; ++r) {
    acc[r] = 0.0f;
    const int j = first_key + warp * kKeysPerWarp + r;
    for (int t = 0; t < kMaxPerLane; ++t) {
      const int c = lane + 32 * t;
      k_part[r][t] = (j < a.length && c < d) ? keys[static_cast<int64_t>(j) * d + c] : 0.0f;
    }
  }
  __shared__ float q_stage[kQueriesPerStage][kMaxHeadDim];
  const int first_pos = a.length - a.window;
  for (int i0 = 0; i0 < a.window; i0 += kQueriesPerStage) {
    const int staged = min(kQueriesPerStage, a.window - i0);
    __syncthreads();
    for (int e = threadIdx.x; e < staged * d; e += kThreads) {
      const int s = e / d, c = e % d;
      q_stage[s][c] = a.q[(static_cast<int64_t>(i0 + s) * a.num_q_heads + h) * d + c];
    }
    __syncthreads();
    for (int s = 0; s < staged; ++s) {
      const int i = i0 + s, pos = first_pos + i;
      const float* st = stats + (static_cast<int64_t>(h) * a.window + i) * 2;
      const float max_logit = a.logits ? 0.0f : st[0], inv_sum = a.logits ? 1.0f : 1.0f / st[1];
      for (int r = 0; r < kKeysPerWarp; ++r) {
        const int j = first_key + warp * kKeysPerWarp + r;
        if (j > pos || j >= a.length) continue;  // uniform across the warp
        float dot = 0.0f;
        for (int t = 0; t < kMaxPerLane; ++t) {
          const int c = lane + 32 * t;
          if (c < d) dot = fmaf(q_stage[s][c], k_part[r][t], dot);
        }
        const float logit = WarpSum(dot) * a.scale;
        acc[r] += a.logits ? logit : expf(logit - max_logit) * inv_sum;
      }
    }
  }
  if (lane == 0) {
    for (int r = 0; r < kKeysPerWarp; ++r) {
      const int j = first_key + warp * kKeysPerWarp + r;
      if (j < a.length) a.out[static_cast<int64_t>(h) * a.length + j] = a.logits ? acc[r] : acc[r] / a.window;
    }
  }
}

}  // namespace

int64_t WindowAttentionProbsWorkspaceFloats(const WindowAttentionProbsArgs& args) {
  return int64_t{2} * args.num_q_heads * args.window;
}

absl::Status LaunchWindowAttentionProbs(const WindowAttentionProbsArgs& args, float* workspace, cudaStream_t stream) {
  if (std::string error = WindowAttentionProbsArgsError(args); !error.empty()) {
    return absl::InvalidArgumentError(error);
  }
  if (args.window > 65535 || args.num_q_heads > 65535) {
    return absl::InvalidArgumentError("WindowAttentionProbs: window and query heads must be < 65536 (grid y/x)");
  }
  const dim3 stats_grid(args.window, args.num_q_heads);
  const dim3 probs_grid(static_cast<unsigned>((args.length + kKeysPerBlock - 1) / kKeysPerBlock), args.num_q_heads);
  auto launch = [&](auto per_lane) {
    constexpr int kPerLane = decltype(per_lane)::value;
    if (!args.logits) WindowStatsKernel<kPerLane><<<stats_grid, kThreads, 0, stream>>>(args, workspace);
    WindowProbsKernel<kPerLane><<<probs_grid, kThreads, 0, stream>>>(args, workspace);
  };
  if (args.head_dim <= 64) {
    launch(std::integral_constant<int, 2>{});
  } else if (args.head_dim <= 128) {
    launch(std::integral_constant<int, 4>{});
  } else if (args.head_dim <= 256) {
    launch(std::integral_constant<int, 8>{});
  } else {
    launch(std::integral_constant<int, 16>{});
  }
  KVGATE_CUDA_RETURN_IF_ERROR(cudaGetLastError());
  return absl::OkStatus();
}

}  // namespace kvgate::ops
