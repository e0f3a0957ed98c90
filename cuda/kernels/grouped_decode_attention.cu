#include <cuda_runtime.h>

#include <algorithm>
#include <cmath>
#include <cstdint>

#include "absl/strings/str_cat.h"
#include "cuda/kernels/attention_core.cuh"
#include "cuda/kernels/cuda_check.h"
#include "cuda/kernels/grouped_decode_attention.cuh"
#include "cuda/kernels/grouped_decode_core.cuh"

namespace kvgate::ops {
namespace {

static_assert(kGroupedDecodeBlockSize == grouped_decode::kBlockSize, "one block size for the grouped core");

// Rows of one kv head of the contiguous cache: every query head of the group sees the
// last visible row; before it, the key mask (shared or per query head) decides.
template <int G>
struct ContiguousGroupRows {
  int64_t head_row0;  // kv * capacity_tokens
  const uint8_t* mask;  // null, or the kv head's (or its first query head's) mask row
  int64_t capacity_tokens;
  int32_t always_visible;  // visible.hi
  bool per_query_head;
  __device__ __forceinline__ uint32_t Locate(int32_t j, int64_t* row) const {
    constexpr uint32_t kAllHeads = (1u << G) - 1;
    *row = head_row0 + j;
    if (mask == nullptr || j == always_visible) return kAllHeads;
    if (!per_query_head) return mask[j] != 0 ? kAllHeads : 0u;
    uint32_t bits = 0;
#pragma unroll
    for (int g = 0; g < G; ++g) bits |= static_cast<uint32_t>(mask[static_cast<int64_t>(g) * capacity_tokens + j] != 0) << g;
    return bits;
  }
};

// blockIdx.x = kv head, blockIdx.y = split of the visible rows, blockIdx.z = query token.
template <int D, int G>
__global__ void __launch_bounds__(kGroupedDecodeBlockSize)
    GroupedDecodeAttentionKernel(AttentionArgs args, int32_t rows_per_split, float* partials) {
  const int32_t kv = blockIdx.x, split = blockIdx.y, t = blockIdx.z;
  const attention_core::VisibleRows visible = attention_core::Visible(args, t);
  const int64_t first64 = static_cast<int64_t>(visible.lo) + static_cast<int64_t>(split) * rows_per_split;
  const int64_t split_end = first64 + rows_per_split - 1;
  const int32_t last = static_cast<int32_t>(split_end < visible.hi ? split_end : visible.hi);
  const int32_t first = static_cast<int32_t>(first64 <= last ? first64 : last + 1);

  const int64_t head0 = static_cast<int64_t>(t) * args.num_q_heads + static_cast<int64_t>(kv) * G;
  const bool per_query_head = args.key_mask_per_query_head;
  const ContiguousGroupRows<G> rows{
      static_cast<int64_t>(kv) * args.capacity_tokens,
      args.key_mask == nullptr
          ? nullptr
          : args.key_mask + static_cast<int64_t>(per_query_head ? kv * G : kv) * args.capacity_tokens,
      args.capacity_tokens, visible.hi, per_query_head};
  grouped_decode::AttendGroupRows<D, G>(rows, args.k_cache, args.v_cache, args.q + head0 * D, args.scale, first,
                                        last, args.out + head0 * D, partials, head0);
}

template <int D>
void LaunchForDim(const AttentionArgs& args, const dim3& grid, int32_t rows_per_split, float* partials,
                  cudaStream_t stream) {
  const int group = args.num_q_heads / args.num_kv_heads;
  switch (group) {
#define KVGATE_GROUPED_CASE(G)                                                                              \
  case G:                                                                                                   \
    GroupedDecodeAttentionKernel<D, G><<<grid, kGroupedDecodeBlockSize, 0, stream>>>(args, rows_per_split, \
                                                                                     partials);            \
    break;
    KVGATE_GROUPED_CASE(1)
    KVGATE_GROUPED_CASE(2)
    KVGATE_GROUPED_CASE(3)
    KVGATE_GROUPED_CASE(4)
    KVGATE_GROUPED_CASE(5)
    KVGATE_GROUPED_CASE(6)
    KVGATE_GROUPED_CASE(7)
    KVGATE_GROUPED_CASE(8)
#undef KVGATE_GROUPED_CASE
    default:
      break;  // excluded by GroupedDecodeAttentionSupported
  }
}

}  // namespace

bool GroupedDecodeAttentionSupported(const AttentionArgs& args) {
  const auto aligned16 = [](const void* p) { return reinterpret_cast<uintptr_t>(p) % 16 == 0; };
  return args.num_tokens >= 1 && args.num_tokens <= kGroupedDecodeMaxTokens &&
         (args.head_dim == 64 || args.head_dim == 128) && args.num_kv_heads > 0 && args.num_q_heads > 0 &&
         args.num_q_heads % args.num_kv_heads == 0 && args.num_q_heads / args.num_kv_heads <= kGroupedDecodeMaxGroup &&
         args.num_kv_heads <= 65535 && args.capacity_tokens >= 0 && args.q_start_row >= 0 &&
         args.sliding_window >= 0 && static_cast<int64_t>(args.q_start_row) + args.num_tokens <= args.capacity_tokens &&
         aligned16(args.q) && aligned16(args.k_cache) && aligned16(args.v_cache) && aligned16(args.out);
}

AttentionPlan PlanGroupedDecodeAttention(const AttentionArgs& args, int num_sms) {
  AttentionPlan plan;
  const attention_core::VisibleRows last = attention_core::Visible(args, std::max(args.num_tokens - 1, 0));
  const int32_t max_rows = std::max(last.hi - last.lo + 1, 1);
  plan.rows_per_split = max_rows;
  const int64_t blocks = static_cast<int64_t>(args.num_tokens) * args.num_kv_heads;
  if (num_sms <= 0 || blocks <= 0 || blocks >= 4 * static_cast<int64_t>(num_sms)) return plan;
  const int64_t want = (4 * static_cast<int64_t>(num_sms) + blocks - 1) / blocks;
  const int64_t most = (max_rows + kGroupedDecodeMinRowsPerSplit - 1) / kGroupedDecodeMinRowsPerSplit;
  const int64_t splits = std::min<int64_t>({want, most, kAttentionMaxSplits});
  if (splits <= 1) return plan;
  plan.rows_per_split = static_cast<int32_t>((max_rows + splits - 1) / splits);
  plan.num_splits = (max_rows + plan.rows_per_split - 1) / plan.rows_per_split;
  if (plan.num_splits <= 1) return AttentionPlan{1, max_rows, 0};
  plan.workspace_floats =
      static_cast<int64_t>(args.num_tokens) * args.num_q_heads * plan.num_splits * attention_core::PartialFloats(args.head_dim);
  return plan;
}

absl::Status LaunchGroupedDecodeAttention(const AttentionArgs& args, const AttentionPlan& plan, float* workspace,
                                          cudaStream_t stream) {
  if (!GroupedDecodeAttentionSupported(args)) {
    return absl::InvalidArgumentError(absl::StrCat(
        "GroupedDecodeAttention: needs 1 to ", kGroupedDecodeMaxTokens, " tokens, head_dim 64 or 128, at most ",
        kGroupedDecodeMaxGroup, " query heads per kv head, rows inside the cache and 16-byte aligned tensors; got ",
        args.num_tokens, " tokens, head_dim ", args.head_dim, ", ", args.num_q_heads, "/", args.num_kv_heads, " heads"));
  }
  const attention_core::VisibleRows last = attention_core::Visible(args, args.num_tokens - 1);
  const int64_t max_rows = last.hi - last.lo + 1;
  const int64_t partial_floats = static_cast<int64_t>(args.num_tokens) * args.num_q_heads * plan.num_splits *
                                 attention_core::PartialFloats(args.head_dim);
  if (plan.num_splits < 1 || plan.num_splits > kAttentionMaxSplits || plan.rows_per_split < 1 ||
      static_cast<int64_t>(plan.num_splits) * plan.rows_per_split < max_rows ||
      (plan.num_splits > 1 && (workspace == nullptr || plan.workspace_floats < partial_floats))) {
    return absl::InvalidArgumentError(absl::StrCat("GroupedDecodeAttention: plan of ", plan.num_splits, " splits x ",
                                                   plan.rows_per_split, " rows with ", plan.workspace_floats,
                                                   " workspace floats does not fit ", max_rows, " visible rows"));
  }
  const dim3 grid(static_cast<unsigned>(args.num_kv_heads), static_cast<unsigned>(plan.num_splits),
                  static_cast<unsigned>(args.num_tokens));
  float* partials = plan.num_splits > 1 ? workspace : nullptr;
  if (args.head_dim == 64) {
    LaunchForDim<64>(args, grid, plan.rows_per_split, partials, stream);
  } else {
    LaunchForDim<128>(args, grid, plan.rows_per_split, partials, stream);
  }
  KVGATE_CUDA_RETURN_IF_ERROR(cudaGetLastError());
  if (plan.num_splits > 1) {
    const dim3 merge_grid(static_cast<unsigned>(args.num_tokens), static_cast<unsigned>(args.num_q_heads));
    attention_core::AttentionMergeKernel<<<merge_grid, kAttentionCombineBlockSize, 0, stream>>>(
        workspace, args.out, plan.num_splits, args.head_dim);
    KVGATE_CUDA_RETURN_IF_ERROR(cudaGetLastError());
  }
  return absl::OkStatus();
}

}  // namespace kvgate::ops
