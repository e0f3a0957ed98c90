#include <algorithm>
#include <array>
#include <atomic>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <limits>

#include "absl/strings/str_cat.h"
#include "cuda/kernels/attention_core.cuh"
#include "cuda/kernels/cuda_check.h"
#include "cuda/kernels/grouped_decode_core.cuh"
#include "cuda/kernels/grouped_decode_tiled_core.cuh"
#include "cuda/kernels/head_paged_decode_attention.cuh"

namespace kvgate::ops {
namespace {

// Row j of one seq head, through its page table; visible when query_masks is null or has
// `bit` (1 << the q head's index in its group) set in the row's byte.
struct PagedRows {
  const int32_t* page_ids;  // the seq head's pages
  const uint8_t* query_masks;
  int32_t page_tokens;
  int32_t first_slot;  // of row 0 in the first page
  int32_t gap_row;     // rows from gap_row on sit gap_slots slots further
  int32_t gap_slots;
  int32_t head_dim;
  uint32_t bit;
  __device__ bool Locate(int32_t j, int64_t* offset) const {
    const int32_t slot = first_slot + j + (j >= gap_row ? gap_slots : 0);
    const int64_t row =
        static_cast<int64_t>(page_ids[slot / page_tokens]) * page_tokens + slot % page_tokens;
    *offset = row * head_dim;
    return query_masks == nullptr || (query_masks[row] & bit) != 0;
  }
};

// Rows of one seq head for all G query heads of its group: bit g of a row's mask byte
// says query head g sees it (every bit without masks).
template <int G>
struct PagedGroupRows {
  const int32_t* page_ids;  // the seq head's pages
  const uint8_t* query_masks;
  int32_t page_tokens;
  int32_t first_slot;  // of row 0 in the first page
  int32_t gap_row;     // rows from gap_row on sit gap_slots slots further
  int32_t gap_slots;
  __device__ __forceinline__ uint32_t Locate(int32_t j, int64_t* row) const {
    constexpr uint32_t kAllHeads = (1u << G) - 1;
    const int32_t slot = first_slot + j + (j >= gap_row ? gap_slots : 0);
    *row = static_cast<int64_t>(page_ids[slot / page_tokens]) * page_tokens + slot % page_tokens;
    return query_masks == nullptr ? kAllHeads : static_cast<uint32_t>(query_masks[*row]) & kAllHeads;
  }
};

// blockIdx.x = sequence * num_kv_heads + kv head, blockIdx.y = split of its rows (shares
// of at least kHeadPagedDecodeMinRowsPerSplit rows; later splits of short heads are empty).
// kTiled: the tiled core (grouped_decode_tiled_core.cuh), else the warp-per-row core of
// grouped_decode_core.cuh (KVGATE_TILED_DECODE=0, for A/B runs).
template <int D, int G, typename T, bool kTiled>
__global__ void __launch_bounds__(grouped_decode::kBlockSize)
    HeadPagedGroupedDecodeKernel(HeadPagedDecodeAttentionArgs args, float* partials) {
  const HeadPagedKvView& kv = args.kv;
  const int64_t seq_head = blockIdx.x;
  const int64_t seq = seq_head / args.num_kv_heads;
  const int32_t kv_head = static_cast<int32_t>(seq_head % args.num_kv_heads);
  const int64_t length = max(kv.lengths[seq_head], 0);
  const int64_t num_splits = gridDim.y;
  const int64_t share =
      max((length + num_splits - 1) / num_splits, int64_t{kHeadPagedDecodeMinRowsPerSplit});
  const int64_t first = min(static_cast<int64_t>(blockIdx.y) * share, length);
  const int64_t end = min(first + share, length);
  const PagedGroupRows<G> rows{kv.page_ids + kv.page_indptr[seq_head], kv.query_masks, kv.page_tokens,
                               kv.first_slots != nullptr ? kv.first_slots[seq_head] : 0,
                               kv.gap_rows != nullptr ? kv.gap_rows[seq_head] : 0,
                               kv.gap_slots != nullptr ? kv.gap_slots[seq_head] : 0};
  const int64_t head0 = seq * args.num_q_heads + static_cast<int64_t>(kv_head) * G;
  if constexpr (kTiled) {
    grouped_decode::AttendGroupRowsTiled<D, G>(rows, static_cast<const T*>(kv.k_pages),
                                               static_cast<const T*>(kv.v_pages), args.q + head0 * D, args.scale,
                                               static_cast<int32_t>(first), static_cast<int32_t>(end - 1),
                                               args.out + head0 * D, partials, head0);
  } else {
    grouped_decode::AttendGroupRows<D, G>(rows, static_cast<const T*>(kv.k_pages), static_cast<const T*>(kv.v_pages),
                                          args.q + head0 * D, args.scale, static_cast<int32_t>(first),
                                          static_cast<int32_t>(end - 1), args.out + head0 * D, partials, head0);
  }
}

template <int D, typename T, bool kTiled>
void LaunchGroupedForDim(const HeadPagedDecodeAttentionArgs& args, const dim3& grid, float* partials,
                         cudaStream_t stream) {
  switch (args.num_q_heads / args.num_kv_heads) {
#define KVGATE_PAGED_GROUPED_CASE(G)                                                                  \
  case G:                                                                                             \
    HeadPagedGroupedDecodeKernel<D, G, T, kTiled><<<grid, grouped_decode::kBlockSize, 0, stream>>>(args, partials); \
    break;
    KVGATE_PAGED_GROUPED_CASE(1)
    KVGATE_PAGED_GROUPED_CASE(2)
    KVGATE_PAGED_GROUPED_CASE(3)
    KVGATE_PAGED_GROUPED_CASE(4)
    KVGATE_PAGED_GROUPED_CASE(5)
    KVGATE_PAGED_GROUPED_CASE(6)
    KVGATE_PAGED_GROUPED_CASE(7)
    KVGATE_PAGED_GROUPED_CASE(8)
#undef KVGATE_PAGED_GROUPED_CASE
    default:
      break;  // excluded by HeadPagedGroupedSupported
  }
}

}  // namespace

bool HeadPagedGroupedSupported(const HeadPagedDecodeAttentionArgs& args) {
  const auto aligned16 = [](const void* p) { return reinterpret_cast<uintptr_t>(p) % 16 == 0; };
  const HeadPagedKvView& kv = args.kv;
  return args.num_seqs > 0 && args.num_kv_heads > 0 && args.num_q_heads > 0 &&
         args.num_q_heads % args.num_kv_heads == 0 && args.num_q_heads / args.num_kv_heads <= kHeadPagedGroupedMaxGroup &&
         (kv.head_dim == 64 || kv.head_dim == 128) && kv.page_tokens >= 1 &&
         (kv.dtype == KvDtype::kFloat32 || kv.dtype == KvDtype::kBf16) &&
         static_cast<int64_t>(args.num_seqs) * args.num_kv_heads <= std::numeric_limits<int32_t>::max() &&
         aligned16(args.q) && aligned16(kv.k_pages) && aligned16(kv.v_pages) && aligned16(args.out);
}

namespace {

bool TiledDecodeWanted() {
  static const bool tiled = [] {
    const char* value = std::getenv("KVGATE_TILED_DECODE");
    return value == nullptr || std::strcmp(value, "0") != 0;
  }();
  return tiled;
}

template <int D, typename T, bool kTiled>
int ResidentBlocksForDim(int group) {
  // Asked once per kernel instance: the plan runs for every layer of every op-by-op step.
  static std::array<std::atomic<int>, kHeadPagedGroupedMaxGroup + 1> known{};  // 0: not asked yet
  if (group < 1 || group > kHeadPagedGroupedMaxGroup) return 0;
  if (const int cached = known[group].load(std::memory_order_relaxed); cached != 0) return std::max(cached, 0);
  int blocks = 0;
  cudaError_t error = cudaErrorInvalidValue;
  switch (group) {
#define KVGATE_PAGED_RESIDENT_CASE(G)                                                                        \
  case G:                                                                                                    \
    error = cudaOccupancyMaxActiveBlocksPerMultiprocessor(&blocks, HeadPagedGroupedDecodeKernel<D, G, T, kTiled>, \
                                                          grouped_decode::kBlockSize, 0);                    \
    break;
    KVGATE_PAGED_RESIDENT_CASE(1)
    KVGATE_PAGED_RESIDENT_CASE(2)
    KVGATE_PAGED_RESIDENT_CASE(3)
    KVGATE_PAGED_RESIDENT_CASE(4)
    KVGATE_PAGED_RESIDENT_CASE(5)
    KVGATE_PAGED_RESIDENT_CASE(6)
    KVGATE_PAGED_RESIDENT_CASE(7)
    KVGATE_PAGED_RESIDENT_CASE(8)
#undef KVGATE_PAGED_RESIDENT_CASE
    default:
      break;
  }
  const int resident = error == cudaSuccess ? blocks : 0;
  known[group].store(resident > 0 ? resident : -1, std::memory_order_relaxed);
  return resident;
}

// Blocks of the grouped kernel's instance for `args` that one SM holds at once (its
// registers decide: 6 for head_dim 128 on sm_90); 0 when unknown.
int ResidentGroupedBlocksPerSm(const HeadPagedDecodeAttentionArgs& args) {
  const int group = args.num_q_heads / args.num_kv_heads;
  const bool bf16 = args.kv.dtype == KvDtype::kBf16;
  if (TiledDecodeWanted()) {
    if (args.kv.head_dim == 64) {
      return bf16 ? ResidentBlocksForDim<64, uint16_t, true>(group) : ResidentBlocksForDim<64, float, true>(group);
    }
    return bf16 ? ResidentBlocksForDim<128, uint16_t, true>(group) : ResidentBlocksForDim<128, float, true>(group);
  }
  if (args.kv.head_dim == 64) {
    return bf16 ? ResidentBlocksForDim<64, uint16_t, false>(group) : ResidentBlocksForDim<64, float, false>(group);
  }
  return bf16 ? ResidentBlocksForDim<128, uint16_t, false>(group) : ResidentBlocksForDim<128, float, false>(group);
}

}  // namespace

int32_t ChooseDecodeSplits(int64_t blocks, int64_t blocks_per_wave, int32_t max_splits) {
  if (blocks <= 0 || blocks_per_wave <= 0 || max_splits <= 1) return 1;
  // At most about two waves of blocks: past that the model's savings are rounding, and
  // every split costs a merge and a block's start-up.
  const int64_t cap = std::min<int64_t>(max_splits, (2 * blocks_per_wave + blocks - 1) / blocks);
  int32_t best = 1;
  double best_cost = 0.0;
  for (int32_t s = 1; s <= cap; ++s) {
    const int64_t waves = (blocks * s + blocks_per_wave - 1) / blocks_per_wave;
    const double cost = static_cast<double>(waves) / s;  // in units of one unsplit block's time
    if (s == 1 || cost < best_cost - 1e-9) {
      best = s;
      best_cost = cost;
    }
  }
  return best;
}

HeadPagedDecodePlan PlanHeadPagedGroupedDecodeAttention(const HeadPagedDecodeAttentionArgs& args, int num_sms) {
  HeadPagedDecodePlan plan;
  const int64_t blocks = static_cast<int64_t>(args.num_seqs) * args.num_kv_heads;
  if (num_sms <= 0 || blocks <= 0) return plan;
  // KVGATE_DECODE_WAVE_SPLITS=0 keeps the older rule (about 4 blocks an SM) for A/B runs.
  static const bool wave_splits = [] {
    const char* value = std::getenv("KVGATE_DECODE_WAVE_SPLITS");
    return value == nullptr || std::strcmp(value, "0") != 0;
  }();
  int64_t splits = 1;
  const int resident = wave_splits ? ResidentGroupedBlocksPerSm(args) : 0;
  if (resident > 0) {
    splits = ChooseDecodeSplits(blocks, static_cast<int64_t>(num_sms) * resident, kHeadPagedDecodeMaxSplits);
  } else if (blocks < 4 * static_cast<int64_t>(num_sms)) {
    // About 4 blocks per SM (the default, or no occupancy answer).
    splits = std::min<int64_t>((4 * static_cast<int64_t>(num_sms) + blocks - 1) / blocks, kHeadPagedDecodeMaxSplits);
  }
  if (splits <= 1) return plan;
  plan.num_splits = static_cast<int32_t>(splits);
  plan.workspace_floats = static_cast<int64_t>(args.num_seqs) * args.num_q_heads * splits *
                          attention_core::PartialFloats(args.kv.head_dim);
  return plan;
}

absl::Status LaunchHeadPagedGroupedDecodeAttention(const HeadPagedDecodeAttentionArgs& args,
                                                   const HeadPagedDecodePlan& plan, float* workspace,
                                                   cudaStream_t stream) {
  if (!HeadPagedGroupedSupported(args)) {
    return absl::InvalidArgumentError(absl::StrCat(
        "HeadPagedGroupedDecodeAttention: needs head_dim 64 or 128, at most ", kHeadPagedGroupedMaxGroup,
        " query heads per kv head and 16-byte aligned tensors; got head_dim ", args.kv.head_dim, ", ",
        args.num_q_heads, "/", args.num_kv_heads, " heads, ", args.num_seqs, " sequences"));
  }
  const int64_t q_heads = static_cast<int64_t>(args.num_seqs) * args.num_q_heads;
  if (plan.num_splits < 1 || plan.num_splits > kHeadPagedDecodeMaxSplits ||
      (plan.num_splits > 1 && (workspace == nullptr || plan.workspace_floats < q_heads * plan.num_splits *
                                                                                 attention_core::PartialFloats(args.kv.head_dim)))) {
    return absl::InvalidArgumentError(absl::StrCat("HeadPagedGroupedDecodeAttention: plan of ", plan.num_splits,
                                                   " splits with ", plan.workspace_floats,
                                                   " workspace floats does not fit ", q_heads, " query heads"));
  }
  const dim3 grid(static_cast<unsigned>(static_cast<int64_t>(args.num_seqs) * args.num_kv_heads),
                  static_cast<unsigned>(plan.num_splits));
  float* partials = plan.num_splits > 1 ? workspace : nullptr;
  const bool tiled = TiledDecodeWanted();
  const bool bf16 = args.kv.dtype == KvDtype::kBf16;
  if (tiled) {
    if (args.kv.head_dim == 64) {
      bf16 ? LaunchGroupedForDim<64, uint16_t, true>(args, grid, partials, stream)
           : LaunchGroupedForDim<64, float, true>(args, grid, partials, stream);
    } else {
      bf16 ? LaunchGroupedForDim<128, uint16_t, true>(args, grid, partials, stream)
           : LaunchGroupedForDim<128, float, true>(args, grid, partials, stream);
    }
  } else if (args.kv.head_dim == 64) {
    bf16 ? LaunchGroupedForDim<64, uint16_t, false>(args, grid, partials, stream)
         : LaunchGroupedForDim<64, float, false>(args, grid, partials, stream);
  } else {
    bf16 ? LaunchGroupedForDim<128, uint16_t, false>(args, grid, partials, stream)
         : LaunchGroupedForDim<128, float, false>(args, grid, partials, stream);
  }
  KVGATE_CUDA_RETURN_IF_ERROR(cudaGetLastError());
  if (plan.num_splits > 1) {
    attention_core::AttentionMergeKernel<<<static_cast<unsigned>(q_heads), kAttentionCombineBlockSize, 0, stream>>>(
        workspace, args.out, plan.num_splits, args.kv.head_dim);
    KVGATE_CUDA_RETURN_IF_ERROR(cudaGetLastError());
  }
  return absl::OkStatus();
}

// blockIdx.x = sequence * num_q_heads + q head, blockIdx.y = split of the seq head's
// rows. With partials == null the block writes the normalised output; otherwise (max,
// sum, accumulator[head_dim]) for its split.
template <typename T>
__global__ void HeadPagedDecodeAttentionKernel(HeadPagedDecodeAttentionArgs args, float* partials) {
  const HeadPagedKvView& kv = args.kv;
  const int64_t seq_q_head = blockIdx.x;
  const int32_t q_head = static_cast<int32_t>(seq_q_head % args.num_q_heads);
  const int32_t group = args.num_q_heads / args.num_kv_heads;
  const int64_t seq_head = seq_q_head / args.num_q_heads * args.num_kv_heads + q_head / group;
  const int64_t length = max(kv.lengths[seq_head], 0);
  const int64_t num_splits = gridDim.y;
  const int64_t share =
      max((length + num_splits - 1) / num_splits, int64_t{kHeadPagedDecodeMinRowsPerSplit});
  const int64_t first = blockIdx.y * share;
  const int64_t end = min(first + share, length);  // first >= end: an empty split

  const PagedRows rows{kv.page_ids + kv.page_indptr[seq_head],
                       kv.query_masks,
                       kv.page_tokens,
                       kv.first_slots != nullptr ? kv.first_slots[seq_head] : 0,
                       kv.gap_rows != nullptr ? kv.gap_rows[seq_head] : 0,
                       kv.gap_slots != nullptr ? kv.gap_slots[seq_head] : 0,
                       kv.head_dim,
                       kv.query_masks != nullptr ? 1u << (q_head % group) : 0u};
  float* partial = partials != nullptr
                       ? partials + (seq_q_head * num_splits + blockIdx.y) *
                                        attention_core::PartialFloats(kv.head_dim)
                       : nullptr;
  attention_core::AttendRows(rows, args.q + seq_q_head * kv.head_dim, static_cast<const T*>(kv.k_pages),
                             static_cast<const T*>(kv.v_pages),
                             kv.head_dim, args.scale, static_cast<int32_t>(min(first, end)),
                             static_cast<int32_t>(end - 1), args.out + seq_q_head * kv.head_dim,
                             partial);
}

HeadPagedDecodePlan PlanHeadPagedDecodeAttention(const HeadPagedDecodeAttentionArgs& args,
                                                 int num_sms) {
  HeadPagedDecodePlan plan;
  const int64_t blocks = static_cast<int64_t>(args.num_seqs) * args.num_q_heads;
  if (num_sms <= 0 || blocks <= 0 || blocks >= num_sms || args.kv.head_dim < 1) return plan;
  const int64_t splits = std::min<int64_t>((4 * static_cast<int64_t>(num_sms) + blocks - 1) / blocks,
                                           kHeadPagedDecodeMaxSplits);
  if (splits <= 1) return plan;
  plan.num_splits = static_cast<int32_t>(splits);
  plan.workspace_floats = blocks * splits * (args.kv.head_dim + 2);
  return plan;
}

absl::Status LaunchHeadPagedDecodeAttention(const HeadPagedDecodeAttentionArgs& args,
                                            const HeadPagedDecodePlan& plan, float* workspace,
                                            cudaStream_t stream) {
  const HeadPagedKvView& kv = args.kv;
  if (args.num_seqs < 0 || args.num_q_heads < 0 || args.num_kv_heads < 0) {
    return absl::InvalidArgumentError("HeadPagedDecodeAttention: negative size");
  }
  if (args.num_seqs == 0 || args.num_q_heads == 0) return absl::OkStatus();
  if (kv.head_dim < 1 || kv.head_dim > kHeadPagedDecodeMaxHeadDim) {
    return absl::InvalidArgumentError(absl::StrCat("HeadPagedDecodeAttention: head_dim ",
                                                   kv.head_dim, " outside [1, ",
                                                   kHeadPagedDecodeMaxHeadDim, "]"));
  }
  if (args.num_kv_heads == 0 || args.num_q_heads % args.num_kv_heads != 0) {
    return absl::InvalidArgumentError(
        absl::StrCat("HeadPagedDecodeAttention: num_q_heads ", args.num_q_heads,
                     " is not a multiple of num_kv_heads ", args.num_kv_heads));
  }
  if (kv.dtype != KvDtype::kFloat32 && kv.dtype != KvDtype::kBf16) {
    return absl::InvalidArgumentError(
        absl::StrCat("HeadPagedDecodeAttention: unknown dtype ", static_cast<int>(kv.dtype)));
  }
  if (kv.page_tokens < 1) {
    return absl::InvalidArgumentError(
        absl::StrCat("HeadPagedDecodeAttention: page_tokens ", kv.page_tokens, " < 1"));
  }
  if (kv.query_masks != nullptr && args.num_q_heads / args.num_kv_heads > 8) {
    return absl::InvalidArgumentError(
        absl::StrCat("HeadPagedDecodeAttention: query masks hold 8 bits but a kv head serves ",
                     args.num_q_heads / args.num_kv_heads, " q heads"));
  }
  const int64_t blocks = static_cast<int64_t>(args.num_seqs) * args.num_q_heads;
  if (blocks > std::numeric_limits<int32_t>::max()) {
    return absl::InvalidArgumentError("HeadPagedDecodeAttention: more than 2^31 - 1 blocks");
  }
  if (plan.num_splits < 1 || plan.num_splits > kHeadPagedDecodeMaxSplits ||
      (plan.num_splits > 1 &&
       (workspace == nullptr ||
        plan.workspace_floats < blocks * plan.num_splits * (kv.head_dim + 2)))) {
    return absl::InvalidArgumentError(
        absl::StrCat("HeadPagedDecodeAttention: plan of ", plan.num_splits, " splits with ",
                     plan.workspace_floats, " workspace floats does not fit ", blocks, " blocks"));
  }
  const dim3 grid(static_cast<unsigned>(blocks), static_cast<unsigned>(plan.num_splits));
  float* partials = plan.num_splits > 1 ? workspace : nullptr;
  if (kv.dtype == KvDtype::kBf16) {
    HeadPagedDecodeAttentionKernel<uint16_t><<<grid, kAttentionBlockSize, 0, stream>>>(args, partials);
  } else {
    HeadPagedDecodeAttentionKernel<float><<<grid, kAttentionBlockSize, 0, stream>>>(args, partials);
  }
  KVGATE_CUDA_RETURN_IF_ERROR(cudaGetLastError());
  if (plan.num_splits > 1) {
    attention_core::AttentionMergeKernel<<<static_cast<unsigned>(blocks),
                                           kAttentionCombineBlockSize, 0, stream>>>(
        workspace, args.out, plan.num_splits, kv.head_dim);
    KVGATE_CUDA_RETURN_IF_ERROR(cudaGetLastError());
  }
  return absl::OkStatus();
}

absl::Status LaunchHeadPagedDecodeAttention(const HeadPagedDecodeAttentionArgs& args,
                                            cudaStream_t stream) {
  return LaunchHeadPagedDecodeAttention(args, HeadPagedDecodePlan{}, nullptr, stream);
}

}  // namespace kvgate::ops
