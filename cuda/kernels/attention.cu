#include <algorithm>
#include <cmath>
#include <cstdint>

#include "absl/strings/str_cat.h"
#include "cuda/kernels/attention.cuh"
#include "cuda/kernels/attention_core.cuh"
#include "cuda/kernels/cuda_check.h"

namespace kvgate::ops {
namespace {

using attention_core::Visible;
using attention_core::VisibleRows;

// Row j of one kv head of the contiguous cache; key_mask (the [capacity_tokens] bytes of
// that kv head, or of the query head with key_mask_per_query_head, or null) hides evicted
// rows from every query but the one at the same row.
struct CacheRows {
  const uint8_t* key_mask;
  int32_t self_row;
  int32_t head_dim;
  __device__ bool Locate(int32_t j, int64_t* offset) const {
    *offset = static_cast<int64_t>(j) * head_dim;
    return key_mask == nullptr || j == self_row || key_mask[j] != 0;
  }
};

}  // namespace

// blockIdx.x = query token t, blockIdx.y = query head, blockIdx.z = split of the
// visible rows (rows_per_split each). With partials == null the block writes the
// normalised output; otherwise (max, sum, accumulator[head_dim]) for its split.
static __global__ void AttentionKernel(AttentionArgs args, int32_t rows_per_split,
                                       float* partials) {
  const int32_t t = blockIdx.x;
  const int32_t q_head = blockIdx.y;
  const int32_t split = blockIdx.z;
  const int head_dim = args.head_dim;
  const int32_t kv_head = q_head / (args.num_q_heads / args.num_kv_heads);
  const VisibleRows visible = Visible(args, t);
  const int64_t first64 =
      static_cast<int64_t>(visible.lo) + static_cast<int64_t>(split) * rows_per_split;
  const int64_t split_end = first64 + rows_per_split - 1;
  const int32_t last = static_cast<int32_t>(split_end < visible.hi ? split_end : visible.hi);
  // An empty split (first > last) attends no row.
  const int32_t first = static_cast<int32_t>(first64 <= last ? first64 : last + 1);

  const int64_t token_head = static_cast<int64_t>(t) * args.num_q_heads + q_head;
  const int64_t head_offset = static_cast<int64_t>(kv_head) * args.capacity_tokens * head_dim;
  const int32_t mask_row = args.key_mask_per_query_head ? q_head : kv_head;
  const CacheRows rows{
      args.key_mask != nullptr
          ? args.key_mask + static_cast<int64_t>(mask_row) * args.capacity_tokens
          : nullptr,
      visible.hi, head_dim};
  float* partial =
      partials != nullptr
          ? partials + (token_head * gridDim.z + split) * attention_core::PartialFloats(head_dim)
          : nullptr;
  attention_core::AttendRows(rows, args.q + token_head * head_dim, args.k_cache + head_offset,
                             args.v_cache + head_offset, head_dim, args.scale, first, last,
                             args.out + token_head * head_dim, partial);
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
    attention_core::AttentionMergeKernel<<<combine_grid, kAttentionCombineBlockSize, 0, stream>>>(
        workspace, args.out, plan.num_splits, args.head_dim);
    KVGATE_CUDA_RETURN_IF_ERROR(cudaGetLastError());
  }
  return absl::OkStatus();
}

absl::Status LaunchAttention(const AttentionArgs& args, cudaStream_t stream) {
  return LaunchAttention(args, PlanAttention(args, /*num_sms=*/0), nullptr, stream);
}

}  // namespace kvgate::ops
