#include <algorithm>
#include <cmath>
#include <cstdint>

#include "absl/strings/str_cat.h"
#include "cuda/kernels/attention.cuh"
#include "cuda/kernels/cuda_check.h"

namespace kvgate::ops {
namespace {

constexpr int kWarps = kAttentionBlockSize / 32;
constexpr int kDimsPerLane = kAttentionMaxHeadDim / 32;
constexpr int kRows = kAttentionRowsPerStep;

// The visible rows [lo, hi] of query token t.
struct VisibleRows {
  int32_t lo, hi;
};
__host__ __device__ inline VisibleRows Visible(const AttentionArgs& args, int32_t t) {
  const int32_t hi = args.q_start_row + t;
  const int32_t window_lo = hi - args.sliding_window + 1;
  const int32_t lo = args.sliding_window > 0 && window_lo > 0 ? window_lo : 0;
  return {lo, hi};
}

}  // namespace

// blockIdx.x = query token t, blockIdx.y = query head, blockIdx.z = split of the
// visible rows. Lane `lane` owns dims lane + 32 * i. Warp w walks the block's rows from
// first + kRows * w, stepping kRows * kWarps; a row's score is the warp-reduced dot
// product times scale. With partials == null the block writes the normalised output;
// otherwise (max, sum, accumulator[head_dim]) for its split.
static __global__ void AttentionKernel(AttentionArgs args, int32_t rows_per_split,
                                       float* partials) {
  __shared__ float warp_max[kWarps];
  __shared__ float warp_sum[kWarps];
  __shared__ float warp_acc[kWarps][kAttentionMaxHeadDim];

  const int lane = threadIdx.x % 32;
  const int warp = threadIdx.x / 32;
  const int32_t t = blockIdx.x;
  const int32_t q_head = blockIdx.y;
  const int32_t split = blockIdx.z;
  const int head_dim = args.head_dim;
  const int32_t kv_head = q_head / (args.num_q_heads / args.num_kv_heads);
  const VisibleRows visible = Visible(args, t);
  const int64_t first =
      static_cast<int64_t>(visible.lo) + static_cast<int64_t>(split) * rows_per_split;
  const int64_t split_end = first + rows_per_split - 1;
  const int32_t last = static_cast<int32_t>(split_end < visible.hi ? split_end : visible.hi);

  const int64_t token_head = static_cast<int64_t>(t) * args.num_q_heads + q_head;
  const float* q = args.q + token_head * head_dim;
  const int64_t head_offset = static_cast<int64_t>(kv_head) * args.capacity_tokens * head_dim;
  const float* k_head = args.k_cache + head_offset;
  const float* v_head = args.v_cache + head_offset;

  float q_reg[kDimsPerLane];
  float acc[kDimsPerLane];
#pragma unroll
  for (int i = 0; i < kDimsPerLane; ++i) {
    const int d = lane + 32 * i;
    q_reg[i] = d < head_dim ? q[d] : 0.0f;
    acc[i] = 0.0f;
  }
  float running_max = -INFINITY;
  float running_sum = 0.0f;

  // An empty split (first > last) skips the loop.
  for (int32_t j0 = static_cast<int32_t>(first) + kRows * warp; j0 <= last; j0 += kRows * kWarps) {
    float score[kRows];
#pragma unroll
    for (int r = 0; r < kRows; ++r) {
      score[r] = 0.0f;
      if (j0 + r <= last) {
        const float* k_row = k_head + static_cast<int64_t>(j0 + r) * head_dim;
#pragma unroll
        for (int i = 0; i < kDimsPerLane; ++i) {
          const int d = lane + 32 * i;
          if (d < head_dim) score[r] += q_reg[i] * k_row[d];
        }
      }
    }
#pragma unroll
    for (int r = 0; r < kRows; ++r) {
      for (int offset = 16; offset > 0; offset /= 2) {
        score[r] += __shfl_xor_sync(0xffffffffu, score[r], offset);
      }
      score[r] = j0 + r <= last ? score[r] * args.scale : -INFINITY;
    }
    float step_max = running_max;
#pragma unroll
    for (int r = 0; r < kRows; ++r) step_max = fmaxf(step_max, score[r]);
    // step_max is finite: row j0 <= last is visible.
    const float correction = expf(running_max - step_max);
    float p[kRows];
    running_sum *= correction;
#pragma unroll
    for (int r = 0; r < kRows; ++r) {
      p[r] = j0 + r <= last ? expf(score[r] - step_max) : 0.0f;
      running_sum += p[r];
    }
#pragma unroll
    for (int i = 0; i < kDimsPerLane; ++i) acc[i] *= correction;
#pragma unroll
    for (int r = 0; r < kRows; ++r) {
      if (j0 + r <= last) {
        const float* v_row = v_head + static_cast<int64_t>(j0 + r) * head_dim;
#pragma unroll
        for (int i = 0; i < kDimsPerLane; ++i) {
          const int d = lane + 32 * i;
          if (d < head_dim) acc[i] += p[r] * v_row[d];
        }
      }
    }
    running_max = step_max;
  }

  // Merge the warps: scale each by exp(its max - block max); a warp that saw no row has
  // max -inf and weight 0.
  if (lane == 0) {
    warp_max[warp] = running_max;
    warp_sum[warp] = running_sum;
  }
#pragma unroll
  for (int i = 0; i < kDimsPerLane; ++i) {
    const int d = lane + 32 * i;
    if (d < head_dim) warp_acc[warp][d] = acc[i];
  }
  __syncthreads();
  float block_max = -INFINITY;
#pragma unroll
  for (int w = 0; w < kWarps; ++w) block_max = fmaxf(block_max, warp_max[w]);
  float weight[kWarps];
  float total = 0.0f;
#pragma unroll
  for (int w = 0; w < kWarps; ++w) {
    weight[w] = warp_max[w] == -INFINITY ? 0.0f : expf(warp_max[w] - block_max);
    total += warp_sum[w] * weight[w];
  }
  if (partials == nullptr) {
    float* out = args.out + token_head * head_dim;
    for (int d = threadIdx.x; d < head_dim; d += blockDim.x) {
      float o = 0.0f;
#pragma unroll
      for (int w = 0; w < kWarps; ++w) o += warp_acc[w][d] * weight[w];
      out[d] = o / total;
    }
    return;
  }
  // Partial of an empty split: max -inf, sum 0, accumulator 0.
  float* partial = partials + (token_head * gridDim.z + split) * (head_dim + 2);
  if (threadIdx.x == 0) {
    partial[0] = block_max;
    partial[1] = total;
  }
  for (int d = threadIdx.x; d < head_dim; d += blockDim.x) {
    float o = 0.0f;
#pragma unroll
    for (int w = 0; w < kWarps; ++w) o += warp_acc[w][d] * weight[w];
    partial[2 + d] = o;
  }
}

// blockIdx.x = query token, blockIdx.y = query head: merges the num_splits partials
// of AttentionKernel as the block merged its warps.
static __global__ void AttentionCombineKernel(const float* partials, float* out, int num_splits,
                                              int head_dim) {
  __shared__ float split_weight[kAttentionMaxSplits];
  __shared__ float split_sum[kAttentionMaxSplits];
  const int64_t token_head = static_cast<int64_t>(blockIdx.x) * gridDim.y + blockIdx.y;
  const float* first = partials + token_head * num_splits * (head_dim + 2);
  float max_all = -INFINITY;
  for (int s = 0; s < num_splits; ++s) max_all = fmaxf(max_all, first[s * (head_dim + 2)]);
  for (int s = threadIdx.x; s < num_splits; s += blockDim.x) {
    const float m = first[s * (head_dim + 2)];
    split_weight[s] = m == -INFINITY ? 0.0f : expf(m - max_all);
    split_sum[s] = first[s * (head_dim + 2) + 1];
  }
  __syncthreads();
  float total = 0.0f;
  for (int s = 0; s < num_splits; ++s) total += split_sum[s] * split_weight[s];
  float* o = out + token_head * head_dim;
  for (int d = threadIdx.x; d < head_dim; d += blockDim.x) {
    float acc = 0.0f;
    for (int s = 0; s < num_splits; ++s) acc += first[s * (head_dim + 2) + 2 + d] * split_weight[s];
    o[d] = acc / total;
  }
}

AttentionPlan PlanAttention(const AttentionArgs& args, int num_sms) {
  AttentionPlan plan;
  const VisibleRows last = Visible(args, std::max(args.num_tokens - 1, 0));
  const int32_t max_rows = std::max(last.hi - last.lo + 1, 1);
  plan.rows_per_split = max_rows;
  const int64_t blocks = static_cast<int64_t>(args.num_tokens) * args.num_q_heads;
  if (num_sms <= 0 || blocks <= 0 || blocks >= num_sms) return plan;
  // Aim at about 4 blocks per SM, each with at least kAttentionMinRowsPerSplit rows.
  const int64_t want = (4 * static_cast<int64_t>(num_sms) + blocks - 1) / blocks;
  const int64_t most = (max_rows + kAttentionMinRowsPerSplit - 1) / kAttentionMinRowsPerSplit;
  const int64_t splits = std::min<int64_t>({want, most, kAttentionMaxSplits});
  if (splits <= 1) return plan;
  plan.rows_per_split = static_cast<int32_t>((max_rows + splits - 1) / splits);
  plan.num_splits = (max_rows + plan.rows_per_split - 1) / plan.rows_per_split;
  if (plan.num_splits <= 1) {
    plan = AttentionPlan{1, max_rows, 0};
    return plan;
  }
  plan.workspace_floats = blocks * plan.num_splits * (args.head_dim + 2);
  return plan;
}

absl::Status LaunchAttention(const AttentionArgs& args, const AttentionPlan& plan, float* workspace,
                             cudaStream_t stream) {
  if (args.num_tokens < 0 || args.num_q_heads < 0 || args.num_kv_heads < 0 ||
      args.capacity_tokens < 0 || args.q_start_row < 0 || args.sliding_window < 0) {
    return absl::InvalidArgumentError("Attention: negative size, start row or window");
  }
  if (args.num_tokens == 0 || args.num_q_heads == 0) return absl::OkStatus();
  if (args.head_dim < 1 || args.head_dim > kAttentionMaxHeadDim) {
    return absl::InvalidArgumentError(absl::StrCat("Attention: head_dim ", args.head_dim,
                                                   " outside [1, ", kAttentionMaxHeadDim, "]"));
  }
  if (args.num_kv_heads == 0 || args.num_q_heads % args.num_kv_heads != 0) {
    return absl::InvalidArgumentError(absl::StrCat("Attention: num_q_heads ", args.num_q_heads,
                                                   " is not a multiple of num_kv_heads ",
                                                   args.num_kv_heads));
  }
  if (static_cast<int64_t>(args.q_start_row) + args.num_tokens > args.capacity_tokens) {
    return absl::InvalidArgumentError(
        absl::StrCat("Attention: query rows [", args.q_start_row, ", ",
                     static_cast<int64_t>(args.q_start_row) + args.num_tokens,
                     ") exceed the cache of ", args.capacity_tokens, " rows"));
  }
  if (args.num_q_heads > 65535) {
    return absl::InvalidArgumentError("Attention: more than 65535 query heads");
  }
  const VisibleRows last = Visible(args, args.num_tokens - 1);
  const int64_t max_rows = last.hi - last.lo + 1;
  const int64_t blocks = static_cast<int64_t>(args.num_tokens) * args.num_q_heads;
  if (plan.num_splits < 1 || plan.num_splits > kAttentionMaxSplits || plan.rows_per_split < 1 ||
      static_cast<int64_t>(plan.num_splits) * plan.rows_per_split < max_rows ||
      (plan.num_splits > 1 &&
       (workspace == nullptr ||
        plan.workspace_floats < blocks * plan.num_splits * (args.head_dim + 2)))) {
    return absl::InvalidArgumentError(absl::StrCat(
        "Attention: plan of ", plan.num_splits, " splits x ", plan.rows_per_split, " rows with ",
        plan.workspace_floats, " workspace floats does not fit ", max_rows, " visible rows"));
  }
  const dim3 grid(static_cast<unsigned>(args.num_tokens), static_cast<unsigned>(args.num_q_heads),
                  static_cast<unsigned>(plan.num_splits));
  AttentionKernel<<<grid, kAttentionBlockSize, 0, stream>>>(
      args, plan.rows_per_split, plan.num_splits > 1 ? workspace : nullptr);
  KVGATE_CUDA_RETURN_IF_ERROR(cudaGetLastError());
  if (plan.num_splits > 1) {
    const dim3 combine_grid(static_cast<unsigned>(args.num_tokens),
                            static_cast<unsigned>(args.num_q_heads));
    AttentionCombineKernel<<<combine_grid, kAttentionCombineBlockSize, 0, stream>>>(
        workspace, args.out, plan.num_splits, args.head_dim);
    KVGATE_CUDA_RETURN_IF_ERROR(cudaGetLastError());
  }
  return absl::OkStatus();
}

absl::Status LaunchAttention(const AttentionArgs& args, cudaStream_t stream) {
  return LaunchAttention(args, PlanAttention(args, /*num_sms=*/0), nullptr, stream);
}

}  // namespace kvgate::ops
